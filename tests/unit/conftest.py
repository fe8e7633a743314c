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
