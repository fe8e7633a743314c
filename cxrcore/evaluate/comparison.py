"""The Tune comparison report: every trial, and the best of each architecture side by side."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from cxrcore.config import CANDIDATE
from cxrcore.data import storage
from cxrcore.evaluate.report import (
    ReportSection,
    column_label,
    html_table,
    interval_text,
    plot_confusion_matrix,
    plot_overlaid_curves,
    write_html_report,
)
from cxrcore.labels import CLASSES
from cxrcore.metrics import (
    accuracy_interval,
    beats_commonest_class,
    best_by_validation,
    rank_by_validation,
    within_one_image,
)

CURVES = ("val_macro_f1", "val_loss", "val_accuracy", "train_loss")
CALIBRATION = {
    "temperature": "temperature",
    "test_ece_uncalibrated": "test ECE before",
    "test_ece_floor_uncalibrated": "its floor ± sd",
    "test_ece": "test ECE after",
    "test_ece_floor": "its floor ± sd (after)",
    "test_nll_uncalibrated": "test NLL before",
    "test_nll": "test NLL after",
}
"""The calibration table's columns. Each ECE's floor is the ECE its own probabilities would show on this
many images if they were perfectly calibrated (metrics.ece_floor), with its sampling sd: an ECE within two
sd of its floor is as calibrated as this test split can tell."""
HOLDOUT_COLUMNS = (
    "random-split accuracy",
    "held-out accuracy",
    "random-split macro-F1",
    "held-out macro-F1",
    "large drop",
)
"""The best-of-each table's columns where ingest held sources out (`source_holdout` in the test reports)."""
_CURVE_WIDTH = 540
_MATRIX_WIDTH = 360


