"""What a stage author found from docs/writing-stages.md alone: a stage in Fit's place that
runs the training batches itself, methods of the wrong kind, one stage instance in two places,
stage fields across an interrupted ``fit``, and errors that name the stage that caused them."""

from __future__ import annotations

from typing import Any, ClassVar

import anyio
import pytest
import torch

from aiolearner import (
    Callback,
    ComputeStage,
    ConfigurationError,
    Fit,
    FitBatch,
    Gradient,
    SkipBatch,
    Stage,
    StageError,
    State,
    StateView,
    StopEpoch,
    StopFit,
    Update,
)
from aiolearner.testing import make_learner

COMPUTES = ["inline", "thread", "auto"]


def weights(learner: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


# -- a stage in Fit's place running the training batches itself ------------------------------


class PlainFit(Fit):
    """One update a batch, written by hand; ``fail_at``: a ValueError before that step's
    commit, once; ``commit``: False forgets to commit."""

    def __init__(self, *, fail_at: int | None = None, commit: bool = True) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.commits = commit

    async def run(self, state: State) -> None:
        def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
            inputs, targets = batch
            state.loss = state.loss_fn(state.train_model(inputs), targets)
            state.loss.backward()  # type: ignore[no-untyped-call]
            if self.fail_at is not None and state.step == self.fail_at:
                self.fail_at = None
                raise ValueError("failed before the commit")
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            if self.commits:
                self.context.commit(state)

        state.model.train()
        async with self.context.open_pass(state, "train") as batches:
            while (batch := await batches.next()) is not batches.END:
                await self.context.compute(step, batch, writes_weights=True)


class NamedFit(Stage):
    """A plain stage in Fit's place (named ``fit``), committing through an Update sub-stage."""

    name = "fit"

    def __init__(self) -> None:
        super().__init__(Gradient(), Update())

    async def run(self, state: State) -> None:
        gradient, update = self.children
        async with self.context.open_pass(state, "train") as batches:
            while (batch := await batches.next()) is not batches.END:
                assert state.batch is batch
                await gradient(state)
                await update(state)


class Counters(Callback):
    reads = frozenset({"step", "batch_index", "epoch", "metrics"})

    def __init__(self) -> None:
        self.records: list[tuple[int, int, float]] = []

    def after_fit(self, state: StateView) -> None:
        self.records.append((state.step, state.batch_index, state.metrics["train_loss"]))


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("fit", [PlainFit, NamedFit])
async def test_a_stage_in_fits_place_commits_each_batch_as_fit_does(
    compute: str, fit: type[Stage]
) -> None:
    expected = Counters()
    reference = make_learner(
        n_batches=4, compute=compute, with_validation=False, callbacks=[expected]
    )
    await reference.fit(2)
    counters = Counters()
    learner = make_learner(
        n_batches=4,
        compute=compute,
        with_validation=False,
        callbacks=[counters],
        stages={"fit": fit()},
    )
    await learner.fit(2)
    assert (learner.state.step, learner.state.batch_index, learner.state.epoch) == (8, 0, 2)
    # Each epoch's counters and mean loss as Fit's; the weights bit for bit.
    assert counters.records == expected.records
    for got, want in zip(weights(learner), weights(reference), strict=True):
        assert torch.equal(got, want)


async def test_a_training_pass_batch_never_committed_is_a_stage_error_naming_the_stage() -> None:
    learner = make_learner(with_validation=False, stages={"fit": PlainFit(commit=False)})
    with pytest.raises(StageError, match=r"stage 'fit'.*without being committed"):
        await learner.fit(1)
    assert learner.state.step == 0


@pytest.mark.parametrize("compute", COMPUTES)
async def test_a_training_pass_batch_failing_before_its_commit_is_repeated(compute: str) -> None:
    reference = make_learner(n_batches=4, compute=compute, with_validation=False)
    await reference.fit(2)
    learner = make_learner(
        n_batches=4, compute=compute, with_validation=False, stages={"fit": PlainFit(fail_at=5)}
    )
    with pytest.raises(ValueError, match="before the commit"):
        await learner.fit(2)
    assert (learner.state.step, learner.state.batch_index) == (5, 1)
    assert all(p.grad is None for p in learner.model.parameters())
    await learner.fit(2)
    assert learner.state.step == 8
    for got, want in zip(weights(learner), weights(reference), strict=True):
        assert torch.equal(got, want)


# -- methods of the wrong kind, one instance in two places ------------------------------------


def test_an_async_compute_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match=r"Halve.compute must be a plain `def`"):

        class Halve(ComputeStage):
            async def compute(self, state: State) -> None:  # type: ignore[override]
                pass


def test_a_plain_def_run_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match=r"Plain.run must be an `async def`"):

        class Plain(Stage):
            def run(self, state: State) -> None:  # type: ignore[override]
                pass


class Halve(ComputeStage):
    def compute(self, state: State) -> None:
        for p in state.model.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)


def test_one_stage_instance_in_two_places_is_refused() -> None:
    halve = Halve()
    with pytest.raises(ConfigurationError, match=r"stage 'halve' \(Halve\) is in the tree twice"):
        make_learner(stages={"fit_batch": FitBatch(Gradient(), halve, halve, Update())})


