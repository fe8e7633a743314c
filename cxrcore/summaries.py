"""What the `cxr` commands print when they finish: the summaries of a folder check, an ingest, a training run,
a comparison and a source hold-out, shared by the single commands and `cxr pipeline`."""

from __future__ import annotations

from typing import Any

from cxrcore.data.layout import DICOM_PATIENT, LISTED, PATIENT_FOLDER, LayoutScan
from cxrcore.tables import format_table


def format_number(value: Any) -> str:
    """A figure as the summaries print it: floats to 3 decimals, as the reports (a fourth would claim a
    precision that a split of a few hundred images does not have)."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_cell(value: Any) -> str:
    """A table cell: a dash where there is no value."""
    return "-" if value is None else format_number(value)


def format_holdout(holdout: dict[str, Any]) -> str:
    """The random split beside the held-out sources, as report.html's table, then the verdict."""
    from cxrcore.evaluate.report import holdout_rows

    rows = holdout_rows(holdout)
    cells = [[format_cell(value) for value in row.values()] for row in rows]
    verdict = ("WARNING: " if holdout["large_drop"] else "") + holdout["verdict"]
    return "\n".join([format_table(list(rows[0]), cells), verdict])


def format_train_result(result: Any) -> str:
    """Human-readable end of `cxr train`: where the run and its best checkpoint are, and how it scored."""
    keys = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_macro_auroc", "val_dice"]
    rows = [
        [key, format_number(result.metrics.get(key)), format_number(result.best_metrics.get(key))]
        for key in keys
        if key in result.metrics
    ]
    lines = [format_table(["metric", "last epoch", "best checkpoint"], rows)]
    if count := result.best_metrics.get("val_count") or result.metrics.get("val_count"):
        lines.append(_validation_size_line(int(count), "val_accuracy" in result.metrics))
    return "\n".join(
        [
            *lines,
            f"run directory:   {result.run_dir or 'none (--workers 0 keeps no run)'}",
            # last: scripts take what follows "best checkpoint:" to the end for the next command
            f"best checkpoint: {result.best_checkpoint or 'none'}",
        ]
    )


def train_warnings(card: Any) -> list[str]:
    """What a finished run's best checkpoint (its card) says against it, in sentences: a validation accuracy
    no higher than always answering the commonest class scores (a learning rate far too high, images that
    carry nothing of their labels). A review (session 57): `--lr 1e3` ended at 0.250 with four balanced
    classes, exit 0, without a word. The bar is the score itself, not its interval's lower end: on the
    16 validation images of a demo-sized run, a model at 0.44 that was learning is not shown to beat 0.25,
    and was told it may have learned nothing. (A class its training split held no image of is said before
    the run starts.)"""
    from cxrcore.metrics import accuracy_interval

    matrix = card.metrics.get("val_confusion_matrix")
    total = sum(map(sum, matrix)) if matrix else 0
    if not total:
        return []
    accuracy, commonest = sum(row[k] for k, row in enumerate(matrix)) / total, max(map(sum, matrix)) / total
    if accuracy > commonest:
        return []
    low, high = accuracy_interval(matrix) or (0.0, 1.0)
    return [
        f"the best checkpoint's validation accuracy, {accuracy:.3f} (95% CI {low:.2f}–{high:.2f}) on {total} "
        f"images, is no higher than always answering the commonest class ({commonest:.3f}): the model may "
        "have learned nothing (a learning rate far too high or too low, too few epochs, labels that do not "
        "follow the images)"
    ]


SMALL_VALIDATION = 100
"""Under this many validation images, `cxr train` says how little one image weighs in its figures."""


def _validation_size_line(count: int, classifier: bool) -> str:
    """What the validation figures rest on: the split's size, and (where small) one image's weight.

    >>> _validation_size_line(13, True)  # doctest: +ELLIPSIS
    'validation: 13 images, on which the best checkpoint was chosen: one image moves accuracy by 0.077; ...'
    """
    line = f"validation: {count} images, on which the best checkpoint was chosen"
    if not classifier or count >= SMALL_VALIDATION:
        return line
    return (
        f"{line}: one image moves accuracy by {1 / count:.3f}; `cxr evaluate` on the test split gives "
        "figures with their 95% intervals"
    )


