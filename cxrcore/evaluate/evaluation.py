"""Offline evaluation of a model on a dataset, through the same Predictor (and temperature) as Serve."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from cxrcore.config import ConfigError, EvaluateConfig
from cxrcore.data.storage import name_the_place
from cxrcore.registry import ModelRegistry, RegistryError, report_metrics

if TYPE_CHECKING:
    from cxrcore.evaluate.external import DatasetRelation
    from cxrcore.inference import Predictor

log = logging.getLogger(__name__)
# A source needs this many test images before its own results mean anything.
MIN_SOURCE_IMAGES = 10
_LISTED_VERSIONS = 30
"""An unknown --model lists at most this many of the registry's versions."""


@dataclass(frozen=True)
class EvaluatedModel:
    """The model an evaluation scores, pinned to a local checkpoint folder the way Serve pins it."""

    ref: str
    """"cnn_lstm:3" for a registry version, else the checkpoint folder."""
    checkpoint: Path
    """a local copy: the folder itself, or this machine's cached copy of a remote one."""
    segmenter: str | None
    """the U-Net folder for missing masks (None: the Predictor takes the card's)."""
    report: str | None
    """the evaluation report registered with the version (folder or URI): its test figures."""
    location: str = ""
    """where the checkpoint is kept (the version's folder or URI, or --checkpoint): what reports name."""


def resolve_model(config: EvaluateConfig) -> EvaluatedModel:
    """The checkpoint folder of --checkpoint, or of the registry version --model names.

    A registry version's segmenter is resolved as Serve resolves it: the card's folder where it exists
    here, else a version of the same registry.
    """
    from cxrcore.checkpoint import local_checkpoint_dir
    from cxrcore.data import storage
    from cxrcore.registry import REPORT_NAME

    if config.model is None:
        location = str(config.checkpoint)
        filesystem, path = storage.resolve(location)
        if filesystem.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(
                f"--checkpoint {location}: no such folder (name a registry version with "
                "--model REF --registry REG, e.g. --model production)"
            )
        # A registry version folder keeps its report beside the card.
        report: str | None = f"{location.rstrip('/')}/{REPORT_NAME}"
        if filesystem.get_file_info(f"{path}/{REPORT_NAME}").type != pafs.FileType.Directory:
            report = None
        return EvaluatedModel(location, local_checkpoint_dir(location), config.segmenter, report, location)
    registry = ModelRegistry(str(config.registry))
    try:
        version = registry.get(config.model)
    except RegistryError as exc:
        raise RegistryError(_unknown_model(registry, config.model, exc)) from exc
    segmenter = config.segmenter or _registry_segmenter(registry, version.ref, version.card.segmenter)
    checkpoint = registry.local_checkpoint(version.ref)
    return EvaluatedModel(version.ref, checkpoint, segmenter, version.report, version.uri)


def evaluate_checkpoint(config: EvaluateConfig) -> dict[str, Path]:
    """Write metrics.json, plots and report.html for the model `config` names on `config.data`.

    The files are written to `config.out`; where that is a URI (s3://, gs://), to a folder in this
    machine's cache first, then copied there. The paths returned are local either way.

    On data other than the model's own (by the dataset fingerprint on its card) this is an external
    validation: every image by default, masks from the segmenter as Serve makes them, and the
    `external` and `internal_comparison` blocks of cxrcore.evaluate.external. On the test split of its
    own dataset with sources held out at ingest, the `source_holdout` block scores those apart.

    One evaluation at a time writes a folder: a second into the same `--out` (or, for a URI, the same
    local staging folder) fails at once, naming the first (two at once had mixed one's report.html with
    the other's metrics.json, which `cxr models register --report` then accepted).
    """
    from cxrcore.data import storage

    if not storage.is_remote(config.out):
        out = Path(os.path.abspath(config.out))
        with storage.exclusive(str(out), "an evaluation", "another --out"):
            return _evaluate_into(out, config)
    staging = storage.cache_folder("reports").expanduser().joinpath(*storage.cache_key(config.out))
    with storage.exclusive(str(staging), "an evaluation", "another --out"):
        shutil.rmtree(staging, ignore_errors=True)
        paths = _evaluate(replace(config, out=str(staging)))
        storage.upload(staging, config.out)
    return paths


