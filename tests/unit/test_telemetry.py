"""cxr's metrics without Ray: ingest reasons, recording that never raises, and a dashboard that matches them.

The metrics on a real endpoint: tests/integration/test_metrics_export.py and tests/e2e/test_serve.py.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxrcore import telemetry
from cxrcore.data.ingest import decode_pair_batch
from cxrcore.telemetry import METRICS, reject_reason
from tests.conftest import write_png, xray

DASHBOARD = Path(__file__).parents[2] / "cluster/grafana/cxr-dashboard.json"
EXPORTED = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def test_every_ingest_rejection_gets_a_reason_label(tmp_path: Path) -> None:
    files = {
        "too_small": write_png(tmp_path / "small.png", xray(1, size=16)),
        "blank": write_png(tmp_path / "blank.png", np.full((96, 96), 40, np.uint8)),
        "corrupt": tmp_path / "truncated.png",
        "empty": tmp_path / "empty.png",
        "not_an_image": tmp_path / "page.png",
        "unreadable": tmp_path / "missing.png",
    }
    files["corrupt"].write_bytes(write_png(tmp_path / "good.png", xray(2)).read_bytes()[:200])
    files["empty"].write_bytes(b"")
    files["not_an_image"].write_text("<html>404 Not Found</html>")
    paths = np.asarray([str(path) for path in files.values()])
    decoded = decode_pair_batch({"image_path": paths, "mask_path": np.asarray([""] * len(paths))}, 32, 64)
    assert [reject_reason(message) for message in decoded["error"]] == list(files)
    assert reject_reason("DICOM file has no pixel data (not an image)") == "undecodable"


def test_recording_outside_ray_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    assert not ray.is_initialized()
    monkeypatch.setattr(telemetry, "_created", {})
    telemetry.record_prediction("tiny_cnn_lstm", None, "COVID", 12.5, explain=False)
    telemetry.record_ingest("ds", 3, ["image too small (1×1, minimum side 64)"])
    assert not telemetry._created


def test_a_failing_metric_is_logged_once_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def inc(self, *args: Any) -> None:
            raise RuntimeError("metrics agent gone")

    monkeypatch.setattr(telemetry, "_metric", lambda name: Broken())
    monkeypatch.setattr(telemetry, "_failed", set())
    with caplog.at_level(logging.WARNING, logger="cxrcore.telemetry"):
        for _ in range(3):
            telemetry.record_request_error("overloaded", 503)
    assert [r.getMessage() for r in caplog.records] == [
        "could not record cxr_request_errors; its further failures are not logged"
    ]


def test_metric_definitions_are_valid_for_prometheus() -> None:
    for name, spec in METRICS.items():
        assert re.fullmatch(r"cxr_[a-z_]+", name), name
        assert spec.description and spec.tags
        assert (spec.kind == "histogram") == bool(spec.boundaries), name
        assert list(spec.boundaries) == sorted(set(spec.boundaries)) and all(b > 0 for b in spec.boundaries)


def _expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_grafana_dashboard_charts_every_metric_by_its_exported_name_and_labels() -> None:
    exported = {
        f"ray_{name}{suffix}": name for name, spec in METRICS.items() for suffix in EXPORTED[spec.kind]
    }
    charted = set()
    for expr in _expressions():
        names = set(re.findall(r"\bray_cxr_\w+", expr))
        assert names and names <= exported.keys(), expr  # only names Ray exports
        charted |= {exported[name] for name in names}
        tags = {tag for name in names for tag in METRICS[exported[name]].tags} | {"le"}
        used = {t.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for t in group.split(",")}
        used |= set(re.findall(r"(\w+)=~?\"", expr))
        assert used <= tags, (expr, used - tags)
    assert charted == METRICS.keys()


def test_a_model_load_carries_the_model_and_version_labels_the_other_serving_metrics_carry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cxr_model_loads` put "name:N" in its model label, where every other serving metric has model and
    version apart: the two could not be joined, nor filtered by the dashboard's $model."""
    recorded: list[tuple[str, float, dict[str, str]]] = []
    monkeypatch.setattr(telemetry, "_record", lambda name, value, tags: recorded.append((name, value, tags)))
    telemetry.record_model_load("tiny_dual_cnn:12", "loaded")
    telemetry.record_model_load("production", "failed")  # an alias that did not resolve
    telemetry.record_model_load("s3://bucket/runs/checkpoint_000003", "fallback")
    assert [tags for _, _, tags in recorded] == [
        {"model": "tiny_dual_cnn", "version": "12", "outcome": "loaded"},
        {"model": "production", "version": "none", "outcome": "failed"},
        {"model": "s3://bucket/runs/checkpoint_000003", "version": "none", "outcome": "fallback"},
    ]
    assert set(METRICS["cxr_model_loads"].tags) >= set(METRICS["cxr_model_served"].tags)
