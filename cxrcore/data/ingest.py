"""Ray Data ingest: decode and validate image/mask pairs once, dedupe, split, write a Parquet dataset."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shlex
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from cxrcore import provenance, telemetry
from cxrcore.config import ConfigError, IngestConfig
from cxrcore.data import storage
from cxrcore.data.layout import (
    DICOM_PATIENT,
    LISTED,
    PATIENT_FOLDER,
    LabelFile,
    LayoutError,
    LayoutScan,
    ManifestEntry,
    decode_image,
    dicom_patient,
    folder_patient,
    format_paths,
    image_problem,
    log_warnings,
    mask_problem,
    read_problem,
    scan_layout,
)
from cxrcore.data.split import (
    SPLITS,
    assign_splits,
    choose_test_sources,
    duplicate_groups,
    names_no_patient,
    patient_groups,
)
from cxrcore.data.transforms import (
    ImageDecodeError,
    binary_mask,
    hash_words,
    perceptual_hash,
    resize_binary_mask,
    resize_image,
)
from cxrcore.labels import CLASSES
from cxrcore.runtime import local_core_limit, storage_error, storage_reason

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

REPORT_NAME = "ingest_report.json"
PIXEL_COLUMNS = ("image", "mask")
"""Stored as raw bytes, one Parquet value per image (row-major size×size uint8), not as Ray's tensor type,
which Parquet holds as a list with one value per pixel: at 256 px that wrote 14× and read 35× slower.
`read_split` and `tensor_column` give them back as arrays, also from datasets written as tensors."""
PIXEL_CODECS = {"image": "none", "mask": "zstd"}
"""Parquet codecs of the pixel columns. An X-ray's 8-bit pixels are noise to a byte-level codec: Snappy
saved 6 % of 130 real X-rays at 256 px and doubled the time to write them and tripled the time to read
them; a lung mask, a few runs of 0 and 255 per row, shrinks by two orders of magnitude under zstd.
The small columns keep Snappy. See `parquet_options`."""
DECODE_BATCH_SIZE = 32
"""The fewest rows of a decode block, and the batch of the one-process baseline (cxrcore.bench.ingest). The
pipeline decodes each block in one batch: on 2 cores, 2,000 images to 256 px in two blocks took 5.95 s
(median of eight) in batches of 1,000 against 6.14 s in batches of 32, lower in 6 of 8 pairs taken in
turns; each batch is a table Ray Data collects, and the block's pixels are bounded by LOCAL_BLOCK_BYTES
here and by about 500 rows on a cluster (`_num_blocks`)."""
WRITE_BATCH_BYTES = 512 * 2**20
"""The most pixel bytes (image and mask) one write task takes: its rows are held while Parquet is written."""
LOCAL_BLOCK_BYTES = 128 * 2**20
"""The most pixel bytes (image and mask) of one decode block on the local cluster, Ray Data's default
target block size: 1,024 rows at 256 px."""


def decode_pair_batch(batch: dict[str, np.ndarray], size: int, min_side: int) -> dict[str, np.ndarray]:
    """Decode, validate and resize a batch of image/mask pairs (a Ray Data `map_batches` function).

    Never raises for bad files: a row whose image cannot be used gets an `error`, a row whose mask
    cannot be used gets a `mask_error` and no mask, so one bad file never loses a batch. A machine that
    cannot start the DICOM decoder's process (DecoderUnavailableError) fails the batch: rejecting good
    files as unreadable would lose them from the dataset.
    """
    n = len(batch["image_path"])
    images = np.zeros((n, size, size), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    has_mask = np.zeros(n, dtype=bool)
    sha256, phash, mask_sha256, errors, mask_errors, patients = ([""] * n for _ in range(6))
    for i in range(n):
        try:
            original, patients[i] = _decode_file(batch["image_path"][i])
        except ImageDecodeError as exc:
            errors[i] = str(exc)
            continue
        if problem := image_problem(original, min_side):
            errors[i] = problem
            continue
        sha256[i] = _content_hash(original)
        images[i] = resize_image(original, size)
        # Of the decoded picture, as sha256: taken on the resized image, a near pair's distance (and so the
        # duplicate groups and the split) depended on --size (9 of 200 phantoms moved between 32 and 64 px).
        phash[i] = perceptual_hash(original)
        mask_path = batch["mask_path"][i]
        if mask_path:
            try:
                mask, _ = _decode_file(mask_path)
            except ImageDecodeError as exc:
                mask_errors[i] = str(exc)
                continue
            if problem := mask_problem(mask, original.shape):
                mask_errors[i] = problem
            else:
                binary = binary_mask(mask)
                mask_sha256[i] = _content_hash(binary)  # as sha256: the same lungs in any encoding or size
                masks[i] = resize_binary_mask(binary, size)
                has_mask[i] = True
    return {
        **batch,
        "image": images,
        "mask": masks,
        "has_mask": has_mask,
        "sha256": np.asarray(sha256),
        "phash": np.asarray(phash),
        "mask_sha256": np.asarray(mask_sha256),
        "error": np.asarray(errors),
        "mask_error": np.asarray(mask_errors),
        "dicom_patient": np.asarray(patients),  # for the split alone (the driver's _index), never stored
    }


def parquet_options(columns: list[str]) -> dict[str, Any]:
    """pyarrow.parquet write options for a table of dataset `columns`: the pixel columns with their own
    codecs (PIXEL_CODECS), and without dictionary encoding and min/max statistics, which no reader uses
    for them and which hash and compare every 64 KB value. For 500 phantoms at 256 px this wrote 2.8×
    and read 4.8× faster than pyarrow's defaults, in a file 1.5 % larger."""
    small = [column for column in columns if column not in PIXEL_CODECS]
    return {
        "compression": {**dict.fromkeys(small, "snappy"), **PIXEL_CODECS},
        "use_dictionary": small,
        "write_statistics": small,
    }


def decode_and_pack(batch: dict[str, np.ndarray], size: int, min_side: int) -> pa.Table:
    """`decode_pair_batch` with the pixels packed as the dataset stores them (see PIXEL_COLUMNS), so the
    blocks the ingest keeps in the object store are Arrow binary columns from the start."""
    return table_with_packed_pixels(decode_pair_batch(batch, size, min_side))


def ingest_dataset(
    config: IngestConfig, scanned: tuple[LayoutScan, set[str]] | None = None
) -> dict[str, Any]:
    """Run the ingest pipeline described by `config` and return its report (also written to OUT).

    `scanned` is `scan_ingest_input(config)` when the caller ran it already (`cxr data ingest` does, so a
    folder it refuses costs no Ray start). Raises LayoutError when no image can be used: nothing is written;
    storage.InUse when another ingest is writing OUT (its staging folder is that run's, not debris).
    """
    from cxrcore.runtime import init_ray

    started = time.perf_counter()  # the report's seconds: the scan included, as before Ray started here
    with writing(config):
        scanned = scanned or scan_ingest_input(config)  # a folder it refuses costs no Ray start
        init_ray(config.address)  # a library caller's too: cxr's local cluster (a no-op once Ray runs)
        return _ingest(config, scanned, started)


@contextmanager
def writing(config: IngestConfig) -> Iterator[None]:
    """Held while an ingest writes OUT: another one writing it fails at once (storage.exclusive), and so
    does this one while a run reads the dataset there (storage.replacing; one that starts reading it during
    the ingest makes the swap wait for it)."""
    with storage.exclusive(config.out, "an ingest", "another OUT"):
        with storage.replacing(config.out, REPORT_NAME, "another OUT"):  # now, not after the decoding
            pass
        yield


