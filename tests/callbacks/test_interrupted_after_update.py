"""A batch interrupted after its update (a stop or a cancellation in ``after_update``) is done:
it counts, the schedule steps for it, and the epoch's training metrics see it; an epoch resumed
in an ``after_fit`` its callbacks had begun keeps the metrics they wrote. Fit again, and a fresh
learner resumed from the file written there, equal the uninterrupted run: weights, learning
rates and the epochs' metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from aiolearner import Callback, Learner, StateView, StopEpoch, StopFit
from aiolearner.callbacks import EMA, Checkpoint, LRSchedule, Metrics
from aiolearner.testing import make_learner

STEP = 7  # the update interrupted (of 5 batches an epoch: the second epoch's second)


class Interrupt(Callback):
    """In the ``hook`` of step STEP (``after_update``) or epoch 1 (``after_fit``): a StopFit
    from a ``def`` hook, or a cancellation of ``scope`` from an ``async def`` one."""

    reads = frozenset({"step", "epoch"})

    def __init__(self, hook: str, how: str, scope: anyio.CancelScope | None) -> None:
        self.hook, self.how, self.scope, self.done = (
            hook,
            how,
            scope,
            scope is None and how != "stop",
        )

    def _due(self, state: StateView, hook: str) -> bool:
        if self.done or hook != self.hook:
            return False
        due = bool(state.step == STEP if hook == "after_update" else state.epoch == 1)
        self.done = due
        return due

    def hooks(self) -> Any:
        hook = self.hook
        if self.how == "stop":

            def stop(state: StateView) -> None:
                if self._due(state, hook):
                    raise StopFit("interrupted")

            yield hook, stop
        else:

            async def cancel(state: StateView) -> None:
                if self._due(state, hook) and self.scope is not None:
                    self.scope.cancel()
                    await anyio.lowlevel.checkpoint()

            yield hook, cancel


class Rows(Callback):
    """Each epoch's training metrics and each update's learning rate (read before it)."""

    reads = frozenset({"metrics", "optimizer"})

    def __init__(self) -> None:
        self.epochs: list[tuple[float, float]] = []
        self.rates: list[float] = []

    def before_update(self, state: StateView) -> None:
        self.rates.append(state.optimizer.param_groups[0]["lr"])

    def after_epoch(self, state: StateView) -> None:
        self.epochs.append((state.metrics["train_loss"], state.metrics["train_accuracy"]))


def build(directory: Path, *extra: Callback) -> tuple[Learner[Any], Rows]:
    rows = Rows()
    ema = EMA(0.5)
    learner = make_learner(
        n_batches=5,
        callbacks=[
            *extra,
            Metrics(["accuracy", "loss"]),
            LRSchedule(lambda opt: LambdaLR(opt, lambda t: 0.9**t)),
            ema,
            rows,
            Checkpoint(directory),
        ],
        stages=ema.stages(),
    )
    return learner, rows


def same_weights(a: Learner[Any], b: Learner[Any]) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True)
    )


@pytest.mark.parametrize("hook", ["after_update", "after_fit"])
@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_fit_again_and_resume_after_an_interruption_after_the_update_are_exact(
    tmp_path: Path, hook: str, how: str
) -> None:
    reference, expected = build(tmp_path / "reference")
    await reference.fit(3)
    with anyio.CancelScope() as scope:
        learner, rows = build(tmp_path / "run", Interrupt(hook, how, scope))
        await learner.fit(3)
    resumed, rows_resumed = build(tmp_path / "run")
    await resumed.fit(3, resume="last")
    await learner.fit(3)
    assert same_weights(learner, reference)
    assert same_weights(resumed, reference)
    assert rows.rates == expected.rates
    assert rows.rates[-len(rows_resumed.rates) :] == rows_resumed.rates
    assert rows.epochs == expected.epochs
    assert rows_resumed.epochs == expected.epochs[-len(rows_resumed.epochs) :]


class StopAtStep(Callback):
    """An early stop judged in ``after_fit_batch`` of step STEP (once)."""

    reads = frozenset({"step"})

    def __init__(self) -> None:
        self.asked = False

    def after_fit_batch(self, state: StateView) -> None:
        if state.step == STEP and not self.asked:
            self.asked = True
            raise StopFit("early stop")


class StopEpochAfterUpdate(Callback):
    reads = frozenset({"step"})

    def after_update(self, state: StateView) -> None:
        if state.step == STEP:
            raise StopEpoch


@pytest.mark.parametrize("how", ["cancel", "stop_epoch"])
async def test_a_stop_raised_by_the_after_fit_batch_of_an_interrupted_batch_is_kept(
    how: str,
) -> None:
    """The batch's after_fit_batch runs for it and asks to stop: under a StopEpoch the stronger
    StopFit acts; under a cancellation the next fit ends there, as the uninterrupted run did."""
    reference = make_learner(n_batches=5, callbacks=[StopAtStep()])
    await reference.fit(3)
    assert (reference.state.epoch, reference.state.step) == (1, STEP)
    with anyio.CancelScope() as scope:
        first = (
            Interrupt("after_update", "cancel", scope)
            if how == "cancel"
            else StopEpochAfterUpdate()
        )
        learner = make_learner(n_batches=5, callbacks=[first, StopAtStep()])
        await learner.fit(3)
    if how == "cancel":
        assert scope.cancelled_caught
        await learner.fit(3)
    assert (learner.state.epoch, learner.state.step) == (1, STEP)
    assert learner.state.stop_reason == "early stop"
    assert same_weights(learner, reference)


class HangsAtStep(Callback):
    """An ``after_fit_batch`` that never returns for step STEP (it awaits an event nobody sets)."""

    reads = frozenset({"step"})

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def after_fit_batch(self, state: StateView) -> None:
        self.seen.append(state.step)
        if state.step == STEP:
            await anyio.Event().wait()


async def test_the_after_fit_batch_of_a_cancelled_batch_is_bounded_by_teardown_timeout() -> None:
    hangs = HangsAtStep()
    with anyio.fail_after(60):  # (a guard: without the bound the cancellation never lands)
        with anyio.CancelScope() as scope:
            interrupt = Interrupt("after_update", "cancel", scope)
            learner = make_learner(n_batches=5, callbacks=[interrupt, hangs], teardown_timeout=0.2)
            await learner.fit(3)
    assert scope.cancelled_caught
    assert learner.state.step == STEP
    assert hangs.seen[-1] == STEP  # it ran for the interrupted batch, and was abandoned
