"""Seams found by checks written from the docs alone: the key aliases of declarations, refused
stage replacements, read-only windows' operators, the teardown hook, unowned control flow, a
cancellation during the teardown, a handle cancelled before it ran, and a failed fetch's note."""

from __future__ import annotations

from typing import Any, ClassVar

import anyio
import pytest
import torch

from aiolearner import (
    Callback,
    ComputeStage,
    ConfigurationError,
    Feed,
    FitBatch,
    FitHandle,
    Gradient,
    Learner,
    RunState,
    SkipBatch,
    StageError,
    StateAccessError,
    StateView,
    Update,
)
from aiolearner.callbacks import Metrics
from aiolearner.testing import make_batches, make_learner, tiny_model

# -- key aliases in the declarations' checks -----------------------------------------------------


class WritesCleanAccuracy(Callback):
    """Declares the key Metrics writes for a validation set named 'clean'."""

    writes = frozenset({"metrics.val_clean_accuracy"})

    def after_validate(self, state: StateView) -> None:
        state.metrics["val_clean_accuracy"] = -5.0


def test_a_set_key_and_the_single_set_key_it_stands_for_are_one_key() -> None:
    sets = {"clean": make_batches(2, seed=2), "noisy": make_batches(2, seed=3)}
    with pytest.raises(ConfigurationError, match="name the same key in some pass") as info:
        make_learner(callbacks=[Metrics(["accuracy"]), WritesCleanAccuracy()], val_data=sets)
    assert set(info.value.callbacks) == {"Metrics", "WritesCleanAccuracy"}


def test_without_that_set_they_are_different_keys() -> None:
    make_learner(callbacks=[Metrics(["accuracy"]), WritesCleanAccuracy()])  # builds


class WritesValAcc(Callback):
    writes = frozenset({"metrics.val_acc"})

    def after_validate(self, state: StateView) -> None:
        state.metrics["val_acc"] = 1.0


class WritesTestAcc(Callback):
    writes = frozenset({"metrics.test_acc"})

    def after_validate(self, state: StateView) -> None:
        state.metrics["test_acc"] = 2.0


def test_a_val_key_and_its_test_key_are_one_key() -> None:
    with pytest.raises(ConfigurationError, match="name the same key"):
        make_learner(callbacks=[WritesValAcc(), WritesTestAcc()])


class WritesAccBySet(Callback):
    """Writes ``val_<set>_acc`` under its single-set declaration."""

    reads = frozenset({"validation_set", "epoch"})
    writes = frozenset({"metrics.val_acc"})

    def after_validate_batch(self, state: StateView) -> None:
        state.metrics[f"val_{state.validation_set}_acc"] = float(state.epoch)


class ReadsCleanAcc(Callback):
    reads = frozenset({"metrics.val_clean_acc"})

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def after_validate_batch(self, state: StateView) -> None:
        self.seen.append(state.metrics.get("val_clean_acc", "unset"))


async def test_a_reader_of_a_set_key_runs_after_the_writer_of_its_single_set_key() -> None:
    reader = ReadsCleanAcc()
    learner = make_learner(
        callbacks=[reader, WritesAccBySet()],  # the reader listed first
        n_batches=2,
        val_data={"clean": make_batches(1, seed=2)},
    )
    await learner.fit(2)
    assert reader.seen == [0.0, 1.0]  # this epoch's value, never the previous one or unset


async def test_validating_sets_of_other_names_that_would_need_another_order_is_refused() -> None:
    learner = make_learner(callbacks=[ReadsCleanAcc(), WritesAccBySet()], n_batches=2)
    with pytest.raises(ConfigurationError, match="another order"):
        await learner.validate({"clean": make_batches(1, seed=2)})
    # Names that change nothing are fine.
    await learner.validate({"other": make_batches(1, seed=2)})


class WritesK(Callback):
    writes = frozenset({"metrics.k"})

    def after_fit(self, state: StateView) -> None:
        state.metrics["k"] = 1


def test_two_instances_of_one_class_are_not_told_to_order_themselves_with_after() -> None:
    with pytest.raises(ConfigurationError, match="cannot be ordered by 'after'"):
        make_learner(callbacks=[WritesK(), WritesK()])


# -- read-only windows' operators ----------------------------------------------------------------


