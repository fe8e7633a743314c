"""The benchmark report: each figure beside its baseline from the same run, their ratio, issue 9's target."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrcore.runtime import usable_cores, usable_cpu_ids

JSON_NAME = "benchmark.json"
MARKDOWN_NAME = "benchmark.md"


@dataclass(frozen=True)
class Target:
    """A bound on a row: on its ratio, on its figure, or on how much the figure adds to the baseline.

    >>> Target("ratio", 1.6).describe("images/s"), Target("added", 10, at_most=True).describe("ms")
    ('≥ 1.6×', 'added ≤ 10 ms')
    """

    on: str
    """"ratio" (figure / baseline), "figure", or "added" (figure − baseline)."""
    bound: float
    at_most: bool = False

    def describe(self, unit: str) -> str:
        sign = "≤" if self.at_most else "≥"
        if self.on == "ratio":
            return f"{sign} {self.bound:g}×"
        return f"{'added ' if self.on == 'added' else ''}{sign} {self.bound:g} {unit}"

    def met(self, row: Row) -> bool | None:
        measured = {"ratio": row.ratio, "figure": row.value, "added": row.added}[self.on]
        if measured is None:
            return None
        return measured <= self.bound if self.at_most else measured >= self.bound


@dataclass
class Row:
    """One measurement of a section's table; the ratio is always computed here, from the two figures."""

    measure: str
    """what was measured, in words."""
    value: float | None
    unit: str
    baseline: str = ""
    """what the figure is compared with, in words."""
    baseline_value: float | None = None
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value

    @property
    def added(self) -> float | None:
        if self.value is None or self.baseline_value is None:
            return None
        return self.value - self.baseline_value

    @property
    def met(self) -> bool | None:
        return self.target.met(self) if self.target else None

    def to_dict(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "measure": self.measure,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": self.baseline_value,
            "ratio": round(ratio, 3) if ratio is not None else None,
            "target": self.target.describe(self.unit) if self.target else None,
            "met": self.met,
        }


@dataclass
class Section:
    """One stage's measurements: the comparison table, a breakdown table, and what a reader should know."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    breakdown: tuple[list[str], list[list[Any]]] | None = None
    """(header, rows) of a second table, where the time goes; a column named "... %" holds fractions."""
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    """everything else measured (JSON only), e.g. per-epoch figures."""
    seconds: float = 0.0
    load_average: float | None = None
    """the machine's 1-minute load average when the section ended: above its cores, figures are noisy."""
    quiet: Quiet | None = None
    """how the section waited for the machine to go quiet before it started (`wait_for_quiet`)."""
    skipped: str | None = None
    """why the section did not run (e.g. no CUDA)."""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        header, rows = self.breakdown or ([], [])
        return {
            "name": self.name,
            "title": self.title,
            "rows": [row.to_dict() for row in self.rows],
            "breakdown": [dict(zip(header, row, strict=True)) for row in rows],
            "notes": self.notes,
            "details": self.details,
            "seconds": round(self.seconds, 1),
            "load_average": self.load_average,
            "quiet": self.quiet.to_dict() if self.quiet else None,
            "skipped": self.skipped,
            "error": self.error,
        }


