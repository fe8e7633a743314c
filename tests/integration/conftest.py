"""One local Ray cluster for all integration tests (ray.init costs ~4 s).

Package-scoped, so it is gone before the e2e tests start their own clusters (cores, not correctness:
`init_ray` tells Train's placement-group cleaner which of several clusters on a machine is its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cxrcore.train.trainer import TrainResult


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


@pytest.fixture(scope="package")
def ddp_work(synthetic_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's working directory: the dataset at the relative path `ds`, runs under ./cxr-runs."""
    work = tmp_path_factory.mktemp("work")
    (work / "ds").symlink_to(synthetic_dataset)
    return work


@pytest.fixture(scope="package")
def ddp_run(ddp_work: Path) -> TrainResult:
    """The shared Ray Train run: dual_cnn, 2 DDP workers, 2 epochs of the default recipe at 8 images per
    worker (half the steps of the automatic 4 at this size: about 5 s less of it, and 4 s of the resume
    test's epoch, each measured alone), named `ddp`, started from `ddp_work` with relative paths.

    Short and fast-moving, so BatchNorm's running statistics lag the weights, in its first epoch most
    (tests/integration/test_trust.py checks that each epoch's eval-mode model is the trained one); a real
    run with checkpoints, cards and a resumable state (tests/integration/test_train.py, whose resume test
    adds a third epoch on one worker).
    """
    from cxrcore.config import TrainConfig
    from cxrcore.train.trainer import fit

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ddp_work)
        return fit(TrainConfig(data="ds", model="dual_cnn", epochs=2, workers=2, batch_size=8, name="ddp"))
