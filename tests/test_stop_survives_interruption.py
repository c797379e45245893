"""A StopFit from an epoch's after_validate ends the run once the epoch's after_epoch has run; a
cancellation in between (in after_validate, in after_epoch) must not lose it: fit again, or a
fresh learner loading the state dict, stops there too. Sequential and concurrent validation."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from aiolearner import Callback, Learner, StateView, StopFit
from aiolearner.testing import make_learner

EPOCHS = 6
STOP_EPOCH = 1  # the epoch whose validation asks to stop


class StopOnce(Callback):
    """Asks to stop in the after_validate of STOP_EPOCH (once: like an early stop, it is not
    asked again if it is lost)."""

    reads = frozenset({"epoch"})

    def after_validate(self, state: StateView) -> None:
        if state.epoch == STOP_EPOCH:
            raise StopFit("asked once")


class CancelAt(Callback):
    """Cancels ``scope`` from an async hook of STOP_EPOCH, and lets the cancellation land."""

    reads = frozenset({"epoch"})

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.scope: anyio.CancelScope | None = None

    async def _hit(self, state: StateView, hook: str) -> None:
        if hook == self.hook and self.scope is not None and state.epoch == STOP_EPOCH:
            self.scope.cancel()
            self.scope = None
            await anyio.lowlevel.checkpoint()

    async def after_validate(self, state: StateView) -> None:
        await self._hit(state, "after_validate")

    async def after_epoch(self, state: StateView) -> None:
        await self._hit(state, "after_epoch")


COMPUTES = pytest.mark.parametrize("compute", ["auto", "inline", "thread"])  # auto: the default


def build(mode: str, compute: str, *callbacks: Callback) -> Learner[Any]:
    return make_learner(
        callbacks=[StopOnce(), *callbacks], validate=mode, compute=compute, n_batches=3
    )


@COMPUTES
@pytest.mark.parametrize("hook", ["after_validate", "after_epoch"])
async def test_a_stop_asked_in_after_validate_survives_a_cancellation(
    hook: str, compute: str
) -> None:
    reference = build("sequential", compute)
    await reference.fit(EPOCHS)
    assert reference.state.epoch == STOP_EPOCH + 1
    assert reference.state.stop_reason == "asked once"

    cancel = CancelAt(hook)
    learner = build("sequential", compute, cancel)
    with anyio.CancelScope() as cancel.scope:
        await learner.fit(EPOCHS)
    assert learner.state.epoch == STOP_EPOCH  # interrupted in the epoch's tail
    saved = learner.state_dict()
    await learner.fit(EPOCHS)
    assert (learner.state.epoch, learner.state.step) == (STOP_EPOCH + 1, reference.state.step)
    assert learner.state.stop_reason == "asked once"

    fresh = build("sequential", compute, CancelAt(hook))
    fresh.load_state_dict(saved)
    await fresh.fit(EPOCHS)
    assert (fresh.state.epoch, fresh.state.step) == (STOP_EPOCH + 1, reference.state.step)
    assert fresh.state.stop_reason == "asked once"


@COMPUTES
@pytest.mark.parametrize("hook", ["after_validate", "after_epoch"])
async def test_a_concurrent_validations_stop_survives_a_cancellation(
    hook: str, compute: str
) -> None:
    # When the stop lands depends on how far training got meanwhile (at most one validation
    # period later, docs/concurrent-validation.md); that it lands does not.
    cancel = CancelAt(hook)
    learner = build("concurrent", compute, cancel)
    with anyio.CancelScope() as cancel.scope:
        await learner.fit(EPOCHS)
    assert learner.state.epoch < EPOCHS
    saved = learner.state_dict()
    await learner.fit(EPOCHS)
    assert learner.state.epoch <= STOP_EPOCH + 2
    assert learner.state.stop_reason == "asked once"

    fresh = build("concurrent", compute, CancelAt(hook))
    fresh.load_state_dict(saved)
    await fresh.fit(EPOCHS)
    assert fresh.state.epoch <= STOP_EPOCH + 2
    assert fresh.state.stop_reason == "asked once"


class CancelWithoutAwaiting(Callback):
    """Cancels ``scope`` from a ``def`` hook of STOP_EPOCH: the cancellation lands at the next
    await, which with these short epochs comes once the run has stopped (its teardown done)."""

    reads = frozenset({"epoch"})

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.scope: anyio.CancelScope | None = None

    def _hit(self, state: StateView, hook: str) -> None:
        if hook == self.hook and self.scope is not None and state.epoch == STOP_EPOCH:
            self.scope.cancel()
            self.scope = None

    def after_validate(self, state: StateView) -> None:
        self._hit(state, "after_validate")

    def after_epoch(self, state: StateView) -> None:
        self._hit(state, "after_epoch")


@COMPUTES
@pytest.mark.parametrize("hook", ["after_validate", "after_epoch"])
async def test_a_cancellation_landing_after_the_stop_keeps_it_for_fit_again(
    hook: str, compute: str
) -> None:
    """Wherever the cancellation lands, fit again (or a fresh learner loading the state dict)
    ends where the uninterrupted run ended, with its reason, and trains no further."""
    reference = build("sequential", compute)
    await reference.fit(EPOCHS)
    cancel = CancelWithoutAwaiting(hook)
    learner = build("sequential", compute, cancel)
    with anyio.CancelScope() as cancel.scope:
        await learner.fit(EPOCHS)
    saved = learner.state_dict()
    fresh = build("sequential", compute)
    fresh.load_state_dict(saved)
    for again in (learner, fresh):
        await again.fit(EPOCHS)
        assert (again.state.epoch, again.state.step) == (STOP_EPOCH + 1, reference.state.step)
        assert again.state.stop_reason == "asked once"
    await learner.fit(EPOCHS)  # a fit after the stop was seen trains on, as after any stop
    assert learner.state.epoch == EPOCHS
