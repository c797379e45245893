"""The practices' states survive a checkpoint file: interrupted + resumed == uninterrupted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from aiolearner import Callback, Learner, StateView, StopFit
from aiolearner.callbacks import (
    EMA,
    AccumulateGradients,
    EarlyStopping,
    GradientClipping,
    Metrics,
    MixedPrecision,
    OneCycle,
    TimeLimit,
)
from aiolearner.testing import make_batches, make_learner


class Pause(Callback):
    """Stops the run once, after a given step."""

    reads = frozenset({"step"})

    def __init__(self, at: int | None) -> None:
        self.at = at

    def after_fit_batch(self, state: StateView) -> None:
        if state.step == self.at:
            self.at = None
            raise StopFit("pause")


def _build(
    pause_at: int | None, compute: str = "auto"
) -> tuple[Learner[Any], EMA, OneCycle, MixedPrecision]:
    amp = MixedPrecision("bf16")
    ema = EMA(0.8)
    accumulate = AccumulateGradients(2)
    schedule = OneCycle(0.5, total_steps=9)
    callbacks = [
        Metrics(["accuracy", "loss"]),
        schedule,
        GradientClipping(1.0),
        amp,
        ema,
        EarlyStopping("val_loss", patience=10),
        TimeLimit(1e9),
        Pause(pause_at),
        accumulate.checkpoint_callback(),  # the gradients of a group in progress
    ]
    learner = make_learner(
        callbacks=callbacks,
        train_data=make_batches(6, seed=3),
        stages={"fit": accumulate, **amp.stages(), **ema.stages()},
        compute=compute,
    )
    return learner, ema, schedule, amp


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_interrupted_and_resumed_from_a_file_equals_uninterrupted(
    tmp_path: Path, compute: str
) -> None:
    whole, whole_ema, whole_schedule, _ = _build(None, compute)
    await whole.fit(3)

    first, _, _, _ = _build(9, compute)  # mid-epoch 1, inside an accumulation group
    await first.fit(3)
    assert first.state.step == 9
    path = tmp_path / "checkpoint.pt"
    torch.save(first.state_dict(), path)

    resumed, ema, schedule, _ = _build(None, compute)
    resumed.load_checkpoint(path)  # torch.load(weights_only=True)
    await resumed.fit(3)

    assert resumed.state.step == whole.state.step == 18
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert whole_ema.model is not None
    assert ema.model is not None
    for a, b in zip(whole_ema.model.parameters(), ema.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert schedule.last_lr == whole_schedule.last_lr
    for key in ("train_accuracy", "train_loss", "val_accuracy", "val_ema_loss"):
        assert resumed.state.metrics[key] == whole.state.metrics[key], key
