"""One local Ray cluster for all integration tests (ray.init costs ~4 s).

Package-scoped, so it is gone before the e2e tests start their own clusters (cores, not correctness:
`init_ray` tells Train's placement-group cleaner which of several clusters on a machine is its own).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="package")
def ray_session() -> Iterator[None]:
    import ray

    from cxrcore.runtime import init_ray

    # As `cxr` starts one: dashboard on loopback (Train's placement-group cleanup and the job API need
    # it); 4 logical CPUs so that Tune drivers, Train workers and Serve replicas fit on 2 cores.
    init_ray(num_cpus=4, object_store_memory=512 * 1024**2)
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