def write_comparison_report(out_dir: str | Path, comparison: dict[str, Any]) -> dict[str, Path]:
    """Write comparison.json, overlaid curves, confusion matrices and comparison.html into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "comparison.json"}
    # whole or not at all: a re-run of the experiment reads it to tell whether it had finished
    storage.write_text(
        pafs.LocalFileSystem(), str(paths["json"]), json.dumps(comparison, indent=2, default=str) + "\n"
    )
    ranked = ranked_architectures(comparison["best"])
    sections = []
    segmenter = comparison.get("segmenter")
    if segmenter:
        row = {
            "model": segmenter["model"],
            "registered as": segmenter["ref"],
            "val Dice": segmenter["val_dice"],
        }
        row.update({f"test {k}": v for k, v in segmenter["test"].items()})
        sections.append(
            ReportSection("Lung segmenter (supplies masks to the dual-channel model)", table=[row])
        )
    if ranked:
        kept = {model: row["best_epoch"] for model, row in ranked if row.get("best_epoch") is not None}
        note = "Every epoch each trial ran." + (
            " A ring marks the epoch whose checkpoint was kept." if kept else ""
        )
        sections += [
            ReportSection("Best of each architecture", html=_best_tables(ranked)),
            ReportSection(
                "Confusion matrices (test split)",
                images=[
                    plot_confusion_matrix(
                        row["confusion_matrix"],
                        CLASSES,
                        out / f"confusion_matrix_{model}.png",
                        normalized=False,
                        title=f"{model} — test, counts",
                    )
                    for model, row in ranked
                ],
                image_width=_MATRIX_WIDTH,
                alts={
                    f"confusion_matrix_{model}": f"{model}, test counts, rows the true class and columns the "
                    "predicted one: "
                    + "; ".join(
                        f"{name} {', '.join(map(str, counts))}"
                        for name, counts in zip(CLASSES, row["confusion_matrix"], strict=True)
                    )
                    for model, row in ranked
                },
            ),
            ReportSection(
                "Training curves of the best trials",
                html=f"<p>{note}</p>",
                images=_curves(out, ranked, kept),
                image_width=_CURVE_WIDTH,
                alts={
                    f"curves_{metric}": f"{column_label(metric)} by epoch, one line per architecture's best "
                    "trial (the figures are in comparison.json)"
                    for metric in CURVES
                },
            ),
        ]
    spread = comparison.get("seeds")
    if spread:
        note = (
            "For each seed, each architecture's best trial of that seed, ranked as the winner is chosen: "
            "how far a score moves with the seed alone, and whether another seed would have chosen "
            "another architecture."
        )
        sections.append(
            ReportSection(
                "Over seeds (validation macro-F1)", html=f"<p>{note}</p>", table=_seed_table(spread)
            )
        )
    trials = rank_by_validation(comparison["trials"], dict)
    sections.append(ReportSection("All trials", table=[_trial_row(trial) for trial in trials]))
    failed = [trial for trial in trials if trial.get("error")]
    if failed:
        rows = [{"trial": t["trial_id"], "model": t["model"], "error": t["error"]} for t in failed]
        sections.append(ReportSection(f"Failed trials ({len(failed)})", table=rows))
    # red where there is no winner, or one not shown to beat always answering the commonest class
    doubtful = not ranked or not_shown_above_chance(ranked[0][1])
    leads = [
        (
            winner_line(comparison["best"], architectures_asked(comparison)),
            "lead alert" if doubtful else "lead",
        )
    ]
    kept = comparison.get("production_kept") or {}
    if "better_on_this_data" in kept:
        leads.append((kept_better_line(kept), "lead alert"))
    if "not_above_chance" in kept:
        leads.append((kept_chance_line(comparison["production"], kept), "lead alert"))
    if "not_asked" in kept:
        leads.append((kept_candidate_line(comparison["production"], kept), "lead"))
    leads += [(line, "lead alert") for line in holdout_warnings(comparison["best"])]
    leads += [(line, "lead alert") for line in chance_warnings(comparison["best"])]
    if comparison.get("sources_separate_classes"):
        leads.append((f"In the dataset, {comparison['sources_separate_classes']}.", "lead alert"))
    epochs = (comparison.get("settings") or {}).get("segmenter_epochs")
    if segmenter := segmenter_warning(comparison.get("segmenter"), epochs):
        leads.append((segmenter[0].upper() + segmenter[1:] + ".", "lead alert"))
    leads += [(seeds_line(spread), "lead")] if spread else []
    leads += [(line, "lead alert") for line in seed_warnings(comparison["best"], spread)]
    lead = "\n".join(f'<p class="{kind}">{html.escape(text)}</p>' for text, kind in leads)
    paths["html"] = write_html_report(
        out / "comparison.html", f"Architecture comparison: {comparison['dataset']}", sections, lead=lead
    )
    return paths


def ranked_architectures(best: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(model, row) pairs of the best of each architecture, best first, in the order the production model is
    chosen (cxrcore.metrics.best_by_validation): validation macro-F1 (val_score), and among scores within one
    validation image of each other, the lower validation loss. An architecture whose trials all failed
    (its best checkpoint from before the failure, `failed`) ranks after every one whose trial finished."""
    ranked = rank_by_validation(best.items(), lambda item: item[1])
    return [item for item in ranked if not item[1].get("failed")] + [
        item for item in ranked if item[1].get("failed")
    ]


PAIRED_ALPHA = 0.05
"""The exact McNemar p-value under which the winner and runner-up are said to differ on the test split."""


def _versus_line(model: str, paired: Mapping[str, Any] | None) -> str:
    """The winner beside the runner-up on the same test images (tune's `versus_runner_up`), or "".

    >>> import textwrap
    >>> paired = {"model": "dual", "n": 48, "only_this": 9, "only_other": 7, "mcnemar_p": 0.804}
    >>> print(textwrap.fill(_versus_line("resnet", paired).strip(), 100))
    On the same 48 test images, resnet got 9 right that dual missed and dual 7 that resnet missed (exact
    McNemar p = 0.80): the test split does not tell them apart.
    """
    if not paired:
        return ""
    other, p, this_n, other_n = (
        paired["model"],
        paired["mcnemar_p"],
        paired["only_this"],
        paired["only_other"],
    )
    ahead = model if this_n > other_n else other
    verdict = (
        f"a difference beyond chance, in {ahead}'s favour"
        if p < PAIRED_ALPHA
        else "the test split does not tell them apart"
    )
    return (
        f" On the same {paired['n']} test images, {model} got {this_n} right that {other} missed and "
        f"{other} {other_n} that {model} missed (exact McNemar p = {p:.2f}): {verdict}."
    )


