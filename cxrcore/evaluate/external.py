"""External validation: how a model scores on data it was not trained on, beside its own internal figures.

A model that scores 0.93 on a random split of its own database can still be reading the hospital rather
than the lungs, and collapse on another hospital's images. `cxr evaluate` tells the two situations apart
by the dataset fingerprint on the model's card, and on other data writes two blocks into metrics.json:

- `external`: which dataset and images, the classes present, predictions of classes the data does not
  hold, one-vs-rest sensitivity and specificity at the served operating point, and whether any image is
  a pixel-exact copy of one in the model's own dataset;
- `internal_comparison`: the model's internal figures (its registered test report, else its card's
  validation metrics) beside the external ones, and `large_drop` when they fall by LARGE_DROP or more.

On its own dataset, when ingest held sources out (`--test-sources`), the test split holds both kinds of
image, and `source_holdout` scores them apart: the random split (sources training saw) beside the held-out
sources, with the same LARGE_DROP flag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrcore.metrics import (
    accuracy_interval,
    classification_metrics,
    confusion_scores,
    difference_interval,
    is_test_report,
    one_vs_rest,
    wilson_interval,
)

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from cxrcore.checkpoint import ModelCard

LARGE_DROP = 0.10
"""The absolute fall in accuracy or macro-F1, internal to external, that the report calls large.

A flag to look at, not a statistical test. On a few hundred internal test images the sampling error of
an accuracy near 0.9 is about ±0.03, and a model that reads the lungs typically moves a few points
between sites; a tenth more of the cases misclassified is beyond both, and is the scale of the collapses
published for COVID-19 X-ray models on other hospitals' data (DeGrave et al. 2021). The external
accuracy's 95% interval is printed beside it, because external sets are often small.
"""
LARGE_DROP_REASON = (
    f"A fall of {LARGE_DROP:.2f} or more (absolute) in accuracy or macro-F1 is called large. Sampling "
    "error on a few hundred internal test images is about ±0.03, and a model that reads the lungs "
    "typically moves a few points between sites; a tenth more of the cases misclassified is beyond both, "
    "and is the scale of the collapses published for COVID-19 X-ray models on other hospitals' data."
)
"""LARGE_DROP's reason, as the report states it."""
COMPARED = ("accuracy", "macro_f1")
"""The figures whose drop is flagged: what a reader of "internal 0.93 → external 0.61" compares."""
_FLOAT_SLACK = 1e-9
_SIDE_FIGURES = ("accuracy", "accuracy_ci95", "macro_f1", "confusion_matrix")
"""What each side of a source hold-out records beside its sources and counts (None on an empty side)."""


@dataclass(frozen=True)
class DatasetRelation:
    """How the evaluated dataset relates to the one the model was trained on (by ingest fingerprint).

    kind is "internal" (the same dataset), "external" (another one) or "unknown" (the card records no
    fingerprint, so nothing tells them apart: treated as external, evaluated on its test split).
    """

    kind: str
    fingerprint: str | None
    trained_on: Mapping[str, Any]
    ancestor: str | None = None
    """where the data is that of a checkpoint the model was fine-tuned from (`data.pretrained_from`, at any
    depth): that checkpoint, which trained on some of these images"""

    def split(self, requested: str) -> str:
        """What `auto` means: the test split of the model's own dataset (or if unknown), else every image."""
        if requested != "auto":
            return requested
        return "all" if self.kind == "external" else "test"

    def note(self, split: str) -> str | None:
        """A warning when the images scored on the model's own dataset are not unseen ones, or are the
        dataset of the checkpoint it was fine-tuned from."""
        if self.ancestor is not None and split in ("all", "train", "val"):
            return (
                f"scores the dataset of {self.ancestor}, the checkpoint the model was fine-tuned from, which "
                "trained on its train split: not a clean external validation (score its test split, "
                "--split test, for images neither model trained on)"
            )
        if self.kind != "internal":
            return None
        if split in ("all", "train"):
            return "includes images the model was trained on: not a measure of how it generalises"
        if split == "val":
            return "scores the validation split, which chose this checkpoint and its temperature: optimistic"
        return None


def dataset_relation(data: str, card: ModelCard) -> DatasetRelation:
    """Compare the fingerprint of `data` (its ingest report) with the one on the model's card."""
    trained_on = dict(card.data)
    if not trained_on.get("fingerprint"):
        return DatasetRelation("unknown", None, trained_on)
    from cxrcore.data.ingest import read_report

    fingerprint = str(read_report(data)["fingerprint"])
    kind = "internal" if fingerprint == trained_on["fingerprint"] else "external"
    ancestor, lineage = None, trained_on.get("pretrained_from")
    while kind == "external" and isinstance(lineage, Mapping) and ancestor is None:
        if lineage.get("dataset_fingerprint") == fingerprint:
            ancestor = str(lineage.get("version") or lineage.get("checkpoint"))
        lineage = lineage.get("pretrained_from")
    return DatasetRelation(kind, fingerprint, trained_on, ancestor)


