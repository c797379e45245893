from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch

from aiolearner import Learner, LearnerBusyError
from aiolearner.callbacks import lr_find
from aiolearner.testing import make_batches


def build(seed: int = 0) -> Learner[Any]:
    """Adam (so the optimizer has state) on a model with dropout (so training uses the RNG)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Learner(model, opt, torch.nn.functional.cross_entropy, make_batches(8), None)


def everything(learner: Learner[Any]) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in learner.model.state_dict().items()},
        "optimizer": copy.deepcopy(learner.optimizer.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in learner.model.parameters()],
        "training": [m.training for m in learner.model.modules()],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(legacy=False)["state"]["key"].copy(),
        "python_rng": random.getstate(),
        "epoch": learner.state.epoch,
        "step": learner.state.step,
    }


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


async def test_leaves_model_optimizer_and_rng_exactly_as_they_were() -> None:
    learner = build()
    await learner.fit(1)  # the optimizer has state now
    learner.model.eval()
    before = everything(learner)
    result = await lr_find(learner, num_steps=30, end_lr=1.0)
    assert len(result.lrs) == len(result.losses) == 30
    assert_same(everything(learner), before)


async def test_training_after_lr_find_is_bit_identical_to_training_without() -> None:
    a, b = build(), build()
    state = torch.get_rng_state()
    await a.fit(1)
    torch.set_rng_state(state)
    await b.fit(1)
    assert_same(a.model.state_dict(), b.model.state_dict())
    state = torch.get_rng_state()
    await lr_find(a, num_steps=20)
    await a.fit(2)
    torch.set_rng_state(state)
    await b.fit(2)
    assert_same(a.model.state_dict(), b.model.state_dict())
    assert_same(a.optimizer.state_dict(), b.optimizer.state_dict())


async def test_learning_rates_grow_exponentially_and_a_suggestion_is_made() -> None:
    learner = build()
    result = await lr_find(learner, start_lr=1e-5, end_lr=1.0, num_steps=50, diverge=1e9)
    assert result.lrs[0] == pytest.approx(1e-5)
    assert result.lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:], strict=False)]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))
    assert not result.diverged
    assert result.suggestion is not None
    assert result.suggestion in result.lrs[5:-3]
    assert result.min_loss_lr is not None


async def test_stops_when_the_loss_diverges() -> None:
    learner = build()
    result = await lr_find(learner, start_lr=1e-3, end_lr=1e6, num_steps=200)
    assert result.diverged
    assert len(result.lrs) < 200


async def test_restores_even_when_cancelled() -> None:
    learner = build()
    before = everything(learner)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await lr_find(learner, num_steps=10)
    assert_same(everything(learner), before)


async def test_refuses_a_busy_learner_and_bad_arguments() -> None:
    learner = build()
    with pytest.raises(ValueError, match="start_lr"):
        await lr_find(learner, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="num_steps"):
        await lr_find(learner, num_steps=1)
    errors: list[BaseException] = []

    async def try_during_fit() -> None:
        try:
            await lr_find(learner)
        except LearnerBusyError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(learner.fit, 1)
        await anyio.lowlevel.checkpoint()
        tg.start_soon(try_during_fit)
    assert len(errors) == 1


def test_plot(tmp_path: Path) -> None:
    learner = build()
    result = anyio.run(lambda: lr_find(learner, num_steps=40))
    out = result.plot(tmp_path / "lr.png")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_suggestion_is_the_steepest_descent_before_the_minimum() -> None:
    from aiolearner.callbacks import LRFinderResult
    from aiolearner.callbacks._lr_finder import _suggest

    n = 100
    lrs = [1e-6 * 10 ** (7 * i / (n - 1)) for i in range(n)]
    # flat with wobbles, a steep fall from step 40 to 60, the minimum at 70, then divergence
    losses = [2.0 + 0.05 * (-1) ** i for i in range(40)]
    losses += [2.0 - 1.5 * (i - 39) / 21 for i in range(40, 61)]
    losses += [0.5 - 0.01 * (i - 60) for i in range(61, 71)]
    losses += [0.4 + 0.5 * (i - 70) for i in range(71, n)]
    result = LRFinderResult(lrs=lrs, losses=losses, raw_losses=losses)
    _suggest(result, skip_start=5, skip_end=3)
    assert result.min_loss_lr == lrs[70]
    assert result.suggestion is not None
    assert lrs[40] <= result.suggestion <= lrs[60]
