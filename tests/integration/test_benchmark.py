"""`python -m jobs.benchmark ingest|train --quick` on the session's Ray: a well-formed report whose ratios
come from the figures of the same run. Never a speed assertion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrcore.bench import run_benchmarks
from cxrcore.bench.report import usable_cores
from cxrcore.config import BenchmarkConfig
from tests.torch_threads import one_torch_thread
from tests.unit.test_benchmark import check_report

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def test_ingest_quick_writes_the_report(tmp_path: Path) -> None:
    config = BenchmarkConfig(
        "ingest", quick=True, images=16, out=str(tmp_path / "out"), work_dir=str(tmp_path)
    )
    report = run_benchmarks(config)
    data = json.loads((tmp_path / "out/benchmark.json").read_text())
    check_report(data, ["ingest"])
    section = data["sections"]["ingest"]
    whole, first = section["rows"][:2]
    details = section["details"]
    assert whole["measure"].startswith("Ray Data ingest, whole, on a running cluster")
    assert whole["target"] == "≥ 1.6×"
    assert whole["value"] == pytest.approx(16 / details["ray_seconds"])
    assert whole["baseline_value"] == pytest.approx(16 / details["one_process_seconds"])
    assert first["target"] is None and first["value"] == pytest.approx(16 / details["ray_first_seconds"])
    assert first["baseline_value"] == pytest.approx(16 / details["one_process_first_seconds"])
    for stages in (details["ray_seconds_by_stage"], details["ray_first_seconds_by_stage"]):
        assert set(stages) >= {"scan_and_decode", "index", "write"}
    assert details["ray_already_running"] is True  # the session's Ray: no start-up to count
    # The machine's own limit: the per-image work split across as many processes as cores, no Ray.
    limit = next(row for row in section["rows"] if "processes at once" in row["measure"])
    assert len(details["side_by_side_each_seconds"]) == details["side_by_side_processes"] == usable_cores()
    assert limit["value"] == pytest.approx(16 / max(details["side_by_side_each_seconds"]))
    assert limit["baseline_value"] == pytest.approx(16 / details["side_by_side_one_process_seconds"])
    assert len(details["side_by_side_ratios"]) == 1  # --quick: one pair
    user = next(row for row in section["rows"] if row["measure"].startswith("cxr data ingest as a user"))
    assert user["value"] is None  # the session's Ray was running: its start was not measured
    assert {row["pipeline"] for row in section["breakdown"]} == {"one process", "Ray Data, first", "Ray Data"}
    assert "## Ingest" in (tmp_path / "out/benchmark.md").read_text() and not report.failed


def test_train_quick_writes_the_report(tmp_path: Path, synthetic_dataset: str) -> None:
    """One tiny model; Ray Train's local mode (workers 0) keeps the test to seconds: the same fit()."""
    config = BenchmarkConfig(
        "train", quick=True, train_data=synthetic_dataset, models="tiny_cnn_lstm", workers="0",
        plain_threads=1, out=str(tmp_path / "out"), work_dir=str(tmp_path),
    )  # fmt: skip
    with one_torch_thread():  # local mode trains in this process, with its threads
        run_benchmarks(config)
    data = json.loads((tmp_path / "out/benchmark.json").read_text())
    check_report(data, ["train"])
    section = data["sections"]["train"]
    (row,) = section["rows"]
    runs = section["details"]["runs"]
    assert row["measure"] == "tiny_cnn_lstm: Ray Train, local mode" and row["target"] == "≥ 0.9×"
    assert (row["value"], row["baseline_value"]) == (
        runs["tiny_cnn_lstm/ray_0w"]["images_per_s"],
        runs["tiny_cnn_lstm/plain"]["images_per_s"],
    )
    plain = runs["tiny_cnn_lstm/plain"]
    assert len(plain["epochs"]) == config.epochs and 0 <= plain["data_wait_share"] <= 1
    assert [r["run"] for r in section["breakdown"]] == ["plain PyTorch, 1 process", "Ray Train, local mode"]
