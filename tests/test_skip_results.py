"""A skipped batch is left out of the pass's results, however late in the batch it was skipped."""

from __future__ import annotations

import pytest
import torch

from aiolearner import Callback, SkipBatch, StateView
from aiolearner.testing import make_batches, make_learner


class SkipFirst(Callback):
    """Raises SkipBatch the first time :meth:`maybe_skip` is called."""

    def __init__(self) -> None:
        self.raised = False

    def maybe_skip(self) -> None:
        if not self.raised:
            self.raised = True
            raise SkipBatch("first")


class SkipAfterValidateLoss(SkipFirst):
    def after_validate_loss(self, state: StateView) -> None:
        self.maybe_skip()


class SkipAfterGradient(SkipFirst):
    def after_gradient(self, state: StateView) -> None:
        self.maybe_skip()


class SkipBeforeUpdate(SkipFirst):
    def before_update(self, state: StateView) -> None:
        self.maybe_skip()


async def test_validation_batch_skipped_after_its_loss_is_left_out() -> None:
    val = make_batches(2, seed=2)
    learner = make_learner(val_data=val, callbacks=[SkipAfterValidateLoss()])
    results = await learner.validate()
    x, y = val[1]
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(learner.model(x), y))
    assert results["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("skip", [SkipAfterGradient, SkipBeforeUpdate])
async def test_training_batch_skipped_after_its_loss_is_left_out_of_train_loss(
    skip: type[SkipFirst],
) -> None:
    data = make_batches(3, seed=1)
    skipped = make_learner(train_data=data, callbacks=[skip()], with_validation=False)
    await skipped.fit(1)
    without = make_learner(train_data=data[1:], with_validation=False)
    await without.fit(1)
    assert skipped.state.metrics["train_loss"] == pytest.approx(
        without.state.metrics["train_loss"], rel=1e-6
    )
    assert skipped.state.step == 3
