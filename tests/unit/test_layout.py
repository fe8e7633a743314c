"""Scanning and checking the raw Kaggle layout, with the quirks of the real data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrcore.data.layout import LayoutError, check_layout, scan_layout, source_of
from tests.conftest import lung_mask, write_png, xray


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
    write_png(root / "Cats/images/cat-1.png", xray(30))
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
    assert scan.unknown_folders == [str(raw / "Cats")]
    by_file = {e.file: e for e in scan.entries}
    assert by_file["COVID-1.png"].source == "github.com/a"
    assert by_file["Viral Pneumonia-2.png"].mask_path is None
    assert by_file["Viral Pneumonia-1.png"].source == "x.org"
    assert by_file["Normal-1.png"].source == "unknown"  # no metadata sheet for Normal


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
    scan = check_layout(raw)
    reasons = {Path(item["path"]).name: item["reason"] for item in scan.unreadable}
    assert reasons.keys() == {"COVID-4.png", "Normal-2.png"}
    assert "empty file" in reasons["COVID-4.png"]
    assert "truncated" in reasons["Normal-2.png"] or "corrupt" in reasons["Normal-2.png"]
    assert scan.classes["COVID"].unreadable == 1 and scan.classes["Normal"].unreadable == 1
    assert scan.classes["COVID"].exact_duplicates == 1
    assert [Path(p).name for p in scan.duplicate_groups[0]] == ["COVID-2.png", "COVID-5.png"]
    assert scan.usable


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
