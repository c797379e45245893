"""Generators (sync and async) as training data, interrupted and continued.

* A generator without ``steps_per_epoch`` is one pass. Cancelled half way, ``fit`` again goes on
  in the same generator: every batch is trained once, in order. It used to make the pass's
  iterator again, which for a generator is the same iterator, already past the batches it
  served, and skip as many again: they were never trained, and the epoch ended short with no
  error.
* A live stream (``steps_per_epoch``) over an async generator: the batch a producer was
  fetching ahead when an epoch ended is served first by the next epoch; when the run ended
  (cancelled) after that fetch had finished, the batch was dropped, and the next run trained
  on the one after it, silently.
* A generator's batch undone by a stop is held by the checkpoint written at the stop, and a
  state taken after a stream's pass ended but before its epoch did resumes that epoch's end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

from aiolearner import Callback, Learner, StateView, StopFit
from aiolearner.callbacks import Checkpoint
from aiolearner.testing import tiny_model

BATCHES = [(torch.full((2, 4), float(i)), torch.zeros(2, dtype=torch.long)) for i in range(12)]


def ids(seen: list[Any]) -> list[int]:
    return [int(batch[0][0, 0]) for batch in seen]


class Seen(Callback):
    reads = frozenset({"batch"})

    def __init__(self) -> None:
        self.batches: list[Any] = []

    def after_fit_batch(self, state: StateView) -> None:
        self.batches.append(state.batch)


class CancelAt(Callback):
    reads = frozenset({"step"})

    def __init__(self, step: int) -> None:
        self.step = step
        self.scope: anyio.CancelScope | None = None

    async def after_fit_batch(self, state: StateView) -> None:
        if self.scope is not None and state.step == self.step:
            self.scope.cancel()
            self.scope = None
            await anyio.lowlevel.checkpoint()


def learner(
    data: Any, callbacks: list[Callback], model: torch.nn.Module | None = None, **options: Any
) -> Learner[Any]:
    model = tiny_model(seed=0) if model is None else model
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        data,
        callbacks=callbacks,
        **options,
    )


def generator() -> Iterator[Any]:
    yield from BATCHES


async def async_generator() -> AsyncIterator[Any]:
    for batch in BATCHES:
        yield batch  # (never suspends: a cancellation cannot land in it)


async def test_a_generator_cancelled_half_way_goes_on_where_it_stopped() -> None:
    for make in (generator, async_generator):
        seen, cancel = Seen(), CancelAt(3)
        run = learner(make(), [seen, cancel])
        with anyio.CancelScope() as cancel.scope:
            await run.fit(1)
        assert run.state.step == 3
        await run.fit(1)
        assert ids(seen.batches) == list(range(12)), make.__name__
        assert (run.state.epoch, run.state.step) == (1, 12)

        reference = learner(make(), [])
        await reference.fit(1)
        for a, b in zip(run.model.parameters(), reference.model.parameters(), strict=True):
            assert torch.equal(a, b)


class FetchedAhead:
    """An async generator whose fifth batch (the second epoch's first, fetched ahead as the
    first epoch ends) waits until the test lets it through, and says when it has it."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.fetched = anyio.Event()

    async def stream(self) -> AsyncIterator[Any]:
        for i, batch in enumerate(BATCHES):
            if i == 4:
                await self.gate.wait()
                self.fetched.set()
            yield batch


class EndRunWithTheFetchDone(Callback):
    """At the first epoch's end: the batch fetched ahead arrives, then the run is cancelled."""

    def __init__(self, source: FetchedAhead) -> None:
        self.source = source
        self.scope: anyio.CancelScope | None = None

    async def after_fit(self, state: StateView) -> None:
        if self.scope is not None:
            self.source.gate.set()
            await self.source.fetched.wait()
            self.scope.cancel()
            self.scope = None
            await anyio.lowlevel.checkpoint()


async def test_a_batch_fetched_ahead_when_a_run_ends_is_the_next_runs_first() -> None:
    source = FetchedAhead()
    seen, end = Seen(), EndRunWithTheFetchDone(source)
    run = learner(source.stream(), [seen, end], steps_per_epoch=4)
    with anyio.CancelScope() as end.scope:
        await run.fit(3)
    assert run.state.step == 4
    await run.fit(3)
    assert ids(seen.batches) == list(range(12))
    assert run.state.step == 12


