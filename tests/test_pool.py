"""Learners sharing an event loop share its bounded compute pool instead of a thread each
(``_worker.py``); each still trains exactly as it does alone. (The loop's lag and the total
throughput with 8 and 32 learners are measured by ``bench/many_learners.py``.)"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import anyio
import pytest
import torch

from aiolearner import Callback, Learner, StateView, _worker
from aiolearner.testing import make_batches, make_learner

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


class Occupancy:
    """How many compute jobs run at once, and in which threads (shared by the learners)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.threads: set[str] = set()
        self.users: list[int] = []


class Measure(Callback):
    """A ``def`` hook of the fused batch: it runs in the thread that runs the batch."""

    def __init__(self, occupancy: Occupancy) -> None:
        self.occupancy = occupancy

    def before_fit(self, state: StateView) -> None:
        self.occupancy.users.append(_worker.ComputePool.current().users)

    def before_update(self, state: StateView) -> None:
        o = self.occupancy
        with o.lock:
            o.now += 1
            o.most = max(o.most, o.now)
            o.threads.add(threading.current_thread().name)
        time.sleep(0.0005)  # long enough for another job to run at the same time, if it could
        with o.lock:
            o.now -= 1


class ValidationBatches(Callback):
    """Counts validation batches (a ``def`` hook: the batch stays one synchronous call)."""

    def __init__(self) -> None:
        self.seen = 0

    def after_validate_batch(self, state: StateView) -> None:
        self.seen += 1