def format_comparison(comparison: dict[str, Any]) -> str:
    """The winner, the best of each architecture side by side, failed trials, and where the reports are.

    Where ingest held sources out, the random-split and held-out-source test accuracies stand beside the
    others, and each architecture whose held-out figures fall by LARGE_DROP or more gets a warning."""
    from cxrcore.evaluate.comparison import (
        architectures_asked,
        chance_warnings,
        holdout_columns,
        holdout_warnings,
        kept_better_line,
        kept_candidate_line,
        kept_chance_line,
        seed_warnings,
        seeds_line,
        winner_line,
    )

    best = comparison["best"]
    held_out = any(row.get("source_holdout") for row in best.values())
    rows = [
        [model, row["ref"] + (" *" if row.get("production") else ""), format_number(row["val_score"]),
         format_number(row["test_accuracy"]), format_number(row["test_macro_f1"]), row["parameters"],
         f"{row['train_images_per_s'] or 0:.0f}", f"{row.get('best_epoch') or '-'} of {row['epochs_run']}"]
        + ([format_cell(holdout_columns(row)[k]) for k in ("random-split accuracy", "held-out accuracy")]
           if held_out else [])
        for model, row in best.items()
    ]  # fmt: skip
    # img/s: the kept trial's last epoch, beside the trials running with it; epoch: the kept one, of those run
    header = ["architecture", "registered", "val F1", "test acc", "test F1", "params", "img/s", "epoch"]
    header += ["random-split acc", "held-out acc"] if held_out else []
    lines = [
        winner_line(best, architectures_asked(comparison), production_note=False),
        format_table(header, rows),
    ]
    if comparison.get("finished_before"):  # a re-run of a finished experiment trains nothing: say so
        lines.insert(
            0,
            f"{comparison['experiment']} had finished (its comparison.json): no trial was trained again; "
            "the comparison below is made again from its checkpoints and registrations.",
        )
    lines += [f"WARNING: {line}" for line in holdout_warnings(best) + chance_warnings(best)]
    if comparison.get("sources_separate_classes"):
        lines.append(f"WARNING: in the dataset, {comparison['sources_separate_classes']}")
    if comparison.get("seeds"):
        lines.append(seeds_line(comparison["seeds"]))
        lines += [f"WARNING: {line}" for line in seed_warnings(best, comparison["seeds"])]
    if comparison.get("val_unscored"):
        lines.append(f"WARNING: {comparison['val_unscored']}")
    if comparison.get("segmenter"):
        lines += _segmenter_lines(
            comparison["segmenter"], comparison.get("settings", {}).get("segmenter_epochs")
        )
    lines.append(f"production (*): {comparison['production'] or '(none)'}")
    before, kept = comparison.get("production_before"), comparison.get("production_kept")
    if kept and "failed" in kept:
        lines.append(
            f"production stays {comparison['production'] or '(none)'}: every architecture's trials failed, "
            f"so none is promoted; `cxr models promote {kept['failed']}` serves the best checkpoint made "
            "before the failure anyway"
        )
    elif kept and "not_asked" in kept:
        lines.append(kept_candidate_line(comparison["production"], kept))
    elif kept and "better_on_this_data" in kept:
        lines.append(kept_better_line(kept))
    elif kept and "not_above_chance" in kept:
        lines.append(kept_chance_line(comparison["production"], kept))
    elif kept:
        lines.append(
            f"production stays {comparison['production']}: it was moved there after this experiment's "
            f"earlier run promoted {kept['left_by_earlier_run']}; `cxr models promote {kept['winner']}` "
            "serves this run's winner"
        )
    elif before and before != comparison["production"]:
        lines.append(
            f"production moved from {before} to {comparison['production']} (`cxr models promote` moves it)"
        )
    stopped = [t for t in comparison["trials"] if t["stopped_early"]]
    by_patience = sum(1 for t in stopped if t.get("stopped_by") == "--patience")
    patience = f", {by_patience} by --patience" if by_patience else ""
    failed = [t for t in comparison["trials"] if t["error"]]
    lines.append(
        f"trials: {len(comparison['trials'])} ({len(stopped) - by_patience} stopped early by ASHA{patience}, "
        f"{len(failed)} failed)"
    )
    lines += [f"failed trial {t['trial_id']} ({t['model']}): {t['error']}" for t in failed]
    lines += [f"{name}: {path}" for name, path in comparison["reports"].items()]
    return "\n".join(lines)


