"""Plots of evaluation metrics and training curves, and the self-contained HTML evaluation report."""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cxrcore.metrics import ECE_BINS, LR_REPLANNED, RESUMED_AFTER, accuracy_interval

HEADLINE_METRICS = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "weighted_f1",
    "macro_auroc",
    "ece",
    "ece_floor",
    "nll",
)
NOTE_KEYS = ("note", "prior_note")
"""Sentences in an extra result (the calibration block, a source's figures), shown as paragraphs above its
table rather than as columns of it."""
PER_CLASS_COLUMNS = ("precision", "recall", "f1", "support", "auroc")
_DPI = 110
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #345; padding-bottom: .3em; }
h2 { margin-top: 1.8em; color: #345; }
h3 { margin: 1.2em 0 .3em; font-size: 1em; color: #345; }
.lead { font-size: 1.1em; padding: .6em .9em; background: #eef6ee; border-left: 4px solid #4a8a4a; }
.lead.alert { background: #fbeaea; border-left: 6px dashed #b33; font-weight: 600; }
.table-wrap { overflow-x: auto; max-width: 100%; margin: .6em 0; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #ccd; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #eef1f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td pre { margin: 0; white-space: pre-wrap; font-size: .9em; }
.images { display: flex; flex-wrap: wrap; gap: 1em; }
.images img { max-width: 100%; height: auto; border: 1px solid #dde; }
@media print {
  .table-wrap { overflow: visible; }
  table { font-size: 8pt; }
  section { break-inside: avoid-page; }
  .lead { border: 2px solid #000; }
  .lead.alert { border: 3px dashed #000; }
}
"""
ALERT_OPEN = '<p class="lead alert" role="note"><strong>Warning:</strong> '
"""How every red lead starts once written: in words as well as in colour, for a reader who cannot tell red
from green, a screen reader, or a page printed without its backgrounds."""


@dataclass
class ReportSection:
    """One titled block of the HTML report: markup, then images, then a table."""

    heading: str
    html: str = ""
    """Inserted as is, so escape any untrusted text in it (html_table does)."""
    images: list[Path] = field(default_factory=list)
    table: list[dict[str, Any]] | None = None
    image_width: int | None = None
    """Display width of each image in CSS pixels (several then sit side by side); None: natural size."""
    alts: dict[str, str] = field(default_factory=dict)
    """Each image's text alternative, by file stem (what a screen reader says for it; also shown where an
    image cannot be); an image without one is described by its stem's words."""


def plot_confusion_matrix(
    matrix: npt.ArrayLike,
    classes: Sequence[str],
    path: str | Path,
    normalized: bool,
    title: str | None = None,
) -> Path:
    """Save confusion_matrix_figure(matrix, classes, normalized, title) as a PNG at path."""
    return _save(confusion_matrix_figure(matrix, classes, normalized, title), path)


def confusion_matrix_figure(
    matrix: npt.ArrayLike, classes: Sequence[str], normalized: bool, title: str | None = None
) -> Figure:
    """Annotated heatmap of a confusion matrix (rows true, columns predicted): counts or row fractions.

    Row-normalised, a class with no image in the set has no fractions: its row is grey, each cell a dash, and
    its label says "(no images)" (a row of 0.00s would read as a class the model never gets right)."""
    values = np.asarray(matrix, dtype=np.float64)
    size = len(classes)
    empty = (values.sum(axis=1) == 0) if normalized else np.zeros(size, dtype=bool)
    fig = Figure(figsize=(0.8 * size + 1.6, 0.7 * size + 1.5), layout="constrained")
    ax = fig.subplots()
    vmax = 1.0 if normalized else max(float(values.max(initial=0.0)), 1.0)
    cmap = colormaps["Blues"].with_extremes(bad="#e6e6e6")
    shown = np.ma.masked_array(values, mask=np.repeat(empty[:, None], size, axis=1))
    image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, shrink=0.85)
    tick_labels = [textwrap.fill(name, width=10, break_long_words=False) for name in classes]
    ax.set_xticks(range(size), tick_labels, fontsize=9, rotation=30, ha="right", rotation_mode="anchor")
    row_labels = [
        f"{name}\n(no images)" if none else name for name, none in zip(tick_labels, empty, strict=True)
    ]
    ax.set_yticks(range(size), row_labels, fontsize=9)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    for (row, col), value in np.ndenumerate(values):
        text = "–" if empty[row] else f"{value:.2f}" if normalized else f"{int(value)}"
        color = _text_on(cmap(value / vmax if vmax else 0.0))
        ax.text(col, row, text, ha="center", va="center", color=color, fontsize=11)
    default_title = "Confusion matrix (row-normalised)" if normalized else "Confusion matrix (counts)"
    ax.set_title(title or default_title)
    return fig


def _luminance(rgb: Sequence[float]) -> float:
    """WCAG's relative luminance of an sRGB colour given in [0, 1]."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _text_on(background: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with `background` (WCAG's ratio): white above half the
    scale read 2.5:1 on the mid blues, under the 4.5:1 text needs."""
    light = _luminance(background)
    return "white" if (1.05 / (light + 0.05)) > ((light + 0.05) / 0.05) else "black"


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Save training_curves_figure(history) as a PNG at path."""
    return _save(training_curves_figure(history), path)


def training_curves_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Loss and accuracy / macro-F1 against epoch, one line per key present in the per-epoch dicts, and a
    dotted line where the run was resumed."""
    keys = list(dict.fromkeys(key for row in history for key in row))
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    _plot_keys(loss_ax, history, [key for key in keys if key.endswith("loss")])
    _plot_keys(score_ax, history, [key for key in keys if key.endswith(("accuracy", "macro_f1"))])
    loss_ax.set_title("Loss")
    score_ax.set_title("Accuracy and macro-F1")
    score_ax.set_ylim(0.0, 1.02)
    for ax in (loss_ax, score_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: one point reads 0.95-1.05 otherwise
        _mark_resumes(ax, history)
    if history:
        # A card carries its run's history up to its own epoch: a run that went on past the kept checkpoint
        # (a later epoch scored lower) has more epochs than this shows.
        last = history[-1].get("epoch", len(history))
        fig.suptitle(f"Training history up to the evaluated checkpoint (epoch {last})")
    return fig


def resumes(history: Sequence[Mapping[str, Any]]) -> list[tuple[int, bool]]:
    """Where a run went on from a checkpoint: (the epoch it went on after, whether its learning-rate
    schedule was planned anew there), from the history's RESUMED_AFTER marks.

    >>> resumes([{"epoch": 1}, {"epoch": 2}, {"epoch": 3, "resumed_after": 2, "lr_replanned": True}])
    [(2, True)]
    """
    return [
        (int(row[RESUMED_AFTER]), bool(row.get(LR_REPLANNED)))
        for row in history
        if _is_number(row.get(RESUMED_AFTER))
    ]


def resume_note(history: Sequence[Mapping[str, Any]]) -> str | None:
    """The sentence a report gives a resumed run's curves (None for a run trained in one go).

    >>> resume_note([{"epoch": 3, "resumed_after": 2, "lr_replanned": False}])
    'Resumed after epoch 2, the learning-rate schedule where it stood. The dotted line marks it.'
    """
    found = resumes(history)
    if not found:
        return None
    told = [
        f"after epoch {after}"
        + (
            ", the learning-rate schedule planned anew (more --epochs, or other --workers or --batch-size): "
            "its rate jumps there"
            if replanned
            else ", the learning-rate schedule where it stood"
        )
        for after, replanned in found
    ]
    lines = "The dotted line marks it." if len(found) == 1 else "Dotted lines mark them."
    return f"Resumed {'; '.join(told)}. {lines}"


def training_curves_section(
    image: Path, history: Sequence[Mapping[str, Any]], alt: str = ""
) -> ReportSection:
    """A report's "Training curves" section: the plot, and where the run was resumed in words."""
    note = resume_note(history)
    return ReportSection(
        "Training curves",
        html=f"<p>{html.escape(note)}</p>" if note else "",
        images=[image],
        alts={"training_curves": alt} if alt else {},
    )


def _mark_resumes(ax: Axes, history: Sequence[Mapping[str, Any]]) -> None:
    """A dotted line between the epoch a run went on after and the first it trained then."""
    labelled = set()
    for after, replanned in resumes(history):
        label = "resumed, learning rate re-planned" if replanned else "resumed"
        ax.axvline(
            after + 0.5, color="0.35", linestyle=":", linewidth=1.2,
            label=None if label in labelled else label,
        )  # fmt: skip
        labelled.add(label)
    if labelled:
        ax.legend(fontsize="small")


OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
"""Okabe and Ito's colours, told apart with every kind of colour blindness; each series also gets its own
line style and marker (SERIES_STYLES), so that none is told by colour alone, nor in greyscale print."""
SERIES_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P"), ("-.", "X"))


def _series_style(index: int) -> dict[str, Any]:
    """The colour, line style and marker of a plot's index-th series."""
    linestyle, marker = SERIES_STYLES[index % len(SERIES_STYLES)]
    return {"color": OKABE_ITO[index % len(OKABE_ITO)], "linestyle": linestyle, "marker": marker}


def plot_roc_curves(curves: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """One-vs-rest ROC curve per class, AUC in the legend, against the chance diagonal."""
    fig = Figure(figsize=(5.6, 5.2), layout="constrained")
    ax = fig.subplots()
    for index, (name, curve) in enumerate(curves.items()):
        style = _series_style(index)
        ax.plot(
            curve["fpr"], curve["tpr"], linewidth=1.8, label=f"{name} (AUC {curve['auc']:.3f})",
            color=style["color"], linestyle=style["linestyle"],
        )  # fmt: skip
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if not curves:
        _no_data(ax, "no class has both positives and negatives")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title("ROC curves (one vs rest)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_reliability_diagram(bins: Mapping[str, Any], path: str | Path) -> Path:
    """Accuracy per confidence bin against the diagonal, the gap to mean confidence shaded, counts below."""
    rows = bins["bins"]
    lower = np.array([row["lower"] for row in rows])
    width = np.array([row["upper"] - row["lower"] for row in rows])
    filled = np.array([row["count"] > 0 for row in rows])
    accuracy = np.array([row["accuracy"] if row["count"] else 0.0 for row in rows])
    confidence = np.array([row["confidence"] if row["count"] else 0.0 for row in rows])
    fig = Figure(figsize=(5.6, 6.2), layout="constrained")
    ax, count_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(lower, accuracy, width=width, align="edge", color="#4c72b0", edgecolor="black", label="accuracy")
    # Hatching over a see-through face: an under-confident bin's gap lies inside its accuracy bar.
    ax.bar(
        lower[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=width[filled],
        align="edge",
        facecolor="none",
        edgecolor="black",  # the hatch: black on the blue bars, told apart in greyscale too
        hatch="///",
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Accuracy")
    floor = (
        f"; {bins['ece_floor']:.3f} ± {bins['ece_floor_sd']:.3f} if perfectly calibrated"
        if bins.get("ece_floor") is not None
        else ""
    )  # ECE's sampling floor at this many images (metrics.ece_floor)
    ax.set_title(f"Reliability (ECE {bins['ece']:.3f}{floor})", fontsize="medium")
    ax.legend(loc="upper left", fontsize="small")
    count_ax.bar(
        lower, [row["count"] for row in rows], width=width, align="edge", color="grey", edgecolor="black"
    )
    count_ax.set_xlabel("Confidence (top-class probability)")
    count_ax.set_ylabel("Samples")
    return _save(fig, path)


def plot_overlaid_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    metric: str,
    path: str | Path,
    kept_epochs: Mapping[str, int] | None = None,
) -> Path:
    """Save overlaid_curves_figure(histories, metric, kept_epochs) as a PNG at path."""
    return _save(overlaid_curves_figure(histories, metric, kept_epochs), path)


def overlaid_curves_figure(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    metric: str,
    kept_epochs: Mapping[str, int] | None = None,
) -> Figure:
    """One metric against epoch for several runs on one axes; kept_epochs (run → epoch) ringed."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    kept_points = []
    for index, (name, history) in enumerate(histories.items()):
        epochs, values = _series(history, metric)
        if epochs:
            style = _series_style(index)
            if len(epochs) > 30:
                style["marker"] = None
            ax.plot(epochs, values, markersize=4, label=name, **style)
        kept = (kept_epochs or {}).get(name)
        if kept in epochs:
            kept_points.append((kept, values[epochs.index(kept)]))
    if kept_points:
        ax.plot(
            *zip(*kept_points, strict=True), linestyle="none", marker="o", markersize=11,
            markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.5, label="kept checkpoint",
        )  # fmt: skip
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, f"no run reports {metric}")
    ax.set_xlabel("Epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    return fig


def html_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A horizontally scrolling HTML table of list-of-dicts rows (columns as first seen), text escaped.

    Numbers are shown as format_number does; None as a dash; booleans as yes / no; lists and dicts as JSON.
    Header cells are scoped, and each row's first cell is its header, so that a screen reader reading a
    cell names its row (the class, the architecture) as well as its column.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f'<th scope="col">{html.escape(column_label(column))}</th>' for column in columns)
    body = "".join(
        "<tr>"
        + "".join(_table_cell(row.get(column), header=i == 0) for i, column in enumerate(columns))
        + "</tr>\n"
        for row in rows
    )
    return (
        f'<div class="table-wrap"><table>\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}</tbody>\n</table></div>\n"
    )


COLUMN_LABELS = {"n": "images", "macro_f1": "macro-F1", "mean_probability": "mean p"}
"""Metric keys whose words are not their parts'; the rest read by LABEL_WORDS."""
LABEL_WORDS = {
    "ece": "ECE",
    "nll": "NLL",
    "f1": "F1",
    "auroc": "AUROC",
    "auc": "AUC",
    "iou": "IoU",
    "dice": "Dice",
}


def column_label(key: Any) -> str:
    """A table's column in words: a metric key as a reader writes it, a label already in words as it is.

    >>> [column_label(k) for k in ("balanced_accuracy", "ece_floor_sd_before", "n", "accuracy 95% CI")]
    ['balanced accuracy', 'ECE floor sd before', 'images', 'accuracy 95% CI']
    """
    text = str(key)
    if " " in text:
        return text
    return COLUMN_LABELS.get(text) or " ".join(LABEL_WORDS.get(word, word) for word in text.split("_"))


def format_number(value: float | np.integer[Any] | np.floating[Any]) -> str:
    """A number in the notation its magnitude needs, about 3–4 significant figures and at most 3 decimals.

    Integers get thousands separators (11,689,512); floats below 0.01 in size go scientific (3.2e-04), as
    do those from 1e9; the rest keep 3 decimals below 10 (0.913), then fewer as they grow (412.4, 1,234).
    """
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    number = float(value)
    size = abs(number)
    if not math.isfinite(number) or number == 0.0:
        return f"{number:.3f}"
    if size < 1e-2 or size >= 1e9:
        return f"{number:.1e}"
    decimals = min(3, max(0, 3 - math.floor(math.log10(size))))
    return f"{number:,.{decimals}f}"


def write_html_report(
    path: str | Path, title: str, sections: Sequence[ReportSection], lead: str = ""
) -> Path:
    """Write one self-contained HTML file: inline CSS, images embedded as base64, no scripts or assets.

    `lead` is markup put right under the title (a one-line summary); like ReportSection.html, it is
    inserted as is.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if lead:
        parts.append(lead.replace('<p class="lead alert">', ALERT_OPEN))
    for section in sections:
        parts.append(f"<section>\n<h2>{html.escape(section.heading)}</h2>")
        if section.html:
            parts.append(section.html)
        if section.images:
            parts.append('<div class="images">')
            parts.extend(
                _embedded_image(Path(image), section.image_width, section.alts.get(Path(image).stem))
                for image in section.images
            )
            parts.append("</div>")
        if section.table is not None:
            parts.append(html_table(section.table))
        parts.append("</section>")
    parts.append("</body>\n</html>\n")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(parts), encoding="utf-8")
    return target


def _per_class_row(name: str, stats: Mapping[str, Any], predicted: int, total: int = 0) -> dict[str, Any]:
    """One class's row. A class with no image in the evaluated split has no recall or F1 (a dash, not 0.000,
    and left out of the macro averages, as classification_metrics leaves it), only the precision of the
    `predicted` predictions made of it; a class never predicted has no precision (a dash: 0.000 would read
    as every such call wrong; the macro average counts it 0, as scikit-learn does). With `total`, the
    images evaluated: the class's share of them beside its mean served probability ("mean p")."""
    row = {"class": name, **{column: stats[column] for column in PER_CLASS_COLUMNS}}
    if "recall_ci95" in stats:  # beside the recall (evaluations written before it have none)
        row = {**{k: v for k, v in row.items() if k not in ("f1", "support", "auroc")},
               "recall 95% CI": interval_text(stats["recall_ci95"]),
               **({"specificity": stats["specificity"]} if "specificity" in stats else {}),
               **{k: row[k] for k in ("f1", "support", "auroc")}}  # fmt: skip
    if stats.get("mean_probability") is not None and total:  # what the probabilities say beside the share
        row.update({"share": stats["support"] / total, "mean p": stats["mean_probability"]})
    if stats["support"] == 0:
        row.update({"class": f"{name} (no images here)", "recall": None, "f1": None, "auroc": None})
    if predicted == 0:
        row["precision"] = None
    return row


def metrics_table(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-class rows (class, precision, recall and its 95% interval, specificity, f1, support, auroc, and
    with the probabilities the class's share and mean p) and a macro row, for the report."""
    predicted = [sum(column) for column in zip(*metrics["confusion_matrix"], strict=True)]
    rows = [
        _per_class_row(name, stats, count, int(metrics["n"]))
        for (name, stats), count in zip(metrics["per_class"].items(), predicted, strict=True)
    ]
    rows.append(
        {
            "class": "macro",
            "precision": metrics["macro_precision"],
            "recall": metrics["macro_recall"],
            "f1": metrics["macro_f1"],
            "support": metrics["n"],
            "auroc": metrics["macro_auroc"],
        }
    )
    return rows


def write_evaluation_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]] | None = None,
    card: Mapping[str, Any] | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    title: str = "Evaluation report",
    evaluated: Mapping[str, Any] | None = None,
    external: Mapping[str, Mapping[str, Any]] | None = None,
    holdout: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, the plots and report.html into out_dir; returns file stem → path.

    `metrics` comes from classification_metrics(..., with_curves=True). `extra` holds further results by
    name (another evaluation of the same model: with ground-truth masks, a held-out source); each is saved
    under its name in metrics.json and gets its own section. training_curves.png needs a non-empty history.
    `evaluated` (which model, dataset and split) and `external` (the `external` and `internal_comparison`
    blocks of cxrcore.evaluate.external) are saved under their names, as is `holdout` (its `source_holdout`
    block) under source_holdout; the report leads with their warnings and verdicts, and an external
    validation or source hold-out section comes first.
    """
    missing = [key for key in ("reliability", "roc") if key not in metrics]
    if missing:
        raise ValueError(
            f"metrics lack {', '.join(missing)}: "
            "compute them with classification_metrics(..., with_curves=True)"
        )
    extra = dict(extra or {})
    blocks = {
        **({"evaluated": dict(evaluated)} if evaluated else {}),
        **(external or {}),
        **({"source_holdout": dict(holdout)} if holdout else {}),
    }
    clashes = sorted((set(extra) | set(blocks)) & set(metrics)) + sorted(set(extra) & set(blocks))
    if clashes:
        raise ValueError(f"extra result names {clashes} clash with metric or block names; rename them")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = metrics["classes"]

    paths = {"metrics": out / "metrics.json"}
    document = {**metrics, **blocks, **extra}
    paths["metrics"].write_text(json.dumps(document, indent=2, default=_json_default) + "\n")
    matrix = metrics["confusion_matrix"]
    paths["confusion_matrix"] = plot_confusion_matrix(
        matrix, classes, out / "confusion_matrix.png", normalized=False
    )
    paths["confusion_matrix_normalized"] = plot_confusion_matrix(
        metrics["confusion_matrix_normalized"],
        classes,
        out / "confusion_matrix_normalized.png",
        normalized=True,
    )
    paths["roc_curves"] = plot_roc_curves(metrics["roc"], out / "roc_curves.png")
    paths["reliability"] = plot_reliability_diagram(metrics["reliability"], out / "reliability.png")
    if history:
        paths["training_curves"] = plot_training_curves(history, out / "training_curves.png")

    sections = []
    if evaluated:
        sections.append(ReportSection("Evaluated", table=facts_table(evaluated)))
    if external:
        sections += external_sections(external["external"], external["internal_comparison"])
    if holdout:
        sections.append(holdout_section(holdout))
    sections += [
        ReportSection("Headline metrics", table=_headline_rows(metrics)),
        ReportSection("Per-class metrics", table=metrics_table(metrics)),
        ReportSection(
            "Confusion matrix",
            images=[paths["confusion_matrix"], paths["confusion_matrix_normalized"]],
            table=counts_table(matrix, classes),  # the counts as text too, for readers the picture fails
            alts={
                "confusion_matrix": "Confusion matrix of counts, rows the true class, columns the predicted "
                "one; the counts are in the table below",
                "confusion_matrix_normalized": "The same matrix with each row as fractions of its class",
            },
        ),
        ReportSection(
            "ROC and calibration",
            html=_missing_roc_note(classes, metrics["roc"]),
            images=[paths["roc_curves"], paths["reliability"]],
            alts={"roc_curves": _roc_alt(metrics["roc"]), "reliability": _reliability_alt(metrics)},
        ),
    ]
    if "training_curves" in paths:
        alt = "Training curves by epoch: losses, and validation accuracy and macro-F1; the card's history"
        sections.append(training_curves_section(paths["training_curves"], history or [], alt))
    for name, result in extra.items():
        table = metrics_table(result) if "per_class" in result else None
        notes = "".join(
            f"<p>{html.escape(result[key])}</p>" for key in NOTE_KEYS if isinstance(result.get(key), str)
        )
        figures = {key: value for key, value in result.items() if key not in NOTE_KEYS}
        sections.append(ReportSection(name, html=notes + html_table(_headline_rows(figures)), table=table))
    if card:  # last: the figures first, for a reader under pressure
        sections.append(ReportSection("Model card", table=facts_table(card)))
    lead = evaluation_lead(evaluated or {}, (external or {}).get("internal_comparison"), holdout)
    paths["report"] = write_html_report(out / "report.html", title, sections, lead=lead)
    return paths


def external_sections(external: Mapping[str, Any], comparison: Mapping[str, Any]) -> list[ReportSection]:
    """The external validation: internal beside external, what was scored and how, one-vs-rest figures."""
    from cxrcore.evaluate.external import LARGE_DROP_REASON
    from cxrcore.evaluate.external import _fixed as fixed

    kind = comparison["reference"]
    internal_column = f"internal ({kind})" if kind else "internal"
    rows = [
        {
            "metric": column_label(name),
            internal_column: row["internal"],
            "external": row["external"],
            "drop": row["drop"],
        }
        for name, row in comparison["figures"].items()
    ]
    overlap = external["overlap_with_training_data"]
    if not overlap.get("checked"):
        overlap_text = f"not checked: {overlap.get('reason')}"
    elif overlap["total"]:
        counts = ", ".join(f"{count} in {split}" for split, count in overlap["in_split"].items() if count)
        named = (("pixel_exact", "pixel-exact"), ("near", "near"))
        kinds = [f"{overlap[kind]} {name}" for kind, name in named if overlap.get(kind)]
        near = overlap.get("near_duplicate_bits") is not None
        what = f"copies: {', '.join(kinds)}" if near else "pixel-exact copies"
        overlap_text = f"{counts} of the model's dataset {overlap['dataset']} ({what})"
        unseen = external.get("unseen")
        if unseen is not None:
            overlap_text += (
                f"; the {unseen['n']} images that copy none of its train or val images: accuracy "
                f"{fixed(unseen['accuracy'])} (95% CI {interval_text(unseen['accuracy_ci95'])}), "
                f"macro-F1 {fixed(unseen['macro_f1'])}"
            )
    elif overlap.get("near_duplicate_bits") is not None:
        overlap_text = (
            f"none of these images, nor a near copy of one (within {overlap['near_duplicate_bits']} bits of "
            f"perceptual hash), is in the model's dataset {overlap['dataset']}"
        )
    else:
        overlap_text = (
            f"none of these images is in the model's dataset {overlap['dataset']} (pixel-exact check)"
        )
    if overlap.get("checked") and overlap.get("read_from", "the dataset") != "the dataset":
        overlap_text += f"; its images read from {overlap['read_from']}"
    trained_on = external["trained_on"]
    point = external["operating_point"]
    facts = [
        ("Data", f"{external['dataset']} (fingerprint {external['fingerprint'] or 'unknown'}), split "
         f"{external['split']}: {external['n']} images"),
        ("Model trained on", f"{trained_on.get('dataset') or 'unknown'} "
         f"(fingerprint {trained_on.get('fingerprint') or 'unknown'})"),
        ("Overlap with the model's data", overlap_text),
        ("Classes present", ", ".join(external["classes_present"])),
        ("Classes absent", ", ".join(external["classes_absent"]) or "none"),
        ("Predicted although absent",
         ", ".join(f"{name}: {count}" for name, count in external["predicted_absent"].items()) or "none"),
        ("Operating point", f"{point['rule']}; temperature {format_number(point['temperature'])}"),
        ("Lung masks", external["masks"]),
        ("Internal figures", comparison["source"] or "none on the card"),
        ("Internal figures over", f"the {comparison['restricted_n']} internal images of "
         f"{', '.join(comparison['restricted_to'])}" if comparison["restricted_to"] else "every class"),
        ("Large drop", LARGE_DROP_REASON),
    ]  # fmt: skip
    items = "".join(f"<li><b>{html.escape(k)}:</b> {html.escape(str(v))}</li>" for k, v in facts)
    per_class = [
        {
            "class": name,
            "positives": stats["positives"],
            "sensitivity": stats["sensitivity"],
            "sensitivity 95% CI": interval_text(stats["sensitivity_ci95"]),
            "negatives": stats["negatives"],
            "specificity": stats["specificity"],
            "specificity 95% CI": interval_text(stats["specificity_ci95"]),
        }
        for name, stats in external["one_vs_rest"].items()
    ]
    return [
        ReportSection("External validation", html=html_table(rows) + f"<ul>{items}</ul>"),
        ReportSection(
            "Sensitivity and specificity (one vs rest, at the served operating point)",
            html="<p>Each class present against every other image of this dataset. A class's sensitivity is "
            "its recall in the per-class table and its specificity the table's too; here with their counts "
            "and both intervals.</p>",
            table=per_class,
        ),
    ]


def holdout_section(holdout: Mapping[str, Any]) -> ReportSection:
    """The source hold-out: the random split beside the held-out sources, and what each side holds."""
    from cxrcore.evaluate.external import LARGE_DROP_REASON

    facts = [(label.capitalize(), _side_text(side)) for label, side in _holdout_sides(holdout)]
    if holdout["restricted_to"]:
        classes = ", ".join(holdout["restricted_to"])
        facts.append(("Random split over", f"the classes the held-out sources hold: {classes}"))
    facts.append(("Large drop", LARGE_DROP_REASON))
    items = "".join(f"<li><b>{html.escape(k)}:</b> {html.escape(v)}</li>" for k, v in facts)
    intro = (
        "<p>The test split scored apart: images from the sources training saw (a random split, which "
        "shares their sites) and images from the sources ingest held out (sites the model never saw).</p>"
    )
    table = html_table(holdout_rows(holdout))
    return ReportSection("Source hold-out", html=f"{intro}{table}<ul>{items}</ul>")


def holdout_rows(holdout: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The source hold-out table of the report and `cxr evaluate`: each side, then the drop between them."""
    columns = ("images", "n", "accuracy", "accuracy 95% CI", "macro-F1")
    rows: list[tuple[Any, ...]] = [
        (label, side["n"], side["accuracy"], interval_text(side["accuracy_ci95"]), side["macro_f1"])
        for label, side in _holdout_sides(holdout)
    ]
    rows.append(("drop", None, holdout["drop"]["accuracy"], None, holdout["drop"]["macro_f1"]))
    return [dict(zip(columns, row, strict=True)) for row in rows]


def evaluation_lead(
    evaluated: Mapping[str, Any],
    comparison: Mapping[str, Any] | None,
    holdout: Mapping[str, Any] | None = None,
) -> str:
    """The warnings and verdicts put under the title: red where the figures must not be trusted as is."""
    from cxrcore.evaluate.external import verdict_alarming

    parts = []
    if evaluated.get("note"):
        note = html.escape(f"This evaluation {evaluated['note']}.")
        parts.append(f'<p class="lead alert">{note}</p>')
    if evaluated.get("classes_note"):
        parts.append(f'<p class="lead">{html.escape(evaluated["classes_note"])}</p>')
    if evaluated.get("missed"):
        missed = html.escape(f"The model {evaluated['missed']}: the accuracy does not show it.")
        parts.append(f'<p class="lead alert">{missed}</p>')
    if evaluated.get("chance"):
        chance = evaluated["chance"]
        parts.append(f'<p class="lead alert">{html.escape(chance[0].upper() + chance[1:])}.</p>')
    if evaluated.get("sources_separate_classes"):
        confound = html.escape(f"In the dataset, {evaluated['sources_separate_classes']}.")
        parts.append(f'<p class="lead alert">{confound}</p>')
    if evaluated.get("unusual_inputs"):
        parts.append(f'<p class="lead alert">{html.escape(evaluated["unusual_inputs"])}.</p>')
    for block in (comparison, holdout):
        if block:
            alert = " alert" if verdict_alarming(block) else ""
            parts.append(f'<p class="lead{alert}">{html.escape(block["verdict"])}</p>')
    return "\n".join(parts)


def _holdout_sides(holdout: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [("random split", holdout["random_split"]), ("held-out sources", holdout["held_out"])]


def _side_text(side: Mapping[str, Any]) -> str:
    """A hold-out side's sources and images per class, in words."""
    counts = ", ".join(f"{name} {count}" for name, count in side["by_class"].items())
    return f"{', '.join(side['sources']) or 'none'}; images per class: {counts or 'none'}"


def with_intervals(row: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`row` with "accuracy 95% CI" right after its accuracy, from the Wilson interval of `metrics`'
    confusion matrix (how far the test set pins the accuracy down), and "macro AUROC 95% CI" after its
    macro AUROC (DeLong's, `macro_auroc_ci95`), and after the ECE the ECE that perfectly calibrated
    probabilities would show on this many images (`ece_floor` ± its spread: an ECE well above it is
    over- or under-confidence, one within it all that this many images can show), each where `metrics`
    has what it needs."""
    matrix = metrics.get("confusion_matrix")
    out: dict[str, Any] = {}
    floor_beside_ece = "ece" in row and "ece_floor" in metrics and "ece_floor_sd" in metrics
    for key, value in row.items():
        if key == "ece_floor" and floor_beside_ece:
            continue  # given once, beside the ECE, with its spread
        out[key] = value
        if key == "accuracy" and matrix:
            out["accuracy 95% CI"] = interval_text(accuracy_interval(matrix))
        if key == "macro_auroc" and "macro_auroc_ci95" in metrics:
            out["macro AUROC 95% CI"] = interval_text(metrics["macro_auroc_ci95"])
        if key == "ece" and floor_beside_ece:
            # the ECE perfectly calibrated probabilities would show on this many images (its sampling floor),
            # not the ECE after temperature scaling, which `ece` already is where the model has a temperature
            out["ECE floor (perfectly calibrated)"] = (
                f"{metrics['ece_floor']:.3f} ± {metrics['ece_floor_sd']:.3f}"
            )
    return out


def interval_text(bounds: Sequence[float] | None) -> str:
    """An interval as `low–high` to 2 decimals, or a dash when there is none."""
    return "-" if bounds is None else f"{bounds[0]:.2f}–{bounds[1]:.2f}"


def _save(fig: Figure, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=_DPI)
    return target


def _no_data(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="grey")


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one key over a history, skipping epochs where it is missing or not a number."""
    epochs, values = [], []
    for index, row in enumerate(history):
        value = row.get(key)
        if _is_number(value) and math.isfinite(value):
            epochs.append(float(row.get("epoch", index + 1)))
            values.append(float(value))
    return epochs, values


def _plot_keys(ax: Axes, history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    for index, key in enumerate(keys):
        epochs, values = _series(history, key)
        if epochs:
            style = _series_style(index)
            if len(epochs) > 30:
                style["marker"] = None
            ax.plot(epochs, values, markersize=3, label=column_label(key), **style)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, "no data")
    ax.set_xlabel("Epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _headline_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row of the headline metrics, the accuracy's 95% interval beside it; for a result without them
    (e.g. segmentation), its scalar values."""
    if "accuracy" in metrics:
        return [with_intervals({key: metrics[key] for key in HEADLINE_METRICS if key in metrics}, metrics)]
    return [{key: value for key, value in metrics.items() if _is_number(value) or isinstance(value, str)}]


def _missing_roc_note(classes: Sequence[str], curves: Mapping[str, Any]) -> str:
    missing = [name for name in classes if name not in curves]
    if not missing:
        return ""
    names = html.escape(", ".join(missing))
    return f"<p>No ROC curve for {names}: a class needs both positives and negatives in the data.</p>"


def _is_number(value: Any) -> TypeGuard[int | float | np.integer[Any] | np.floating[Any]]:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _table_cell(value: Any, header: bool = False) -> str:
    """One cell; `header`: the row's header cell (`<th scope="row">`)."""
    if value is None:
        cell = "<td>—</td>"
    elif isinstance(value, bool | np.bool_):
        cell = f"<td>{'yes' if value else 'no'}</td>"
    elif _is_number(value):
        cell = f'<td class="num">{format_number(value)}</td>'
    elif isinstance(value, Mapping | list | tuple):
        dumped = json.dumps(value, indent=1, default=_display_default)
        cell = f"<td><pre>{html.escape(dumped)}</pre></td>"
    else:
        cell = f"<td>{html.escape(str(value))}</td>"
    return f'<th scope="row"{cell[3:-5]}</th>' if header else cell


FACT_LABELS = {
    "model": "model",
    "checkpoint": "checkpoint folder",
    "weights_sha256": "weights (SHA-256)",
    "fingerprint": "dataset fingerprint",
    "relation": "relation to the training data",
    "mask_source": "mask source",
    "per_source": "per source",
    "classes_note": "classes",
    "missed": "the model",
    "sources_separate_classes": "the dataset's sources",
    "input_check": "input check",
    "unusual_inputs": "unusual images",
    "input_check_counts": "input check",
    "expected_share": "expected share",
    "p_value": "p (as many by chance)",
    "input_spec": "input",
    "image_size": "image size (px)",
    "data": "training data",
    "lr": "learning rate",
    "weight_decay": "weight decay",
    "warmup_epochs": "warmup epochs",
    "batch_size": "batch size",
    "class_weights": "class weights",
    "cpus_per_worker": "CPUs per worker",
    "train_masks": "training masks",
    "max_failures": "max failures",
    "created_at": "created",
    "ece_before": "ECE before",
    "ece_after": "ECE after",
    "nll_before": "NLL before",
    "nll_after": "NLL after",
    "ece_floor_before": "ECE floor before",
    "ece_floor_sd_before": "ECE floor SD before",
    "ece_floor_after": "ECE floor after",
    "ece_floor_sd_after": "ECE floor SD after",
    "gpu": "GPU",
}
"""Words for the keys of a card or an `evaluated` block in the report's fact tables; a key not named here
shows with its underscores as spaces."""


def facts_table(facts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of a two-column table (field, value) for a card or an `evaluated` block, to be read by a person:
    keys in words (FACT_LABELS), a nested mapping one row per entry ("training › learning rate"), a list of
    plain values joined by commas, a float to 6 significant figures (a recorded 3e-4 reads 0.0003, a
    temperature 0.751419), and no row for a missing value. metrics.json and card.json keep every figure.

    >>> facts_table({"input_spec": {"channels": ["image", "mask"]}, "note": None, "lr": 3e-4})
    [{'field': 'input › channels', 'value': 'image, mask'}, {'field': 'learning rate', 'value': '0.0003'}]
    """
    rows: list[dict[str, Any]] = []

    def add(label: str, value: Any, depth: int) -> None:
        if value is None:
            return
        if isinstance(value, Mapping) and value and depth < 2:
            for key, inner in value.items():
                add(f"{label} › {_fact_label(key)}", inner, depth + 1)
            return
        rows.append({"field": label, "value": _fact_value(value)})

    for key, value in facts.items():
        add(_fact_label(key), value, 1)
    return rows


def _fact_label(key: Any) -> str:
    return FACT_LABELS.get(str(key), str(key).replace("_", " "))


def _fact_value(value: Any) -> Any:
    if isinstance(value, bool | np.bool_ | str):
        return value
    if _is_number(value):
        return f"{int(value):,}" if isinstance(value, int | np.integer) else f"{float(value):.6g}"
    if isinstance(value, list | tuple) and all(isinstance(item, str | int | float) for item in value):
        return ", ".join(str(_fact_value(item)) for item in value)
    return value


def counts_table(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """A confusion matrix as table rows: each true class, its count predicted as each class."""
    return [
        {
            "true class": name,
            **{f"predicted {other}": int(count) for other, count in zip(classes, row, strict=True)},
        }
        for name, row in zip(classes, matrix, strict=True)
    ]


def _roc_alt(roc: Mapping[str, Mapping[str, Any]]) -> str:
    aucs = "; ".join(f"{name} AUC {curve['auc']:.3f}" for name, curve in roc.items())
    return f"ROC curves, each class against the rest: {aucs or 'none drawn'}"


def _reliability_alt(metrics: Mapping[str, Any]) -> str:
    return (
        f"Reliability diagram: accuracy against confidence in {ECE_BINS} bins; ECE {metrics['ece']:.3f}, "
        f"its floor on this many images {metrics['ece_floor']:.3f}"
    )


def _embedded_image(path: Path, width: int | None, alt: str | None = None) -> str:
    alt = alt or column_label(path.stem).replace("_", " ")
    mime = _IMAGE_TYPES.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {path}: supported image types are {', '.join(_IMAGE_TYPES)}")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    style = f' style="width:{width}px"' if width else ""
    return f'<img alt="{html.escape(alt)}"{style} src="data:{mime};base64,{data}">'


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def _display_default(value: Any) -> Any:
    """Like _json_default, but anything else shows as its str, so an odd card value cannot fail the report."""
    try:
        return _json_default(value)
    except TypeError:
        return str(value)
