"""Dry-run plans of `cxr data ingest`, `cxr train` and `cxr tune`: the config checked and every name resolved,
the work laid out, nothing started. A plan is made where the data is not (a laptop planning a cluster job),
so it reads at most a dataset's small ingest report, and says what it assumes instead."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cxrcore.config import PRETRAINED_CHOICES, ConfigError, IngestConfig, TrainConfig, TuneConfig
from cxrcore.tables import format_table

if TYPE_CHECKING:
    from cxrcore.models import ModelEntry

FULL_DATABASE_IMAGES = 21_165
"""Images in the COVID-19 Radiography Database: 3,616 COVID, 6,012 Lung_Opacity, 10,192 Normal and
1,345 Viral Pneumonia."""
ASSUMED_NODE_GPUS = 4
"""The cluster a GPU Tune plan assumes without --max-concurrent: one 4-GPU node, as in
cluster/kuberay/rayjob-tune.yaml."""
NOTHING_STARTED = "dry run: no Ray started, no image decoded"
"""The first line of every plan says what a dry run does not do."""


@dataclass(frozen=True)
class DatasetFacts:
    """What a plan knows of a dataset: its training images and base size, and where that comes from."""

    train_images: int
    size: int | None
    source: str


def ingest_plan(config: IngestConfig) -> str:
    """Source, output, size and splits of an ingest."""
    shares = {"val": config.val_fraction, "test": config.test_fraction}
    shares = {"train": 1 - sum(shares.values()), **shares}
    rows = [
        ("source", f"{config.raw}{_where(config.raw)}"),
        ("layout", f"flat folder, labels from {config.labels}" if config.labels else "class folders"),
    ]
    if config.map:
        rows.append(("map", ", ".join(f"{label} → {cls}" for label, cls in config.label_map().items())))
    rows += [
        ("output", f"{config.out} (Parquet partitioned by split, then ingest_report.json)"),
        ("size", f"{config.size}×{config.size} px, images and masks"),
        (
            "splits",
            " / ".join(f"{split} {share:.0%}" for split, share in shares.items())
            + f", stratified per class, seed {config.seed}; near duplicates (≤ {config.near_duplicate_bits} "
            "bits) kept in one split",
        ),
    ]
    if config.test_sources:
        rows.append(("test sources", f"{', '.join(config.test_source_names())}: every image in test"))
    if not _on_this_machine(config.raw):
        splits = expected_splits(FULL_DATABASE_IMAGES, config.val_fraction, config.test_fraction)
        counts = " / ".join(f"{n:,} {split}" for split, n in splits.items())
        rows.append(
            ("expected", f"about {counts} (assumed: the full database's {FULL_DATABASE_IMAGES:,} images)")
        )
    return _plan("cxr data ingest", rows)


def train_plan(config: TrainConfig) -> str:
    """Model, workers, epochs, batch size and image size of one training run."""
    from cxrcore.train.trainer import auto_batch_size

    entry = _model_entry(config.model)
    data = dataset_facts(config.data)
    workers = max(config.workers, 1)
    batch_size = config.batch_size or auto_batch_size(data.train_images, workers)
    if config.workers == 0:
        placement = "none: the loop runs in this process and saves no checkpoint"
    elif config.gpu:
        placement = f"{config.workers} Train workers, 1 GPU each (NCCL, bf16 autocast)"
    elif config.cpus_per_worker:
        placement = f"{config.workers} Train workers, {config.cpus_per_worker} CPUs each (gloo)"
    else:
        placement = (
            f"{config.workers} Train workers on CPUs (gloo): on a local cluster they share the machine's "
            "cores, on a cluster joined by address 1 CPU each (--cpus-per-worker)"
        )
    rows = [
        (
            "model",
            f"{entry.name} ({entry.family}: {'+'.join(entry.input_spec.channels)}, {entry.input_spec.task})",
        ),
        ("pretrained", _pretrained(config.model, config.pretrained)),
        ("dataset", f"{config.data}{_where(config.data)}"),
        ("train images", f"{data.train_images:,} ({data.source})"),
        ("workers", placement),
        ("epochs", str(config.epochs)),
        ("batch size", _batch_line(config.batch_size, batch_size, workers, data.train_images)),
        ("image size", _image_size(config.image_size, data)),
        ("segmenter", f"{config.segmenter}{_where(config.segmenter)}" if config.segmenter else "none"),
        (
            "output",
            f"{config.out}/{config.run_name()} (an earlier run there is resumed if it started on the same "
            "data and settings, and refused otherwise)",
        ),
    ]
    return _plan("cxr train", rows)


def tune_plan(config: TuneConfig) -> str:
    """Trials per architecture, resources per trial, concurrency, epochs and batch sizes of a comparison."""
    from cxrcore.tune import (
        check_models,
        experiment_path,
        needs_mask,
        search_plan,
        segmenter_model,
        segmenter_train_config,
        takes_pretrained,
    )

    check_models(config)
    experiment = experiment_path(config)
    data = dataset_facts(config.data)
    trials = search_plan(config, data.train_images)
    per_model = Counter(trial["model"] for trial in trials)
    concurrent, assumption = _concurrency(config)
    grace = config.grace_epochs or 1  # resolved by TuneConfig
    rows = [
        ("dataset", f"{config.data}{_where(config.data)}"),
        ("train images", f"{data.train_images:,} ({data.source})"),
        (
            "architectures",
            f"{', '.join(per_model)} ("
            + (
                "the best of each registered; resnet's depths are one architecture, its best depth registered"
                if "resnet" in config.model_names()
                else "all registered"
            )
            + ")",
        ),
    ]
    rows += [
        (f"pretrained {model}", _pretrained(model, config.pretrained))
        for model in per_model
        if takes_pretrained(model, config.pretrained)
    ]
    segmenter = segmenter_model(config)
    if segmenter:
        run = segmenter_train_config(config, segmenter)
        masked = ", ".join(model for model in per_model if needs_mask(model))
        what = f"{segmenter}, {run.epochs} epochs on {_segmenter_workers(config)}, batch {run.batch_size}"
        rows.append(("segmenter", f"{what}, before the trials (it makes {masked}'s lung masks when served)"))
    repeats = (
        f"; each configuration trained {config.repeats} times, seeds {config.seed} to "
        f"{config.seed + config.repeats - 1}"
        if config.repeats > 1
        else ""
    )
    rows += [
        ("trials", f"{len(trials)} ({', '.join(f'{model} {n}' for model, n in per_model.items())}){repeats}"),
        ("per trial", _per_trial(config, len(trials))),
        ("image size", _image_size(config.image_size, data)),
        (
            "concurrency",
            f"{_count(min(concurrent, len(trials)), 'trial')} at once ({assumption}"
            f"{f': room for {concurrent}' if concurrent > len(trials) else ''}) → "
            f"{_count(math.ceil(len(trials) / concurrent), 'wave')}",
        ),
        (
            "epochs",
            f"{config.epochs} per trial: one configuration per architecture, so ASHA, which ranks the "
            f"trials of {'one architecture and seed' if repeats else 'an architecture'} among themselves, "
            "stops none"
            if config.trials == 1
            else f"up to {config.epochs} per trial; ASHA may stop a trial after {grace} (grace epochs), "
            f"ranked among the trials of its architecture{' and seed' if repeats else ''}",
        ),
        *(
            [("patience", f"a trial stops {config.patience} epoch(s) after its best (by validation)")]
            if config.patience
            else []
        ),
        ("epochs total", _epochs_total(config, len(trials))),
        ("output", f"{experiment} (comparison.html; re-running resumes it); registry {config.registry}"),
        (
            "winner",
            "the alias candidate (--promote never); production stays"
            if config.promote == "never"
            else "production, unless production ranks above it on this data or it is not shown to beat "
            "always answering the commonest class",
        ),
    ]
    table = format_table(
        ["trial", "model", "lr", "weight decay", "batch/worker", "steps/epoch", "seed"],
        [
            [n, trial["model"], f"{trial['lr']:.2e}", f"{trial['weight_decay']:.1e}", trial["batch_size"],
             _steps(data.train_images, trial["batch_size"], config.workers_per_trial),
             trial.get("seed", config.seed)]
            for n, trial in enumerate(trials)
        ],
    )  # fmt: skip
    return _plan("cxr tune", rows) + "\n" + table


def dataset_facts(data: str) -> DatasetFacts:
    """Training images and base size from the dataset's ingest report when it is on this machine; otherwise
    the full database's, split as `cxr data ingest` does by default (the normal case when planning a
    cluster run from elsewhere)."""
    from cxrcore.data.ingest import REPORT_NAME, read_report

    if _on_this_machine(data):
        try:
            report = read_report(data)
        except FileNotFoundError:
            pass
        else:
            return DatasetFacts(
                report["by_split"]["train"], report["config"]["size"], f"from its {REPORT_NAME}"
            )
    # A dataclass keeps each field's default as a class attribute: the fractions `cxr data ingest` uses.
    splits = expected_splits(FULL_DATABASE_IMAGES, IngestConfig.val_fraction, IngestConfig.test_fraction)
    train = splits["train"]
    assumption = f"{train / FULL_DATABASE_IMAGES:.0%} of the full database's {FULL_DATABASE_IMAGES:,} images"
    return DatasetFacts(train, None, f"assumed: no {REPORT_NAME} here, so {assumption}")


def expected_splits(images: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """About how many of `images` each split gets (duplicate groups, kept whole, move a few).

    >>> expected_splits(21_165, 0.1, 0.1)
    {'train': 16933, 'val': 2116, 'test': 2116}
    """
    val, test = round(images * val_fraction), round(images * test_fraction)
    return {"train": images - val - test, "val": val, "test": test}


def expected_epochs_per_trial(epochs: int, grace: int, reduction_factor: int) -> float:
    """Epochs a trial runs on average under ASHA if each rung (grace, grace × factor, ...) keeps one trial in
    `reduction_factor`: an estimate, since asynchronous ASHA lets early trials through more often.

    >>> expected_epochs_per_trial(30, 15, 2), expected_epochs_per_trial(30, 10, 2)
    (22.5, 17.5)
    """
    expected, surviving, milestone = float(grace), 1.0, grace
    while milestone < epochs:
        surviving /= reduction_factor
        following = min(milestone * reduction_factor, epochs)
        expected += surviving * (following - milestone)
        milestone = following
    return expected


def _epochs_total(config: TuneConfig, trials: int) -> str:
    from cxrcore.tune import ASHA_REDUCTION_FACTOR, segmenter_model

    grace = config.grace_epochs or 1
    if config.trials == 1:  # an architecture's only trial: no other to be ranked against
        total = f"{trials * config.epochs:,}"
    else:
        expected = trials * expected_epochs_per_trial(config.epochs, grace, ASHA_REDUCTION_FACTOR)
        total = (
            f"≈{expected:,.0f} expected (ASHA keeping 1 in {ASHA_REDUCTION_FACTOR} at each rung); "
            f"{trials * grace:,} if it stopped every trial at grace, {trials * config.epochs:,} if none"
        )
    return total + (f"; plus {config.segmenter_epochs} of the segmenter" if segmenter_model(config) else "")


def _concurrency(config: TuneConfig) -> tuple[int, str]:
    """Trials at once, and what that number rests on."""
    from cxrcore.runtime import local_logical_cpus, usable_cores
    from cxrcore.tune import max_concurrent_trials

    if config.max_concurrent:
        return config.max_concurrent, "set by max_concurrent"
    if config.gpu:
        resources, cluster = {"GPU": float(ASSUMED_NODE_GPUS)}, f"one node with {ASSUMED_NODE_GPUS} GPUs"
    else:
        cores = usable_cores()
        logical = local_logical_cpus(cores)
        resources = {"CPU": float(logical)}
        cluster = (
            f"the local one cxr starts on this machine's {cores} cores, counting {logical} CPUs; trials "
            "fewer than the cores share them"
        )
    return max_concurrent_trials(config, resources), f"assumed cluster: {cluster}; max_concurrent sets it"


def _workers(config: TuneConfig) -> str:
    n = config.workers_per_trial
    device = f"{n} GPU{'s' if n > 1 else ''}" if config.gpu else f"{n} CPU{'s' if n > 1 else ''}"
    return f"{n} Train worker{'s' if n > 1 else ''} ({device})"


def _per_trial(config: TuneConfig, trials: int) -> str:
    """A trial's workers and the CPUs it holds; on the assumed local cluster, trials fewer than the cores
    share them (`tune.trial_worker_cpus`)."""
    from cxrcore.runtime import local_logical_cpus, usable_cores
    from cxrcore.tune import TRIAL_DRIVER_CPUS, trains_in_trial, trial_request, trial_worker_cpus

    cores = usable_cores()
    share = trial_worker_cpus(config, {"CPU": float(local_logical_cpus(cores))}, trials, cores=cores)
    if trains_in_trial(config):
        if config.gpu or share == 1:
            what = "1 GPU" if config.gpu else "1 CPU"
        else:
            what = f"{share} CPUs: fewer trials than this machine's {cores} cores share them"
        reserved = trial_request(config, share)["cpu"]
        return f"1 worker in the trial's own process, no TorchTrainer ({what}), {reserved:g} CPU reserved"
    if config.gpu or share == 1:
        return f"{_workers(config)}, {_cpus_per_trial(config)}"
    n = config.workers_per_trial
    held = n * share + TRIAL_DRIVER_CPUS
    return (
        f"{n} Train workers ({share} CPUs each: fewer trials than this machine's {cores} cores share "
        f"them), {held:g} CPU reserved (workers and driver)"
    )


def _segmenter_workers(config: TuneConfig) -> str:
    """The segmenter's workers: a trial's, each with its share of the assumed local cluster's cores, as
    `trainer.worker_cpus` gives them (it trains alone, before the trials); one worker trains in a Tune
    trial's own process, as one-worker trials do (`tune._segmenter_in_trial`)."""
    from cxrcore.runtime import local_logical_cpus, usable_cores
    from cxrcore.train.trainer import local_worker_cpus
    from cxrcore.tune import trains_in_trial

    cores = usable_cores()
    n = config.workers_per_trial
    share = local_worker_cpus(cores, local_logical_cpus(cores), n)
    if trains_in_trial(config):
        what = (
            "1 GPU"
            if config.gpu
            else "1 CPU"
            if share == 1
            else f"{share} CPUs: this machine's {cores} cores"
        )
        return f"1 worker in a Tune trial's own process, no TorchTrainer ({what})"
    if config.gpu or share == 1:
        return _workers(config)
    each = " each" if n > 1 else ""
    return f"{n} Train worker{'s' if n > 1 else ''} ({share} CPUs{each}: this machine's {cores} cores)"