EVALUATION_FILES = ("metrics.json", "report.html", "predictions.csv", "*.png")
"""What an evaluation writes into its folder (the plots' names vary with the model's task)."""


def _evaluate_into(out: Path, config: EvaluateConfig) -> dict[str, Path]:
    """The evaluation written into `out/.partial` first, then moved into `out`: `out` is absent, empty, or
    an earlier evaluation, whose files are replaced only once the new one is complete (an unknown model, a
    wrong device or Ctrl-C leaves it as it was; a plot the new one does not draw goes). Staged inside
    `out`, the moves stay on its filesystem (a volume mounted there, a link to another disk). A folder
    holding anything else is refused: its files would be overwritten or mixed with the evaluation's."""
    staging = out / ".partial"
    held = [path for path in out.iterdir() if path != staging] if out.is_dir() else []
    if held and not ((out / "metrics.json").is_file() and (out / "report.html").is_file()):
        raise ConfigError(
            f"--out {out} holds files that are not an evaluation's; write the evaluation to a new or empty "
            "folder (an earlier evaluation's folder is replaced)"
        )
    created = not out.exists()
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)  # a folder that cannot be written fails now, not after the evaluation
        paths = _evaluate(replace(config, out=str(staging)))
        for path in paths.values():
            path.replace(out / path.name)
        for pattern in EVALUATION_FILES:
            for path in out.glob(pattern):
                if path.name not in {written.name for written in paths.values()}:
                    path.unlink()
    except OSError as exc:
        name_the_place(exc, str(out))
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    return {name: out / path.name for name, path in paths.items()}


def _evaluate(config: EvaluateConfig) -> dict[str, Path]:
    from cxrcore.data.ingest import reading

    with reading(config.data):  # an ingest into --data is refused until the evaluation ends
        return _evaluate_read(config)


def _evaluate_read(config: EvaluateConfig) -> dict[str, Path]:
    from cxrcore.data.ingest import read_table
    from cxrcore.evaluate.external import dataset_relation
    from cxrcore.inference import Predictor

    _check_device(config.device)
    model = resolve_model(config)
    predictor = Predictor.from_checkpoint(model.checkpoint, config.device, segmenter=model.segmenter)
    relation = dataset_relation(config.data, predictor.card)
    split = relation.split(config.split)
    # The rows' labels and names here; their pixels stream by in chunks (PixelChunks), never all at once.
    where = None if split == "all" else split
    frame = read_table(
        config.data, ["has_mask", "label_index", "source", "file", "split", "sha256"], split=where
    ).to_pandas()
    if frame.empty:
        hint = "" if split == "all" else " (--split all scores every image of a dataset)"
        raise ConfigError(f"--split: the {split} split of {config.data} holds no image{hint}")
    segmenting = predictor.spec.task == "segment"
    pixels = PixelChunks(
        config.data, where, len(frame), predictor.base_size, segmenting or predictor.needs_mask
    )
    _check_stored_size(config.data, pixels.stored_size(), predictor)
    if segmenting:
        return _segmentation_report(config, split, predictor, frame, pixels)
    return _classification_report(config, model, predictor, relation, split, frame, pixels)


EVAL_CHUNK_BYTES = 64 * 2**20
"""Pixel bytes (images and masks) `cxr evaluate` holds at a time (512 images and masks at 256 px). Read
whole, a split took about three times its pixels in memory (Arrow, then Python bytes, then arrays): 9.5 GB
for 21,200 images at 256 px. In chunks, a dual-channel model's evaluation peaked at 1.38 GB for 4,000
images and 1.50 GB for 12,000 (0.93 GB for 600; 0.68 GB of it is the imports)."""


