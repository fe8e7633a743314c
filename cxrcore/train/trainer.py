"""The training driver: datasets, scaling, storage and resume for one TorchTrainer run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrcore.config import TrainConfig, to_dict
from cxrcore.labels import CLASSES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run lives and how its best epoch scored."""

    run_dir: str
    best_checkpoint: str | None
    latest_checkpoint: str | None
    metrics: dict[str, Any]
    """the last reported epoch's metrics."""
    best_metrics: dict[str, Any]


def resolve_pretrained(config: TrainConfig) -> str | None:
    """The initial weights to load: a local file, "hub", or None for random initialisation."""
    from cxrcore.models import get_model_entry

    entry = get_model_entry(config.model)
    choice = config.pretrained.strip()
    if choice.lower() == "none":
        return None
    if choice.lower() == "auto":
        return "hub" if entry.accepts_pretrained and not entry.name.startswith("tiny_") else None
    if not entry.accepts_pretrained:
        raise ValueError(f"--pretrained: model {config.model!r} takes no pretrained weights; use 'none'")
    if choice.lower() == "hub":
        return "hub"
    if not Path(choice).is_file():
        raise FileNotFoundError(f"--pretrained: no weights file at {choice}")
    return choice


def loop_config(config: TrainConfig) -> dict[str, Any]:
    """Everything the worker loop needs, resolved once in the driver (and JSON-plain for Ray)."""
    from cxrcore.data.ingest import read_report
    from cxrcore.models import create_model, get_model_entry

    report = read_report(config.data)
    entry = get_model_entry(config.model)
    segmenting = entry.input_spec.task == "segment"
    train_counts = [report["by_class_split"].get(c, {}).get("train", 0) for c in CLASSES]
    pretrained = resolve_pretrained(config)
    if pretrained == "hub":
        create_model(config.model, pretrained="hub")  # fail fast, in the driver, when the hub is unreachable
    if "mask" in entry.input_spec.channels and report["without_mask"] and not config.segmenter:
        log.warning(
            "%d images have no lung mask and %s needs one: they get an empty mask. "
            "Train a segmenter (`cxr train --model unet`) and pass --segmenter",
            report["without_mask"],
            config.model,
        )
    train_rows = report["by_split"]["train"]
    if segmenting:
        train_rows = round(train_rows * (1 - report["without_mask"] / max(report["ingested"], 1)))
    return {
        "train": to_dict(config),
        "pretrained": pretrained,
        "image_size": config.image_size or report["config"]["size"],
        "train_rows": train_rows,
        "class_weights": _class_weights(train_counts) if config.class_weights and not segmenting else None,
        "data": {
            "dataset": config.data,
            "fingerprint": report["fingerprint"],
            "size": report["config"]["size"],
        },
    }


def build_trainer(config: TrainConfig, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer for `config`: datasets, scaling, storage, failure and checkpoint policy."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from cxrcore.data import storage
    from cxrcore.data.ingest import read_split
    from cxrcore.models import get_model_entry
    from cxrcore.train.loop import TRAIN_COLUMNS, train_loop_per_worker

    settings = loop_config(config)
    segmenting = get_model_entry(config.model).input_spec.task == "segment"
    datasets = {split: read_split(config.data, split, TRAIN_COLUMNS) for split in ("train", "val")}
    if segmenting:  # the segmenter learns from images that have a ground-truth mask
        datasets = {split: ds.map_batches(_with_mask, batch_format="numpy") for split, ds in datasets.items()}
    if _fits_in_object_store(settings["train_rows"], settings["data"]["size"]):
        # Streaming re-reads Parquet every epoch; a dataset this small is cheaper to keep in memory.
        datasets = {split: ds.materialize() for split, ds in datasets.items()}

    storage_path = config.out if "://" in config.out else storage.resolve(config.out)[1]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings,
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.gpu),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=config.run_name(),
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_score", checkpoint_score_order="max"
            ),
            callbacks=callbacks,
        ),
    )


def fit(config: TrainConfig) -> TrainResult:
    """Train with a TorchTrainer; re-running with the same --name and --out resumes the run."""
    trainer = build_trainer(config)
    result = trainer.fit()
    ranked = result.best_checkpoints or []
    best = result.get_best_checkpoint("val_score", "max") if ranked else None
    best_metrics: dict[str, Any] = next((m for c, m in ranked if best and c.path == best.path), {})
    return TrainResult(
        run_dir=str(result.path),
        best_checkpoint=best.path if best else None,
        latest_checkpoint=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}),
        best_metrics=dict(best_metrics),
    )


def _fits_in_object_store(rows: int, size: int) -> bool:
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0)
    return rows * 2 * size * size * 1.25 < store / 4  # image + mask per row, train + val


def _class_weights(counts: list[int]) -> list[float]:
    from cxrcore.train.engine import class_weights

    return [float(w) for w in class_weights(counts)]


def _with_mask(batch: dict[str, Any]) -> dict[str, Any]:
    keep = batch["has_mask"].astype(bool)
    return {name: column[keep] for name, column in batch.items()}
