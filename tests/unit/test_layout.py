"""Scanning and checking raw datasets: the Kaggle layout with the quirks of the real data, class folders
and flat folders with a label file as other hospitals send them, and the label mapping."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrcore.cli import main
from cxrcore.config import ConfigError, IngestConfig, parse_label_map
from cxrcore.data.layout import LabelFile, LayoutError, check_layout, decode_image, scan_layout, source_of
from cxrcore.decode import decode_upload
from tests.conftest import lung_mask, write_png, xray
from tests.e2e.uploads import chest, dicom_bytes


def _metadata(path: Path, names: list[str], url: str) -> None:
    frame = pd.DataFrame({"FILE NAME": names, "FORMAT": "PNG", "SIZE": "299*299", "URL": url})
    frame.to_excel(path, index=False)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A small raw dataset with the real data's quirks (spelling, case, RGB, 3-channel masks)."""
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for i in range(1, 4):
        write_png(root / "COVID/images" / f"COVID-{i}.png", xray(i))
        write_png(root / "COVID/masks" / f"COVID-{i}.png", lung_mask())
    write_png(root / "COVID/masks/COVID-9.png", lung_mask())  # mask without image
    _metadata(
        root / "COVID.metadata.xlsx", ["COVID-1", "COVID-2", "COVID-3", "COVID-77"], "https://github.com/a/b"
    )
    # Folder spelled with an underscore, metadata names in another case, an RGB image, a 3-channel mask.
    write_png(root / "Viral_Pneumonia/images/Viral Pneumonia-1.png", xray(10), mode="RGB")
    write_png(root / "Viral_Pneumonia/masks/Viral Pneumonia-1.png", lung_mask(), mode="RGB")
    write_png(root / "Viral_Pneumonia/images/Viral Pneumonia-2.png", xray(11))
    _metadata(
        root / "Viral Pneumonia.metadata.xlsx", ["VIRAL PNEUMONIA-1", "viral pneumonia-2"], "https://x.org/y"
    )
    write_png(root / "normal/images/Normal-1.png", xray(20))
    write_png(root / "Cats/images/cat-1.png", xray(30))  # a label that maps to no class
    (root / "notes").mkdir()  # neither a class nor images
    return root


def test_scan_pairs_images_with_masks_and_metadata(raw: Path) -> None:
    scan = scan_layout(raw)
    assert set(scan.classes) == {"COVID", "Viral Pneumonia", "Normal"}
    covid = scan.classes["COVID"]
    assert (covid.images, covid.masks, covid.pairs, covid.images_without_mask) == (3, 4, 3, 0)
    assert covid.masks_without_image == 1 and scan.orphan_masks == [str(raw / "COVID/masks/COVID-9.png")]
    assert (covid.metadata_matched, covid.metadata_unmatched) == (3, 1)
    viral = scan.classes["Viral Pneumonia"]
    assert (viral.images, viral.pairs, viral.images_without_mask, viral.metadata_matched) == (2, 1, 1, 2)
    assert scan.unmapped == {"Cats": [str(raw / "Cats/images/cat-1.png")]}
    assert scan.unknown_folders == [str(raw / "notes")]
    by_file = {e.file: e for e in scan.entries}
    assert by_file["COVID-1.png"].source == "github.com/a"
    assert by_file["Viral Pneumonia-2.png"].mask_path is None
    assert by_file["Viral Pneumonia-1.png"].source == "x.org"
    assert by_file["Normal-1.png"].source == "unknown"  # no metadata sheet for Normal


def test_an_unreadable_metadata_sheet_is_named_with_what_it_is_for(raw: Path) -> None:
    (raw / "COVID.metadata.xlsx").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(LayoutError, match=r"COVID.metadata.xlsx as an Excel workbook: .*source URL"):
        scan_layout(raw)


def test_a_workbook_with_a_far_away_cell_is_refused_not_a_crash(raw: Path, tmp_path: Path) -> None:
    """calamine builds a sheet's whole grid: a 4.9 KB workbook with a cell at XFD1048576 asked for 550 GB
    and aborted the process (exit 134, no message), as a class's metadata sheet or as --labels."""
    import openpyxl

    from cxrcore.data.layout import _read_label_frame

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["FILE NAME", "URL"])
    sheet.append(["COVID-1", "https://github.com/a/b"])
    sheet["XFD1048576"] = "stray"
    workbook.save(raw / "COVID.metadata.xlsx")
    with pytest.raises(LayoutError, match=r"COVID.metadata.xlsx: a sheet spans 1,048,576 rows × 16,384"):
        scan_layout(raw)
    workbook.save(tmp_path / "labels.xlsx")
    with pytest.raises(LayoutError, match=r"^--labels: .*labels.xlsx: a sheet spans .*delete the stray"):
        _read_label_frame(tmp_path / "labels.xlsx")


def test_scan_accepts_parent_folder(raw: Path) -> None:
    assert scan_layout(raw.parent).root == str(raw)


def test_scan_without_any_images_says_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(LayoutError, match="expected class folders named like COVID"):
        scan_layout(tmp_path)
    with pytest.raises(LayoutError, match="is not a folder"):
        scan_layout(tmp_path / "missing")


def test_check_finds_unreadable_files_and_exact_duplicates(raw: Path) -> None:
    (raw / "COVID/images/COVID-4.png").write_bytes(b"")
    truncated = (raw / "COVID/images/COVID-1.png").read_bytes()[:200]
    (raw / "normal/images/Normal-2.png").write_bytes(truncated)
    shutil.copy(raw / "COVID/images/COVID-2.png", raw / "COVID/images/COVID-5.png")
    (raw / "COVID/images/COVID-8.png").symlink_to("../moved/COVID-8.png")  # a link whose target is gone
    scan = check_layout(raw)
    reasons = {Path(item["path"]).name: item["reason"] for item in scan.unreadable}
    assert reasons.keys() == {"COVID-4.png", "Normal-2.png", "COVID-8.png"}
    assert reasons["COVID-8.png"] == "cannot read file: a link to ../moved/COVID-8.png, which does not exist"
    assert "empty file" in reasons["COVID-4.png"]
    assert "truncated" in reasons["Normal-2.png"] or "corrupt" in reasons["Normal-2.png"]
    assert scan.classes["COVID"].unreadable == 2 and scan.classes["Normal"].unreadable == 1
    assert scan.classes["COVID"].exact_duplicates == 1
    assert [Path(p).name for p in scan.duplicate_groups[0]] == ["COVID-2.png", "COVID-5.png"]
    assert scan.usable