@dataclass
class Report:
    """What `python -m jobs.benchmark` writes: the machine, the settings and every section."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    sections: list[Section] = field(default_factory=list)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    @property
    def failed(self) -> list[str]:
        return [section.name for section in self.sections if section.error]

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "machine": self.machine,
            "settings": self.settings,
            "sections": {section.name: section.to_dict() for section in self.sections},
        }

    def write(self, out: str | Path) -> tuple[Path, Path]:
        """OUT/benchmark.json and OUT/benchmark.md; returns their paths."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, markdown_path = folder / JSON_NAME, folder / MARKDOWN_NAME
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        markdown_path.write_text(self.markdown())
        return json_path, markdown_path

    def markdown(self) -> str:
        machine = self.machine
        gpu = f"{machine['gpu_count']}× {machine['gpu']}" if machine["gpu"] else "no GPU"
        lines = [
            "# cxr benchmark",
            "",
            f"Run {self.started}: `{self.settings['command']}`.",
            "",
            f"Machine: {machine['cores']} CPU cores ({machine.get('cpu', 'CPU unknown')}, torch's kernels "
            f"{machine.get('cpu_capability', 'unknown')}), torch {machine['torch_threads']} threads, {gpu}; "
            f"Python {machine['python']}, torch {machine['torch']}, Ray {machine['ray']}; load average "
            f"{machine['load_average']} at the start (other work on the machine makes figures noisy).",
            "",
            "Every figure was measured in this run next to its baseline, on the same data and cores; "
            "ratio = figure / baseline. Targets are those of issue 9.",
        ]
        quick = bool(self.settings.get("quick"))
        if quick:
            lines += [
                "",
                "**--quick run**: tiny sizes; the figures show that the code runs, not how fast, so no "
                "target is judged (the target and met? columns are left out).",
            ]
        for section in self.sections:
            lines += ["", f"## {section.title}", ""]
            if section.skipped:
                lines.append(f"Skipped: {section.skipped}")
                continue
            if section.error:
                lines += [f"Failed: {section.error}", ""]
            if section.rows:
                header = ["measure", "figure", "baseline", "ratio", "target", "met?"]
                keep = 4 if quick else len(header)  # a --quick figure is no measurement to judge
                lines += _markdown_table(header[:keep], [_cells(row)[:keep] for row in section.rows])
            if section.breakdown:
                header, rows = section.breakdown
                cells = [[_plain(cell, name) for cell, name in zip(row, header, strict=True)] for row in rows]
                lines += ["", *_markdown_table(header, cells)]
            if section.notes:
                lines += ["", *(f"- {note}" for note in section.notes)]
            started = f" {section.quiet.describe()}" if section.quiet else ""
            lines += [
                "",
                f"Section time: {section.seconds:.0f} s; load average {section.load_average} at its end."
                + started,
            ]
        return "\n".join(lines) + "\n"


QUIET_BUSY = 0.15
"""The share of all cores busy below which the machine counts as quiet (an idle local Ray with a Serve app
keeps about 12 % of 2 cores busy: its controller, GCS, dashboard and replicas)."""
QUIET_WINDOW_S = 3.0
QUIET_MAX_WAIT_S = 90.0


@dataclass(frozen=True)
class Quiet:
    """What `wait_for_quiet` saw: how long it waited and how busy the cores were over its last window."""

    waited_s: float
    busy: float | None
    """share of all cores busy over the last window (None: no /proc/stat here, nothing waited for)."""
    quiet: bool
    window_s: float = QUIET_WINDOW_S

    def describe(self) -> str:
        if self.busy is None:
            return "Started at once (no /proc/stat to tell how busy the machine was)."
        busy = f"{self.busy:.0%} of the cores busy over {self.window_s:g} s"
        if self.quiet:
            return f"Started after {self.waited_s:.0f} s of waiting for a quiet machine ({busy})."
        return (
            f"Started after {self.waited_s:.0f} s with the machine still busy ({busy}): figures may be low."
        )

    def to_dict(self) -> dict[str, Any]:
        busy = round(self.busy, 3) if self.busy is not None else None
        return {
            "waited_s": round(self.waited_s, 1),
            "busy": busy,
            "quiet": self.quiet,
            "window_s": self.window_s,
        }


def wait_for_quiet(
    max_wait_s: float = QUIET_MAX_WAIT_S, busy_below: float = QUIET_BUSY, window_s: float = QUIET_WINDOW_S
) -> Quiet:
    """Wait (at most `max_wait_s`) until the cores were less than `busy_below` busy over `window_s`.

    A section that starts while the previous one winds down (a training cluster stopping, Ray's workers
    exiting) measures its first figures on cores that are not all its own; `make bench`'s serve section
    once saw 12 ms of other processes' CPU per request at concurrency 1 that way. Polls /proc/stat."""
    started = time.monotonic()
    busy = _busy_share(window_s)
    while busy is not None and busy >= busy_below and time.monotonic() - started < max_wait_s:
        busy = _busy_share(window_s)
    quiet = busy is None or busy < busy_below
    return Quiet(time.monotonic() - started, busy, quiet, window_s)


