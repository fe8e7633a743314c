"""One local Ray cluster for all integration tests (ray.init costs ~4 s).

Package-scoped, so it is gone before the e2e tests start their own cluster: with two Ray instances on
one machine, Train's placement-group cleaner cannot tell which to use and stopped trials leak.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="package")
def ray_session() -> Iterator[None]:
    import ray

    ray.init(
        num_cpus=4,  # logical CPUs: Tune drivers, Train workers and Serve replicas must fit on 2 cores
        include_dashboard=True,  # Train's placement-group cleanup and the job API need it
        dashboard_host="127.0.0.1",
        object_store_memory=512 * 1024**2,
        logging_level="WARNING",
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="package")
def synthetic_dataset(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Synthetic phantoms (100 per class) ingested at 64 px: the dataset the training tests share."""
    from cxrcore.config import IngestConfig
    from cxrcore.data.ingest import ingest_dataset
    from cxrcore.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root / "raw", per_class=100, seed=11)
    out = str(root / "dataset")
    ingest_dataset(IngestConfig(raw=str(root / "raw"), out=out, size=64))
    return out