def test_check_refuses_and_leaves_out_what_ingest_would(
    raw: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cxr data check` answers for `cxr data ingest`: an image too small or blank, a mask of another
    shape or marking no lung, are named by both, with the same reasons."""
    write_png(raw / "COVID/images/COVID-6.png", xray(6, size=8))
    write_png(raw / "COVID/images/COVID-7.png", np.full((96, 96), 40, np.uint8))
    write_png(raw / "COVID/masks/COVID-2.png", np.zeros((80, 80), np.uint8))
    write_png(raw / "COVID/masks/COVID-3.png", np.full((80, 40), 255, np.uint8))
    scan = check_layout(raw)
    reasons = {Path(item["path"]).name: item["reason"] for item in scan.unreadable}
    assert reasons == {
        "COVID-6.png": "image too small (8×8, minimum side 64)",
        "COVID-7.png": "blank image (every pixel is 40)",
    }
    masks = {Path(item["path"]).name: item["reason"] for item in scan.mask_problems}
    assert masks.keys() == {"COVID-2.png", "COVID-3.png"}
    assert masks["COVID-2.png"].startswith("mask marks no pixel as lung")
    assert masks["COVID-3.png"] == "mask shape 40×80 does not match image 96×96"
    assert scan.classes["COVID"].unreadable == 2
    assert main(["data", "check", str(raw), "--skip-unmapped"]) == 0
    printed = capsys.readouterr().out
    assert "unusable: " in printed and "image too small" in printed and "mask ignored: " in printed


def test_check_reports_unusable_when_nothing_decodes(tmp_path: Path) -> None:
    (tmp_path / "COVID/images").mkdir(parents=True)
    (tmp_path / "COVID/images/COVID-1.png").write_text("not a png")
    scan = check_layout(tmp_path)
    assert not scan.usable
    assert scan.to_dict()["totals"]["unreadable"] == 1


@pytest.mark.parametrize(
    ("url", "source"),
    [
        ("https://www.nejm.org/doi/full/10.1056/NEJMc2001272", "nejm.org"),
        ("https://github.com/ieee8023/covid-chestxray-dataset", "github.com/ieee8023"),
        ("https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data", "kaggle.com/c"),
        (None, "unknown"),
        ("", "unknown"),
    ],
)
def test_source_of(url: str | None, source: str) -> None:
    assert source_of(url) == source


def test_real_sample_layout(real_sample: Path) -> None:
    scan = check_layout(real_sample)
    assert {k: v.images for k, v in scan.classes.items()} == {
        "COVID": 50,
        "Normal": 40,
        "Viral Pneumonia": 40,
    }
    assert scan.classes["COVID"].pairs == 30
    assert all(r.metadata_unmatched == 0 and r.unreadable == 0 for r in scan.classes.values())
    assert np.mean([e.source != "unknown" for e in scan.entries]) == 1.0


def _chest_dicom(seed: int, preamble: bool = True) -> bytes:
    return dicom_bytes(np.round(chest(seed, 120, 100) * 4000).astype(np.uint16), preamble=preamble)


def test_class_folders_holding_images_directly_a_subset_of_classes_and_dicom(tmp_path: Path) -> None:
    root = tmp_path / "hospital"
    write_png(root / "covid/a.png", xray(1))
    write_png(root / "covid/b.jpg", xray(2))
    normal = root / "NORMAL"
    normal.mkdir()
    (normal / "c.dcm").write_bytes(_chest_dicom(0))
    (normal / "d.dcm").write_bytes(_chest_dicom(1, preamble=False))  # known as DICOM by its name only
    (normal / "e.dcm").write_bytes(b"not a dicom")
    scan = check_layout(root)
    assert {label: report.images for label, report in scan.classes.items()} == {"COVID": 2, "Normal": 3}
    assert all(entry.mask_path is None and entry.source == "unknown" for entry in scan.entries)
    [unreadable] = scan.unreadable
    assert Path(unreadable["path"]).name == "e.dcm" and "DICOM" in unreadable["reason"]
    # Ingest reads a DICOM exactly as `cxr serve` decodes the same file uploaded.
    data = (normal / "c.dcm").read_bytes()
    np.testing.assert_array_equal(decode_image(data, "c.dcm"), decode_upload(data, "application/dicom"))
    headless = (normal / "d.dcm").read_bytes()
    assert decode_image(headless, "d.dcm").shape == (120, 100)


def test_exports_nested_per_patient_with_extensionless_dicoms_are_read_whole(tmp_path: Path) -> None:
    """A PACS export: a folder per patient and study, DICOMs named by number or UID, masks nested alike;
    images loose beside images/, and two files of one name in two formats, are all kept."""
    root = tmp_path / "pacs"
    covid = root / "COVID"
    for patient in ("p1/study1", "p2"):
        (covid / "images" / patient).mkdir(parents=True)
        (covid / "images" / patient / "IM0001").write_bytes(_chest_dicom(len(patient)))
    (covid / "images/p2/1.2.840.113619.2.55.3.1234").write_bytes(_chest_dicom(5))
    write_png(covid / "masks/p1/study1/IM0001.png", lung_mask())
    write_png(covid / "loose.png", xray(1))
    (covid / "images/p2/notes.txt").write_text("not an image")
    (covid / "images/p2/IM0002").write_bytes(b"no DICOM signature")
    (covid / "images/p2/BARE0005").write_bytes(_chest_dicom(6, preamble=False))  # no preamble, no suffix
    write_png(root / "Normal/same.png", xray(2))
    write_png(root / "Normal/same.jpg", xray(3))
    (root / "Normal/same.jpg").rename(root / "Normal/same.jfif")  # a JPEG as Windows names it
    scan = scan_layout(root)
    files = {
        entry.label: sorted(e.file for e in scan.entries if e.label == entry.label) for entry in scan.entries
    }
    assert files == {
        "COVID": [
            "loose.png", "p1/study1/IM0001", "p2/1.2.840.113619.2.55.3.1234", "p2/BARE0005", "p2/IM0001"
        ],
        "Normal": ["same.jfif", "same.png"],
    }  # fmt: skip
    masks = {entry.file: entry.mask_path for entry in scan.entries}
    assert masks["p1/study1/IM0001"] == str(covid / "masks/p1/study1/IM0001.png")
    assert masks["p2/IM0001"] is None  # same name, another patient: not its mask
    assert (scan.classes["COVID"].images, scan.classes["COVID"].pairs, scan.orphan_masks) == (5, 1, [])
    assert check_layout(root).unreadable == []  # each extensionless file kept is a readable DICOM


def test_class_folders_without_an_image_file_are_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "raw/COVID/images").mkdir(parents=True)
    (tmp_path / "raw/Normal").mkdir()
    (tmp_path / "raw/Normal/readme.txt").write_text("exported 2026-11-30")
    with pytest.raises(LayoutError, match=r"class folders under .*raw \(COVID, Normal\) hold no image files"):
        scan_layout(tmp_path / "raw")


def test_folder_names_map_like_labels_and_a_folder_that_maps_to_none_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "export"
    write_png(root / "COVID-19/a.png", xray(1))
    for i in range(2):
        write_png(root / f"Tuberculosis/t{i}.png", xray(10 + i))
    scan = scan_layout(root, label_map={"covid-19": "COVID"})
    assert [entry.label for entry in scan.entries] == ["COVID"]
    assert scan.unmapped == {
        "Tuberculosis": [str(root / "Tuberculosis/t0.png"), str(root / "Tuberculosis/t1.png")]
    }
    refusal = scan.refusal()
    assert refusal is not None
    assert "label 'Tuberculosis' maps to no class (2): Tuberculosis/t0.png, Tuberculosis/t1.png" in refusal
    assert '--map "LABEL=CLASS,..."' in refusal and "--skip-unmapped" in refusal
    with pytest.raises(LayoutError, match=r"(?s)'COVID-19' maps to no class.*'Tuberculosis'"):
        scan_layout(root)  # nothing maps without --map: the error is the list, not "no images"


@pytest.fixture
def export(tmp_path: Path) -> tuple[Path, Path]:
    """A hospital's export: one folder of images and a CSV that labels them in its own words."""
    root = tmp_path / "export"
    for i in range(5):
        write_png(root / f"img{i}.png", xray(i))
    (root / "scan5.dcm").write_bytes(_chest_dicom(5))
    write_png(root / "extra.png", xray(9))  # not in the label file
    rows = [
        ("IMG0", "COVID-19", "https://www.hosp-a.org/case/1"),  # no extension, other case
        ("img1.png", "No finding", "https://hosp-b.org/2"),
        ("img2.png", "Viral Pneumonia", ""),  # a class name already
        ("img3.png", "Tuberculosis", ""),
        ("img4.png", "covid-19", ""),  # the same label, spelled in another case
        ("scan5.dcm", "No finding", ""),
        ("scan5.dcm", "No finding", ""),  # named twice, alike: fine
        ("gone.png", "COVID-19", ""),
    ]
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["File Name", "finding", "URL"]).to_csv(labels, index=False)
    return root, labels


HOSPITAL_MAP = {"COVID-19": "COVID", "No finding": "Normal"}


def test_flat_folder_labelled_by_a_csv(export: tuple[Path, Path]) -> None:
    root, labels = export
    scan = check_layout(root, LabelFile(str(labels), label_column="finding"), HOSPITAL_MAP)
    by_file = {entry.file: entry for entry in scan.entries}
    assert {name: entry.label for name, entry in by_file.items()} == {
        "img0.png": "COVID", "img1.png": "Normal", "img2.png": "Viral Pneumonia", "img4.png": "COVID",
        "scan5.dcm": "Normal",
    }  # fmt: skip
    assert list(scan.classes) == ["COVID", "Normal", "Viral Pneumonia"]
    assert (by_file["img0.png"].source, by_file["img1.png"].source, by_file["img2.png"].source) == (
        "hosp-a.org",
        "hosp-b.org",
        "unknown",
    )
    assert scan.label_file == {
        "path": str(labels), "file_column": "File Name", "label_column": "finding", "url_column": "URL",
        "patient_column": None,
    }  # fmt: skip
    assert scan.unmapped == {"Tuberculosis": [str(root / "img3.png")]}
    assert scan.missing_files == ["gone.png"]
    assert scan.unlabelled == [str(root / "extra.png")]
    assert scan.unreadable == []  # the DICOM decodes
    assert "label 'Tuberculosis' maps to no class (1): img3.png" in (scan.refusal() or "")


def test_a_csv_saved_by_excel_in_a_western_locale_is_read(tmp_path: Path) -> None:
    """Excel's plain "CSV" in a French locale: Windows-1252 text, ';' between the columns."""
    root = tmp_path / "export"
    write_png(root / "café.png", xray(1))
    write_png(root / "b.png", xray(2))
    labels = tmp_path / "labels.csv"
    labels.write_bytes("Fichier;Diagnostic\ncafé.png;Pneumonie virale\nb.png;Normal\n".encode("cp1252"))
    scan = check_layout(
        root,
        LabelFile(str(labels), label_column="Diagnostic", file_column="Fichier"),
        {"Pneumonie virale": "Viral Pneumonia"},
    )
    assert {entry.file: entry.label for entry in scan.entries} == {
        "café.png": "Viral Pneumonia",
        "b.png": "Normal",
    }
    assert scan.warnings == [f"{labels} is not UTF-8: read as Windows-1252 (Excel's CSV in Western locales)"]


def test_names_decomposed_on_disk_match_the_label_files_composed_ones(tmp_path: Path) -> None:
    """Files copied from macOS often arrive with decomposed names (NFD: "u" and a combining diaeresis), the
    label file typed composed (NFC): no image was found, in an error whose two lists looked the same."""
    import unicodedata

    root = tmp_path / "export"
    for i, name in enumerate(["Müller_Zoë_0.png", "Müller_Zoë_1.png"]):
        write_png(root / unicodedata.normalize("NFD", name), xray(i))
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nMüller_Zoë_0.png,Normal\nMüller_Zoë_1,COVID\n", encoding="utf-8")
    scan = check_layout(root, LabelFile(str(labels)), {})
    found = {unicodedata.normalize("NFC", entry.file): entry.label for entry in scan.entries}
    assert found == {"Müller_Zoë_0.png": "Normal", "Müller_Zoë_1.png": "COVID"}
    assert scan.missing_files == [] and scan.unlabelled == []


def test_a_label_files_patient_column_is_found_named_or_declined(tmp_path: Path) -> None:
    """The patient of each image (its images then share a split): a column named like one is taken, one
    named by --patient-column, none with `none`; a name the file lacks is refused with its columns."""
    root = tmp_path / "export"
    write_png(root / "a.png", xray(1))
    write_png(root / "b.png", xray(2))
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label,Patient ID,MRN\na.png,Normal,P1,77\nb.png,COVID,P1,78\n")
    scan = check_layout(root, LabelFile(str(labels)), {})
    assert [entry.patient for entry in scan.entries] == ["P1", "P1"]
    assert scan.label_file is not None and scan.label_file["patient_column"] == "Patient ID"
    scan = check_layout(root, LabelFile(str(labels), patient_column="mrn"), {})
    assert sorted(entry.patient for entry in scan.entries) == ["77", "78"]
    scan = check_layout(root, LabelFile(str(labels), patient_column="none"), {})
    assert [entry.patient for entry in scan.entries] == ["", ""]
    with pytest.raises(LayoutError, match=r"^--patient-column: .* has no column 'subject'; its columns"):
        check_layout(root, LabelFile(str(labels), patient_column="subject"), {})
    with pytest.raises(LayoutError, match=r"--patient-column name columns of a label file: pass --labels"):
        LabelFile.from_flags(None, patient_column="Patient ID")
    assert LabelFile.from_flags(None, patient_column="none") is None  # a DICOM's PatientID off, no file


def test_a_scan_that_stops_logs_its_warnings_as_no_report_will_carry_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "export"
    write_png(root / "b.png", xray(2))
    labels = tmp_path / "labels.csv"
    labels.write_bytes("Fichier;Diagnostic\ncafé.png;Normal\n".encode("cp1252"))
    with pytest.raises(LayoutError, match=r"café\.png"):
        scan_layout(root, LabelFile(str(labels), label_column="Diagnostic", file_column="Fichier"))
    assert "not UTF-8: read as Windows-1252" in caplog.text


def test_xlsx_label_file_with_paths_and_conflicting_labels(tmp_path: Path) -> None:
    root = tmp_path / "export"
    write_png(root / "batch1/a.png", xray(1))
    write_png(root / "b.png", xray(2))
    write_png(root / "c.png", xray(3))
    labels = tmp_path / "labels.xlsx"
    rows = [("batch1/a.png", "Normal"), ("b.png", "Normal"), ("b.png", "COVID"), ("c.png", "COVID")]
    pd.DataFrame(rows, columns=["Path", "Label"]).to_excel(labels, index=False)
    scan = scan_layout(root, LabelFile(str(labels)))  # both columns found by their names
    assert scan.label_file is not None and scan.label_file["url_column"] is None
    assert {(entry.file, entry.label) for entry in scan.entries} == {("a.png", "Normal"), ("c.png", "COVID")}
    assert scan.conflicting_labels == {str(root / "b.png"): ["Normal", "COVID"]}
    assert "b.png has labels of different classes: 'Normal', 'COVID'" in (refusal := scan.refusal() or "")
    assert "give each image one label in the label file" in refusal and "--map" not in refusal  # no mend
    # An export's title and date above the header: the header is found below them.
    with pd.ExcelWriter(labels) as writer:
        pd.DataFrame([["Radiology export"], ["2026-12-01"]]).to_excel(writer, index=False, header=False)
        pd.DataFrame(rows, columns=["Path", "Label"]).to_excel(writer, index=False, startrow=3)
    scan = scan_layout(root, LabelFile(str(labels)))
    assert {(entry.file, entry.label) for entry in scan.entries} == {("a.png", "Normal"), ("c.png", "COVID")}


@pytest.mark.parametrize(
    ("label_file", "message"),
    [
        (LabelFile("missing.csv"), "--labels: .*missing.csv does not exist"),
        (LabelFile("a.json"), "is neither CSV nor XLSX"),
        (LabelFile("c.xlsx"), "--labels: cannot read .*c.xlsx as an Excel workbook"),
        (LabelFile("a.csv", label_column="findng"), r"--label-column: .* 'findng' \(did you mean 'finding'"),
        (
            LabelFile("a.csv", file_column="x"),
            "--file-column: .* no column 'x'; its columns: filename, finding",
        ),
        (LabelFile("b.csv"), "no column is recognisably the label column; name it with --label-column"),
        (LabelFile("a.csv", file_column="finding"), "no image in .* is named in column 'finding'"),
    ],
)
def test_label_file_problems_name_the_flag_to_fix_them(
    tmp_path: Path, label_file: LabelFile, message: str
) -> None:
    write_png(tmp_path / "raw/img.png", xray(0))
    (tmp_path / "a.csv").write_text("filename,finding\nimg.png,COVID\n")
    (tmp_path / "b.csv").write_text("filename,what\nimg.png,COVID\n")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "c.xlsx").write_text("filename,finding\nimg.png,COVID\n")  # a CSV named .xlsx
    located = LabelFile(str(tmp_path / label_file.path), label_file.label_column, label_file.file_column)
    with pytest.raises(LayoutError, match=message):
        scan_layout(tmp_path / "raw", located)
    with pytest.raises(LayoutError, match="pass --labels FILE too"):
        LabelFile.from_flags(None, label_column="finding")


def test_label_map_flag() -> None:
    assert parse_label_map('COVID-19=covid, No finding = Normal, "Pneumonia, viral=Viral Pneumonia"') == {
        "COVID-19": "COVID",
        "No finding": "Normal",
        "Pneumonia, viral": "Viral Pneumonia",
    }
    with pytest.raises(ConfigError, match=r"--map: 'Tuberculosis' .* is not a class; classes: COVID"):
        parse_label_map("TB=Tuberculosis")
    with pytest.raises(ConfigError, match="--map: expected LABEL=CLASS pairs"):
        parse_label_map("COVID-19")


def test_check_and_ingest_refuse_unmapped_labels_with_their_files(
    export: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cxrcore.data.ingest import ingest_dataset

    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    args = ["data", "check", "export", "--labels", "labels.csv", "--map", "COVID-19=COVID,No finding=Normal"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "label 'Tuberculosis' maps to no class (1): img3.png" in out
    assert "named in the label file but not found (1): gone.png" in out
    assert "not in the label file, skipped (1): extra.png" in out
    assert "--skip-unmapped" in err
    assert main([*args, "--skip-unmapped"]) == 0
    assert "left out, label 'Tuberculosis' maps to no class (1): img3.png" in capsys.readouterr().out

    # Ingest stops before decoding anything (no Ray needed to get here), and writes nothing.
    config = IngestConfig(raw="export", out="ds", labels="labels.csv", map="COVID-19=COVID,No finding=Normal")
    with pytest.raises(
        LayoutError, match=r"(?s)'Tuberculosis' maps to no class \(1\): img3.png.*--skip-unmapped"
    ):
        ingest_dataset(config)
    assert not (tmp_path / "ds").exists()
    # `cxr data ingest` refuses it before it starts Ray.
    monkeypatch.setattr("cxrcore.cli._connect", lambda address: pytest.fail("Ray started"))
    assert main(["data", "ingest", "export", "ds", *args[3:]]) == 2
    assert "'Tuberculosis' maps to no class (1): img3.png" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_real_sample_as_a_flat_folder_with_a_csv(real_sample: Path, tmp_path: Path) -> None:
    labels = write_flat_copy(real_sample, tmp_path / "flat", {"COVID": "COVID-19", "Normal": "No finding"})
    scan = scan_layout(tmp_path / "flat", LabelFile(str(labels), "finding"), HOSPITAL_MAP)
    assert {label: report.images for label, report in scan.classes.items()} == {
        "COVID": 50,
        "Normal": 40,
        "Viral Pneumonia": 40,
    }
    assert scan.refusal() is None and not scan.missing_files and not scan.unlabelled
    assert scan.sources["data.mendeley.com"] == 80 and "unknown" not in scan.sources


def write_flat_copy(raw: Path, out: Path, labels: dict[str, str]) -> Path:
    """Lay a Kaggle-layout dataset out as a hospital would send it: symlinked images in one folder and a
    CSV (filename, finding, url) whose labels are `labels[class]` or the class name; returns the CSV."""
    out.mkdir(parents=True)
    rows = []
    for entry in scan_layout(raw).entries:
        (out / entry.file).symlink_to(entry.image_path)
        rows.append((entry.file, labels.get(entry.label, entry.label), entry.url))
    path = out.parent / f"{out.name}.csv"
    pd.DataFrame(rows, columns=["filename", "finding", "url"]).to_csv(path, index=False)
    return path


def test_ingest_never_writes_over_raw_or_a_folder_of_other_files(raw: Path, tmp_path: Path) -> None:
    """Ingest replaces OUT whole: RAW itself, a folder holding RAW, or one of other files would be lost."""
    from cxrcore.data.ingest import scan_ingest_input

    def scan(out: Path | str) -> object:
        return scan_ingest_input(IngestConfig(raw=str(raw), out=str(out), skip_unmapped=True))

    with pytest.raises(LayoutError, match=r"is RAW: ingest replaces OUT whole .*cxr data ingest .*-dataset`"):
        scan(raw)
    with pytest.raises(LayoutError, match="holds RAW"):
        scan(raw.parent)
    notes = tmp_path / "project"
    notes.mkdir()
    (notes / "keep.txt").write_text("important")
    with pytest.raises(LayoutError, match=r"holds files that are not a cxr dataset's \(keep.txt\)"):
        scan(notes)
    with pytest.raises(LayoutError, match="is a file"):
        scan(notes / "keep.txt")
    assert (notes / "keep.txt").read_text() == "important"
    empty, dataset = tmp_path / "empty", tmp_path / "dataset"
    empty.mkdir()
    (dataset / "split=train").mkdir(parents=True)
    (dataset / "ingest_report.json").write_text("{}")
    for out in (empty, dataset, tmp_path / "new"):  # a new folder, an empty one, a dataset: written over
        scan(out)


def test_a_raw_folder_given_as_a_dataset_is_told_to_be_ingested_elsewhere(raw: Path) -> None:
    from cxrcore.data.ingest import read_report

    with pytest.raises(
        FileNotFoundError, match=rf"cxr data ingest {raw} {raw.name}-dataset`, then pass that"
    ):
        read_report(str(raw))


@pytest.mark.parametrize(
    ("image", "mask"),
    [
        ("images/a.png", "lung masks/a.png"),  # COVID-QU-Ex
        ("a.png", "mask/a.png"),
        ("images/a.png", "Masks/a.png"),
        ("images/p1/a.png", "lung_masks/p1/a.png"),
        ("p1/a.png", "p1/masks/a.png"),  # a mask folder per patient
        ("p1/images/a.png", "p1/masks/a.png"),
        ("images/p1/a.png", "images/p1/masks/a.jpg"),  # any extension, as in masks/
        ("images/CHNCXR_0001_0.png", "masks/CHNCXR_0001_0_mask.png"),  # the Shenzhen set's names
        ("images/a.png", "masks/a-Mask.png"),
        ("images/p1/a.png", "masks/p1/a_lung_mask.png"),
    ],
)
def test_mask_folders_are_told_by_name_at_any_depth_and_never_read_as_images(
    tmp_path: Path, image: str, mask: str
) -> None:
    covid = tmp_path / "raw/COVID"
    write_png(covid / image, xray(1))
    write_png(covid / mask, lung_mask())
    write_png(tmp_path / "raw/Normal/n.png", xray(2))
    scan = scan_layout(tmp_path / "raw")
    assert [(entry.file, entry.mask_path) for entry in scan.entries if entry.label == "COVID"] == [
        (image.removeprefix("images/"), str(covid / mask))
    ]
    report = scan.classes["COVID"]
    assert (report.images, report.masks, report.pairs, report.masks_without_image) == (1, 1, 1, 0)


@pytest.mark.parametrize("folder", ["lung masks", "Lung_Masks", "LungMasks", "MASK", "segmentation-masks"])
def test_a_mask_folder_is_told_by_a_word_of_its_name(tmp_path: Path, folder: str) -> None:
    write_png(tmp_path / "raw/COVID/images/a.png", xray(1))
    write_png(tmp_path / "raw/COVID" / folder / "a.png", lung_mask())
    scan = scan_layout(tmp_path / "raw")
    assert [(entry.file, entry.mask_path) for entry in scan.entries] == [
        ("a.png", str(tmp_path / "raw/COVID" / folder / "a.png"))
    ]


def test_patient_folders_whose_names_hold_mask_keep_their_x_rays(tmp_path: Path) -> None:
    """PACS exports name patient folders `FAMILY^GIVEN`: `DAMASKE^HANS` holds X-rays, not masks."""
    normal = tmp_path / "raw/Normal"
    for i, patient in enumerate(["DAMASKE^HANS", "TOMASKOVA^JANA", "SMITH^ANN"]):
        write_png(normal / patient / "study1" / "IM0001.png", xray(i))
    scan = scan_layout(tmp_path / "raw")
    assert scan.classes["Normal"].images == 3 and scan.classes["Normal"].masks_without_image == 0
    assert not scan.warnings and not scan.orphan_masks


def test_a_mask_named_as_its_image_pairs_before_one_named_with_mask_added(tmp_path: Path) -> None:
    covid = tmp_path / "raw/COVID"
    write_png(covid / "images/a.png", xray(1))
    write_png(covid / "images/b_mask.png", xray(2))  # an X-ray whose name ends in _mask
    for name in ("a.png", "a_mask.png", "b_mask.png"):
        write_png(covid / "masks" / name, lung_mask())
    scan = scan_layout(tmp_path / "raw")
    assert {entry.file: entry.mask_path for entry in scan.entries} == {
        "a.png": str(covid / "masks/a.png"),
        "b_mask.png": str(covid / "masks/b_mask.png"),
    }
    assert not scan.orphan_masks  # a_mask.png is a second mask for a.png, not a mask without its image
    assert [(Path(p["path"]).name, p["reason"]) for p in scan.mask_problems] == [
        ("a_mask.png", "a second mask for the same image (the one read: masks/a.png)")
    ]
    assert (scan.classes["COVID"].masks, scan.classes["COVID"].pairs) == (2, 2)


def test_covid_qu_ex_lung_masks_are_counted_as_masks_by_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """COVID-QU-Ex (by the Kaggle database's authors): `<class>/images` and `<class>/lung masks`."""
    root = tmp_path / "qu-ex"
    for i in range(2):
        write_png(root / f"COVID-19/images/covid_{i}.png", xray(i))
        write_png(root / f"COVID-19/lung masks/covid_{i}.png", lung_mask())
    write_png(root / "COVID-19/lung masks/covid_9.png", lung_mask())  # mask without image
    write_png(root / "Normal/images/normal_0.png", xray(5))
    (root / "Normal/lung masks").mkdir()
    assert main(["data", "check", str(root), "--map", "COVID-19=COVID"]) == 0
    rows = {line.split()[0]: line.split()[1:6] for line in capsys.readouterr().out.splitlines()}
    # images, masks, pairs, no mask, orphan masks
    assert rows["COVID"] == ["2", "3", "2", "0", "1"] and rows["Normal"] == ["1", "0", "0", "1", "0"]


def test_of_several_mask_folders_side_by_side_the_lung_masks_are_read_and_the_rest_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The warning is the scan's, in its report (`cxr data check`, its --json, ingest_report.json), not a log
    line printed as the scan goes."""
    covid = tmp_path / "raw/COVID"
    write_png(covid / "images/a.png", xray(1))
    write_png(covid / "infection masks/a.png", lung_mask(40))
    write_png(covid / "lung masks/a.png", lung_mask())
    write_png(covid / "masks/a.png", lung_mask(60))
    scan = scan_layout(tmp_path / "raw")
    assert [(entry.file, entry.mask_path) for entry in scan.entries] == [
        ("a.png", str(covid / "lung masks/a.png"))
    ]
    assert (scan.classes["COVID"].masks, scan.orphan_masks) == (1, [])
    warning = f"{covid}: masks read from 'lung masks' only, not from 'infection masks', 'masks'"
    assert scan.warnings == [warning]
    assert main(["data", "check", str(tmp_path / "raw"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [warning]
    assert main(["data", "check", str(tmp_path / "raw")]) == 0
    assert f"WARNING: {warning}" in capsys.readouterr().out.splitlines()
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


UID = "1.2.840.113619.2.55.3"


def test_dicoms_named_by_uid_pair_with_masks_and_metadata_by_their_whole_name(tmp_path: Path) -> None:
    """`.1000` in `<UID>.1000` is no extension: the stem is the whole name, so `<UID>.png` is no image's
    mask and `<UID>.1000.png` is that one image's."""
    covid = tmp_path / "raw/COVID"
    (covid / "pat1").mkdir(parents=True)
    for i, number in enumerate(("1000", "1001")):
        (covid / f"pat1/{UID}.{number}").write_bytes(_chest_dicom(i))
    write_png(covid / f"masks/pat1/{UID}.1000.png", lung_mask())
    write_png(covid / f"masks/pat1/{UID}.png", lung_mask())
    pd.DataFrame(
        {"FILE NAME": [f"{UID}.1000", f"{UID}.1001"], "URL": ["https://a.org/1", "https://b.org/2"]}
    ).to_excel(tmp_path / "raw/COVID.metadata.xlsx", index=False)
    scan = scan_layout(tmp_path / "raw")
    by_file = {entry.file: (entry.mask_path, entry.source) for entry in scan.entries}
    assert by_file == {
        f"pat1/{UID}.1000": (str(covid / f"masks/pat1/{UID}.1000.png"), "a.org"),
        f"pat1/{UID}.1001": (None, "b.org"),
    }
    assert scan.orphan_masks == [str(covid / f"masks/pat1/{UID}.png")]
    assert (scan.classes["COVID"].metadata_matched, scan.classes["COVID"].metadata_unmatched) == (2, 0)


def test_flat_folder_finds_dicoms_named_without_an_extension_or_by_uid(tmp_path: Path) -> None:
    root = tmp_path / "export"
    root.mkdir()
    for i, name in enumerate(("IM0001", f"{UID}.1000", f"{UID}.1001", f"{UID}.1002")):
        (root / name).write_bytes(_chest_dicom(i))
    write_png(root / "a.png", xray(9))
    (root / "README").write_text("not an image")
    labels = tmp_path / "labels.csv"
    rows = [
        ("IM0001", "COVID-19"),
        (f"{UID}.1000", "No finding"),
        (f"{UID}.1001.dcm", "No finding"),
        ("a.png", "COVID-19"),
    ]
    pd.DataFrame(rows, columns=["filename", "finding"]).to_csv(labels, index=False)
    scan = check_layout(root, LabelFile(str(labels)), HOSPITAL_MAP)
    assert {entry.file: entry.label for entry in scan.entries} == {
        "IM0001": "COVID", f"{UID}.1000": "Normal", f"{UID}.1001": "Normal", "a.png": "COVID"
    }  # fmt: skip
    assert scan.missing_files == [] and scan.unlabelled == [str(root / f"{UID}.1002")]
    assert scan.unreadable == []


def _kaggle_metadata() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "FILE NAME": ["COVID-1", "COVID-2"],
            "FORMAT": "PNG",
            "URL": ["https://a.org/1", "https://github.com/b/c"],
        }
    )