def kept_better_line(kept: Mapping[str, Any]) -> str:
    """Why production stayed where it was: on the same validation images it ranks above the winner.

    >>> import textwrap
    >>> held = {"ref": "dual_cnn:2", "val_score": 0.95, "val_loss": 0.2, "val_count": 40}
    >>> winner = {**held, "ref": "cnn_lstm:1", "val_score": 0.8, "val_loss": 0.5}
    >>> print(textwrap.fill(kept_better_line({"better_on_this_data": held, "winner": winner}), 100))
    Production stays dual_cnn:2: trained on this dataset, it scores validation macro-F1 0.950 (loss
    0.200) on the same 40 images, against the winner's 0.800 (loss 0.500); `cxr models promote
    cnn_lstm:1` serves the winner.
    """
    held, winner = kept["better_on_this_data"], kept["winner"]

    def figures(row: Mapping[str, Any]) -> str:
        loss = row.get("val_loss")
        return _fixed(row["val_score"]) + ("" if loss is None else f" (loss {loss:.3f})")

    images = f" {held['val_count']}" if held.get("val_count") else ""
    return (
        f"Production stays {held['ref']}: trained on this dataset, it scores validation macro-F1 "
        f"{figures(held)} on the same{images} images, against the winner's {figures(winner)}; "
        f"`cxr models promote {winner['ref']}` serves the winner."
    )


def kept_candidate_line(production: str | None, kept: Mapping[str, Any]) -> str:
    """Why production stayed where it was: `cxr tune --promote never` asked it to."""
    if production == kept["not_asked"]:  # promoted since, by a review
        return f"The winner, {production}, is production already (--promote never moved nothing)."
    return (
        f"Production stays {production or '(none)'}, as --promote never asks: the winner, "
        f"{kept['not_asked']}, is the alias {CANDIDATE}; `cxr models promote {CANDIDATE}` serves it once "
        "reviewed."
    )


def kept_chance_line(production: str | None, kept: Mapping[str, Any]) -> str:
    """Why production stayed where it was: the winner is not shown to beat answering the commonest class."""
    if production is None:
        return (
            f"No version is production: the winner, {kept['not_above_chance']}, is not shown to beat always "
            "answering its test split's commonest class, so it is only the alias candidate; `cxr models "
            "promote candidate` serves it after a review, or `cxr serve --model candidate` tries it."
        )
    return (
        f"Production stays {production}: the winner, {kept['not_above_chance']}, is not shown to beat always "
        "answering its test split's commonest class, and does not replace a production version on that; "
        f"`cxr models promote {kept['not_above_chance']}` serves it anyway."
    )


def winner_line(
    best: Mapping[str, Mapping[str, Any]], asked: int | None = None, *, production_note: bool = True
) -> str:
    """One sentence: which architecture won (the production one), on what score, by how much over the next.
    `asked`: how many architectures the comparison was asked for (the settings' `models`); one alone is
    not said to be the only one that "produced a checkpoint", as if others had failed. `production_note`:
    say where production stays if a re-run kept it elsewhere (the console says it on a line of its own)."""
    ranked = ranked_architectures(best)
    if not ranked:
        return "No architecture produced a checkpoint: nothing was evaluated, registered or promoted."
    model, row = ranked[0]  # the winner by validation, also where production was moved to another since
    registered = f"registered {row['ref']}" + (", production" if row.get("production") else "")
    if row.get("failed"):
        registered += f"; not promoted: its trial failed ({row['failed']})"
    images = f" ({row['val_count']} images)" if row.get("val_count") else ""  # what one image weighs
    seeds = row.get("seeds_trained") or 1  # --repeats: the figure is the best seed's, not a typical one
    best_seed = f", its best of {seeds} seeds (seed {row.get('seed')})" if seeds > 1 else ""
    line = f"{model} ({registered}) — validation macro-F1 {_fixed(row['val_score'])}{images}{best_seed}"
    others = [(m, r) for m, r in ranked if m != model]
    if others:
        runner_up, other = others[0]
        margin = _score(row["val_score"]) - _score(other["val_score"])
        by_loss = (
            row.get("val_loss") is not None
            and other.get("val_loss") is not None
            and row["val_loss"] <= other["val_loss"]
            and (within_one_image(row, other) if margin <= 0 else within_one_image(other, row))
        )
        if by_loss:
            close = (
                f"tied with {runner_up}"
                if margin == 0
                else f"within one validation image of {runner_up} ({_fixed(other['val_score'])})"
            )
            line += (
                f", {close}; chosen for its lower validation loss "
                f"({row['val_loss']:.3f} vs {other['val_loss']:.3f})"
            )
        else:
            side = "ahead of" if margin >= 0 else "behind"
            its = f", its best of {other['seeds_trained']}" if (other.get("seeds_trained") or 1) > 1 else ""
            line += f", {_fixed(abs(margin))} {side} {runner_up} ({_fixed(other['val_score'])}{its})"
    line += f"; test accuracy {_fixed(row['test_accuracy'])}"
    matrix = row.get("confusion_matrix")
    if matrix:  # a small test split cannot tell close models apart: say how small
        interval = accuracy_interval(matrix)
        line += f" (95% CI {interval_text(interval)}, {sum(map(sum, matrix))} images)"
        # what a model that always answers one class scores on this split
        commonest = max(map(sum, matrix)) / max(1, sum(map(sum, matrix)))
        if interval and interval[1] < commonest:
            line += (
                f", an interval wholly below {_fixed(commonest)}, the score of always answering the test "
                "split's commonest class: worse than it"
            )
        elif interval and interval[0] <= commonest:
            line += (
                f", an interval that reaches {_fixed(commonest)}, the score of always answering the test "
                "split's commonest class: not shown to beat it"
            )
    line += "." + _versus_line(model, row.get("versus_runner_up"))
    kept = next((r["ref"] for m, r in ranked if r.get("production") and m != model), None)
    if kept and production_note:  # a re-run keeps production where it was moved since the first run put it
        line += (
            f" Production stays {kept}, where it was moved since; `cxr models promote {row['ref']}` serves "
            "the winner."
        )
    if others:
        return "Winner: " + line
    return (
        "One architecture compared: " if asked == 1 else "Only one architecture produced a checkpoint: "
    ) + line


