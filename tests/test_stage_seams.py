"""The stage author's API at its seams: a class patched after the learner was built, a field
first set in a later batch, control flow nobody owns in validate()/test() and in
after_fit_run, Parallel branches writing metrics, a renamed stage in the validation slot,
``open_pass("train")`` after the epoch's pass, and stage names with acronyms."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from aiolearner import (
    Callback,
    ComputeStage,
    FitBatch,
    Gradient,
    Learner,
    Parallel,
    SkipBatch,
    Stage,
    StageError,
    State,
    StateView,
    StopEpoch,
    StopFit,
    Update,
    ValidateLoss,
)
from aiolearner.testing import make_batches, make_learner, tiny_model

COMPUTES = ["inline", "thread", "auto"]


def weights(learner: Learner[Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


class Noise(ComputeStage):
    """Adds noise to the gradients (a leaf of a hook-less batch: the flat program)."""

    def compute(self, state: State) -> None:
        for p in state.model.parameters():
            if p.grad is not None:
                p.grad.add_(torch.ones_like(p.grad), alpha=1e-3)


# -- a class patched after the learner was built ----------------------------------------------


@pytest.mark.parametrize("compute", COMPUTES)
async def test_a_patch_after_the_build_reaches_the_default_batch(
    monkeypatch: pytest.MonkeyPatch, compute: str
) -> None:
    learner = make_learner(n_batches=3, compute=compute)
    await learner.fit(1)  # compiled and run once before the patch
    original = Gradient.compute
    calls: list[int] = []

    def patched(self: Gradient, state: State) -> None:
        calls.append(state.batch_index)
        original(self, state)

    monkeypatch.setattr(Gradient, "compute", patched)
    await learner.fit(2)
    assert calls == [0, 1, 2]
    monkeypatch.undo()
    await learner.fit(3)  # the default program again, and no more calls
    assert calls == [0, 1, 2]
    assert learner._rt.executor.program(learner.stage("fit_batch")).kind == "default"


@pytest.mark.parametrize("compute", COMPUTES)
async def test_a_patch_after_the_build_reaches_a_flat_batch(
    monkeypatch: pytest.MonkeyPatch, compute: str
) -> None:
    learner = make_learner(
        n_batches=2,
        compute=compute,
        with_validation=False,
        stages={"fit_batch": FitBatch(Gradient(), Noise(), Update())},
    )
    await learner.fit(1)
    calls: list[int] = []
    monkeypatch.setattr(Noise, "compute", lambda self, state: calls.append(state.step))
    await learner.fit(2)
    assert calls == [2, 3]


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("where", ["gradient", "update"])
async def test_a_compute_set_on_an_instance_runs_in_the_default_batch(
    compute: str, where: str
) -> None:
    # As unittest.mock.patch.object would set it: the instance's compute, not the class's.
    gradient, update = Gradient(), Update()
    stage = gradient if where == "gradient" else update
    original = stage.compute
    calls: list[int] = []

    def patched(state: State) -> None:
        calls.append(state.batch_index)
        original(state)

    stage.compute = patched  # type: ignore[method-assign]
    learner = make_learner(
        n_batches=3,
        compute=compute,
        with_validation=False,
        stages={"fit_batch": FitBatch(gradient, update)},
    )
    await learner.fit(1)
    assert calls == [0, 1, 2]
    assert learner._rt.executor.program(learner.stage("fit_batch")).kind == "flat"


@pytest.mark.parametrize("compute", COMPUTES)
async def test_a_run_set_on_an_instance_runs_as_a_subclass_s_does(compute: str) -> None:
    fit_batch = FitBatch(Gradient(), Noise(), Update())
    original = fit_batch.run
    calls: list[int] = []

    async def logged(state: State) -> None:
        calls.append(state.batch_index)
        await original(state)

    fit_batch.run = logged  # type: ignore[method-assign]
    learner = make_learner(
        n_batches=3, compute=compute, with_validation=False, stages={"fit_batch": fit_batch}
    )
    await learner.fit(1)
    assert calls == [0, 1, 2]
    # Like a subclass overriding run without `fusable = True`: awaited, not fused.
    assert learner._rt.executor.program(fit_batch).kind == "async"


async def test_a_patch_after_the_build_reaches_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    learner = make_learner(n_batches=2)
    await learner.fit(1)
    original = ValidateLoss.compute
    calls: list[int] = []

    def patched(self: ValidateLoss, state: State) -> None:
        calls.append(1)
        original(self, state)

    monkeypatch.setattr(ValidateLoss, "compute", patched)
    await learner.validate()
    assert calls


# -- a field no stage declares, first set in a later batch ------------------------------------


class LateField(ComputeStage):
    """Sets an undeclared field in the third batch of an epoch only."""

    def compute(self, state: State) -> None:
        if state.batch_index == 2:
            state.late_field = 1


@pytest.mark.parametrize("compute", COMPUTES)
async def test_an_undeclared_field_set_in_a_later_batch_is_a_stage_error(compute: str) -> None:
    learner = make_learner(
        n_batches=4,
        compute=compute,
        with_validation=False,
        stages={"fit_batch": FitBatch(Gradient(), LateField(), Update())},
    )
    with pytest.raises(StageError, match=r"'late_field'.*no stage declares it"):
        await learner.fit(1)


class LateEpochField(ComputeStage):
    """Sets a declared epoch field in the third batch only: allowed, at any batch."""

    fields: ClassVar[dict[str, str]] = {"seen_late": "epoch"}

    def compute(self, state: State) -> None:
        if state.batch_index == 2:
            state.seen_late = state.batch_index


@pytest.mark.parametrize("compute", COMPUTES)
async def test_a_declared_field_set_in_a_later_batch_is_fine(compute: str) -> None:
    learner = make_learner(
        n_batches=4,
        compute=compute,
        with_validation=False,
        stages={"fit_batch": FitBatch(Gradient(), LateEpochField(), Update())},
    )
    await learner.fit(2)
    assert learner.state.step == 8


# -- control flow nobody owns -----------------------------------------------------------------


def Raises(hook: str, flow: Exception) -> Callback:  # noqa: N802 (reads as a class)
    """A callback whose ``hook`` raises ``flow``."""

    def method(self: Callback, state: StateView) -> None:
        raise flow

    cls: type[Callback] = type(f"Raises_{hook}", (Callback,), {hook: method})
    return cls()


@pytest.mark.parametrize("method", ["validate", "test"])
@pytest.mark.parametrize(
    ("hook", "flow"),
    [
        ("before_validate", StopFit("no fit runs")),
        ("before_validate", SkipBatch("no batch runs")),
        ("after_validate", StopFit("no fit runs")),
    ],
)
async def test_unowned_control_flow_in_validate_and_test_is_a_stage_error(
    method: str, hook: str, flow: Exception
) -> None:
    learner = make_learner(n_batches=2, callbacks=[Raises(hook, flow)])
    call = learner.validate() if method == "validate" else learner.test(make_batches(2))
    with pytest.raises(StageError, match="no stage owns it") as info:
        await call
    assert info.value.__cause__ is flow


async def test_control_flow_owned_in_validate_still_acts() -> None:
    learner = make_learner(
        n_batches=3, callbacks=[Raises("before_validate_batch", SkipBatch("skip all"))]
    )
    results = await learner.validate()
    assert "loss" not in results  # every batch skipped: no loss, and no error


@pytest.mark.parametrize("flow", [SkipBatch("late"), StopEpoch("late")])
async def test_batch_and_epoch_control_flow_in_after_fit_run_is_a_stage_error(
    flow: Exception,
) -> None:
    learner = make_learner(n_batches=2, callbacks=[Raises("after_fit_run", flow)])
    with pytest.raises(StageError, match="no stage owns it"):
        await learner.fit(1)
    assert learner.state.step == 2  # the run itself completed


async def test_stop_fit_in_after_fit_run_is_harmless_and_recorded() -> None:
    learner = make_learner(
        n_batches=2, callbacks=[Raises("after_fit_run", StopFit("too late to stop"))]
    )
    await learner.fit(1)
    assert learner.state.step == 2
    assert learner.state.stop_reason == "too late to stop"


# -- Parallel branches writing metrics ----------------------------------------------------------


class SetMetric(Stage):
    def __init__(self, key: str, value: float, *, name: str) -> None:
        super().__init__()
        self.key, self.value = key, value
        self.__dict__["name"] = name

    async def run(self, state: State) -> None:
        state.metrics[self.key] = self.value


async def test_parallel_branches_writing_one_metric_key_conflict() -> None:
    both = Parallel(SetMetric("p", 1.0, name="a"), SetMetric("p", 2.0, name="b"), name="validate")
    learner = make_learner(n_batches=2, stages={"validate": both})
    with pytest.raises(StageError, match=r"'a' and 'b' both changed key 'p' of state.metrics"):
        await learner.fit(1)


async def test_parallel_branches_writing_their_own_metric_keys_merge() -> None:
    both = Parallel(SetMetric("p", 1.0, name="a"), SetMetric("q", 2.0, name="b"), name="validate")
    learner = make_learner(n_batches=2, stages={"validate": both})
    await learner.fit(1)
    assert learner.state.metrics["p"] == 1.0
    assert learner.state.metrics["q"] == 2.0
    assert "train_loss" in learner.state.metrics  # what was there before is kept


# -- a renamed stage in the validation slot ---------------------------------------------------


class MeanOutput(Stage):
    """A pass over the validation data under another name than ``validate``."""

    async def run(self, state: State) -> None:
        total = 0.0
        async with self.context.open_pass(state, "validation") as batches:
            while (batch := await batches.next()) is not batches.END:
                with torch.no_grad():
                    total += float(state.model(batch[0]).mean())
        state.metrics["mean_output"] = total


async def test_validate_and_test_run_a_renamed_stage_in_the_validation_slot() -> None:
    learner = make_learner(n_batches=2, stages={"validate": MeanOutput()})
    assert learner.stage("mean_output") is not None
    await learner.validate()
    assert "mean_output" in learner.state.metrics
    await learner.test(make_batches(2, seed=3))


# -- open_pass("train") once the epoch's training pass is over --------------------------------


class TrainAgain(Stage):
    async def run(self, state: State) -> None:
        async with self.context.open_pass(state, "train"):
            pass


async def test_opening_the_training_pass_after_it_finished_is_a_clear_error() -> None:
    learner = make_learner(n_batches=2, stages={"validate": TrainAgain()})
    with pytest.raises(ValueError, match="pass the data itself"):
        await learner.fit(1)


# -- names --------------------------------------------------------------------------------------


class SAMStep(ComputeStage):
    def compute(self, state: State) -> None:
        pass


class SecondSAMStep(SAMStep):
    name = "second_sam_step"


async def test_acronyms_stay_whole_in_stage_names_and_a_subclass_renames_a_second_copy() -> None:
    assert SAMStep.name == "sam_step"
    assert SecondSAMStep.name == "second_sam_step"
    seen: list[str] = []

    class Hooks(Callback):
        def after_sam_step(self, state: StateView) -> None:
            seen.append("sam")

        def after_second_sam_step(self, state: StateView) -> None:
            seen.append("second")

    model = tiny_model()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        make_batches(1),
        callbacks=[Hooks()],
        stages={"fit_batch": FitBatch(Gradient(), SAMStep(), SecondSAMStep(), Update())},
    )
    await learner.fit(1)
    assert seen == ["sam", "second"]
