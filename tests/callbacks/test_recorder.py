from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from aiolearner import Learner
from aiolearner.callbacks import Checkpoint, LRSchedule, ParamSchedule, Recorder, plot_history
from aiolearner.testing import make_batches, make_learner


async def test_records_every_step_and_epoch() -> None:
    recorder = Recorder()
    learner = make_learner(callbacks=[recorder], n_batches=3)
    await learner.fit(2)
    h = recorder.history
    assert h["step"] == [1, 2, 3, 4, 5, 6]
    assert len(h["loss"]) == 6
    assert all(isinstance(x, float) for x in h["loss"])
    assert h["lr"] == [[0.1]] * 6
    assert [e["epoch"] for e in h["epochs"]] == [0.0, 1.0]
    assert [e["step"] for e in h["epochs"]] == [3.0, 6.0]
    assert h["epochs"][-1]["val_loss"] == learner.state.metrics["val_loss"]
    # the epoch's train_loss is the mean of its recorded batch losses
    expected = torch.tensor(h["loss"][3:]).mean().item()
    assert h["epochs"][-1]["train_loss"] == pytest.approx(expected, rel=1e-6)


async def test_records_the_learning_rate_each_update_used() -> None:
    recorder = Recorder()
    sched = LRSchedule(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    learner = make_learner(callbacks=[recorder, sched], n_batches=2)
    await learner.fit(2)
    assert recorder.history["lr"] == [[0.1], [0.05], [0.025], [0.0125]]


@pytest.mark.parametrize("recorder_first", [True, False])
async def test_records_the_rate_a_per_step_param_schedule_set(recorder_first: bool) -> None:
    """ParamSchedule sets the rate in before_update, after the batch began: in either order
    of the callbacks, the history has the rate each update used."""
    recorder = Recorder()
    schedule = ParamSchedule("lr", lambda t: 0.1 * (t + 1))
    callbacks = [recorder, schedule] if recorder_first else [schedule, recorder]
    learner = make_learner(callbacks=callbacks, n_batches=2, with_validation=False)
    await learner.fit(2)
    used = [[round(lr, 6) for lr in rates] for rates in recorder.history["lr"]]
    assert used == [[0.1], [0.2], [0.3], [0.4]]


async def test_under_accumulation_a_row_has_the_rate_of_the_update_its_batch_ran() -> None:
    """5 micro-batches in groups of 2: updates at the 2nd, 4th and (the short group) 5th; a
    batch that only accumulates has the rate at its start."""
    from aiolearner.callbacks import AccumulateGradients

    recorder = Recorder()
    schedule = ParamSchedule("lr", lambda t: 0.1 / (t + 1))
    learner = make_learner(
        callbacks=[recorder, schedule],
        stages={"fit": AccumulateGradients(2)},
        n_batches=5,
        with_validation=False,
    )
    await learner.fit(1)
    used = [round(rates[0], 4) for rates in recorder.history["lr"]]
    assert used == [0.1, 0.1, 0.1, 0.05, 0.0333]


async def test_a_last_batch_skipped_after_its_update_leaves_the_rows_before_alone() -> None:
    """It has no row; its update is not the short group's, which would give the last row its
    rates."""
    from aiolearner import Callback, SkipBatch, StateView

    class SkipLast(Callback):
        reads = frozenset({"batch_index"})

        def after_update(self, state: StateView) -> None:
            if state.batch_index == 3:  # (counted once the update committed it)
                raise SkipBatch("after its update")

    recorder = Recorder()
    schedule = LRSchedule(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    learner = make_learner(
        callbacks=[recorder, schedule, SkipLast()], n_batches=3, with_validation=False
    )
    await learner.fit(1)
    assert recorder.history["lr"] == [[0.1], [0.05]]


async def test_a_learner_whose_updates_are_named_records_too() -> None:
    """No stage is named 'update' (two optimizers, Update("d") and Update("g")): the rates are
    read where the first optimizer steps."""
    from aiolearner import FitBatch, Gradient, Update
    from aiolearner.testing import tiny_model

    model = tiny_model()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    first = torch.optim.SGD(layers[0].parameters(), lr=0.01)
    second = torch.optim.SGD(layers[-1].parameters(), lr=0.02)
    recorder = Recorder()
    learner: Learner[Any] = Learner(
        model,
        {"d": first, "g": second},
        torch.nn.functional.cross_entropy,
        make_batches(3),
        callbacks=[recorder],
        stages={"fit_batch": FitBatch(Gradient(), Update("d", commit=False), Update("g"))},
    )
    await learner.fit(1)
    assert recorder.history["lr"] == [[0.01]] * 3


async def test_history_survives_a_checkpoint_resume(tmp_path: Path) -> None:
    first = Recorder()
    learner = make_learner(callbacks=[first, Checkpoint(tmp_path)], n_batches=2)
    await learner.fit(2)
    second = Recorder()
    resumed = make_learner(callbacks=[second, Checkpoint(tmp_path)], n_batches=2)
    await resumed.fit(3, resume="last")
    await learner.fit(3)
    assert second.history == first.history
    assert len(second.history["epochs"]) == 3


def test_plot_history_writes_a_png(tmp_path: Path) -> None:
    recorder = Recorder()
    learner = make_learner(callbacks=[recorder], n_batches=5)
    learner.fit_sync(4)
    out = recorder.plot_history(tmp_path / "history.png")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000
    # the same from the function, with the history dict
    assert plot_history(recorder.history, tmp_path / "again.png").is_file()


def test_plot_without_matplotlib_says_which_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"aiolearner\[plot\]"):
        Recorder().plot_history(tmp_path / "x.png")


async def test_a_batch_without_a_loss_is_recorded_as_nan() -> None:
    from aiolearner import ComputeStage, State

    class NoLossGradient(ComputeStage):
        name = "gradient"

        def compute(self, state: State) -> None:
            inputs, targets = state.batch
            if state.batch_index % 2:
                return  # this batch produces no loss (and no gradient)
            loss = torch.nn.functional.cross_entropy(state.model(inputs), targets)
            loss.backward()  # type: ignore[no-untyped-call]
            state.loss = loss

    recorder = Recorder()
    learner = make_learner(callbacks=[recorder], n_batches=4, stages={"gradient": NoLossGradient()})
    await learner.fit(1)
    losses = recorder.history["loss"]
    assert len(losses) == 4
    assert [x != x for x in losses] == [False, True, False, True]  # NaN != NaN