class Operators(Callback):
    reads = frozenset({"metrics"})
    writes = frozenset({"metrics.mine"})

    def __init__(self) -> None:
        self.outcomes: dict[str, Any] = {}

    def after_fit(self, state: StateView) -> None:
        merged = state.metrics | {"extra": 1}
        self.outcomes["merge"] = sorted(merged)
        self.outcomes["rmerge"] = sorted({"extra": 1} | state.metrics)
        m = state.metrics
        try:
            m |= {"other": 2}
        except StateAccessError:
            self.outcomes["ior other"] = "refused"
        m |= {"mine": 3}  # its own key: allowed
        self.outcomes["ior mine"] = state.metrics["mine"]


async def test_dict_operators_on_state_windows_work_as_on_dicts_and_in_place_is_checked() -> None:
    probe = Operators()
    learner = make_learner(callbacks=[probe], n_batches=2)
    await learner.fit(1)
    assert probe.outcomes["merge"] == ["extra", "train_loss"]
    assert probe.outcomes["rmerge"] == ["extra", "train_loss"]
    assert probe.outcomes["ior other"] == "refused"
    assert probe.outcomes["ior mine"] == 3
    assert "other" not in learner.state.metrics


class ReadOnlyOperators(Callback):
    reads = frozenset({"metrics"})

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.merged: dict[str, Any] = {}

    def after_fit(self, state: StateView) -> None:
        self.merged = state.metrics | {"x": 1}
        m = state.metrics
        try:
            m |= {"x": 1}
        except StateAccessError as exc:
            self.error = exc


async def test_in_place_or_on_a_read_only_dict_is_a_state_access_error() -> None:
    probe = ReadOnlyOperators()
    await make_learner(callbacks=[probe], n_batches=2).fit(1)
    assert isinstance(probe.error, StateAccessError)
    assert "metrics" in str(probe.error)
    assert probe.merged["x"] == 1


# -- a refused stage replacement leaves the learner as it was ------------------------------------


class GradNoise(ComputeStage):
    fields: ClassVar[dict[str, str]] = {"noise": "batch"}

    def compute(self, state: Any) -> None:
        state.noise = 1


class HooksNoise(Callback):
    reads = frozenset({"noise"})

    def __init__(self) -> None:
        self.calls = 0

    def after_grad_noise(self, state: StateView) -> None:
        self.calls += 1


class OtherLifetime(ComputeStage):
    name = "other"
    fields: ClassVar[dict[str, str]] = {"noise": "epoch"}

    def compute(self, state: Any) -> None:
        state.noise = 2


@pytest.mark.parametrize("replacement", ["drops a hooked stage", "conflicting lifetimes"])
async def test_a_refused_replace_stage_leaves_the_learner_as_it_was(replacement: str) -> None:
    hooked = HooksNoise()
    learner = make_learner(
        callbacks=[hooked],
        n_batches=2,
        stages={"fit_batch": FitBatch(Gradient(), GradNoise(), Update())},
    )
    before = learner.describe()
    new = (
        FitBatch()
        if replacement == "drops a hooked stage"
        else FitBatch(Gradient(), GradNoise(), OtherLifetime(), Update())
    )
    with pytest.raises(ConfigurationError):
        learner.replace_stage("fit_batch", new)
    assert learner.describe() == before
    await learner.fit(1)
    assert hooked.calls == 2
    # The refused stages belong to no learner: they can go into another one.
    make_learner(stages={"fit_batch": new}) if replacement == "drops a hooked stage" else None


# -- the teardown hook runs every callback -------------------------------------------------------


class FailsInTeardown(Callback):
    def after_fit_run(self, state: StateView) -> None:
        raise ValueError("a logger broke")


class AsyncFailsInTeardown(Callback):
    async def after_fit_run(self, state: StateView) -> None:
        raise ValueError("a logger broke")


class Records(Callback):
    def __init__(self) -> None:
        self.ran = False

    async def after_fit_run(self, state: StateView) -> None:
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        self.ran = True


@pytest.mark.parametrize("failing", [FailsInTeardown, AsyncFailsInTeardown])
@pytest.mark.parametrize("first", [True, False])
async def test_a_failing_teardown_callback_does_not_keep_the_others_from_running(
    failing: type[Callback], first: bool
) -> None:
    other = Records()
    callbacks = [failing(), other] if first else [other, failing()]
    learner = make_learner(callbacks=callbacks, n_batches=2)
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="a logger broke")):
        await learner.fit(1)
    assert other.ran


# -- control flow nobody owns names who raised it -------------------------------------------------


class SkipsInBeforeEpoch(Callback):
    def before_epoch(self, state: StateView) -> None:
        raise SkipBatch("wrong place")


async def test_unowned_control_flow_names_the_callback_and_the_hook() -> None:
    learner = make_learner(callbacks=[SkipsInBeforeEpoch()], n_batches=2)
    with pytest.raises(StageError, match="by callback 'SkipsInBeforeEpoch' in hook 'before_epoch'"):
        await learner.fit(1)