def seed_spread(
    trials: Sequence[Mapping[str, Any]], architecture: Callable[[str], str] | None = None
) -> dict[str, Any] | None:
    """Each architecture over the seeds `--repeats` trained it with, or None for one seed.

    For every seed, the comparison as that seed alone would have made it: each architecture's best trial
    of the seed (best_by_validation, as the comparison picks), the architectures ranked as the winner is
    chosen. Per architecture: its validation macro-F1 in each seed, their mean and sample sd, and in how
    many seeds it ranked first. A trial that kept no checkpoint has no score; its architecture's seed is
    then missing.

    >>> runs = [("a", 0, 0.9), ("b", 0, 0.8), ("a", 1, 0.7), ("b", 1, 0.85), ("a", 2, 0.95), ("b", 2, 0.6)]
    >>> trials = [{"model": m, "seed": s, "val_score": v, "best_checkpoint": "c"} for m, s, v in runs]
    >>> spread = seed_spread(trials)
    >>> spread["seeds"], spread["by_model"]["a"]["first"], round(spread["by_model"]["a"]["sd"], 3)
    ([0, 1, 2], 2, 0.132)
    >>> seed_spread(trials[:2]) is None
    True
    """
    name = architecture or (lambda model: model)  # tune's: 'resnet' for its depths where it was named
    scored = [t for t in trials if t.get("seed") is not None and t.get("best_checkpoint")]
    seeds = sorted({int(t["seed"]) for t in scored})
    if len(seeds) < 2:
        return None
    by_model: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        of_seed = [t for t in scored if t["seed"] == seed]
        models = dict.fromkeys(name(t["model"]) for t in of_seed)
        bests = {}
        for m in models:
            mine = [t for t in of_seed if name(t["model"]) == m]
            # as the comparison picks: a finished trial before one that failed
            bests[m] = best_by_validation([t for t in mine if not t.get("error")] or mine, dict)
        ranked = rank_by_validation(bests.items(), lambda item: item[1] or {})
        ranked = [i for i in ranked if not (i[1] or {}).get("error")] + [
            i for i in ranked if (i[1] or {}).get("error")
        ]
        # a first place within one validation image of the second was decided by the validation loss
        close = len(ranked) > 1 and within_one_image(ranked[1][1] or {}, ranked[0][1] or {})
        for place, (model, row) in enumerate(ranked):
            entry = by_model.setdefault(
                model, {"scores": {}, "first": 0, "first_close": 0, "configurations": 1}
            )
            tried = sum(1 for t in of_seed if name(t["model"]) == model)
            entry["configurations"] = max(entry["configurations"], tried)
            entry["scores"][seed] = None if row is None else row.get("val_score")
            entry["first"] += place == 0
            entry["first_close"] += place == 0 and close
    for entry in by_model.values():
        values = [v for v in entry["scores"].values() if v is not None]
        mean = sum(values) / len(values) if values else None
        sd = (
            math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            if mean is not None and len(values) > 1
            else None
        )
        entry.update(mean=mean, sd=sd, low=min(values, default=None), high=max(values, default=None))
        # in the order of `seeds`, None where the seed kept no checkpoint: a dict keyed by seed came back
        # from comparison.json keyed by strings
        entry["scores"] = [entry["scores"].get(seed) for seed in seeds]
    return {"seeds": seeds, "by_model": dict(sorted(by_model.items(), key=lambda i: -_score(i[1]["mean"])))}