def reading(data: str) -> AbstractContextManager[None]:
    """Held while a run reads the dataset `data`: an ingest into that folder is refused meanwhile
    (storage.reading)."""
    return storage.reading(data, REPORT_NAME)


def _ingest(config: IngestConfig, scanned: tuple[LayoutScan, set[str]], started: float) -> dict[str, Any]:
    import ray

    scan, test_sources = scanned
    manifest = _manifest(scan.entries)
    log.info("found %d images in %d classes under %s", len(manifest), len(scan.classes), scan.root)

    blocks = _num_blocks(len(manifest), config.size)
    with _ingest_context():  # the dataset and those derived from it keep these settings
        items = ray.data.from_items(_task_rows(manifest), override_num_blocks=blocks)
    decoded = items.map_batches(
        partial(decode_and_pack, size=config.size, min_side=config.min_side),
        batch_size=max(1, math.ceil(len(manifest) / blocks)),  # a block at a time (DECODE_BATCH_SIZE)
        compute=_tasks_per_core(blocks),
    ).materialize()
    timings = {"scan_and_decode": time.perf_counter() - started}
    index = _index(decoded)
    timings["index"] = time.perf_counter() - started - sum(timings.values())

    ok = index["error"] == ""
    if not ok.any():
        log_warnings(scan.warnings)
        raise LayoutError(_nothing_usable(scan.root, manifest, index))
    rows = index[ok].reset_index(drop=True)
    labels = [manifest[r]["label"] for r in rows["row_id"]]
    duplicates = duplicate_groups(
        list(rows["sha256"]), hash_words(list(rows["phash"])), config.near_duplicate_bits
    )
    # The label file's patient, else the DICOM's PatientID: a patient's films share a split either way
    dicom = (
        rows["dicom_patient"] if (config.patient_column or "").strip().lower() != "none" else [""] * len(rows)
    )
    patients = [manifest[r]["patient"] or p for r, p in zip(rows["row_id"], dicom, strict=True)]
    groups, placeholders = patient_groups(duplicates, patients)  # what goes to one split together
    duplicate_keys, group_keys = _group_keys(duplicates, rows["sha256"]), _group_keys(groups, rows["sha256"])
    fractions = {
        "train": 1.0 - config.val_fraction - config.test_fraction,
        "val": config.val_fraction,
        "test": config.test_fraction,
    }
    sources = [manifest[r]["source"] for r in rows["row_id"]]
    held_out = [source in test_sources for source in sources]
    splits = assign_splits(labels, groups, group_keys, fractions, config.seed, held_out)
    # A held-out image takes its group to test: its copies, and now its patient's other films too
    held_groups = {group for group, held in zip(groups, held_out, strict=True) if held}
    pulled = sum(1 for group, held in zip(groups, held_out, strict=True) if group in held_groups and not held)
    if test_sources and "train" not in splits:
        raise LayoutError(
            f"holding out {', '.join(sorted(test_sources))} leaves no image to train on: every other image "
            f"({pulled}) went to test with its patient or a copy held out there; hold out fewer sources, or "
            "--patient-column none to split patients across them"
        )
    split_of = {int(r): split for r, split in zip(rows["row_id"], splits, strict=True)}
    group_of = {int(r): duplicate_keys[g] for r, g in zip(rows["row_id"], duplicates, strict=True)}

    def finish(batch: pa.Table) -> pa.Table:
        """The decoded rows that were kept, with their class index, split and duplicate group (Arrow in
        and out: the packed pixels are never copied)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        ok = pc.equal(batch["error"], "")
        kept = (batch if pc.all(ok).as_py() else batch.filter(ok)).select(list(_DATASET_COLUMNS))
        row_ids = kept["row_id"].to_pylist()
        return (
            kept.append_column(
                "label_index",
                pa.array([CLASSES.index(label) for label in kept["label"].to_pylist()], pa.int64()),
            )
            .append_column("split", pa.array([split_of[r] for r in row_ids], pa.string()))
            .append_column("duplicate_group", pa.array([group_of[r] for r in row_ids], pa.string()))
        )

    timings["dedupe_and_split"] = time.perf_counter() - started - sum(timings.values())
    filesystem, root = storage.resolve(config.out)
    # Everything goes to a staging folder beside OUT (what a killed run left there is cleared first),
    # the report last; one swap then publishes it, so OUT holds the previous dataset or this one, whole.
    staging, _ = storage.staging_paths(root)
    storage.clear_staging(filesystem, root, REPORT_NAME)
    with _staging_removed_if_full(filesystem, root, config.out):
        # Hive-style split=train/ folders: readers can take one split without scanning the others.
        # The same task pool for both steps, so Ray Data fuses them: packed tables go straight to the file.
        finished = decoded.map_batches(
            finish,
            batch_size=_write_batch_rows(len(rows), config.size),
            batch_format="pyarrow",
            compute=_tasks_per_core(decoded.num_blocks()),
        )
        finished.write_parquet(
            staging,
            filesystem=filesystem,
            partition_cols=["split"],
            concurrency=_task_limit(decoded.num_blocks()),
            **parquet_options([*_DATASET_COLUMNS, "label_index", "duplicate_group"]),
        )
        timings["write"] = time.perf_counter() - started - sum(timings.values())

        report = _report(config, scan.root, manifest, index, labels, splits, duplicates, started)
        report["patients"] = _patient_report(scan, patients, splits, placeholders, config.patient_column)
        report["patients"]["pulled_to_test"] = pulled
        report["duplicates"]["across_classes"] = _across_classes(rows, labels, manifest)
        report.update(_source_report(sources, splits, labels, test_sources), labels=_label_report(scan))
        report["warnings"] = scan.warnings + _warnings(report) + _patient_warnings(report["patients"])
        report["seconds_by_stage"] = {stage: round(seconds, 2) for stage, seconds in timings.items()}
        report["replaced"] = _replaced(
            config.out,
            report["fingerprint"],
            list(zip(rows["sha256"], labels, splits, rows["mask_sha256"], strict=True)),
        )
        storage.write_text(
            filesystem, f"{staging}/{REPORT_NAME}", json.dumps(printable_json(report), indent=2)
        )
    # A run that started reading OUT since the check at the start: the dataset is made, so wait for it
    with storage.replacing(config.out, REPORT_NAME, "another OUT", wait=True):
        storage.publish(filesystem, root, marker=REPORT_NAME)
    log.info("ingested %d of %d images into %s", report["ingested"], report["found"], config.out)
    telemetry.record_ingest(config.out, report["ingested"], [row["reason"] for row in report["rejected"]])
    return report


def _group_keys(groups: list[int], hashes: Any) -> dict[int, str]:
    """Each group's key: the smallest content hash among its images (it orders the groups in the split)."""
    keys: dict[int, str] = {}
    for group, sha in zip(groups, hashes, strict=True):
        keys[group] = min(sha, keys.get(group, sha))
    return keys