def weights(learner: Learner[Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


@BACKENDS
def test_many_learners_on_one_loop_run_at_most_the_pool_size_at_once(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_worker, "pool_size", lambda: 2)
    occupancy = Occupancy()
    learners = [
        make_learner(n_batches=6, seed=i, compute="thread", callbacks=[Measure(occupancy)])
        for i in range(6)
    ]
    after: list[int] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for learner in learners:
                tg.start_soon(learner.fit, 2)
        after.append(_worker.ComputePool.current().users)

    anyio.run(main, backend=backend)
    assert max(occupancy.users) == 6  # the six runs were open at once
    assert after == [0]
    assert 1 <= occupancy.most <= 2
    # Each learner trained exactly as it does alone.
    for i, learner in enumerate(learners):
        alone = make_learner(n_batches=6, seed=i, compute="inline")
        alone.fit_sync(2, backend=backend)  # type: ignore[arg-type]
        assert all(torch.equal(a, b) for a, b in zip(weights(learner), weights(alone), strict=True))


async def test_a_learner_alone_keeps_its_dedicated_worker() -> None:
    seen: list[tuple[bool, bool]] = []

    class Probe(Callback):
        async def after_fit(self, state: StateView) -> None:
            worker = learner._rt.worker
            seen.append((worker.shared, worker.running))

    learner = make_learner(n_batches=3, compute="thread", callbacks=[Probe()])
    await learner.fit(1)
    assert seen == [(False, True)]


def test_the_pool_size_follows_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert _worker.pool_size() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert _worker.pool_size() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert _worker.pool_size() == _worker.MAX_POOL_SIZE


@BACKENDS
def test_inline_learners_sharing_a_loop_take_turns(backend: str) -> None:
    # Each learner gives the loop a turn after every batch (yield_interval=0). Taking turns,
    # one learner runs between two turns of another task on the loop; without turns, every
    # learner would run a batch at each round of the loop, and that task would wait for all.
    # Validation passes (six batches each) take turns too.
    counters = [ValidationBatches() for _ in range(6)]
    learners = [
        make_learner(
            n_batches=8,
            seed=i,
            compute="inline",
            yield_interval=0.0,
            val_data=make_batches(6, seed=100 + i),
            callbacks=[counters[i]],
        )
        for i in range(6)
    ]
    advanced: list[int] = []

    async def main() -> None:
        done = anyio.Event()

        def progress() -> list[tuple[int, int]]:
            return [(x.state.step, c.seen) for x, c in zip(learners, counters, strict=True)]

        async def probe() -> None:
            last = progress()
            while not done.is_set():
                await anyio.lowlevel.checkpoint()
                now = progress()
                advanced.append(sum(a != b for a, b in zip(now, last, strict=True)))
                last = now

        async with anyio.create_task_group() as outer:
            outer.start_soon(probe)
            async with anyio.create_task_group() as tg:
                for learner in learners:
                    tg.start_soon(learner.fit, 2)
            done.set()

    anyio.run(main, backend=backend)
    assert all(learner.state.step == 16 for learner in learners)
    assert all(counter.seen == 12 for counter in counters)
    assert max(advanced) <= 2, advanced
    for i, learner in enumerate(learners):
        alone = make_learner(
            n_batches=8, seed=i, compute="inline", val_data=make_batches(6, seed=100 + i)
        )
        alone.fit_sync(2, backend=backend)  # type: ignore[arg-type]
        assert all(torch.equal(a, b) for a, b in zip(weights(learner), weights(alone), strict=True))


@BACKENDS
def test_auto_keeps_many_tiny_learners_inline_when_they_take_turns(backend: str) -> None:
    # A slice is a turn interval (50 ms) here: six learners holding the loop one after another
    # would keep a task waiting 300 ms (> max_blocking, so they would hop to the pool); taking
    # turns, a task waits for one slice (< max_blocking), so auto keeps them inline.
    learners = [
        make_learner(n_batches=30, seed=i, yield_interval=0.05, max_blocking=0.2) for i in range(6)
    ]
    for learner in learners:
        learner._rt.policy.recheck_interval = 0.0  # decide after every batch, not twice a second
    hops: list[int] = []

    async def main() -> None:
        done = anyio.Event()

        async def service() -> None:  # another task on the loop, which auto keeps responsive
            while not done.is_set():
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as outer:
            outer.start_soon(service)
            async with anyio.create_task_group() as tg:
                for learner in learners:
                    tg.start_soon(learner.fit, 2)
            done.set()
        hops.extend(learner._rt.policy.hops for learner in learners)

    anyio.run(main, backend=backend)
    assert hops == [0] * 6
    for learner in learners:
        policy = learner._rt.policy
        assert not policy.hopping
        assert not policy.in_turns  # the run is over


class Interrupts(Callback):
    """Cancels its learner's scope, or raises, once, after the update of one step (a ``def``
    hook: the batch stays synchronous, so the learner takes turns)."""

    reads = frozenset({"step"})

    def __init__(self, outcome: str, at: int = 5) -> None:
        self.outcome = outcome
        self.at = at
        self.scope: anyio.CancelScope | None = None
        self.done = False

    def after_update(self, state: StateView) -> None:
        if state.step == self.at and not self.done:
            self.done = True
            if self.outcome == "cancel":
                assert self.scope is not None
                self.scope.cancel()
            else:
                raise RuntimeError("interrupted")


def shuffled(seed: int) -> Any:
    x, y = (torch.cat(t) for t in zip(*make_batches(8, seed=seed), strict=True))
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=5,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


@BACKENDS
@pytest.mark.parametrize("outcome", ["cancel", "error"])
@pytest.mark.parametrize("data", ["list", "shuffling DataLoader"])
def test_a_learner_interrupted_while_others_take_turns(
    backend: str, outcome: str, data: str
) -> None:
    # One of four inline learners sharing a loop is cancelled, or fails, in the middle of its
    # run: the turn is not left held (the others finish, each bit-identical to alone), and the
    # interrupted one continues exactly when it fits again.
    def build(i: int, callbacks: list[Callback]) -> Learner[Any]:
        train = make_batches(8, seed=i + 1) if data == "list" else shuffled(i + 1)
        return make_learner(
            train_data=train, seed=i, compute="inline", yield_interval=0.0, callbacks=callbacks
        )

    hook = Interrupts(outcome)
    learners = [build(0, [hook])] + [build(i, []) for i in range(1, 4)]
    errors: list[BaseException] = []

    async def main() -> None:
        async def first() -> None:
            with anyio.CancelScope() as scope:
                hook.scope = scope
                try:
                    await learners[0].fit(2)
                except* RuntimeError as group:  # a callback's error comes grouped
                    errors.extend(group.exceptions)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            for learner in learners[1:]:
                tg.start_soon(learner.fit, 2)

    anyio.run(main, backend=backend)
    assert learners[0].state.step == 5
    assert len(errors) == (outcome == "error")
    learners[0].fit_sync(2, backend=backend)  # type: ignore[arg-type]
    for i, learner in enumerate(learners):
        alone = build(i, [])
        alone.fit_sync(2, backend=backend)  # type: ignore[arg-type]
        assert learner.state.step == alone.state.step == 16
        assert all(torch.equal(a, b) for a, b in zip(weights(learner), weights(alone), strict=True))