def seeds_line(spread: Mapping[str, Any]) -> str:
    """The architectures over the seeds, as one sentence.

    >>> by_model = {"a": {"mean": 0.85, "sd": 0.132, "low": 0.7, "high": 0.95, "first": 2, "scores": []},
    ...             "b": {"mean": 0.75, "sd": 0.13, "low": 0.6, "high": 0.85, "first": 1, "scores": []}}
    >>> import textwrap
    >>> print(textwrap.fill(seeds_line({"seeds": [0, 1, 2], "by_model": by_model}), 100))
    Over 3 seeds (0–2), validation macro-F1 mean ± sd (range): a 0.850 ± 0.132 (0.700–0.950), first in 2
    of 3; b 0.750 ± 0.130 (0.600–0.850), first in 1 of 3.
    """
    seeds = spread["seeds"]
    named = (
        f"{seeds[0]}–{seeds[-1]}"
        if seeds == list(range(seeds[0], seeds[-1] + 1))
        else ", ".join(map(str, seeds))
    )
    parts = []
    for model, row in spread["by_model"].items():
        sd = "" if row["sd"] is None else f" ± {row['sd']:.3f}"
        close = row.get("first_close") or 0
        tie = f" ({close} of them within one image of the second, on the loss)" if close else ""
        parts.append(
            f"{model} {_fixed(row['mean'])}{sd} ({_fixed(row['low'])}–{_fixed(row['high'])}), first in "
            f"{row['first']} of {len(seeds)}{tie}"
        )
    tried = max((row.get("configurations", 1) for row in spread["by_model"].values()), default=1)
    each = f"; each seed's figure the best of its {tried} configurations" if tried > 1 else ""
    return (
        f"Over {len(seeds)} seeds ({named}{each}), validation macro-F1 mean ± sd (range): "
        + "; ".join(parts)
        + "."
    )


def seed_warnings(best: Mapping[str, Mapping[str, Any]], spread: Mapping[str, Any] | None) -> list[str]:
    """A warning where the winner ranked first in at most half of the seeds: another seed would likely
    have chosen another architecture.

    >>> spread = {"seeds": [0, 1, 2], "by_model": {"a": {"first": 1}, "b": {"first": 2}}}
    >>> seed_warnings({"a": {"val_score": 0.9}, "b": {"val_score": 0.8}}, spread)[0][:58]
    'the winner, a, ranked first in 1 of 3 seeds only (b in 2):'
    """
    ranked = ranked_architectures(best)
    if not spread or len(ranked) < 2:
        return []
    winner, seeds = ranked[0][0], len(spread["seeds"])
    firsts = {model: row["first"] for model, row in spread["by_model"].items()}
    if 2 * firsts.get(winner, 0) > seeds:
        return []
    others = ", ".join(
        f"{m} in {n}" for m, n in sorted(firsts.items(), key=lambda i: -i[1]) if m != winner and n
    )
    return [
        f"the winner, {winner}, ranked first in {firsts.get(winner, 0)} of {seeds} seeds only"
        + (f" ({others})" if others else "")
        + ": which architecture wins depends on the seed; compare them on more data, or more epochs"
    ]