def _segmenter_lines(segmenter: dict[str, Any], epochs: int | None) -> list[str]:
    """The lung segmenter the dual-channel models read their masks from, and a warning when it is poor."""
    from cxrcore.evaluate.comparison import segmenter_warning

    dice = (segmenter.get("test") or {}).get("dice")
    lines = [
        f"lung segmenter: {segmenter['ref']}, test Dice {format_number(dice)} (dual-channel models' masks)"
    ]
    if warning := segmenter_warning(segmenter, epochs):
        lines.append(f"WARNING: {warning}")
    return lines


def format_scan(scan: LayoutScan, skip_unmapped: bool = False) -> str:
    """Human-readable `cxr data check` output; images without a class close it, as ingest would treat them
    (stop, or with `skip_unmapped` leave them out)."""
    data = scan.to_dict()
    columns = [
        ("images", "images"), ("masks", "masks"), ("pairs", "pairs"), ("no mask", "images_without_mask"),
        ("orphan masks", "masks_without_image"), ("unusable", "unreadable"),
        ("duplicates", "exact_duplicates"), ("meta ok", "metadata_matched"),
        ("meta unmatched", "metadata_unmatched"),
    ]  # fmt: skip
    rows = [[name] + [report[key] for _, key in columns] for name, report in data["classes"].items()]
    rows.append(["total"] + [data["totals"][key] for _, key in columns])
    out = [f"dataset: {scan.root}", format_table(["class"] + [title for title, _ in columns], rows)]
    out.append("sources (images): " + ", ".join(f"{name} {n}" for name, n in scan.sources.items()))
    if confound := scan_confound(scan):
        out.append(f"WARNING: {confound}")
    out += _label_file_lines(data, scan.root)
    for folder in scan.unknown_folders:
        out.append(f"folder with no class and no images (skipped): {folder}")
    for item in scan.unreadable:
        out.append(f"unusable: {item['path']}: {item['reason']}")
    for item in scan.mask_problems:
        out.append(f"mask ignored: {item['path']}: {item['reason']}")
    label_of = {entry.image_path: entry.label for entry in scan.entries} if scan.duplicate_groups else {}
    for group in scan.duplicate_groups:
        labels = {label_of.get(path) for path in group}
        if len(labels) > 1:  # one of the labels is wrong: ingest warns too, and keeps them in one split
            named = ", ".join(f"{path} ({label_of.get(path)})" for path in group)
            out.append(f"identical files under different classes (one label is wrong): {named}")
        else:
            out.append("identical files: " + ", ".join(group))
    for path in scan.orphan_masks[:LISTED]:
        out.append(f"mask without image: {path}")
    if len(scan.orphan_masks) > LISTED:  # the count stood in the table above, the list cut without a word
        out.append(f"and {len(scan.orphan_masks) - LISTED} more masks without an image (--json lists them)")
    for sheet, names in scan.unmatched_metadata.items():
        out.append(f"{sheet}: {len(names)} rows name no image (e.g. {', '.join(names[:3])})")
    out += [f"WARNING: {warning}" for warning in scan.warnings]
    refusal = scan.refusal()
    if refusal and not skip_unmapped:
        out.append(refusal)
    elif refusal:
        out += _left_out_lines(data, scan.root)
    return "\n".join(out)


def scan_confound(scan: LayoutScan) -> str | None:
    """Ingest's warning of classes that no source holds both of, said before the ingest: where
    `--test-sources` can still be chosen."""
    from collections import Counter

    from cxrcore.data.ingest import separated_classes, sources_separate_classes

    by_source_class: dict[str, Counter[str]] = {}
    for entry in scan.entries:
        if entry.label:
            by_source_class.setdefault(entry.source, Counter())[entry.label] += 1
    report = {"source_separates": separated_classes(by_source_class), "by_source_class": by_source_class}
    return sources_separate_classes(report)


