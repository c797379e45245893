"""Feeding batches: prefetch depth, producer shutdown, data errors, device moves, data kinds."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import torch

from aiolearner import Callback, Gradient, Learner, StateView
from aiolearner._device import DeviceMover
from aiolearner.testing import make_batches, make_learner, tiny_model

Batch = tuple[torch.Tensor, torch.Tensor]


class CountingData:
    """An endless (or ``n``-long) iterable of batches that counts what was fetched from it.

    It records the largest lead of fetched over consumed batches (``consumed`` is advanced by
    :class:`Consume`), and sets ``reached`` once ``target`` batches have been fetched.
    """

    def __init__(self, n: int | None = None, *, target: int = 0, fail_at: int = -1) -> None:
        self.n = n
        self.batches = make_batches(4)
        self.fetched = 0
        self.consumed = 0
        self.max_lead = 0
        self.target = target
        self.reached = threading.Event()
        self.fail_at = fail_at
        self.threads: set[int] = set()

    def _next(self, i: int) -> Batch:
        self.threads.add(threading.get_ident())
        if i == self.fail_at:
            raise ValueError(f"bad record {i}")
        self.fetched += 1
        self.max_lead = max(self.max_lead, self.fetched - self.consumed)
        if self.fetched >= self.target:
            self.reached.set()
        return self.batches[i % len(self.batches)]

    def __iter__(self) -> Iterator[Batch]:
        counter = itertools.count() if self.n is None else iter(range(self.n))
        for i in counter:
            yield self._next(i)


class AsyncCountingData(CountingData):
    def __aiter__(self) -> AsyncIterator[Batch]:
        return self._agen()

    async def _agen(self) -> AsyncIterator[Batch]:
        counter = itertools.count() if self.n is None else iter(range(self.n))
        for i in counter:
            await anyio.lowlevel.checkpoint()
            yield self._next(i)


class Consume(Callback):
    """Counts consumed batches; on the first one, waits until the producer has filled up."""

    reads = frozenset({"batch"})

    def __init__(self, data: CountingData) -> None:
        self.data = data

    async def before_fit_batch(self, state: StateView) -> None:
        self.data.consumed += 1
        if self.data.consumed == 1:
            # Give the producer every chance to run ahead: wait until it has fetched as many
            # batches as it may, then let the loop run its other tasks.
            await anyio.to_thread.run_sync(self.data.reached.wait)
            await anyio.wait_all_tasks_blocked()


@pytest.mark.parametrize("prefetch", [1, 3])
@pytest.mark.parametrize("kind", ["thread", "async"])
async def test_prefetch_depth_is_respected(prefetch: int, kind: str) -> None:
    # Besides the batches taken, at most `prefetch` wait in the buffer and one more is in the
    # producer's hands. The first batch is taken before its hook counts it, so the producer
    # may reach `prefetch + 2` fetches at the first hook; the hook then waits for exactly that.
    data = (AsyncCountingData if kind == "async" else CountingData)(12, target=prefetch + 2)
    learner = make_learner(
        train_data=data,
        callbacks=[Consume(data)],
        with_validation=False,
        fetch="thread",
        prefetch=prefetch,
    )
    await learner.fit(1)
    assert learner.state.step == 12
    assert data.reached.is_set()
    # Counted from the hooks, a batch may be taken (and its successor fetched) just before its
    # hook runs: one more than the exact bound of prefetch + 1. An unbounded producer would
    # be ~10 ahead here (it had the whole wait to run).
    assert prefetch + 1 <= data.max_lead <= prefetch + 2


@pytest.mark.parametrize("kind", ["thread", "async"])
async def test_cancel_stops_the_producer(kind: str) -> None:
    data = (AsyncCountingData if kind == "async" else CountingData)(None, target=3)
    cancelled_at = anyio.Event()

    class CancelAtThree(Callback):
        reads = frozenset({"step"})

        def __init__(self, scope: anyio.CancelScope) -> None:
            self.scope = scope

        async def after_fit_batch(self, state: StateView) -> None:
            if state.step == 3:
                self.scope.cancel()
                cancelled_at.set()
                await anyio.lowlevel.checkpoint()  # delivered here, before a 4th batch

    with anyio.CancelScope() as scope:
        learner = make_learner(
            train_data=data,
            callbacks=[CancelAtThree(scope)],
            with_validation=False,
            fetch="thread",
            prefetch=2,
        )
        await learner.fit(1)
    assert cancelled_at.is_set()
    assert learner.state.step == 3
    fetched = data.fetched
    # Nothing of the learner is left running, and the iterator is not advanced any further.
    names = [t.name for t in anyio.get_running_tasks()]
    assert not [n for n in names if n and n.startswith("aiolearner.")]
    for _ in range(5):
        await anyio.lowlevel.checkpoint()
    assert data.fetched == fetched
    # At most: 3 taken, 2 buffered, 1 in the producer's hands.
    assert fetched <= 3 + 2 + 1


@pytest.mark.parametrize("fetch", ["inline", "thread", "async"])
async def test_data_errors_surface_with_the_batch_index(fetch: str) -> None:
    if fetch == "async":
        data: CountingData = AsyncCountingData(8, fail_at=5)
    else:
        data = CountingData(8, fail_at=5)
    stage_seen: list[int] = []

    class Seen(Callback):
        reads = frozenset({"batch_index"})

        def before_fit_batch(self, state: StateView) -> None:
            stage_seen.append(state.batch_index)

    learner = make_learner(
        train_data=data,
        callbacks=[Seen()],
        with_validation=False,
        fetch="inline" if fetch == "inline" else "thread",
    )
    with pytest.raises(ValueError, match="bad record 5") as info:
        await learner.fit(1)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "fetching batch 5" in notes
    assert "train_data" in notes
    # It surfaced where batch 5 was to be consumed: the five batches before it were trained.
    assert stage_seen == [0, 1, 2, 3, 4]
    assert learner.state.step == 5


@pytest.mark.parametrize("fetch", ["inline", "thread"])
async def test_device_moves_happen_before_the_stage_runs(
    fetch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved: list[int] = []
    events: list[str] = []

    def mark(batch: Any) -> Any:
        # Stand-in for a device copy: a new container, recorded.
        out = tuple(t.clone() for t in batch)
        moved.append(id(out))
        events.append("move")
        return out

    monkeypatch.setattr(DeviceMover, "move_inline", lambda self, batch: mark(batch))
    monkeypatch.setattr(DeviceMover, "move_ahead", lambda self, batch: (mark(batch), None))

    class CheckingGradient(Gradient):
        def compute(self, state: Any) -> None:
            assert id(state.batch) in moved
            events.append("stage")
            super().compute(state)

    learner = make_learner(
        n_batches=3,
        with_validation=False,
        fetch=fetch,
        stages={"gradient": CheckingGradient()},
    )
    await learner.fit(1)
    assert events.count("stage") == 3
    for i, event in enumerate(events):
        if event == "stage":
            assert events[:i].count("move") > events[:i].count("stage")


def test_cpu_batches_are_not_copied() -> None:
    mover = DeviceMover(torch.device("cpu"))
    batch = (torch.zeros(2), {"mask": torch.ones(2)}, [torch.zeros(1)])
    assert mover.move_inline(batch) is batch


async def test_async_iterable_trains_like_the_same_list() -> None:
    batches = make_batches(5, seed=3)

    async def stream() -> AsyncIterator[Batch]:
        for b in batches:
            await anyio.lowlevel.checkpoint()
            yield b

    class Stream:
        def __aiter__(self) -> AsyncIterator[Batch]:
            return stream()

    from_list = make_learner(train_data=batches, with_validation=False)
    from_stream = make_learner(train_data=Stream(), with_validation=False)
    await from_list.fit(2)
    await from_stream.fit(2)
    assert from_stream.state.step == 10
    for a, b in zip(from_list.model.parameters(), from_stream.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert from_stream.state.metrics["train_loss"] == from_list.state.metrics["train_loss"]


@pytest.mark.parametrize("fetch", ["inline", "thread"])
async def test_steps_per_epoch_cuts_an_endless_source(fetch: str) -> None:
    data = CountingData(None)
    learner = make_learner(
        train_data=data, with_validation=False, steps_per_epoch=3, fetch=fetch, prefetch=2
    )
    await learner.fit(2)
    assert learner.state.step == 6
    assert learner.state.epoch == 2
    # The pass does not fetch past its end by more than the prefetch allows.
    assert 6 <= data.fetched <= 6 + 2 + 1


async def test_auto_fetch_moves_a_slow_source_to_the_producer_thread() -> None:
    loop_thread = threading.get_ident()

    class Slow(CountingData):
        def _next(self, i: int) -> Batch:
            time.sleep(0.002)  # over fetch_budget: a slow __getitem__
            return super()._next(i)

    data = Slow(6)
    learner = make_learner(
        train_data=data, with_validation=False, fetch="auto", fetch_budget=0.0005
    )
    await learner.fit(1)
    assert learner.state.step == 6
    # The first fetches ran inline (on the loop) before the switch; later ones in the thread.
    assert loop_thread in data.threads
    assert len(data.threads) == 2


class Announcing:
    """Batches that announce (a threading.Event) when fetching of batch ``watch`` begins."""

    def __init__(self, batches: list[Batch], watch: int) -> None:
        self.batches = batches
        self.watch = watch
        self.fetching = threading.Event()

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.batches):
            if i == self.watch:
                self.fetching.set()
            yield batch


class WaitsForFetch(Callback):
    """At ``step``, before the batch computes, waits (bounded) for the source's announcement."""

    reads = frozenset({"step"})

    def __init__(self, source: Announcing, step: int) -> None:
        self.source = source
        self.step = step
        self.overlapped: bool | None = None

    def before_gradient(self, state: StateView) -> None:
        if state.step == self.step:
            # Blocks the loop on purpose (inline compute): only a producer thread that is
            # already running can fetch meanwhile.
            self.overlapped = self.source.fetching.wait(5)