def _seed_table(spread: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per architecture: its validation macro-F1 in each seed, their mean ± sd, its first places."""
    return [
        {
            "architecture": model,
            # as the console prints them (an sd of 0.0036 read "3.6e-03" in the table's own format)
            **{
                f"seed {seed}": _fixed(score)
                for seed, score in zip(spread["seeds"], row["scores"], strict=True)
            },
            "mean": _fixed(row["mean"]),
            "sd": _fixed(row["sd"]),
            "ranked first": f"{row['first']} of {len(spread['seeds'])}",
        }
        for model, row in spread["by_model"].items()
    ]


def _with_sd(row: Mapping[str, Any], key: str) -> Any:
    """`row[key]`, as "value ± sd" where the row has `key`_sd beside it."""
    value, sd = row[key], row.get(f"{key}_sd")
    return f"{value:.3f} ± {sd:.3f}" if value is not None and sd is not None else value


def architectures_asked(comparison: Mapping[str, Any]) -> int | None:
    """How many architectures a comparison was asked for, from its settings (None where it has none)."""
    models = (comparison.get("settings") or {}).get("models")
    return len([name for name in models.split(",") if name.strip()]) if isinstance(models, str) else None


def holdout_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """An architecture's random-split and held-out-source test figures (None where its test report has none,
    so that a table with some keeps the columns together)."""
    holdout = row.get("source_holdout")
    if not holdout:
        return dict.fromkeys(HOLDOUT_COLUMNS)
    seen, held = holdout["random_split"], holdout["held_out"]
    values = (seen["accuracy"], held["accuracy"], seen["macro_f1"], held["macro_f1"], holdout["large_drop"])
    return dict(zip(HOLDOUT_COLUMNS, values, strict=True))


def holdout_warnings(best: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The verdict of each architecture whose held-out-source figures fell by LARGE_DROP or more."""
    return [
        f"{model}: {row['source_holdout']['verdict']}"
        for model, row in ranked_architectures(best)
        if (row.get("source_holdout") or {}).get("large_drop")
    ]


def not_shown_above_chance(row: Mapping[str, Any]) -> bool:
    """Whether a comparison row's test accuracy interval reaches what always answering its test split's
    commonest class scores (False without a confusion matrix: nothing to judge)."""
    return beats_commonest_class(row.get("confusion_matrix") or []) is False


SEGMENTER_DICE_FLOOR = 0.85
"""A lung segmenter's test Dice under which the comparison warns: U-Nets reach 0.95 and more on chest X-ray
lung masks, and a dual-channel model trains and is served on the segmenter's masks, so its figures are the
segmenter's as much as its own. Tune's default gives the segmenter --epochs / 4: one or two epochs on a
few hundred images (104 real ones: Dice 0.50) leave it far from trained."""


def segmenter_warning(segmenter: Mapping[str, Any] | None, epochs: int | None) -> str | None:
    """The comparison's warning of a poor lung segmenter (test Dice under SEGMENTER_DICE_FLOOR), on the
    console and in comparison.html (which had left it out: a real-sample study, session 52).

    >>> segmenter_warning({"test": {"dice": 0.59}}, 2)[:65]
    "the lung segmenter's test Dice is 0.59 after 2 epochs, under 0.85"
    """
    dice = ((segmenter or {}).get("test") or {}).get("dice")
    if dice is None or dice >= SEGMENTER_DICE_FLOOR:
        return None
    trained = f"after {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else "as trained"
    return (
        f"the lung segmenter's test Dice is {dice:.2f} {trained}, under {SEGMENTER_DICE_FLOOR}: "
        "dual-channel models train and are served on its masks. Give it more (--segmenter-epochs), or "
        "more images with lung masks"
    )


def commonest_class_warning(metrics: Mapping[str, Any]) -> str | None:
    """An evaluation's warning where its accuracy is not shown to beat always answering its commonest class
    (`cxr evaluate` printed none, while tune and the registry said so: a real-sample study, session 52,
    saw 0.385 (0.18-0.64) on 13 images, what answering COVID alone scores).

    >>> commonest_class_warning({"confusion_matrix": [[3, 1], [1, 0]]})[:58]
    'accuracy 0.600 (95% CI 0.23–0.88) reaches 0.800, the score'
    >>> commonest_class_warning({"confusion_matrix": [[9, 1], [1, 9]]}) is None
    True
    """
    figures = _chance_figures(metrics.get("confusion_matrix"))
    if figures is None:
        return None
    reaches, n, below = figures
    return (
        f"{reaches} of always answering these images' commonest class: on {n} images the model is not shown "
        "to have learned the task" + (BELOW_CHANCE if below else "")
    )


