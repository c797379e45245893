"""Batch stages of one's own that write the weights or draw random numbers, interrupted.

* A stage that perturbs the weights and a later one that puts them back (sharpness-aware
  minimization's two passes) in an awaited batch: a cancellation asked for between the two lands
  once the batch is whole, as for an update with ``commit=False``; it used to undo the batch with
  the weights still perturbed, so fit again trained from other weights.
* A stage of its own that stops the fit after another drew random numbers (gradient noise) in a
  batch with no hooks: the stopped batch runs again drawing the same numbers.
* A stage that leaves gradients in ``.grad`` for the next batch is warned about once: the
  learner drops all of ``.grad`` when a batch is skipped, stopped or interrupted.
* ``fusable = True`` on a stage that awaits something: in the compute worker thread the event
  loop library's own error gets a note saying what to change.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest
import torch

from aiolearner import (
    Callback,
    ComputeStage,
    FitBatch,
    Gradient,
    Learner,
    State,
    StateView,
    StopFit,
    Update,
)
from aiolearner.testing import make_batches, tiny_model

LOSS = torch.nn.functional.cross_entropy
AT = 5  # the step at which the batch is interrupted (epoch 2's second batch)


def learner_with(fit_batch: FitBatch, batches: int = 4, **options: Any) -> Learner[Any]:
    model = tiny_model(seed=0)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        LOSS,
        make_batches(batches),
        stages={"fit_batch": fit_batch},
        **options,
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


class Perturb(ComputeStage):
    """Sharpness-aware minimization's ascent: the weights move along their gradient."""

    writes_weights = True
    fields: ClassVar[dict[str, str]] = {"eps": "batch"}

    def compute(self, state: State) -> None:
        eps = [0.05 * p.grad for p in state.model.parameters()]  # type: ignore[operator]
        with torch.no_grad():
            for p, e in zip(state.model.parameters(), eps, strict=True):
                p.add_(e)
        state.eps = eps
        state.optimizer.zero_grad(set_to_none=True)


class SecondGradient(ComputeStage):
    def compute(self, state: State) -> None:
        x, y = state.batch
        state.loss_fn(state.train_model(x), y).backward()  # type: ignore[no-untyped-call]


class Restore(ComputeStage):
    writes_weights = True

    def compute(self, state: State) -> None:
        with torch.no_grad():
            for p, e in zip(state.model.parameters(), state.eps, strict=True):
                p.sub_(e)


class CancelBetween(Callback):
    """An async hook between the perturbation and its restoration that cancels the run once."""

    reads = frozenset({"step"})

    def __init__(self, scope: anyio.CancelScope | None) -> None:
        self.scope = scope

    async def cancel(self, state: StateView) -> None:
        if self.scope is not None and state.step == AT:
            self.scope.cancel()
            self.scope = None
            await anyio.lowlevel.checkpoint()


class BeforeSecondGradient(CancelBetween):
    async def before_second_gradient(self, state: StateView) -> None:
        await self.cancel(state)


class BeforeRestore(CancelBetween):
    async def before_restore(self, state: StateView) -> None:
        await self.cancel(state)


HOOKS = {"before_second_gradient": BeforeSecondGradient, "before_restore": BeforeRestore}


def sam_learner(callbacks: list[Callback], compute: str) -> Learner[Any]:
    sam = FitBatch(Gradient(), Perturb(), SecondGradient(), Restore(), Update())
    return learner_with(sam, callbacks=callbacks, compute=compute)


@pytest.mark.parametrize("hook", ["before_second_gradient", "before_restore"])
@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_cancellation_between_a_perturbation_and_its_restoration_waits_for_both(
    hook: str, compute: str
) -> None:
    reference = sam_learner([HOOKS[hook](None)], compute)
    await reference.fit(3)

    with anyio.CancelScope() as scope:
        learner = sam_learner([HOOKS[hook](scope)], compute)
        await learner.fit(3)
    assert scope.cancelled_caught
    assert AT < learner.state.step < 12  # the batch finished, the run stopped after it
    await learner.fit(3)
    assert learner.state.step == 12
    assert same_weights(learner.model, reference.model)


class GradNoise(ComputeStage):
    def compute(self, state: State) -> None:
        for p in state.model.parameters():
            assert p.grad is not None
            p.grad.add_(torch.randn_like(p.grad), alpha=1e-2)


class StopOnce(ComputeStage):
    """A stage of one's own that stops the fit (say, on a gradient norm that explodes)."""

    def __init__(self, armed: bool) -> None:
        super().__init__()
        self.armed = armed

    def compute(self, state: State) -> None:
        if self.armed and state.step == AT:
            self.armed = False
            raise StopFit("the gradient exploded")


def noise_learner(armed: bool) -> Learner[Any]:
    torch.manual_seed(0)
    return learner_with(FitBatch(Gradient(), GradNoise(), StopOnce(armed), Update()))


async def test_a_stage_stopping_after_another_drew_noise_is_repeated_with_the_same_noise() -> None:
    reference = noise_learner(armed=False)
    await reference.fit(3)
    learner = noise_learner(armed=True)
    await learner.fit(3)
    assert learner.state.step == AT  # the stopping batch is undone
    await learner.fit(3)
    assert same_weights(learner.model, reference.model)


class StepEveryOther(ComputeStage):
    """Accumulates over two batches in ``.grad``: steps every second batch, commits each."""

    name = "update"
    writes_weights = True

    def compute(self, state: State) -> None:
        if state.batch_index % 2 == 1:
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
        self.context.commit(state)


async def test_gradients_left_for_the_next_batch_are_warned_about_once() -> None:
    learner = learner_with(FitBatch(Gradient(), StepEveryOther()))
    with pytest.warns(UserWarning, match=r"leaves gradients in `\.grad`.*AccumulateGradients"):
        await learner.fit(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await learner.fit(2)  # once a learner


async def test_no_warning_for_gradients_of_parameters_no_update_of_the_batch_steps() -> None:
    # Two optimizers, the batch steps "g" only: "d"'s parameters keep their gradients (nothing
    # steps them), which is no reason to warn; nor is the default step.
    model: Any = tiny_model(seed=0)  # Linear, ReLU, Linear
    learner: Learner[Any] = Learner(
        model,
        {
            "g": torch.optim.SGD(model[0].parameters(), lr=0.1),
            "d": torch.optim.SGD(model[2].parameters(), lr=0.0),
        },
        LOSS,
        make_batches(4),
        stages={"fit_batch": FitBatch(Gradient(), Update("g"))},
    )
    plain = learner_with(FitBatch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await learner.fit(2)
        await plain.fit(2)
    assert model[2].weight.grad is not None


class AwaitsAnyway(FitBatch):
    fusable = True  # but its run awaits more than its sub-stages

    async def run(self, state: State) -> None:
        # Off the event loop this call fails at once (a sleep of 0 is served differently).
        await anyio.sleep(0.001)
        await super().run(state)


async def test_a_fusable_stage_that_awaits_in_the_worker_thread_gets_a_note() -> None:
    learner = learner_with(AwaitsAnyway(), 2, compute="thread")
    with pytest.raises(RuntimeError) as caught:
        await learner.fit(1)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "ran in the compute worker thread" in notes
    assert "fusable = False" in notes