def _renamed_columns(path: Path) -> None:
    _kaggle_metadata().rename(columns={"FILE NAME": "Image", "URL": "Source URL"}).to_excel(path, index=False)


def _note_sheet_first(path: Path) -> None:
    with pd.ExcelWriter(path) as writer:
        pd.DataFrame({"note": ["see the next sheet"]}).to_excel(writer, sheet_name="Info", index=False)
        _kaggle_metadata().to_excel(writer, sheet_name="Sheet1", index=False)


def _title_above_header(path: Path) -> None:
    with pd.ExcelWriter(path) as writer:
        _kaggle_metadata().rename(columns={"URL": "link"}).to_excel(writer, index=False, startrow=2)
        pd.DataFrame([["Metadata for the COVID class"]]).to_excel(writer, index=False, header=False)


@pytest.mark.parametrize("write", [_renamed_columns, _note_sheet_first, _title_above_header])
def test_metadata_sheets_laid_out_otherwise_still_give_sources(
    tmp_path: Path, write: Callable[[Path], None]
) -> None:
    for i in (1, 2):
        write_png(tmp_path / f"raw/COVID/images/COVID-{i}.png", xray(i))
    write(tmp_path / "raw/COVID.metadata.xlsx")
    scan = scan_layout(tmp_path / "raw")
    assert {entry.file: entry.source for entry in scan.entries} == {
        "COVID-1.png": "a.org",
        "COVID-2.png": "github.com/b",
    }
    assert scan.classes["COVID"].metadata_matched == 2