def augmented() -> Iterator[Any]:
    """The batches, each with augmentation drawn from torch's global generator as it yields."""
    for x, y in BATCHES:
        yield x + 0.01 * torch.randn(x.shape), y


def dropout_learner(data: Any, callbacks: list[Callback]) -> Learner[Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)
    )
    return learner(data, callbacks, model)


class StopBefore(Callback):
    """Stops the fit in ``before_fit_batch`` of step 5, once: that batch is undone."""

    reads = frozenset({"step"})
    done = False

    def before_fit_batch(self, state: StateView) -> None:
        if state.step == 5 and not self.done:
            self.done = True
            raise StopFit("preempted")


async def test_a_generator_resumed_with_an_undone_batch_serves_that_batch(tmp_path: Path) -> None:
    # The checkpoint holds the undone batch (its augmentation drawn): a fresh learner given a
    # new generator trains on it, not on the same batch drawn again with other numbers.
    reference = dropout_learner(augmented(), [])
    torch.manual_seed(1)
    await reference.fit(1)

    first = dropout_learner(augmented(), [StopBefore(), Checkpoint(tmp_path)])
    torch.manual_seed(1)
    await first.fit(1)
    assert first.state.step == 5

    torch.manual_seed(99)  # a fresh process's generators are elsewhere
    resumed = dropout_learner(augmented(), [Checkpoint(tmp_path)])
    await resumed.fit(1, resume="last")
    assert resumed.state.step == 12
    for a, b in zip(resumed.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(a, b)


class CancelInAfterFit(Callback):
    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None

    async def after_fit(self, state: StateView) -> None:
        if self.scope is not None:
            self.scope.cancel()
            self.scope = None
            await anyio.lowlevel.checkpoint()


async def test_an_async_generator_cancelled_after_its_pass_goes_on() -> None:
    seen, cancel = Seen(), CancelInAfterFit()
    run = learner(async_generator(), [seen, cancel])
    with anyio.CancelScope() as cancel.scope:
        await run.fit(1)
    await run.fit(1)  # (failed: a sync empty iterator stood in for the async one)
    assert (run.state.epoch, run.state.step) == (1, 12)
    assert ids(seen.batches) == list(range(12))


async def test_a_stream_stopped_after_its_pass_resumes_at_that_epochs_end() -> None:
    # The state taken in after_fit, when the epoch's pass has ended but its batches still
    # count: a fresh learner goes on with the next epoch's batches (it skipped an epoch).
    cancel = CancelInAfterFit()
    first = learner(generator(), [cancel], steps_per_epoch=4)
    with anyio.CancelScope() as cancel.scope:
        await first.fit(3)
    assert (first.state.epoch, first.state.batch_index) == (0, 4)

    seen = Seen()
    resumed = learner(generator(), [seen], steps_per_epoch=4)
    resumed.load_state_dict(first.state_dict())
    await resumed.fit(3)
    assert ids(seen.batches) == list(range(4, 12))
    assert resumed.state.step == 12


async def test_a_generator_resumed_in_its_own_learner_goes_on_or_is_refused(
    tmp_path: Path,
) -> None:
    # resume="last" right after the stop that wrote last.pt: the generator goes on where it is
    # (it used to be drawn again "from its start", skipping as many batches as were trained).
    seen, stop = Seen(), StopBefore()
    run = learner(generator(), [seen, stop, Checkpoint(tmp_path, every_n_steps=2)])
    await run.fit(1)
    assert run.state.step == 5
    await run.fit(1, resume="last")
    assert ids(seen.batches) == list(range(12))

    # An earlier file cannot take the generator back: refused, nothing loaded.
    seen, stop = Seen(), StopBefore()
    run = learner(generator(), [seen, stop, Checkpoint(tmp_path / "b", every_n_steps=2)])
    await run.fit(1)
    earlier = tmp_path / "b" / "step-00000004.pt"
    weights = [p.detach().clone() for p in run.model.parameters()]
    with pytest.raises(ValueError, match="generator this learner has already drawn from"):
        run.load_checkpoint(earlier)
    assert run.state.step == 5
    assert all(torch.equal(a, b) for a, b in zip(weights, run.model.parameters(), strict=True))


async def test_a_used_up_validation_generator_says_it_would_evaluate_on_nothing() -> None:
    run = learner(BATCHES[:4], [], val_data=generator())
    await run.validate()
    with pytest.raises(ValueError, match=r"val_data \(generator\) yielded no batch.*evaluate on"):
        await run.validate()
