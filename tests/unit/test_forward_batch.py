"""Forward passes at the batch size a process runs fastest: the load-time sweep that measures it (Serve
replicas), the choice, a Predictor that splits larger batches into passes of that size, and the tuning
on real batches that offline evaluation uses (BatchedPredictions)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cxrcore.inference import BatchedPredictions, Predictor, batch_sizes, fastest_batch, sweep_forward
from serve.deployments import fit_forward
from serve.schemas import ModelDetails
from tests.e2e.uploads import chest, write_checkpoints


class _Costed:
    """A forward whose calls advance a fake clock by a set cost per image at each batch size."""

    def __init__(self, ms_per_image: dict[int, float]) -> None:
        self.ms_per_image = ms_per_image
        self.now = 0.0
        self.calls: list[int] = []

    def clock(self) -> float:
        return self.now

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        size = len(inputs)
        self.calls.append(size)
        self.now += self.ms_per_image[size] * size / 1000
        return inputs


def _example(size: int) -> torch.Tensor:
    return torch.zeros(size, 1, 4, 4)


def test_the_sweep_measures_every_size_in_turns_and_takes_the_largest_near_the_fastest() -> None:
    costs = _Costed({1: 11.0, 2: 10.4, 4: 10.0, 8: 10.2, 16: 13.0})  # batch 8 within 3 % of batch 4
    sweep = sweep_forward(costs.forward, _example, [1, 2, 4, 8, 16], clock=costs.clock, min_s=0.05)
    assert sweep.rounds == 3 and sweep.best == 8
    assert sweep.images_per_s == {1: 90.9, 2: 96.2, 4: 100.0, 8: 98.0, 16: 76.9}
    # One warm-up call per size, then the sizes timed in turns, three times.
    turns = [size for i, size in enumerate(costs.calls[5:]) if i == 0 or costs.calls[4 + i] != size]
    assert costs.calls[:5] == [1, 2, 4, 8, 16] and turns == [1, 2, 4, 8, 16] * 3


def test_a_sweep_past_its_budget_keeps_the_rounds_it_finished_or_chooses_nothing() -> None:
    costs = _Costed({1: 100.0, 2: 100.0, 4: 90.0})  # warm-ups 0.66 s, then 1.32 s a round
    sweep = sweep_forward(costs.forward, _example, [1, 2, 4], clock=costs.clock, budget_s=1.9)
    assert sweep.rounds == 1 and sweep.best == 4
    slow = _Costed({1: 1000.0, 2: 1000.0, 4: 1000.0})
    cut = sweep_forward(slow.forward, _example, [1, 2, 4], clock=slow.clock, budget_s=2.0)
    assert cut.best is None and cut.images_per_s == {} and cut.rounds == 0
    assert max(slow.calls) <= 2  # it stopped before the largest size


def test_sizes_and_the_choice() -> None:
    assert batch_sizes(16) == [1, 2, 4, 8, 16] and batch_sizes(6) == [1, 2, 4, 6] and batch_sizes(0) == [1]
    assert fastest_batch({1: 50.0, 2: 100.0, 4: 96.0}) == 2
    assert fastest_batch({1: 50.0, 2: 100.0, 4: 97.0}) == 4
    assert fastest_batch({1: 10.0}, tolerance=0.0) == 1


def _predictors(tmp_path: Path) -> tuple[Predictor, Predictor]:
    checkpoint = write_checkpoints(tmp_path).dual
    return Predictor.from_checkpoint(checkpoint, graph=True), Predictor.from_checkpoint(
        checkpoint, graph=True
    )


def _recording(predictor: Predictor) -> list[int]:
    sizes: list[int] = []
    forward: Callable[[torch.Tensor], torch.Tensor] = predictor.forward

    def record(inputs: torch.Tensor) -> torch.Tensor:
        sizes.append(len(inputs))
        return forward(inputs)

    predictor.forward = record
    return sizes


def test_a_batch_runs_as_passes_of_the_forward_batch_size_with_the_same_answers(tmp_path: Path) -> None:
    whole, split = _predictors(tmp_path)
    assert split.segmenter is not None
    split.forward_batch_size, split.segmenter.forward_batch_size = 2, 3
    classifier, segmenter = _recording(split), _recording(split.segmenter)
    images = [np.round(chest(seed, 160, 150) * 255).astype(np.uint8) for seed in range(7)]
    np.testing.assert_allclose(split.predict_proba(images), whole.predict_proba(images), atol=1e-6)
    assert classifier == [2, 2, 2, 1] and segmenter == [3, 3, 1]


def test_a_replica_fits_its_model_and_segmenter_or_takes_the_size_it_is_given(tmp_path: Path) -> None:
    measured, fixed = _predictors(tmp_path)
    assert measured.segmenter is not None and fixed.segmenter is not None
    answer = fit_forward(measured, 4)
    sweep = answer["forward_sweep"]
    assert sweep["best"] in (1, 2, 4) and answer["forward_batch_size"] == sweep["best"]
    assert set(sweep["images_per_s"]) == {"1", "2", "4"} and sweep["rounds"] >= 1
    assert measured.segmenter.forward_batch_size in (1, 2, 4)
    assert fit_forward(fixed, 8, forward_batch_size=3) == {"forward_batch_size": 3, "forward_sweep": None}
    assert fixed.segmenter.forward_batch_size == 3
    # What GET /v1/model answers with validates as its schema says.
    details = ModelDetails.model_validate(
        {"model": {"name": "x", "version": "1", "ref": "x:1"}, "card": {}, "max_batch_size": 4,
         "batch_wait_timeout_s": 0.0, **answer}
    )  # fmt: skip
    assert details.forward_sweep is not None and details.forward_sweep.best == answer["forward_batch_size"]


@pytest.mark.parametrize("size", [1, 5])
def test_a_predictor_takes_whole_batches_unless_told(tmp_path: Path, size: int) -> None:
    predictor, _ = _predictors(tmp_path)
    sizes = _recording(predictor)
    predictor.predict_proba([np.full((70, 70), 100, np.uint8)] * size)
    assert predictor.forward_batch_size is None and sizes == [size]


def test_a_classifier_replica_fits_at_load_and_again_when_its_batch_sizes_change(tmp_path: Path) -> None:
    """The Classifier deployment's class itself (no Serve): `reconfigure` as Serve calls it with each
    `user_config`, and the figures GET /v1/model shows."""
    from serve.deployments import Classifier

    checkpoint = str(write_checkpoints(tmp_path).cnn_lstm)
    replica = Classifier.func_or_class(None, None, "cpu", 8)

    async def reconfigure_and_info(user_config: dict[str, Any]) -> dict[str, Any]:
        await replica.reconfigure(user_config)
        info: dict[str, Any] = await replica.info()
        return info

    loaded = asyncio.run(reconfigure_and_info({"model": checkpoint}))
    assert set(loaded["forward_sweep"]["images_per_s"]) == {"1", "2", "4", "8"}
    assert loaded["forward_batch_size"] == loaded["forward_sweep"]["best"]
    served = replica._served
    wider = asyncio.run(reconfigure_and_info({"model": checkpoint, "max_batch_size": 16}))
    assert set(wider["forward_sweep"]["images_per_s"]) == {"1", "2", "4", "8", "16"}
    assert replica._served.predictor is served.predictor  # the same model, measured again, not reloaded
    fixed = asyncio.run(
        reconfigure_and_info({"model": checkpoint, "max_batch_size": 16, "forward_batch_size": 3})
    )
    assert (fixed["forward_batch_size"], fixed["forward_sweep"]) == (3, None)
    assert replica._served.predictor.forward_batch_size == 3


def test_batched_predictions_try_each_pass_size_on_real_batches_then_keep_the_fastest(tmp_path: Path) -> None:
    """Evaluation's batches: the first full ones run as passes of 8, 4 and 2 in turns, twice, and their
    outputs are kept; then every batch, the partial last one too, runs as passes of the fastest."""
    whole, tuned = _predictors(tmp_path)
    assert tuned.segmenter is not None
    now = [0.0]
    ms_per_image = {8: 10.0, 4: 6.0, 2: 6.1, 3: 6.0}  # 4 and 2 within 3 %: the larger is kept
    sizes: list[int] = []
    forward = tuned.forward

    def costed(inputs: torch.Tensor) -> torch.Tensor:
        sizes.append(len(inputs))
        now[0] += ms_per_image[len(inputs)] * len(inputs) / 1000
        return forward(inputs)

    tuned.forward = costed
    images = [np.round(chest(seed, 160, 150) * 255).astype(np.uint8) for seed in range(8 * 7 + 3)]
    batches = BatchedPredictions(tuned, 8, clock=lambda: now[0])
    probabilities = batches.run(tuned.predict_proba, images, None)
    np.testing.assert_allclose(probabilities, whole.predict_proba(images), atol=1e-6)
    assert sizes == [8, 4, 4, 2, 2, 2, 2] * 2 + [4, 4] + [3]  # six trials, one full batch, the rest (3)
    assert batches.chosen == 4 and tuned.segmenter.forward_batch_size == 4
    assert batches.seconds_per_image == pytest.approx({8: 0.01, 4: 0.006, 2: 0.0061})


def test_batched_predictions_of_fewer_images_than_a_batch_take_them_whole(tmp_path: Path) -> None:
    predictor, _ = _predictors(tmp_path)
    sizes = _recording(predictor)
    images = [np.full((70, 70), 100, np.uint8)] * 5
    batches = BatchedPredictions(predictor, 8)
    assert batches.run(predictor.predict_proba, images, [None] * 5).shape == (5, 4)
    assert sizes == [5] and batches.chosen is None  # no full batch: nothing tried, nothing chosen


def test_a_new_replica_that_cannot_load_its_user_config_serves_the_apps_own_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve deploy` with changed args replaces every replica; with a user_config naming a version that
    does not exist, none started and every prediction got 503 `model_unavailable` until a corrected deploy.
    A new replica now serves the version build_app pinned, and says why in GET /v1/model."""
    from cxrcore import telemetry
    from serve.deployments import Classifier
    from tests.e2e.uploads import write_registry

    loads: list[tuple[str, str]] = []
    monkeypatch.setattr(telemetry, "record_model_load", lambda model, outcome: loads.append((model, outcome)))
    registry = str(write_registry(tmp_path))
    replica = Classifier.func_or_class(registry, None, "cpu", 8, app_model="tiny_cnn_lstm:1")

    async def reconfigure_and_info(user_config: dict[str, Any]) -> dict[str, Any]:
        await replica.reconfigure(user_config)
        info: dict[str, Any] = await replica.info()
        return info

    info = asyncio.run(reconfigure_and_info({"model": "tiny_cnn_lstm:99", "forward_batch_size": 1}))
    assert replica._served is not None and replica._served.resolved.ref == "tiny_cnn_lstm:1"
    assert "could not load 'tiny_cnn_lstm:99'" in info["swap_error"] and "no version 99" in info["swap_error"]
    assert info["swap_error"].endswith(
        "; this replica started since and serves the app's own model tiny_cnn_lstm:1, which other "
        "replicas may not"
    )
    assert loads == [("tiny_cnn_lstm:1", "fallback"), ("tiny_cnn_lstm:99", "failed")]  # cxr_model_loads
    alone = Classifier.func_or_class(registry, None, "cpu", 8)  # no app model to fall back on: it fails
    with pytest.raises(Exception, match="no version 99"):
        asyncio.run(alone.reconfigure({"model": "tiny_cnn_lstm:99"}))