def format_ingest_report(report: dict[str, Any]) -> str:
    """Human-readable summary of an ingest report."""
    rows = [
        [label, *counts.values(), sum(counts.values())] for label, counts in report["by_class_split"].items()
    ]
    lines = [
        f"ingested {report['ingested']} of {report['found']} images into {report['out']} "
        f"in {report['seconds']:.1f}s (fingerprint {report['fingerprint']})",
        format_table(["class", "train", "val", "test", "total"], rows),
        f"without mask: {report['without_mask']}; duplicate groups: {report['duplicates']['groups']} "
        f"({report['duplicates']['images_in_groups']} images, each group kept within one split)",
    ]
    patients = report.get("patients") or {}
    if patients.get("column"):
        origin = {
            DICOM_PATIENT: "the DICOMs' PatientID",
            PATIENT_FOLDER: "the folders below each class folder",
        }.get(patients["column"], f"{patients['column']!r} of the label file")
        lines.append(
            f"patients ({origin}): {patients['patients']} for {patients['images']} images, each patient's "
            "images within one split"
        )
    elif str((report.get("config") or {}).get("patient_column") or "").strip().lower() != "none":
        lines.append(_no_patients_line(bool((report.get("labels") or {}).get("label_file"))))
    held_out = set(report["test_sources"])
    rows = [
        [source + (" (held out)" if source in held_out else ""), *counts.values(), sum(counts.values())]
        for source, counts in report["by_source_split"].items()
    ]
    lines.append(format_table(["source", "train", "val", "test", "total"], rows))
    labels, raw = report["labels"], report["raw"]
    lines += _left_out_lines(labels, raw) + _label_file_lines(labels, raw)
    for item in report["rejected"]:
        lines.append(f"rejected: {item['path']}: {item['reason']}")
    for item in report["mask_problems"]:
        lines.append(f"mask ignored: {item['path']}: {item['reason']}")
    lines += [f"WARNING: {warning}" for warning in report["warnings"]]
    replaced = report.get("replaced")
    if replaced:
        lines.append(
            f"replaced the dataset of fingerprint {replaced['fingerprint']} there: "
            f"{_what_changed(replaced)}. "
            "Runs and Tune experiments "
            "on the old one refuse this one (another --name starts afresh), and a model trained on the old "
            "one scores this one as external data, not clean"
        )
    return "\n".join(lines)


def _what_changed(replaced: dict[str, Any]) -> str:
    """An ingest report's `replaced` block in words: what changed for the images both datasets hold."""
    shared = replaced["shared_images"]
    if not shared:
        return "none of its images is in this one"
    changed = [f"{replaced['changed_split']} changed split"]
    if replaced.get("changed_class"):
        changed.append(f"{replaced['changed_class']} class")
    if replaced.get("changed_mask") is not None:
        changed.append(f"{replaced['changed_mask']} lung mask")
    else:
        changed.append("their lung masks not compared (an earlier cxr's fingerprint covered none)")
    return f"of the {shared} images both hold, {', '.join(changed)}"


def _no_patients_line(label_file: bool) -> str:
    """What a dataset that names no patient means for its split, unless asked for no grouping (`none`).

    >>> print(_no_patients_line(False))  # doctest: +ELLIPSIS
    patients: none named (no label file, patient folder or DICOM PatientID): images are split one by one, ...
    """
    if label_file:
        return (
            "patients: the label file names none (no column like Patient ID, MRN or subject_id): images are "
            "split one by one, a patient's films maybe across splits; --patient-column NAME groups them"
        )
    return (
        "patients: none named (no label file, patient folder or DICOM PatientID): images are split one by "
        "one, so a patient's follow-up films may sit in train and test and the test scores read high; "
        "--patient-column folder groups COVID/P0123/*.png by folder, --labels FILE with a patient column "
        "by it"
    )


def _left_out_lines(labels: dict[str, Any], root: str) -> list[str]:
    """The images --skip-unmapped leaves out: labels mapping to no class, or to two."""
    from cxrcore.data.layout import format_paths

    lines = [
        f"left out, label {label!r} maps to no class ({len(paths)}): {format_paths(paths, root)}"
        for label, paths in labels["unmapped"].items()
    ]
    if conflicting := list(labels["conflicting_labels"]):
        lines.append(f"left out, labels of 2 classes ({len(conflicting)}): {format_paths(conflicting, root)}")
    return lines


def _label_file_lines(labels: dict[str, Any], root: str) -> list[str]:
    """Which label file and columns were read, its files not in RAW, and RAW's images it does not name."""
    from cxrcore.data.layout import format_paths

    used = labels["label_file"]
    if not used:
        return []
    source = f"sources from {used['url_column']!r}" if used["url_column"] else "no URL column: source unknown"
    columns = f"files from {used['file_column']!r}, labels from {used['label_column']!r}, {source}"
    if used.get("patient_column"):  # a label file's report from before has none
        columns += f", patients from {used['patient_column']!r} (a patient's images in one split)"
    lines = [f"label file: {used['path']} ({columns})"]
    if missing := labels["missing_files"]:
        lines.append(f"named in the label file but not found ({len(missing)}): {format_paths(missing, root)}")
    if unlabelled := labels["unlabelled"]:
        lines.append(f"not in the label file, skipped ({len(unlabelled)}): {format_paths(unlabelled, root)}")
    return lines
