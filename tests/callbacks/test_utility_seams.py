"""The smaller callbacks at their seams: a window of steps across epochs and checkpoints,
Throughput's epoch key, NonFiniteGuard's record of skipped steps through a checkpoint, and the
argument checks their docstrings promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from aiolearner import Callback, StateView
from aiolearner.callbacks import Checkpoint, Metrics, NonFiniteGuard, OneCycle, Throughput, lr_find
from aiolearner.testing import make_batches, make_learner


class StepLosses(Callback):
    """Each step's loss, and ``train_loss_step`` whenever Metrics has just reported it (a reader
    of metrics runs after its writers)."""

    reads = frozenset({"metrics", "step", "loss"})

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.reported: dict[int, float] = {}
        self._last: Any = "unseen"

    def after_fit_batch(self, state: StateView) -> None:
        self.losses[state.step] = float(state.loss.detach())
        value = state.metrics.get("train_loss_step")
        # (The first value seen may be a report of before a resume: not counted.)
        if value is not None and self._last != "unseen" and value != self._last:
            self.reported[state.step] = value
        self._last = value


async def test_a_window_of_steps_runs_across_epochs() -> None:
    probe = StepLosses()
    learner = make_learner(callbacks=[Metrics(["loss"], log_every_n_steps=4), probe], n_batches=6)
    await learner.fit(2)
    assert sorted(probe.reported) == [4, 8, 12]
    for end, value in probe.reported.items():
        mean = sum(probe.losses[s] for s in range(end - 3, end + 1)) / 4
        assert value == pytest.approx(mean, rel=1e-6)


async def test_a_window_of_steps_goes_through_a_checkpoint(tmp_path: Path) -> None:
    whole = StepLosses()
    await make_learner(callbacks=[Metrics(["loss"], log_every_n_steps=4), whole], n_batches=6).fit(
        2
    )
    first = make_learner(
        callbacks=[Metrics(["loss"], log_every_n_steps=4), Checkpoint(tmp_path), StepLosses()],
        n_batches=6,
    )
    await first.fit(1)  # epoch-0001.pt at step 6: half a window done
    resumed = StepLosses()
    learner = make_learner(
        callbacks=[Metrics(["loss"], log_every_n_steps=4), Checkpoint(tmp_path), resumed],
        n_batches=6,
    )
    await learner.fit(2, resume="last")
    assert resumed.reported == {s: v for s, v in whole.reported.items() if s > 6}


async def test_throughput_records_name_their_epoch() -> None:
    throughput = Throughput()
    await make_learner(callbacks=[throughput], n_batches=2).fit(2)
    assert [record["epoch"] for record in throughput.epochs] == [0.0, 1.0]


class NaNAt(Callback):
    """Makes the loss of step ``step`` NaN (by scaling it in after_gradient is too late, so the
    batch's inputs are poisoned before the model sees them)."""

    reads = frozenset({"step"})
    writes = frozenset({"batch"})

    def __init__(self, *steps: int) -> None:
        self.steps = steps

    def before_fit_batch(self, state: StateView) -> None:
        if state.step in self.steps:
            x, y = state.batch
            state.batch = (torch.full_like(x, float("nan")), y)


async def test_the_skipped_steps_of_non_finite_guard_go_through_a_checkpoint(
    tmp_path: Path,
) -> None:
    def build(*extra: Callback) -> tuple[NonFiniteGuard, Any]:
        guard = NonFiniteGuard("skip")
        return guard, make_learner(callbacks=[NaNAt(1, 6), guard, *extra], n_batches=4)

    whole, learner = build()
    await learner.fit(2)
    assert whole.skipped == [1, 6]
    _, first = build(Checkpoint(tmp_path))
    await first.fit(1)
    resumed, second = build(Checkpoint(tmp_path))
    await second.fit(2, resume="last")
    assert resumed.skipped == [1, 6]


def test_argument_checks_the_docstrings_promise() -> None:
    with pytest.raises(TypeError, match="every_n_steps"):
        NonFiniteGuard("stop", every_n_steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total_steps"):
        OneCycle(0.1, total_steps=0)


async def test_lr_find_refuses_negative_skips() -> None:
    learner = make_learner(train_data=make_batches(4))
    with pytest.raises(ValueError, match="skip_start and skip_end"):
        await lr_find(learner, num_steps=5, skip_start=-1)
