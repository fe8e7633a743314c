"""Shared test settings: quiet, offline Ray; the real sample's location; small image writers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Train's controller polls its workers every 2 s by default: each run would wait for its last poll.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray exports metrics every 10 s by default; tests that scrape them wait at most 2 s (1 s cost more CPU).
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
# Torch's OpenMP threads sleep rather than spin while they wait for work. The unit tests run beside the Ray
# tests (tests/run.py), so a Train worker's two threads share their cores: under a one-core load,
# test_source_holdout took 31-33 s with this and 60-66 s without (two runs each). Set before torch loads
# OpenMP, and passed on to the session cluster's workers and to every command a test starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REAL_SAMPLE = Path(os.environ.get("CXR_REAL_SAMPLE", Path(__file__).parents[2] / "shared/data/real_sample"))


@pytest.fixture
def real_sample() -> Path:
    """The 130 real X-rays of ../shared/data/real_sample (or $CXR_REAL_SAMPLE); skips when absent."""
    if not (REAL_SAMPLE / "COVID").is_dir():
        pytest.skip(f"real sample not found at {REAL_SAMPLE} (set CXR_REAL_SAMPLE)")
    return REAL_SAMPLE


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write an array as PNG, creating folders; `mode` forces a PIL mode (e.g. "I;16", "RGB")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


def xray(seed: int, size: int = 96) -> np.ndarray:
    """A cheap, distinct, non-constant grayscale test image."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size, dtype=np.float64)
    return np.clip(ramp[None, :] + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)


def lung_mask(size: int = 80) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 8 : 3 * size // 8] = 255
    mask[size // 4 : 3 * size // 4, 5 * size // 8 : 7 * size // 8] = 255
    return mask


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
