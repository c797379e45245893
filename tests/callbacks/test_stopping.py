from __future__ import annotations

from typing import Any

import pytest
import torch

from aiolearner import Callback, ConfigurationError, Learner, StateView
from aiolearner.callbacks import EarlyStopping, NonFiniteGuard, TimeLimit
from aiolearner.testing import make_batches, make_learner, tiny_model


class ScriptedScore(Callback):
    """Puts the next value of a script into state.metrics["score"] after each validation."""

    writes = frozenset({"metrics"})

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def after_validate(self, state: StateView) -> None:
        state.metrics["score"] = self.values.pop(0)


class Outcome(Callback):
    reads = frozenset({"outcome", "stop_reason", "epoch"})

    def __init__(self) -> None:
        self.seen: tuple[str, str, int] | None = None

    def after_fit_run(self, state: StateView) -> None:
        reason = state.stop_reason if state.is_valid("stop_reason") else ""
        self.seen = (state.outcome, reason, state.epoch)


async def test_early_stopping_stops_after_patience_epochs_without_improvement() -> None:
    stop = EarlyStopping("score", mode="min", patience=2, min_delta=0.1)
    out = Outcome()
    # epoch 0: 1.0 best; 1: 0.95 (not better by > 0.1); 2: 0.5 best; 3: 0.45; 4: 0.6 -> stop
    learner = make_learner(
        callbacks=[ScriptedScore([1.0, 0.95, 0.5, 0.45, 0.6, 0.1]), stop, out], n_batches=1
    )
    await learner.fit(10)
    assert learner.state.epoch == 5
    assert out.seen is not None
    outcome, reason, _ = out.seen
    assert outcome == "stopped"
    assert "score has not improved" in reason
    assert "best 0.5 in epoch 3" in reason
    assert stop.state_dict() == {
        "best": 0.5,
        "best_epoch": 2,
        "wait": 2,
        "monitor": "score",
        "mode": "min",
    }


async def test_early_stopping_mode_max_and_state_round_trip() -> None:
    stop = EarlyStopping("score", mode="max", patience=0)
    learner = make_learner(callbacks=[ScriptedScore([0.1, 0.2, 0.2, 0.9]), stop], n_batches=1)
    await learner.fit(10)
    assert learner.state.epoch == 3  # the third epoch did not improve; patience 0
    again = EarlyStopping("score", mode="max", patience=0)
    again.load_state_dict(stop.state_dict())
    assert (again.best, again.best_epoch, again.wait) == (0.2, 1, 1)


async def test_early_stopping_on_nan_and_missing_metric() -> None:
    learner = make_learner(
        callbacks=[ScriptedScore([1.0, float("nan")]), EarlyStopping("score")], n_batches=1
    )
    await learner.fit(10)
    assert learner.state.epoch == 2
    assert "score is nan in epoch 2" in learner.state.stop_reason

    # Nothing in the learner writes it: refused when fit starts, before any training, with
    # the metrics it will have.
    learner = make_learner(callbacks=[EarlyStopping("val_accuracy")], n_batches=1)
    with pytest.raises(
        ConfigurationError, match=r"'val_accuracy'.*will be \['train_loss', 'val_loss'\]"
    ):
        await learner.fit(2)
    assert learner.state.step == 0
    # A callback that may write any metric (ScriptedScore declares all of them): looked for
    # when the epoch ends.
    stop = EarlyStopping("val_accuracy")
    learner = make_learner(callbacks=[ScriptedScore([1.0, 2.0]), stop], n_batches=1)
    with pytest.RaisesGroup(pytest.RaisesExc(KeyError, match="val_accuracy")):
        await learner.fit(2)

    lenient = EarlyStopping("val_accuracy", strict=False)
    learner = make_learner(callbacks=[lenient], n_batches=1)
    await learner.fit(2)
    assert learner.state.epoch == 2


