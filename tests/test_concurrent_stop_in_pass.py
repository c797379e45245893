"""A ``StopFit`` from inside a concurrent validation's pass, landing after the next epoch's
training pass: that epoch's validation is not lost.

With ``validate="concurrent"`` (one snapshot slot, the default), epoch 0's validation runs while
epoch 1 trains. Here a callback holds epoch 0's validation until epoch 1's training pass is
over, then stops the fit from inside that pass (``before_validate`` or a validation batch).
Epoch 1 has trained and counts; its validation must still come, in the next run, as in the
uninterrupted one: fit again, or a fresh learner from ``state_dict()``, ends with the same
validation and epoch records, the same metrics and the same weights. (Epoch 1's validation was
dropped, and its record held epoch 0's ``val_loss``.)
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Callback, Learner, StateView, StopFit
from aiolearner.callbacks import Recorder
from aiolearner.testing import make_batches, tiny_model

EPOCHS = 4


class Rows(Callback):
    """What each validation and each epoch's end saw."""

    reads = frozenset({"metrics", "epoch", "step", "validation", "validation_tag"})

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def after_validate(self, state: StateView) -> None:
        self.rows.append(("V", state.epoch, state.step, state.validation_tag, state.validation))

    def after_epoch(self, state: StateView) -> None:
        self.rows.append(("E", state.epoch, state.step, state.metrics["val_loss"]))


class HoldThenStop(Callback):
    """Holds epoch 0's validation until epoch 1's training pass has ended, then raises
    StopFit in ``hook`` (once)."""

    reads = frozenset({"epoch"})

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.passed = anyio.Event()
        self.fired = False

    def hooks(self) -> Any:
        yield "after_fit", self._passed
        yield self.hook, self._stop

    def _passed(self, state: StateView) -> None:
        if state.epoch == 1:
            self.passed.set()

    async def _stop(self, state: StateView) -> None:
        if not self.fired and state.epoch == 0:
            self.fired = True
            await self.passed.wait()
            raise StopFit("stopped from inside the validation pass")


def shuffled(batches: list[tuple[torch.Tensor, torch.Tensor]], size: int) -> DataLoader[Any]:
    inputs, targets = (torch.cat(parts) for parts in zip(*batches, strict=True))
    return DataLoader(TensorDataset(inputs, targets), batch_size=size, shuffle=True)


def make(*extra: Callback, data: str = "lists") -> tuple[Learner[Any], Rows, Recorder]:
    torch.manual_seed(0)
    model = tiny_model(4, 3)
    if data == "loaders":  # shuffling DataLoaders, and dropout: any draw out of place shows
        model = torch.nn.Sequential(torch.nn.Dropout(0.2), model)
    rows, recorder = Rows(), Recorder()
    train = make_batches(5, batch_size=8, n_out=3, seed=1)
    val = make_batches(3, batch_size=7, n_out=3, seed=2)
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        shuffled(train, 8) if data == "loaders" else train,
        shuffled(val, 7) if data == "loaders" else val,
        callbacks=[rows, recorder, *extra],
        validate="concurrent",
    )
    return learner, rows, recorder


def weights(learner: Learner[Any]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.model.state_dict().items()}


@pytest.mark.parametrize("data", ["lists", "loaders"])
@pytest.mark.parametrize("hook", ["before_validate", "after_validate_batch"])
@pytest.mark.parametrize("then", ["fit again", "fresh learner"])
async def test_the_epoch_trained_meanwhile_is_validated_by_the_next_run(
    hook: str, then: str, data: str
) -> None:
    reference, ref_rows, ref_recorder = make(data=data)
    await reference.fit(EPOCHS)

    learner, rows, recorder = make(HoldThenStop(hook), data=data)
    await learner.fit(EPOCHS)
    # Epoch 1 trained during epoch 0's validation: it counts; neither was validated yet.
    assert (learner.state.epoch, learner.state.step) == (2, 10)
    assert learner.state.stop_reason == "stopped from inside the validation pass"
    assert rows.rows == []
    if then == "fresh learner":
        saved = learner.state_dict()
        learner, rows, recorder = make(data=data)
        learner.load_state_dict(saved)
    await learner.fit(EPOCHS)

    assert [row[:4] for row in rows.rows] == [row[:4] for row in ref_rows.rows]
    assert rows.rows == ref_rows.rows
    assert recorder.history["epochs"] == ref_recorder.history["epochs"]
    assert learner.state.metrics == reference.state.metrics
    expected = weights(reference)
    assert all(torch.equal(v, expected[k]) for k, v in weights(learner).items())
    # The slot taken beyond max_snapshots was for that tail only.
    validator = learner._rt.validator
    assert validator is not None
    assert len(validator.shadow_models) == 1


@pytest.mark.parametrize("hook", ["after_validate", "after_epoch"])
async def test_a_stop_request_from_the_tail_counts_that_epoch_without_a_validation(
    hook: str,
) -> None:
    """From after_validate or after_epoch the StopFit is a stop request: the epoch that trained
    meanwhile counts, its after_epoch runs with the latest results (epoch 0's), and fit again
    goes on from there with the same weights (docs/errors.md)."""
    reference, ref_rows, _ = make()
    await reference.fit(EPOCHS)

    learner, rows, _ = make(HoldThenStop(hook))
    await learner.fit(EPOCHS)
    assert (learner.state.epoch, learner.state.step) == (2, 10)
    await learner.fit(EPOCHS)

    expected = [row for row in ref_rows.rows if row[:2] != ("V", 1)]
    epoch_1 = next(i for i, row in enumerate(expected) if row[:2] == ("E", 1))
    expected[epoch_1] = ("E", 1, 10, ref_rows.rows[0][4]["loss"])  # epoch 0's val_loss
    assert rows.rows == expected
    ref_weights = weights(reference)
    assert all(torch.equal(v, ref_weights[k]) for k, v in weights(learner).items())
