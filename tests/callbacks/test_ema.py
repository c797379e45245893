from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from aiolearner import Callback, ConfigurationError, StateView
from aiolearner.callbacks import EMA, Metrics, accuracy
from aiolearner.testing import make_batches, make_learner


class Weights(Callback):
    """The model's weights after every update."""

    reads = frozenset({"model"})

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def after_update(self, state: StateView) -> None:
        self.seen.append([p.detach().clone() for p in state.model.parameters()])


def _loss_and_accuracy(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, float]:
    n = sum(len(y) for _, y in batches)
    with torch.no_grad():
        loss = sum(
            float(torch.nn.functional.cross_entropy(model(x), y)) * len(y) for x, y in batches
        )
        acc = sum(float(accuracy(model(x), y)) * len(y) for x, y in batches)
    return loss / n, acc / n


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_average_follows_the_formula(compute: str) -> None:
    ema = EMA(0.9)
    weights = Weights()
    learner = make_learner(
        callbacks=[ema, weights], n_batches=3, with_validation=False, compute=compute
    )
    expected = [p.detach().clone() for p in learner.model.parameters()]
    await learner.fit(2)
    for step in weights.seen:
        expected = [0.9 * e + 0.1 * w for e, w in zip(expected, step, strict=True)]
    assert ema.model is not None
    assert ema.updates == 6
    for e, got in zip(expected, ema.model.parameters(), strict=True):
        torch.testing.assert_close(got, e)
        assert not got.requires_grad
    # The average differs from the trained weights.
    assert not torch.equal(next(iter(ema.model.parameters())), weights.seen[-1][0])


async def test_warmup_and_every_n_steps() -> None:
    ema = EMA(0.999, warmup=True, every_n_steps=2)
    learner = make_learner(callbacks=[ema], n_batches=4, with_validation=False)
    assert ema.current_decay() == pytest.approx(0.1)
    await learner.fit(1)
    assert ema.updates == 2
    assert ema.current_decay() == pytest.approx(3 / 12)


