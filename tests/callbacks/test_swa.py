"""SWA: the mean of the averaged epochs' weights, batch-norm statistics recomputed, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from aiolearner import Callback, Learner, StateView
from aiolearner.callbacks import SWA
from aiolearner.testing import make_batches, make_learner


class EpochWeights(Callback):
    """The model's weights at the end of every epoch, and the learning rate it trained with."""

    reads = frozenset({"model", "optimizer"})

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []
        self.lrs: list[float] = []

    def before_epoch(self, state: StateView) -> None:
        self.lrs.append(state.optimizer.param_groups[0]["lr"])

    def after_epoch(self, state: StateView) -> None:
        self.seen.append([p.detach().clone() for p in state.model.parameters()])


async def test_the_average_is_the_mean_of_the_averaged_epochs() -> None:
    swa = SWA(start_epoch=1, every_n_epochs=2)
    weights = EpochWeights()
    learner = make_learner(callbacks=[swa, weights], n_batches=3, with_validation=False)
    await learner.fit(6)
    assert swa.n_averaged == 3  # the ends of epochs 1, 3 and 5
    assert swa.model is not None
    snapshots = [weights.seen[i] for i in (1, 3, 5)]
    for i, got in enumerate(swa.model.parameters()):
        mean = torch.stack([s[i] for s in snapshots]).mean(0)
        torch.testing.assert_close(got, mean)
        assert not got.requires_grad
    assert not torch.equal(next(iter(swa.model.parameters())), weights.seen[-1][0])


async def test_swa_lr_anneals_from_the_start_epoch() -> None:
    swa = SWA(start_epoch=2, swa_lr=0.01, anneal_epochs=2, anneal_strategy="linear")
    weights = EpochWeights()
    learner = make_learner(callbacks=[swa, weights], n_batches=2, with_validation=False, lr=0.1)
    await learner.fit(6)
    # Epochs 0-2 at 0.1 (the annealing's first step keeps the rate), then down to 0.01.
    assert weights.lrs[:3] == [0.1, 0.1, 0.1]
    assert weights.lrs[3] == pytest.approx(0.055)
    assert weights.lrs[4:] == [pytest.approx(0.01)] * 2


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


def _bn_learner(callbacks: list[Callback], train: list[Any]) -> Learner[Any]:
    model = _bn_model()
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        train,
        callbacks=callbacks,
    )


async def test_batch_norm_statistics_are_recomputed_for_the_average() -> None:
    train = make_batches(4, batch_size=8, seed=3)
    swa = SWA(start_epoch=1, bn_data=train)
    learner = _bn_learner([swa], train)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    await learner.fit(3)
    assert swa.model is not None
    assert isinstance(swa.model, torch.nn.Sequential)
    linear, bn = swa.model[0], swa.model[1]
    assert isinstance(linear, torch.nn.Linear)
    assert isinstance(bn, torch.nn.BatchNorm1d)
    # With momentum None, update_bn keeps the plain mean of the batches' statistics.
    with torch.no_grad():
        features = [linear(x) for x, _ in train]
    mean = torch.stack([f.mean(0) for f in features]).mean(0)
    var = torch.stack([f.var(0, unbiased=True) for f in features]).mean(0)
    assert bn.running_mean is not None
    assert bn.running_var is not None
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert bn.momentum == 0.1  # put back
    # They differ from the trained model's own statistics, which are not touched.
    live_bn = learner.model[1]  # type: ignore[index]
    assert not torch.allclose(live_bn.running_mean, bn.running_mean)
    # The data pass left the global generator where training left it (these batches draw
    # nothing, so training itself does not move it either).
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_batch_norm_without_data_is_refused() -> None:
    learner = _bn_learner([SWA(start_epoch=0)], make_batches(2))
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="bn_data")):
        learner.fit_sync(1)


@pytest.mark.parametrize("stop_at", [2, 3])
async def test_resumed_from_a_checkpoint_equals_uninterrupted(tmp_path: Path, stop_at: int) -> None:
    def build() -> tuple[Learner[Any], SWA]:
        swa = SWA(start_epoch=2, swa_lr=0.02, anneal_epochs=2, bn_data=train)
        return _bn_learner([swa], train), swa

    train = make_batches(3, batch_size=8, seed=5)
    whole, whole_swa = build()
    await whole.fit(5)

    first, _ = build()
    await first.fit(stop_at)
    path = tmp_path / "c.pt"
    torch.save(first.state_dict(), path)
    resumed, swa = build()
    resumed.load_checkpoint(path)  # torch.load(weights_only=True)
    await resumed.fit(5)

    assert swa.n_averaged == whole_swa.n_averaged == 3
    assert whole_swa.model is not None
    assert swa.model is not None
    averages = zip(
        whole_swa.model.state_dict().values(), swa.model.state_dict().values(), strict=True
    )
    for a, b in averages:
        assert torch.equal(a, b)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="start_epoch"):
        SWA(-1)
    with pytest.raises(ValueError, match="every_n_epochs"):
        SWA(0, every_n_epochs=0)
    with pytest.raises(ValueError, match="anneal_strategy"):
        SWA(0, anneal_strategy="step")  # type: ignore[arg-type]
