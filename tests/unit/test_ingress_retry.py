"""The ingress asks the classifier again when a replica died, and only then: a prediction is idempotent,
a model error or a full queue is not something another try would fix."""

from __future__ import annotations

from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError

from cxrcore.labels import CLASSES
from serve.ingress import REPLICA_ATTEMPTS
from tests.bad_inputs import GOOD_PNG, api_client

ANSWER = {
    "probabilities": dict.fromkeys(CLASSES, 0.25),
    "model": {"name": "tiny_cnn_lstm", "version": "1", "ref": "tiny_cnn_lstm:1"},
    "input_size": 64,
}


def _in_a_replica(exc: Exception) -> Exception:
    """`exc` as it reaches the ingress when it was raised inside the Classifier replica."""
    return RayTaskError("Classifier.predict", "Traceback: ...", exc).as_instanceof_cause()


class Flaky:
    """A classifier handle whose first calls raise `failures` in turn, then answer ANSWER; counts calls."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.predict = self.explain = self.info = self

    async def remote(self, *args: Any) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return ANSWER


def _predict(classifier: Flaky) -> Any:
    with api_client(classifier) as client:
        return client.post("/v1/predict", content=GOOD_PNG, headers={"content-type": "image/png"})


DIED = ActorDiedError()
UNAVAILABLE = ActorUnavailableError("connection reset", None)


@pytest.mark.parametrize(
    "failures",
    [[DIED], [UNAVAILABLE, DIED], [_in_a_replica(ActorDiedError())]],
    ids=["replica-died", "unavailable-then-died", "segmenter-replica-died"],
)
def test_a_dead_replica_is_retried_and_the_client_never_sees_it(failures: list[Exception]) -> None:
    classifier = Flaky(*failures)
    response = _predict(classifier)
    assert response.status_code == 200, response.text
    assert response.json()["probabilities"] == ANSWER["probabilities"]
    assert classifier.calls == len(failures) + 1


def test_retries_are_bounded_then_503_with_retry_after() -> None:
    classifier = Flaky(*[ActorDiedError() for _ in range(REPLICA_ATTEMPTS + 5)])
    response = _predict(classifier)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"] == "model_unavailable"
    assert classifier.calls == REPLICA_ATTEMPTS


@pytest.mark.parametrize(
    ("failure", "status", "error"),
    [
        (_in_a_replica(ValueError("shapes do not match")), 500, "prediction_failed"),
        (BackPressureError(num_queued_requests=8, max_queued_requests=8, retry_after_s=1), 503, "overloaded"),
        (RuntimeError("no replica could be reached"), 503, "model_unavailable"),
    ],
    ids=["model-error", "queue-full", "other"],
)
def test_other_failures_are_answered_at_once(failure: Exception, status: int, error: str) -> None:
    classifier = Flaky(failure)
    response = _predict(classifier)
    assert response.status_code == status and response.json()["error"] == error
    assert classifier.calls == 1
