"""examples/gan.py: two optimizers by name, both in checkpoints; a resumed run is exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from aiolearner import Callback, Learner, StateView, StopFit
from aiolearner.callbacks import LRSchedule
from examples import gan


class Pause(Callback):
    """Stops the run once, after a given step (mid-epoch)."""

    reads = frozenset({"step"})

    def __init__(self, at: int | None) -> None:
        self.at = at

    def after_fit_batch(self, state: StateView) -> None:
        if state.step == self.at:
            self.at = None
            raise StopFit("pause")


def _learner(pause_at: int | None = None, compute: str = "auto") -> Learner[Any]:
    return gan.make_learner(
        verbose=False, n_batches=5, callbacks=[Pause(pause_at)], compute=compute
    )


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal to the bit: tensors with torch.equal, containers element by element."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _final(learner: Learner[Any]) -> dict[str, Any]:
    schedule = next(cb for cb in learner.callbacks if isinstance(cb, LRSchedule))
    return {
        "model": learner.model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in learner.optimizers.items()},
        "schedule": dict(schedule.state_dict()),
        "metrics": dict(learner.state.metrics),
        "counters": (learner.state.epoch, learner.state.step),
    }


def test_the_gan_has_two_named_optimizers_and_update_stages() -> None:
    learner = gan.make_learner(verbose=False)
    assert list(learner.optimizers) == ["g", "d"]
    assert learner.optimizer is learner.optimizers["g"]  # the first one
    assert learner.stage("update_d").optimizer == "d"  # type: ignore[attr-defined]
    assert learner.stage("update_g").optimizer == "g"  # type: ignore[attr-defined]
    tree = learner.describe()
    assert "LRSchedule[d]" in tree
    assert "after_update_d:" in tree  # the discriminator's schedule steps with its update
    checkpoint = learner.state_dict()
    assert set(checkpoint["optimizers"]) == {"g", "d"}
    assert "optimizer" not in checkpoint


async def test_gan_interrupted_and_resumed_from_a_checkpoint_equals_uninterrupted(
    tmp_path: Path,
) -> None:
    whole = _learner()
    await whole.fit(3)

    first = _learner(pause_at=7)  # in the middle of the second epoch (5 batches an epoch)
    await first.fit(3)
    assert (first.state.epoch, first.state.step) == (1, 7)
    path = tmp_path / "gan.pt"
    torch.save(first.state_dict(), path)
    # The discriminator's Adam has state of its own, and it is in the checkpoint.
    saved = torch.load(path, weights_only=True)
    assert saved["optimizers"]["d"]["state"][0]["step"] == 7

    resumed = _learner()  # a fresh learner, as in a new process
    await resumed.fit(3, resume=path)

    assert_same(_final(resumed), _final(whole))
    d_lr = resumed.optimizers["d"].param_groups[0]["lr"]
    assert d_lr == pytest.approx(1e-2 * 0.999**15)  # the schedule counted every step of "d"
    assert resumed.optimizers["g"].param_groups[0]["lr"] == 1e-2


async def test_gan_runs_the_same_inline_and_in_the_compute_worker() -> None:
    """Both optimizers' steps hop together (one fused batch): the same run, to the bit."""
    inline = _learner(compute="inline")  # seeds torch's global generator: one run at a time
    await inline.fit(1)
    threaded = _learner(compute="thread")
    await threaded.fit(1)
    assert_same(_final(threaded), _final(inline))
