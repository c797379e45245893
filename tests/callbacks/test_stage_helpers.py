"""Callbacks whose work is done by stages of their own refuse a learner where no stage serves
them: given as a callback alone they would do nothing, silently (mixed precision would train in
full precision)."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from aiolearner import ConfigurationError, Gradient, State, Update
from aiolearner.callbacks import EMA, AccumulateGradients, MixedPrecision
from aiolearner.testing import make_learner


def test_mixed_precision_without_its_stages_is_refused() -> None:
    amp = MixedPrecision("bf16")
    with pytest.raises(ConfigurationError, match=r"MixedPrecision.*stages=amp\.stages\(\)"):
        make_learner(callbacks=[amp])
    learner = make_learner(callbacks=[amp], stages=amp.stages())
    outputs: list[torch.dtype] = []
    learner.model.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    learner.fit_sync(1)
    assert torch.bfloat16 in outputs


class OwnAutocastGradient(Gradient):
    """A gradient stage of the user's own that reaches the MixedPrecision by a closure."""

    name = "gradient"
    fields: ClassVar[dict[str, str]] = {"output": "batch", "loss": "batch", "grad_scaler": "batch"}

    def compute(self, state: State) -> None:
        inputs, targets = state.batch
        with AMP.autocast(state.device):
            state.output = state.model(inputs)
            state.loss = state.loss_fn(state.output, targets)
        AMP.backward(state.loss, state)


AMP = MixedPrecision("bf16")


def test_mixed_precision_used_by_a_stage_of_ones_own_is_accepted() -> None:
    learner = make_learner(callbacks=[AMP], stages={"gradient": OwnAutocastGradient()})
    learner.fit_sync(1)


def test_ema_metrics_without_its_validation_stages_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"EMA.*metrics=.*stages=ema\.stages\(\)"):
        make_learner(callbacks=[EMA(0.9, metrics=["accuracy"])])
    # The average alone needs no stage; with its stages, metrics are computed.
    make_learner(callbacks=[EMA(0.9)])
    ema = EMA(0.9, metrics=["accuracy"])
    learner = make_learner(callbacks=[ema], stages=ema.stages())
    learner.fit_sync(1)
    assert "val_ema_accuracy" in learner.state.metrics


def test_an_accumulation_checkpoint_callback_without_its_stage_is_refused() -> None:
    acc = AccumulateGradients(2)
    with pytest.raises(ConfigurationError, match=r"GroupGradients.*AccumulateGradients"):
        make_learner(callbacks=[acc.checkpoint_callback()])
    make_learner(callbacks=[acc.checkpoint_callback()], stages={"fit": acc})


def test_replacing_the_stage_that_served_a_callback_is_refused() -> None:
    amp = MixedPrecision("bf16", validate=False)
    learner = make_learner(callbacks=[amp], stages=amp.stages())
    learner.replace_stage("gradient", Gradient())  # the scaled update still uses it
    scaled = learner.stage("update")
    with pytest.raises(ConfigurationError, match="MixedPrecision"):
        learner.replace_stage("update", Update())
    assert learner.stage("update") is scaled  # the learner is as it was
    learner.fit_sync(1)