BELOW_CHANCE = (
    "; below it, on images where one class is this common, the balanced accuracy and each class's recall "
    "say more"
)
"""Where the accuracy's whole 95% interval lies below always answering the commonest class: on an imbalanced
set a model that finds the rare classes (class weights push it to) can score so and still have learned the
task (a verifier, session 56: sensitivity and specificity 0.8, AUROC 0.88, on a set 90 % one class). A
ranking below chance is the macro AUROC's to show (`external.no_better_than_chance`)."""


def _chance_figures(matrix: Sequence[Sequence[int]] | None) -> tuple[str, int, bool] | None:
    """Where a confusion matrix's accuracy is not shown to beat always answering its commonest class:
    "accuracy A (95% CI L–H) reaches C, the score" ("lies wholly below C" where its interval does), the
    images it counts, and whether the interval lies below; None where it is shown to beat it, counts nothing,
    or holds one class only (the accuracy is then that class's recall, and always answering it scores 1:
    `cxr evaluate` on a hospital's COVID cases alone).

    >>> _chance_figures([[1, 9], [1, 9]])[0]
    'accuracy 0.500 (95% CI 0.30–0.70) reaches 0.500, the score'
    >>> _chance_figures([[0, 10], [10, 0]])[0]
    'accuracy 0.000 (95% CI 0.00–0.16) lies wholly below 0.500, the score'
    >>> _chance_figures([[2, 3], [0, 0]]) is None  # one class: its recall, 0.4, is the figure
    True
    """
    if not matrix or not (n := sum(map(sum, matrix))) or beats_commonest_class(matrix) is not False:
        return None
    if sum(1 for row in matrix if sum(row)) < 2:
        return None
    accuracy = sum(matrix[k][k] for k in range(len(matrix))) / n
    commonest = max(map(sum, matrix)) / n
    interval = accuracy_interval(matrix)
    below = interval is not None and interval[1] < commonest
    verb = "lies wholly below" if below else "reaches"
    text = f"accuracy {_fixed(accuracy)} (95% CI {interval_text(interval)}) {verb} {_fixed(commonest)}"
    return f"{text}, the score", n, below