def _cpus_per_trial(config: TuneConfig) -> str:
    """The CPUs a trial of several workers reserves (a one-worker trial's: `_per_trial`)."""
    from cxrcore.tune import trial_resources

    cpus = trial_resources(config)["CPU"]
    held = (
        "the trial's driver; Ray Train asks a GPU worker for no CPU" if config.gpu else "workers and driver"
    )
    return f"{cpus:g} CPU reserved ({held})"


def _pretrained(model: str, choice: str) -> str:
    """How `model` starts, checked as far as possible without loading weights (a dry run builds no model)."""
    from cxrcore.train.trainer import resolve_pretrained

    if choice.strip().lower() not in PRETRAINED_CHOICES and not Path(choice).exists():  # a file or folder
        resolve_pretrained(model, "hub")  # the model takes weights at all; the file is checked where it lives
        return f"weights file {choice} (not on this machine: the run loads and checks it before training)"
    weights = resolve_pretrained(model, choice)
    if weights is None:
        return "none: random initialisation"
    if weights == "hub":
        return "from the model hub: the workers need internet (else `cxr models import-weights`)"
    from cxrcore.train.trainer import checkpoint_weights

    if found := checkpoint_weights(weights):
        version = f" ({found[1].version})" if found[1].version else ""
        return (
            f"fine-tuning the checkpoint {found[0].parent}{version}: all its weights, head included (the "
            "card records it and its dataset's fingerprint as data.pretrained_from)"
        )
    return f"weights file {weights} (here; the run loads and checks it before training)"


