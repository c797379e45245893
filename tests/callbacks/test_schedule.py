from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import ExponentialLR, OneCycleLR, ReduceLROnPlateau, StepLR

from aiolearner import Callback, ConfigurationError, StateView
from aiolearner.callbacks import LRSchedule, OneCycle, ParamSchedule, WarmupCosine
from aiolearner.callbacks._schedule import warmup_cosine_factor
from aiolearner.testing import make_learner


class LRLog(Callback):
    """Records the learning rate seen by each batch."""

    reads = frozenset({"optimizer"})

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def before_update(self, state: StateView) -> None:
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


async def test_per_step_scheduler_matches_torch_stepping() -> None:
    log = LRLog()
    learner = make_learner(
        callbacks=[LRSchedule(lambda opt: ExponentialLR(opt, 0.5)), log],
        n_batches=3,
        lr=1.0,
        with_validation=False,
    )
    await learner.fit(2)
    assert log.lrs == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    assert learner.optimizer.param_groups[0]["lr"] == 2.0**-6


async def test_per_epoch_scheduler_with_frequency() -> None:
    log = LRLog()
    schedule = LRSchedule(lambda opt: StepLR(opt, 1, gamma=0.1), interval="epoch", frequency=2)
    learner = make_learner(callbacks=[schedule, log], n_batches=1, lr=1.0)
    await learner.fit(5)
    assert log.lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    assert schedule.last_lr == pytest.approx([0.01])


class ScriptedValLoss(Callback):
    writes = frozenset({"metrics"})

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def after_validate(self, state: StateView) -> None:
        state.metrics["score"] = self.values.pop(0)


async def test_reduce_on_plateau_follows_the_monitored_metric() -> None:
    log = LRLog()
    plateau = LRSchedule(
        lambda opt: ReduceLROnPlateau(opt, factor=0.5, patience=1),
        interval="epoch",
        monitor="score",
    )
    learner = make_learner(
        callbacks=[ScriptedValLoss([1.0, 0.5, 0.6, 0.7, 0.8]), plateau, log], n_batches=1, lr=1.0
    )
    await learner.fit(5)
    # Epochs 2 and 3 do not improve on 0.5: after the second one (patience 1) the rate halves.
    assert log.lrs == [1.0, 1.0, 1.0, 1.0, 0.5]

    # A scheduler built on another optimizer is refused when the learner is built.
    other = LRSchedule(ReduceLROnPlateau(learner.optimizer), interval="epoch")
    with pytest.raises(ConfigurationError, match="another optimizer"):
        make_learner(callbacks=[other])
    model_opt = make_learner().optimizer
    with pytest.raises(ValueError, match="interval='epoch'"):
        LRSchedule(ReduceLROnPlateau(model_opt))


async def test_missing_monitored_metric_is_an_error() -> None:
    # Given as a factory (its scheduler is built at fit), the monitored name is checked at fit
    # start as a scheduler's is: it used to fail after the first epoch had trained, with a
    # KeyError, and a learner without val_data never stepped on "val_loss", silently.
    learner = make_learner(
        callbacks=[
            LRSchedule(lambda opt: ReduceLROnPlateau(opt), interval="epoch", monitor="nope")
        ],
        n_batches=1,
    )
    with pytest.raises(ConfigurationError, match="'nope'"):
        await learner.fit(1)
    assert learner.state.step == 0
    no_validation = make_learner(
        callbacks=[
            LRSchedule(lambda opt: ReduceLROnPlateau(opt), interval="epoch", monitor="val_loss")
        ],
        with_validation=False,
    )
    with pytest.raises(ConfigurationError, match="'val_loss'"):
        await no_validation.fit(1)
    # Without monitor= (the default, "val_loss"), a factory of another scheduler is not held
    # to it.
    plain = make_learner(
        callbacks=[LRSchedule(lambda opt: StepLR(opt, 1), interval="epoch")],
        with_validation=False,
    )
    await plain.fit(1)
    # ... but a factory that makes a plateau schedule is, once it has made it: before anything
    # trains (it never stepped, silently).
    default = make_learner(
        callbacks=[LRSchedule(lambda opt: ReduceLROnPlateau(opt), interval="epoch")],
        with_validation=False,
    )
    with pytest.RaisesGroup(
        pytest.RaisesExc(
            ConfigurationError,
            match=r"factory made a ReduceLROnPlateau, which judges by the metric 'val_loss'.*"
            r"never step: pass LRSchedule\(..., monitor=...\) \(did you mean 'train_loss'\?\)",
        )
    ):
        await default.fit(1)
    assert default.state.step == 0