def _busy_share(window_s: float) -> float | None:
    """The share of all cores' time spent busy over the next `window_s` seconds (None without /proc/stat)."""

    def read() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user..steal; guest time is already counted in user

    before = read()
    if before is None:
        return None
    time.sleep(window_s)  # the measurement window itself, not a wait for another process
    after = read()
    if after is None or after[0] <= before[0]:
        return None
    total, idle = after[0] - before[0], after[1] - before[1]
    return max(0.0, 1.0 - idle / total)


class CpuShare:
    """The CPU time other processes took from this process's cores while a run in this process was timed.

    Busy time of the cores in this process's affinity (/proc/stat's per-CPU lines) less this process's own
    CPU time (os.times(), every thread). For runs in this process only (the plain loop): Ray's workers
    exit with their run and the raylet, which ignores SIGCHLD, reaps them without adding their CPU time to
    anyone's, so a Ray run's own CPU cannot be read back once it has ended. None where /proc cannot be
    read."""

    def __init__(self) -> None:
        self.start = _cpu_now()

    def others(self) -> float | None:
        """The share of this process's cores that other processes kept busy since this was made."""
        end = _cpu_now()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start, strict=True))
        return max(0.0, busy - own) / (wall * len(usable_cpu_ids()))


OTHERS_BUSY = 0.25
"""Other processes' share of the cores above which a run's figure is flagged as taken on a busy machine."""


def _cpu_now() -> tuple[float, float, float] | None:
    """(busy CPU-s of this process's cores, this process's CPU-s, monotonic s); None without /proc/stat."""
    cpus = {f"cpu{n}" for n in usable_cpu_ids()}
    try:
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name in cpus:
                fields = [int(v) for v in values]
                busy += sum(fields[:8]) - fields[3] - fields[4]  # user..steal less idle and iowait
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()


def machine_info() -> dict[str, Any]:
    """What the figures depend on: cores, threads, GPU, versions, and how busy the machine was."""
    import importlib.metadata

    import torch

    try:
        ray = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:  # a GPU machine with torch alone (the gpu section)
        ray = "not installed"

    cuda = torch.cuda.is_available()
    return {
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": load_average(),
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows): the VM behind this
    machine has changed between runs (an AMD EPYC with AVX-512 since session 38), and the figures with it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ray_installed() -> bool:
    """Whether Ray can be imported here (a GPU machine may have torch alone)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def ray_running() -> bool:
    """Whether this process is connected to a Ray cluster."""
    import ray

    return bool(ray.is_initialized())


def load_average() -> float | None:
    """The 1-minute load average (runnable processes); None where the platform has none."""
    return round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None


def format_number(value: float | None, unit: str = "") -> str:
    """3 significant figures, thousands separated: 0.281, 23.6, 853, 2,470."""
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{value:.0%}"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def _cells(row: Row) -> list[str]:
    met = {True: "yes", False: "**no**", None: ""}[row.met]
    ratio = row.ratio
    baseline = row.baseline
    if row.baseline_value is not None:
        baseline = f"{baseline}: {format_number(row.baseline_value, row.unit)}" if baseline else ""
    return [
        row.measure,
        format_number(row.value, row.unit),
        baseline or "—",
        f"{ratio:.2f}×" if ratio is not None else "—",
        row.target.describe(row.unit) if row.target else "—",
        met,
    ]


def _plain(cell: Any, column: str) -> str:
    """A breakdown cell; a column named "... %" holds fractions, printed as percentages."""
    if isinstance(cell, float):
        return format_number(cell, "%" if column.endswith("%") else "")
    return "—" if cell is None else str(cell)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(row) for row in rows)]