def _model_entry(model: str) -> ModelEntry:
    from cxrcore.models import get_model_entry

    try:
        return get_model_entry(model)
    except ValueError as exc:  # an unknown name, with a "did you mean"
        raise ConfigError(f"--model: {exc}") from exc


def _batch_line(chosen: int | None, batch_size: int, workers: int, train_images: int) -> str:
    how = "set" if chosen else "automatic, as `cxr train` picks it for this many images"
    return (
        f"{batch_size} per worker ({how}), {batch_size * workers} per step; "
        f"≈{_steps(train_images, batch_size, workers):,} steps per epoch"
    )


def _image_size(chosen: int | None, data: DatasetFacts) -> str:
    if chosen:
        return f"{chosen} px"
    return (
        f"{data.size} px, the dataset's base size"
        if data.size
        else "the dataset's base size (not known here)"
    )


def _steps(train_images: int, batch_size: int, workers: int) -> int:
    """The optimizer steps of an epoch, as the training loop counts them (`epoch_steps`)."""
    return epoch_steps(train_images // max(workers, 1), batch_size)


def epoch_steps(rows: int, batch_size: int) -> int:
    """Optimizer steps in an epoch of `rows` per worker: a last batch of one image is not trained on
    (`run_epoch`). The schedule had been planned for ceil(train rows / (batch × workers)) steps, one more
    than two workers run on 73 rows at batch 4 (36 each: 9), so its cosine never reached 0.

    >>> epoch_steps(36, 4), epoch_steps(37, 4), epoch_steps(38, 4), epoch_steps(3, 4), epoch_steps(1, 4)
    (9, 9, 10, 1, 1)
    """
    return max(1, rows // batch_size + (rows % batch_size > 1))


def _on_this_machine(location: str) -> bool:
    """A path that exists here; a dry run never reaches out to remote storage, so a URI never is."""
    return "://" not in location and Path(location).exists()


def _where(location: str) -> str:
    return "" if _on_this_machine(location) else " (not on this machine)"


def _plan(command: str, rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows) + 1
    lines = [f"plan of {command} ({NOTHING_STARTED})"]
    lines += [f"{key + ':':<{width}} {value}" for key, value in rows]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    """`n` and `noun`, plural but for one: "1 wave", "3 waves"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
