"""The classifier's batcher: a batch forms when the model is free, from what queued meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve.deployments import _Batcher


class _Model:
    """Records each batch; a forward pass waits until the test releases it."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        if "boom" in items:
            raise ValueError("the model failed")
        return [item * 10 for item in items]


async def _until(condition: Any) -> None:
    for _ in range(1000):  # bounded: the event loop turns, no wall-clock sleeps
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def _queued_behind_a_forward_pass(
    batcher: _Batcher, model: _Model, items: list[Any]
) -> tuple[asyncio.Task[Any], list[asyncio.Task[Any]]]:
    """Request 0 starts a forward pass that waits for `model.release`; `items` queue meanwhile."""
    model.release.clear()
    first = asyncio.create_task(batcher.submit(0))
    await model.started.wait()
    queued = [asyncio.create_task(batcher.submit(item)) for item in items]
    await _until(lambda: batcher._queue.qsize() == len(items))
    return first, queued


def test_a_request_to_an_idle_model_runs_at_once_alone() -> None:
    async def scenario() -> None:
        model = _Model()
        batcher = _Batcher(model, max_batch_size=16, wait_s=0.0)
        request = asyncio.create_task(batcher.submit(1))
        await _until(request.done)  # within event-loop turns: no timer, no batch window waited out
        assert request.result() == 10 and model.batches == [[1]]

    asyncio.run(scenario())


def test_requests_arriving_during_a_forward_pass_are_the_next_batch_up_to_the_maximum() -> None:
    async def scenario() -> None:
        model = _Model()
        batcher = _Batcher(model, max_batch_size=4, wait_s=0.0)
        first, rest = await _queued_behind_a_forward_pass(batcher, model, list(range(1, 11)))
        model.release.set()
        assert await first == 0
        assert await asyncio.gather(*rest) == [i * 10 for i in range(1, 11)]
        assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]

    asyncio.run(scenario())


def test_a_wait_holds_a_batch_that_is_not_full_for_more_requests() -> None:
    async def scenario() -> None:
        model = _Model()
        batcher = _Batcher(model, max_batch_size=3, wait_s=5.0)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]  # full before the wait ends
        assert await asyncio.gather(*tasks) == [0, 10, 20]
        assert model.batches == [[0, 1, 2]]

    asyncio.run(scenario())


def test_a_failed_batch_fails_its_requests_and_the_next_batch_still_runs() -> None:
    async def scenario() -> None:
        model = _Model()
        batcher = _Batcher(model, max_batch_size=8, wait_s=0.0)
        blocker, doomed = await _queued_behind_a_forward_pass(batcher, model, [1, "boom"])
        model.release.set()
        assert await blocker == 0
        for task in doomed:
            with pytest.raises(ValueError, match="the model failed"):
                await task
        assert await batcher.submit(3) == 30

    asyncio.run(scenario())


def test_a_request_whose_caller_left_is_not_computed() -> None:
    async def scenario() -> None:
        model = _Model()
        batcher = _Batcher(model, max_batch_size=8, wait_s=0.0)
        blocker, (gone, kept) = await _queued_behind_a_forward_pass(batcher, model, [1, 2])
        gone.cancel()  # the client disconnected
        model.release.set()
        assert (await blocker, await kept) == (0, 20)
        assert model.batches == [[0], [2]]

    asyncio.run(scenario())