def _patient_warnings(patients: dict[str, Any]) -> list[str]:
    """The ids read as placeholders, and the images a held-out source took to test with their patients."""
    folders = patients.get("column") == PATIENT_FOLDER
    warnings = []
    for placeholder, count in patients["placeholders"].items():
        if placeholder.startswith(NOT_SHOWN):  # maybe a real patient's: not printed or stored
            warnings.append(
                f"a patient id (not shown: it may be a real patient's, with many films) names {count} "
                "images, over 20 and over a tenth of them: read as a placeholder, not a patient, its images "
                "split as if they named none; if it is one patient's, give the images other ids"
            )
        elif folders:
            warnings.append(
                f"the folder {placeholder!r} holds {count} images, too many for one patient's (over 20 and "
                "over a tenth of them): read as a folder of many, its images split as if they named none"
            )
        else:
            warnings.append(
                f"patient id {placeholder!r} names {count} images, read as an anonymised placeholder, not a "
                "patient: those images are split as if they named none"
            )
    loose = patients.get("without_patient", 0) - sum(patients["placeholders"].values())
    if folders and loose:  # asked for patient folders, and these are in none
        warnings.append(
            f"{loose} images lie directly in their class folder (or its images/), in no patient's folder: "
            "they are split one by one"
        )
    if patients.get("pulled_to_test"):
        warnings.append(
            f"{patients['pulled_to_test']} images of sources not held out went to test with their patient "
            "or a copy held out there, so that no held-out patient is also trained on"
        )
    return warnings


NOT_SHOWN = "not shown "
"""The report's name for a placeholder id that may be a patient's (`names_no_patient`): numbered."""


def _shown(placeholders: dict[str, int]) -> dict[str, int]:
    """The placeholder ids as the report stores them: an id taken for one by its count alone may be a real
    patient's ID or name (a privacy review, session 52: an MRN with 22 daily films was printed and kept in
    ingest_report.json), so it is numbered, not named. (Patient folders are named: the dataset's `file`
    column holds their names anyway.)"""
    shown, hidden = {}, 0
    for patient, count in placeholders.items():
        if names_no_patient(patient):
            shown[patient] = count
        else:
            hidden += 1
            shown[f"{NOT_SHOWN}{hidden}"] = count
    return shown


def _patient_report(
    scan: LayoutScan,
    patients: list[str],
    splits: list[str],
    placeholders: dict[str, int],
    asked: str | None = None,
) -> dict[str, Any]:
    """The label file's patient column (PATIENT_FOLDER where `asked` for the class folders' patient folders,
    DICOM_PATIENT where the DICOMs name them), the images and patients it names, the ids read as anonymised
    placeholders, and how many patients have images in more than one split (0: a patient's images are one
    group, which a held-out image takes to test whole)."""
    column = (scan.label_file or {}).get("patient_column")
    if (asked or "").strip().lower() == PATIENT_FOLDER:
        column = PATIENT_FOLDER
    elif not column and any(patients):  # none from a label file: every one is a DICOM's own
        column = DICOM_PATIENT
    named = [(p, s) for p, s in zip(patients, splits, strict=True) if p and p not in placeholders]
    splits_of: dict[str, set[str]] = {}
    for patient, split in named:
        splits_of.setdefault(patient, set()).add(split)
    return {
        "column": column,
        "images": len(named),
        "patients": len(splits_of),
        "across_splits": sum(1 for found in splits_of.values() if len(found) > 1),
        "placeholders": placeholders if column == PATIENT_FOLDER else _shown(placeholders),
        # images no patient groups (none named, or a placeholder's): split one by one
        "without_patient": len(patients) - len(named),
    }


@contextmanager
def _staging_removed_if_full(filesystem: pafs.FileSystem, root: str, out: str) -> Iterator[None]:
    """Writes into the staging folder beside `out` (at `root` of `filesystem`); one that fills the disk,
    a quota or `ulimit -f` (`runtime.storage_error`, however deep in Ray Data's tasks) removes what it
    wrote, which would hold the space until the next ingest into `out`, and is said in one line naming
    `out` (Ray Data's own 275 lines of it had ended in "please open an issue on the Ray project")."""
    try:
        yield
    except Exception as exc:
        if (full := storage_error(exc)) is None:
            raise
        with contextlib.suppress(OSError):
            storage.clear_staging(filesystem, root, REPORT_NAME)
        raise OSError(
            full.errno, f"{storage_reason(full)} while the dataset was written; what it had written is "
            f"removed, and {out} is as it was", out,
        ) from exc  # fmt: skip


def _replaced(out: str, fingerprint: str, rows: list[tuple[str, str, str, str]]) -> dict[str, Any] | None:
    """What replacing the dataset at `out` changes, where one of another fingerprint is there: its
    fingerprint, the images both hold (by content) and how many of them changed split, class or mask
    (`rows`: each new row's sha256, label, split and mask_sha256). Runs, experiments and models made on it
    no longer match the new one; the output says so. None where there is none."""
    try:
        report = read_report(out)
        before = report.get("fingerprint")
        if before == fingerprint:
            return None
        masks = "mask_sha256" in fingerprint_columns(report)
        old = read_table(out, ["sha256", "label", "split", *(["mask_sha256"] if masks else [])])
    except (OSError, ValueError, KeyError):  # none there, or one this code cannot read: nothing to compare
        return None
    old_masks = old["mask_sha256"].to_pylist() if masks else [""] * old.num_rows
    old_rows = zip(*(old[name].to_pylist() for name in ("sha256", "label", "split")), old_masks, strict=True)
    # By picture: copies of one (exact duplicates, kept in one split) may differ in class and mask.
    now, was = _by_picture(rows), _by_picture(old_rows)
    shared = [sha for sha in was if sha in now]
    return {
        "fingerprint": before,
        "shared_images": sum(len(was[sha][0]) for sha in shared),
        "changed_split": sum(len(was[sha][0]) for sha in shared if was[sha][1] != now[sha][1]),
        "changed_class": sum(len(was[sha][0]) for sha in shared if set(was[sha][0]) != set(now[sha][0])),
        # None: the old dataset's fingerprint covered no masks (an earlier cxr's), so they cannot be compared
        "changed_mask": (
            sum(len(was[sha][0]) for sha in shared if set(was[sha][2]) != set(now[sha][2])) if masks else None
        ),
    }


def _by_picture(rows: Iterable[tuple[str, str, str, str]]) -> dict[str, tuple[list[str], str, list[str]]]:
    """(sha256, label, split, mask_sha256) rows by sha256: its rows' labels, its split (copies of a picture
    share one) and its rows' mask hashes. Each count of `_replaced` is of the old dataset's rows, and a
    picture's classes and masks are compared as sets: one copy fewer changed neither."""
    grouped: dict[str, tuple[list[str], str, list[str]]] = {}
    for sha, label, split, mask in rows:
        labels, _, masks = grouped.setdefault(sha, ([], split, []))
        labels.append(label)
        masks.append(mask)
    return grouped


_DATASET_COLUMNS = (
    "row_id", "image", "mask", "has_mask", "label", "source", "url", "file", "sha256", "phash", "mask_sha256",
)  # fmt: skip