@pytest.mark.parametrize(("batches", "group", "every", "updates"), [(8, 2, 2, 4), (10, 4, 3, 2)])
async def test_every_n_steps_counts_optimizer_steps_under_accumulation(
    batches: int, group: int, every: int, updates: int
) -> None:
    """10 micro-batches in groups of 4 are 6 optimizer steps over two epochs (the last group
    of each is short): every 3rd is 2 updates of the average (counting micro-batches, whose
    count the short groups shift, gave 1)."""
    from aiolearner.callbacks import AccumulateGradients

    ema = EMA(0.5, every_n_steps=every)
    learner = make_learner(
        callbacks=[ema],
        stages={"fit": AccumulateGradients(group)},
        n_batches=batches,
        with_validation=False,
    )
    await learner.fit(2)
    assert ema.steps == 2 * -(-batches // group)
    assert ema.updates == updates
    assert dict(ema.state_dict())["steps"] == ema.steps


async def test_validating_both_models() -> None:
    val = make_batches(3, batch_size=4, seed=11)
    ema = EMA(0.5, metrics=["accuracy"])
    metrics = Metrics(["accuracy"])
    learner = make_learner(callbacks=[metrics, ema], stages=ema.stages(), val_data=val, n_batches=3)
    await learner.fit(2)
    assert ema.model is not None
    raw_loss, raw_acc = _loss_and_accuracy(learner.model, val)
    ema_loss, ema_acc = _loss_and_accuracy(ema.model, val)
    v = learner.state.validation
    assert v["loss"] == pytest.approx(raw_loss, rel=1e-5)
    assert v["accuracy"] == pytest.approx(raw_acc)
    assert v["ema_loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert v["ema_accuracy"] == pytest.approx(ema_acc)
    assert learner.state.metrics["val_ema_loss"] == v["ema_loss"]
    assert ema_loss != pytest.approx(raw_loss)


async def test_validating_the_average_only() -> None:
    val = make_batches(2, batch_size=4, seed=11)
    ema = EMA(0.5)
    learner = make_learner(
        callbacks=[ema], stages=ema.stages(validate="ema"), val_data=val, n_batches=3
    )
    await learner.fit(1)
    assert ema.model is not None
    ema_loss, _ = _loss_and_accuracy(ema.model, val)
    assert learner.state.metrics["val_loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert "val_ema_loss" not in learner.state.metrics
    with pytest.raises(ValueError, match="both"):
        ema.stages(validate="raw")  # type: ignore[arg-type]


@pytest.mark.parametrize("validate", ["both", "ema"])
async def test_the_averages_stages_without_the_callback_are_refused(validate: Any) -> None:
    """Nothing would update the average: the validation would use the first weights."""
    ema = EMA(0.5)
    learner = make_learner(
        stages=ema.stages(validate=validate), val_data=make_batches(2, seed=11), n_batches=3
    )
    with pytest.RaisesGroup(
        pytest.RaisesExc(ConfigurationError, match=r"not in its callbacks.*callbacks=\[ema"),
        flatten_subgroups=True,
        allow_unwrapped=True,
    ):
        await learner.fit(1)
    with pytest.RaisesGroup(
        pytest.RaisesExc(ConfigurationError, match="EMA callback is not in its callbacks"),
        flatten_subgroups=True,
        allow_unwrapped=True,
    ):
        await learner.validate()


async def test_average_is_checkpointed() -> None:
    ema = EMA(0.9)
    learner = make_learner(callbacks=[ema], n_batches=2, with_validation=False)
    await learner.fit(1)
    checkpoint = learner.state_dict()
    again = EMA(0.9)
    fresh = make_learner(callbacks=[again], n_batches=2, with_validation=False)
    fresh.load_state_dict(checkpoint)
    assert again.updates == 2
    assert ema.model is not None
    restored = again.ensure(fresh.model)
    for a, b in zip(ema.model.parameters(), restored.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # Continuing both runs keeps them equal.
    await learner.fit(2)
    await fresh.fit(2)
    for a, b in zip(ema.model.parameters(), restored.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="decay"):
        EMA(1.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        EMA(every_n_steps=0)
    with pytest.raises(ValueError, match=r"named 'loss' .* \(ema_loss, val_ema_loss\)"):
        EMA(metrics={"loss": "accuracy"})
    EMA(metrics=["loss", "accuracy"])  # the average's loss itself


@pytest.mark.parametrize("mode", ["both", "ema"])
async def test_concurrent_validation_of_the_average(mode: str) -> None:
    ema = EMA(0.5)
    seen: list[torch.nn.Module] = []

    class WhichModel(Callback):
        reads = frozenset({"model"})

        def after_validate_loss(self, state: StateView) -> None:
            seen.append(ema.for_validation(state.model))

    learner = make_learner(
        callbacks=[ema, WhichModel()],
        stages=ema.stages(validate=mode),  # type: ignore[arg-type]
        n_batches=3,
        validate="concurrent",
    )
    await learner.fit(2)
    key = "val_ema_loss" if mode == "both" else "val_loss"
    assert math.isfinite(learner.state.metrics[key])
    # Each pass validated a copy of the average, not the average training keeps updating.
    assert len(seen) == 4  # 2 passes of 2 batches
    assert all(m is not ema.model for m in seen)


@pytest.mark.parametrize("warmup", [False, True])
async def test_average_equals_torchs_averaged_model_to_the_bit(warmup: bool) -> None:
    """The reference: torch.optim.swa_utils.AveragedModel with torch's EMA update function."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = EMA(0.9, warmup=warmup)
    weights = Weights()
    learner = make_learner(callbacks=[ema, weights], n_batches=3, with_validation=False)
    scratch = copy.deepcopy(learner.model)
    reference = AveragedModel(scratch, use_buffers=False)
    reference.update_parameters(scratch)  # the first update copies: the initial weights
    await learner.fit(2)
    for n, step in enumerate(weights.seen):
        decay = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        reference.multi_avg_fn = get_ema_multi_avg_fn(decay)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            for p, w in zip(scratch.parameters(), step, strict=True):
                p.copy_(w)
        reference.update_parameters(scratch)
    assert ema.model is not None
    for got, want in zip(ema.model.parameters(), reference.module.parameters(), strict=True):
        assert torch.equal(got, want)


def test_ema_uses_no_private_torch_call() -> None:
    import inspect

    from aiolearner.callbacks import _ema

    assert "torch._" not in inspect.getsource(_ema)


def _two_optimizers(model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    return {
        "body": torch.optim.SGD(model[0].parameters(), lr=0.1),  # type: ignore[index]
        "head": torch.optim.SGD(model[2].parameters(), lr=0.1),  # type: ignore[index]
    }


async def test_ema_follows_the_update_that_completes_the_step_of_several_optimizers() -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from aiolearner import FitBatch, Gradient, Learner, Update
    from aiolearner.testing import tiny_model

    ema = EMA(0.8, optimizer="head")
    assert ema.name == "EMA[head]"
    model = tiny_model()
    learner: Learner[Any] = Learner(
        model,
        _two_optimizers(model),
        torch.nn.functional.cross_entropy,
        make_batches(4),
        callbacks=[ema],
        stages={"fit_batch": FitBatch(Gradient(), Update("body", commit=False), Update("head"))},
    )
    await learner.fit(1)

    hand = tiny_model()
    optimizers = _two_optimizers(hand)
    avg_fn = get_ema_multi_avg_fn(0.8)  # type: ignore[no-untyped-call]
    average = AveragedModel(hand, multi_avg_fn=avg_fn, use_buffers=False)
    average.update_parameters(hand)
    for x, y in make_batches(4):
        torch.nn.functional.cross_entropy(hand(x), y).backward()  # type: ignore[no-untyped-call]
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        average.update_parameters(hand)
    assert ema.model is not None
    assert all(
        torch.equal(a, b)
        for a, b in zip(ema.model.parameters(), average.module.parameters(), strict=True)
    )
