"""Benchmarks (`python -m jobs.benchmark`): each stage beside its plain baseline, measured in one run.

Sections: `ingest` (Ray Data vs one process), `train` (Ray Train vs a plain PyTorch loop), `serve` (HTTP
vs direct `predict_proba`) and `gpu` (ResNet50: the limit, cxr's Ray path, DDP, inference). Figures
are never asserted in tests; the tests check that `--quick` runs write a well-formed report.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from collections.abc import Callable

from cxrcore.bench.gpu import benchmark_gpu, check_device
from cxrcore.bench.ingest import benchmark_ingest
from cxrcore.bench.report import (
    QUIET_MAX_WAIT_S,
    Report,
    Section,
    load_average,
    machine_info,
    ray_installed,
    ray_running,
    wait_for_quiet,
)
from cxrcore.bench.serve import benchmark_serve
from cxrcore.bench.train import benchmark_train
from cxrcore.config import BenchmarkConfig, flag_name, to_dict

log = logging.getLogger(__name__)

TITLES = {
    "ingest": "Ingest: Ray Data vs one process",
    "train": "Training: Ray Train vs plain PyTorch",
    "serve": "Serving: Ray Serve HTTP vs direct predict_proba",
    "gpu": "GPU: ResNet50 at 224 px",
}


def run_benchmarks(config: BenchmarkConfig) -> Report:
    """Run the sections `config` asks for, rewriting OUT/benchmark.{json,md} after each, so a long run keeps
    what it has measured whatever happens later."""
    import torch

    if config.what == "gpu":
        check_device(config.device)  # before anything runs
    report = Report(machine_info(), {"command": command(config), **to_dict(config)})
    started_ray = ray_installed() and not ray_running()
    for name in config.sections():
        if name == "gpu" and config.device == "cuda" and not torch.cuda.is_available():
            section = Section(name, TITLES[name], skipped="no CUDA device visible on this machine")
        else:
            if name == "serve" and started_ray and ray_running():
                # serve.benchmark starts a Ray of its own; two on one machine would share its cores.
                import ray

                ray.shutdown()
            # Each section starts on a quiet machine (bounded): not while the last one's processes wind down.
            # A --quick run (the tests) only looks, briefly.
            quiet = wait_for_quiet(0.0, window_s=0.2) if config.quick else wait_for_quiet(QUIET_MAX_WAIT_S)
            section = _run_section(name, config)
            section.quiet = quiet
        report.sections.append(section)
        report.write(config.out)
    return report


def _run_section(name: str, config: BenchmarkConfig) -> Section:
    """One section, timed; a section that fails says why in the report, and the others still run."""
    started = time.perf_counter()
    try:
        section = RUNNERS[name](config)
    except Exception as exc:
        log.exception("benchmark section %s failed", name)
        section = Section(name, TITLES[name], error=f"{type(exc).__name__}: {exc}")
    section.seconds = time.perf_counter() - started
    section.load_average = load_average()
    return section


def command(config: BenchmarkConfig) -> str:
    """The command line that repeats this run's choices: every setting that differs from what the same
    section with the same --quick takes unset (benchmark.json holds every setting, also the unset ones).

    >>> command(BenchmarkConfig("serve", out="/b", serve_upload=1024, serve_upload_format="dicom"))
    'python -m jobs.benchmark serve --out /b --serve-upload 1024 --serve-upload-format dicom'
    """
    words = ["python", "-m", "jobs.benchmark", config.what, "--out", config.out] + ["--quick"] * config.quick
    unset = BenchmarkConfig(config.what, quick=config.quick)
    for setting in dataclasses.fields(config):
        value = getattr(config, setting.name)
        if setting.name in ("what", "out", "quick") or value is None or value == getattr(unset, setting.name):
            continue  # None: what a preset leaves to the data (--raw's images: all of them)
        if isinstance(value, bool):
            words.append(flag_name(setting.name) if value else f"--no-{flag_name(setting.name)[2:]}")
        else:
            words += [flag_name(setting.name), str(value)]
    return shlex.join(words)


RUNNERS: dict[str, Callable[[BenchmarkConfig], Section]] = {
    "ingest": benchmark_ingest,
    "train": benchmark_train,
    "serve": benchmark_serve,
    "gpu": benchmark_gpu,
}
