from __future__ import annotations

import pytest
import torch

from aiolearner import Callback, StateView
from aiolearner.callbacks import GradientClipping, MixedPrecision
from aiolearner.testing import make_learner


class Dtypes(Callback):
    reads = frozenset({"output", "loss", "grad_scaler"})

    def __init__(self) -> None:
        self.train: list[torch.dtype] = []
        self.val: list[torch.dtype] = []
        self.scalers: list[object] = []

    def after_gradient(self, state: StateView) -> None:
        self.train.append(state.output.dtype)
        self.scalers.append(state.grad_scaler)

    def after_validate_loss(self, state: StateView) -> None:
        self.val.append(state.output.dtype)


async def test_bf16_autocast_on_cpu_trains_and_validates() -> None:
    amp = MixedPrecision("bf16")
    seen = Dtypes()
    learner = make_learner(callbacks=[amp, seen], stages=amp.stages(), n_batches=3)
    before = [p.detach().clone() for p in learner.model.parameters()]
    await learner.fit(2)
    assert seen.train == [torch.bfloat16] * 6
    assert seen.val == [torch.bfloat16] * 4
    assert seen.scalers == [None] * 6
    # Weights stay float32 and do change.
    for old, new in zip(before, learner.model.parameters(), strict=True):
        assert new.dtype == torch.float32
        assert not torch.equal(old, new)
    assert torch.isfinite(torch.tensor(learner.state.metrics["val_loss"]))
    assert amp.state_dict() == {"scaler": None}


async def test_fp16_scaler_skips_overflowing_steps_and_is_checkpointed() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    amp = MixedPrecision("fp16", scaler=scaler, validate=False)
    seen = Dtypes()
    learner = make_learner(
        callbacks=[amp, seen], stages=amp.stages(), n_batches=1, with_validation=False
    )
    before = [p.detach().clone() for p in learner.model.parameters()]
    await learner.fit(1)
    assert seen.train == [torch.float16]
    assert seen.scalers == [scaler]
    # 2**40 times the loss overflows float16 gradients: the step is skipped, the scale lowered.
    for old, new in zip(before, learner.model.parameters(), strict=True):
        assert torch.equal(old, new)
    assert scaler.get_scale() == 2.0**39
    assert learner.state.step == 1

    saved = learner.state_dict()["callbacks"]["MixedPrecision"]
    restored = MixedPrecision("fp16")
    restored.load_state_dict(saved)
    assert restored.resolve(torch.device("cpu"))[1] is not None
    assert restored.scaler is not None
    assert restored.scaler.get_scale() == 2.0**39


async def test_fp16_clipping_unscales_first() -> None:
    amp = MixedPrecision("fp16", validate=False)
    norms: list[float] = []

    class Probe(Callback):
        reads = frozenset({"optimizer"})
        after = (GradientClipping,)

        def before_update(self, state: StateView) -> None:
            grads = [p.grad for g in state.optimizer.param_groups for p in g["params"]]
            norms.append(float(torch.cat([g.flatten() for g in grads if g is not None]).norm()))

    learner = make_learner(
        callbacks=[amp, GradientClipping(0.01), Probe()],
        stages=amp.stages(),
        n_batches=2,
        with_validation=False,
    )
    await learner.fit(1)
    assert norms == pytest.approx([0.01, 0.01], rel=1e-3)


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match="bf16"):
        MixedPrecision("fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        MixedPrecision(torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_fp16_on_cuda() -> None:  # pragma: no cover - no GPU in CI
    amp = MixedPrecision("fp16")
    seen = Dtypes()
    learner = make_learner(callbacks=[amp, seen], stages=amp.stages(), device="cuda")
    await learner.fit(1)
    assert seen.train[0] == torch.float16
    assert amp.scaler is not None