def read_report(dataset: str) -> dict[str, Any]:
    """The ingest report of a finished dataset; a missing report means the ingest never completed."""
    filesystem, root = storage.resolve(dataset)
    text = storage.read_text(filesystem, f"{root}/{REPORT_NAME}")
    if text is None:
        folder = Path(root)
        local = not storage.is_remote(dataset)
        if local and not folder.exists():
            what = "one is what `cxr data ingest RAW OUT` writes"
            raise FileNotFoundError(f"{dataset}: no such folder, so not a finished cxr dataset ({what})")
        if local and folder.name.startswith("split=") and (folder.parent / REPORT_NAME).is_file():
            raise FileNotFoundError(
                f"{dataset} is one split of the dataset {folder.parent}: pass {folder.parent}"
            )
        if local and folder.name.endswith((".partial", ".old")) and folder.is_dir():
            final = folder.with_name(folder.name.rsplit(".", 1)[0])
            raise FileNotFoundError(
                f"{dataset} is what an unfinished ingest into {final} left (its staging folder, "
                f"never a dataset): pass {final}, or run that ingest again, which clears it"
            )
        if local and folder.is_dir() and any(folder.glob("*/*")):
            command = f"cxr data ingest {shlex.quote(dataset)} {shlex.quote(folder.name + '-dataset')}"
            raise FileNotFoundError(
                f"{dataset} is not a cxr dataset (no {REPORT_NAME}); if it holds raw images, ingest them "
                f"into a folder of their own first: `{command}`, then pass that"
            )
        raise FileNotFoundError(
            f"{dataset} is not a finished cxr dataset (no {REPORT_NAME}); run `cxr data ingest RAW "
            f"{shlex.quote(dataset)}`"
        )
    try:
        report: dict[str, Any] = json.loads(text)
    except ValueError as exc:  # cut short or edited by hand: the dataset cannot be trusted as it stands
        raise ConfigError(
            f"{dataset}: its {REPORT_NAME} is not valid JSON ({exc}); the dataset is damaged: ingest it "
            "again (`cxr data ingest RAW OUT`)"
        ) from exc
    if not isinstance(report, dict) or not isinstance(report.get("by_split"), dict):
        raise ConfigError(
            f"{dataset}: its {REPORT_NAME} is not an ingest report (no by_split); ingest the dataset again"
        )
    return report


@contextlib.contextmanager
def _ingest_context() -> Iterator[None]:
    """Ray Data settings for the datasets created inside: each dataset keeps a copy of the context it
    was created in, so the process's own context is restored untouched (the demo trains next).

    - preserve_order: the same inputs give the same files, row for row.
    - op_resource_reservation_enabled off: Ray Data reserves a share of the cluster per operator and
      hands out the rest only as it learns the tasks' output sizes. The ingest's decode runs alone and
      materializes everything anyway; with the reservation its second task started 1.1 s after the
      first on 2 cores (2,000 images to 128 px on a running local cluster: decode 2.85 s, without 2.28 s).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.execution_options, context.op_resource_reservation_enabled
    context.execution_options = copy.deepcopy(saved[0])
    context.execution_options.preserve_order = True
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        context.execution_options, context.op_resource_reservation_enabled = saved


def _index(decoded: Any) -> Any:
    """The decoded rows' ids, hashes and errors as a DataFrame in row order, read from the materialized
    blocks in the object store (zero-copy Arrow): no Ray Data execution, no pixels copied."""
    import pandas as pd
    import pyarrow as pa
    import ray

    columns = ["row_id", "sha256", "phash", "mask_sha256", "error", "mask_error", "dicom_patient"]
    tables = [table.select(columns) for table in ray.get(decoded.to_arrow_refs())]
    index: pd.DataFrame = pa.concat_tables(tables).to_pandas()
    return index.sort_values("row_id").reset_index(drop=True)


def _tasks_per_core(input_blocks: int) -> Any:
    """Ray Data's compute strategy for a CPU-bound map over `input_blocks` blocks (see _task_limit)."""
    import ray.data

    limit = _task_limit(input_blocks)
    return ray.data.TaskPoolStrategy(size=limit) if limit else None


def _task_limit(input_blocks: int) -> int | None:
    """Tasks at once: one per core on the local cluster (`local_core_limit`), but never more than the
    input blocks (Ray Data warns the user about a limit above them: a small folder is one block); None,
    Ray Data's default, elsewhere."""
    limit = local_core_limit()
    return max(1, min(limit, input_blocks)) if limit else None


def read_split(
    dataset: str, split: str, columns: list[str] | None = None, shuffle_files: int | None = None
) -> Any:
    """One split of a finished dataset as a Ray Dataset (optionally only some columns). With
    `shuffle_files` (a seed), each execution of the dataset (each epoch of a training run that streams it)
    reads its files in another order, drawn from the seed and the execution's count."""
    import ray
    from ray.data import FileShuffleConfig

    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    verify_dataset(dataset, [split])  # Ray Data would read what is there: fewer rows, or a file's error
    filesystem, root = storage.resolve(dataset)
    # Ray 2.60's V2 Parquet datasource lists files in a task of its own that took 7–9 s per read of a
    # 192-row split here (V1: 0.3–0.9 s), paid by every training, Tune trial and evaluation; V1 reads
    # the same rows. The setting is read when the read is planned, so it is restored right after.
    context = ray.data.DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        shuffle = None if shuffle_files is None else FileShuffleConfig(seed=shuffle_files)
        ds = ray.data.read_parquet(f"{root}/split={split}", filesystem=filesystem, shuffle=shuffle)
    finally:
        context.use_datasource_v2 = use_v2
    ds = ds.select_columns(columns) if columns else ds
    if columns is None or set(columns) & set(PIXEL_COLUMNS):
        ds = ds.map_batches(_unpack_pixels, batch_format="numpy")  # bytes back to (N, S, S) uint8
    return ds


def read_table(dataset: str, columns: list[str] | None = None, split: str | None = None) -> Any:
    """A finished dataset (or one split) as a pyarrow Table, without Ray: for notebooks and reports."""
    import pyarrow as pa

    parquet, where = _finished_dataset(dataset, split)
    try:
        return parquet.to_table(columns=columns, filter=where)
    except (pa.ArrowInvalid, OSError) as exc:  # a data page damaged where the footer and counts are whole
        raise _unreadable(dataset, exc) from None


class DatasetError(ConfigError):
    """A finished dataset whose Parquet files cannot be read, or hold other rows than ingest wrote: the
    command stops with the message, as for a bad setting (exit 2)."""


def _finished_dataset(dataset: str, split: str | None) -> tuple[Any, Any]:
    """A finished dataset's Parquet files as a pyarrow Dataset, and the filter for one split (None: all).

    Raises DatasetError where a file cannot be read or the split holds other rows than the ingest report
    counts (a file deleted, truncated or added since): a damaged dataset is not read in part.
    """
    import pyarrow.dataset as pads

    _, parquet = _verified(dataset, [split] if split else list(SPLITS))
    return parquet, pads.field("split") == split if split else None


