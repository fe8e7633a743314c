"""Data from elsewhere through the Ray Data ingest: a two-site synthetic set with one site held out for
testing (and a DICOM among its PNGs), and the real sample laid out as a hospital sends it, a flat folder
of images with a CSV that labels them in its own words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrcore.config import IngestConfig
from cxrcore.data.ingest import ingest_dataset, read_table, tensor_column
from cxrcore.data.synthetic import write_synthetic_dataset
from cxrcore.data.transforms import resize_image
from cxrcore.decode import decode_upload
from cxrcore.summaries import format_ingest_report
from tests.e2e.uploads import xray_dicom
from tests.unit.test_layout import write_flat_copy

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]
SIZE = 64
SITE_B = "site-b.synthetic.cxr"


def test_a_held_out_site_is_all_in_test_and_the_report_lists_each_splits_sources(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_synthetic_dataset(raw, per_class=6, seed=2, image_size=SIZE, mask_size=32, sites=2)
    (raw / "Normal/images/Normal-99.dcm").write_bytes(xray_dicom(0))
    out = str(tmp_path / "dataset")
    report = ingest_dataset(IngestConfig(raw=str(raw), out=out, size=SIZE, test_sources=SITE_B))

    frame = read_table(out, columns=["file", "source", "split", "image"]).to_pandas()
    held = frame[frame["source"] == SITE_B]
    assert len(held) > 0 and (held["split"] == "test").all()
    assert report["test_sources"] == [SITE_B]
    assert report["by_source_split"][SITE_B] == {"train": 0, "val": 0, "test": len(held)}
    assert report["by_source_split"]["site-a.synthetic.cxr"]["train"] > 0
    assert sum(sum(counts.values()) for counts in report["by_source_split"].values()) == len(frame)
    assert f"{SITE_B} (held out)" in format_ingest_report(report)
    # The DICOM went in as `cxr serve` reads an upload of it.
    dicom = frame[frame["file"] == "Normal-99.dcm"]
    expected = resize_image(decode_upload(xray_dicom(0)), SIZE)
    np.testing.assert_array_equal(tensor_column(dicom["image"])[0], expected)


def test_real_sample_as_a_flat_folder_with_a_csv(real_sample: Path, tmp_path: Path) -> None:
    labels = write_flat_copy(real_sample, tmp_path / "flat", {"COVID": "COVID-19", "Normal": "No finding"})
    out = str(tmp_path / "dataset")
    config = IngestConfig(
        raw=str(tmp_path / "flat"),
        out=out,
        size=SIZE,
        labels=str(labels),
        label_column="finding",
        map="COVID-19=COVID,No finding=Normal",
        test_sources="nejm.org",
    )
    report = ingest_dataset(config)
    assert (report["found"], report["ingested"], report["rejected"]) == (130, 130, [])
    assert report["by_class"] == {"COVID": 50, "Normal": 40, "Viral Pneumonia": 40}
    assert report["labels"]["label_file"]["file_column"] == "filename"
    assert report["by_source_split"]["nejm.org"] == {"train": 0, "val": 0, "test": 10}
    frame = read_table(out, columns=["source", "split"]).to_pandas()
    assert (frame[frame["source"] == "nejm.org"]["split"] == "test").all()
