"""How the ingest cuts its work into Ray Data blocks and tasks, on one machine and on a cluster."""

from __future__ import annotations

import pytest
import ray

from cxrcore.data import ingest


@pytest.mark.parametrize(
    ("rows", "size", "blocks"),
    [
        (58, 64, 1),  # under two decode batches: one block
        (400, 64, 2),  # the demo: one block per core, one wave
        (2000, 256, 2),  # 1,000 rows of 256 px a block: 125 MiB of pixels
        (2049, 256, 4),  # one row over: two waves
        (6000, 256, 6),
        (2000, 512, 8),  # 4x the pixels a row: 250 rows a block
    ],
)
def test_on_one_machine_blocks_come_in_whole_waves_of_one_per_core(
    rows: int, size: int, blocks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "local_core_limit", lambda: 2)
    assert ingest._num_blocks(rows, size) == blocks
    assert rows / blocks * 2 * size * size <= ingest.LOCAL_BLOCK_BYTES or blocks == 1


@pytest.mark.parametrize(("rows", "blocks"), [(58, 1), (2000, 16), (21000, 42)])
def test_on_a_cluster_two_blocks_per_cpu_of_at_most_about_500_rows(
    rows: int, blocks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "local_core_limit", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})  # no multi-node cluster here
    assert ingest._num_blocks(rows, 256) == blocks


def test_task_limits_never_exceed_the_input_blocks_and_are_ray_datas_on_a_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest, "local_core_limit", lambda: 2)
    assert [ingest._task_limit(blocks) for blocks in (0, 1, 2, 6)] == [1, 1, 2, 2]
    monkeypatch.setattr(ingest, "local_core_limit", lambda: None)
    assert ingest._task_limit(6) is None and ingest._tasks_per_core(6) is None


def test_the_manifest_carries_every_field_of_an_entry_and_no_none() -> None:
    import dataclasses

    from cxrcore.data.layout import ManifestEntry

    with_all = ManifestEntry("/r/COVID/images/a.png", "/r/COVID/masks/a.png", "COVID", "a.png", "u", "s")
    without = dataclasses.replace(with_all, image_path="/r/Normal/images/b.png", mask_path=None, url=None)
    rows = ingest._manifest([with_all, without])
    assert [row["row_id"] for row in rows] == [0, 1]
    for row in rows:
        entry = with_all if row["image_path"] == with_all.image_path else without
        expected = {k: v if v is not None else "" for k, v in dataclasses.asdict(entry).items()}
        assert row == {"row_id": row["row_id"], **expected}  # a field added to ManifestEntry must reach it