async def test_the_producer_started_by_a_switch_fetches_during_the_current_batch() -> None:
    # fetch_budget 0: every fetch is "slow", so the source switches at batch 1's fetch. Batch 2
    # must then be fetched by the producer while batch 1 computes, not after it.
    source = Announcing(make_batches(5), watch=2)
    waits = WaitsForFetch(source, step=1)
    learner = make_learner(
        train_data=source,
        with_validation=False,
        compute="inline",
        fetch="auto",
        fetch_budget=0.0,
        callbacks=[waits],
    )
    await learner.fit(1)
    assert learner.state.step == 5
    assert waits.overlapped is True


async def test_fetch_thread_keeps_a_slow_getitem_off_the_loop() -> None:
    loop_thread = threading.get_ident()

    class Slow(CountingData):
        def _next(self, i: int) -> Batch:
            time.sleep(0.001)  # a slow __getitem__ / collate
            return super()._next(i)

    data = Slow(5)
    learner = make_learner(train_data=data, with_validation=False, fetch="thread")
    await learner.fit(1)
    assert learner.state.step == 5
    assert data.threads
    assert loop_thread not in data.threads


def test_a_learner_is_built_with_the_documented_fetch_options() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="fetch must be"):
        Learner(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.nn.functional.cross_entropy,
            make_batches(2),
            fetch="sometimes",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="prefetch must be at least 1"):
        make_learner(prefetch=0)