def training_overlap(
    card: ModelCard, data: str, split: str, checkpoint: str | Path | None = None
) -> dict[str, Any]:
    """How many evaluated images are copies of images in the model's own dataset, per split of it
    (training_overlap_rows without the rows)."""
    return training_overlap_rows(card, data, split, checkpoint)[0]


def training_overlap_rows(
    card: ModelCard, data: str, split: str, checkpoint: str | Path | None = None
) -> tuple[dict[str, Any], np.ndarray | None]:
    """How many evaluated images are copies of images in the model's own dataset, per split of it, and
    which rows (in read_table's order) copy one of its train or val images: None where not checked.

    The model's images are read from the data manifest its registry version keeps (in `checkpoint`, the
    version's folder or its local copy; cxrcore.data.manifest), which holds wherever the model is taken
    and however its dataset changed since; else from the dataset its card names, where it is readable
    here and has not been ingested again since.

    A copy is pixel-exact (ingest hashes the decoded pixels before resizing, so this holds across base
    sizes, splits and file names) or near: within the perceptual-hash distance ingest keeps in one split
    (`near_duplicate_bits` of the model's dataset), which finds the same X-ray re-encoded as a JPEG,
    resized, re-windowed or exported by another viewer. Public sets share images that way: the Kaggle
    database took its Viral Pneumonia images and part of its Normal ones from the pediatric (Kermany) set,
    which ships them as JPEG. A copy in train or val means the external figures are not external for it.
    """
    from cxrcore.data.ingest import phash_of, read_report, read_table
    from cxrcore.data.manifest import ManifestError, read_manifest

    source = card.data.get("dataset")
    problem = None  # the manifest's, where one is recorded but cannot be used: the dataset is read instead
    try:
        manifest = read_manifest(checkpoint, card.data) if checkpoint is not None else None
    except ManifestError as exc:
        manifest, problem = None, f"its data manifest {exc}"
    if manifest is not None:
        own = {
            name: np.asarray(manifest[name].to_pylist())
            for name in ("sha256", "phash", "split")
            if name in manifest.column_names
        }
        block = card.data["manifest"]
        bits = int(block.get("near_duplicate_bits", NEAR_DUPLICATE_BITS))
        own_hashing = phash_of(block)
        return _overlap_summary(card, source, own, own_hashing, data, split, bits, manifest=True)
    unchecked: dict[str, Any] = {"checked": False, "dataset": source}
    if problem:
        unchecked["manifest_problem"] = problem
    if not source:
        reason = "the model's card names no training dataset"
        return {**unchecked, "reason": f"{problem}; and {reason}" if problem else reason}, None
    try:
        report = read_report(str(source))
        own = _hashes(read_table, str(source), None)
        bits = int(report.get("config", {}).get("near_duplicate_bits", NEAR_DUPLICATE_BITS))
    except (OSError, ValueError) as exc:  # missing here (trained elsewhere), unreadable, no sha256
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = f"its dataset {source} cannot be read here: {reason}"
        return {**unchecked, "reason": f"{problem}; and {reason}" if problem else reason}, None
    trained_on = card.data.get("fingerprint")
    if trained_on and report.get("fingerprint") != trained_on:
        # Ingested again since (a later cxr splits otherwise, or the folder changed): its splits are not
        # the ones the model saw, so which images it trained on cannot be told from them.
        reason = (
            f"its dataset {source} was ingested again since the model was trained on it (fingerprint "
            f"{report.get('fingerprint')}, the model's {trained_on}): its splits are not the ones the "
            "model saw"
        )
        reason = f"{problem}; and {reason}" if problem else reason
        return {**unchecked, "reingested": True, "reason": reason}, None
    own_hashing = phash_of(report)
    summary, seen = _overlap_summary(card, str(source), own, own_hashing, data, split, bits, manifest=False)
    if problem:
        summary["manifest_problem"] = problem
    return summary, seen


def _overlap_summary(
    card: ModelCard,
    source: str | None,
    own: dict[str, np.ndarray],
    own_hashing: str,
    data: str,
    split: str,
    bits: int,
    manifest: bool,
) -> tuple[dict[str, Any], np.ndarray]:
    """training_overlap_rows' answer, the model's images (`own`, their perceptual hashes taken as
    `own_hashing` says) read from its manifest or its dataset, against the rows of `data`."""
    from cxrcore.data.ingest import read_report, read_table

    rows = _hashes(read_table, data, None if split == "all" else split)
    note = _same_hashing(rows, own_hashing, read_report(data), data, split, card.data.get("size"))
    exact, near = _copies(own, rows, bits)
    counts = {name: int((exact[name] | near[name]).sum()) for name in ("train", "val", "test")}
    copied = np.logical_or.reduce([exact[name] | near[name] for name in counts])
    pixel_exact = np.logical_or.reduce([exact[name] for name in counts])
    seen = exact["train"] | near["train"] | exact["val"] | near["val"]
    summary = {
        "checked": True,
        "dataset": source,
        "read_from": "the data manifest of the model's registry version" if manifest else "the dataset",
        "in_split": counts,
        "total": int(copied.sum()),
        "pixel_exact": int(pixel_exact.sum()),
        "near": int((copied & ~pixel_exact).sum()),
        "near_duplicate_bits": bits if _comparable_hashes(own, rows) else None,
    }
    if note:
        summary["near_note"] = note
    return summary, seen


