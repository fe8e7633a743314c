"""The training driver: datasets, scaling, storage and resume for one TorchTrainer run."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrcore.config import ConfigError, TrainConfig, to_dict
from cxrcore.console import is_quiet, train_log_level
from cxrcore.labels import CLASSES
from cxrcore.metrics import STOPPED_EARLY, best_by_validation
from cxrcore.runtime import (
    DATA_CPUS,
    DATA_TASK_CPUS,
    Interrupted,
    root_cause,
    sigint_handler_kept,
    storage_error,
    storage_reason,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run lives and how its best epoch scored."""

    run_dir: str | None
    """None in Ray Train's local mode (--workers 0), which keeps nothing; so are the checkpoints."""
    best_checkpoint: str | None
    latest_checkpoint: str | None
    metrics: dict[str, Any]
    """the last reported epoch's metrics."""
    best_metrics: dict[str, Any]


def resolve_pretrained(model: str, choice: str) -> str | None:
    """The initial weights to load: a local file, "hub", or None for random initialisation. A folder holds
    one file per architecture, `<model>-1ch.safetensors` (as `cxr models import-weights` writes them): one
    file given to a comparison of resnet18 and resnet50 fitted only one of them."""
    from cxrcore.models import get_model_entry
    from cxrcore.models.pretrained import weights_file_name

    try:
        entry = get_model_entry(model)
    except ValueError as exc:  # an unknown name, with a "did you mean"
        raise ConfigError(f"--model: {exc}") from exc
    choice = choice.strip()
    if choice.lower() == "none":
        return None
    if choice.lower() == "auto":
        return "hub" if entry.hub_weights else None
    found = checkpoint_weights(choice)
    if found is not None:  # a cxr checkpoint (a run's, a registry version's folder): fine-tuning it
        weights, card = found
        if card.name != model:
            raise ConfigError(
                f"--pretrained {choice} is a checkpoint of {card.name}: fine-tune it with --model {card.name}"
            )
        return str(weights)
    if not entry.accepts_pretrained:
        raise ConfigError(f"--pretrained: model {model!r} takes no pretrained weights; use 'none'")
    if choice.lower() == "hub":
        return "hub"
    if Path(choice).is_dir():
        weights = Path(choice) / weights_file_name(model)
        if not weights.is_file():
            raise ConfigError(
                f"--pretrained {choice}: no {weights.name} for {model} in that folder; write it with "
                f"`cxr models import-weights {model} --out {choice}`"
            )
        return str(weights)
    if not Path(choice).is_file():
        raise ConfigError(f"--pretrained: no weights file at {choice}")
    return choice


def checkpoint_weights(choice: str) -> tuple[Path, Any] | None:
    """(its weights file, its card) where `choice` is a cxr checkpoint, a folder holding card.json and
    model.safetensors (a `cxr train` run's, a registry version's) or that model.safetensors: the weights a
    fine-tune starts from, the whole model, head included, for any architecture. None for anything else."""
    from cxrcore.checkpoint import CARD_NAME, WEIGHTS_NAME, load_card

    path = Path(choice).expanduser()
    folder = path if path.is_dir() else path.parent if path.name == WEIGHTS_NAME else None
    if folder is None or not (folder / CARD_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        return None
    return folder / WEIGHTS_NAME, load_card(folder)


def pretrained_from(pretrained: str | None) -> dict[str, Any] | None:
    """What a fine-tune started from, for its card's `data.pretrained_from`: the checkpoint, its version,
    the sha256 of its weights and the fingerprint of the dataset it trained on (the images a later
    evaluation must count as seen); None where training did not start from a cxr checkpoint."""
    import pyarrow.fs as pafs

    from cxrcore.data.storage import file_sha256

    found = checkpoint_weights(pretrained) if pretrained and pretrained != "hub" else None
    if found is None:
        return None
    weights, card = found
    return {
        "checkpoint": str(weights.parent.resolve()),
        "version": card.version,
        "weights_sha256": file_sha256(pafs.LocalFileSystem(), str(weights)),
        "dataset_fingerprint": card.data.get("fingerprint"),
        "pretrained_from": card.data.get("pretrained_from"),  # its own lineage, where it had one
        "initial_weights": card.data.get("initial_weights"),  # and the file (ImageNet's) it started from
    }


def started_from(model: str, pretrained: str | None) -> dict[str, Any] | None:
    """The card's `data.initial_weights`: the file (name, sha256, source) or the hub's model a run's weights
    started from (`cxrcore.models.pretrained.initial_weights`); None from scratch or from a cxr checkpoint,
    which `pretrained_from` records."""
    from cxrcore.models.pretrained import HUB, hub_weights_record, initial_weights

    if not pretrained or checkpoint_weights(pretrained) is not None:
        return None
    return hub_weights_record(model) if pretrained == HUB else initial_weights(pretrained)


def check_freeze(config: TrainConfig, pretrained: str | None) -> None:
    """--freeze-backbone names an architecture with a classifier head to train alone (timm's, which take
    pretrained weights; the others' layers are not split into a backbone and a head), and `pretrained`,
    the weights --pretrained resolved to, are some: `auto` for a model without hub weights is none, and a
    frozen random backbone had trained its head alone with exit 0 (a verifier, session 52)."""
    from cxrcore.models import get_model_entry

    if not config.freeze_backbone:
        return
    if not get_model_entry(config.model).accepts_pretrained:
        raise ConfigError(
            f"--freeze-backbone: {config.model} has no pretrained backbone to freeze; it is for timm models "
            "started from pretrained weights (resnet18, resnet50, ...)"
        )
    if pretrained is None:
        raise ConfigError(
            f"--freeze-backbone: --pretrained {config.pretrained} gives {config.model} no weights (random "
            "initialisation), and a random backbone, frozen, computes nothing useful; pass a weights file"
        )


def check_masks(config: TrainConfig, report: dict[str, Any]) -> None:
    """A model that reads a lung mask, on a dataset where some images have none, needs --segmenter: they
    would train on empty masks (where only some classes have masks, as in the real sample, whose 30 masks
    are all of COVID films, an empty mask tells the class), and `cxr evaluate` and `cxr serve` refuse such
    a model without a segmenter anyway: it trained, with exit 0, for nothing (a real-sample study, session
    52). Checked before Ray starts, where the dataset is local."""
    from cxrcore.models import get_model_entry

    missing = report.get("without_mask") or 0
    if config.segmenter or not missing or "mask" not in get_model_entry(config.model).input_spec.channels:
        return
    raise ConfigError(
        f"--model {config.model} reads a lung mask, and {missing} of the {report.get('ingested')} images of "
        f"{config.data} have none: they would train on empty masks, and `cxr evaluate` and `cxr serve` "
        "refuse the model without a segmenter. Train one first (`cxr train --model unet` on the images "
        "with masks) and pass --segmenter, or compare with `cxr tune`, which trains one itself"
    )


def check_hub(model: str, choice: str) -> str | None:
    """resolve_pretrained, refusing weights from a model hub that this machine cannot reach (a probe of a
    few seconds at most): the driver loads them once before the workers do. Checked before Ray starts, as
    `--dry-run` checks it: the run refused only after Ray's start (20 s), and the dry run passed."""
    from cxrcore.models.pretrained import hub_unreachable, offline_cache_missing

    pretrained = resolve_pretrained(model, choice)
    if pretrained == "hub" and (missing := offline_cache_missing(model)):
        raise ConfigError(
            f"--pretrained {choice}: {missing}; write them on a machine with internet (`cxr models "
            f"import-weights {model} --out DIR/`) and pass --pretrained DIR, or unset HF_HUB_OFFLINE where "
            "the hub is reachable"
        )
    if pretrained == "hub" and (unreachable := hub_unreachable()):
        raise ConfigError(
            f"--pretrained {choice}: {model} weights come from the model hub, which is unreachable from "
            f"here ({unreachable}); pass --pretrained PATH to a local .safetensors or .pth file, "
            "--pretrained none to train from scratch, or set HF_HUB_OFFLINE=1 to use weights already in the "
            "hub's cache"
        )
    return pretrained


def check_pretrained(model: str, choice: str) -> str | None:
    """resolve_pretrained, then load those weights once, in the driver, before any worker starts.

    A hub that cannot be reached or a file that does not fit the architecture fails here with what to
    do instead, once, rather than in every worker and every Tune trial after minutes of start-up.
    """
    from cxrcore.models import create_model
    from cxrcore.models.pretrained import weights_file_name

    pretrained = check_hub(model, choice)
    if pretrained is not None:
        try:
            create_model(model, pretrained=pretrained)
        except (RuntimeError, ValueError) as exc:
            hint = ""
            if "do not fit" in str(exc) and pretrained == choice:  # one file given to several architectures?
                hint = f" (for {model}; a folder holds one file per architecture, {weights_file_name(model)})"
            raise ConfigError(f"--pretrained {choice}: {exc}{hint}") from exc
    return pretrained


def check_dataset(data: str) -> None:
    """Fail before training when `data` is not a finished dataset, has no train or val image, has files
    that cannot be read or other rows than its report counts, or lacks a column training reads."""
    from cxrcore.data.ingest import parquet_files, read_report, verify_dataset
    from cxrcore.train.loop import TRAIN_COLUMNS

    by_split = read_report(data)["by_split"]
    if not by_split.get("train"):
        raise ConfigError(f"--data: {data} has no image in its train split; re-ingest it (`cxr data ingest`)")
    if not by_split.get("val"):
        raise ConfigError(
            f"--data: {data} has no image in its val split, on which every epoch is scored (checkpoint "
            "ranking, ASHA, calibration); re-ingest it with `cxr data ingest --val-fraction` above 0"
        )
    verify_dataset(data)  # every file read, and the rows the report counts: a damaged dataset stops here
    schema = parquet_files(data).schema
    missing = [column for column in TRAIN_COLUMNS if column not in schema.names]
    if missing:
        raise ConfigError(
            f"--data: {data} has no column {', '.join(missing)}; re-ingest it with `cxr data ingest`"
        )


def untrained_classes(report: dict[str, Any]) -> str | None:
    """A sentence where the dataset's training split holds no image of a class (None where it holds every
    class): the model keeps an output for it and never answers it. A review (session 57): a dataset
    without a Viral Pneumonia folder was trained, compared and promoted without a word.

    >>> untrained_classes({"by_class_split": {"COVID": {"train": 4}, "Normal": {"train": 0, "test": 2}}})
    'the training split holds no image of Lung_Opacity, Normal or Viral Pneumonia: a model trained on it ...'
    """
    by_class = report.get("by_class_split") or {}
    missing = [name for name in CLASSES if not (by_class.get(name) or {}).get("train")]
    if not missing:
        return None
    named = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} or {missing[-1]}"
    them = "it" if len(missing) == 1 else "them"
    return f"the training split holds no image of {named}: a model trained on it never answers {them}"