def test_metadata_naming_no_files_is_warned_about_once_and_the_sources_are_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Metadata only gives sources: a sheet without a file name column is no reason to stop."""
    write_png(tmp_path / "raw/COVID/images/COVID-1.png", xray(1))
    with pd.ExcelWriter(tmp_path / "raw/COVID.metadata.xlsx") as writer:
        pd.DataFrame({"note": ["exported 2026-11-30"]}).to_excel(writer, sheet_name="Info", index=False)
        pd.DataFrame({"patient": ["p1"], "age": ["61"]}).to_excel(writer, sheet_name="Patients", index=False)
    assert main(["data", "check", str(tmp_path / "raw")]) == 0
    out = capsys.readouterr().out
    assert "sources (images): unknown 1" in out
    [warning] = [line for line in out.splitlines() if line.startswith("WARNING: ")]
    assert warning == (
        f"WARNING: {tmp_path / 'raw/COVID.metadata.xlsx'}: no sheet has a file name column (FILE NAME, "
        "filename, image, path, ...) in its first 10 rows (sheet 'Info': note; sheet 'Patients': patient, "
        "age): the source of its images is unknown"
    )


def _pediatric_set(root: Path) -> None:
    """The pediatric (Kermany) set as it unpacks: `chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}`."""
    for i, split in enumerate(["train", "test", "val"]):
        write_png(root / "chest_xray" / split / "NORMAL" / f"n{i}.png", xray(i))
        write_png(root / "chest_xray" / split / "PNEUMONIA" / f"p{i}.png", xray(10 + i))


def test_a_dataset_wrapped_twice_is_found_and_its_splits_are_named(tmp_path: Path) -> None:
    _pediatric_set(tmp_path / "kermany")
    with pytest.raises(
        LayoutError, match=r"several datasets \(chest_xray/test, chest_xray/train, chest_xray/val\)"
    ):
        scan_layout(tmp_path / "kermany", label_map={"PNEUMONIA": "Viral Pneumonia"})
    write_png(tmp_path / "zip/download/data/COVID/a.png", xray(1))
    write_png(tmp_path / "zip/download/data/Normal/b.png", xray(2))
    scan = scan_layout(tmp_path / "zip")
    assert scan.root == str(tmp_path / "zip/download/data") and scan.classes["COVID"].images == 1


def test_a_folder_mapped_to_a_class_that_holds_other_classes_is_refused(tmp_path: Path) -> None:
    """Mapping the wrapper `chest_xray` to Normal labelled every pneumonia film below it Normal."""
    _pediatric_set(tmp_path / "kermany")
    with pytest.raises(LayoutError) as refused:
        scan_layout(tmp_path / "kermany", label_map={"chest_xray": "Normal", "PNEUMONIA": "Viral Pneumonia"})
    message = str(refused.value)
    assert "read as class Normal" in message and "train/PNEUMONIA/ (Viral Pneumonia)" in message
    assert "NORMAL/ (" not in message  # a folder of its own class is only a folder
    # A folder named as its own class, as a zip doubles it, is harmless.
    write_png(tmp_path / "raw/COVID/COVID/a.png", xray(1))
    write_png(tmp_path / "raw/Normal/b.png", xray(2))
    assert scan_layout(tmp_path / "raw").classes["COVID"].images == 1


def test_the_report_lists_classes_in_their_own_order_whatever_the_folders_sort_as(tmp_path: Path) -> None:
    write_png(tmp_path / "raw/NORMAL/a.png", xray(1))
    write_png(tmp_path / "raw/VIRAL/b.png", xray(2))
    write_png(tmp_path / "raw/covid19/c.png", xray(3))  # sorts after the others, by case
    scan = scan_layout(tmp_path / "raw", label_map={"covid19": "COVID", "VIRAL": "Viral Pneumonia"})
    assert list(scan.to_dict()["classes"]) == ["COVID", "Normal", "Viral Pneumonia"]


def test_check_names_the_classes_of_identical_files_filed_under_two(tmp_path: Path) -> None:
    from cxrcore.summaries import format_scan

    for path in ("raw/COVID/a.png", "raw/Normal/a_copy.png", "raw/Normal/b.png", "raw/Normal/b2.png"):
        write_png(tmp_path / path, xray(1 if "a" in Path(path).stem else 2))
    printed = format_scan(check_layout(tmp_path / "raw"))
    covid, normal = tmp_path / "raw/COVID/a.png", tmp_path / "raw/Normal/a_copy.png"
    assert (
        f"identical files under different classes (one label is wrong): {covid} (COVID), {normal} (Normal)"
        in printed
    )
    assert f"identical files: {tmp_path / 'raw/Normal/b.png'}, {tmp_path / 'raw/Normal/b2.png'}" in printed


def test_files_that_are_not_images_are_named_not_skipped_without_a_word(tmp_path: Path) -> None:
    """A GIF, a PDF report or a DICOM the bytes do not tell were left out of check and ingest silently."""
    root = tmp_path / "raw"
    write_png(root / "COVID/images/c1.png", xray(1))
    write_png(root / "Normal/n1.png", xray(2))
    (root / "COVID/images/c2.gif").write_bytes(b"GIF89a")
    (root / "Normal/p7/report.pdf").parent.mkdir(parents=True)
    (root / "Normal/p7/report.pdf").write_bytes(b"%PDF")
    (root / "Normal/.DS_Store").write_bytes(b"\0")  # hidden: not the user's files
    (root / "Normal/Thumbs.db").write_bytes(b"\0")  # nor Windows' thumbnails
    scan = scan_layout(root)
    assert scan.skipped_files == [str(root / "COVID/images/c2.gif"), str(root / "Normal/p7/report.pdf")]
    assert scan.warnings == [
        "2 file(s) are not images and were not read (.gif 1, .pdf 1): COVID/images/c2.gif, "
        "Normal/p7/report.pdf; "
        "an image in another format is read once converted to PNG (or DICOM with its preamble)"
    ]
    assert scan.to_dict()["skipped_files"] == scan.skipped_files
    # a flat folder: its label file is read, not skipped
    flat = tmp_path / "flat"
    write_png(flat / "a.png", xray(3))
    (flat / "labels.csv").write_text("file,label\na.png,Normal\n")
    (flat / "notes.txt").write_text("x")
    scan = scan_layout(flat, LabelFile(str(flat / "labels.csv")))
    assert scan.skipped_files == [str(flat / "notes.txt")] and "(.txt 1): notes.txt;" in scan.warnings[0]


def test_patient_folders_are_asked_of_class_folders_only() -> None:
    assert LabelFile.from_flags(None, patient_column="folder") is None  # class folders: no label file
    with pytest.raises(LayoutError, match="--patient-column folder: the patients are the folders below each"):
        LabelFile.from_flags("labels.csv", patient_column="folder")


def test_data_check_warns_where_sources_separate_classes_before_the_ingest(raw: Path) -> None:
    """Ingest's warning, said by `cxr data check` too, where --test-sources can still be chosen: COVID's
    images come from one source and Viral Pneumonia's from another (the Kaggle database is so made)."""
    import dataclasses

    from cxrcore.summaries import format_scan, scan_confound

    scan = scan_layout(raw)
    warning = scan_confound(scan)
    assert warning is not None and warning.startswith("every source holds one class only")
    assert "--test-sources" in warning
    assert f"WARNING: {warning}" in format_scan(scan, skip_unmapped=True)
    mixed = next(e for e in scan.entries if e.label == "Viral Pneumonia")
    scan.entries.append(dataclasses.replace(mixed, label="COVID", file="also-covid.png"))  # x.org holds both
    assert scan_confound(scan) is None  # Normal's source is unknown: it separates nothing