async def test_one_cycle_and_warmup_cosine_schedules() -> None:
    log = LRLog()
    learner = make_learner(
        callbacks=[OneCycle(1.0, total_steps=6), log], n_batches=3, with_validation=False
    )
    await learner.fit(2)
    model = torch.nn.Linear(1, 1)
    reference = OneCycleLR(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, total_steps=6)
    expected = []
    for _ in range(6):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert log.lrs == pytest.approx(expected)

    log = LRLog()
    learner = make_learner(
        callbacks=[WarmupCosine(2, 6, min_factor=0.1), log],
        n_batches=4,
        lr=1.0,
        with_validation=False,
    )
    await learner.fit(2)
    assert log.lrs == pytest.approx([warmup_cosine_factor(i, 2, 6, 0.1) for i in range(8)])
    assert log.lrs[0] < log.lrs[1] < log.lrs[2] == pytest.approx(1.0)
    assert log.lrs[6] == log.lrs[7] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(5, 5)


async def test_schedule_state_resumes_from_a_checkpoint() -> None:
    def make() -> tuple[LRLog, LRSchedule]:
        return LRLog(), LRSchedule(lambda opt: StepLR(opt, 2, gamma=0.5))

    log, schedule = make()
    whole = make_learner(callbacks=[schedule, log], n_batches=3, lr=1.0, with_validation=False)
    await whole.fit(3)

    log1, schedule1 = make()
    first = make_learner(callbacks=[schedule1, log1], n_batches=3, lr=1.0, with_validation=False)
    await first.fit(1)
    checkpoint = first.state_dict()
    log2, schedule2 = make()
    second = make_learner(callbacks=[schedule2, log2], n_batches=3, lr=1.0, with_validation=False)
    second.load_state_dict(checkpoint)
    await second.fit(3)
    assert log1.lrs + log2.lrs == log.lrs
    assert second.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]


class GroupLog(Callback):
    reads = frozenset({"optimizer"})
    after = (ParamSchedule,)

    def __init__(self, key: str) -> None:
        self.key = key
        self.values: list[float] = []

    def before_update(self, state: StateView) -> None:
        self.values.append(state.optimizer.param_groups[0][self.key])


async def test_param_schedule_per_step_and_per_epoch() -> None:
    log = GroupLog("weight_decay")
    decay = ParamSchedule("weight_decay", lambda t: 0.01 * t)
    learner = make_learner(callbacks=[decay, log], n_batches=3, with_validation=False)
    await learner.fit(2)
    assert log.values == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
    assert decay.state_dict() == {"count": 6}

    log = GroupLog("momentum")
    momentum = ParamSchedule("momentum", lambda epoch: 0.5 + 0.1 * epoch, interval="epoch")
    learner = make_learner(callbacks=[momentum, log], n_batches=2, with_validation=False)
    await learner.fit(3)
    assert log.values == pytest.approx([0.5, 0.5, 0.6, 0.6, 0.7, 0.7])

    # A hyperparameter the optimizer does not have is refused when the learner is built.
    with pytest.raises(ConfigurationError, match="no hyperparameter 'betas'"):
        make_learner(callbacks=[ParamSchedule("betas", lambda t: (0.9, 0.99))])
    with pytest.raises(ValueError, match="interval"):
        ParamSchedule("lr", float, interval="batch")  # type: ignore[arg-type]


class ScriptedVal(Callback):
    writes = frozenset({"metrics"})

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def after_validate(self, state: StateView) -> None:
        state.metrics["val_score"] = self.values.pop(0)


async def test_reduce_on_plateau_on_a_validation_metric_with_concurrent_validation() -> None:
    plateau = LRSchedule(
        lambda opt: ReduceLROnPlateau(opt, factor=0.5, patience=0),
        interval="epoch",
        monitor="val_score",
    )
    learner = make_learner(
        callbacks=[ScriptedVal([1.0, 2.0, 3.0]), plateau],
        n_batches=1,
        lr=1.0,
        validate="concurrent",
    )
    await learner.fit(3)
    # Two validations without improvement, each halving the rate.
    assert learner.optimizer.param_groups[0]["lr"] == 0.25