# -- stage fields across an interrupted fit -----------------------------------------------------


class Seen(ComputeStage):
    """Counts the epoch's batches in ``state.seen`` (an epoch field)."""

    fields: ClassVar[dict[str, str]] = {"seen": "epoch"}

    def compute(self, state: State) -> None:
        state.seen = getattr(state, "seen", 0) + 1


class StopAt(Callback):
    reads = frozenset({"step"})

    def __init__(self, step: int) -> None:
        self.step = step

    def after_fit_batch(self, state: StateView) -> None:
        if state.step == self.step:
            self.step = -1
            raise StopFit("stopped mid-epoch")


class SeenAtEpochEnd(Callback):
    reads = frozenset({"seen"})

    def __init__(self) -> None:
        self.seen: list[int] = []

    def after_epoch(self, state: StateView) -> None:
        self.seen.append(state.seen)


async def test_an_epoch_field_ends_with_a_fit_stopped_inside_its_epoch() -> None:
    """Continued in the same learner or in a fresh one from its state, the epoch's field starts
    again from nothing (stage fields are not saved): the two give the same."""

    def learner(*callbacks: Callback) -> Any:
        return make_learner(
            n_batches=4,
            with_validation=False,
            callbacks=list(callbacks),
            stages={"fit_batch": FitBatch(Gradient(), Seen(), Update())},
        )

    same = SeenAtEpochEnd()
    first = learner(same, StopAt(6))
    await first.fit(2)
    saved = first.state_dict()
    await first.fit(2)
    fresh_seen = SeenAtEpochEnd()
    fresh = learner(fresh_seen, StopAt(-1))
    fresh.load_state_dict(saved)
    await fresh.fit(2)
    assert same.seen == [4, 2]
    assert fresh_seen.seen == [2]


# -- errors naming the stage that caused them ---------------------------------------------------


class SkipOutside(Stage):
    """In the validation slot: raises SkipBatch where no batch is running."""

    name = "skip_outside"

    async def run(self, state: State) -> None:
        raise SkipBatch("bad sample")


async def test_control_flow_nobody_owns_names_the_stage_that_raised_it() -> None:
    learner = make_learner(n_batches=2, stages={"validate": SkipOutside()})
    with pytest.raises(StageError, match=r"SkipBatch was raised in stage 'skip_outside'"):
        await learner.fit(1)


class Sleepy(ComputeStage):
    fusable = True

    def compute(self, state: State) -> None:
        pass

    async def run(self, state: State) -> None:
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("compute", COMPUTES)
async def test_a_fusable_stage_that_suspends_is_named(compute: str) -> None:
    learner = make_learner(
        compute=compute,
        with_validation=False,
        stages={"fit_batch": FitBatch(Gradient(), Sleepy(), Update())},
    )
    with pytest.raises(StageError, match=r"stage 'sleepy'.*fusable"):
        await learner.fit(1)


class StopAtThird(PlainFit):
    """Raises StopEpoch from its own loop at the third batch of each epoch, before its update."""

    async def run(self, state: State) -> None:
        async with self.context.open_pass(state, "train") as batches:
            while (batch := await batches.next()) is not batches.END:
                if state.batch_index == 2:
                    raise StopEpoch("enough")
                inputs, targets = batch
                state.loss = state.loss_fn(state.train_model(inputs), targets)
                state.loss.backward()  # type: ignore[no-untyped-call]
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
                self.context.commit(state)


async def test_a_stop_epoch_in_a_training_pass_consumes_the_batch_as_fit_does() -> None:
    learner = make_learner(n_batches=4, with_validation=False, stages={"fit": StopAtThird()})
    await learner.fit(2)
    # Each epoch: two updates, the third batch consumed by the stop (counted, not trained on).
    assert (learner.state.epoch, learner.state.step) == (2, 6)
    assert all(p.grad is None for p in learner.model.parameters())


class TrainLosses(Callback):
    reads = frozenset({"metrics"})

    def __init__(self) -> None:
        self.losses: list[float | None] = []

    def after_fit(self, state: StateView) -> None:
        self.losses.append(state.metrics.get("train_loss"))


class StopEpochAtThird(Callback):
    reads = frozenset({"batch_index"})

    def before_fit_batch(self, state: StateView) -> None:
        if state.batch_index == 2:
            raise StopEpoch("enough")


async def test_a_stop_epoch_in_a_training_pass_sets_the_epochs_train_loss_as_fit_does() -> None:
    by_fit, by_stage = TrainLosses(), TrainLosses()
    fit = make_learner(n_batches=4, with_validation=False, callbacks=[by_fit, StopEpochAtThird()])
    await fit.fit(2)
    stage = make_learner(
        n_batches=4, with_validation=False, callbacks=[by_stage], stages={"fit": StopAtThird()}
    )
    await stage.fit(2)
    # The mean loss of each epoch's own two batches (not the previous epoch's, not missing).
    assert by_stage.losses == by_fit.losses
    assert all(loss is not None for loss in by_fit.losses)