def chance_warnings(best: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each architecture whose test accuracy's 95% interval reaches the score of always answering the test
    split's commonest class: not shown to have learned the task. The winner's too, as an alert of its own:
    its line in the lead said so in a green box, and a model no better than that went to production.

    >>> [line] = chance_warnings({"a": {"val_score": 0.9, "confusion_matrix": [[9, 1], [1, 9]]},
    ...                           "b": {"val_score": 0.5, "confusion_matrix": [[3, 7], [2, 8]]}})
    >>> line.split(", the score")[0]
    'b: test accuracy 0.550 (95% CI 0.34–0.74) reaches 0.500'
    """
    lines = []
    for place, (model, row) in enumerate(ranked_architectures(best)):
        if (figures := _chance_figures(row.get("confusion_matrix"))) is None:
            continue
        reaches, n, below = figures
        role = (" (production)" if row.get("production") else " (the winner)") if place == 0 else ""
        lines.append(
            f"{model}{role}: test {reaches} of always answering the test split's commonest class: not shown "
            "to beat it"
            + (f" on {n} test images; do not serve it on this evidence" if role else "")
            + (BELOW_CHANCE if below else "")
        )
    return lines


def _best_tables(ranked: list[tuple[str, Mapping[str, Any]]]) -> str:
    """Test scores (held-out sources beside when any row has them), calibration (when any row has it) and
    training setup of each architecture's best trial."""
    held_out = any(row.get("source_holdout") for _, row in ranked)
    scores = [
        {
            "architecture": model,
            "registered as": row["ref"] + (" (production)" if row.get("production") else ""),
            "val macro-F1": row["val_score"],
            "test accuracy": row["test_accuracy"],
            "test accuracy 95% CI": interval_text(
                accuracy_interval(row["confusion_matrix"]) if row.get("confusion_matrix") else None
            ),
            "test macro-F1": row["test_macro_f1"],
            **(holdout_columns(row) if held_out else {}),
            "test macro AUROC": row["test_macro_auroc"],
            **{f"test F1 {name}": f1 for name, f1 in row["test_per_class_f1"].items()},
        }
        for model, row in ranked
    ]
    parts = ["<h3>Test split</h3>", html_table(scores)]
    calibration = [
        {
            "architecture": model,
            **{label: _with_sd(row, key) for key, label in CALIBRATION.items() if key in row},
        }
        for model, row in ranked
    ]
    if any(len(row) > 1 for row in calibration):
        heading = "Calibration (temperature fitted on the validation split, measured on the test split)"
        parts += [f"<h3>{heading}</h3>", html_table(calibration)]
    training = [
        {
            "architecture": model,
            "trial": row["trial_id"],
            "parameters": row["parameters"],
            "train images/s (last epoch)": row["train_images_per_s"],
            "epochs run": row["epochs_run"],
            "kept epoch": row.get("best_epoch"),
            "initial weights": row.get("initial_weights", "-"),
            "lr": row["lr"],
            "weight decay": row["weight_decay"],
            "batch": row["batch_size"],
        }
        for model, row in ranked
    ]
    note = (
        "<p>Images/s is the kept trial's last epoch as it ran, sharing the cluster with the trials beside "
        "it: not a speed comparison of the architectures, which <code>python -m jobs.benchmark train</code> "
        "makes on its own.</p>"
    )
    parts += ["<h3>Training</h3>", note, html_table(training)]
    return "\n".join(parts)


def initial_weights_text(data: Mapping[str, Any]) -> str:
    """What a card's weights started from, in a few words (its `data` block): a cxr checkpoint fine-tuned
    (`pretrained_from`), a weights file or the hub's model (`initial_weights`), or none.

    >>> initial_weights_text({})
    'none (from scratch)'
    >>> initial_weights_text({"initial_weights": {"source": "hub:timm/resnet18.a1_in1k"}})
    'hub:timm/resnet18.a1_in1k'
    >>> initial_weights_text({"initial_weights": {"file": "resnet18-1ch.safetensors", "sha256": "ab" * 32,
    ...                                            "source": "rgb.pth"}})
    'resnet18-1ch.safetensors (sha256 abababababab…), from rgb.pth'
    >>> initial_weights_text({"pretrained_from": {"checkpoint": "/r/x/v3", "weights_sha256": "cd" * 32}})
    'cxr checkpoint v3 (sha256 cdcdcdcdcdcd…)'
    """
    if isinstance(lineage := data.get("pretrained_from"), Mapping):
        name = str(lineage.get("checkpoint") or "").rstrip("/").rsplit("/", 1)[-1] or "?"
        return f"cxr checkpoint {name} (sha256 {str(lineage.get('weights_sha256'))[:12]}…)"
    start = data.get("initial_weights")
    if not isinstance(start, Mapping):
        return "none (from scratch)"
    if "file" not in start:
        return str(start.get("source", "?"))
    source = f", from {start['source']}" if start.get("source") else ""
    return f"{start['file']} (sha256 {str(start.get('sha256'))[:12]}…){source}"


def _curves(out: Path, ranked: list[tuple[str, Mapping[str, Any]]], kept: Mapping[str, int]) -> list[Path]:
    """One overlaid plot per metric in CURVES across the best trials' whole histories, kept epochs ringed."""
    histories = {model: row["history"] for model, row in ranked if row.get("history")}
    return [plot_overlaid_curves(histories, metric, out / f"curves_{metric}.png", kept) for metric in CURVES]


def _trial_row(trial: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of a trial worth reading in the All trials table."""
    return {
        "trial": trial["trial_id"],
        "model": trial["model"],
        **({"seed": trial["seed"]} if "seed" in trial else {}),
        "lr": trial["lr"],
        "weight decay": trial["weight_decay"],
        "batch": trial["batch_size"],
        "epochs run": trial["epochs_run"],
        "stopped early": trial.get("stopped_by") or trial["stopped_early"],  # by ASHA or --patience
        "val macro-F1": trial.get("val_score"),
        "error": trial.get("error"),
    }


def _score(value: float | None) -> float:
    """A score for ranking: None (no checkpoint) ranks last."""
    return -math.inf if value is None else float(value)


def _fixed(value: float | None) -> str:
    """A score to 3 decimals, or a dash when missing."""
    return "—" if value is None else f"{value:.3f}"
