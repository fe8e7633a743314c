"""Ray Data ingest on synthetic data with planted bad files, and on the real sample when present."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from cxrcore.config import IngestConfig
from cxrcore.data import ingest as ingest_module
from cxrcore.data.ingest import ingest_dataset, read_report, read_split, read_table
from cxrcore.data.layout import LayoutError
from cxrcore.data.synthetic import write_synthetic_dataset
from cxrcore.data.transforms import resize_image, scale_to_uint8
from cxrcore.summaries import format_ingest_report
from tests.conftest import lung_mask, write_png, xray

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]
SIZE = 64


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Synthetic data (12 per class) plus one of every kind of bad file; returns (root, path → reason)."""
    root = tmp_path_factory.mktemp("raw") / "COVID-19_Radiography_Dataset"
    write_synthetic_dataset(root, per_class=12, seed=7)
    covid, normal = root / "COVID", root / "Normal"
    good_png = (covid / "images/COVID-1.png").read_bytes()
    bad = {
        "zero-byte": write_png(covid / "images/COVID-101.png", xray(1)),
        "truncated": covid / "images/COVID-102.png",
        "not an image": covid / "images/COVID-103.png",
        "too small": write_png(normal / "images/Normal-101.png", xray(2, size=16)),
        "blank": write_png(normal / "images/Normal-102.png", np.full((96, 96), 40, np.uint8)),
    }
    bad["zero-byte"].write_bytes(b"")
    bad["truncated"].write_bytes(good_png[: len(good_png) // 2])
    bad["not an image"].write_text("<html>404 Not Found</html>")
    for path in bad.values():
        write_png(path.parent.parent / "masks" / path.name, lung_mask())

    # Usable oddities: kept, each in its own way.
    write_png(normal / "images/Normal-103.png", xray(3), mode="RGB")
    write_png(normal / "masks/Normal-103.png", lung_mask(), mode="RGB")
    write_png(normal / "images/Normal-104.png", (xray(4).astype(np.uint16) * 16), mode="I;16")
    (normal / "masks/Normal-105.png").write_bytes(b"garbage")  # corrupt mask → image kept without it
    write_png(normal / "images/Normal-105.png", xray(5))
    (normal / "masks/Normal-2.png").unlink()  # image without mask
    shutil.copy(normal / "images/Normal-3.png", normal / "images/Normal-106.png")  # exact duplicate
    jpeg = io.BytesIO()
    Image.open(normal / "images/Normal-4.png").resize((240, 240)).save(jpeg, "PNG")
    (normal / "images/Normal-107.png").write_bytes(jpeg.getvalue())  # near duplicate (resized)
    expect = {str(path): reason for reason, path in bad.items()}
    return root, expect


@pytest.fixture(scope="module")
def ingested(
    planted: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict]:
    root, _ = planted
    out = str(tmp_path_factory.mktemp("out") / "dataset")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ingest_dataset(IngestConfig(raw=str(root), out=out, size=SIZE, seed=1))
    # A folder this small is one block: Ray Data warned about a task limit above it.
    assert not [str(w.message) for w in caught if "concurrent tasks" in str(w.message)]
    return out, report


def test_every_bad_file_is_rejected_with_its_path_and_nothing_else_is_lost(
    planted: tuple[Path, dict[str, str]], ingested: tuple[str, dict]
) -> None:
    _, expect = planted
    out, report = ingested
    assert report["found"] == 4 * 12 + 5 + 5
    assert report["found"] == report["ingested"] + len(report["rejected"])
    reasons = {item["path"]: item["reason"] for item in report["rejected"]}
    assert reasons.keys() == expect.keys()
    assert "empty file" in reasons[next(p for p, r in expect.items() if r == "zero-byte")]
    assert "truncated" in reasons[next(p for p, r in expect.items() if r == "truncated")]
    assert "not an image" in reasons[next(p for p, r in expect.items() if r == "not an image")]
    assert "too small" in reasons[next(p for p, r in expect.items() if r == "too small")]
    assert "blank" in reasons[next(p for p, r in expect.items() if r == "blank")]
    assert [Path(m["path"]).name for m in report["mask_problems"]] == ["Normal-105.png"]
    assert json.loads((Path(out) / "ingest_report.json").read_text()) == report


def test_dataset_columns_shapes_and_counts(ingested: tuple[str, dict]) -> None:
    out, report = ingested
    table = read_table(out)
    assert table.num_rows == report["ingested"]
    # What made it, for an audit: when, and the versions whose changes move splits and pixels.
    assert report["created_at"] and {"cxr", "ray", "pyarrow", "pillow", "python"} <= set(report["software"])
    assert {"image", "mask", "has_mask", "label", "label_index", "split", "source", "file", "sha256"} <= set(
        table.column_names
    )
    rows = {
        r["file"]: r
        for r in read_split(out, "train").union(read_split(out, "val"), read_split(out, "test")).take_all()
    }
    assert len(rows) == report["ingested"]
    for row in rows.values():
        assert row["image"].shape == (SIZE, SIZE) and row["image"].dtype == np.uint8
        assert row["mask"].shape == (SIZE, SIZE)
        assert set(np.unique(row["mask"])) <= {0, 255}
        assert row["has_mask"] == bool(row["mask"].any())
    assert not rows["Normal-2.png"]["has_mask"] and not rows["Normal-105.png"]["has_mask"]
    assert rows["Normal-103.png"]["has_mask"]  # RGB image, 3-channel mask
    assert rows["Normal-104.png"]["image"].max() > 200  # 16-bit scaled, not clipped to black
    # Normal-2 (mask deleted), -104, -106, -107 (no mask file), -105 (corrupt mask)
    assert report["without_mask"] == 5
    assert sum(report["by_split"].values()) == report["ingested"]
    assert sum(report["by_class"].values()) == report["ingested"]


def test_pixel_columns_are_written_with_their_own_codecs(ingested: tuple[str, dict]) -> None:
    """The Ray write passes `parquet_options` on: pixels uncompressed or zstd, no statistics on them."""
    out, _ = ingested
    files = sorted(Path(out).glob("split=*/*.parquet"))
    assert files
    for file in files:
        group = pq.ParquetFile(file).metadata.row_group(0)
        columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
        assert columns["image"].compression == "UNCOMPRESSED" and not columns["image"].is_stats_set
        assert columns["mask"].compression == "ZSTD" and not columns["mask"].is_stats_set
        assert columns["sha256"].compression == "SNAPPY" and columns["sha256"].is_stats_set


def test_duplicates_are_counted_and_share_a_split(ingested: tuple[str, dict]) -> None:
    out, report = ingested
    frame = read_table(out, columns=["file", "split", "duplicate_group", "sha256"]).to_pandas()
    by_file = frame.set_index("file")
    assert by_file.loc["Normal-3.png", "sha256"] == by_file.loc["Normal-106.png", "sha256"]
    for a, b in [("Normal-3.png", "Normal-106.png"), ("Normal-4.png", "Normal-107.png")]:
        assert by_file.loc[a, "duplicate_group"] == by_file.loc[b, "duplicate_group"]
        assert by_file.loc[a, "split"] == by_file.loc[b, "split"]
    assert report["duplicates"]["groups"] >= 2
    assert frame.groupby("duplicate_group")["split"].nunique().max() == 1


def test_rerun_gives_the_same_dataset_and_a_failed_run_never_looks_complete(
    planted: tuple[Path, dict[str, str]],
    ingested: tuple[str, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, _ = planted
    out, report = ingested
    again = str(tmp_path / "again")
    context = ray.data.DataContext.get_current()
    settings = (context.execution_options.preserve_order, context.op_resource_reservation_enabled)
    second = ingest_dataset(IngestConfig(raw=str(root), out=again, size=SIZE, seed=1))
    assert second["fingerprint"] == report["fingerprint"]
    # Its Ray Data settings stay with its own datasets: what the process runs next keeps its own.
    assert (context.execution_options.preserve_order, context.op_resource_reservation_enabled) == settings
    # Row for row: the files hold the rows in the same order on every run.
    assert read_table(out, ["file"])["file"].to_pylist() == read_table(again, ["file"])["file"].to_pylist()
    columns = ["file", "split", "label", "sha256", "image"]
    first = read_table(out, columns=columns).to_pandas().sort_values("file").reset_index(drop=True)
    other = read_table(again, columns=columns).to_pandas().sort_values("file").reset_index(drop=True)
    assert first[columns[:-1]].equals(other[columns[:-1]])
    assert all(np.array_equal(a, b) for a, b in zip(first["image"], other["image"], strict=True))

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_module.storage, "publish", interrupted)
    fresh = str(tmp_path / "fresh")
    with pytest.raises(KeyboardInterrupt):
        ingest_dataset(IngestConfig(raw=str(root), out=fresh, size=SIZE, seed=1))
    with pytest.raises(FileNotFoundError, match="not a finished cxr dataset"):
        read_report(fresh)
    with pytest.raises(KeyboardInterrupt):  # an interrupted re-run leaves the finished dataset intact
        ingest_dataset(IngestConfig(raw=str(root), out=again, size=SIZE, seed=2))
    assert read_report(again)["fingerprint"] == report["fingerprint"]
    # Replaced by one of other splits (another seed here; a later cxr's splits, or a changed folder): the
    # report and the output say what changed, for the runs and models made on the old one.
    monkeypatch.undo()
    assert second["replaced"] is None
    third = ingest_dataset(IngestConfig(raw=str(root), out=again, size=SIZE, seed=2))
    replaced = third["replaced"]
    assert replaced["fingerprint"] == report["fingerprint"] != third["fingerprint"]
    assert (
        replaced["shared_images"] == third["ingested"] and 0 < replaced["changed_split"] < third["ingested"]
    )
    assert (replaced["changed_class"], replaced["changed_mask"]) == (0, 0)
    assert f"replaced the dataset of fingerprint {report['fingerprint']}" in format_ingest_report(third)
    # The fingerprint covers the lung masks: one mask deleted from the folder is another dataset, and said.
    copy = shutil.copytree(root, tmp_path / "raw")  # the folder is the module's
    (copy / "COVID/masks/COVID-1.png").unlink()
    fourth = ingest_dataset(IngestConfig(raw=str(copy), out=again, size=SIZE, seed=2))
    assert (
        fourth["fingerprint"] != third["fingerprint"] and fourth["without_mask"] == third["without_mask"] + 1
    )
    assert fourth["replaced"]["changed_split"] == 0 and fourth["replaced"]["changed_mask"] == 1
    assert ", 0 changed split, 1 lung mask." in format_ingest_report(fourth)


def test_another_hospitals_oddities_are_ingested_or_named_and_an_all_bad_folder_writes_nothing(
    tmp_path: Path,
) -> None:
    """A name that is not UTF-8, a big-endian 16-bit TIFF, a patient folder, a 0/1 mask, an empty mask and
    one picture under two classes: each ingested as a viewer shows it, or named in the report."""
    root = tmp_path / "hospital"
    normal = root / "Normal"
    latin1 = write_png(normal / os.fsdecode(b"caf\xe9.png"), xray(1))
    levels = (xray(2).astype(np.uint16) * 16).astype(">u2")
    Image.fromarray(levels).save(normal / "scanner.tif")
    write_png(normal / "patient_7/study/n1.png", xray(3))
    write_png(root / "Viral Pneumonia/again.png", xray(3))  # n1.png's picture, labelled otherwise
    write_png(root / "COVID/images/c1.png", xray(4))
    write_png(root / "COVID/masks/c1.png", lung_mask() // 255)
    write_png(root / "COVID/images/c2.png", xray(5))
    write_png(root / "COVID/masks/c2.png", np.zeros((80, 80), np.uint8))
    write_png(root / "COVID/infection masks/c1.png", lung_mask(30))  # COVID-QU-Ex's other masks
    out = tmp_path / "dataset"
    report = ingest_dataset(IngestConfig(raw=str(root), out=str(out), size=SIZE))

    assert (report["found"], report["ingested"], report["rejected"]) == (6, 6, [])
    table = read_table(str(out), ["file", "image", "has_mask"]).to_pandas().set_index("file")
    assert sorted(table.index) == [
        "again.png",
        "c1.png",
        "c2.png",
        "caf\\xe9.png",
        "patient_7/study/n1.png",
        "scanner.tif",
    ]
    np.testing.assert_array_equal(  # the TIFF's values, not its bytes read in the wrong order
        np.frombuffer(table.loc["scanner.tif", "image"], np.uint8).reshape(SIZE, SIZE),
        resize_image(scale_to_uint8(levels.astype(np.uint16)), SIZE),
    )
    assert table.loc["c1.png", "has_mask"] and not table.loc["c2.png", "has_mask"]
    assert [(Path(p["path"]).name, "no pixel as lung" in p["reason"]) for p in report["mask_problems"]] == [
        ("c2.png", True)
    ]
    [pair] = report["duplicates"]["across_classes"]
    assert sorted((Path(item["path"]).name, item["label"]) for item in pair) == [
        ("again.png", "Viral Pneumonia"),
        ("n1.png", "Normal"),
    ]
    assert any("under two classes or more" in warning for warning in report["warnings"])
    assert f"{root / 'COVID'}: masks read from 'masks' only, not from 'infection masks'" in report["warnings"]
    assert read_report(str(out))["warnings"] == report["warnings"]

    # Nothing usable: a clear error naming each file and why, and no dataset.
    for path in (latin1, normal / "scanner.tif"):
        path.write_bytes(b"")
    for folder in ("patient_7", "../Viral Pneumonia", "../COVID"):
        shutil.rmtree(normal / folder)
    with pytest.raises(
        LayoutError, match=r"(?s)none of the 2 images .* nothing was written:\n  Normal/.*empty file"
    ):
        ingest_dataset(IngestConfig(raw=str(root), out=str(tmp_path / "none"), size=SIZE))
    assert not (tmp_path / "none").exists()


def test_a_patients_images_share_a_split_and_a_placeholder_id_groups_nothing(tmp_path: Path) -> None:
    """A patient's follow-up films were split across train, val and test (6 of 10 patients in a hospital's
    review): a label file's patient column keeps each patient's images in one split. An anonymised
    placeholder ("ANON") groups nothing: grouping by it would have put a third of the images in one split, so
    they are split as if they named no patient, and the report says so. A patient with a film at a held-out
    source goes to test whole, said in a warning, so that no held-out patient is also trained on."""
    root = tmp_path / "export"
    rows = ["file;Finding;Patient ID;URL"]
    for i in range(36):
        patient = "ANON" if i >= 24 else f"PT{i // 3:03d}"
        write_png(root / f"{patient}_{i}.png", xray(100 + i))
        site = "siteb.example" if i == 2 else "sitea.example"  # PT000's third film, from another hospital
        rows.append(f"{patient}_{i}.png;{'COVID-19' if i % 2 else 'No finding'};{patient};https://{site}/{i}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n", encoding="utf-8-sig")  # Excel's BOM, ';' between columns
    config = IngestConfig(
        raw=str(root), out=str(tmp_path / "ds"), size=SIZE, labels=str(labels),
        map="COVID-19=COVID,No finding=Normal", val_fraction=0.2, test_fraction=0.2,
    )  # fmt: skip
    report = ingest_dataset(config)
    table = read_table(str(tmp_path / "ds"), ["file", "split"]).to_pandas()
    splits_of = table.assign(patient=table["file"].str.split("_").str[0]).groupby("patient")["split"]
    named = {p: set(s) for p, s in splits_of if p != "ANON"}
    assert len(named) == 8 and all(len(found) == 1 for found in named.values())
    assert len({*table["split"]}) == 3  # the groups still fill every split
    assert len(set(splits_of.get_group("ANON"))) > 1  # the placeholder grouped nothing
    assert report["patients"] == {
        "column": "Patient ID", "images": 24, "patients": 8, "across_splits": 0, "placeholders": {"ANON": 12},
        "without_patient": 12, "pulled_to_test": 0,
    }  # fmt: skip
    text = format_ingest_report(report)
    assert "patients ('Patient ID' of the label file): 8 for 24 images, each patient's images within" in text
    assert "patient id 'ANON' names 12 images, read as an anonymised placeholder" in text
    assert "patient" not in read_table(str(tmp_path / "ds")).column_names  # used for the split, not stored
    unnamed = {**report, "patients": {**report["patients"], "column": None}}  # a label file naming none
    assert "patients: the label file names none" in format_ingest_report(unnamed)
    folders = {**unnamed, "labels": {**report["labels"], "label_file": None}}  # the Kaggle layout's folders
    assert "patients: none named (no label file, patient folder or DICOM PatientID)" in format_ingest_report(
        folders
    )
    declined = {**unnamed, "config": {**report["config"], "patient_column": "none"}}  # as asked: no word
    assert "patients:" not in format_ingest_report(declined)

    held = dataclasses.replace(config, out=str(tmp_path / "held"), test_sources="siteb.example")
    report = ingest_dataset(held)
    table = read_table(held.out, ["file", "split"]).to_pandas().set_index("file")
    assert {table.loc[f"PT000_{i}.png", "split"] for i in range(3)} == {"test"}
    assert report["patients"]["pulled_to_test"] == 2
    assert any(
        "2 images of sources not held out went to test with their patient" in w for w in report["warnings"]
    )
    # Held out the other way, site b's one film goes with its patient, and nothing is left to train on
    with pytest.raises(LayoutError, match=r"holding out sitea.example leaves no image to train on"):
        ingest_dataset(dataclasses.replace(held, out=str(tmp_path / "none"), test_sources="sitea.example"))
    assert not (tmp_path / "none").exists()


def test_a_pacs_exports_patients_are_read_from_its_dicoms(tmp_path: Path) -> None:
    """Class folders of DICOMs and no label file: each DICOM's PatientID keeps its patient in one split."""
    from tests.e2e.uploads import dicom_bytes

    root = tmp_path / "pacs"
    for i in range(24):
        folder = root / ("COVID" if i % 2 else "Normal") / f"patient{i // 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (xray(200 + i, 64).astype(np.uint16) * 16).astype(np.uint16)
        (folder / f"IM{i:04d}").write_bytes(dicom_bytes(pixels, patient=f"PAT{i // 4}"))
    report = ingest_dataset(
        IngestConfig(
            raw=str(root), out=str(tmp_path / "ds"), size=SIZE, val_fraction=0.25, test_fraction=0.25
        )
    )
    table = read_table(str(tmp_path / "ds"), ["file", "split"]).to_pandas()
    by_patient = table.groupby(table["file"].str.split("/").str[0])["split"].nunique()
    assert len(by_patient) == 6 and (by_patient == 1).all()
    assert report["patients"] == {
        "column": "PatientID (DICOM)", "images": 24, "patients": 6, "across_splits": 0, "placeholders": {},
        "without_patient": 0, "pulled_to_test": 0,
    }  # fmt: skip
    assert "patients (the DICOMs' PatientID): 6 for 24 images" in format_ingest_report(report)


def test_patient_folders_of_pngs_keep_each_patients_films_in_one_split(tmp_path: Path) -> None:
    """A hospital's PNG export filed per patient (`COVID/P03/1.png`) had no way to say so: each film was
    split on its own. `--patient-column folder` reads the folder below each class folder as the patient; a
    folder of too many images for one patient groups nothing, and says so."""
    root = tmp_path / "export"
    for i in range(54):
        label = "COVID" if i % 2 else "Normal"
        folder = "batch" if i >= 32 else f"P{i // 4:02d}"  # a folder of 22 films: no one patient's
        write_png(root / label / ("images" if i % 3 else "") / folder / f"{i}.png", xray(300 + i))
    for i in (60, 61):  # in no patient's folder: split one by one, and said
        write_png(root / "COVID" / f"{i}.png", xray(300 + i))
    config = IngestConfig(
        raw=str(root), out=str(tmp_path / "ds"), size=SIZE, val_fraction=0.25, test_fraction=0.25,
        patient_column="folder", near_duplicate_bits=0,
    )  # fmt: skip
    report = ingest_dataset(config)
    table = read_table(str(tmp_path / "ds"), ["file", "split"]).to_pandas()
    folder = table["file"].str.removeprefix("images/").str.split("/").str[0]
    filed = table["file"].str.removeprefix("images/").str.contains("/")  # in a patient's folder
    by_patient = table[filed & (folder != "batch")].groupby(folder)["split"].nunique()
    assert len(by_patient) == 8 and (by_patient == 1).all()
    assert report["patients"]["column"] == "folder" and report["patients"]["patients"] == 8
    assert report["patients"]["placeholders"] == {"batch": 22}
    assert len(set(table[folder == "batch"]["split"])) > 1  # grouped nothing
    text = format_ingest_report(report)
    assert "patients (the folders below each class folder): 8 for 32 images" in text
    assert "the folder 'batch' holds 22 images, too many for one patient's" in text
    assert "2 images lie directly in their class folder (or its images/), in no patient's folder" in text


def test_real_sample(real_sample: Path, tmp_path: Path) -> None:
    report = ingest_dataset(IngestConfig(raw=str(real_sample), out=str(tmp_path / "real"), size=SIZE))
    assert (report["found"], report["ingested"], report["rejected"]) == (130, 130, [])
    assert report["by_class"] == {"COVID": 50, "Normal": 40, "Viral Pneumonia": 40}
    assert report["without_mask"] == 100
    frame = read_table(str(tmp_path / "real"), columns=["label", "has_mask", "source"]).to_pandas()
    assert frame[frame["label"] == "COVID"]["has_mask"].sum() == 30
    assert (frame["source"] != "unknown").all()


def test_write_tasks_take_the_rows_one_task_per_core_within_a_memory_bound() -> None:
    from cxrcore.runtime import local_core_limit

    cores = local_core_limit() or int(ray.cluster_resources()["CPU"])
    rows_per_task = ingest_module._write_batch_rows
    assert rows_per_task(2000, 256) == -(-2000 // cores)  # one wave of write tasks
    assert rows_per_task(1, 256) == 1 and rows_per_task(0, 256) == 1
    # Large images: no task holds more than WRITE_BATCH_BYTES of pixels (image and mask).
    capped = rows_per_task(10**6, 1024)
    assert capped == ingest_module.WRITE_BATCH_BYTES // (2 * 1024 * 1024) and capped < 10**6 // cores


def test_the_real_data_demo_serves_only_images_of_the_test_split(synthetic_dataset: str) -> None:
    """`cxr demo --real` ends by sending one image per class to the served model: the first, by file name,
    of those ingest held out for testing, never one the model trained or was chosen on."""
    from cxrcore.cli import _held_out_firsts
    from cxrcore.labels import CLASSES

    raw = Path(synthetic_dataset).parent / "raw"
    firsts = _held_out_firsts(str(raw), synthetic_dataset)
    rows = read_table(synthetic_dataset, columns=["label", "file", "split"]).to_pylist()
    split_of = {(row["label"], row["file"]): row["split"] for row in rows}
    assert set(firsts) == set(CLASSES)
    for label, path in firsts.items():
        assert Path(path).is_file() and split_of[(label, Path(path).name)] == "test"
        tested = [file for (of, file), split in split_of.items() if of == label and split == "test"]
        assert Path(path).name == min(tested)
    assert {split for split in split_of.values()} == {"train", "val", "test"}  # there were others to pick


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 100 KB filesystem of its own (tmpfs), where this process may mount one (root, as CI runs)."""
    import subprocess

    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(disk)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_an_ingest_that_fills_the_disk_is_one_line_and_leaves_nothing_behind(
    planted: tuple[Path, dict[str, str]], small_disk: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A review's ingest into a full tmpfs: 275 lines, two of Ray Data's tracebacks ending in "please open
    an issue on the Ray project", and the staging folder left holding the space until the next ingest."""
    from cxrcore.cli import main

    root, _ = planted
    out = small_disk / "ds"
    assert main(["data", "ingest", str(root), str(out), "--size", "128"]) == 1
    err = capfd.readouterr().err
    assert err.endswith(
        f"cxr: error: {out}: No space left on device while the dataset was written; what it had written is "
        f"removed, and {out} is as it was\n"
    )
    assert "Traceback" not in err and "Ray Data or Ray Core internal code" not in err
    assert os.listdir(small_disk) == []  # no ds.partial holding the space
