"""PassBatcher: no wait when idle, everything queued meanwhile in the next pass."""

from __future__ import annotations

import asyncio

import pytest

from spam_gpt.batching import PassBatcher


class Recorder:
    """A model stand-in: doubles numbers and notes every pass."""

    def __init__(self, fail_on: int | None = None):
        self.passes: list[list[int]] = []
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.passes.append(list(items))
        if self.fail_on in items:
            raise RuntimeError("model failed")
        return [2 * item for item in items]


def test_a_lone_request_is_computed_alone_and_at_once():
    model = Recorder()

    async def scenario():
        batcher = PassBatcher(model, max_batch_size=32)
        first = await batcher.submit(1)
        second = await batcher.submit(2)
        return first, second

    assert asyncio.run(scenario()) == (2, 4)
    assert model.passes == [[1], [2]]


def test_requests_that_arrive_together_share_passes_in_order():
    model = Recorder()

    async def scenario():
        batcher = PassBatcher(model, max_batch_size=4)
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(scenario()) == [2 * i for i in range(10)]
    assert model.passes == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_requests_arriving_during_a_pass_form_the_next_one():
    model = Recorder()
    later: list[asyncio.Task] = []

    async def scenario():
        batcher = PassBatcher(model, max_batch_size=32)

        def run(items: list[int]) -> list[int]:
            if not later:  # five requests come in while the first pass runs
                later.extend(asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6))
            return model(items)

        batcher.run = run
        first = await batcher.submit(0)
        return [first, *await asyncio.gather(*later)]

    assert asyncio.run(scenario()) == [0, 2, 4, 6, 8, 10]
    assert model.passes == [[0], [1, 2, 3, 4, 5]]


def test_a_failed_pass_fails_its_requests_only():
    model = Recorder(fail_on=2)

    async def scenario():
        batcher = PassBatcher(model, max_batch_size=2)
        results = await asyncio.gather(
            *(batcher.submit(i) for i in range(4)), return_exceptions=True
        )
        return results, await batcher.submit(9)

    results, after = asyncio.run(scenario())
    assert results[:2] == [0, 2]
    assert all(isinstance(r, RuntimeError) for r in results[2:])
    assert after == 18


def test_a_client_that_left_is_not_computed_for():
    model = Recorder()

    async def scenario():
        batcher = PassBatcher(model, max_batch_size=8)
        leaving = asyncio.create_task(batcher.submit(1))
        staying = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)  # both queued, the pass still gathering
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        return await staying

    assert asyncio.run(scenario()) == 4
    assert model.passes == [[2]]
