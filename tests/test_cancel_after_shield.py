"""A cancellation that arrives while a batch's weights are being written (a shielded hop of
``context.compute(..., writes_weights=True)``, an awaited batch with several weight writers)
lands as soon as the writes are whole: after that compute, after that batch; not at the next
turn of the loop, which in thread mode is never due (every hop gives the loop a turn)."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.from_thread
import pytest
import torch

from aiolearner import Callback, Fit, FitBatch, Gradient, Learner, State, StateView, Update
from aiolearner.testing import make_batches, tiny_model

N = 40
COMPUTES = ["inline", "thread"]


class PlainFit(Fit):
    """A hand-written pass (docs/writing-stages.md), each step one ``context.compute`` call
    that writes the weights; its step 3 cancels the scope the test gives it, from the thread
    the step runs on."""

    def __init__(self, writes_weights: bool) -> None:
        super().__init__()
        self.writes_weights = writes_weights
        self.scope: anyio.CancelScope | None = None

    async def run(self, state: State) -> None:
        def step(batch: Any) -> None:
            inputs, targets = batch
            loss = state.loss_fn(state.train_model(inputs), targets)
            loss.backward()  # type: ignore[no-untyped-call]
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            self.context.commit(state)
            if state.step == 3 and self.scope is not None:
                cancel(self.scope)

        state.model.train()
        async with self.context.open_pass(state, "train") as batches:
            while (batch := await batches.next()) is not batches.END:
                await self.context.compute(step, batch, writes_weights=self.writes_weights)


def cancel(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` from the event loop's thread or from a worker thread of anyio's."""
    try:
        anyio.from_thread.run_sync(scope.cancel)
    except RuntimeError:  # (on the event loop's thread itself)
        scope.cancel()


@pytest.mark.parametrize("writes_weights", [True, False])
async def test_a_cancel_during_a_compute_in_the_worker_lands_after_it(writes_weights: bool) -> None:
    # (Inline, a compute is no await point: the cancellation lands at the loop's next turn, as
    # one from another task, which could only be made in that turn, does.)
    fit = PlainFit(writes_weights)
    model = tiny_model()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        torch.nn.functional.cross_entropy,
        make_batches(N),
        compute="thread",
        stages={"fit": fit},
    )
    with anyio.CancelScope() as scope:
        fit.scope = scope
        await learner.fit(1)
    assert scope.cancelled_caught
    # The step that asked for it is committed; nothing after it ran.
    assert learner.state.step == 3


class Gradient2(Gradient):
    name = "gradient2"


class CancelInBatch(Callback):
    """An ``async def`` hook (the batch is awaited) between the batch's two updates, which
    cancels the scope the test gives it in the fourth batch."""

    reads = frozenset({"step"})

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None

    async def after_update_a(self, state: StateView) -> None:
        if self.scope is not None and state.step == 3:
            self.scope.cancel()
            self.scope = None
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("compute", COMPUTES)
async def test_a_cancel_inside_a_shielded_batch_lands_once_it_is_committed(compute: str) -> None:
    model = tiny_model()
    hook = CancelInBatch()
    learner: Learner[Any] = Learner(
        model,
        {
            "a": torch.optim.SGD(model.parameters(), lr=0.01),
            "b": torch.optim.SGD(model.parameters(), lr=0.01),
        },
        torch.nn.functional.cross_entropy,
        make_batches(N),
        callbacks=[hook],
        compute=compute,  # type: ignore[arg-type]
        stages={
            "fit_batch": FitBatch(Gradient(), Update("a", commit=False), Gradient2(), Update("b"))
        },
    )
    with anyio.CancelScope() as scope:
        hook.scope = scope
        await learner.fit(1)
    assert scope.cancelled_caught
    # The fourth batch (its first update's writes) is whole and committed, and is the last.
    assert learner.state.step == 4