# -- a cancellation during the teardown reaches the caller ---------------------------------------


class CancelsInTeardown(Callback):
    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope

    def after_fit_run(self, state: StateView) -> None:
        self.scope.cancel()


@pytest.mark.parametrize(
    "options",
    [{}, {"compute": "thread"}, {"validate": "concurrent"}],
    ids=["default", "thread", "concurrent"],
)
async def test_a_cancellation_during_the_teardown_of_a_completed_run_is_raised(
    options: dict[str, Any],
) -> None:
    after_fit: list[str] = []
    with anyio.CancelScope() as scope:
        learner = make_learner(callbacks=[CancelsInTeardown(scope)], n_batches=2, **options)
        await learner.fit(1)
        after_fit.append("fit returned")  # pragma: no cover - the cancellation comes first
    assert scope.cancelled_caught
    assert after_fit == []
    assert learner.state.epoch == 1


# -- a handle cancelled before it ran ------------------------------------------------------------


async def test_a_handle_cancelled_before_run_is_done_at_once() -> None:
    handle = FitHandle(make_learner(), 3)
    handle.cancel()
    assert handle.done
    assert handle.state is RunState.CANCELLED
    assert await handle.wait_done() is RunState.CANCELLED
    assert [e async for e in handle.events()] == []
    assert await handle.run() is RunState.CANCELLED  # returns at once, trains nothing
    assert handle.learner.state.step == 0
    with pytest.raises(RuntimeError, match="runs once"):
        await handle.run()


# -- the note of a failed fetch counts the batch of the pass as the state does --------------------


async def test_a_failed_fetch_names_the_batch_the_pass_is_at() -> None:
    feed = Feed[tuple[torch.Tensor, torch.Tensor]](batch_size=32, buffer=64)
    torch.manual_seed(0)
    model = tiny_model()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        feed,
        steps_per_epoch=20,
    )

    async def produce() -> None:
        async with feed:
            for _ in range(700):
                await feed.send((torch.randn(4), torch.tensor(1)))
            raise OSError("the source went away")

    with pytest.RaisesGroup(
        pytest.RaisesExc(OSError), allow_unwrapped=True, flatten_subgroups=True
    ) as info:
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            await learner.fit(10)
    (error,) = info.value.exceptions
    index = learner.state.batch_index
    notes = [n for n in error.__notes__ if "while fetching" in n]
    assert notes == [
        f"aiolearner: raised by train_data (Feed) while fetching batch {index} of this pass"
    ], error.__notes__


# -- arguments and messages of the public API ----------------------------------------------------


async def test_an_iterator_as_data_is_refused_by_a_fit_that_needs_several_passes() -> None:
    learner = make_learner(train_data=iter(make_batches(4)))
    with pytest.raises(ValueError, match=r"an iterator \(list_iterator\)"):
        await learner.fit(2)
    assert learner.state.step == 0  # refused before training
    one = make_learner(train_data=iter(make_batches(4)))
    await one.fit(1)  # one pass is fine
    assert one.state.step == 4


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"steps_per_epoch": 2.5}, TypeError),
        ({"steps_per_epoch": True}, TypeError),
        ({"steps_per_epoch": 0}, ValueError),
        ({"prefetch": 1.5}, TypeError),
        ({"max_blocking": float("nan")}, TypeError),
        ({"strategy": "ddp"}, TypeError),
    ],
)
def test_options_of_the_wrong_kind_are_refused_naming_them(
    options: dict[str, Any], error: type[Exception]
) -> None:
    (name,) = options
    with pytest.raises(error, match=name):
        make_learner(**options)


def test_feed_and_handle_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="batch_size"):
        Feed(batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finalize_timeout"):
        FitHandle(make_learner(), 1, finalize_timeout=0)


def test_replace_stage_with_something_else_than_a_stage_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="must be a Stage"):
        make_learner().replace_stage("gradient", "not a stage")  # type: ignore[arg-type]


def test_loading_a_file_that_is_not_a_checkpoint_names_the_file(tmp_path: Any) -> None:
    path = tmp_path / "weights.pt"
    learner = make_learner()
    torch.save(learner.model.state_dict(), path)
    with pytest.raises(ValueError, match=r"checkpoint file '.*weights\.pt': not an aiolearner"):
        learner.load_checkpoint(path)