def unscored_classes(report: dict[str, Any], tuning: bool = False) -> str | None:
    """A sentence where the dataset's val split lacks a class (None where it holds every class it has).

    Every epoch is scored on the val split: its macro-F1 averages the classes present, so a class without
    a val image plays no part in which checkpoint is kept (`tuning`: nor in ASHA's stops or Tune's winner).

    >>> unscored_classes({"by_class_split": {"COVID": {"val": 1}, "Viral Pneumonia": {"train": 4}}}, True)
    "the val split holds no Viral Pneumonia image: validation macro-F1, and with it the checkpoint kept, ..."
    """
    by_class = report.get("by_class_split") or {}
    missing = [name for name, splits in by_class.items() if sum(splits.values()) and not splits.get("val")]
    if not missing:
        return None
    scored = sum(1 for splits in by_class.values() if splits.get("val"))
    chosen = "the checkpoint kept, ASHA's stops and the winner" if tuning else "the checkpoint kept"
    return (
        f"the val split holds no {' or '.join(missing)} image: validation macro-F1, and with it {chosen}, "
        f"is over the other {scored} "
        f"class{'es' * (scored != 1)}; ingest again with a larger --val-fraction to score "
        f"{'it' if len(missing) == 1 else 'them'}"
    )


def run_settings(config: TrainConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: the data and every setting but length, workers and place."""
    ignored = {
        "epochs",
        "workers",
        "cpus_per_worker",
        "gpu",
        "out",
        "name",
        "max_failures",
        "address",
        "data",
        "patience",  # when to stop, as epochs is
    }
    if not settings["train"].get("segmenter"):
        ignored.add("train_masks")  # no segmenter, no choice: runs from before the setting resume as well
    train = {k: v for k, v in settings["train"].items() if k not in ignored}
    data = settings["data"]["fingerprint"]
    # the weights file it started from, by its sha256: a file replaced under the same path (`import-weights
    # --force`) had resumed the run, and the next card named the new file (a verifier, session 52)
    start = (settings["data"].get("initial_weights") or {}).get("sha256")
    # the size the run trains at, resolved: `--image-size` unset (train's None) is the dataset's size; a
    # run recorded before had recorded None, and resumed at another size (a review, session 53)
    return {"data_fingerprint": data, **train, "image_size": settings["image_size"], "initial_weights": start}


def check_resume(config: TrainConfig, settings: dict[str, Any], run_dir: str, write: bool = True) -> None:
    """Refuse to go on with the run in `run_dir` where it was started with other settings (`settings`:
    loop_config's), or has trained more epochs than `--epochs` asks for (it had said "resumed after epoch
    20 of 10" and exited 0 with the 20-epoch run's figures); record the settings of a new run (`write`)."""
    from cxrcore.experiment import check_same_experiment

    recorded_now = run_settings(config, settings)
    defaults = added_run_settings(recorded_now, run_dir)
    if _kept_nothing(run_dir):
        # An earlier start that kept no checkpoint (diverged in its first epoch, stopped before one ended)
        # leaves nothing to resume: this run's settings replace its. Its "train again with a lower --lr"
        # had been refused as another experiment (a review, session 57).
        from cxrcore.data import storage
        from cxrcore.experiment import SETTINGS_NAME

        if not write:
            return
        filesystem, root = storage.resolve(run_dir)
        storage.remove(filesystem, f"{root}/{SETTINGS_NAME}")
    check_same_experiment(run_dir, recorded_now, "a training run", defaults, write=write)
    check_recorded_checkpoints(run_dir)
    done = ((latest_recorded(run_dir) or {}).get("metrics") or {}).get("epoch")
    if isinstance(done, int) and done > config.epochs:
        raise ConfigError(
            f"--epochs {config.epochs}: {run_dir} already holds a run of {done} epochs, and a run is not "
            f"cut short: its checkpoints stand as they are (`cxr train --epochs {done}` prints them again). "
            f"For a run of {config.epochs} epochs start a fresh one with another --name (or --out)"
        )


def _kept_nothing(run_dir: str) -> bool:
    """Whether the run in `run_dir` has no checkpoint: none recorded, no checkpoint folder (a record cut
    short by a full disk is `restore_checkpoint_record`'s, and its folders are still there)."""
    import pyarrow.fs as pafs

    from cxrcore.data import storage

    if latest_recorded(run_dir) is not None:
        return False
    filesystem, root = storage.resolve(run_dir)
    found = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return not any(info.base_name.startswith("checkpoint_") for info in found)


def check_worker_shares(config: TrainConfig, train_rows: int) -> None:
    """Refuse workers whose share of the training images is under 2: a batch of one image cannot train
    BatchNorm, which had raised a traceback, three times over Ray Train's retries (a review, session 57)."""
    if train_rows // max(config.workers, 1) < 2:
        raise ConfigError(
            f"--workers {config.workers}: {config.data}'s {train_rows} training image(s) give a worker fewer "
            "than 2, and a batch of one image cannot train BatchNorm; use fewer workers or more images"
        )


def check_recorded_checkpoints(run_dir: str) -> None:
    """Refuse to resume the run in `run_dir` where its checkpoints are not as Ray Train recorded them, as
    deleting them by hand to free space leaves them:
    - a checkpoint folder the record keeps is gone: Ray Train refused the run in an 88-line traceback
      (CheckpointManagerInitializationError) whose advice, deleting the run's folder, took the best
      checkpoint with it;
    - the latest has no resume state (TRAIN_STATE_NAME): the run trained again from its first epoch with a
      fresh optimizer, over the folders of the same names, and printed a best checkpoint that was gone.
    A record that does not parse is `restore_checkpoint_record`'s to judge."""
    from cxrcore.checkpoint import TRAIN_STATE_NAME, WEIGHTS_NAME
    from cxrcore.data import storage

    filesystem, root = storage.resolve(run_dir)
    text = storage.read_text(filesystem, f"{root}/{CHECKPOINT_SNAPSHOT}")
    record = _checkpoint_record(text) if text is not None else None
    if record is None:
        return
    start_over = f"train with another --name, or delete {run_dir} to start this run over"
    kept = (entry.get("checkpoint_dir_name") for entry in _record_entries(record["checkpoint_results"]))
    gone = sorted(
        name for name in kept if isinstance(name, str) and not storage.exists(filesystem, f"{root}/{name}")
    )
    if gone:
        raise ConfigError(
            f"{run_dir}: checkpoint folder(s) this run recorded are gone ({', '.join(gone)}), and it "
            f"resumes only with every one of them: put them back, or {start_over}"
        )
    latest = (record.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if isinstance(latest, str) and not storage.exists(filesystem, f"{root}/{latest}/{TRAIN_STATE_NAME}"):
        raise ConfigError(
            f"{run_dir}/{latest}, this run's latest checkpoint, has no {TRAIN_STATE_NAME} (the optimizer's "
            f"state, which resuming needs): {start_over}. Its weights can start the new run: --pretrained "
            f"{run_dir}/{latest}/{WEIGHTS_NAME}"
        )


def added_run_settings(recorded_now: dict[str, Any], run_dir: str | None = None) -> dict[str, Any]:
    """What a setting added since a run started stands for in its record (check_same_experiment's
    `defaults`): such a run resumes as it was trained. Its initial weights were not recorded: taken as the
    file it names now. Its image size was recorded as None: taken from its latest checkpoint's card (as
    this run's where it has none)."""
    return {
        "freeze_backbone": False,
        "initial_weights": recorded_now.get("initial_weights"),
        "image_size": _trained_size(run_dir) or recorded_now.get("image_size"),
    }


def _trained_size(run_dir: str | None) -> int | None:
    """The image size the latest checkpoint of the run in `run_dir` was trained at (None: none found)."""
    from cxrcore.checkpoint import load_card
    from cxrcore.data import storage

    latest = latest_recorded(run_dir) if run_dir is not None else None
    if latest is None or not isinstance(folder := latest.get("checkpoint_dir_name"), str):
        return None
    filesystem, root = storage.resolve(str(run_dir))
    try:
        return int(load_card(storage.uri(filesystem, f"{root}/{folder}")).input_spec["image_size"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None


def _keep_scores_added(run_dir: str) -> None:
    """Give the checkpoints Ray Train recorded for a run of an earlier cxr, which kept them by val_score,
    the KEEP_SCORE it keeps them by now, from their recorded val_score and val_loss: without one Ray ranks
    them below any new one and deletes them first, its best among them; with their bare val_score they
    had outranked every new epoch of the same score (a verifier, session 53)."""
    from cxrcore.data import storage
    from cxrcore.metrics import KEEP_SCORE, keep_score

    filesystem, root = storage.resolve(run_dir)
    text = storage.read_text(filesystem, f"{root}/{CHECKPOINT_SNAPSHOT}")
    record = _checkpoint_record(text) if text is not None else None
    if record is None:
        return
    added = 0
    for entry in list(_record_entries(record)):
        metrics = entry.get("metrics")
        if isinstance(metrics, dict) and KEEP_SCORE not in metrics and "val_score" in metrics:
            metrics[KEEP_SCORE], added = keep_score(metrics), added + 1
    if added:
        storage.write_text(filesystem, f"{root}/{CHECKPOINT_SNAPSHOT}", json.dumps(record))


def latest_recorded(run_dir: str) -> dict[str, Any] | None:
    """Ray Train's record of the latest checkpoint of the run in `run_dir` (`checkpoint_dir_name`,
    `metrics`), None where there is none or its record does not parse."""
    from cxrcore.data import storage

    filesystem, root = storage.resolve(run_dir)
    text = storage.read_text(filesystem, f"{root}/{CHECKPOINT_SNAPSHOT}")
    record = _checkpoint_record(text) if text is not None else None
    latest = (record or {}).get("latest_checkpoint_result")
    return latest if isinstance(latest, dict) else None


MIN_STEPS_PER_EPOCH = 24
"""Small datasets get smaller batches: a 4-epoch run on 200 images must still take ~100 optimizer steps."""


def auto_batch_size(train_rows: int, workers: int, largest: int = 32, smallest: int = 4) -> int:
    """Per-worker batch size: `largest`, halved until an epoch has MIN_STEPS_PER_EPOCH steps.

    >>> auto_batch_size(17_000, 2), auto_batch_size(320, 1), auto_batch_size(192, 2)
    (32, 8, 4)
    """
    size = largest
    while size > smallest and train_rows / (size * workers) < MIN_STEPS_PER_EPOCH:
        size //= 2
    return size


def loop_config(config: TrainConfig, settings_only: bool = False) -> dict[str, Any]:
    """Everything the worker loop needs, resolved once in the driver (and JSON-plain for Ray); with
    `settings_only` (a re-run's check before Ray starts) without the input check's reference, which reads
    every training image, and without the warnings the run itself gives."""
    from cxrcore import inputcheck
    from cxrcore.data.ingest import read_report, sources_separate_classes
    from cxrcore.models import get_model_entry

    report = read_report(config.data)
    try:
        entry = get_model_entry(config.model)
    except ValueError as exc:  # an unknown name, with a "did you mean"
        raise ConfigError(f"--model: {exc}") from exc
    segmenting = entry.input_spec.task == "segment"
    train_counts = [report["by_class_split"].get(c, {}).get("train", 0) for c in CLASSES]
    check_dataset(config.data)
    pretrained = check_pretrained(config.model, config.pretrained)
    check_freeze(config, pretrained)
    if config.segmenter:
        _check_segmenter(config.segmenter)
    if segmenting and report["without_mask"] >= report["ingested"]:
        raise ConfigError(f"--model {config.model}: {config.data} has no lung mask to learn segmenting from")
    masks_wanted = "mask" in entry.input_spec.channels and not config.segmenter
    if masks_wanted and report["without_mask"] and not settings_only:
        log.warning(
            "%d images have no lung mask and %s needs one: they get an empty mask. "
            "Train a segmenter (`cxr train --model unet`) and pass --segmenter",
            report["without_mask"],
            config.model,
        )
    train_rows = report["by_split"]["train"]
    if segmenting:
        train_rows = round(train_rows * (1 - report["without_mask"] / max(report["ingested"], 1)))
    if not settings_only:
        check_worker_shares(config, train_rows)
    train = to_dict(config)
    train["batch_size"] = config.batch_size or auto_batch_size(train_rows, max(config.workers, 1))
    confound = sources_separate_classes(report)
    # What a usual input is, from the images as the model will see them: each checkpoint carries it
    reference = inputcheck.fit_dataset(config.data) if not settings_only and not segmenting else None
    return {
        "train": train,
        "pretrained": pretrained,
        "image_size": config.image_size or report["config"]["size"],
        "train_rows": train_rows,
        "class_weights": _class_weights(train_counts) if config.class_weights and not segmenting else None,
        "data": {
            "dataset": config.data,
            "fingerprint": report["fingerprint"],
            "size": report["config"]["size"],
            # in the card, which GET /v1/model shows: the scores it carries may measure the sources
            **({"sources_separate_classes": confound} if confound else {}),
            # the mix the probabilities are made for without class weights (ModelCard.probability_prior)
            "train_class_counts": dict(zip(CLASSES, train_counts, strict=True)),
            # a fine-tune's lineage: the checkpoint it started from and the data that one trained on
            **({"pretrained_from": lineage} if (lineage := pretrained_from(pretrained)) else {}),
            # or the weights file (ImageNet's, say) it started from, by its sha256
            **({"initial_weights": start} if (start := started_from(config.model, pretrained)) else {}),
            # the code that made the dataset (its commit and source hash): kept once the dataset is gone
            **({"ingested_by": report["software"]} if report.get("software") else {}),
        },
        # Decided by the driver: the workers of a joined cluster lack its environment.
        "quiet_console": is_quiet(),
        "input_reference": inputcheck.plain(reference),
        "cpus_per_worker": worker_cpus(config),
    }


DRIVER_READ_BYTES = 64 * 2**20
"""Training data (train and val pixels, image and mask) up to this size is read by the driver and given to
Ray Train as in-memory blocks: a Ray Data read first samples files, then reads and unpacks them, in tasks
that each need a worker process (about 1 s of a tiny run's start here, 6–7 s in a Tune trial beside
two others). Past it the read is Ray Data's, parallel and streamed: a driver should not hold the data."""


def _check_worker_cpus(config: TrainConfig, cpus: int) -> None:
    """Refuse CPU workers that the local cluster cxr started can never place, or that would take all of its
    CPUs: the Ray Data tasks that feed them need one, and without it the run waited for good, printing
    nothing of its own (a review's `--workers 2 --cpus-per-worker 2` on 4 logical CPUs). Ray Train's
    "Requesting resources" line is hidden on a quiet console. A cluster joined by address may autoscale:
    `fit` notes it there (`worker_fit_note`)."""
    import ray

    from cxrcore.runtime import local_core_limit

    if config.gpu or config.workers < 1 or local_core_limit() is None or not ray.is_initialized():
        return
    _refuse_worker_cpus(config, cpus, int(ray.cluster_resources().get("CPU", 0)))


def check_local_worker_cpus(config: TrainConfig) -> None:
    """`_check_worker_cpus` before Ray starts (and in a dry run), for --cpus-per-worker on the local
    cluster cxr would start: its CPUs are known (`local_logical_cpus`), and the refusal came after 26 s."""
    from cxrcore.runtime import joins_cluster, local_logical_cpus, usable_cores

    if config.gpu or config.workers < 1 or not config.cpus_per_worker or joins_cluster(config.address):
        return
    _refuse_worker_cpus(config, config.cpus_per_worker, local_logical_cpus(usable_cores()))


def _refuse_worker_cpus(config: TrainConfig, cpus: int, logical: int) -> None:
    need = config.workers * cpus
    if need + DATA_TASK_CPUS > logical:
        has = (
            f" and the local Ray cluster has {logical}"
            if need > logical
            else f", all the local Ray cluster's {logical}, which leaves the Ray Data tasks feeding them none"
        )
        raise ConfigError(
            f"--workers {config.workers} × --cpus-per-worker {cpus} needs {need} CPUs{has}; ask for fewer"
        )


def worker_fit_note(config: TrainConfig, total: dict[str, float], free: dict[str, float]) -> str | None:
    """On a cluster joined by address, where the run's workers cannot start now: a sentence saying why and
    what to do; None where they can (or on the local cluster, which `_check_worker_cpus` guards).

    A run whose workers and data tasks the cluster cannot place waits, RUNNING, and Ray's own lines about
    it are off a quiet console: `ray job submit ... jobs.train --workers 2` on a 2-CPU cluster stayed
    RUNNING for 11 minutes, with one warning of Ray Data's as the only hint.
    """
    from cxrcore.runtime import local_core_limit

    if config.workers < 1 or local_core_limit() is not None:
        return None
    kind = "GPU" if config.gpu else "CPU"
    need = float(config.workers if config.gpu else config.workers * worker_cpus(config))
    has, idle = float(total.get(kind, 0)), float(free.get(kind, 0))
    data = 0.0 if config.gpu else DATA_TASK_CPUS  # Ray Data's tasks run on the CPUs beside GPU workers
    what = f"{config.workers} Train worker(s) need {need:g} {kind}s"
    if not config.gpu:
        what += f", and the Ray Data tasks that feed them {data:g} more"
    if need + data > has + 1e-9:
        return (
            f"{what}; the cluster has {has:g}: training waits until the autoscaler adds a node, and on a "
            "cluster of fixed size it never starts (stop it, and use fewer --workers or --cpus-per-worker)"
        )
    if need + data > idle + 1e-9:
        return (
            f"{what}; {idle:g} of the cluster's {has:g} are free now (a Serve app or other jobs hold the "
            "rest): training starts when enough are freed"
        )
    return None


def check_local_gpus(workers: int, address: str | None = None) -> None:
    """Refuse `--gpu` where the local cluster cxr started (or, before Ray starts, would start: the GPUs
    torch sees here) has fewer GPUs than `workers`: Ray would wait for them forever. A cluster joined by
    address may add GPU nodes as it autoscales, so it is left to Ray."""
    import ray

    from cxrcore.runtime import joins_cluster, local_core_limit

    if ray.is_initialized():
        if local_core_limit() is None:
            return
        gpus, where = int(ray.cluster_resources().get("GPU", 0)), "the local Ray cluster has"
    elif joins_cluster(address):
        return
    else:
        import torch

        gpus, where = torch.cuda.device_count(), "this machine, where cxr starts a local Ray cluster, has"
    if gpus < max(workers, 1):
        raise ConfigError(
            f"--gpu: {where} {gpus} GPU(s) for {max(workers, 1)} GPU worker(s); train on the CPU (without "
            "--gpu), or on a cluster with GPUs (--address)"
        )


def worker_cpus(config: TrainConfig) -> int:
    """CPUs of each CPU worker: --cpus-per-worker, else on the local cluster init_ray started this
    machine's cores (at most the cluster's logical CPUs less the DATA_CPUS it keeps for Ray Data), shared
    evenly among the workers (at least 1 each); else 1 (a cluster joined by address: Ray Train's default).
    Each worker runs torch with that many threads.

    Ray gives a worker OMP_NUM_THREADS = its CPUs, so one worker of 1 CPU trained on one core of two:
    resnet18 at 128 px ran 23 images/s against 33 for a plain loop on both (README, Benchmarks). With 1
    CPU each, 2 DDP workers on a 16-core workstation would train on 2 of its cores; now 8 each.
    """
    from cxrcore.runtime import local_core_limit

    if config.cpus_per_worker:
        return config.cpus_per_worker
    cores = local_core_limit()
    if config.gpu or config.workers < 1 or cores is None:
        return 1
    import ray

    logical = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else cores + DATA_CPUS
    return local_worker_cpus(cores, logical, config.workers)


def local_worker_cpus(cores: int, logical: int, workers: int) -> int:
    """Each of `workers` CPU workers' share of a local cluster on `cores` cores that counts `logical` CPUs:
    the cores, at most the logical CPUs less the DATA_CPUS kept for Ray Data, split evenly (at least 1)."""
    return max(1, min(cores, logical - DATA_CPUS) // workers)


def training_inputs(config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker loop's settings (`loop_config`) and its train and val Ray Datasets: small data read
    here and kept in memory (DRIVER_READ_BYTES), larger data streamed from Parquet, or materialized
    where it fits in the object store."""
    from cxrcore.data.ingest import read_split
    from cxrcore.models import get_model_entry
    from cxrcore.train.loop import TRAIN_COLUMNS

    settings = loop_config(config)
    _check_worker_cpus(config, settings["cpus_per_worker"])
    segmenting = get_model_entry(config.model).input_spec.task == "segment"
    splits = ("train", "val")
    if _pixel_bytes(config.data, splits) <= DRIVER_READ_BYTES:
        blocks = 2 * max(config.workers, 1)
        # On CPU, the segmenter's masks for data kept in memory are computed once, not every epoch.
        segment = _segments_once(config, settings["image_size"])
        datasets = {
            split: _in_memory_split(config.data, split, segmenting, blocks, segment) for split in splits
        }
        settings["masks_from_segmenter"] = segment is not None
    else:
        kept = _fits_in_object_store(settings["train_rows"], settings["data"]["size"])
        # Streamed, the training files are read in a new order each epoch (from --seed and the epoch's
        # count); kept in memory, in their order, which the shuffle buffer then draws from whole.
        datasets = {
            split: read_split(
                config.data,
                split,
                TRAIN_COLUMNS,
                shuffle_files=None if kept or split != "train" else config.seed,
            )
            for split in splits
        }
        if segmenting:  # the segmenter learns from images that have a ground-truth mask
            datasets = {n: ds.map_batches(_with_mask, batch_format="numpy") for n, ds in datasets.items()}
        if kept:
            # Streaming re-reads Parquet every epoch; a dataset this small is cheaper to keep in memory,
            # and the segmenter's masks are then made once, by Ray Data tasks, as for small data.
            segment = _segments_once(config, settings["image_size"])
            if segment is not None:
                datasets = {n: ds.map_batches(segment, batch_format="numpy") for n, ds in datasets.items()}
            settings["masks_from_segmenter"] = segment is not None
            datasets = {split: _in_order(ds).materialize() for split, ds in datasets.items()}
    from ray.data.dataset import MaterializedDataset

    share = settings["train_rows"] // max(config.workers, 1)  # streamed: Ray's equal split, about this
    if isinstance(datasets["train"], MaterializedDataset):
        # in memory: its exact row count (a segmenter's, of masked rows, had been estimated), and the rows
        # each worker trains on an epoch (sharding.WholeValidation's shares differ by one row at most)
        settings["train_rows"] = datasets["train"].count()
        share = settings["rows_per_worker"] = settings["train_rows"] // max(config.workers, 1)
    row_bytes = 2 * int(settings["data"]["size"]) ** 2  # an image and its mask, uint8
    settings["shuffle_rows"] = min(share + 1, max(1, SHUFFLE_BYTES // row_bytes))
    return settings, datasets


SHUFFLE_BYTES = 256 * 2**20
"""How much of a worker's share of the training data its shuffle buffer may hold: all of it up to this. With
8 batches' rows, a row's place in one epoch's order and the next correlated at 0.91 (8,500 rows a worker,
batch 32: a review, session 54), so each batch met nearly the same neighbours every epoch; within this many
bytes (its share of data the driver reads, always) each epoch's order is a new permutation of its rows.
Data streamed from Parquet (larger than the object store) gets as much: 3,200 rows at 256 px streamed
through a 2,048-row buffer correlated at 0.01-0.02 from one epoch to the next, through 8 batches' at 0.95
(session 56); and its files come in a new order each epoch (`read_split`'s `shuffle_files`)."""


def _in_order(dataset: Any) -> Any:
    """`dataset` read in its files' order: Ray Data's default lets blocks arrive as their tasks finish, so
    the rows (and each worker's share of them) changed from run to run, and a run of data this size did not
    repeat with the same --seed (four runs, four sets of weights: a review, session 54). Each dataset keeps
    its own copy of Ray Data's settings, so it is set on this one."""
    dataset.context.execution_options.preserve_order = True
    return dataset


def build_trainer(config: TrainConfig, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer for `config`: datasets, scaling, storage, failure and checkpoint policy."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from cxrcore.data import storage
    from cxrcore.metrics import KEEP_SCORE
    from cxrcore.train.loop import train_loop_per_worker
    from cxrcore.train.sharding import WholeValidation

    settings, datasets = training_inputs(config)
    storage_path = config.out if "://" in config.out else storage.resolve(config.out)[1]
    run_dir = f"{storage_path.rstrip('/')}/{config.run_name()}"
    check_resume(config, settings, run_dir)
    if (restored := restore_checkpoint_record(run_dir)) is not None:
        log.warning(
            "%s/%s, Ray Train's record of the run's checkpoints, was damaged (cut short: a full disk or a "
            "kill while Ray wrote it): put back as it was after epoch %s, from which the run resumes",
            run_dir,
            CHECKPOINT_SNAPSHOT,
            restored,
        )
    _keep_scores_added(run_dir)
    if dropped := drop_unrecorded_checkpoints(run_dir):
        log.warning(
            "removed %d checkpoint folder(s) of %s that the interrupted run wrote after its last recorded "
            "epoch (those epochs train again): %s",
            len(dropped),
            run_dir,
            ", ".join(dropped),
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.gpu,
            resources_per_worker=None if config.gpu else {"CPU": settings["cpus_per_worker"]},
        ),
        datasets=datasets,
        dataset_config=WholeValidation(execution_options=_shard_options()),
        # Train V2's RunConfig (the runtime default); mypy resolves ray.train.RunConfig to V1's, which lacks
        # logging_config.
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]
            name=config.run_name(),
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=train_log_level()),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=3, checkpoint_score_attribute=KEEP_SCORE, checkpoint_score_order="max"
            ),
            callbacks=[*(callbacks or []), record_keeper(run_dir)],
        ),
    )


CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train V2's record of a run's checkpoints, which a run of the same name resumes from."""
RECORD_COPY = "cxr_checkpoint_record.json"
"""A copy of CHECKPOINT_SNAPSHOT as it was after the last epoch whose checkpoint Ray recorded, written
whole or not at all (`storage.write_text`). Ray writes its record in place: a disk that filled as it did
left it cut short (4,096 bytes of JSON), and every re-run then failed in Ray's CheckpointManager."""


def record_keeper(run_dir: str) -> Any:
    """A Ray Train callback that copies the run's checkpoint record (RECORD_COPY) after each report with a
    checkpoint. It runs in the Train controller after Ray's CheckpointManager has recorded the report and
    written its record; a record Ray could not write whole is never copied (it does not parse)."""
    import ray.train

    class RecordKeeper(ray.train.UserCallback):
        def __init__(self, run_dir: str) -> None:
            self.run_dir = run_dir  # state to unpickle, which calls __setstate__

        def __setstate__(self, state: dict[str, Any]) -> None:
            # Unpickled in the Train controller's process, which logs its failed record write ("Error in
            # control loop iteration", 30 lines) before cxr says it in one line.
            from cxrcore.console import hide_storage_errors

            self.__dict__.update(state)
            hide_storage_errors("ray.train.v2._internal.execution.controller.controller")

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if checkpoint is not None:
                copy_checkpoint_record(self.run_dir)

    return RecordKeeper(run_dir)


def copy_checkpoint_record(run_dir: str) -> None:
    """Copy CHECKPOINT_SNAPSHOT to RECORD_COPY where it is whole; a copy that cannot be written (the disk
    full) leaves the one before, and the run goes on to meet the full disk itself."""
    from cxrcore.data import storage

    filesystem, root = storage.resolve(run_dir)
    text = storage.read_text(filesystem, f"{root}/{CHECKPOINT_SNAPSHOT}")
    if text is None or _checkpoint_record(text) is None:
        return
    try:
        storage.write_text(filesystem, f"{root}/{RECORD_COPY}", text)
    except OSError as exc:
        log.warning("could not keep a copy of %s/%s: %s", run_dir, CHECKPOINT_SNAPSHOT, exc)


def restore_checkpoint_record(run_dir: str, *, write: bool = True) -> int | None:
    """Put back the run's checkpoint record from RECORD_COPY where Ray's own is damaged (it does not
    parse) and the copy is whole, with every checkpoint it names still there; return the last epoch the
    copy recorded (None where nothing was restored). Raises ConfigError, naming the file and what to do,
    where the record is damaged and no usable copy is kept. `write=False` (`--dry-run`) only checks.

    Ray writes its record before it deletes the checkpoints it no longer keeps, and deletes none when the
    write fails: the record of the epoch before names folders that are all still there.
    """
    from cxrcore.data import storage

    filesystem, root = storage.resolve(run_dir)
    live = f"{root}/{CHECKPOINT_SNAPSHOT}"
    text = storage.read_text(filesystem, live)
    if text is None or _checkpoint_record(text) is not None:
        return None
    copy = storage.read_text(filesystem, f"{root}/{RECORD_COPY}")
    record = _checkpoint_record(copy) if copy is not None else None
    folders = _recorded_folders(record) if record is not None else set()
    gone = sorted(f for f in folders if not storage.exists(filesystem, f"{root}/{f}"))
    if record is None or copy is None or gone:
        kept = (
            f"its copy ({RECORD_COPY}) names checkpoints that are gone ({', '.join(gone)})"
            if gone
            else "no whole copy of it is kept"
        )
        raise ConfigError(
            f"{run_dir}/{CHECKPOINT_SNAPSHOT}, Ray Train's record of this run's checkpoints, is damaged (cut "
            f"short: a full disk or a kill while Ray wrote it) and {kept}: train again with another --name, "
            f"or delete {run_dir} to start this run over"
        )
    if write:
        storage.write_text(filesystem, live, copy)
    named = (re.fullmatch(r"checkpoint_epoch_(\d+)", folder) for folder in folders)
    return max((int(match[1]) for match in named if match), default=0)


def _checkpoint_record(text: str) -> dict[str, Any] | None:
    """Ray Train V2's checkpoint record parsed, or None for one that does not parse or is not one."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("checkpoint_results"), list):
        return None
    return record


def _recorded_folders(record: dict[str, Any]) -> set[str]:
    """Every checkpoint folder the record names: kept, latest, pending."""
    names = (entry.get("checkpoint_dir_name") for entry in _record_entries(record))
    return {name for name in names if isinstance(name, str)}


def _record_entries(value: Any) -> Iterator[dict[str, Any]]:
    """Every object in Ray Train's checkpoint record, however deep (its kept, latest and pending results)."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _record_entries(item)
    elif isinstance(value, list):
        for item in value:
            yield from _record_entries(item)


def drop_unrecorded_checkpoints(run_dir: str) -> list[str]:
    """Remove the checkpoint folders of the run in `run_dir` that Ray Train's record of it does not name;
    return their names.

    A run stopped by Ctrl-C (or a lost driver) may have had its workers write a checkpoint or two that the
    controller never recorded. Resuming starts after the last recorded one and trains those epochs again;
    the folders stayed behind, never pruned by `num_to_keep` (a ResNet50's is about 300 MB). Nothing runs
    under `run_dir` when this is called (before the run starts), so every folder the record does not name
    is such a leftover. A record in a format this code does not know removes nothing."""
    import pyarrow.fs as pafs

    from cxrcore.data import storage

    filesystem, root = storage.resolve(run_dir)
    text = storage.read_text(filesystem, f"{root}/{CHECKPOINT_SNAPSHOT}")
    snapshot = _checkpoint_record(text) if text is not None else None
    if snapshot is None:
        return []
    recorded = _recorded_folders(snapshot)
    folders = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    dropped = sorted(
        info.base_name
        for info in folders
        if info.type == pafs.FileType.Directory
        and info.base_name.startswith("checkpoint_")
        and info.base_name not in recorded
    )
    for name in dropped:
        storage.remove(filesystem, f"{root}/{name}")
    return dropped


def _shard_options() -> Any:
    """Ray Train's default execution options for the workers' dataset shards (DataConfig's
    default_ingest_options, from this process's DataContext) without `exclude_resources` where it is
    unset: Ray 2.60 passes it always, and every training run printed a RayDeprecationWarning about it."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    options = ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )
    if not current.exclude_resources.is_zero():
        options.exclude_resources = current.exclude_resources  # set by the user: warned already
    return options


def epoch_line(name: str, epochs: int, metrics: dict[str, Any]) -> str:
    """One line per epoch for the console: losses, accuracy, the validation score and throughput.

    >>> epoch_line("dual_cnn", 8, {"epoch": 2, "train_loss": 0.91, "train_accuracy": 0.62, "val_loss": 0.55,
    ...     "val_accuracy": 0.83, "val_macro_f1": 0.81, "train_images_per_s": 52.3})
    'dual_cnn epoch 2/8: train loss 0.910 acc 0.620 | val loss 0.550 acc 0.830 macro-F1 0.810 | 52 images/s'
    """
    parts = [f"{name} epoch {metrics.get('epoch', '?')}/{epochs}:"]
    for side in ("train", "val"):
        fields = [("loss", "loss"), ("accuracy", "acc"), ("macro_f1", "macro-F1"), ("dice", "dice")]
        shown = [
            f"{label} {metrics[f'{side}_{key}']:.3f}" for key, label in fields if f"{side}_{key}" in metrics
        ]
        if shown:
            parts.append(f"{side} {' '.join(shown)}" if side == "train" else f"| {side} {' '.join(shown)}")
    if "train_images_per_s" in metrics:
        parts.append(f"| {metrics['train_images_per_s']:.0f} images/s")
    if best := metrics.get(STOPPED_EARLY):
        since = metrics["epoch"] - best
        parts.append(f"\n{name}: stopped early (--patience): {since} epoch(s) after the best, epoch {best}")
    return " ".join(parts)


def epoch_printer(config: TrainConfig, label: str | None = None) -> Any:
    """A Ray Train callback that prints epoch_line for every report, naming the run `label` (default: the
    model). It runs in the Train controller, whose output Ray forwards to the driver's console."""
    import ray.train

    name = label or config.model

    class EpochPrinter(ray.train.UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                print(epoch_line(name, config.epochs, metrics[0]), flush=True)

    return EpochPrinter()


def fit(config: TrainConfig) -> TrainResult:
    """Train with a TorchTrainer, printing a line per epoch; re-running with the same --name and --out
    resumes the run. Raises storage.InUse while another process trains the same run (its checkpoints
    would interleave with this one's, and what this one took for an interrupted run's debris is the
    other's work)."""

    import ray

    from cxrcore.data.ingest import reading
    from cxrcore.runtime import init_ray

    if config.gpu:
        check_local_gpus(config.workers, config.address)
    with writing(config), reading(config.data):  # an ingest into --data is refused until the run ends
        if not ray.is_initialized():  # a notebook's first call: what fails it fails before Ray's start
            check_dataset(config.data)
            check_hub(config.model, config.pretrained)
        init_ray(config.address)  # a library caller's too: cxr's local cluster (a no-op once Ray runs)
        if config.workers >= 1:
            if ray.is_initialized() and (
                note := worker_fit_note(config, ray.cluster_resources(), ray.available_resources())
            ):
                print(f"note: {note}", flush=True)
            return _fit(config)
        with torch_state_kept():  # the loop runs in this process: a notebook keeps its threads and seed
            result = _fit(config)
        print(f"note: {IN_PROCESS_NOTE}", flush=True)  # said by `cxr train` and a notebook's fit alike
        return result


IN_PROCESS_NOTE = "--workers 0 trained in this process and keeps no checkpoint; use 1 or more to keep one"


@contextmanager
def torch_state_kept() -> Iterator[None]:
    """Restore torch's thread count and the random states (torch's, numpy's, Python's) after training in
    this process (--workers 0), which sets them as a worker does: a notebook's later inference had run on
    one thread, and its seeded draws came out otherwise."""
    import random

    import numpy as np
    import torch

    threads, state = torch.get_num_threads(), torch.get_rng_state()
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _patience_ran_out(config: TrainConfig, result: Any) -> bool:
    """Whether `--patience` had run out at the run's latest checkpoint (by its card's history): a run
    re-run with a patience that ran out before trains nothing, and Ray's result then holds the metrics of
    that checkpoint, which has no `stopped_early` of its own."""
    from cxrcore.checkpoint import load_card
    from cxrcore.data import storage
    from cxrcore.train.loop import patience_ran_out

    if not config.patience or result.checkpoint is None:
        return False
    latest = storage.uri(result.checkpoint.filesystem, result.checkpoint.path)
    try:
        history = load_card(latest).history
    except (FileNotFoundError, ValueError):
        return False
    return patience_ran_out(list(history), config.patience) is not None


def writing(config: TrainConfig) -> AbstractContextManager[None]:
    """Held while a run trains into its folder: another one of that folder fails at once."""
    from cxrcore.data import storage

    run_dir = f"{config.out.rstrip('/')}/{config.run_name()}"
    return storage.exclusive(run_dir, "a training run", "another --name or --out")


def _fit(config: TrainConfig) -> TrainResult:
    from ray.train.v2.api.exceptions import TrainingFailedError

    from cxrcore.checkpoint import drop_resume_state
    from cxrcore.data import storage
    from cxrcore.train.loop import TrainingDiverged

    trainer = build_trainer(config, callbacks=[epoch_printer(config)])
    try:
        with sigint_handler_kept():
            result = trainer.fit()
    except SystemExit as exc:  # Ray Train's SIGINT handler aborts the run, then exits the driver
        raise Interrupted(
            "training stopped; run the same command again to resume it after its last saved checkpoint"
        ) from exc
    except TrainingFailedError as exc:  # its one line, not Ray's traceback of every worker
        if (full := storage_error(exc)) is not None:  # a full disk, quota or `ulimit -f`
            where = full.filename or f"{config.out.rstrip('/')}/{config.run_name()}"  # pyarrow's name none
            raise OSError(
                full.errno, f"{storage_reason(full)} while the run trained; once there is room, run the "
                "same command again: it resumes after its last recorded epoch", where,
            ) from exc  # fmt: skip
        failures = getattr(exc, "worker_failures", None) or {}  # a WorkerGroupError's; a blown-up run
        diverged = [e for e in failures.values() if isinstance(root_cause(e), TrainingDiverged)]
        if not diverged:
            raise
        raise ConfigError(f"{root_cause(diverged[0])} (this run's: {config.lr:g})") from exc
    except TrainingDiverged as exc:  # --workers 0: the loop ran in this process
        raise ConfigError(f"{exc} (this run's: {config.lr:g})") from exc
    reached = (result.metrics or {}).get("epoch", 0)
    stopped = (result.metrics or {}).get(STOPPED_EARLY) or _patience_ran_out(config, result)  # as asked
    if config.workers >= 1 and result.error is None and reached < config.epochs and not stopped:
        # Ray Train's SIGINT handler also ends a run this way: aborted, its result that of the last
        # checkpoint, no error.
        raise Interrupted(
            f"training stopped after epoch {reached} of {config.epochs}; run the same command again to "
            "resume it after its last saved checkpoint"
        )
    best, best_metrics = best_by_validation(kept_checkpoints(result), lambda kept: kept[1]) or (None, {})
    if config.workers < 1:
        # Ray Train's local mode ran the loop in this process; the folders its reports name are temporary
        # and gone by now, so there is no checkpoint to hand on (the metrics stand).
        return TrainResult(None, None, None, dict(result.metrics or {}), dict(best_metrics))
    if result.checkpoint is not None:  # the run resumes from its latest checkpoint only
        drop_resume_state(
            storage.uri(kept.filesystem, kept.path)
            for kept, _ in kept_checkpoints(result)
            if kept.path != result.checkpoint.path
        )
    # Ray gives paths within the storage filesystem ("bucket/runs/..."): the URIs a user can pass on.
    return TrainResult(
        run_dir=storage.uri(result.filesystem, result.path),
        best_checkpoint=storage.uri(best.filesystem, best.path) if best else None,
        latest_checkpoint=storage.uri(result.checkpoint.filesystem, result.checkpoint.path)
        if result.checkpoint
        else None,
        metrics=dict(result.metrics or {}),
        best_metrics=dict(best_metrics),
    )


def kept_checkpoints(result: Any) -> list[tuple[Any, dict[str, Any]]]:
    """Every checkpoint Ray Train kept for a finished run, with its metrics: the best `num_to_keep` by
    val_score (`result.best_checkpoints`) and the latest, which Train keeps to resume from also when it
    ranks lower and which `best_checkpoints` then leaves out.

    The latest can be the best by validation: within one validation image of the top score and with the
    lowest loss. `Result.from_path(run)` lists it too, so `cxr train` and `cxr tune` (which reads runs
    back that way) choose the best checkpoint of a run among the same ones.
    """
    kept = [(checkpoint, dict(metrics)) for checkpoint, metrics in result.best_checkpoints or []]
    latest = result.checkpoint
    if latest is not None and all(checkpoint.path != latest.path for checkpoint, _ in kept):
        kept.append((latest, dict(result.metrics or {})))
    return kept


def _check_segmenter(directory: str) -> None:
    from cxrcore.checkpoint import load_card

    try:
        task = load_card(directory).input_spec.get("task")
    except FileNotFoundError as exc:
        raise ConfigError(f"--segmenter: {exc}") from exc
    if task != "segment":
        raise ConfigError(f"--segmenter: {directory} holds a {task} model, not a lung segmenter (unet)")


def _pixel_bytes(dataset: str, splits: tuple[str, ...]) -> int:
    """Bytes of image and mask pixels in `splits` of a finished dataset, from its report."""
    from cxrcore.data.ingest import read_report

    report = read_report(dataset)
    rows = sum(int(report["by_split"].get(split, 0)) for split in splits)
    return rows * 2 * int(report["config"]["size"]) ** 2


SEGMENT_BATCH = 64
"""Images the segmenter pre-pass (`_segments_once`) takes at a time, run as passes of `PassSizes`'s choice:
the U-Net at 128 px on the task's one thread ran 8.4 images/s as one pass of 64, 11.5 as passes of 2."""


def _segments_once(config: TrainConfig, image_size: int) -> Any:
    """A function giving a batch the segmenter's mask for every image, where a CPU run of a dual-channel
    model trains on them (--train-masks segmenter); else None.

    The workers would otherwise run the U-Net on every batch of every epoch (`prepare_batch` with
    served_masks), the same masks each time: a third of a CPU run of dual_cnn at 64 px. The masks are
    made as there (the image resized to the model's input size, the mask at that size), so the workers
    read them as the dataset's.
    """
    from cxrcore.models import get_model_entry

    spec = get_model_entry(config.model).input_spec
    if config.gpu or not config.segmenter or config.train_masks != "segmenter" or "mask" not in spec.channels:
        return None
    import numpy as np
    import torch

    from cxrcore.data.batches import to_unit
    from cxrcore.inference import PassSizes, in_passes
    from cxrcore.segmenter import load_mask_source

    source = load_mask_source(config.segmenter)
    sizes = PassSizes(SEGMENT_BATCH)  # the U-Net's pass size, found on the first batches of a task

    def segment(batch: dict[str, Any]) -> dict[str, Any]:
        images = torch.tensor(batch["image"])  # a copy: Ray Data's batches may be read-only
        masks = []
        for start in range(0, len(images), SEGMENT_BATCH):
            units = to_unit(images[start : start + SEGMENT_BATCH], image_size)

            def passes(size: int, units: torch.Tensor = units) -> torch.Tensor:
                return in_passes(source, units, size)

            masks.append((sizes.run(passes, len(units))[:, 0] * 255).to(torch.uint8).numpy())
        return {**batch, "mask": np.concatenate(masks), "has_mask": np.ones(len(images), dtype=bool)}

    return segment


def _in_memory_split(dataset: str, split: str, segmenting: bool, blocks: int, segment: Any = None) -> Any:
    """One split read by this process (pyarrow, no Ray tasks) and handed to Ray Data as `blocks` in-memory
    blocks: the rows and columns `read_split` gives, with masked rows only for a segmenter, and the
    segmenter's masks where `segment` (from _segments_once) is given.

    `from_blocks` takes the blocks' metadata here; `from_arrow` would run a Ray task per block for it, in
    worker processes that import Ray Data first (~2 CPU-seconds each), for both splits of every run."""
    import itertools

    import numpy as np
    import ray
    from ray.data.block import BlockAccessor

    from cxrcore.data.ingest import PIXEL_COLUMNS, read_table, tensor_column
    from cxrcore.train.loop import TRAIN_COLUMNS

    table = read_table(dataset, TRAIN_COLUMNS, split=split)
    batch = {
        name: tensor_column(table.column(name).to_pylist())
        if name in PIXEL_COLUMNS
        else table.column(name).to_numpy()
        for name in TRAIN_COLUMNS
    }
    if segmenting:
        batch = _with_mask(batch)
    if segment is not None and len(batch["label_index"]):
        batch = segment(batch)
    rows = len(batch["label_index"])
    bounds = np.linspace(0, rows, max(1, min(blocks, rows)) + 1).astype(int)
    return ray.data.from_blocks(
        [
            BlockAccessor.batch_to_block({name: column[start:end] for name, column in batch.items()})
            for start, end in itertools.pairwise(bounds)
        ]
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
