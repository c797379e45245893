"""The stage author's API: StageContext, any number of batch sub-stages, declared fields and their
lifetimes, commits, one definition of the default step, and how each batch stage is compiled."""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import torch

import aiolearner
from aiolearner import (
    Callback,
    ComputeStage,
    ConfigurationError,
    FitBatch,
    Gradient,
    Learner,
    SkipBatch,
    Stage,
    StageContext,
    StageError,
    State,
    StateAccessError,
    StateView,
    StopEpoch,
    Update,
)
from aiolearner.testing import make_batches, make_learner, tiny_model


class GradNoise(ComputeStage):
    """Adds Gaussian noise to the gradients (between Gradient and Update)."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std
        self.calls = 0

    def compute(self, state: State) -> None:
        self.calls += 1
        for p in state.model.parameters():
            if p.grad is not None:
                p.grad.add_(torch.randn_like(p.grad), alpha=self.std)


def weights(learner: Learner[Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


def program_kind(learner: Learner[Any], name: str = "fit_batch") -> str:
    return learner._rt.executor.program(learner.stage(name)).kind


# -- sub-stages and the compiled programs -------------------------------------------------------


async def test_fit_batch_takes_any_number_of_sub_stages() -> None:
    noise = GradNoise(1e-3)
    learner = make_learner(
        n_batches=3,
        with_validation=False,
        stages={"fit_batch": FitBatch(Gradient(), noise, Update())},
    )
    assert "FitBatch (fit_batch) [fused batch]" in learner.describe()
    assert program_kind(learner) == "flat"
    torch.manual_seed(0)
    await learner.fit(2)
    assert noise.calls == 6
    assert learner.state.step == 6
    # The same run without the noise stage ends elsewhere.
    plain = make_learner(n_batches=3, with_validation=False)
    torch.manual_seed(0)
    await plain.fit(2)
    assert any(not torch.equal(a, b) for a, b in zip(weights(learner), weights(plain), strict=True))


def test_fit_batch_refuses_positional_and_keyword_stages_together() -> None:
    with pytest.raises(TypeError, match="positionally or as gradient"):
        FitBatch(Gradient(), update=Update())
    with pytest.raises(TypeError, match="takes stages as children"):
        FitBatch(Gradient(), "update")  # type: ignore[arg-type]


def test_a_stage_class_given_for_a_stage_object_is_named_with_the_call_it_misses() -> None:
    with pytest.raises(
        TypeError, match=r"the class Gradient itself \(pass a stage object: Gradient\(\)\)"
    ):
        FitBatch(Gradient, Update())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"stages\['fit_batch'\].*the class FitBatch itself"):
        make_learner(stages={"fit_batch": FitBatch})  # type: ignore[dict-item]
    learner = make_learner()
    with pytest.raises(
        TypeError, match=r"the class Update itself \(pass a stage object: Update\(\)\)"
    ):
        learner.replace_stage("update", Update)  # type: ignore[arg-type]


async def test_patching_gradient_compute_on_the_class_reaches_the_default_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = Gradient.compute
    calls: list[int] = []

    def patched(self: Gradient, state: State) -> None:
        calls.append(state.batch_index)
        original(self, state)

    monkeypatch.setattr(Gradient, "compute", patched)
    learner = make_learner(n_batches=3, with_validation=False)
    await learner.fit(1)
    assert calls == [0, 1, 2]


async def test_patching_update_compute_on_the_class_reaches_the_default_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = Update.compute
    calls: list[int] = []

    def patched(self: Update, state: State) -> None:
        calls.append(state.step)
        original(self, state)

    monkeypatch.setattr(Update, "compute", patched)
    learner = make_learner(n_batches=2, with_validation=False)
    await learner.fit(2)
    assert calls == [0, 1, 2, 3]


class LoggingFitBatch(FitBatch):
    """Overrides ``run`` only to log; declares that it awaits nothing but sub-stages."""

    fusable = True

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[int] = []

    async def run(self, state: State) -> None:
        self.logged.append(state.batch_index)
        await super().run(state)


class AwaitingFitBatch(FitBatch):
    """Overrides ``run`` and really awaits something: must not be fused."""

    async def run(self, state: State) -> None:
        await anyio.lowlevel.checkpoint()
        await super().run(state)


class ThreadOf(Callback):
    def __init__(self) -> None:
        self.threads: set[int] = set()

    def after_gradient(self, state: StateView) -> None:
        self.threads.add(threading.get_ident())


async def test_overriding_run_to_log_keeps_the_batch_fused_when_declared() -> None:
    logging_batch = LoggingFitBatch()
    hook = ThreadOf()
    fused = make_learner(
        n_batches=4, compute="thread", callbacks=[hook], stages={"fit_batch": logging_batch}
    )
    assert program_kind(fused) == "fused"
    plain_hook = ThreadOf()
    plain = make_learner(n_batches=4, compute="thread", callbacks=[plain_hook])
    torch.manual_seed(3)
    await fused.fit(2)
    torch.manual_seed(3)
    await plain.fit(2)
    assert logging_batch.logged == [0, 1, 2, 3] * 2
    # Same thread for the hooks as the default batch (the compute worker), same weights.
    loop = threading.get_ident()
    assert loop not in hook.threads
    assert loop not in plain_hook.threads
    for a, b in zip(weights(fused), weights(plain), strict=True):
        assert torch.equal(a, b)
    assert fused.state.metrics == plain.state.metrics


async def test_a_run_that_awaits_is_not_fused_and_still_matches() -> None:
    awaiting = make_learner(n_batches=3, stages={"fit_batch": AwaitingFitBatch()})
    assert program_kind(awaiting) == "async"
    assert "FitBatch (fit_batch) [fused batch]" not in awaiting.describe()
    plain = make_learner(n_batches=3)
    await awaiting.fit(2)
    await plain.fit(2)
    for a, b in zip(weights(awaiting), weights(plain), strict=True):
        assert torch.equal(a, b)


class LyingFitBatch(FitBatch):
    """Declares fusable but awaits a checkpoint: an error naming the stage."""

    fusable = True

    async def run(self, state: State) -> None:
        await anyio.lowlevel.checkpoint()
        await super().run(state)


async def test_a_fusable_stage_that_suspends_is_a_stage_error() -> None:
    learner = make_learner(
        n_batches=2, compute="inline", with_validation=False, stages={"fit_batch": LyingFitBatch()}
    )
    with pytest.raises(StageError, match="fit_batch") as info:
        await learner.fit(1)
    assert info.value.stage == "fit_batch"
    assert learner.state.step == 0


# -- commits -------------------------------------------------------------------------------------


class NoCommitUpdate(ComputeStage):
    name = "update"
    writes_weights = True

    def compute(self, state: State) -> None:
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_batch_that_is_never_committed_is_an_error_naming_the_stage(compute: str) -> None:
    learner = make_learner(
        n_batches=2,
        compute=compute,
        with_validation=False,
        stages={"fit_batch": FitBatch(Gradient(), NoCommitUpdate())},
    )
    with pytest.raises(StageError, match="without being committed") as info:
        await learner.fit(1)
    assert info.value.stage == "fit_batch"
    assert isinstance(info.value, RuntimeError)


class DoubleCommit(Update):
    def compute(self, state: State) -> None:
        super().compute(state)
        self.context.commit(state)


async def test_committing_twice_in_a_batch_is_one_commit() -> None:
    learner = make_learner(n_batches=3, with_validation=False, stages={"update": DoubleCommit()})
    await learner.fit(1)
    assert learner.state.step == 3
    assert learner.state.batch_index == 0  # the epoch ended


class SkipSecond(Callback):
    reads = frozenset({"batch_index"})

    def before_gradient(self, state: StateView) -> None:
        if state.batch_index == 1:
            raise SkipBatch("second")


async def test_skipped_and_stopped_batches_are_committed_for_the_stage() -> None:
    learner = make_learner(n_batches=3, with_validation=False, callbacks=[SkipSecond()])
    await learner.fit(1)
    assert learner.state.step == 3

    class StopSecond(Callback):
        reads = frozenset({"batch_index"})

        def after_gradient(self, state: StateView) -> None:
            if state.batch_index == 1:
                raise StopEpoch("enough")

    stopped = make_learner(n_batches=4, with_validation=False, callbacks=[StopSecond()])
    await stopped.fit(1)
    assert stopped.state.step == 2


# -- declared fields and their lifetimes ---------------------------------------------------------


class Probe(ComputeStage):
    """Sets one field of each lifetime."""

    fields: ClassVar[dict[str, str]] = {
        "per_batch": "batch",
        "per_epoch": "epoch",
        "per_run": "run",
    }

    def compute(self, state: State) -> None:
        state.per_batch = state.batch_index
        state.per_epoch = state.epoch
        state.per_run = state.step


class Reader(Callback):
    reads = frozenset({"per_batch", "per_epoch", "per_run", "batch_index"})

    def __init__(self) -> None:
        self.errors: dict[str, list[StateAccessError]] = {}
        self.seen: list[tuple[str, Any]] = []

    def _read(self, hook: str, state: StateView, field: str) -> None:
        try:
            self.seen.append((f"{hook}.{field}", getattr(state, field)))
        except StateAccessError as exc:
            self.errors.setdefault(f"{hook}.{field}", []).append(exc)

    def before_fit_batch(self, state: StateView) -> None:
        self._read("before_fit_batch", state, "per_batch")

    def after_fit_batch(self, state: StateView) -> None:
        self._read("after_fit_batch", state, "per_batch")

    def before_epoch(self, state: StateView) -> None:
        self._read("before_epoch", state, "per_epoch")

    def after_epoch(self, state: StateView) -> None:
        self._read("after_epoch", state, "per_epoch")

    def after_fit_run(self, state: StateView) -> None:
        self._read("after_fit_run", state, "per_run")


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_declared_fields_expire_with_their_lifetime(compute: str) -> None:
    reader = Reader()
    probe = Probe()
    learner = make_learner(
        n_batches=2,
        compute=compute,
        callbacks=[reader],
        stages={"fit_batch": FitBatch(Gradient(), probe, Update())},
    )
    await learner.fit(2)
    # Never stale: a batch field is gone before the next batch's before_ hooks.
    errors = reader.errors["before_fit_batch.per_batch"]
    assert len(errors) == 4
    message = str(errors[0])
    assert "'per_batch'" in message
    assert "stage 'probe'" in message
    assert "lifetime 'batch'" in message
    assert ("after_fit_batch.per_batch", 0) in reader.seen
    assert ("after_fit_batch.per_batch", 1) in reader.seen
    # An epoch field lives until its epoch ends; a run field until the run ends.
    assert len(reader.errors["before_epoch.per_epoch"]) == 2
    assert ("after_epoch.per_epoch", 0) in reader.seen
    assert ("after_epoch.per_epoch", 1) in reader.seen
    assert ("after_fit_run.per_run", 3) in reader.seen
    with pytest.raises(StateAccessError, match="lifetime 'run'"):
        learner.state.per_run  # noqa: B018


class Undeclared(ComputeStage):
    def compute(self, state: State) -> None:
        state.secret = 1


async def test_a_field_no_stage_declares_is_a_stage_error() -> None:
    learner = make_learner(
        n_batches=2,
        with_validation=False,
        stages={"fit_batch": FitBatch(Gradient(), Undeclared(), Update())},
    )
    with pytest.raises(StageError, match=r"'secret'.*no stage declares it") as caught:
        await learner.fit(1)
    # Which stage of the batch set it cannot be known: the batch's stages are named.
    assert "'undeclared'" in str(caught.value)


def test_a_lifetime_that_is_not_one_is_refused_when_the_class_is_made() -> None:
    with pytest.raises(ConfigurationError, match="lifetime 'forever'"):

        class Bad(ComputeStage):
            fields: ClassVar[dict[str, str]] = {"x": "forever"}


def test_two_stages_declaring_a_field_with_different_lifetimes_are_refused() -> None:
    class A(ComputeStage):
        fields: ClassVar[dict[str, str]] = {"shared": "batch"}

    class B(ComputeStage):
        fields: ClassVar[dict[str, str]] = {"shared": "epoch"}

    with pytest.raises(ConfigurationError, match="different lifetimes"):
        make_learner(stages={"fit_batch": FitBatch(Gradient(), A(), B(), Update())})


# -- the context --------------------------------------------------------------------------------


class Scores(Stage):
    """A pass-level stage over other data, written on the context alone."""

    fields: ClassVar[dict[str, str]] = {"scores": "run"}

    def __init__(self, data: Any) -> None:
        super().__init__()
        self.data = data

    async def run(self, state: State) -> None:
        context = self.context
        assert isinstance(context, StageContext)
        scores = []
        async with context.open_pass(state, self.data) as batches:
            while (batch := await batches.next()) is not batches.END:
                inputs, _ = batch
                scores.append(await context.compute(state.model, inputs))
        state.scores = torch.cat(scores)


async def test_a_pass_level_stage_over_other_data_uses_the_context() -> None:
    scorer = Scores(make_batches(3, seed=9))

    class Keep(Callback):
        reads = frozenset({"scores"})
        shape: tuple[int, ...] = ()

        def after_scores(self, state: StateView) -> None:
            Keep.shape = tuple(state.scores.shape)

    # In the place of Validate, which runs only with val_data: give it some.
    learner = make_learner(
        n_batches=2, val_data=make_batches(1), callbacks=[Keep()], stages={"validate": scorer}
    )
    await learner.fit(1)
    assert Keep.shape == (15, 3)


async def test_the_context_runs_compute_and_holds_the_lock_for_weight_writes() -> None:
    seen: list[bool] = []

    class Check(Callback):
        async def before_fit(self, state: StateView) -> None:
            def inside() -> int:
                seen.append(context.weights_lock.write_locked)
                return 7

            assert await context.compute(inside, writes_weights=True) == 7
            assert await context.compute(inside) == 7

    learner = make_learner(n_batches=1, with_validation=False, callbacks=[Check()])
    context = learner.stage("update").context
    await learner.fit(1)
    assert seen == [True, False]
    assert learner.stage("update").runtime is context  # the earlier name


def test_a_stage_outside_a_learner_has_no_context() -> None:
    with pytest.raises(StageError, match="not part of a built Learner"):
        Gradient().context  # noqa: B018


# -- errors of our own type -----------------------------------------------------------------------


async def test_unowned_control_flow_is_a_stage_error() -> None:
    class StopEpochOutside(Callback):
        def before_fit_run(self, state: StateView) -> None:
            raise StopEpoch("nobody owns me here")

    learner = make_learner(callbacks=[StopEpochOutside()])
    with pytest.raises(StageError, match="no stage owns it") as info:
        await learner.fit(1)
    assert isinstance(info.value.__cause__, StopEpoch)


# -- shipped callbacks use the public API only --------------------------------------------------


def test_shipped_callbacks_import_no_private_module() -> None:
    package = Path(aiolearner.__file__).parent / "callbacks"
    offenders = []
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                # "from .. import x" or "from .._private import x": the core's private modules.
                if node.level >= 2 or (module.startswith("aiolearner._")):
                    offenders.append(f"{path.name}: from {'.' * node.level}{module}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("aiolearner._"):
                        offenders.append(f"{path.name}: import {alias.name}")
    assert offenders == []


def test_tiny_model_is_what_the_learners_here_train() -> None:
    # Guards the helpers above: make_learner trains the testing tiny model.
    assert isinstance(make_learner().model, type(tiny_model()))
