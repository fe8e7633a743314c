"""Typed job configs: dataclasses that validate themselves, load from YAML and become CLI flags.

One config class serves the `cxr` console script, `python -m jobs.<name> --config FILE` and Ray (via
to_dict/from_dict), so the three can never disagree about a setting's name, type or default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")
PRETRAINED_CHOICES = ("auto", "hub", "none")
"""Keyword values of --pretrained; anything else is a weights file."""


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names the flag."""


def option(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False) -> Any:
    """A dataclass field that documents itself as a CLI flag (or positional argument)."""
    metadata = {"help": help, "positional": positional}
    return field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    """The CLI spelling of a config field: `val_fraction` → `--val-fraction`."""
    return "--" + name.replace("_", "-")


def resolve_location(location: str) -> str:
    """A local path made absolute (against this process's working directory); URIs unchanged.

    Configs resolve their locations once, where they enter (the driver, the shell's directory), so a
    relative `--out` means the same folder in every Ray worker and Tune trial.

    >>> resolve_location("s3://bucket/runs")
    's3://bucket/runs'
    """
    if "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location))


def _resolve_fields(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None:
            setattr(config, name, resolve_location(value))


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{flag_name(name)}: {message}")


@dataclass
class IngestConfig:
    """Ingest a raw dataset folder into a Parquet dataset with a deterministic stratified split.

    >>> IngestConfig(raw="data/raw", out="data/cxr", size=128).test_fraction
    0.1
    """

    raw: str = option(help="raw dataset folder in the COVID-19 Radiography Database layout", positional=True)
    out: str = option(help="output dataset: a local folder or a URI (s3://, gs://, file://)", positional=True)
    size: int = option(256, "base resolution: images and masks are resized to size×size")
    seed: int = option(0, "seed of the train/val/test assignment")
    val_fraction: float = option(0.1, "share of each class in the validation split")
    test_fraction: float = option(0.1, "share of each class in the test split")
    near_duplicate_bits: int = option(
        12, "perceptual-hash distance (bits of 256) up to which two images count as near duplicates"
    )
    min_side: int = option(64, "images smaller than this (pixels, either side) are rejected")
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")

    def __post_init__(self) -> None:
        _resolve_fields(self, "raw", "out")
        _require(32 <= self.size <= 2048, "size", f"must be between 32 and 2048, got {self.size}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")
        _require(
            self.val_fraction + self.test_fraction < 1.0,
            "val_fraction",
            "val and test fractions must leave something to train on",
        )
        _require(
            0 <= self.near_duplicate_bits <= 64,
            "near_duplicate_bits",
            "must be between 0 and 64 (0: exact only)",
        )
        _require(self.min_side >= 1, "min_side", "must be positive")


@dataclass
class SynthConfig:
    """Write synthetic chest X-ray phantoms in the Kaggle layout."""

    out: str = option(help="folder to write the synthetic dataset to", positional=True)
    per_class: int = option(100, "images per class")
    seed: int = option(0, "random seed; the same seed writes the same images")

    def __post_init__(self) -> None:
        _require(self.per_class >= 1, "per_class", f"must be at least 1, got {self.per_class}")


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config (JSON/YAML-safe), e.g. to pass it to Ray workers."""
    return dataclasses.asdict(config)


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build a config from a dict; unknown keys are an error with a "did you mean" hint."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(names)}"
            raise ConfigError(f"unknown setting {key!r} for {cls.__name__}{hint}")
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING and f.name not in values:
            what = f.metadata.get("help", "")
            raise ConfigError(f"missing setting {f.name!r} ({what})")
    return cls(**values)


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Read a YAML config file (if any) and apply keyword overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides)
    return from_dict(cls, values)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one CLI argument per config field, plus `--config FILE` for a YAML file."""
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", metavar="FILE", help="YAML file with settings; flags override it")
    for f in dataclasses.fields(cls):
        kind = _scalar_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            # Optional on the command line: the YAML file may supply it; from_dict reports it missing.
            parser.add_argument(
                f.name,
                type=kind,
                nargs="?",
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=help_text,
            )
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind is bool:
            parser.add_argument(
                flag_name(f.name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {default})",
            )
        else:
            parser.add_argument(
                flag_name(f.name),
                type=kind,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=f"{help_text} (default: {default})",
            )


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config described by parsed CLI arguments (YAML file first, then the flags given)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return load_config(cls, getattr(args, "config", None), **overrides)


def _scalar_type(annotation: Any) -> type:
    """The scalar type of a field annotation such as `int | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


@dataclass
class PipelineConfig:
    """The whole pipeline on one cluster: data (synthetic or --real), check, ingest, tune, register."""

    work_dir: str = option("cxr-demo", "local folder for everything the run writes")
    real: str | None = option(None, "raw dataset folder to use instead of synthetic data")
    per_class: int = option(100, "synthetic images per class (ignored with --real)")
    size: int = option(64, "base resolution of the ingested dataset (and the models' input size)")
    models: str = option("cnn_lstm,dual_cnn,resnet18", "architectures to compare")
    trials: int = option(1, "sampled configurations per architecture")
    epochs: int = option(8, "maximum epochs per trial")
    grace_epochs: int | None = option(
        None,
        "epochs every trial gets before ASHA may stop it (default: three quarters of --epochs, so that "
        "architectures that start slowly are judged on what they learn, not on how fast they start)",
    )
    pretrained: str = option("none", "ResNet initial weights: a local file, 'hub' or 'none'")
    tune: bool = option(True, "compare the architectures (off: stop after ingest)")
    serve: bool = option(True, "serve the production model and send it a few HTTP predictions")
    port: int = option(8000, "HTTP port of the demo's Serve endpoint (on 127.0.0.1)")
    seed: int = option(0, "seed for synthetic data, the split and the search")
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")

    def __post_init__(self) -> None:
        _resolve_fields(self, "work_dir", "real")
        _require(self.per_class >= 1, "per_class", f"must be at least 1, got {self.per_class}")
        _require(32 <= self.size <= 2048, "size", f"must be between 32 and 2048, got {self.size}")
        _require(self.trials >= 1 and self.epochs >= 1, "trials", "trials and epochs must be at least 1")
        if self.grace_epochs is None:
            self.grace_epochs = max(1, self.epochs * 3 // 4)


@dataclass
class BenchmarkConfig:
    """Measure a stage against its plain baseline, side by side in one run."""

    what: str = option("ingest", "what to measure: ingest or train", positional=True)
    images: int = option(2000, "number of synthetic images (spread over the four classes)")
    size: int = option(256, "base resolution")
    models: str = option("tiny_cnn_lstm,tiny_dual_cnn,tiny_resnet", "train: comma-separated model names")
    gpu: bool = option(False, "train: one GPU per worker")
    work_dir: str | None = option(None, "scratch folder (default: the system temp folder)")
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")

    def __post_init__(self) -> None:
        _require(
            self.what in ("ingest", "train"),
            "what",
            f"unknown benchmark {self.what!r}; choose ingest or train",
        )
        _require(self.images >= 4, "images", f"must be at least 4, got {self.images}")


@dataclass
class TrainConfig:
    """Train one architecture with Ray Train (DDP over --workers), checkpointing every epoch.

    >>> TrainConfig(data="ds", model="tiny_cnn_lstm", epochs=2).run_name()
    'tiny_cnn_lstm'
    """

    data: str = option(help="dataset written by `cxr data ingest` (path or URI)")
    model: str = option(
        help="model architecture (see `cxr models architectures`), e.g. cnn_lstm, dual_cnn, resnet18"
    )
    epochs: int = option(10, "training epochs")
    workers: int = option(
        2, "Ray Train workers (DDP processes); 0 runs the loop in this process, saving no checkpoint"
    )
    gpu: bool = option(False, "one GPU per worker, NCCL and bf16 autocast")
    image_size: int | None = option(None, "model input size (default: the dataset's base size)")
    batch_size: int | None = option(
        None, "batch size per worker (default: 32, smaller on small datasets so an epoch has 24+ steps)"
    )
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    warmup_epochs: float = option(0.5, "linear warmup before cosine decay, in epochs")
    class_weights: bool = option(True, "weight the loss by inverse class frequency (imbalanced data)")
    augment: bool = option(True, "anatomy-respecting augmentation (small affine, contrast, noise)")
    pretrained: str = option(
        "auto", "initial weights: a local file, 'hub', 'none' (scratch) or 'auto' (hub for ResNets)"
    )
    segmenter: str | None = option(None, "U-Net checkpoint that supplies masks where the data has none")
    out: str = option("cxr-runs", "storage path for runs and checkpoints (local folder or URI)")
    name: str | None = option(None, "run name; re-running with the same name resumes (default: model name)")
    seed: int = option(0, "random seed")
    max_failures: int = option(2, "worker failures to recover from (resuming from the last checkpoint)")
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")

    def __post_init__(self) -> None:
        _resolve_fields(self, "data", "out", "segmenter")
        if self.pretrained.strip().lower() not in PRETRAINED_CHOICES:
            self.pretrained = resolve_location(self.pretrained)
        _require(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        _require(self.workers >= 0, "workers", f"must be 0 or more, got {self.workers}")
        _require(
            self.batch_size is None or self.batch_size >= 1,
            "batch_size",
            f"must be at least 1, got {self.batch_size}",
        )
        _require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, "weight_decay", "must not be negative")
        _require(
            self.image_size is None or 32 <= self.image_size <= 2048,
            "image_size",
            f"must be between 32 and 2048, got {self.image_size}",
        )
        _require(self.warmup_epochs >= 0, "warmup_epochs", "must not be negative")
        _require(self.max_failures >= -1, "max_failures", "must be -1 (unlimited) or more")

    def run_name(self) -> str:
        return self.name or self.model


@dataclass
class EvaluateConfig:
    """Evaluate a checkpoint on a dataset split: metrics.json, plots and report.html."""

    checkpoint: str = option(help="checkpoint directory (holds card.json and model.safetensors)")
    data: str = option(help="dataset written by `cxr data ingest`")
    out: str = option(help="folder for metrics.json, the plots and report.html")
    split: str = option("test", "split to evaluate: train, val or test")
    segmenter: str | None = option(None, "U-Net checkpoint for predicted masks (default: the card's)")
    batch_size: int = option(64, "images per forward pass")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")

    def __post_init__(self) -> None:
        _resolve_fields(self, "checkpoint", "data", "out", "segmenter")
        _require(
            self.split in ("train", "val", "test"), "split", f"must be train, val or test, got {self.split!r}"
        )
        _require(self.batch_size >= 1, "batch_size", "must be at least 1")


@dataclass
class TuneConfig:
    """Compare architectures and hyperparameters with Ray Tune (ASHA), register the best of each."""

    data: str = option(help="dataset written by `cxr data ingest`")
    registry: str = option(help="model registry (folder or URI) that receives the best of each architecture")
    models: str = option(
        "cnn_lstm,dual_cnn,resnet18",
        "architectures to compare, comma-separated ('resnet' also searches depth)",
    )
    trials: int = option(2, "sampled configurations per architecture")
    epochs: int = option(10, "maximum epochs per trial (ASHA stops weak trials earlier)")
    grace_epochs: int | None = option(
        None, "epochs every trial gets before ASHA may stop it (default: half of --epochs, at least 1)"
    )
    segmenter_epochs: int | None = option(
        None, "epochs of the lung segmenter trained first for dual-channel models (default: --epochs / 4)"
    )
    workers_per_trial: int = option(1, "Ray Train workers per trial")
    gpu: bool = option(False, "one GPU per Train worker")
    image_size: int | None = option(None, "model input size (default: the dataset's base size)")
    pretrained: str = option("auto", "ResNet initial weights: a local file, 'hub', 'none' or 'auto' (hub)")
    max_concurrent: int | None = option(None, "trials at once (default: what the cluster's CPUs/GPUs allow)")
    out: str = option("cxr-runs", "storage path for the experiment, its trials and reports")
    name: str = option("compare", "experiment name; re-running with the same name resumes it")
    seed: int = option(0, "seed of the search")
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")

    def __post_init__(self) -> None:
        _resolve_fields(self, "data", "registry", "out")
        if self.pretrained.strip().lower() not in PRETRAINED_CHOICES:
            self.pretrained = resolve_location(self.pretrained)
        _require(bool(self.model_names()), "models", "name at least one architecture")
        _require(self.trials >= 1, "trials", f"must be at least 1, got {self.trials}")
        _require(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        if self.grace_epochs is None:
            self.grace_epochs = max(1, self.epochs // 2)
        if self.segmenter_epochs is None:
            self.segmenter_epochs = max(1, self.epochs // 4)
        _require(self.segmenter_epochs >= 1, "segmenter_epochs", "must be at least 1")
        _require(
            1 <= self.grace_epochs <= self.epochs,
            "grace_epochs",
            f"must be between 1 and --epochs ({self.epochs}), got {self.grace_epochs}",
        )
        _require(self.workers_per_trial >= 1, "workers_per_trial", "must be at least 1")
        _require(
            self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent", "must be positive"
        )

    def model_names(self) -> list[str]:
        return [name.strip() for name in self.models.split(",") if name.strip()]
