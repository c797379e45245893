"""Fused batches run in bursts: in thread mode several batches per hop, handing back when
needed; inline, the batches up to the loop's next turn in one call."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
import torch

from aiolearner import Callback, Learner, StateView, StopEpoch, _executor, _runtime
from aiolearner.testing import make_batches, make_learner


@pytest.fixture
def long_bursts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bursts end only when something needs the loop, never on time."""
    monkeypatch.setattr(_executor, "BURST_SECONDS", 1e9)


class AtStep(Callback):
    """A ``def`` hook (the batch stays fused, so it runs in the worker) acting at one step."""

    reads = frozenset({"step"})

    def __init__(self, at: int, action: Any) -> None:
        self.at = at
        self.action = action
        self.threads: set[int] = set()

    def after_update(self, state: StateView) -> None:
        self.threads.add(threading.get_ident())
        if state.step == self.at:
            self.action()


async def trained_for(steps: int) -> list[torch.Tensor]:
    """The weights after ``steps`` plain inline batches of the same data."""
    learner = make_learner(
        train_data=make_batches(20)[:steps], with_validation=False, compute="inline"
    )
    await learner.fit(1)
    return [p.detach().clone() for p in learner.model.parameters()]


@pytest.mark.usefixtures("long_bursts")
async def test_a_pass_of_fused_batches_is_one_hop() -> None:
    hook = AtStep(0, lambda: None)
    learner = make_learner(n_batches=6, with_validation=False, compute="thread", callbacks=[hook])
    await learner.fit(2)
    assert learner.state.step == 12
    assert learner.compute_policy.hops == 2  # one burst per pass
    assert threading.get_ident() not in hook.threads
    # Same result as the inline loop.
    inline = make_learner(n_batches=6, with_validation=False, compute="inline")
    await inline.fit(2)
    for a, b in zip(learner.model.parameters(), inline.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert learner.state.metrics == inline.state.metrics


@pytest.mark.usefixtures("long_bursts")
async def test_a_cancellation_stops_a_burst_after_the_batch_in_progress() -> None:
    with anyio.CancelScope() as scope:
        hook = AtStep(3, lambda: anyio.from_thread.run_sync(scope.cancel))
        # The loop delivers the cancellation to the task waiting for the burst while the burst
        # goes on: the next batches each wait for a turn of the loop, so that it has come by
        # the end of the data however slow the loop is to get the CPU.
        turns = [AtStep(n, lambda: anyio.from_thread.run_sync(lambda: None)) for n in (4, 5, 6)]
        learner = make_learner(
            train_data=make_batches(20),
            with_validation=False,
            compute="thread",
            callbacks=[hook, *turns],
        )
        await learner.fit(1)
    assert scope.cancelled_caught
    step = learner.state.step
    assert 3 <= step < 20
    # Counters and weights agree: exactly `step` updates were applied, none half done.
    for a, b in zip(learner.model.parameters(), await trained_for(step), strict=True):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("long_bursts")
async def test_a_task_waiting_for_the_weights_ends_the_burst() -> None:
    seen: list[int] = []
    learner: Learner[Any]

    async def read_weights() -> None:
        async with learner.weights_lock.read():
            seen.append(learner.state.step)

    async def start_reader() -> None:
        tg.start_soon(read_weights)
        await anyio.wait_all_tasks_blocked()  # the reader now waits for the lock
        assert learner.weights_lock.waiting == 1

    hook = AtStep(2, lambda: anyio.from_thread.run(start_reader))
    learner = make_learner(
        train_data=make_batches(20), with_validation=False, compute="thread", callbacks=[hook]
    )
    async with anyio.create_task_group() as tg:
        await learner.fit(1)
    assert learner.state.step == 20
    assert seen == [2]  # served right after the batch in progress, not at the end of the pass


class StopsAt(Callback):
    reads = frozenset({"step"})

    def after_update(self, state: StateView) -> None:
        if state.step == 4:
            raise StopEpoch("enough")


@pytest.mark.usefixtures("long_bursts")
@pytest.mark.parametrize("compute", ["thread", "inline"])
async def test_control_flow_and_errors_inside_a_burst_are_those_of_a_batch(compute: str) -> None:
    learner = make_learner(
        train_data=make_batches(10), with_validation=False, compute=compute, callbacks=[StopsAt()]
    )
    await learner.fit(1)
    assert learner.state.step == 4
    assert learner.state.stop_reason == "enough"
    assert learner.state.epoch == 1

    bad = (torch.randn(5, 7), torch.zeros(5, dtype=torch.long))  # 7 features, model wants 4
    hook = AtStep(0, lambda: None)
    data = [*make_batches(3), bad]
    learner = make_learner(
        train_data=data, with_validation=False, compute=compute, callbacks=[hook]
    )
    with pytest.raises(RuntimeError) as info:
        await learner.fit(1)
    assert any("stage 'gradient'" in n and "step 3" in n for n in info.value.__notes__)
    assert learner.state.step == 3
    assert all(p.grad is None for p in learner.model.parameters())


class Recorded:
    """An iterable recording the thread of each fetch."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches
        self.threads: list[int] = []

    def __iter__(self) -> Any:
        for batch in self.batches:
            self.threads.append(threading.get_ident())
            yield batch


@pytest.mark.usefixtures("long_bursts")
async def test_a_source_found_slow_in_a_burst_gets_its_producer_from_the_loop() -> None:
    source = Recorded(make_batches(8))
    learner = make_learner(
        train_data=source,
        with_validation=False,
        compute="thread",
        callbacks=[AtStep(0, lambda: None)],
        fetch_budget=0.0,  # every fetch is over budget: slow after two
    )
    await learner.fit(1)
    assert learner.state.step == 8
    assert learner._rt.train.slow
    # The fetches after the switch came from the producer thread, not the burst's worker.
    assert len(set(source.threads[3:])) == 1


class CountsInlineCalls:
    """Counts ``Runtime.run_inline`` calls that ran (a batch, or a burst of them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = _runtime.Runtime.run_inline

        def counted(rt: Any, fn: Any, *args: Any, **kwargs: Any) -> object:
            result = original(rt, fn, *args, **kwargs)
            self.calls += result is not _runtime.NOT_RUN
            return result

        monkeypatch.setattr(_runtime.Runtime, "run_inline", counted)


async def test_inline_the_batches_up_to_the_loops_turn_are_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = CountsInlineCalls(monkeypatch)
    # A turn every 10 s at most: nothing ends a pass's burst but the end of the pass.
    learner = make_learner(n_batches=6, with_validation=False, compute="inline", yield_interval=1.0)
    await learner.fit(2)
    assert learner.state.step == 12
    assert counter.calls == 4  # per pass: the first batch alone, then one burst
    # The same training as batch by batch in thread mode's bursts and alone.
    thread = make_learner(n_batches=6, with_validation=False, compute="thread")
    await thread.fit(2)
    for a, b in zip(learner.model.parameters(), thread.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert learner.state.metrics == thread.state.metrics


async def test_inline_a_burst_gives_the_loop_its_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountsInlineCalls(monkeypatch)
    # A turn after every batch: each burst is one batch long.
    learner = make_learner(n_batches=6, with_validation=False, compute="inline", yield_interval=0.0)
    await learner.fit(1)
    assert counter.calls == 6


async def test_inline_a_cancellation_lands_at_the_end_of_the_burst() -> None:
    with anyio.CancelScope() as scope:
        hook = AtStep(3, scope.cancel)  # on the loop's thread: the batch runs inline
        learner = make_learner(
            train_data=make_batches(20), with_validation=False, compute="inline", callbacks=[hook]
        )
        await learner.fit(1)
    assert scope.cancelled_caught
    assert threading.get_ident() in hook.threads
    step = learner.state.step
    assert 3 <= step <= 20
    # Counters and weights agree: exactly `step` updates were applied, none half done.
    for a, b in zip(learner.model.parameters(), await trained_for(step), strict=True):
        assert torch.equal(a, b)
