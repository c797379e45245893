from __future__ import annotations

import math

import pytest
import torch

from aiolearner import Callback, StateView
from aiolearner.callbacks import AccumulateGradients, GradientClipping
from aiolearner.testing import make_batches, make_learner


def _concat(
    batches: list[tuple[torch.Tensor, torch.Tensor]], sizes: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    i = 0
    for n in sizes:
        group = batches[i : i + n]
        out.append((torch.cat([x for x, _ in group]), torch.cat([y for _, y in group])))
        i += n
    return out


class CountSteps(Callback):
    reads = frozenset({"step", "batch_index"})

    def __init__(self) -> None:
        self.updates: list[int] = []

    def after_update(self, state: StateView) -> None:
        self.updates.append(state.step)


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_accumulation_equals_the_big_batch(compute: str) -> None:
    micro = make_batches(6, batch_size=5, seed=4)
    counter = CountSteps()
    accumulated = make_learner(
        train_data=micro,
        with_validation=False,
        stages={"fit": AccumulateGradients(4)},
        callbacks=[counter],
        compute=compute,
    )
    await accumulated.fit(2)
    # Groups of 4 and 2 micro-batches (the epoch's leftover is applied at its end).
    big = make_learner(train_data=_concat(micro, [4, 2]), with_validation=False, compute=compute)
    await big.fit(2)
    for a, b in zip(accumulated.model.parameters(), big.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert accumulated.state.step == 12  # step counts micro-batches
    assert counter.updates == [4, 6, 10, 12]
    # And it really differs from stepping on every micro-batch.
    plain = make_learner(train_data=micro, with_validation=False)
    await plain.fit(2)
    assert not torch.allclose(
        next(iter(plain.model.parameters())), next(iter(big.model.parameters()))
    )


async def test_accumulation_resumes_mid_epoch_on_group_boundaries() -> None:
    from aiolearner import StopFit

    micro = make_batches(8, batch_size=5, seed=4)

    class Pause(Callback):
        reads = frozenset({"step"})

        def __init__(self, at: int) -> None:
            self.at = at

        def after_fit_batch(self, state: StateView) -> None:
            if state.step == self.at:
                raise StopFit("pause")

    whole = make_learner(
        train_data=micro, with_validation=False, stages={"fit": AccumulateGradients(2)}
    )
    await whole.fit(1)
    # Paused once on a group boundary and once inside a group (after micro-batch 6 of 8).
    parts = make_learner(
        train_data=micro,
        with_validation=False,
        stages={"fit": AccumulateGradients(2)},
        callbacks=[Pause(4), Pause(5)],
    )
    await parts.fit(1)
    assert parts.state.step == 4
    await parts.fit(1)
    assert parts.state.step == 5
    await parts.fit(1)
    assert parts.state.step == 8
    for a, b in zip(whole.model.parameters(), parts.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_accumulation_rejects_bad_every() -> None:
    with pytest.raises(ValueError, match="every"):
        AccumulateGradients(0)


class GradProbe(Callback):
    """Records gradients as the optimizer will see them (after the clipping callback)."""

    reads = frozenset({"optimizer"})
    after = (GradientClipping,)

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def before_update(self, state: StateView) -> None:
        grads = [p.grad.flatten() for g in state.optimizer.param_groups for p in g["params"]]
        self.grads.append(torch.cat(grads).clone())


async def test_clipping_by_norm_and_by_value() -> None:
    probe = GradProbe()
    clip = GradientClipping(max_norm=0.05)
    learner = make_learner(callbacks=[clip, probe], n_batches=3, lr=1.0, with_validation=False)
    await learner.fit(1)
    for g in probe.grads:
        assert float(g.norm()) == pytest.approx(0.05, rel=1e-4)
    assert clip.last_norm is not None
    assert float(clip.last_norm) > 0.05

    probe = GradProbe()
    learner = make_learner(
        callbacks=[GradientClipping(max_value=0.01, norm_type="inf"), probe],
        n_batches=2,
        with_validation=False,
    )
    await learner.fit(1)
    for g in probe.grads:
        assert float(g.abs().max()) <= 0.01 + 1e-7
        assert float(g.abs().max()) == pytest.approx(0.01)

    unclipped = GradProbe()
    learner = make_learner(
        callbacks=[GradientClipping(max_norm=1e6), unclipped], n_batches=1, with_validation=False
    )
    await learner.fit(1)
    assert float(unclipped.grads[0].norm()) < 1e6


def test_clipping_needs_a_limit() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping()
    with pytest.raises(ValueError, match="positive"):
        GradientClipping(max_norm=-1.0)
    assert GradientClipping(1.0, norm_type="inf").norm_type == math.inf