def test_an_empty_label_file_is_refused_in_one_line(tmp_path: Path) -> None:
    """A review (session 53): an empty label CSV (or one holding only a byte-order mark or blank lines)
    ended `cxr data check` and `ingest` in csv's "Could not determine delimiter" traceback."""
    from cxrcore.data.layout import LabelFile

    write_png(tmp_path / "flat/a.png", xray(1))
    for content in (b"", b"\xef\xbb\xbf", b"\n\n"):
        (tmp_path / "labels.csv").write_bytes(content)
        with pytest.raises(LayoutError, match=r"--labels: cannot read .*labels.csv as a table .*empty"):
            scan_layout(tmp_path / "flat", LabelFile(str(tmp_path / "labels.csv")))


def test_synth_out_given_with_a_tilde_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`out: ~/x` in a --config file (no shell expands it) wrote half a dataset into `./~/x`, then failed."""
    from cxrcore.config import SynthConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert SynthConfig(out="~/synth").out == str(tmp_path / "home" / "synth")


def test_a_linked_class_folder_is_read_once_and_a_second_mask_is_named(tmp_path: Path) -> None:
    """A review (session 53): `normal -> Normal` beside `Normal/` doubled the class (40 rows of 20 files),
    and of `COVID-3.png` and `COVID-3.PNG` in a masks folder one was dropped without a word."""
    root = tmp_path / "raw"
    for i in range(1, 4):
        write_png(root / "Normal/images" / f"Normal-{i}.png", xray(i))
        write_png(root / "COVID/images" / f"COVID-{i}.png", xray(10 + i))
        write_png(root / "COVID/masks" / f"COVID-{i}.png", lung_mask())
    write_png(root / "COVID/masks/COVID-3.PNG", lung_mask(), mode="RGB")
    (root / "normal").symlink_to(root / "Normal")
    scan = scan_layout(root)
    assert scan.classes["Normal"].images == 3 and len(scan.entries) == 6
    assert any("normal is" in w and "read once" in w for w in scan.warnings), scan.warnings
    assert [p["reason"].split(" (")[0] for p in scan.mask_problems] == ["a second mask for the same image"]
    assert scan.classes["COVID"].pairs == 3
