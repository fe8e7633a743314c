"""Typed job configs: dataclasses that validate themselves, load from YAML and become CLI flags.

One config class serves the `cxr` console script, `python -m jobs.<name> --config FILE` and Ray (via
to_dict/from_dict), so the three can never disagree about a setting's name, type or default.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cxrcore.data.layout import MIN_SIDE
from cxrcore.labels import CLASSES, canonical_class

C = TypeVar("C")
PRETRAINED_CHOICES = ("auto", "hub", "none")
"""Keyword values of --pretrained; anything else is a weights file."""
TRAIN_MASKS = ("segmenter", "dataset")
"""Values of `cxr train --train-masks`: where a dual-channel model's training masks come from."""
EVALUATE_SPLITS = ("auto", "all", "train", "val", "test")
"""Values of `cxr evaluate --split`: a split of the dataset, every image, or auto (see EvaluateConfig)."""


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names the flag."""


class UnsafeWeightsError(ValueError):
    """A weights file that is not plain tensors in a safe format: refused instead of unpickled (here, not
    in cxrcore.checkpoint, so that the CLI catches it without importing torch)."""


def option(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False) -> Any:
    """A dataclass field that documents itself as a CLI flag (or positional argument)."""
    metadata = {"help": help, "positional": positional}
    return field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    """The CLI spelling of a config field: `val_fraction` → `--val-fraction`."""
    return "--" + name.replace("_", "-")


def resolve_location(location: str) -> str:
    """A local path made absolute (against this process's working directory), `~` expanded; a `file://`
    URI as the local path it names (code that takes a location for a local path where it has no `://`
    had written `cxr evaluate --out file:///x`'s report into a folder `./file:/x`); other URIs unchanged.

    Configs resolve their locations once, where they enter (the driver, the shell's directory), so a
    relative `--out` means the same folder in every Ray worker and Tune trial.

    >>> resolve_location("s3://bucket/runs"), resolve_location("file:///data/runs%20%C3%A9")
    ('s3://bucket/runs', '/data/runs é')
    """
    from urllib.parse import unquote, urlparse

    if location.startswith("file://") and urlparse(location).netloc in ("", "localhost"):
        location = unquote(urlparse(location).path)
    elif "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location))


def _resolve_fields(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None:
            setattr(config, name, resolve_location(value))


def _check_uri_name(name: str, out: str) -> None:
    """A run or experiment named in `out` where that is a URI (s3://, gs://) holds only what a URI's path
    takes as it is: `#`, `?`, `%` and spaces had been read as a fragment, a query or an escape, so that
    the run's lock and records went to another run's folder (`r2#x` locked `r2`), or failed to parse.

    >>> _check_uri_name("r2#x", "s3://bucket/runs")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    cxrcore.config.ConfigError: --name: 'r2#x' under the URI s3://bucket/runs: use letters, digits and ...
    """
    if "://" in out and not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"--name: {name!r} under the URI {out}: use letters, digits and . _ - only")


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{flag_name(name)}: {message}")


@dataclass
class IngestConfig:
    """Ingest a raw dataset folder into a Parquet dataset with a deterministic stratified split.

    >>> IngestConfig(raw="data/raw", out="data/cxr", size=128).test_fraction
    0.1
    """

    raw: str = option(
        help="raw dataset folder: class folders (the COVID-19 Radiography Database layout, or images "
        "directly inside) or, with --labels, a flat folder of images",
        positional=True,
    )
    out: str = option(help="output dataset: a local folder or a URI (s3://, gs://, file://)", positional=True)
    size: int = option(256, "base resolution: images and masks are resized to size×size")
    seed: int = option(0, "seed of the train/val/test assignment")
    val_fraction: float = option(0.1, "share of each class in the validation split")
    test_fraction: float = option(0.1, "share of each class in the test split")
    near_duplicate_bits: int = option(
        12, "perceptual-hash distance (bits of 256) up to which two images count as near duplicates"
    )
    min_side: int = option(MIN_SIDE, "images smaller than this (pixels, either side) are rejected")
    labels: str | None = option(
        None, "CSV or XLSX naming each image and its label; RAW is then a flat folder of images"
    )
    label_column: str | None = option(
        None, "label file column holding the label (default: the first of label, class, finding, diagnosis)"
    )
    file_column: str | None = option(
        None,
        "label file column naming the image, as a file name (extension optional) or a path relative to RAW "
        "(default: the first of filename, file, FILE NAME, image, path, ...)",
    )
    patient_column: str | None = option(
        None,
        "label file column naming each image's patient, whose images all go to one split (default: a "
        "column named like Patient ID, subject_id or patient, where there is one, else a DICOM's PatientID; "
        "none: no grouping; folder: class folders hold a folder per patient, COVID/P0123/1.png)",
    )
    map: str | None = option(
        None,
        'labels (or class folder names) to classes, e.g. "COVID-19=COVID,No finding=Normal" (labels compared '
        "without case; quote a pair whose label holds a comma); a class name maps to itself, and an image "
        "whose label maps to none stops the ingest",
    )
    skip_unmapped: bool = option(
        False, "leave out images whose label maps to no class (listed in the report) instead of stopping"
    )
    test_sources: str | None = option(
        None,
        "comma-separated sources (metadata URL hosts, as `cxr data check` lists them) whose images all go "
        "to the test split, none to train or val",
    )
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")

    def __post_init__(self) -> None:
        _typed_fields(self)
        _resolve_fields(self, "raw", "out", "labels")
        # OUT is published by swapping a finished folder beside it in: a symlink was swapped out itself,
        # the dataset landing beside it, and its target's old dataset left without its report. Through
        # the link, the swap is made at its target, on the target's filesystem, and the link stays.
        if "://" not in self.out and os.path.islink(self.out):
            self.out = os.path.realpath(self.out)
        self.label_map()  # a malformed --map fails here, before any work starts
        _require(
            self.test_sources is None or bool(self.test_source_names()),
            "test_sources",
            "name at least one source (e.g. --test-sources site-b.synthetic.cxr)",
        )
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

    def label_map(self) -> dict[str, str]:
        """--map as {label: class}."""
        return parse_label_map(self.map)

    def test_source_names(self) -> list[str]:
        """--test-sources as a list."""
        return [name.strip() for name in (self.test_sources or "").split(",") if name.strip()]


def parse_label_map(text: str | None) -> dict[str, str]:
    """`--map "COVID-19=COVID,No finding=Normal"` as {label: class}; each class checked, spelled as CLASSES.
    The pairs are read as one CSV row, so a pair whose label holds a comma goes in double quotes.

    >>> parse_label_map('COVID-19=covid, "Pneumonia, viral=Viral Pneumonia"')
    {'COVID-19': 'COVID', 'Pneumonia, viral': 'Viral Pneumonia'}
    """
    mapping: dict[str, str] = {}
    for item in next(csv.reader([text or ""], skipinitialspace=True), []):
        if not item.strip():
            continue
        label, sep, name = (part.strip() for part in item.rpartition("="))
        if not sep or not label:
            raise ConfigError(f"--map: expected LABEL=CLASS pairs separated by commas, got {item.strip()!r}")
        cls = canonical_class(name)
        if cls is None:
            raise ConfigError(
                f"--map: {name!r} (for {label!r}) is not a class; classes: {', '.join(CLASSES)}"
            )
        earlier = next((k for k in mapping if k.casefold() == label.casefold()), None)
        if earlier is not None and mapping[earlier] != cls:
            raise ConfigError(f"--map: {label!r} is mapped twice, to {mapping[earlier]} and to {cls}")
        mapping[label] = cls
    return mapping


@dataclass
class SynthConfig:
    """Write synthetic chest X-ray phantoms in the Kaggle layout."""

    out: str = option(help="folder to write the synthetic dataset to", positional=True)
    per_class: int = option(100, "images per class")
    seed: int = option(0, "random seed; the same seed writes the same images")
    sites: int = option(
        1,
        "hospitals the images come from. With 1, each class has two sources of its own (hosts such as "
        "site-a.covid.synthetic.cxr), as the Kaggle database's classes each come from their own sites; with "
        "2 or more, every site images every class (site-a.synthetic.cxr, ...), and a burned-in site marker "
        "follows the class at site a and is random at the others",
    )

    def __post_init__(self) -> None:
        _typed_fields(self)
        _require(self.per_class >= 1, "per_class", f"must be at least 1, got {self.per_class}")
        _require(1 <= self.sites <= 26, "sites", f"must be between 1 and 26, got {self.sites}")
        _resolve_fields(self, "out")  # `out: ~/x` in a --config file: no shell expands it (a review)


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
            raise _setting_error(key, f"unknown setting {key!r} for {cls.__name__}{hint}")
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING and f.name not in values:
            what = f.metadata.get("help", "")
            raise ConfigError(f"missing setting {f.name!r} ({what})")
    return cls(**values)  # __post_init__ types each value (_typed_fields)


def _setting_error(key: str, message: str) -> ConfigError:
    """A ConfigError about the setting `key` (load_config names the file where the file set it)."""
    error = ConfigError(message)
    error.setting = key  # type: ignore[attr-defined]
    return error


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _typed(key: str, value: Any, annotation: Any) -> Any:
    """`value` as the setting's type, or a ConfigError naming the setting: a YAML file's values come as YAML
    reads them (`lr: 1e-3` is a string to PyYAML, `gpu: "false"` a string that Python takes for true).

    >>> _typed("lr", "1e-3", float), _typed("gpu", "false", bool), _typed("epochs", 8.0, int)
    (0.001, False, 8)
    >>> _typed("epochs", 2.5, int)
    Traceback (most recent call last):
    cxrcore.config.ConfigError: epochs: expected a whole number, got 2.5
    """
    kind = _scalar_type(annotation)
    if value is None and kind is not annotation:  # `int | None`: None stands
        return None
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()  # a notebook's np.int64(32) or np.bool_(False), as the Python scalar
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _setting_error(key, f"{key}: expected true or false, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float | os.PathLike) and not isinstance(value, bool):
            return os.fspath(value) if isinstance(value, os.PathLike) else str(value)  # `name: 2024`
        raise _setting_error(key, f"{key}: expected text, got {value!r}")
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _setting_error(key, f"{key}: expected a number, got {value!r}") from None
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise _setting_error(key, f"{key}: expected a number, got {value!r}")
    if kind is int:
        if not math.isfinite(number) or float(number) != int(number):
            raise _setting_error(key, f"{key}: expected a whole number, got {value!r}")
        return int(number)
    return float(number)


def _typed_fields(config: Any) -> None:
    """Each setting of `config` as its declared type, as a YAML file's are: from Python, `size="32"` was
    compared with numbers and raised a bare TypeError, and a `pathlib.Path` stayed one. A default stands
    as it is (BenchmarkConfig's None: "unset", which its __post_init__ fills in)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is not f.default:
            setattr(config, f.name, _typed(f.name, value, hints[f.name]))


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Read a YAML config file (if any) and apply keyword overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(exc, "problem", exc)
            raise ConfigError(f"--config {path}: not valid YAML{line}: {problem}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    from_file = {key for key in values if key not in overrides}
    values.update(overrides)
    try:
        return from_dict(cls, values)
    except ConfigError as exc:
        if path is not None and getattr(exc, "setting", None) in from_file:
            raise ConfigError(f"--config {path}: {exc}") from None  # the file's line, not a flag
        raise


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
                help=_with_default(help_text, default),
            )
        else:
            parser.add_argument(
                flag_name(f.name),
                type=kind,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=_with_default(help_text, default),
            )


def _with_default(help_text: str, default: Any) -> str:
    """An option's help with its default, unless the help says it in words (`the dataset's base size`) or
    there is none to say (a required setting, or one left to the data: "(default: None)" told nothing)."""
    if default is None or "default" in help_text:
        return help_text
    return f"{help_text} (default: {default})"


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
    repeats: int = option(1, "times each configuration is trained, with seeds --seed, --seed+1, ...")
    epochs: int = option(8, "maximum epochs per trial")
    grace_epochs: int | None = option(
        None,
        "epochs every trial gets before ASHA may stop it, ranked among its architecture's trials (default: "
        "three quarters of --epochs; with --trials 1 no trial is stopped)",
    )
    pretrained: str = option(
        "none",
        "initial weights of the models with hub weights (the ResNets): a local file, a folder of "
        "ARCH-1ch.safetensors files, 'hub' or 'none'",
    )
    tune: bool = option(True, "compare the architectures (off: stop after ingest)")
    serve: bool = option(True, "serve the production model and send it a few HTTP predictions")
    port: int = option(8000, "HTTP port of the demo's Serve endpoint (on 127.0.0.1)")
    seed: int = option(0, "seed for synthetic data, the split and the search")
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")

    def __post_init__(self) -> None:
        _typed_fields(self)
        _resolve_fields(self, "work_dir", "real")
        _require(self.per_class >= 1, "per_class", f"must be at least 1, got {self.per_class}")
        _require(32 <= self.size <= 2048, "size", f"must be between 32 and 2048, got {self.size}")
        _require(self.trials >= 1, "trials", f"must be at least 1, got {self.trials}")
        _require(self.repeats >= 1, "repeats", f"must be at least 1, got {self.repeats}")
        _require(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        if self.grace_epochs is None:
            self.grace_epochs = max(1, self.epochs * 3 // 4)


BENCHMARK_SECTIONS = ("ingest", "train", "serve", "gpu")
"""What `cxr benchmark` measures; `all` runs each that can run here (gpu only where CUDA is)."""
_BENCHMARK_PRESETS: dict[str, tuple[Any, Any]] = {
    # field: (full run, --quick); a field left unset (None) takes one of them.
    "images": (2000, 48),
    "size": (256, 64),
    "models": ("cnn_lstm,dual_cnn,resnet18", "tiny_cnn_lstm,tiny_dual_cnn,tiny_resnet"),
    "train_images": (400, 48),
    "train_size": (128, 64),
    "epochs": (3, 2),
    "batch_size": (32, 8),
    "serve_model": ("cnn_lstm", "tiny_dual_cnn"),
    "serve_size": (128, 64),
    "serve_upload": (299, 299),
    "requests": (200, 32),
}


SERVE_UPLOAD_FORMATS = ("png", "png16", "dicom")
"""What the serve benchmark can send (serve.benchmark.UPLOAD_FORMATS makes each)."""


ONE_IMAGE_BATCHES = (
    "training skips a batch of one image (BatchNorm cannot train on one image's statistics, and raises where "
    "a feature map has shrunk to 1x1), so with 1 an epoch trained on its first image only"
)
"""Why a training batch size is at least 2 (a review, session 52: `--batch-size 1` trained one image an
epoch, with exit 0)."""


@dataclass
class BenchmarkConfig:
    """Measure each stage against its plain baseline, side by side in one run, into OUT/benchmark.{json,md}.

    Unset sizes take the full run's values, or with --quick tiny ones that take seconds (for smoke runs
    and tests: they show that the code runs, not how fast).

    >>> config = BenchmarkConfig("train", quick=True)
    >>> config.sections(), config.models, config.epochs
    (['train'], 'tiny_cnn_lstm,tiny_dual_cnn,tiny_resnet', 2)
    """

    what: str = option(
        "all", "ingest, train, serve, gpu or all (every section that can run here)", positional=True
    )
    out: str = option("cxr-bench", "folder for benchmark.json and benchmark.md")
    quick: bool = option(False, "tiny sizes: each section takes seconds (the figures are not comparable)")
    images: int | None = option(
        None,
        "ingest: images, spread over the four classes (unset: 2000 synthetic ones, or 48 with --quick); "
        "with --raw, that many of its images, its files repeated if it has fewer (unset: all, once)",
    )
    size: int = option(
        None, "ingest: base resolution the images are resized to (unset: 256, or 64 with --quick)"
    )
    raw: str | None = option(None, "ingest: benchmark on this raw dataset folder instead of synthetic images")
    models: str = option(
        None,
        "train: architectures, comma-separated (unset: cnn_lstm,dual_cnn,resnet18, or tiny_* with --quick)",
    )
    train_data: str | None = option(
        None, "train: a dataset written by `cxr data ingest` to train on instead of synthetic images"
    )
    train_images: int = option(None, "train: synthetic images to train on (unset: 400, or 48 with --quick)")
    train_size: int = option(None, "train: image size (unset: 128, or 64 with --quick)")
    epochs: int = option(
        None, "train: epochs per run; the first is warm-up, not counted (unset: 3, or 2 with --quick)"
    )
    batch_size: int = option(
        None, "train: batch size per worker, the same in every run (unset: 32, or 8 with --quick)"
    )
    workers: str = option(
        "1,2",
        "train: Ray Train worker counts to measure, comma-separated (0: its local mode, in this process)",
    )
    plain_threads: int | None = option(
        None,
        "train: torch threads of the plain PyTorch loop (unset: 1 and every usable core, the faster)",
    )
    serve_model: str = option(
        None,
        "serve: architecture, untrained: it costs what a trained one does (unset: cnn_lstm, or tiny_dual_cnn "
        "with --quick)",
    )
    serve_size: int = option(None, "serve: the model's input size (unset: 128, or 64 with --quick)")
    serve_upload: int = option(
        None,
        "serve: side of the uploads in px (unset: 299, the Kaggle database's; a hospital's X-rays are "
        "1,000-3,000)",
    )
    serve_upload_format: str = option(
        "png",
        "serve: png (8-bit, as the Kaggle database's), png16 (16-bit holding 12 bits) or dicom (12-bit, "
        "rescale and window, as a DX's)",
    )
    requests: int = option(None, "serve: HTTP requests per measurement (unset: 200, or 32 with --quick)")
    device: str = option(
        "cuda", "gpu: torch device; cpu runs the section's code path on a tiny model (with --quick)"
    )
    work_dir: str | None = option(None, "scratch folder (default: the system temp folder)")
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")

    def __post_init__(self) -> None:
        _typed_fields(self)
        _resolve_fields(self, "out", "raw", "train_data", "work_dir")
        _require(
            self.what in (*BENCHMARK_SECTIONS, "all"),
            "what",
            f"unknown benchmark {self.what!r}; choose {', '.join(BENCHMARK_SECTIONS)} or all",
        )
        for name, (full, quick) in _BENCHMARK_PRESETS.items():
            if getattr(self, name) is None and not (name == "images" and self.raw):
                setattr(self, name, quick if self.quick else full)
        _require(self.images is None or self.images >= 4, "images", f"must be at least 4, got {self.images}")
        _require(self.train_images >= 16, "train_images", f"must be at least 16, got {self.train_images}")
        for name in ("size", "train_size", "serve_size"):
            value = getattr(self, name)
            _require(32 <= value <= 2048, name, f"must be between 32 and 2048, got {value}")
        _require(self.epochs >= 2, "epochs", f"must be at least 2 (the first is warm-up), got {self.epochs}")
        _require(
            self.batch_size >= 2,
            "batch_size",
            f"must be at least 2, got {self.batch_size}: {ONE_IMAGE_BATCHES}",
        )
        _require(self.plain_threads is None or self.plain_threads >= 1, "plain_threads", "must be at least 1")
        _require(self.requests >= 4, "requests", f"must be at least 4, got {self.requests}")
        _require(
            64 <= self.serve_upload <= 4096,
            "serve_upload",
            f"must be between 64 and 4096, got {self.serve_upload}",
        )
        _require(
            self.serve_upload_format in SERVE_UPLOAD_FORMATS,
            "serve_upload_format",
            f"must be one of {', '.join(SERVE_UPLOAD_FORMATS)}, got {self.serve_upload_format!r}",
        )
        _require(bool(self.model_names()), "models", "name at least one architecture")
        try:
            counts = self.worker_counts()
        except ValueError:
            counts = []
        _require(
            bool(counts) and min(counts) >= 0, "workers", f"expected counts such as 1,2, got {self.workers!r}"
        )
        _require(self.device in ("cuda", "cpu"), "device", f"must be cuda or cpu, got {self.device!r}")
        _require(
            self.device == "cuda" or self.quick,
            "device",
            "cpu goes with --quick: it runs the gpu section's code on a tiny model (ResNet50 would be hours)",
        )

    def sections(self) -> list[str]:
        """The sections to run, in order; with `all`, run_benchmarks skips gpu (saying why) without CUDA."""
        return list(BENCHMARK_SECTIONS) if self.what == "all" else [self.what]

    def model_names(self) -> list[str]:
        return [name.strip() for name in self.models.split(",") if name.strip()]

    def worker_counts(self) -> list[int]:
        return [int(count) for count in self.workers.split(",") if count.strip()]


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
    cpus_per_worker: int | None = option(
        None,
        "CPUs (and torch threads) of each CPU worker (default: on the local cluster cxr starts, this "
        "machine's cores shared among the workers; else 1)",
    )
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
        "auto",
        "initial weights: a local file, a folder of ARCH-1ch.safetensors files, 'hub', 'none' (scratch) or "
        "'auto' (hub for models with hub weights, the ResNets)",
    )
    freeze_backbone: bool = option(
        False,
        "train the classifier head only: the pretrained backbone's weights and BatchNorm statistics stay as "
        "loaded (a linear probe; timm models such as the ResNets, with --pretrained weights)",
    )
    segmenter: str | None = option(None, "U-Net checkpoint that supplies masks where the data has none")
    train_masks: str = option(
        "segmenter",
        "with --segmenter, the masks a dual-channel model trains on: 'segmenter' (its mask for every image, "
        "as Serve makes them) or 'dataset' (the dataset's where it has one)",
    )
    out: str = option("cxr-runs", "storage path for runs and checkpoints (local folder or URI)")
    name: str | None = option(None, "run name; re-running with the same name resumes (default: model name)")
    seed: int = option(0, "random seed")
    max_failures: int = option(2, "worker failures to recover from (resuming from the last checkpoint)")
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")
    patience: int | None = option(
        None,
        "stop once this many epochs have passed since the best one (the one chosen as the best checkpoint, "
        "by validation); default: train every epoch",
    )

    def __post_init__(self) -> None:
        _typed_fields(self)
        _resolve_fields(self, "data", "out", "segmenter")
        if self.pretrained.strip().lower() not in PRETRAINED_CHOICES:
            self.pretrained = resolve_location(self.pretrained)
        _require(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        _require(self.workers >= 0, "workers", f"must be 0 or more, got {self.workers}")
        _require(
            self.train_masks in TRAIN_MASKS,
            "train_masks",
            f"must be one of {', '.join(TRAIN_MASKS)}, got {self.train_masks!r}",
        )
        _require(
            self.cpus_per_worker is None or self.cpus_per_worker >= 1,
            "cpus_per_worker",
            f"must be at least 1, got {self.cpus_per_worker}",
        )
        _require(
            self.batch_size is None or self.batch_size >= 2,
            "batch_size",
            f"must be at least 2, got {self.batch_size}: {ONE_IMAGE_BATCHES}",
        )
        _require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _require(
            not self.freeze_backbone or self.pretrained.strip().lower() != "none",
            "freeze_backbone",
            "needs pretrained weights (--pretrained): a random backbone, frozen, computes nothing useful",
        )
        _require(self.weight_decay >= 0, "weight_decay", "must not be negative")
        _require(
            self.image_size is None or 32 <= self.image_size <= 2048,
            "image_size",
            f"must be between 32 and 2048, got {self.image_size}",
        )
        _require(self.warmup_epochs >= 0, "warmup_epochs", "must not be negative")
        _require(self.max_failures >= -1, "max_failures", "must be -1 (unlimited) or more")
        _require(self.patience is None or self.patience >= 1, "patience", "must be 1 or more")
        if self.name is not None:
            # Ray Train 2.60's controller fails on a run name outside ASCII ("'ascii' codec can't encode
            # character"), after the run's folder was made; the folder itself may be named anyhow (--out).
            odd = "".join(sorted({c for c in self.name if not c.isascii() or not c.isprintable()}))
            _require(
                not odd,
                "name",
                f"{self.name!r}: Ray Train cannot run a name with {odd!r} in it; name the run in ASCII",
            )
            _require(
                self.name.strip() not in ("", ".", "..") and "/" not in self.name,
                "name",
                "one folder's name, not a path",
            )
            _check_uri_name(self.name, self.out)

    def run_name(self) -> str:
        return self.name or self.model


@dataclass
class EvaluateConfig:
    """Evaluate a model on a dataset: metrics.json, plots and report.html; an external validation on new data.

    On a dataset the model was not trained on, the report sets its figures beside the model's own. The
    model is a checkpoint folder (`checkpoint`) or a registry version (`model` in `registry`), the two
    ways `cxr serve` takes one.

    >>> EvaluateConfig(model="production", registry="s3://bucket/registry", data="ds", out="eval").split
    'auto'
    """

    data: str = option(help="dataset written by `cxr data ingest` (path or URI)")
    out: str = option(help="folder for metrics.json, the plots and report.html")
    checkpoint: str | None = option(
        None,
        "checkpoint folder (holds card.json and model.safetensors); or name a registry version with --model",
    )
    model: str | None = option(
        None, "registry version instead of --checkpoint: an alias, NAME:N, or NAME for its latest version"
    )
    registry: str | None = option(
        None, "model registry (folder or URI) that --model is looked up in; unset: $CXR_REGISTRY"
    )
    split: str = option(
        "auto",
        "images to score: test, val, train, all (every image, for data from elsewhere), or auto: test on "
        "the dataset the model was trained on (its card's fingerprint), all on any other",
    )
    segmenter: str | None = option(None, "U-Net checkpoint for predicted masks (default: the card's)")
    batch_size: int = option(64, "images per forward pass")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")

    def __post_init__(self) -> None:
        _typed_fields(self)
        if self.model is not None and self.registry is None:
            self.registry = os.environ.get("CXR_REGISTRY") or None
        _resolve_fields(self, "checkpoint", "registry", "data", "out", "segmenter")
        _require(
            self.checkpoint is not None or self.model is not None,
            "checkpoint",
            "name the model: a checkpoint folder (--checkpoint DIR) or a registry version (--model REF)",
        )
        _require(
            self.checkpoint is None or self.model is None,
            "model",
            "--checkpoint and --model are alternatives: give a checkpoint folder or a registry version",
        )
        _require(
            self.model is None or self.registry is not None,
            "registry",
            f"--model {self.model} names a registry version: pass --registry REG or set CXR_REGISTRY",
        )
        _require(
            self.model is not None or self.registry is None,
            "registry",
            "a registry goes with --model REF (e.g. --model production); --checkpoint takes a folder",
        )
        _require(
            self.split in EVALUATE_SPLITS,
            "split",
            f"must be one of {', '.join(EVALUATE_SPLITS)}, got {self.split!r}",
        )
        _require(self.batch_size >= 1, "batch_size", "must be at least 1")


PROMOTE_CHOICES = ("auto", "never")
CANDIDATE = "candidate"
"""The alias `cxr tune --promote never` gives its winner, in place of production."""


@dataclass
class TuneConfig:
    """Compare architectures and hyperparameters with Ray Tune (ASHA), register the best of each."""

    data: str = option(help="dataset written by `cxr data ingest`")
    registry: str = option(
        "", "model registry (folder or URI) that receives the best of each architecture; unset: $CXR_REGISTRY"
    )
    models: str = option(
        "cnn_lstm,dual_cnn,resnet18",
        "architectures to compare, comma-separated ('resnet' also searches depth)",
    )
    trials: int = option(2, "sampled configurations per architecture (each depth of 'resnet' trains each)")
    repeats: int = option(
        1,
        "times each configuration is trained, with seeds --seed, --seed+1, ...: how far each architecture's "
        "validation score moves with the seed, and in how many seeds it ranks first",
    )
    epochs: int = option(10, "maximum epochs per trial (ASHA stops weak trials earlier)")
    grace_epochs: int | None = option(
        None,
        "epochs every trial gets before ASHA may stop it, ranked among its architecture's trials (default: "
        "half of --epochs, at least 1)",
    )
    patience: int | None = option(
        None,
        "also stop a trial once this many epochs have passed since its best one (by validation, as its best "
        "checkpoint is chosen), whatever the other trials score; default: trials run until ASHA stops them "
        "or --epochs",
    )
    segmenter_epochs: int | None = option(
        None, "epochs of the lung segmenter trained first for dual-channel models (default: --epochs / 4)"
    )
    workers_per_trial: int = option(1, "Ray Train workers per trial")
    gpu: bool = option(False, "one GPU per Train worker")
    image_size: int | None = option(None, "model input size (default: the dataset's base size)")
    pretrained: str = option(
        "auto",
        "initial weights of the models with hub weights (the ResNets): a local file, a folder of "
        "ARCH-1ch.safetensors files (one per architecture: `cxr models import-weights`), 'hub', 'none' or "
        "'auto' (hub)",
    )
    max_concurrent: int | None = option(None, "trials at once (default: what the cluster's CPUs/GPUs allow)")
    promote: str = option(
        "auto",
        "whether the winner becomes production: auto (unless production ranks above it on the same data, "
        "or it is not shown to beat always answering the commonest class), or never (it gets the alias "
        "candidate alone, for `cxr models promote candidate` after a review)",
    )
    out: str = option("cxr-runs", "storage path for the experiment, its trials and reports")
    name: str = option("compare", "experiment name; re-running with the same name resumes it")
    seed: int = option(0, "seed of the search")
    address: str | None = option(None, "Ray cluster address; default: RAY_ADDRESS or a local cluster")

    def __post_init__(self) -> None:
        _typed_fields(self)
        self.registry = self.registry or os.environ.get("CXR_REGISTRY", "")
        if not self.registry:
            raise ConfigError("--registry: no model registry given (pass --registry REG or set CXR_REGISTRY)")
        _resolve_fields(self, "data", "registry", "out")
        if self.pretrained.strip().lower() not in PRETRAINED_CHOICES:
            self.pretrained = resolve_location(self.pretrained)
        _require(bool(self.model_names()), "models", "name at least one architecture")
        _require(self.trials >= 1, "trials", f"must be at least 1, got {self.trials}")
        _require(self.repeats >= 1, "repeats", f"must be at least 1, got {self.repeats}")
        _require(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        # `..` wrote the experiment beside --out, into its parent
        _require(self.name.strip() not in ("", ".", ".."), "name", "one folder's name, not a path")
        _check_uri_name(self.name, self.out)
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
        _require(self.patience is None or self.patience >= 1, "patience", "must be 1 or more")
        self.promote = self.promote.strip().lower()
        _require(self.promote in PROMOTE_CHOICES, "promote", f"auto or never, got {self.promote!r}")
        _require(
            self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent", "must be positive"
        )

    def model_names(self) -> list[str]:
        return [name.strip() for name in self.models.split(",") if name.strip()]