def verify_dataset(dataset: str, splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """The ingest report of `dataset`, once every Parquet file of `splits` is read (footers only) and each
    split holds the rows the report counts; DatasetError otherwise."""
    report, _ = _verified(dataset, list(splits))
    return report


def parquet_files(dataset: str) -> Any:
    """Every .parquet file under the dataset's root, hive-partitioned by split; files and folders named
    with a leading '.' or '_' (staging, markers) are not the dataset's, as pyarrow's own discovery has it."""
    return _parquet_dataset(dataset, *_listing(dataset))


_SPLIT_FOLDERS = {f"split={split}" for split in SPLITS}
_VERIFIED: dict[tuple[str, tuple[str, ...]], tuple[Any, ...]] = {}
"""What this process found whole: (dataset, splits) → the report's fingerprint and every file's path, size
and time then. A command reads a split three or four times (`cxr evaluate`: the labels, the image size, the
pixels, the overlap hashes), and each time read every file's footer, one request each on object storage:
44 requests where the read needed 6, for a 40-file split on S3. An unchanged listing is not read again."""


def _verified(dataset: str, splits: list[str]) -> tuple[dict[str, Any], Any]:
    report = read_report(dataset)
    filesystem, root, infos = _listing(dataset)
    parquet = _parquet_dataset(dataset, filesystem, root, infos)
    state = (report.get("fingerprint"), *((info.path, info.size, info.mtime_ns) for info in infos))
    if _VERIFIED.get((dataset, tuple(splits))) != state:
        _check_rows(dataset, root, parquet, report, splits)
        _VERIFIED[(dataset, tuple(splits))] = state
    return report, parquet


def _listing(dataset: str) -> tuple[Any, str, list[Any]]:
    filesystem, root = storage.resolve(dataset)
    infos = sorted(
        (
            info
            for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
            if info.type == pafs.FileType.File
            and info.path.endswith(".parquet")
            and not any(part[:1] in "._" for part in info.path[len(root) :].strip("/").split("/"))
            # the three split folders only: a file beside them, or in another split=, is not the dataset's
            and info.path[len(root) :].strip("/").split("/")[0] in _SPLIT_FOLDERS
        ),
        key=lambda info: info.path,
    )
    return filesystem, root, infos


def _parquet_dataset(dataset: str, filesystem: Any, root: str, infos: list[Any]) -> Any:
    import pyarrow as pa
    import pyarrow.dataset as pads

    try:  # pyarrow reads the schema from the first file here: a damaged one fails now
        return pads.dataset(
            [info.path for info in infos], filesystem=filesystem, format="parquet", partitioning="hive",
            partition_base_dir=root,
        )  # fmt: skip
    except (pa.ArrowInvalid, OSError) as exc:
        raise _damaged(dataset, root, infos[0].path if infos else root, exc) from None


def _unreadable(dataset: str, exc: Exception) -> DatasetError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DatasetError(
        f"{dataset}: a Parquet file cannot be read ({reason}): the dataset is damaged; ingest it again "
        "(`cxr data ingest RAW OUT`)"
    )


def _damaged(dataset: str, root: str, path: str, exc: Exception) -> DatasetError:
    """The error for a Parquet file that cannot be read: the file within the dataset, and pyarrow's reason
    without the path it repeats."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    reason = reason.split(f"{path}': ", 1)[-1].split(f"{path}: ", 1)[-1]
    name = path[len(root) :].strip("/") or path
    return DatasetError(
        f"{dataset}: {name} cannot be read ({reason}): the dataset is damaged; ingest it again "
        "(`cxr data ingest RAW OUT`)"
    )


def _check_rows(dataset: str, root: str, parquet: Any, report: dict[str, Any], splits: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.dataset as pads

    counted: Counter[str] = Counter()
    for fragment in parquet.get_fragments():
        split = pads.get_partition_keys(fragment.partition_expression).get("split")
        if split not in splits:
            continue
        try:
            counted[split] += fragment.count_rows()
        except (pa.ArrowInvalid, OSError) as exc:
            raise _damaged(dataset, root, fragment.path, exc) from None
    expected = report.get("by_split") or {}
    wrong = [
        f"{split} {counted[split]} rows where ingest wrote {expected[split]}"
        for split in splits
        if split in expected and counted[split] != int(expected[split])
    ]
    if wrong:
        raise DatasetError(
            f"{dataset}: {'; '.join(wrong)} ({REPORT_NAME}): a Parquet file was removed, cut or added since; "
            "the dataset is damaged: ingest it again (`cxr data ingest RAW OUT`)"
        )
    recorded = report.get("fingerprint")
    if not recorded:
        return
    covered = fingerprint_columns(report)
    try:  # every split's rows: the fingerprint covers them all
        rows = parquet.to_table(columns=list(dict.fromkeys([*covered, "label_index"])))
    except (pa.ArrowInvalid, OSError) as exc:
        raise _damaged(dataset, root, root, exc) from None
    found = table_digest(rows, covered)
    # What training and scoring read is label_index: one per label, as ingest numbered them
    pairs = set(zip(rows["label"].to_pylist(), rows["label_index"].to_pylist(), strict=True))
    numbered = len(pairs) == len({label for label, _ in pairs}) == len({index for _, index in pairs})
    if found != recorded or not numbered:
        raise DatasetError(
            f"{dataset}: its rows' image and mask hashes, labels, label numbers and splits (fingerprint "
            f"{found}) are not those ingest recorded (fingerprint {recorded}, {REPORT_NAME}): a Parquet file "
            "was changed or replaced since, and runs, models and reports that name this fingerprint would "
            "describe other data; ingest it again (`cxr data ingest RAW OUT`)"
        )


def read_chunks(
    dataset: str, columns: list[str], split: str | None = None, rows: int = 2048
) -> Iterator[Any]:
    """read_table's rows as pyarrow Tables of `rows` rows each (the last fewer), in read_table's order: a
    split of any size read in bounded memory."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    parquet, where = _finished_dataset(dataset, split)
    pending = parquet.schema.empty_table().select(columns)
    # One row group decoded at a time, none read ahead: with pyarrow's defaults (16 batches and 4 files
    # ahead, threads, pre-buffering) the memory held grew with the dataset (mimalloc's peak: 449 MB at 12,000
    # images of 256 px, row groups of 800); this way it stays at about 300 MB, whatever the dataset's size.
    options = pads.ParquetFragmentScanOptions(pre_buffer=False)
    batches = parquet.to_batches(
        columns=columns, filter=where, batch_size=rows, batch_readahead=0, fragment_readahead=0,
        use_threads=False, fragment_scan_options=options,
    )  # fmt: skip
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowInvalid, OSError) as exc:  # a data page damaged where the footer and counts are whole
            raise _unreadable(dataset, exc) from None
        if batch is None:
            break
        pending = pa.concat_tables([pending, pa.Table.from_batches([batch])])
        while pending.num_rows >= rows:
            yield pending.slice(0, rows)
            pending = pending.slice(rows)
    if pending.num_rows:
        yield pending


def tensor_column(values: Any) -> np.ndarray:
    """(N, S, S) uint8 from an image/mask column: raw bytes as ingest writes them, or (datasets written
    before) Ray tensors, which pyarrow without Ray reads as flat square lists."""
    items = list(values)
    if items and isinstance(items[0], bytes):
        side = math.isqrt(len(items[0]))
        out = np.empty((len(items), side, side), dtype=np.uint8)
        for row, data in zip(out, items, strict=True):
            row.reshape(-1)[:] = np.frombuffer(data, dtype=np.uint8)
        return out
    arrays = [np.asarray(v, dtype=np.uint8) for v in items]
    if arrays and arrays[0].ndim == 1:
        side = round(len(arrays[0]) ** 0.5)
        arrays = [a.reshape(side, side) for a in arrays]
    return np.stack(arrays) if arrays else np.zeros((0, 0, 0), dtype=np.uint8)


def table_with_packed_pixels(batch: dict[str, np.ndarray]) -> Any:
    """The batch as an Arrow table whose pixel columns hold each image's bytes (see PIXEL_COLUMNS)."""
    import pyarrow as pa

    return pa.table(
        {name: _packed(values) if name in PIXEL_COLUMNS else values for name, values in batch.items()}
    )