class PixelChunks:
    """A split's images (and masks) as (N, S, S) uint8 arrays, chunk by chunk, in read_table's order."""

    def __init__(self, data: str, split: str | None, rows: int, base_size: int, masks: bool) -> None:
        self.data, self.split, self.rows = data, split, rows
        self.columns = ["image", "mask"] if masks else ["image"]
        self.chunk_rows = max(1, EVAL_CHUNK_BYTES // (len(self.columns) * base_size * base_size))

    def stored_size(self) -> int:
        """The side of the images as ingested (the first image's)."""
        from cxrcore.data.ingest import read_chunks, tensor_column

        first = next(read_chunks(self.data, ["image"], self.split, rows=1))
        return int(tensor_column(first.column("image").to_pylist()[:1]).shape[1])

    def __iter__(self) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """(the chunk's rows of the split, its columns as arrays)."""
        from cxrcore.data.ingest import read_chunks, tensor_column

        start = 0
        for table in read_chunks(self.data, self.columns, self.split, rows=self.chunk_rows):
            arrays = {name: tensor_column(table.column(name).to_pylist()) for name in self.columns}
            yield slice(start, start + table.num_rows), arrays
            start += table.num_rows
        if start != self.rows:
            raise RuntimeError(f"{self.data} changed while it was read: {start} rows, then {self.rows}")


def _check_device(device: str) -> None:
    """Refuse a torch device that is not one, or CUDA where none is visible, before any model loads."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ConfigError(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu")


def _check_stored_size(data: str, stored: int, predictor: Any) -> None:
    """Refuse a dataset ingested at another size than the model's: Serve resizes each upload once, from
    its original, to the model's base size; images stored at another size would be resized twice, and
    their scores would describe another input (up to 9 of 130 real X-rays' labels changed, from 128 px)."""
    if stored != predictor.base_size:
        raise ConfigError(
            f"{data} holds images ingested at {stored} px; {predictor.card.name} was trained on data "
            f"ingested at {predictor.base_size} px (then resized to its {predictor.spec.image_size} px "
            "input), and Serve resizes each upload once from its original to that base size. Ingest the data "
            f"again at that size to score the model that is served: cxr data ingest RAW OUT --size "
            f"{predictor.base_size}"
        )


def _classification_report(
    config: EvaluateConfig,
    model: EvaluatedModel,
    predictor: Predictor,
    relation: DatasetRelation,
    split: str,
    frame: Any,
    pixels: PixelChunks,
) -> dict[str, Path]:
    import torch

    from cxrcore import provenance
    from cxrcore.calibration import apply_temperature, calibration_report
    from cxrcore.checkpoint import WEIGHTS_NAME, software_versions
    from cxrcore.data import storage
    from cxrcore.data.ingest import read_report, sources_separate_classes
    from cxrcore.evaluate.comparison import commonest_class_warning
    from cxrcore.evaluate.report import write_evaluation_report
    from cxrcore.inference import BatchedPredictions
    from cxrcore.metrics import classification_metrics

    classes = predictor.card.classes
    has_mask = frame["has_mask"].to_numpy(dtype=bool)
    labels = frame["label_index"].to_numpy()
    needs_mask, has_segmenter = predictor.needs_mask, predictor.segmenter is not None
    if needs_mask and not has_segmenter and not has_mask.all():
        raise ConfigError(
            f"--segmenter: {int((~has_mask).sum())} of {len(has_mask)} images have no lung mask and "
            f"{predictor.card.name} has no segmenter to make one; pass --segmenter U-NET_CHECKPOINT"
        )
    # Serve never receives a mask: score the model the way it is served, the segmenter's mask for every
    # image, on the model's own test split as on data from elsewhere (the ground truth is scored apart).
    as_served = needs_mask and has_segmenter
    batches = BatchedPredictions(predictor, config.batch_size)
    logits_parts, truth_parts, input_scores = [], [], []
    reference = predictor.input_reference
    for rows, chunk in pixels:
        images, chunk_has_mask = chunk["image"], has_mask[rows]
        if reference is not None:  # the images are at the model's base size, as Serve checks them
            input_scores.append(np.stack(reference.unusual(images), axis=1))
        truth = None
        if needs_mask:
            truth = [m if ok else None for m, ok in zip(chunk["mask"], chunk_has_mask, strict=True)]
        # One forward pass: the served (calibrated) probabilities are predict_proba's softmax(logits / T).
        served = [None] * len(images) if as_served else truth
        logits_parts.append(batches.run(predictor.predict_logits, images, served))
        if as_served and has_mask.any():  # a chunk without a mask of its own is scored as served: None
            with_truth = batches.run(predictor.predict_proba, images, truth) if chunk_has_mask.any() else None
            truth_parts.append((rows, with_truth))
    logits = np.concatenate(logits_parts)
    probs = apply_temperature(torch.from_numpy(logits), predictor.temperature).numpy()
    metrics = classification_metrics(labels, probs, classes, with_curves=True)
    extra: dict[str, dict[str, Any]] = {
        # ECE and NLL on this split before (T = 1) and after the card's temperature (fitted on validation).
        "calibration": {"split": split, **calibration_report(logits, labels, predictor.temperature, probs)}
    }
    if truth_parts:
        with_truth = np.concatenate([probs[rows] if part is None else part for rows, part in truth_parts])
        own = int(has_mask.sum())
        extra["with ground-truth masks"] = {
            **classification_metrics(labels, with_truth, classes),
            "note": f"{own} of the {len(labels)} images with the dataset's lung mask"
            + ("" if own == len(labels) else "; the rest with the segmenter's, as served"),
        }
    sources = frame["source"].to_numpy()
    if len(set(sources)) > 1:
        for source in sorted(set(sources)):
            rows = sources == source
            if rows.sum() >= MIN_SOURCE_IMAGES:
                figures = classification_metrics(labels[rows], probs[rows], classes)
                # a source of one class: precision 1 by construction, macro-F1 above the accuracy
                extra[f"source: {source}"] = {**figures, "note": classes_note(figures["per_class"])}
    log.info(
        "accuracy %.3f, macro-F1 %.3f on %d images", metrics["accuracy"], metrics["macro_f1"], len(labels)
    )
    cal = extra["calibration"]
    log.info(
        "temperature %.3f: ECE %.3f -> %.3f, NLL %.3f -> %.3f",
        cal["temperature"], cal["ece_before"], cal["ece_after"], cal["nll_before"], cal["nll_after"],
    )  # fmt: skip
    if cal["note"]:
        log.warning("calibration: %s", cal["note"])
    # on the model's own data, whose class mix it trained on: elsewhere another mix moves the shares too
    weighted = bool(predictor.card.training.get("class_weights"))
    cal["prior_note"] = prior_note(metrics, weighted) if relation.kind == "internal" else None
    # the model's own dataset's ingest report, read once: its held-out sources and its sources' warning
    ingested = read_report(config.data) if relation.kind == "internal" else None
    holdout = _source_holdout(ingested, split, frame, probs, classes)
    masks_used = _masks_used(needs_mask, as_served, int(has_mask.sum()))
    blocks = None
    if relation.kind != "internal":
        scored = (labels, probs)
        blocks = _external_blocks(
            config, model, predictor, relation, split, metrics, scored, masks_used, as_served
        )
    checked = np.concatenate(input_scores) if input_scores else None  # score, pattern distance, unusual
    evaluated = {
        "model": model.ref,
        "checkpoint": model.location,
        # which weights these figures describe: `cxr models register --report` refuses them for others
        "weights_sha256": storage.file_sha256(pafs.LocalFileSystem(), str(model.checkpoint / WEIGHTS_NAME)),
        "dataset": config.data,
        "fingerprint": relation.fingerprint,
        "split": split,
        "relation": relation.kind,
        "note": relation.note(split),
        "masks": masks_used,
        "mask_source": ("segmenter" if as_served else "dataset") if needs_mask else None,
        # which segmenter drew them: `cxr models add-evaluation` refuses another than the version's
        **(_segmenter_used(model, predictor) if needs_mask and has_segmenter else {}),
        "per_source": _per_source_note(sources),
        "classes_note": classes_note(metrics["per_class"]),
        "missed": missed_classes(metrics),  # what the accuracy hides on an imbalanced split
        # accuracy not shown to beat always answering the commonest class (the console's warning, also in
        # the report and here); an external evaluation's verdict says so of its own figures
        "chance": commonest_class_warning(metrics) if relation.kind == "internal" else None,
        # the model's own dataset, whose sources separate classes: its random splits cannot show it
        "sources_separate_classes": sources_separate_classes(ingested) if ingested else None,
        **input_check_notes(checked, reference),
        # when, and by which code: the figures of a report are those of the cxr that computed them
        "evaluated_at": provenance.now(),
        "software": software_versions(),
    }
    name = model.ref if config.model else predictor.card.name
    paths = write_evaluation_report(
        config.out, metrics, history=predictor.card.history, card=_card_summary(predictor.card.to_dict()),
        extra=extra, title=f"{name} on {_dataset_name(config.data)} ({split})", evaluated=evaluated,
        external=blocks, holdout=holdout,
    )  # fmt: skip
    paths["predictions"] = write_predictions(
        Path(config.out) / "predictions.csv", frame, probs, classes, checked
    )
    return paths


UNUSUAL_P = 0.01
"""`cxr evaluate` warns where this few datasets of usual images would hold as many unusual ones (a one-sided
binomial test against the check's expected share): at 1 in 50 expected, 2 unusual images of a 13-image test
split are not enough (p 0.027), 8 of 130 are (p 0.005)."""


def input_check_notes(checked: np.ndarray | None, reference: Any) -> dict[str, Any]:
    """`evaluated`'s record of the input check (`cxrcore.inputcheck`): the counts (`input_check_counts`:
    images, unusual, the share expected of usual images, and the binomial p of as many), a sentence, and a
    warning where so many unusual images are unlikely among usual ones (p < UNUSUAL_P).

    >>> from types import SimpleNamespace
    >>> rows = np.array([[0.1, 1, 0], [0.2, 1, 0], [0.9, 1, 1], [0.95, 1, 1]])
    >>> notes = input_check_notes(rows, SimpleNamespace(summary={"expected_share": 0.02}))
    >>> notes["input_check"]
    '2 of 4 images (50.0 %) unusual, where about 2.0 % of images like the training ones are'
    >>> notes["input_check_counts"]["p_value"], notes["unusual_inputs"][:50]
    (0.00234, '2 of 4 images (50.0 %) are unlike the images the m')
    >>> input_check_notes(None, None)["input_check"] is None
    True
    """
    if checked is None or reference is None or not len(checked):
        return {"input_check": None, "unusual_inputs": None, "input_check_counts": None}
    from cxrcore.inputcheck import QUANTILE
    from cxrcore.metrics import binomial_tail

    images, unusual = len(checked), int(checked[:, 2].sum())
    expected = float(reference.summary.get("expected_share") or 1 - QUANTILE)
    p_value = binomial_tail(unusual, images, expected)
    counted = f"{unusual} of {images} images ({100 * unusual / images:.1f} %)"
    warning = None
    if p_value < UNUSUAL_P:
        warning = (
            f"{counted} are unlike the images the model trained on (its input check, which about "
            f"{100 * expected:.1f} % of images like them fail; as many by chance: p = {p_value:.2g}): these "
            "figures describe pictures unlike those it was made for (another site, population, view, crop "
            "or modality, or not chest X-rays); the `input_unusual` column of predictions.csv names them"
        )
    return {
        "input_check": f"{counted} unusual, where about {100 * expected:.1f} % of images like the training "
        "ones are",
        "unusual_inputs": warning,
        "input_check_counts": {
            "images": images,
            "unusual": unusual,
            "expected_share": expected,
            "p_value": float(f"{p_value:.3g}"),  # 3 significant digits: 4 decimals wrote a tiny p as 0
        },
    }


def write_predictions(
    path: Path, frame: Any, probs: np.ndarray, classes: Sequence[str], checked: np.ndarray | None = None
) -> Path:
    """predictions.csv: each evaluated image's file, source, split and sha256, true and predicted class,
    and the served (calibrated) probability of every class, in the split's order: every figure of
    metrics.json can be recomputed, or audited image by image, without running the model again. `split`
    tells the splits of `--split all` apart; `sha256` (the dataset's content hash) joins the rows to the
    dataset or to another model's predictions, where a file name may repeat across classes or sources."""
    import pandas as pd

    labels = frame["label_index"].to_numpy()
    predicted = probs.argmax(axis=1)
    table = pd.DataFrame(
        {
            "file": frame["file"].to_numpy(),
            "source": frame["source"].to_numpy(),
            **{key: frame[key].to_numpy() for key in ("split", "sha256") if key in frame},
            "label": [classes[k] for k in labels],
            "predicted": [classes[k] for k in predicted],
            "correct": predicted == labels,
            **{f"p_{name}": probs[:, k] for k, name in enumerate(classes)},
            # the input check of each image (`cxrcore.inputcheck`), where the model has a reference
            **(
                {
                    "input_score": checked[:, 0],
                    "input_pattern_distance": checked[:, 1],
                    "input_unusual": checked[:, 2].astype(bool),
                }
                if checked is not None
                else {}
            ),
        }
    )
    table.to_csv(path, index=False, float_format="%.6g")
    return path


def classes_note(per_class: Mapping[str, Mapping[str, Any]]) -> str | None:
    """What the macro averages mean where the split lacks a class (None where it holds every class).

    They average the classes present (an absent class has no recall, and a model that never predicts it
    should not be marked down for it), so a reader comparing them with a full split's must be told. With
    one class present, precision is 1 by construction (no image of another class can be called this one)
    and macro-F1 is only 2·recall / (1 + recall): the recall is the figure.

    >>> classes_note({"A": {"support": 3, "recall": 0.5}, "B": {"support": 0, "recall": 0.0}})[:34]
    'Only A images here: its precision '
    """
    present = [name for name, row in per_class.items() if row["support"]]
    absent = [name for name, row in per_class.items() if not row["support"]]
    if not absent or not present:
        return None
    if len(present) == 1:
        recall = per_class[present[0]]["recall"]
        if not recall:  # never called: its precision is 0/0, counted as 0
            return (
                f"Only {present[0]} images here, and the model called none of them {present[0]}: its recall "
                "(sensitivity) and F1 are 0, and its precision is 0/0 (shown as -, counted as 0)."
            )
        return (
            f"Only {present[0]} images here: its precision is 1 by construction and macro-F1 is "
            f"2·recall / (1 + recall); read the recall (sensitivity), {recall:.2f}."
        )
    return (
        f"Macro averages (precision, recall, F1, AUROC) are over the {len(present)} of {len(per_class)} "
        f"classes this split holds: it has no {', '.join(absent)} image."
    )


PRIOR_RATIO = 1.5
"""A class whose mean served probability is this many times its share of the images (or as many times
below it), and at least PRIOR_GAP apart, gets prior_note's sentence."""
PRIOR_GAP = 0.03


def prior_note(metrics: Mapping[str, Any], class_weights: bool) -> str | None:
    """Where a model trained with class weights serves probabilities that stand far from the classes'
    shares of the evaluated images: which classes, and why. None otherwise.

    The weighted loss trains the model as if every class were equally common, so a rare class's
    probabilities come out higher than its share of the data makes it (about weight times), a common one's
    lower: good for finding the rare class, misleading if read as the chance at the data's own mix. One
    temperature cannot undo a per-class lift.

    >>> prior_note({"n": 100, "per_class": {"A": {"support": 94, "mean_probability": 0.84},
    ...             "B": {"support": 6, "mean_probability": 0.16}}}, class_weights=True)[:72]
    'B: served probability 0.160 on average against a share of 0.060 (2.7×); '
    """
    if not class_weights or not metrics.get("n"):
        return None
    n = int(metrics["n"])
    apart = []
    for name, row in metrics["per_class"].items():
        share, mean = row["support"] / n, row.get("mean_probability")
        if mean is None or not row["support"]:
            continue
        ratio = mean / share
        if abs(mean - share) >= PRIOR_GAP and not 1 / PRIOR_RATIO < ratio < PRIOR_RATIO:
            apart.append(f"{name}: served probability {mean:.3f} on average against a share of {share:.3f} "
                         f"({ratio:.1f}×)")  # fmt: skip
    if not apart:
        return None
    return (
        "; ".join(apart) + "; trained with class weights (the default), the model answers as if every class "
        "were equally common, which lifts a rare class's probabilities and lowers a common one's. Read them "
        "as scores for a balanced mix, or train with --no-class-weights for probabilities at the data's own "
        "mix (README: Class weights and probabilities)"
    )


def missed_classes(metrics: Mapping[str, Any]) -> str | None:
    """The classes the split holds that the model never finds (recall 0) or never answers, in a sentence;
    None where it finds some of each. On an imbalanced split a model can score a fair accuracy while
    missing a rare class entirely.

    >>> missed_classes({"per_class": {"A": {"support": 9, "recall": 1.0}, "B": {"support": 4, "recall": 0.0}},
    ...                 "confusion_matrix": [[9, 0], [4, 0]]})[:59]
    'finds no image of B (0 of 4), and never answers B (its prec'
    """
    predicted = [sum(column) for column in zip(*metrics["confusion_matrix"], strict=True)]
    missed = [
        (name, int(row["support"]), count == 0)
        for (name, row), count in zip(metrics["per_class"].items(), predicted, strict=True)
        if row["support"] and not row["recall"]
    ]
    if not missed:
        return None
    found = ", ".join(f"{name} (0 of {support})" for name, support, _ in missed)
    text = f"finds no image of {found}"
    never = [name for name, _, never in missed if never]
    if never:
        its = "its precision, 0/0" if len(never) == 1 else "their precisions, 0/0"
        text += f", and never answers {' or '.join(never)} ({its}, shown as -, counts as 0 in the macro)"
    return text


def _per_source_note(sources: np.ndarray) -> str | None:
    """Which sources have a section of their own (MIN_SOURCE_IMAGES or more images) and which are too few to
    score apart, by name; None for a split of one source."""
    counts = Counter(sources.tolist())
    if len(counts) < 2:
        return None
    scored = {source: n for source, n in sorted(counts.items()) if n >= MIN_SOURCE_IMAGES}
    small = {source: n for source, n in sorted(counts.items()) if n < MIN_SOURCE_IMAGES}
    parts = [f"{len(scored)} source(s) scored apart below ({sum(scored.values())} images)"]
    if small:
        listed = ", ".join(f"{source} {n}" for source, n in small.items())
        few = f"{len(small)} with fewer than {MIN_SOURCE_IMAGES} images each not"
        parts.append(f"{few} ({sum(small.values())} images: {listed})")
    return "; ".join(parts)


def _source_holdout(
    own: dict[str, Any] | None, split: str, frame: Any, probs: np.ndarray, classes: list[str]
) -> dict[str, Any] | None:
    """The `source_holdout` block where ingest held sources out of the model's own dataset (`own`: its
    ingest report; None for any other dataset) and its test split is scored, else None.

    Only the model's own dataset: another dataset's held-out sources say nothing of what this model saw.
    """
    if own is None or split != "test":
        return None
    from cxrcore.evaluate.external import source_holdout

    test_sources = own.get("test_sources")
    if not test_sources:
        return None
    labels, sources = frame["label_index"].to_numpy(), frame["source"].to_numpy()
    block = source_holdout(labels, probs, sources, test_sources, classes)
    log.info("%s", block["verdict"])
    return block


def _external_blocks(
    config: EvaluateConfig,
    model: EvaluatedModel,
    predictor: Predictor,
    relation: DatasetRelation,
    split: str,
    metrics: dict[str, Any],
    scored: tuple[np.ndarray, np.ndarray],
    masks_used: str,
    as_served: bool,
) -> dict[str, dict[str, Any]]:
    """metrics.json's `external` and `internal_comparison` blocks for an evaluation on data from elsewhere.

    `scored`: the labels and served probabilities of the evaluated rows, in read_table's order; where
    some copy the model's train or val images, the others are scored apart (`external.unseen`)."""
    from cxrcore.evaluate.external import (
        compare_with_internal,
        external_block,
        internal_reference,
        training_overlap_rows,
        unseen_figures,
    )

    card = predictor.card
    overlap, seen = training_overlap_rows(card, config.data, split, model.checkpoint)
    external = external_block(
        metrics,
        dataset=config.data,
        split=split,
        relation=relation,
        overlap=overlap,
        temperature=predictor.temperature,
        masks=masks_used,
    )
    if seen is not None and seen.any():
        external["unseen"] = unseen_figures(*scored, seen, card.classes)
    reference = internal_reference(card, report_metrics(model.report), predicted_masks=as_served)
    comparison = compare_with_internal(
        external, reference, card.classes, metrics["ece"], metrics.get("ece_floor")
    )
    log.info("%s", comparison["verdict"])
    return {"external": external, "internal_comparison": comparison}


def _masks_used(needs_mask: bool, as_served: bool, with_mask: int) -> str:
    """Which lung masks the headline figures were computed with, in words for the report."""
    if not needs_mask:
        return "none: the model reads the image alone"
    if not as_served:
        return "the dataset's ground-truth masks: the model has no segmenter, so Serve cannot serve it as is"
    scored_apart = (
        f"; scored apart with the dataset's {with_mask} ground-truth masks instead "
        "('with ground-truth masks', the segmenter's for the images without one)"
    )
    return "from the model's segmenter for every image, as Serve makes them" + (
        scored_apart if with_mask else ""
    )


def _registry_segmenter(registry: ModelRegistry, ref: str, segmenter: str | None) -> str | None:
    """A card's segmenter as a local folder: the folder itself (a URI's cached copy), else a version of
    the same registry."""
    if segmenter is None:
        return None
    try:
        return str(registry.segmenter_checkpoint(segmenter, of=ref))
    except RegistryError as exc:
        raise FileNotFoundError(
            f"{ref}'s segmenter cannot be used here: {exc}. Copy the registered segmenter's version into "
            f"the registry {registry.root} to score the model as it serves; --segmenter U-NET_CHECKPOINT "
            "scores it with another one (the evaluation names which, and cannot be added to the version)"
        ) from exc


def _segmenter_used(model: EvaluatedModel, predictor: Predictor) -> dict[str, Any]:
    """The segmenter an evaluation read its masks from: its folder and the sha256 of its weights."""
    from cxrcore.checkpoint import WEIGHTS_NAME, local_checkpoint_dir
    from cxrcore.data import storage

    folder = model.segmenter or predictor.card.segmenter
    if not folder:
        return {}
    try:
        weights = local_checkpoint_dir(folder) / WEIGHTS_NAME
        digest = storage.file_sha256(pafs.LocalFileSystem(), str(weights))
    except OSError:  # a registry reference the Predictor resolved otherwise: named, not hashed
        digest = None
    return {"segmenter": str(folder), "segmenter_weights_sha256": digest}


def _unknown_model(registry: ModelRegistry, ref: str, error: RegistryError) -> str:
    """The registry's own message, with the registry and every version it holds (aliases beside them)."""
    versions = registry.versions()
    if not versions:
        return f"--model {ref}: {error}"  # names the registry and says it is empty
    listed = [
        v.ref + (f" ({', '.join(v.aliases)})" if v.aliases else "") for v in versions[:_LISTED_VERSIONS]
    ]
    more = f" and {len(versions) - _LISTED_VERSIONS} more" if len(versions) > _LISTED_VERSIONS else ""
    return f"--model {ref}: {error}. The registry {registry.root} holds {', '.join(listed)}{more}"


def _dataset_name(location: str) -> str:
    return location.rstrip("/").rpartition("/")[2] or location


def _segmentation_report(
    config: EvaluateConfig, split: str, predictor: Predictor, frame: Any, pixels: PixelChunks
) -> dict[str, Path]:
    from cxrcore.evaluate.report import (
        ReportSection,
        facts_table,
        html_table,
        plot_training_curves,
        training_curves_section,
        write_html_report,
    )
    from cxrcore.inference import BatchedPredictions
    from cxrcore.metrics import segmentation_metrics

    has_mask = frame["has_mask"].to_numpy(dtype=bool)
    if not has_mask.any():
        raise ValueError(f"no image in the {split} split has a ground-truth mask to compare against")
    batches = BatchedPredictions(predictor, config.batch_size)
    sums = {"dice": 0.0, "iou": 0.0}
    for rows, chunk in pixels:  # the mean Dice and IoU per image, summed chunk by chunk
        keep = has_mask[rows]
        if keep.any():
            predicted = batches.run(predictor.segment, chunk["image"][keep])
            scored = segmentation_metrics(predicted, chunk["mask"][keep], threshold=127)
            sums = {name: total + scored[name] * scored["n"] for name, total in sums.items()}
    n = int(has_mask.sum())
    metrics = {
        "dice": sums["dice"] / n,
        "iou": sums["iou"] / n,
        "n": n,
        "split": split,
        "dataset": config.data,
    }
    card = predictor.card.to_dict()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json"}
    paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    sections = [
        ReportSection("Model card", table=facts_table(_card_summary(card))),
        ReportSection("Segmentation", html=html_table([metrics])),
    ]
    if card["history"]:
        paths["training_curves"] = plot_training_curves(card["history"], out / "training_curves.png")
        sections.append(training_curves_section(paths["training_curves"], card["history"]))
    paths["report"] = write_html_report(out / "report.html", f"{predictor.card.name} on {split}", sections)
    return paths


def _card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """The card without its bulky parts (history is plotted, metrics are tabulated). Its `epoch` counts
    from 0 in card.json; shown from 1, as the history, the training curves and the epoch lines count."""
    summary = {k: v for k, v in card.items() if k not in ("history", "metrics")}
    if isinstance(summary.get("epoch"), int):
        summary["epoch"] = f"{summary['epoch'] + 1} (card.json: {summary['epoch']}, counted from 0)"
    if "calibration" in summary:  # the fit's figures, on the split it was fitted on: not this evaluation's
        summary["calibration (fitted on the validation split)"] = summary.pop("calibration")
    return summary