def test_early_stopping_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping(min_delta=-0.1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tick(Callback):
    """Advances a fake clock by one second per training batch."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def after_update(self, state: StateView) -> None:
        self.clock.now += 1.0


async def test_time_limit_stops_after_the_budget_and_keeps_it_across_calls() -> None:
    clock = FakeClock()
    limit = TimeLimit(2.5, clock=clock)
    learner = make_learner(callbacks=[Tick(clock), limit], n_batches=4)
    await learner.fit(3)
    # After the third batch 3 s have passed: the batch finishes, then the run stops.
    assert learner.state.step == 3
    assert learner.state.epoch == 0
    assert learner.state.stop_reason.startswith("time limit: 3.0 s spent training (limit 2.5 s)")
    assert limit.elapsed == 3.0
    # The budget is spent: a further call stops before any batch...
    await learner.fit(3)
    assert learner.state.step == 3
    # ...and survives a checkpoint round trip, until reset.
    restored = TimeLimit(2.5, clock=clock)
    restored.load_state_dict(limit.state_dict())
    assert restored.elapsed == 3.0
    limit.reset()
    await learner.fit(3)
    assert learner.state.step == 6


def test_time_limit_rejects_non_positive_budget() -> None:
    with pytest.raises(ValueError, match="positive"):
        TimeLimit(0)


def _guarded_learner(
    guard: NonFiniteGuard,
    poison: set[int],
    *,
    n_batches: int = 4,
    loss_fn: Any = torch.nn.functional.cross_entropy,
) -> Learner[Any]:
    batches = make_batches(n_batches, seed=2)
    batches = [
        (torch.full_like(x, float("nan")) if i in poison else x, y)
        for i, (x, y) in enumerate(batches)
    ]
    model = tiny_model()
    return Learner(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, batches, callbacks=[guard]
    )


def _finite(learner: Learner[Any]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in learner.model.parameters())


async def test_guard_skips_bad_batches() -> None:
    guard = NonFiniteGuard("skip")
    learner = _guarded_learner(guard, {1})
    await learner.fit(1)
    assert guard.skipped == [1]
    assert learner.state.step == 4
    assert learner.state.stop_reason == (
        "non-finite loss at epoch 1, step 1 (batch 1 of the epoch): batch skipped"
    )
    assert _finite(learner)
    # The same as training on the good batches alone.
    clean = make_batches(4, seed=2)
    model = tiny_model()
    reference: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        [clean[0], clean[2], clean[3]],
    )
    await reference.fit(1)
    for a, b in zip(learner.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


async def test_guard_stops_before_the_bad_update() -> None:
    learner = _guarded_learner(NonFiniteGuard(), {2})
    await learner.fit(3)
    assert learner.state.stop_reason == "non-finite loss at epoch 1, step 2 (batch 2 of the epoch)"
    assert learner.state.step == 2
    assert _finite(learner)


async def test_guard_checking_every_n_steps_names_the_first_bad_step() -> None:
    learner = _guarded_learner(NonFiniteGuard(every_n_steps=3), {1, 2}, n_batches=6)
    await learner.fit(1)
    reason = learner.state.stop_reason
    assert reason.startswith("non-finite loss at step 1 (found in epoch 1, step 2;")
    # The leftover steps are settled when the pass ends.
    learner = _guarded_learner(NonFiniteGuard(every_n_steps=3), {3}, n_batches=4)
    await learner.fit(2)
    assert learner.state.stop_reason.startswith("non-finite loss at step 3 ")
    assert learner.state.epoch == 0


async def test_guard_checks_gradients_when_asked() -> None:
    def nan_gradient_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        zero = output.sum() * 0
        return zero + torch.sqrt(zero)  # finite value, NaN gradient

    learner = _guarded_learner(NonFiniteGuard(), set(), loss_fn=nan_gradient_loss)
    await learner.fit(1)
    # The first loss looks fine, so its NaN gradients reach the weights; the next loss is NaN.
    assert learner.state.stop_reason.startswith("non-finite loss at epoch 1, step 1")
    assert not _finite(learner)
    learner = _guarded_learner(NonFiniteGuard(check_grads=True), set(), loss_fn=nan_gradient_loss)
    await learner.fit(1)
    assert learner.state.stop_reason.startswith("non-finite loss or gradient at epoch 1, step 0")
    assert _finite(learner)


def test_guard_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="action"):
        NonFiniteGuard("warn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_steps=1"):
        NonFiniteGuard("skip", every_n_steps=2)
    with pytest.raises(ValueError, match="at least 1"):
        NonFiniteGuard(every_n_steps=0)


class ScriptedValScore(ScriptedScore):
    def after_validate(self, state: StateView) -> None:
        state.metrics["val_score"] = self.values.pop(0)


@pytest.mark.parametrize("validate", ["sequential", "concurrent"])
async def test_early_stopping_on_a_validation_metric_checks_each_validation(
    validate: str,
) -> None:
    stop = EarlyStopping("val_score", patience=1)
    assert stop.check_on == "validate"
    learner = make_learner(
        callbacks=[ScriptedValScore([1.0, 0.5, 0.7] + [0.0] * 10), stop],
        n_batches=1,
        validate=validate,
    )
    await learner.fit(10)
    assert learner.state.stop_reason == (
        "early stopping: val_score has not improved by more than 0.0 for 1 validations"
        " (best 0.5 in epoch 2, now 0.7 in epoch 3)"
    )
    # Sequentially it stops in epoch 2; a concurrent validation's stop request may reach the
    # training loop a validation period later.
    if validate == "sequential":
        assert learner.state.epoch == 3
    else:
        assert learner.state.epoch in (3, 4)
    with pytest.raises(ValueError, match="check_on"):
        EarlyStopping(check_on="batch")  # type: ignore[arg-type]