def test_publish_takes_only_the_user_kinds() -> None:
    learner = make_learner()
    learner.publish("log", "me", {"text": "hello"})
    with pytest.raises(ValueError, match="'metrics' or 'log'"):
        learner.publish("run_end", "me", {})


class SnapshotsInAfterFitBatch(Callback):
    reads = frozenset({"loss"})

    def __init__(self, learner: Learner[Any] | None = None) -> None:
        self.learner = learner
        self.rows: list[tuple[int, Any, float]] = []
        self.losses: list[float] = []

    def after_fit_batch(self, state: StateView) -> None:
        assert self.learner is not None
        self.losses.append(float(state.loss.detach()))
        snap = self.learner.snapshot()
        mean = sum(self.losses) / len(self.losses)
        self.rows.append((snap.batch_index, snap.metrics.get("train_loss_running"), mean))


async def test_the_running_loss_of_a_snapshot_counts_the_batches_batch_index_counts() -> None:
    probe = SnapshotsInAfterFitBatch()
    learner = make_learner(callbacks=[probe], n_batches=3)
    probe.learner = learner
    await learner.fit(1)
    assert [row[0] for row in probe.rows] == [1, 2, 3]
    for _, running, mean in probe.rows:
        assert running == pytest.approx(mean)


def test_seed_everything_takes_a_numpy_integer() -> None:
    import numpy as np

    from aiolearner import seed_everything

    seed_everything(np.int64(3))  # type: ignore[arg-type]
    first = torch.rand(1)
    seed_everything(3)
    assert torch.equal(first, torch.rand(1))


def test_a_callback_on_the_unnamed_update_among_named_ones_is_told_to_name_one() -> None:
    from aiolearner import Update
    from aiolearner.callbacks import GradientClipping

    model = tiny_model()
    optimizers = {
        "body": torch.optim.SGD(model[0].parameters(), lr=0.1),  # type: ignore[index]
        "head": torch.optim.SGD(model[2].parameters(), lr=0.1),  # type: ignore[index]
    }
    with pytest.raises(ConfigurationError, match=r"update_body, update_head\): give the callback"):
        Learner(
            model,
            optimizers,
            torch.nn.functional.cross_entropy,
            make_batches(2),
            callbacks=[GradientClipping(1.0)],
            stages={
                "fit_batch": FitBatch(Gradient(), Update("body", commit=False), Update("head"))
            },
        )


# -- a def hook in the compute worker thread and the event loop's objects -------------------------


class CancelsFromDefHook(Callback):
    """After the third update, cancels ``scope``: handed to the loop with ``state.start_soon``
    (the documented way), or (``direct``) by using the event loop from the hook itself."""

    def __init__(self, scope: anyio.CancelScope, *, direct: bool) -> None:
        self.scope, self.direct, self.updates = scope, direct, 0

    def after_update(self, state: StateView) -> None:
        self.updates += 1
        if self.updates != 3:
            return
        if self.direct:
            anyio.lowlevel.current_token()  # what scope.cancel() does under trio: needs the loop
            return
        scope = self.scope

        async def cancel() -> None:
            scope.cancel()

        state.start_soon(cancel)


@pytest.mark.parametrize("compute", ["thread", "inline", "auto"])
async def test_a_def_hook_cancels_the_caller_s_scope_through_start_soon(compute: str) -> None:
    with anyio.CancelScope() as scope:
        learner = make_learner(
            n_batches=4, callbacks=[CancelsFromDefHook(scope, direct=False)], compute=compute
        )
        await learner.fit(50)
    assert scope.cancelled_caught
    assert 3 <= learner.state.step < 200


async def test_a_def_hook_using_the_event_loop_from_the_worker_thread_is_told_why() -> None:
    learner = make_learner(
        n_batches=4,
        callbacks=[CancelsFromDefHook(anyio.CancelScope(), direct=True)],
        compute="thread",
    )
    with pytest.RaisesGroup(
        pytest.RaisesExc(RuntimeError, check=lambda e: "state.start_soon" in str(e.__notes__))
    ):
        await learner.fit(2)


class FailsWithATorchError(Callback):
    def after_update(self, state: StateView) -> None:
        torch.zeros(2, 3) @ torch.zeros(2, 3)  # a RuntimeError of torch's, not the loop's


async def test_another_runtime_error_of_a_def_hook_in_the_worker_gets_no_loop_note() -> None:
    learner = make_learner(n_batches=2, callbacks=[FailsWithATorchError()], compute="thread")
    with pytest.RaisesGroup(
        pytest.RaisesExc(RuntimeError, check=lambda e: "start_soon" not in str(e.__notes__))
    ):
        await learner.fit(1)
