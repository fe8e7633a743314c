"""The ingest's decode of one block, without Ray: every file ends as pixels or as a reason, never a crash."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxrcore.data import transforms
from cxrcore.data.ingest import _task_rows, decode_pair_batch, printable_name
from tests.conftest import lung_mask, write_png, xray

SIZE = 32


def _decode(pairs: list[tuple[Path | bytes, Path | str]]) -> dict[str, np.ndarray]:
    return decode_pair_batch(
        {
            "image_path": np.asarray([os.fsencode(image) for image, _ in pairs], dtype=object),
            "mask_path": np.asarray([os.fsencode(mask) for _, mask in pairs], dtype=object),
        },
        SIZE,
        16,
    )


def test_masks_that_mark_no_lung_or_only_lung_are_reported_and_a_0_1_mask_is_kept(tmp_path: Path) -> None:
    masks = {
        "empty": np.zeros((80, 80), np.uint8),
        "full": np.full((80, 80), 255, np.uint8),
        "zero-one": lung_mask() // 255,
        "usual": lung_mask(),
        "inverted": 255 - lung_mask(),  # lungs black on white: was kept as a good mask
    }
    pairs = []
    for i, (name, mask) in enumerate(masks.items()):
        pairs.append(
            (
                write_png(tmp_path / f"images/{name}.png", xray(i)),
                write_png(tmp_path / f"masks/{name}.png", mask),
            )
        )
    decoded = _decode(pairs)
    assert list(decoded["error"]) == [""] * 5
    assert list(decoded["has_mask"]) == [False, False, True, True, False]
    assert (
        "no pixel as lung" in decoded["mask_error"][0] and "every pixel as lung" in decoded["mask_error"][1]
    )
    assert list(decoded["mask_error"][2:4]) == ["", ""]
    assert "of the image's border as lung, as an inverted mask does" in decoded["mask_error"][4]
    assert not decoded["mask"][:2].any()  # a refused mask is stored as none
    np.testing.assert_array_equal(decoded["mask"][2], decoded["mask"][3])  # 0/1 reads as 0/255 does


def test_a_dicoms_patient_id_is_read_for_the_split_and_other_files_name_none(tmp_path: Path) -> None:
    """A PACS export's patient is in each DICOM (0010,0020): its films then share a split without a label
    file. Read for every DICOM, with a preamble or without, and "" for a PNG or a DICOM naming none."""
    from tests.e2e.uploads import dicom_bytes

    pixels = (xray(1, 64).astype(np.uint16) * 16).astype(np.uint16)
    files = []
    for name, patient, preamble in [("a.dcm", "P7 ", True), ("IM0002", "P8", False), ("b.dcm", None, True)]:
        (tmp_path / name).write_bytes(dicom_bytes(pixels, preamble=preamble, patient=patient))
        files.append((tmp_path / name, ""))
    files.append((write_png(tmp_path / "c.png", xray(2)), ""))
    decoded = _decode(files)
    assert list(decoded["error"]) == [""] * 4
    assert list(decoded["dicom_patient"]) == ["P7", "P8", "", ""]


def test_a_decoder_failing_on_one_file_costs_that_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write_png(tmp_path / "good.png", xray(1))
    odd = write_png(tmp_path / "odd.png", xray(2, size=90))
    to_gray = transforms.to_gray_uint8

    def crashes_on_the_odd_one(img: object) -> np.ndarray:
        if getattr(img, "width", 0) == 90:
            raise IndexError("index 37657 is out of bounds for axis 0 with size 3500")
        return to_gray(img)  # type: ignore[arg-type]

    monkeypatch.setattr(transforms, "to_gray_uint8", crashes_on_the_odd_one)
    decoded = _decode([(good, ""), (odd, "")])
    assert decoded["error"][0] == "" and decoded["image"][0].any()
    assert (
        decoded["error"][1]
        == "cannot decode: IndexError: index 37657 is out of bounds for axis 0 with size 3500"
    )


def test_a_file_name_that_is_not_utf8_is_read_and_stored_as_printable_text(tmp_path: Path) -> None:
    latin1 = os.fsdecode(b"caf\xe9.png")  # as `unzip` leaves a Windows zip's names
    path = write_png(tmp_path / latin1, xray(3))
    decoded = _decode([(path, "")])
    assert decoded["error"][0] == "" and decoded["image"][0].any()
    assert printable_name(latin1) == "caf\\xe9.png" and printable_name("Lunge_ß.png") == "Lunge_ß.png"
    [row] = _task_rows([{"image_path": str(path), "mask_path": "", "file": latin1}])
    assert row["image_path"] == os.fsencode(path) and row["file"].encode("utf-8") == b"caf\\xe9.png"


def test_the_report_warns_of_classes_no_split_can_score() -> None:
    from cxrcore.data.ingest import _warnings

    by_class_split = {
        "COVID": {"train": 3, "val": 0, "test": 0},
        "Normal": {"train": 8, "val": 1, "test": 0},
        "Lung_Opacity": {"train": 0, "val": 1, "test": 1},
        "Viral Pneumonia": {"train": 8, "val": 1, "test": 1},
    }
    warnings = _warnings({"by_class_split": by_class_split, "duplicates": {}, "raw": "raw"})
    assert warnings == [
        "COVID has no val and no test images (3 in all): no score will say how the model does on it there; "
        "more images, or a larger --val-fraction and --test-fraction, give it some",
        "Normal has no test images (9 in all): no score will say how the model does on it there; more "
        "images, or a larger --test-fraction, give it some",
        "Lung_Opacity has no training images (1 in val, 1 in test)",
    ]


def test_the_report_warns_of_a_class_it_holds_no_image_of() -> None:
    """A review (session 57): a dataset without a Viral Pneumonia folder was ingested, trained, compared and
    promoted without a word that the model could never answer that class."""
    from cxrcore.data.ingest import _warnings

    by_class_split = {name: {"train": 8, "val": 1, "test": 1} for name in ("COVID", "Normal", "Lung_Opacity")}
    warnings = _warnings({"by_class_split": by_class_split, "duplicates": {}, "raw": "raw"})
    assert warnings == [
        "Viral Pneumonia: no image at all; a model trained on this dataset never learns it and never "
        "answers it"
    ]


def test_one_picture_copied_under_every_class_is_named_with_a_few_of_its_copies() -> None:
    """A review (session 57): 120 copies of one image made one warning line of 120 file names."""
    from cxrcore.data.ingest import _warnings

    copies = [
        {"path": f"raw/{name}/{i}.png", "label": name} for i in range(30) for name in ("COVID", "Normal")
    ]
    by_class_split = {name: {"train": 30, "val": 0, "test": 0} for name in ("COVID", "Normal")}
    report = {"by_class_split": by_class_split, "duplicates": {"across_classes": [copies]}, "raw": "raw"}
    (warning,) = [w for w in _warnings(report) if "under two classes" in w]
    assert warning.startswith(
        "1 picture is under two classes or more (the same pixels), e.g. COVID/0.png (COVID) = Normal/0.png "
        "(Normal) = COVID/1.png (COVID) and 57 more copies: one of the labels is wrong"
    )


def test_the_report_warns_of_classes_their_sources_tell_apart() -> None:
    from cxrcore.data.ingest import _source_report, _warnings

    # The Kaggle database's shape: Normal and Viral Pneumonia from one paediatric source, COVID elsewhere.
    labels = ["COVID"] * 3 + ["Normal"] * 2 + ["Viral Pneumonia"] * 2 + ["Normal"]
    sources = ["nejm.org", "github.com/ieee8023", "unknown"] + ["data.mendeley.com"] * 4 + ["unknown"]
    report = _source_report(sources, ["train"] * len(labels), labels, set())
    assert report["by_source_class"]["data.mendeley.com"] == {"Normal": 2, "Viral Pneumonia": 2}
    assert report["source_separates"] == [["COVID", "Normal"], ["COVID", "Viral Pneumonia"]]
    by_class = {"COVID": 3, "Normal": 3, "Viral Pneumonia": 2}
    [warning] = _warnings({**report, "by_class": by_class, "by_class_split": {}, "duplicates": {}})
    assert warning.startswith("no source holds both COVID and Normal, nor COVID and Viral Pneumonia: a model")
    assert "--test-sources" in warning

    # One source per class, as `cxr data synth` writes without --sites: every pair, said once.
    report = _source_report(
        ["a.org", "b.org", "c.org"], ["train"] * 3, ["COVID", "Normal", "Lung_Opacity"], set()
    )
    assert len(report["source_separates"]) == 3
    [warning] = _warnings({**report, "by_class": dict.fromkeys(["COVID", "Normal", "Lung_Opacity"], 1),
                           "by_class_split": {}, "duplicates": {}})  # fmt: skip
    assert warning.startswith("every source holds one class only: ")

    # Sources unknown that mix the classes: the pairs are named, not "every source holds one class".
    report = _source_report(["a.org", "b.org", "unknown", "unknown"], ["train"] * 4,
                            ["COVID", "Normal", "COVID", "Normal"], set())  # fmt: skip
    [warning] = _warnings(
        {**report, "by_class": {"COVID": 2, "Normal": 2}, "by_class_split": {}, "duplicates": {}}
    )
    assert warning.startswith("no source holds both COVID and Normal: ")

    # A source that holds every class, or sources unknown: nothing to say.
    for shared in (["a.org", "a.org", "b.org"], ["unknown"] * 3):
        report = _source_report(shared, ["train"] * 3, ["COVID", "Normal", "Normal"], set())
        assert report["source_separates"] == []


def test_the_report_warns_of_a_near_duplicate_group_large_enough_to_move_the_split_shares() -> None:
    """Hashes each within the threshold of the next chain into one group (44 of 633 phantoms, pairs up to 46
    bits apart), and a group goes to one split whole."""
    from collections import Counter

    from cxrcore.data.ingest import _largest_group, _warnings

    groups = [0] * 30 + list(range(30, 300))
    labels = ["COVID"] * 10 + ["Normal"] * 20 + ["Normal"] * 270
    splits = ["val"] * 30 + ["train"] * 270
    largest = _largest_group(Counter(groups), groups, labels, splits)
    assert largest == {"images": 30, "by_class": {"COVID": 10, "Normal": 20}, "split": "val"}
    report: dict[str, Any] = {
        "by_class_split": {},
        "ingested": 300,
        "config": {"near_duplicate_bits": 12},
        "duplicates": {"largest_group": largest},
    }
    [warning] = _warnings(report)
    assert warning.startswith("30 images (10%; COVID 10, Normal 20) form one near-duplicate group, each")
    assert "went to val together" in warning and "lower --near-duplicate-bits" in warning
    assert _warnings({**report, "ingested": 3000}) == []  # 1% of the images: a few patients' copies
    assert _largest_group(Counter(range(5)), list(range(5)), ["COVID"] * 5, ["train"] * 5) is None


def test_the_hashes_that_decide_the_split_do_not_depend_on_the_stored_size(tmp_path: Path) -> None:
    # The split groups near duplicates by perceptual hash: taken on the resized image, the same folder
    # ingested at 32 and 64 px grouped (and so split) 9 of 200 phantoms otherwise.
    paths = [write_png(tmp_path / f"{i}.png", xray(i, size=120)) for i in range(6)]
    batch = {
        "image_path": np.asarray([os.fsencode(p) for p in paths], dtype=object),
        "mask_path": np.asarray([b""] * len(paths), dtype=object),
    }
    small, large = (decode_pair_batch(dict(batch), size, 16) for size in (32, 64))
    assert small["image"].shape[1:] == (32, 32) and large["image"].shape[1:] == (64, 64)
    assert list(small["sha256"]) == list(large["sha256"])
    assert list(small["phash"]) == list(large["phash"])
    assert len(set(small["phash"])) == len(paths)


def test_the_fingerprint_covers_the_lung_masks_by_content(tmp_path: Path) -> None:
    # A mask deleted or redrawn left the fingerprint as it was: runs resumed, and models were scored as
    # on their own data, on other masks than they were trained with.
    import pandas as pd

    from cxrcore.data.ingest import _fingerprint

    image = write_png(tmp_path / "images/a.png", xray(1, size=120))
    lungs = lung_mask(120)
    pairs = [
        (image, write_png(tmp_path / "masks/a.png", lungs)),
        (image, write_png(tmp_path / "masks/a01.png", lungs // 255)),  # the same lungs, marked 0/1
        (image, write_png(tmp_path / "masks/b.png", np.roll(lungs, 9, axis=1))),  # redrawn
        (image, ""),
    ]
    decoded = _decode(pairs)
    hashes = list(decoded["mask_sha256"])
    assert hashes[0] == hashes[1] and hashes[2] not in ("", hashes[0]) and hashes[3] == ""
    larger = decode_pair_batch(
        {
            "image_path": np.asarray([os.fsencode(image)], dtype=object),
            "mask_path": np.asarray([os.fsencode(pairs[0][1])], dtype=object),
        },
        2 * SIZE,
        16,
    )
    assert list(larger["mask_sha256"]) == hashes[:1]  # of the decoded mask, not of the stored size

    def fingerprint(mask_sha256: str) -> str:
        index = pd.DataFrame({"sha256": [decoded["sha256"][0]], "mask_sha256": [mask_sha256], "error": [""]})
        return _fingerprint(index, ["Normal"], ["train"])

    assert len({fingerprint(h) for h in (hashes[0], hashes[2], "")}) == 3