def _same_hashing(
    rows: dict[str, np.ndarray], own_hashing: str, report: dict[str, Any], data: str, split: str, size: Any
) -> str | None:
    """Make the evaluated rows' perceptual hashes comparable with the model's (taken as `own_hashing`), or
    say why near copies may be missed. Hashes of the same X-ray taken two ways lie apart: of 130 real
    X-rays re-encoded as JPEGs, one side hashed from the decoded picture and the other from its 32 px
    resize found 75 (130 either way alike). The model's hashed as stored by an earlier cxr: the rows' are
    taken again from their stored images, of the same size as `cxr evaluate` requires."""
    if "phash" not in rows:
        return None
    from cxrcore.data.ingest import EARLIER_PHASH_OF, phash_of

    hashing = phash_of(report)
    if hashing == own_hashing:
        return None
    stored = report.get("config", {}).get("size")
    if own_hashing == EARLIER_PHASH_OF and stored is not None and stored == size:
        rows["phash"] = _stored_hashes(data, split)
        return None
    return (
        "the two datasets' perceptual hashes were taken in two ways (one by an earlier cxr, of its resized "
        "images): near copies may be missed; ingest both with this cxr for a full check"
    )


def _stored_hashes(data: str, split: str) -> np.ndarray:
    """The perceptual hash of each stored image of `data` (read_table's order), as an earlier ingest took
    them, a chunk of rows at a time."""
    from cxrcore.data.ingest import read_chunks, tensor_column
    from cxrcore.data.transforms import perceptual_hash

    hashes = []
    for chunk in read_chunks(data, ["image"], None if split == "all" else split):
        hashes += [perceptual_hash(image) for image in tensor_column(chunk["image"])]
    return np.asarray(hashes)


