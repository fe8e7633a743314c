"""cxr's ingest and training metrics on the node's Prometheus endpoint, scraped over HTTP.

The Serve metrics are scraped in tests/e2e/test_serve.py, from the app that module already runs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.samples import Sample

from cxrcore.config import IngestConfig, TrainConfig
from cxrcore.data.ingest import ingest_dataset
from cxrcore.data.synthetic import write_synthetic_dataset
from cxrcore.train.trainer import fit
from tests.conftest import write_png, xray
from tests.scrape import total, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def metrics_url() -> str:
    """The metrics endpoint of this (one-node) cluster: what Prometheus scrapes."""
    import ray

    (node,) = [node for node in ray.nodes() if node["Alive"]]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def test_ingest_and_training_metrics_reach_the_prometheus_endpoint(metrics_url: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_synthetic_dataset(raw, per_class=4, seed=5, image_size=96, mask_size=96)
    bad = raw / "Normal" / "images"
    write_png(bad / "Normal-101.png", xray(1, size=16))  # too small
    write_png(bad / "Normal-102.png", np.full((96, 96), 40, np.uint8))  # blank
    (bad / "Normal-103.png").write_bytes((bad / "Normal-1.png").read_bytes()[:200])  # truncated
    (bad / "Normal-104.png").write_bytes(b"")
    out = str(tmp_path / "dataset")
    report = ingest_dataset(IngestConfig(raw=str(raw), out=out, size=64, val_fraction=0.25))
    assert report["ingested"] == 16 and len(report["rejected"]) == 4

    def trained(samples: list[Sample]) -> tuple[float, float] | None:
        labels = {"run": "metrics-run", "model": "tiny_cnn_lstm"}
        epoch = total(samples, "ray_cxr_train_epoch", **labels)
        speed = total(samples, "ray_cxr_train_images_per_s", **labels)
        return (epoch, speed) if epoch is not None and speed is not None else None

    # A gauge is on the endpoint for two export intervals after it is set: watch while the run trains.
    with ThreadPoolExecutor(1) as pool:
        watching = pool.submit(wait_for, metrics_url, trained, 120, "the training gauges")
        fit(  # the worker loop in this process (workers=0): no Train worker actors to start
            TrainConfig(
                data=out,
                model="tiny_cnn_lstm",
                out=str(tmp_path / "runs"),
                name="metrics-run",
                epochs=1,
                workers=0,
                batch_size=8,
            )
        )
        epoch, images_per_s = watching.result()
    assert epoch == 1 and images_per_s > 0

    def ingested(samples: list[Sample]) -> dict[str, float] | None:
        rejects = {
            s.labels["reason"]: s.value
            for s in samples
            if s.name == "ray_cxr_ingest_rejects_total" and s.labels.get("dataset") == out
        }
        images = total(samples, "ray_cxr_ingest_images_total", dataset=out)
        return {"images": images, **rejects} if images is not None and len(rejects) == 4 else None

    counts = wait_for(metrics_url, ingested, 30, "the ingest counters")
    assert counts == {"images": 16, "too_small": 1, "blank": 1, "corrupt": 1, "empty": 1}