def _packed(images: np.ndarray) -> Any:
    """(N, S, S) uint8 as an Arrow binary array of N values of S×S bytes, sharing the array's memory: no
    per-image bytes objects, no copy (each cost a pass over the pixels, in every decode task)."""
    import pyarrow as pa

    images = np.ascontiguousarray(images, dtype=np.uint8)
    count, size = len(images), int(np.prod(images.shape[1:], dtype=np.int64))
    if count * size >= 2**31:  # past binary's 32-bit offsets: one value at a time, in chunks Arrow makes
        return pa.array([image.tobytes() for image in images], type=pa.binary())
    offsets = np.arange(count + 1, dtype=np.int32) * size
    return pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(images)])


def _unpack_pixels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A read batch with its pixel columns as (N, S, S) uint8 arrays, whichever way they were stored."""
    for name in PIXEL_COLUMNS:
        if name in batch and batch[name].dtype == object:
            batch[name] = tensor_column(batch[name])
    return batch


def scan_ingest_input(config: IngestConfig) -> tuple[LayoutScan, set[str]]:
    """Scan RAW and settle what the flags ask of it before any decoding (and without Ray): labels, held-out
    sources. Raises LayoutError for a folder the ingest would refuse."""
    check_output_folder(config.raw, config.out)
    label_file = LabelFile.from_flags(
        config.labels, config.label_column, config.file_column, config.patient_column
    )
    scan = scan_layout(config.raw, label_file, config.label_map())
    if (config.patient_column or "").strip().lower() == PATIENT_FOLDER:  # `COVID/P0123/1.png`: P0123
        scan.entries = [
            dataclasses.replace(entry, patient=folder_patient(entry.file)) for entry in scan.entries
        ]
    refusal = scan.refusal()
    if refusal and not config.skip_unmapped:
        log_warnings(scan.warnings)
        raise LayoutError(refusal)
    return scan, choose_test_sources(config.test_source_names(), scan.sources)


def check_output_folder(raw: str, out: str) -> None:
    """Refuse an OUT that ingest would destroy: it replaces OUT whole, so OUT must be new, empty, or a
    dataset (its `split=*` folders and report, or what a killed run left of them), never RAW, a folder
    holding RAW, or a folder of other files."""
    filesystem, root = storage.resolve(out)
    if not storage.is_remote(out):
        here, source = Path(root).resolve(), Path(raw).resolve()
        if here == source or here in source.parents:
            what = "is RAW" if here == source else "holds RAW"
            raise LayoutError(
                f"OUT {out} {what}: ingest replaces OUT whole with the dataset; write it to a folder of its "
                f"own, e.g. `cxr data ingest {shlex.quote(raw)} {shlex.quote(here.name + '-dataset')}`"
            )
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise LayoutError(f"OUT {out} is a file; name a folder for the dataset")
    if info.type != pafs.FileType.Directory:
        return
    others = sorted(
        Path(entry.path).name
        for entry in filesystem.get_file_info(pafs.FileSelector(root, recursive=False))
        if Path(entry.path).name not in (REPORT_NAME, storage.READ_LOCK_NAME)
        and not Path(entry.path).name.startswith("split=")
    )
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise LayoutError(
            f"OUT {out} holds files that are not a cxr dataset's ({shown}); ingest replaces OUT whole, so "
            "it writes only to a new folder, an empty one, or a dataset it wrote before"
        )


def _nothing_usable(root: str, manifest: list[dict[str, Any]], index: Any) -> str:
    """Why an ingest whose every image was rejected wrote nothing: each file and its reason."""
    reasons = [
        (manifest[r]["image_path"], reason) for r, reason in zip(index["row_id"], index["error"], strict=True)
    ]
    lines = [f"none of the {len(reasons)} images under {root} could be used; nothing was written:"]
    lines += [f"  {format_paths([path], root)}: {reason}" for path, reason in reasons[:LISTED]]
    if len(reasons) > LISTED:
        lines.append(
            f"  and {len(reasons) - LISTED} more (`cxr data check {shlex.quote(root)}` lists every file)"
        )
    return "\n".join(lines)


def _decode_file(path: str | bytes) -> tuple[np.ndarray, str]:
    """A file's picture, and the PatientID (0010,0020) a DICOM names ("" for any other file, or none)."""
    path = os.fsdecode(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(read_problem(path, exc)) from exc
    return decode_image(data, path), dicom_patient(data, path)


def _manifest(entries: list[ManifestEntry]) -> list[dict[str, Any]]:
    """The decode's input rows: every entry's fields and its row id, in the shuffled row order.

    Empty strings, not None: a block whose rows all lack a mask or URL must keep the string type. Fields
    by name, not `dataclasses.asdict`, which deep-copies each entry (0.03 of 0.04 s for 2,000 images)."""
    return [
        {
            "row_id": i, "image_path": entry.image_path, "mask_path": entry.mask_path or "",
            "label": entry.label, "file": entry.file, "url": entry.url or "", "source": entry.source,
            "patient": entry.patient,
        }
        for i, entry in enumerate(sorted(entries, key=_shuffle_key))
    ]  # fmt: skip


def _task_rows(manifest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest as the decode tasks' input: paths as the file system's bytes (`os.fsencode`), so a name
    that is not UTF-8 (Latin-1 names from a Windows zip, say) reaches its task, where Arrow holds only
    UTF-8 text; and each file name as text, such a name's odd bytes written as escapes (\\xe9)."""
    return [
        {
            **{key: value for key, value in row.items() if key != "patient"},  # the driver's: never stored
            "image_path": os.fsencode(row["image_path"]),
            "mask_path": os.fsencode(row["mask_path"]),
            "file": printable_name(row["file"]),
        }
        for row in manifest
    ]


def printable_json(value: Any) -> Any:
    """`value` with every string as `printable_name` writes it: a name that is not UTF-8 went into the report
    as an unpaired surrogate escape ("\\udcff"), which duckdb and polars refuse and jq reads as U+FFFD, and
    unlike the Parquet's `file` column, which spells it `\\xff`.

    >>> printable_json({"rejected": [{"path": "raw/caf\\udce9.png"}]})
    {'rejected': [{'path': 'raw/caf\\\\xe9.png'}]}
    """
    if isinstance(value, str):
        return printable_name(value)
    if isinstance(value, dict):
        return {printable_json(key): printable_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [printable_json(item) for item in value]
    return value


def printable_name(name: str) -> str:
    """A file name as UTF-8 text: the bytes of a name that is not UTF-8 as escapes (b'caf\\xe9.png' reads
    'caf\\xe9.png'); any other name unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _shuffle_key(entry: Any) -> str:
    """A fixed pseudo-random row order, so classes are interleaved in every file and training shard."""
    return hashlib.sha256(f"{entry.label}/{entry.file}".encode("utf-8", "surrogateescape")).hexdigest()


def _content_hash(image: np.ndarray) -> str:
    """SHA-256 of the decoded pixels and shape: the same picture in another encoding hashes the same."""
    digest = hashlib.sha256(f"{image.shape[0]}x{image.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _write_batch_rows(rows: int, size: int) -> int:
    """Rows per write task: the kept rows spread evenly over the cores, so the write runs in one wave of
    tasks, but at most WRITE_BATCH_BYTES of pixels a task.

    Ray Data's executor learns that a task ended only when all its running tasks have or 0.1 s has
    passed, so every further wave of tasks leaves a core idle for up to that long. On 2 cores, 4 write
    tasks of 500 rows (the decode blocks) took 0.42-0.67 s for 2,000 images at 256 px, 2 of 1,000 took
    0.34-0.51; for 6,000 images, 12 tasks 2.0-2.2 s and 2 of 3,000 1.4-1.5 s (the one process: 1.4)."""
    import ray

    cores = local_core_limit() or int(ray.cluster_resources().get("CPU", 1))
    per_core = math.ceil(rows / max(1, cores))
    return max(1, min(per_core, max(DECODE_BATCH_SIZE, WRITE_BATCH_BYTES // (2 * size * size))))


def _num_blocks(rows: int, size: int) -> int:
    """Decode blocks: on the local cluster, one per real core (`local_core_limit`) per wave, in as few
    waves as keep each block within LOCAL_BLOCK_BYTES of pixels; on a cluster, two per CPU at least (load
    balance across nodes) and ~500 images each at most (task overhead). Never under DECODE_BATCH_SIZE rows.

    Ray Data's executor starts a wave's second task up to 0.1 s after its first (it waits on its running
    tasks between dispatches), and the cores of one machine are alike, so fewer waves win there: on 2
    cores, 2,000 images to 256 px in 2 blocks took 3.06-3.94 s (medians of four steady runs) where 4
    took 3.29-3.73, lower in 6 of 7 alternated pairs; 6,000 images in 6 blocks 10.3 / 10.7 s, in 12
    10.97 / 12.3 s."""
    import ray

    cores = local_core_limit()
    if cores:
        rows_per_block = max(DECODE_BATCH_SIZE, LOCAL_BLOCK_BYTES // (2 * size * size))
        blocks = cores * math.ceil(rows / (cores * rows_per_block))
    else:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        blocks = max(2 * cpus, rows // 500)
    return max(1, min(rows // DECODE_BATCH_SIZE, blocks))


def _report(
    config: IngestConfig,
    root: str,
    manifest: list[dict[str, Any]],
    index: Any,
    labels: list[str],
    splits: list[str],
    groups: list[int],
    started: float,
) -> dict[str, Any]:
    rejected = [
        {"path": manifest[r]["image_path"], "reason": reason}
        for r, reason in zip(index["row_id"], index["error"], strict=True)
        if reason
    ]
    mask_problems = [
        {"path": manifest[r]["mask_path"], "reason": reason}
        for r, reason in zip(index["row_id"], index["mask_error"], strict=True)
        if reason
    ]
    ingested = len(labels)
    group_sizes = Counter(groups)
    by_class_split: dict[str, dict[str, int]] = {}
    for label, split in zip(labels, splits, strict=True):
        counts = by_class_split.setdefault(label, dict.fromkeys(("train", "val", "test"), 0))
        counts[split] += 1
    without_mask = sum(
        1
        for r, e, me in zip(index["row_id"], index["error"], index["mask_error"], strict=True)
        if not e and (not manifest[r]["mask_path"] or me)
    )
    return {
        "raw": root,
        "out": config.out,
        "config": dataclasses.asdict(config),
        "found": len(manifest),
        "ingested": ingested,
        "by_class": dict(sorted(Counter(labels).items())),
        "by_split": {s: splits.count(s) for s in ("train", "val", "test")},
        "by_class_split": dict(sorted(by_class_split.items())),
        "without_mask": without_mask,
        "duplicates": {
            "groups": sum(1 for size in group_sizes.values() if size > 1),
            "images_in_groups": sum(size for size in group_sizes.values() if size > 1),
            "largest_group": _largest_group(group_sizes, groups, labels, splits),
        },
        "rejected": rejected,
        "mask_problems": mask_problems,
        "fingerprint": _fingerprint(index, labels, splits),
        "fingerprint_columns": list(FINGERPRINT_COLUMNS),
        "phash_of": PHASH_OF,
        "seconds": round(time.perf_counter() - started, 2),
        "created_at": provenance.now(),
        "software": provenance.versions("ray", "pyarrow", "pillow", "numpy", "pydicom"),
    }


def _source_report(
    sources: list[str], splits: list[str], labels: list[str], test_sources: set[str]
) -> dict[str, Any]:
    """The images of each source in each split and of each class, which sources were held out for
    testing, and the pairs of classes no source holds both of (`source_separates`)."""
    by_source_split: dict[str, dict[str, int]] = {}
    by_source_class: dict[str, Counter[str]] = {}
    for source, split, label in zip(sources, splits, labels, strict=True):
        by_source_split.setdefault(source, dict.fromkeys(SPLITS, 0))[split] += 1
        by_source_class.setdefault(source, Counter())[label] += 1
    return {
        "test_sources": sorted(test_sources),
        "by_source_split": dict(sorted(by_source_split.items())),
        "by_source_class": {
            source: dict(sorted(by_source_class[source].items())) for source in sorted(by_source_class)
        },
        "source_separates": separated_classes(by_source_class),
    }


def sources_separate_classes(report: dict[str, Any], *, held_out_too: bool = False) -> str | None:
    """The warning of an ingest report whose sources separate classes (`source_separates`), where no
    source was held out for testing (unless `held_out_too`): scores on its random test split may
    measure the sources, not the lungs. Said at ingest, and again by every evaluation on the dataset's
    own splits and by a Tune comparison on it, where the scores it warns of are read."""
    pairs = report.get("source_separates")
    if not pairs:
        return None
    by_source = report.get("by_source_class") or {}
    mixed = any(len(classes) > 1 for classes in by_source.values())
    named = (
        "every source holds one class only"
        if not mixed
        else "no source holds both " + ", nor ".join(" and ".join(pair) for pair in pairs)
    )
    shortcut = (
        f"{named}: a model can tell these classes apart by their sources (hospital, scanner, patient "
        "age, text burned in) and not by the lungs, and a random test split, from the same sources, "
        "would not show it"
    )
    held = report.get("test_sources") or []
    if not held:
        return (
            f"{shortcut}. Hold sources out (--test-sources; see the README's section on holding sources out) "
            "or validate on another hospital's data before trusting the scores"
        )
    # The held-out sources' test images show a shortcut between two classes only where they hold both:
    # held-out sources of one class score as well for a model that reads the sources as for one that
    # reads the lungs (a review, session 52: two COVID-only journals held out silenced this warning).
    held_classes = sorted({label for name in held for label, n in (by_source.get(name) or {}).items() if n})
    untested = [pair for pair in pairs if not set(pair) <= set(held_classes)]
    if not untested:
        return (
            f"{shortcut}; the held-out sources' test images ({', '.join(held)}) show whether it does"
            if held_out_too
            else None
        )
    holding = f"{', '.join(held_classes)} only" if held_classes else "no image"
    return (
        f"{shortcut}, and the held-out sources ({', '.join(held)}) hold {holding}, so their test images "
        f"cannot show it either for {', '.join(' and '.join(pair) for pair in untested)}. Hold out sources "
        "that hold both classes of a pair, or validate on another hospital's data, before trusting the scores"
    )


def separated_classes(by_source_class: dict[str, Counter[str]]) -> list[list[str]]:
    """The pairs of classes that no source holds both of, where the sources are known (two or more).

    A model can tell such classes apart by what their sources leave on the image (hospital, scanner,
    patient age, text burned in) and not by the lungs, and a random split cannot show it: its test images
    come from the same sources. The Kaggle database is so made: its Normal and Viral Pneumonia images
    share a source, the paediatric set of data.mendeley.com, which holds no COVID image.
    """
    known = {source: classes for source, classes in by_source_class.items() if source != "unknown"}
    if len(known) < 2:
        return []
    sources_of: dict[str, set[str]] = {}
    for source, classes in known.items():
        for label in classes:
            sources_of.setdefault(label, set()).add(source)
    names = sorted(sources_of)
    return [
        [first, second]
        for i, first in enumerate(names)
        for second in names[i + 1 :]
        if not sources_of[first] & sources_of[second]
    ]


def _label_report(scan: LayoutScan) -> dict[str, Any]:
    """Where the labels came from, and every image not ingested for want of exactly one class."""
    return {
        "label_file": scan.label_file,
        "unmapped": scan.unmapped,
        "conflicting_labels": scan.conflicting_labels,
        "missing_files": scan.missing_files,
        "unlabelled": scan.unlabelled,
    }


LARGE_GROUP = (20, 0.02)
"""A near-duplicate group of at least this many images and this share of the dataset is warned of. Copies
of one patient's picture make groups of a few; far larger ones are hashes chained one near the next (each
pair within --near-duplicate-bits, the ends far apart), as a common frame, border or burned-in text makes
them: 44 of 633 phantoms in one group, its pairs up to 46 bits apart. A group goes to one split whole."""


def _largest_group(
    sizes: Counter[int], groups: list[int], labels: list[str], splits: list[str]
) -> dict[str, Any] | None:
    """The largest near-duplicate group: its images, their classes and the split it went to."""
    if not sizes or (top := sizes.most_common(1)[0])[1] < 2:
        return None
    members = [row for row, group in enumerate(groups) if group == top[0]]
    return {
        "images": top[1],
        "by_class": dict(sorted(Counter(labels[row] for row in members).items())),
        "split": splits[members[0]],
    }


def _across_classes(
    rows: Any, labels: list[str], manifest: list[dict[str, Any]]
) -> list[list[dict[str, str]]]:
    """The pictures found under more than one class (the same decoded pixels): each as its files and their
    classes. Ingest keeps them, in one split; one of the labels is wrong."""
    files: dict[str, list[dict[str, str]]] = {}
    for row_id, sha, label in zip(rows["row_id"], rows["sha256"], labels, strict=True):
        files.setdefault(sha, []).append({"path": manifest[row_id]["image_path"], "label": label})
    return [group for group in files.values() if len({item["label"] for item in group}) > 1]


def _warnings(report: dict[str, Any]) -> list[str]:
    """Classes that nothing in train teaches (too few images, or all of them from held-out sources), or
    that validation or the test cannot score, classes their sources tell apart, and pictures labelled
    with two classes."""
    warnings = []
    found = report["by_class_split"]  # none at all: an empty ingest, refused as such
    if found and (absent := [label for label in CLASSES if label not in found]):
        warnings.append(
            f"{', '.join(absent)}: no image at all; a model trained on this dataset never learns "
            f"{'it' if len(absent) == 1 else 'them'} and never answers {'it' if len(absent) == 1 else 'them'}"
        )
    for label, counts in report["by_class_split"].items():
        if counts["train"] == 0:
            warnings.append(
                f"{label} has no training images ({counts['val']} in val, {counts['test']} in test)"
            )
            continue
        if missing := [split for split in ("val", "test") if counts[split] == 0]:
            whole = " (the split cuts whole patients)" if (report.get("patients") or {}).get("column") else ""
            warnings.append(
                f"{label} has no {' and no '.join(missing)} images ({sum(counts.values())} in all{whole}): "
                f"no score will say how the model does on it there; more images, or a larger "
                f"{' and '.join(f'--{split}-fraction' for split in missing)}, give it some"
            )
    if confound := sources_separate_classes(report, held_out_too=True):
        warnings.append(confound)
    largest = report["duplicates"].get("largest_group")
    if largest and largest["images"] >= max(LARGE_GROUP[0], LARGE_GROUP[1] * report["ingested"]):
        images, bits = largest["images"], report["config"]["near_duplicate_bits"]
        classes = ", ".join(f"{label} {n}" for label, n in largest["by_class"].items())
        warnings.append(
            f"{images} images ({images / report['ingested']:.0%}; {classes}) form one near-duplicate group, "
            f"each within {bits} bits of the next in a chain, and went to {largest['split']} together, which "
            "moves the split shares; unless they are copies of one picture (rather than alike through a "
            "common frame, border or burned-in text), ingest again with a lower --near-duplicate-bits"
        )
    if groups := report["duplicates"].get("across_classes"):
        root, first = report["raw"], groups[0]
        # a few of the first picture's copies: 120 copies of one image had made a line of 120 file names
        shown = [f"{format_paths([item['path']], root)} ({item['label']})" for item in first[:3]]
        example = " = ".join(shown) + (f" and {len(first) - 3} more copies" if len(first) > 3 else "")
        pictures = "1 picture is" if len(groups) == 1 else f"{len(groups)} pictures are"
        warnings.append(
            f"{pictures} under two classes or more (the same pixels), e.g. {example}: one of the labels is "
            f"wrong; every one is listed under duplicates.across_classes in {REPORT_NAME}"
        )
    return warnings


FINGERPRINT_COLUMNS = ("sha256", "label", "split", "mask_sha256")
"""What a dataset's fingerprint covers of each row: its image, class, split and lung mask (`mask_sha256`, ""
without one), each image and mask by the hash of its decoded pixels at full resolution, so that one folder
ingested at two sizes has one fingerprint. The report records them (`fingerprint_columns`)."""
EARLIER_FINGERPRINT_COLUMNS = ("sha256", "label", "split")
"""What the fingerprint of a dataset an earlier cxr wrote covers (its report records no columns): a mask
deleted or redrawn left it as it was."""


PHASH_OF = "decoded"
"""What ingest takes each perceptual hash of (the report's `phash_of`): the picture as decoded, as sha256."""
EARLIER_PHASH_OF = "resized"
"""What an earlier cxr took them of (its report records no `phash_of`): the image as stored, resized to the
dataset's size. Hashes taken two ways lie apart (cxrcore.evaluate.external)."""


def phash_of(report: dict[str, Any]) -> str:
    """What the perceptual hashes of a dataset's report (or a manifest's card block) were taken of."""
    return str(report.get("phash_of") or EARLIER_PHASH_OF)


def fingerprint_columns(report: dict[str, Any]) -> tuple[str, ...]:
    """The columns the fingerprint in a dataset's report (or a manifest's card block) covers."""
    return tuple(report.get("fingerprint_columns") or EARLIER_FINGERPRINT_COLUMNS)


def table_digest(table: Any, columns: Sequence[str]) -> str:
    """The fingerprint of a pyarrow Table's rows over `columns` (fingerprint_columns)."""
    return _digest(*(table[name] for name in columns))


def _fingerprint(index: Any, labels: list[str], splits: list[str]) -> str:
    """A digest of the dataset's content, labels, split and masks: equal fingerprints mean equal data."""
    ok = index[index["error"] == ""]
    return _digest(ok["sha256"], labels, splits, ok["mask_sha256"])


def _digest(*columns: Any) -> str:
    """The fingerprint of rows given column by column, in FINGERPRINT_COLUMNS' order (any iterables, Arrow
    columns included): what ingest records, and what a reader recomputes from the Parquet files."""
    digest = hashlib.sha256()
    for values in sorted(zip(*(_as_list(column) for column in columns), strict=True)):
        digest.update(f"{':'.join(values)}\n".encode())
    return digest.hexdigest()[:16]


def _as_list(column: Any) -> list[Any]:
    return column.to_pylist() if hasattr(column, "to_pylist") else list(column)
