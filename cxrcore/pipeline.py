"""The end-to-end pipeline behind `cxr demo` and `python -m jobs.pipeline`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cxrcore.config import ConfigError, IngestConfig, PipelineConfig, TuneConfig
from cxrcore.labels import CLASSES
from cxrcore.summaries import format_comparison, format_ingest_report, format_scan


def comparison_config(config: PipelineConfig, report: dict[str, Any] | None = None) -> TuneConfig:
    """The Tune comparison the pipeline runs, on the dataset it ingests into its work folder.

    With the ingest `report`, the experiment is named by what makes it one (the data and the search
    settings, `experiment_settings`): the same demo again resumes its experiment (a finished one trains
    nothing), and `--seed 2` after `--seed 1` in one folder starts its own, where one name for all had
    refused it as "started with other settings" after synthesis and ingest."""
    from cxrcore.tune import experiment_settings

    work = Path(config.work_dir)
    tune = TuneConfig(
        data=str(work / "dataset"), registry=str(work / "registry"), models=config.models,
        trials=config.trials, repeats=config.repeats, epochs=config.epochs, grace_epochs=config.grace_epochs,
        pretrained=config.pretrained, out=str(work / "runs"), name="demo", seed=config.seed,
    )  # fmt: skip
    if report is None:
        return tune
    settings = json.dumps(experiment_settings(tune, report), sort_keys=True, default=str)
    return dataclasses.replace(tune, name=f"demo-{hashlib.sha256(settings.encode()).hexdigest()[:8]}")


def check_pipeline(config: PipelineConfig) -> None:
    """What would fail the pipeline after minutes of synthesis and ingest, checked before Ray starts: the
    --real folder, the architectures and the --pretrained choice (as `cxr tune` checks them)."""
    from cxrcore.data import storage
    from cxrcore.tune import check_settings

    if config.real and not storage.is_remote(config.real) and not Path(config.real).is_dir():
        raise ConfigError(f"--real: no folder at {config.real}")
    if config.tune:
        check_settings(comparison_config(config))


def _own_raw(raw: Path) -> Path:
    """The demo's folder of phantoms, emptied where an earlier demo's synthesis marked it as its own (a
    re-run with another --per-class or --seed writes it afresh); one holding files no synthesis marked is
    refused, never deleted."""
    import shutil

    from cxrcore.data.synthetic import MARKER_NAME

    if (raw / MARKER_NAME).is_file():
        shutil.rmtree(raw)
    elif raw.is_dir() and any(raw.iterdir()):
        raise ConfigError(
            f"{raw} holds files no synthesis of this cxr marked as its own (an earlier cxr's demo phantoms, "
            "or other files): remove it, or pass another --work-dir"
        )
    return raw


def run_pipeline(config: PipelineConfig) -> dict[str, str]:
    """Data, check, ingest, Tune comparison, registry; print each step and where its results are."""
    from cxrcore.data.ingest import ingest_dataset
    from cxrcore.data.layout import check_layout
    from cxrcore.data.synthetic import write_examples, write_synthetic_dataset
    from cxrcore.runtime import dashboard_text, init_ray

    started = time.perf_counter()
    work = Path(config.work_dir)  # absolute: the config resolved it where it was typed

    def step(title: str) -> None:
        print(f"\n== [{time.perf_counter() - started:6.1f}s] {title}", flush=True)

    step("Ray")
    dashboard = init_ray(config.address)
    print(f"Ray dashboard: {dashboard_text(dashboard)}")

    if config.real:
        raw = config.real
    else:
        step(f"synthesising {config.per_class} phantoms per class")
        summary = write_synthetic_dataset(
            _own_raw(work / "raw"), per_class=config.per_class, seed=config.seed
        )
        raw = str(summary.root)
        print(
            f"wrote {sum(summary.counts.values())} images to {raw} ({summary.images_per_second:.0f} images/s)"
        )

    step(f"checking {raw}")
    print(format_scan(check_layout(raw)))

    step("ingesting with Ray Data")
    dataset = str(work / "dataset")
    report = ingest_dataset(IngestConfig(raw=raw, out=dataset, size=config.size, seed=config.seed))
    print(format_ingest_report(report))
    results = {"raw": raw, "dataset": dataset, "ingest report": f"{dataset}/ingest_report.json"}
    if not config.real:  # what the served model is sent at the end: new images, one clear case per class
        results["examples"] = str(write_examples(work / "examples", seed=config.seed)[CLASSES[0]].parent)

    if config.tune:
        from cxrcore.tune import run_comparison

        each = (
            f"1 trial each, {config.epochs} epochs"  # ASHA ranks an architecture's trials: none to stop
            if config.trials == 1
            else f"{config.trials} trials each, up to {config.epochs} epochs"
        ) + (f", each trained with {config.repeats} seeds" if config.repeats > 1 else "")
        step(f"comparing {config.models} with Ray Tune ({each})")
        tune_config = comparison_config(config, report)
        registry = tune_config.registry
        comparison = run_comparison(tune_config)
        print(format_comparison(comparison))
        results.update({"registry": registry, "production model": comparison["production"] or "none"})
        candidate = (comparison.get("production_kept") or {}).get("candidate")
        if not comparison["production"] and candidate:  # a winner not shown above chance: candidate only
            results["candidate model"] = candidate
        results.update({f"comparison {k}": v for k, v in comparison["reports"].items()})

    step("done")
    results["Ray dashboard"] = dashboard or "not available"
    for name, location in results.items():
        print(f"{name:>20}: {location}")
    return results
