"""Cancelling ``fit`` from outside: no half-applied update, counters match the weights, and
calling ``fit`` again finishes the run exactly as an uninterrupted one (bit for bit)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
import torch
from cancel_helpers import Hang
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Callback, Learner, StateView
from aiolearner.testing import make_batches, tiny_model

N_BATCHES = 4
EPOCHS = 2


def make_data(kind: str) -> Any:
    if kind == "list":
        return make_batches(N_BATCHES, seed=1)
    # A shuffling loader without its own generator: the order comes from torch's global RNG.
    pairs = make_batches(N_BATCHES, seed=1)
    x = torch.cat([p[0] for p in pairs])
    y = torch.cat([p[1] for p in pairs])
    return DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)


def build(kind: str, callbacks: list[Callback], **options: Any) -> Learner[Any]:
    torch.manual_seed(1234)
    model = tiny_model(seed=0)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.nn.functional.cross_entropy,
        make_data(kind),
        make_batches(2, seed=2),
        callbacks=callbacks,
        **options,
    )


class WeightLog(Callback):
    """The weights before training and after each committed step (index = step)."""

    reads = frozenset({"model", "step"})

    def __init__(self) -> None:
        self.by_step: list[list[torch.Tensor]] = []

    def before_fit_run(self, state: StateView) -> None:
        self.by_step.append(snapshot(state.model))

    def after_update(self, state: StateView) -> None:
        assert state.step == len(self.by_step)
        self.by_step.append(snapshot(state.model))


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


Reference = tuple[list[list[torch.Tensor]], list[torch.Tensor]]
_REFERENCES: dict[tuple[str, str], Reference] = {}


async def reference(kind: str, compute: str) -> Reference:
    """An uninterrupted run: the weights after each step, and the final weights (cached)."""
    key = (kind, compute)
    if key not in _REFERENCES:
        log = WeightLog()
        learner = build(kind, [log], compute=compute)
        await learner.fit(EPOCHS)
        assert learner.state.step == EPOCHS * N_BATCHES
        _REFERENCES[key] = (log.by_step, snapshot(learner.model))
    return _REFERENCES[key]


async def cancel_when(reached: anyio.Event, learner: Learner[Any], epochs: int) -> bool:
    """Run ``fit(epochs)`` in a scope that is cancelled once ``reached`` is set."""
    finished = False
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def run() -> None:
                nonlocal finished
                with scope:
                    await learner.fit(epochs)
                    finished = True

            async def canceller() -> None:
                await reached.wait()
                scope.cancel()

            tg.start_soon(run)
            tg.start_soon(canceller)
    assert scope.cancelled_caught
    return finished


@pytest.mark.parametrize("kind", ["list", "shuffled"])
@pytest.mark.parametrize("compute", ["inline", "thread"])
@pytest.mark.parametrize(
    ("hook", "at_step"),
    [
        ("before_fit_batch", 1),  # between batches
        ("after_gradient", 5),  # mid-batch, epoch 1: gradient computed, not applied
        ("after_update", 6),  # just after a commit, mid-epoch 1
        ("before_validate_batch", 4),  # during validation of epoch 0
    ],
)
async def test_cancel_then_fit_again_equals_an_uninterrupted_run(
    kind: str, compute: str, hook: str, at_step: int
) -> None:
    by_step, final = await reference(kind, compute)
    hang = Hang(hook, at_step)
    learner = build(kind, [hang], compute=compute)
    assert not await cancel_when(hang.reached, learner, EPOCHS)
    state = learner.state
    # Counters match the weights: exactly `step` updates are in them, none half-applied.
    assert state.step == at_step
    assert_equal(snapshot(learner.model), by_step[state.step])
    assert all(p.grad is None for p in learner.model.parameters())
    assert learner.status.value == "idle"
    assert not learner.weights_lock.write_locked
    assert learner.weights_lock.readers == 0
    # The same call finishes the run where it stopped.
    await learner.fit(EPOCHS)
    assert (state.epoch, state.step) == (EPOCHS, EPOCHS * N_BATCHES)
    assert_equal(snapshot(learner.model), final)


@pytest.mark.parametrize("kind", ["list", "shuffled"])
async def test_cancelled_twice_in_one_epoch_then_resumed(kind: str) -> None:
    _, final = await reference(kind, "inline")
    first, second = Hang("after_gradient", 1), Hang("before_update", 2)
    learner = build(kind, [first, second], compute="inline")
    await cancel_when(first.reached, learner, EPOCHS)
    assert learner.state.step == 1
    await cancel_when(second.reached, learner, EPOCHS)
    assert learner.state.step == 2
    await learner.fit(EPOCHS)
    assert_equal(snapshot(learner.model), final)


class BlockInWorker(Callback):
    """A def hook of a fused batch: it runs in the compute worker thread. At ``at_step`` it tells
    the event loop, then blocks the worker until the test releases it."""

    reads = frozenset({"step"})

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.reached = anyio.Event()
        self.release = threading.Event()
        self.in_worker = False

    def before_update(self, state: StateView) -> None:
        if state.step == self.at_step and not self.reached.is_set():
            self.in_worker = True
            anyio.from_thread.run_sync(self.reached.set)
            self.release.wait(10)


async def test_cancel_during_a_fused_batch_in_the_worker_thread_applies_it_whole() -> None:
    by_step, final = await reference("shuffled", "thread")
    block = BlockInWorker(at_step=5)
    learner = build("shuffled", [block], compute="thread")
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def run() -> None:
                with scope:
                    await learner.fit(EPOCHS)

            tg.start_soon(run)
            await block.reached.wait()
            assert block.in_worker
            scope.cancel()  # while the worker is half way through the batch
            block.release.set()
    assert scope.cancelled_caught
    # The batch in the worker could not be interrupted: it was applied entirely and counted.
    # (The worker runs a burst of batches: it stops at the first batch boundary after the
    # cancellation has reached the training task, which may be a batch or more later when
    # batches are this short.) Counters and weights agree either way.
    step = learner.state.step
    assert step >= 6
    assert_equal(snapshot(learner.model), by_step[step])
    await learner.fit(EPOCHS)
    assert_equal(snapshot(learner.model), final)


async def test_cancelled_error_reaches_the_callers_scope_not_swallowed() -> None:
    hang = Hang("after_gradient", 0)
    learner = build("list", [hang])
    reached_after = False
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                nonlocal reached_after
                await learner.fit(1)
                reached_after = True

            tg.start_soon(run)
            await hang.reached.wait()
            tg.cancel_scope.cancel()
    assert not reached_after
    assert learner.state.step == 0