def unseen_figures(
    labels: np.ndarray, probs: np.ndarray, seen: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """The `unseen` part of the overlap: the figures on the evaluated images that copy none of the model's
    train or val images, the clean external validation within a set that is not one."""
    keep = ~seen
    if not keep.any():
        return {"n": 0, "accuracy": None, "accuracy_ci95": None, "macro_f1": None}
    metrics = classification_metrics(labels[keep], probs[keep], classes)
    return {
        "n": metrics["n"],
        "accuracy": metrics["accuracy"],
        "accuracy_ci95": accuracy_interval(metrics["confusion_matrix"]),
        "macro_f1": metrics["macro_f1"],
    }


NEAR_DUPLICATE_BITS = 12
"""IngestConfig's default, for a dataset whose report does not record its own."""


def _hashes(read_table: Any, dataset: str, split: str | None) -> dict[str, np.ndarray]:
    """sha256, phash (where the dataset has it: every dataset ingest writes) and split of each row."""
    columns = ["sha256", "phash", "split"] if split is None else ["sha256", "phash"]
    try:
        table = read_table(dataset, columns, split=split)
    except ValueError:  # written without perceptual hashes (hand-made datasets): pixel-exact copies only
        table = read_table(dataset, [c for c in columns if c != "phash"], split=split)
    return {name: np.asarray(table[name].to_pylist()) for name in table.column_names}


def _comparable_hashes(own: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> bool:
    """Both datasets hold perceptual hashes, every one of them, all of one size (pixel-exact copies only
    otherwise: a hand-made dataset, or one an ingest of another hash size wrote)."""
    if "phash" not in own or "phash" not in rows:
        return False
    sizes = {len(h) for h in [*own["phash"], *rows["phash"]]}
    return len(sizes) == 1 and 0 not in sizes


def _copies(
    own: dict[str, np.ndarray], rows: dict[str, np.ndarray], bits: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per split of the model's dataset, which evaluated rows copy one of its images: (exact, near).

    Near pairs are found as ingest groups duplicates (banded LSH over both datasets), and each kept only
    when the row lies within `bits` of an image of that split itself, not through a chain of other
    evaluated images that are alike."""
    from cxrcore.data.split import duplicate_groups
    from cxrcore.data.transforms import hash_words

    n = len(rows["sha256"])
    exact = {
        name: np.isin(rows["sha256"], own["sha256"][own["split"] == name])
        for name in ("train", "val", "test")
    }
    near = {name: np.zeros(n, dtype=bool) for name in exact}
    if bits <= 0 or not n or not len(own["sha256"]) or not _comparable_hashes(own, rows):
        return exact, near
    words = hash_words([*own["phash"], *rows["phash"]])
    groups = np.asarray(duplicate_groups([*own["sha256"], *rows["sha256"]], words, bits))
    own_groups, row_groups = groups[: len(own["sha256"])], groups[len(own["sha256"]) :]
    own_words, row_words = words[: len(own_groups)], words[len(own_groups) :]
    for row in np.flatnonzero(np.isin(row_groups, own_groups)):
        members = np.flatnonzero(own_groups == row_groups[row])
        close = members[np.bitwise_count(own_words[members] ^ row_words[row]).sum(axis=1) <= bits]
        for name in near:
            near[name][row] = bool((own["split"][close] == name).any())
    return exact, near


def external_block(
    metrics: Mapping[str, Any],
    *,
    dataset: str,
    split: str,
    relation: DatasetRelation,
    overlap: Mapping[str, Any],
    temperature: float,
    masks: str,
) -> dict[str, Any]:
    """metrics.json's `external` block: the data, its classes, the operating point, one-vs-rest figures."""
    classes = list(metrics["classes"])
    matrix = metrics["confusion_matrix"]
    present = [name for name in classes if metrics["per_class"][name]["support"] > 0]
    predicted_absent = {
        name: sum(row[k] for row in matrix)
        for k, name in enumerate(classes)
        if name not in present and any(row[k] for row in matrix)
    }
    return {
        "dataset": dataset,
        "fingerprint": relation.fingerprint,
        "split": split,
        "n": metrics["n"],
        "relation": relation.kind,
        "trained_on": {key: relation.trained_on.get(key) for key in ("dataset", "fingerprint")},
        # the data a checkpoint it was fine-tuned from trained on (`DatasetRelation.ancestor`)
        "fine_tuned_from": relation.ancestor if split in ("all", "train", "val") else None,
        "overlap_with_training_data": dict(overlap),
        "classes_present": present,
        "classes_absent": [name for name in classes if name not in present],
        "predicted_absent": predicted_absent,
        "accuracy": metrics["accuracy"],
        "accuracy_ci95": accuracy_interval(metrics["confusion_matrix"]),
        "macro_f1": metrics["macro_f1"],
        # what always answering this set's commonest class scores, and the ranking's chance, 0.5
        "commonest_class_accuracy": max(map(sum, matrix)) / max(1, metrics["n"]),
        "macro_auroc": metrics.get("macro_auroc"),
        "macro_auroc_ci95": metrics.get("macro_auroc_ci95"),
        "operating_point": {
            "rule": "argmax of softmax(logits / temperature): the class Serve answers",
            "temperature": temperature,
        },
        "masks": masks,
        "one_vs_rest": one_vs_rest(matrix, classes),
    }


def internal_reference(
    card: ModelCard, report_metrics: Mapping[str, Any] | None, *, predicted_masks: bool = False
) -> dict[str, Any] | None:
    """The model's own figures to compare with: its registered test report, else its card's validation.

    A report counts only when it scored the test split of the model's own dataset. Its figures are taken
    with the masks the external ones used: the segmenter's with predicted_masks (as Serve makes them),
    else the dataset's; a report's headline is the segmenter's where the model has one (the dataset's in
    reports written before `evaluated.mask_source`), the other kind an extra result where it holds one.
    None when neither source has figures.
    """
    report = dict(report_metrics or {})
    evaluated = report.get("evaluated") or {}
    if is_test_report(report) and report.get("accuracy") is not None:
        legacy = "dataset" if "with predicted masks" in report else None  # the GT masks' figures first
        headline = evaluated.get("mask_source", legacy)
        wanted = "segmenter" if predicted_masks else "dataset"
        other = report.get("with predicted masks" if predicted_masks else "with ground-truth masks")
        figures = other if headline not in (None, wanted) and other else report
        masks = (headline if figures is report else wanted) if headline else None
        named = {"segmenter": " (with predicted masks)", "dataset": " (with ground-truth masks)"}
        return {
            "kind": "test",
            "source": "the test split report registered with the model" + named.get(masks or "", ""),
            "accuracy": figures["accuracy"],
            "macro_f1": figures.get("macro_f1"),
            "ece": figures.get("ece"),
            "ece_floor": figures.get("ece_floor"),
            "confusion_matrix": figures.get("confusion_matrix"),
        }
    metrics = card.metrics
    if metrics.get("val_accuracy") is None:
        return None
    return {
        "kind": "validation",
        "source": f"the validation metrics on the model's card (epoch {card.epoch + 1}; no test figures)",
        "accuracy": metrics["val_accuracy"],
        "macro_f1": metrics.get("val_macro_f1"),
        "ece": card.calibration.get("ece_after", metrics.get("val_ece")),
        "ece_floor": card.calibration.get("ece_floor_after"),
        "confusion_matrix": metrics.get("val_confusion_matrix"),
    }


def compare_with_internal(
    external: Mapping[str, Any],
    reference: Mapping[str, Any] | None,
    classes: Sequence[str],
    ece: float,
    ece_floor: float | None = None,
) -> dict[str, Any]:
    """metrics.json's `internal_comparison` block: internal → external per figure, the drop, a verdict.

    Where the reference has a confusion matrix, its accuracy and macro-F1 are recomputed over the images
    of the classes the external set holds (confusion_scores' rows), so both sides score the same task.
    """
    present = list(external["classes_present"])
    block: dict[str, Any] = {
        "reference": None,
        "source": None,
        "restricted_to": None,
        "restricted_n": None,
        "drop_threshold": LARGE_DROP,
        "large_drop": None,
        "internal_accuracy_ci95": None,
        "internal_n": None,
        "accuracy_drop_ci95": None,
        "drop_beyond_sampling": None,
        "clean": _clean(external),
        "figures": {
            "accuracy": {"internal": None, "external": external["accuracy"], "drop": None},
            "macro_f1": {"internal": None, "external": external["macro_f1"], "drop": None},
            "ece": {"internal": None, "external": ece, "drop": None},
            # what perfectly calibrated probabilities would show on each side's images: an ECE is read
            # against it, and it shrinks with the images (0.35 on 4 against 0.08 on 24 read as "better
            # calibrated" on the external set: a review, session 56)
            "ece_floor": {"internal": None, "external": ece_floor, "drop": None},
        },
    }
    block["no_better_than_chance"] = no_better_than_chance(external) is not None  # the report's alert too
    if reference is None:
        block["verdict"] = _verdict(block, external)
        return block
    internal = {key: reference.get(key) for key in COMPARED}
    matrix = reference.get("confusion_matrix")
    if matrix is not None:
        block.update(internal_accuracy_ci95=accuracy_interval(matrix), internal_n=int(np.sum(matrix)))
    if matrix is not None and len(present) < len(classes) and _has_rows(matrix, classes, present):
        restricted = confusion_scores(matrix, classes, rows=present)
        internal = {key: restricted[key] for key in COMPARED}
        block.update(restricted_to=present, restricted_n=restricted["n"], internal_n=restricted["n"])
        correct = round(restricted["accuracy"] * restricted["n"])
        block["internal_accuracy_ci95"] = wilson_interval(correct, restricted["n"])
    block.update(reference=reference["kind"], source=reference["source"])
    # the internal ECE is of every internal image: beside figures restricted to some classes it would
    # describe another population (per-image probabilities, which it needs, are not in the reference)
    for key in ("ece", "ece_floor"):
        block["figures"][key]["internal"] = None if block["restricted_to"] else reference.get(key)
    for key in COMPARED:
        row = block["figures"][key]
        row["internal"] = internal[key]
        if internal[key] is not None:
            row["drop"] = internal[key] - row["external"]
    block["large_drop"] = _is_large(block["figures"][key]["drop"] for key in COMPARED)
    accuracy = block["figures"]["accuracy"]
    if block["internal_n"] and external.get("n") and accuracy["internal"] is not None:
        # Beyond sampling when the drop's own 95% interval excludes 0: a fall of 0.33 -> 0.19 on 18 and
        # 130 images (Fisher's p = 0.21) is not one, 0.71 -> 0.51 on 45 and 130 (p = 0.023) is.
        interval = difference_interval(
            round(accuracy["internal"] * block["internal_n"]),
            block["internal_n"],
            round(accuracy["external"] * external["n"]),
            external["n"],
        )
        block["accuracy_drop_ci95"] = interval
        block["drop_beyond_sampling"] = interval is not None and interval[0] > 0
    block["verdict"] = _verdict(block, external)
    return block


def verdict_alarming(block: Mapping[str, Any]) -> bool:
    """Whether a verdict (external comparison or source hold-out) must be read as a warning: a large drop,
    not shown to beat chance, or external images not known to be clean of the model's own (`clean` False,
    or None where the overlap could not be checked). One rule for the console and the report: the report
    had shown an unchecked overlap in green under a console WARNING."""
    return bool(
        block.get("large_drop")
        or block.get("no_better_than_chance")
        or ("clean" in block and block["clean"] is not True)
    )


def no_better_than_chance(external: Mapping[str, Any]) -> str | None:
    """A sentence where the external figures are not shown to beat chance, whatever the internal ones: the
    accuracy's interval reaches what always answering the set's commonest class scores (a set of several
    classes: one of a single class, a hospital's COVID cases, scores what it finds of them), or the macro
    AUROC's interval reaches 0.5 (the AUROC itself where it has none). A clinician's review read a model at
    chance (AUROC 0.48) under a green verdict that only compared it with its internal figures."""
    interval, commonest = external.get("accuracy_ci95"), external.get("commonest_class_accuracy")
    auroc, auroc_interval = external.get("macro_auroc"), external.get("macro_auroc_ci95")
    reasons = []
    several = len(external.get("classes_present") or ()) > 1  # one class: its accuracy is its sensitivity
    inverted = False  # a ranking below chance: the likeliest cause, labels or classes not the images'
    if several and interval and commonest is not None and interval[0] <= commonest:
        verb = "lies wholly below" if interval[1] < commonest else "reaches"
        reasons.append(
            f"accuracy {_fixed(external['accuracy'])}{_interval(interval)} {verb} {_fixed(commonest)}, what "
            "always answering the commonest class here scores"
        )
    if auroc is not None and (auroc_interval[0] if auroc_interval else auroc) <= 0.5:
        inverted = auroc_interval is not None and auroc_interval[1] < 0.5
        where = "wholly below 0.5, chance: its ranking is reversed" if inverted else "where 0.5 is chance"
        reasons.append(f"macro AUROC {_fixed(auroc)}{_interval(auroc_interval)}, {where}")
    if not reasons:
        return None
    said = "; ".join(reasons)
    worse = (
        " It does worse than chance: are its classes and labels those of these images?" if inverted else ""
    )
    return f"Not shown to beat chance on these images: {said}.{worse} Do not rely on it for data like this."


def _verdict(block: Mapping[str, Any], external: Mapping[str, Any]) -> str:
    """The plain-words summary the report leads with and the CLI prints."""
    chance = no_better_than_chance(external)
    lead = [chance] if chance else []
    figures = block["figures"]
    kind = block["reference"]
    if kind is None:
        sentences = [
            "The model's card records no internal test or validation figures, so there is nothing to compare "
            f"with. External: accuracy {_fixed(external['accuracy'])}{_interval(external['accuracy_ci95'])}, "
            f"macro-F1 {_fixed(external['macro_f1'])}."
        ]
        return " ".join(
            _not_clean(external) + sentences + lead + _overlap_caveats(external) + _caveats(external)
        )
    sides = ", ".join(
        f"{label} {_fixed(figures[key]['internal'])} internal ({kind}) → {_fixed(figures[key]['external'])} "
        f"external" + (_interval(external["accuracy_ci95"]) if key == "accuracy" else "")
        for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
        if figures[key]["internal"] is not None
    )
    if block["large_drop"] and block["drop_beyond_sampling"] is False:
        low, high = block["internal_accuracy_ci95"]
        drop_low, drop_high = block["accuracy_drop_ci95"]
        sentences = [
            f"Large drop on external data: {sides}; but the internal accuracy rests on "
            f"{block['internal_n']} images (95% CI {low:.2f}–{high:.2f}), and the accuracy's drop, 95% CI "
            f"{drop_low:.2f} to {drop_high:.2f}, may be 0: the fall may be chance. Neither figure settles "
            "whether the model carries over to this data: evaluate it on more images, internal and "
            "external, before relying on it."
        ]
    elif block["large_drop"]:
        drop = block["accuracy_drop_ci95"]
        beyond = f" (the accuracy's drop: 95% CI {drop[0]:.2f} to {drop[1]:.2f})" if drop else ""
        sentences = [
            f"Large drop on external data: {sides}{beyond}. A fall of {LARGE_DROP:.2f} or more means the "
            "model does not carry over to this data: it may have learned the sources it was trained on "
            "(hospital, scanner, patient age) rather than the disease. Do not rely on it for data like this."
        ]
    elif _is_large(-figures[key]["drop"] for key in COMPARED if figures[key]["drop"] is not None):
        sentences = [
            f"{sides[0].upper()}{sides[1:]}: higher than the internal figures by {LARGE_DROP:.2f} or more, "
            "which data from elsewhere seldom is. These images may be easier, hold another mix of classes or "
            "copy images the model trained on, or the internal figures rest on few images: find out which "
            "before reading this as the model carrying over."
        ]
    else:
        sentences = [
            f"{sides[0].upper()}{sides[1:]}: within {LARGE_DROP:.2f} of the internal figures"
            + _unsettled(block["accuracy_drop_ci95"])
        ]
    if block["restricted_to"]:
        present = ", ".join(block["restricted_to"])
        sentences.append(
            f"Internal figures are over the {block['restricted_n']} internal images of the classes present "
            f"here ({present})."
        )
    if kind == "validation":
        sentences.append(
            "They are validation figures, which chose this checkpoint and its temperature: optimistic."
        )
    return " ".join(_not_clean(external) + sentences + lead + _overlap_caveats(external) + _caveats(external))


def _clean(external: Mapping[str, Any]) -> bool | None:
    """False where the model saw some of these images (or may have), True where none, None unchecked."""
    if _seen_in_training(external):
        return False
    return True if external["overlap_with_training_data"].get("checked") else None


def _seen_in_training(external: Mapping[str, Any]) -> bool:
    """Whether the model was trained or validated on some of these images, or may have been: a copy in its
    dataset's train or val split, or these are its dataset's images, ingested again since."""
    overlap = external["overlap_with_training_data"]
    seen = overlap.get("in_split", {})
    return bool(
        seen.get("train") or seen.get("val") or _own_data_again(external) or external.get("fine_tuned_from")
    )


def _own_data_again(external: Mapping[str, Any]) -> bool:
    """The evaluated dataset is the one the model trained on, at the same place, ingested again since."""
    overlap = external["overlap_with_training_data"]
    return bool(overlap.get("reingested")) and _same_place(external["dataset"], overlap.get("dataset"))


def _same_place(a: str, b: Any) -> bool:
    import os

    return isinstance(b, str) and os.path.abspath(a.rstrip("/")) == os.path.abspath(b.rstrip("/"))


def _not_clean(external: Mapping[str, Any]) -> list[str]:
    """The verdict's first sentence where the model was trained or validated on some of these images,
    with the figures on the others."""
    if not _seen_in_training(external):
        return []
    overlap = external["overlap_with_training_data"]
    if external.get("fine_tuned_from"):
        return [
            f"Not a clean external validation: this is the dataset of {external['fine_tuned_from']}, the "
            "checkpoint the model was fine-tuned from, which trained on its train split; only its test "
            "split (--split test) holds images neither model trained on."
        ]
    if _own_data_again(external):
        return [
            "Not a clean external validation: this is the dataset the model was trained on "
            f"({external['dataset']}), ingested again since; the model trained on many of these images, "
            "and which cannot be told."
        ]
    seen = overlap["in_split"]
    copies = seen.get("train", 0) + seen.get("val", 0)
    kind = "copies" if overlap.get("near_duplicate_bits") is not None else "pixel-exact copies"
    sentence = (
        f"Not a clean external validation: the model was trained or validated on {kind} of {copies} of "
        f"these {external['n']} images, so the figures that follow flatter it"
    )
    unseen = external.get("unseen")
    if unseen and unseen["n"]:
        sentence += (
            f"; on the {unseen['n']} others: accuracy {_fixed(unseen['accuracy'])}"
            f"{_interval(unseen['accuracy_ci95'])}, macro-F1 {_fixed(unseen['macro_f1'])}"
        )
    elif unseen:
        sentence += "; none of them is new to it"
    return [sentence + "."]


def _overlap_caveats(external: Mapping[str, Any]) -> list[str]:
    """What the verdict says where the check for the model's own images fell short: not made (the figures
    may then be on images it trained on), made from its dataset because its manifest failed (a registry
    copy damaged or edited), or made with perceptual hashes taken two ways."""
    overlap = external["overlap_with_training_data"]
    if not overlap.get("checked"):
        return [
            f"Whether the model trained on any of these images was not checked ({overlap.get('reason')}), "
            "so the figures may flatter it."
        ]
    said = []
    if overlap.get("manifest_problem"):
        said.append(f"{overlap['manifest_problem']}: the model's images were read from its dataset instead.")
    if overlap.get("near_note"):
        said.append(f"Near copies: {overlap['near_note']}.")
    return [sentence[0].upper() + sentence[1:] for sentence in said]


def _caveats(external: Mapping[str, Any]) -> list[str]:
    """What makes the external figures mean less than they seem: absent classes predicted."""
    return [
        f"The model called {count} image(s) {name}, a class this dataset does not hold."
        for name, count in external["predicted_absent"].items()
    ]


def source_holdout(
    labels: np.ndarray,
    probs: np.ndarray,
    sources: np.ndarray,
    test_sources: Sequence[str],
    classes: Sequence[str],
) -> dict[str, Any]:
    """metrics.json's `source_holdout` block: a test split's random-split images beside its held-out sources'.

    A random split shares its sites with training, so it rewards a model that reads the site (scanner,
    burned-in text, patient age) as much as one that reads the lungs; the sources ingest held out do not.
    The random-split side keeps only the classes the held-out images hold, so that both sides score the
    same task (compare_with_internal restricts the internal figures for the same reason).
    """
    held = np.isin(sources, list(test_sources))
    present = np.unique(labels[held]) if held.any() else np.arange(len(classes))
    seen = ~held & np.isin(labels, present)
    restricted = bool((~held & ~seen).any())
    one_class = bool(held.any()) and len(present) == 1
    block: dict[str, Any] = {
        "test_sources": sorted(test_sources),
        "random_split": _holdout_side(labels[seen], probs[seen], sources[seen], classes, one_class),
        "held_out": _holdout_side(labels[held], probs[held], sources[held], classes, one_class),
        "restricted_to": [classes[int(k)] for k in present] if restricted else None,
        # the held-out images of one class: accuracy is its recall, and a model reading the sources scores
        # there as one reading the lungs does (a review, session 52: two COVID-only journals held out)
        "one_class": classes[int(present[0])] if one_class else None,
        "drop_threshold": LARGE_DROP,
    }
    both = block["random_split"]["n"] and block["held_out"]["n"]
    block["drop"] = {
        key: block["random_split"][key] - block["held_out"][key]
        if both and block["held_out"][key] is not None
        else None
        for key in COMPARED
    }
    block["large_drop"] = _is_large(block["drop"].values()) if both else None
    seen, held = block["random_split"], block["held_out"]
    block["accuracy_drop_ci95"] = (
        difference_interval(
            round(seen["accuracy"] * seen["n"]), seen["n"], round(held["accuracy"] * held["n"]), held["n"]
        )
        if both
        else None
    )
    block["verdict"] = _holdout_verdict(block)
    return block


def _holdout_side(
    labels: np.ndarray, probs: np.ndarray, sources: np.ndarray, classes: Sequence[str], one_class: bool
) -> dict[str, Any]:
    """One side of the hold-out: its sources, images per class, accuracy with its 95% interval, macro-F1
    (none where the held-out images are of `one_class`: over one class it is 2r/(1 + r) of its recall r,
    its precision 1 by construction)."""
    if len(labels) == 0:
        return {"sources": [], "n": 0, "by_class": {}, **dict.fromkeys(_SIDE_FIGURES)}
    metrics = classification_metrics(labels, probs, classes)
    return {
        "sources": sorted(set(sources.tolist())),
        "n": metrics["n"],
        "by_class": {name: row["support"] for name, row in metrics["per_class"].items() if row["support"]},
        "accuracy": metrics["accuracy"],
        "accuracy_ci95": accuracy_interval(metrics["confusion_matrix"]),
        "macro_f1": None if one_class else metrics["macro_f1"],
        "confusion_matrix": metrics["confusion_matrix"],
    }


def _holdout_verdict(block: Mapping[str, Any]) -> str:
    """The plain-words summary of a source hold-out that the report leads with and the CLI prints."""
    seen, held = block["random_split"], block["held_out"]
    names = ", ".join(block["test_sources"])
    if not held["n"]:
        return f"No evaluated image comes from the held-out sources ({names}): there is no held-out figure."
    if not seen["n"]:
        return (
            f"Held-out sources ({names}): accuracy {_side_figure(held, 'accuracy')}, macro-F1 "
            f"{_side_figure(held, 'macro_f1')}. No test image of these classes comes from the sources seen "
            "in training, so there is no random-split figure to compare with."
        )
    sides = "; ".join(
        f"{label}: held-out sources {_side_figure(held, key)} vs random split {_side_figure(seen, key)}: "
        + _change(block["drop"][key])
        for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
        if block["drop"][key] is not None
    )
    if block.get("one_class"):
        name = block["one_class"]
        return (
            f"Held-out sources ({names}): {name} images only, so the accuracy is {name}'s recall "
            f"({sides}). A model that tells {name} apart by its sources (hospital, scanner, patient age, "
            "text burned in) finds it on these images as well as one reading the lungs: this hold-out "
            "cannot show a source shortcut. Hold out sources that hold two classes or more, or validate on "
            "another hospital's data."
        )
    if block["large_drop"]:
        low, high = block["accuracy_drop_ci95"]
        chance = " (the accuracy's drop, 95% CI {:.2f} to {:.2f}, may be chance)" if low <= 0 else ""
        sentences = [
            f"Large drop on the held-out sources ({names}): {sides}{chance.format(low, high)} — the model "
            "may be reading the site (hospital, scanner, patient age), not the lungs. Expect the held-out "
            "figures, not the random-split ones, on data from elsewhere."
        ]
    elif _is_large(-drop for drop in block["drop"].values() if drop is not None):
        sentences = [
            f"Held-out sources ({names}): {sides}; higher than the random split by {LARGE_DROP:.2f} or more: "
            "the held-out sources' images may be easier, or either side rests on few images."
        ]
    else:
        sentences = [
            f"Held-out sources ({names}): {sides}; within {LARGE_DROP:.2f} of the random split"
            + _unsettled(block["accuracy_drop_ci95"])
        ]
    if block["restricted_to"]:
        sentences.append(
            f"The random split is scored over its {seen['n']} images of the classes the held-out sources "
            f"hold ({', '.join(block['restricted_to'])})."
        )
    return " ".join(sentences)


def _unsettled(drop: Sequence[float] | None) -> str:
    """The end of a "within LARGE_DROP" sentence: a full stop, or where the accuracy's drop has a 95%
    interval that reaches LARGE_DROP, that few images cannot rule a large fall out (0.90 on 40 internal
    images against 0.83 on 30 external ones is within 0.10, and its drop's interval reaches 0.25).

    >>> _unsettled([-0.094, 0.246])[:61]
    ", but the accuracy's drop, 95% CI -0.09 to 0.25, reaches 0.10"
    >>> _unsettled([-0.05, 0.08]), _unsettled(None)
    ('.', '.')
    """
    if drop is None or drop[1] < LARGE_DROP:
        return "."
    return (
        f", but the accuracy's drop, 95% CI {drop[0]:.2f} to {drop[1]:.2f}, reaches {LARGE_DROP:.2f}: too "
        "few images to rule out a large fall."
    )


def _side_figure(side: Mapping[str, Any], key: str) -> str:
    """One side's figure to 2 decimals; accuracy with its 95% interval."""
    return _fixed(side[key]) + (_interval(side["accuracy_ci95"]) if key == "accuracy" else "")


def _change(drop: float) -> str:
    return f"a drop of {_fixed(drop)}" if drop >= 0 else f"a rise of {_fixed(-drop)}"


def _is_large(drops: Iterable[float | None]) -> bool:
    """Whether any figure fell by LARGE_DROP or more (with slack: 0.90 - 0.80 is 0.0999... in floats)."""
    return any(drop >= LARGE_DROP - _FLOAT_SLACK for drop in drops if drop is not None)


def _has_rows(matrix: Sequence[Sequence[int]], classes: Sequence[str], rows: Sequence[str]) -> bool:
    return any(sum(matrix[k]) for k, name in enumerate(classes) if name in rows)


def _fixed(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "" if bounds is None else f" (95% CI {bounds[0]:.2f}–{bounds[1]:.2f})"
