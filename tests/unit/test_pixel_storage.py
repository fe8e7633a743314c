"""Pixels in the Parquet dataset: raw bytes per image, read back as arrays, older datasets too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrcore.data.ingest import _unpack_pixels, parquet_options, table_with_packed_pixels, tensor_column


def test_pixels_round_trip_through_parquet_as_one_binary_value_per_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    masks = (rng.random((3, 8, 8)) > 0.5).astype(np.uint8) * 255
    table = table_with_packed_pixels({"image": images, "mask": masks, "label": np.asarray(["a", "b", "c"])})
    pq.write_table(table, tmp_path / "part.parquet")

    back = pq.read_table(tmp_path / "part.parquet")
    assert back.schema.field("image").type == pa.binary() and back.schema.field("label").type == pa.string()
    np.testing.assert_array_equal(tensor_column(back.column("image").to_pylist()), images)
    np.testing.assert_array_equal(tensor_column(back.to_pandas()["mask"]), masks)
    assert tensor_column(back.column("image").to_pylist()).flags.writeable  # torch.from_numpy takes it


def test_pixel_columns_get_their_codecs_and_no_dictionary_or_statistics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
    masks = np.zeros((4, 32, 32), dtype=np.uint8)
    masks[:, 8:24, 8:24] = 255
    table = table_with_packed_pixels({"image": images, "mask": masks, "label": np.asarray(["a"] * 4)})
    pq.write_table(table, tmp_path / "part.parquet", **parquet_options(table.column_names))

    group = pq.ParquetFile(tmp_path / "part.parquet").metadata.row_group(0)
    image, mask, label = (group.column(i) for i in range(3))
    assert (image.compression, mask.compression, label.compression) == ("UNCOMPRESSED", "ZSTD", "SNAPPY")
    assert not image.is_stats_set and not mask.is_stats_set and label.is_stats_set
    assert "RLE_DICTIONARY" not in image.encodings and "RLE_DICTIONARY" in label.encodings
    assert mask.total_compressed_size < masks.nbytes / 20  # a mask is runs of 0 and 255
    back = pq.read_table(tmp_path / "part.parquet")
    np.testing.assert_array_equal(tensor_column(back.column("image").to_pylist()), images)
    np.testing.assert_array_equal(tensor_column(back.column("mask").to_pylist()), masks)


def test_packing_shares_the_decoded_arrays_memory_and_handles_views() -> None:
    images = np.arange(4 * 6 * 6, dtype=np.uint8).reshape(4, 6, 6)
    packed = table_with_packed_pixels({"image": images})["image"].chunk(0)
    assert packed.buffers()[2].address == images.ctypes.data  # no copy of the pixels
    assert packed.to_pylist() == [image.tobytes() for image in images]
    flipped = images[:, ::-1]  # not contiguous: packed from a contiguous copy, row for row
    assert table_with_packed_pixels({"image": flipped})["image"].to_pylist() == [i.tobytes() for i in flipped]
    assert table_with_packed_pixels({"image": images[1:3]})["image"].to_pylist()[0] == images[1].tobytes()


def test_datasets_written_with_tensor_columns_still_read() -> None:
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    as_lists = [row.reshape(-1).tolist() for row in images]  # what pyarrow gives for Ray's tensor type
    np.testing.assert_array_equal(tensor_column(as_lists), images)
    # Through Ray, a tensor column arrives as an array already: the read step leaves it alone.
    batch = {"image": images, "label_index": np.asarray([0, 1])}
    assert _unpack_pixels(dict(batch))["image"] is images
    packed = {"image": np.asarray([row.tobytes() for row in images], dtype=object)}
    np.testing.assert_array_equal(_unpack_pixels(packed)["image"], images)


def _dataset(root: Path) -> Path:
    """A finished dataset by hand: two train files and one val file, and the report that counts them."""
    import json

    rows = {"train": [3, 2], "val": [2]}
    for split, files in rows.items():
        (root / f"split={split}").mkdir(parents=True)
        for k, n in enumerate(files):
            pq.write_table(pa.table({"label": ["COVID"] * n}), root / f"split={split}/part-{k}.parquet")
    (root / "split=train/_SUCCESS").write_bytes(b"")  # markers and hidden files are not the dataset's
    (root / ".staging").mkdir()
    (root / ".staging/part.parquet").write_bytes(b"not parquet")
    report = {"by_split": {"train": 5, "val": 2, "test": 0}}
    (root / "ingest_report.json").write_text(json.dumps(report))
    return root


def test_a_damaged_dataset_is_refused_with_the_file_not_read_in_part(tmp_path: Path) -> None:
    import pytest

    from cxrcore.config import ConfigError
    from cxrcore.data.ingest import DatasetError, read_table, verify_dataset

    whole = _dataset(tmp_path / "whole")
    assert read_table(str(whole), ["label"], split="train").num_rows == 5
    assert (
        read_table(str(whole), ["label"]).num_rows == 7 and verify_dataset(str(whole))["by_split"]["val"] == 2
    )

    cut = whole / "split=train/part-1.parquet"
    cut.write_bytes(cut.read_bytes()[:40])  # half a file: unreadable, where it was skipped before
    with pytest.raises(DatasetError) as error:  # a file verified whole before, changed since: read again
        read_table(str(whole), ["label"], split="train")
    assert str(error.value).startswith(f"{whole}: split=train/part-1.parquet cannot be read (")
    assert str(error.value).endswith("): the dataset is damaged; ingest it again (`cxr data ingest RAW OUT`)")
    assert str(error.value).count("part-1.parquet") == 1  # named once, not in pyarrow's words again
    assert read_table(str(whole), ["label"], split="val").num_rows == 2  # the other splits still read
    assert issubclass(DatasetError, ConfigError)  # a one-line `cxr: error:` and exit 2

    cut.unlink()  # a file gone: fewer rows than the report counts
    with pytest.raises(DatasetError, match=r"train 3 rows where ingest wrote 5 \(ingest_report.json\)"):
        verify_dataset(str(whole))

    # The first file, whose schema pyarrow reads when the dataset is opened: the same error, for any split.
    first = _dataset(tmp_path / "first") / "split=train/part-0.parquet"
    first.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"split=train/part-0\.parquet cannot be read"):
        read_table(str(first.parents[1]), ["label"], split="val")


def test_files_beside_the_split_folders_are_not_read_and_a_damaged_page_is_a_dataset_error(
    tmp_path: Path,
) -> None:
    import pytest

    from cxrcore.data.ingest import DatasetError, read_chunks, read_table

    whole = _dataset(tmp_path / "whole")
    stray = whole / "split=train/part-0.parquet"
    (whole / "split=foo").mkdir()
    (whole / "split=foo/part.parquet").write_bytes(stray.read_bytes())
    (whole / "extra.parquet").write_bytes(stray.read_bytes())
    assert read_table(str(whole), ["label"]).num_rows == 7  # not 13: only train, val and test are read

    # A page damaged inside a file whose footer and row count are whole: the footers pass, the read fails.
    paged = tmp_path / "paged"
    paged.mkdir()
    rng = np.random.default_rng(0)
    rows = {"label": [f"label-{i}-{rng.integers(1 << 60)}" for i in range(2000)]}
    (paged / "split=train").mkdir()
    pq.write_table(pa.table(rows), paged / "split=train/part-0.parquet", compression="snappy")
    data = bytearray((paged / "split=train/part-0.parquet").read_bytes())
    data[len(data) // 3 : len(data) // 3 + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (paged / "split=train/part-0.parquet").write_bytes(bytes(data))
    (paged / "ingest_report.json").write_text('{"by_split": {"train": 2000, "val": 0, "test": 0}}')
    for read in (lambda: read_table(str(paged), ["label"]), lambda: list(read_chunks(str(paged), ["label"]))):
        with pytest.raises(DatasetError, match=r"a Parquet file cannot be read .*: the dataset is damaged"):
            read()
