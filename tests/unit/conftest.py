"""The in-process API the serving unit tests call: the real FastAPI app around a real tiny model."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.bad_inputs import LocalClassifier, api_client
from tests.e2e.uploads import write_checkpoint


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> LocalClassifier:
    return LocalClassifier(write_checkpoint(tmp_path_factory.mktemp("model"), "tiny_cnn_lstm", 2))


@pytest.fixture(scope="module")
def client(classifier: LocalClassifier) -> Iterator[httpx.Client]:
    with api_client(classifier) as client:
        yield client


@pytest.fixture(autouse=True)
def _no_ray_started() -> Iterator[None]:
    """A unit test starts no Ray (a local cluster costs 12 s here; the Ray tests share one)."""
    yield
    import ray

    assert not ray.is_initialized(), "this unit test left Ray running: the Ray tests belong in integration/"
