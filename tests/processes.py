"""What a test can see of other processes through /proc (Linux): groups, leftovers, listening sockets."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def live_processes(predicate: Callable[[int], bool]) -> list[int]:
    """Pids of live (not zombie) processes, other than this one, for which `predicate(pid)` holds."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            stat = read_proc(f"/proc/{entry}/stat")
            if stat and stat.rpartition(")")[2].split()[0] != "Z" and predicate(int(entry)):
                found.append(int(entry))
    return found


def group_of(pgid: int) -> list[int]:
    """The live processes of a process group."""
    return live_processes(lambda pid: _pgid(pid) == pgid)


def wait_until_gone(marker: str, timeout: float = 30) -> list[int]:
    """Poll until no live process has `marker` in its environment; the pids still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        alive = live_processes(lambda pid: marker in read_proc(f"/proc/{pid}/environ"))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def command_line(pid: int) -> str:
    return read_proc(f"/proc/{pid}/cmdline").replace("\0", " ")


def listening(pids: list[int]) -> dict[int, str]:
    """Port → local address of every TCP socket these processes listen on (from /proc/net/tcp, tcp6)."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # gone meanwhile
            continue
        inodes |= {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in read_proc(table).splitlines()[1:]:
            columns = line.split()
            address, port = columns[1].split(":")
            if columns[3] == "0A" and columns[9] in inodes:  # 0A: LISTEN
                found[int(port, 16)] = _address(address)
    return found


def read_proc(path: str) -> str:
    """A /proc file's text, or "" when the process is gone or belongs to someone else."""
    try:
        return Path(path).read_bytes().decode(errors="replace")
    except OSError:
        return ""


def session_of(pid: int) -> list[int]:
    """The live processes of the session `pid` leads: it and everything started under it, also those in
    process groups of their own (Ray's workers)."""
    return live_processes(lambda other: _stat_field(other, 3) == pid)


def _pgid(pid: int) -> int:
    return _stat_field(pid, 2)


def _stat_field(pid: int, index: int) -> int:
    """A numeric field of /proc/PID/stat after the command name (0 is the state): 2 pgid, 3 session."""
    stat = read_proc(f"/proc/{pid}/stat")
    return int(stat.rpartition(")")[2].split()[index]) if stat else -1


def _address(hex_address: str) -> str:
    """/proc/net's hex address as text: 0100007F → 127.0.0.1 (IPv6: eight groups of four hex digits)."""
    if len(hex_address) == 8:
        return ".".join(str(b) for b in bytes.fromhex(hex_address)[::-1])
    words = [bytes.fromhex(hex_address[i : i + 8])[::-1].hex() for i in range(0, 32, 8)]
    return ":".join(w[j : j + 4] for w in words for j in (0, 4))
