"""The stop/error/cancel table: which hooks still run after StopFit, StopEpoch, SkipBatch, an
error and a cancellation; the counters; ``state.outcome`` in ``after_fit_run``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import torch
from cancel_helpers import Hang

from aiolearner import (
    Callback,
    FitBatch,
    Gradient,
    SkipBatch,
    State,
    StateAccessError,
    StateView,
    StopEpoch,
    StopFit,
)
from aiolearner.testing import RecordingCallback, make_batches, make_learner, tiny_model

N_BATCHES = 3
N_VAL = 2


def fit_batch(e: int, s: int, *, until: str | None = None) -> list[str]:
    """The hooks of one training batch starting at step ``s``, cut after hook ``until``."""
    hooks = [
        ("before_fit_batch", s),
        ("before_gradient", s),
        ("after_gradient", s),
        ("before_update", s),
        ("after_update", s + 1),
        ("after_fit_batch", s + 1),
    ]
    out = []
    for hook, step in hooks:
        out.append(f"{hook}@{e}:{step}")
        if hook == until:
            break
    return out


def validation(e: int, s: int, *, n: int = N_VAL, until: str | None = None) -> list[str]:
    out = [f"before_validate@{e}:{s}"]
    for _ in range(n):
        for hook in (
            "before_validate_batch",
            "before_validate_loss",
            "after_validate_loss",
            "after_validate_batch",
        ):
            out.append(f"{hook}@{e}:{s}")
            if hook == until:
                return out
    return out


def epoch(e: int, s: int) -> list[str]:
    """A whole, undisturbed epoch starting at step ``s``."""
    out = [f"before_epoch@{e}:{s}", f"before_fit@{e}:{s}"]
    for i in range(N_BATCHES):
        out += fit_batch(e, s + i)
    s += N_BATCHES
    out += [f"after_fit@{e}:{s}", *validation(e, s), f"after_validate@{e}:{s}"]
    return [*out, f"after_epoch@{e}:{s}"]


class Outcome(Callback):
    """Keeps ``state.outcome`` (and the stop reason) as seen by after_fit_run."""

    reads = frozenset({"outcome", "stop_reason"})

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def after_fit_run(self, state: StateView) -> None:
        reason = state.stop_reason if state.is_valid("stop_reason") else None
        self.seen.append((state.outcome, reason))


def setup(raise_at: dict[str, BaseException], **options: Any) -> tuple[Any, Any, Outcome]:
    rec = RecordingCallback(with_counters=True, raise_at=raise_at)
    outcome = Outcome()
    learner = make_learner(callbacks=[rec, outcome], n_batches=N_BATCHES, **options)
    return learner, rec, outcome


def weights(learner: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


def reference(batch_plan: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Plain-torch SGD over the learner's data: ``batch_plan[e]`` lists the batches of epoch e."""
    model = tiny_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_batches(N_BATCHES, seed=1)
    for indices in batch_plan:
        for i in indices:
            x, y = data[i]
            torch.nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
            opt.step()
            opt.zero_grad(set_to_none=True)
    return [p.detach() for p in model.parameters()]


def assert_same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-6), (x, y)


# -- SkipBatch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_skip_batch_from_after_gradient(compute: str) -> None:
    learner, rec, outcome = setup({"after_gradient": SkipBatch("bad batch")}, compute=compute)
    await learner.fit(2)
    assert rec.calls == [
        "before_fit_run@0:0",
        "before_epoch@0:0",
        "before_fit@0:0",
        *fit_batch(0, 0, until="after_gradient"),  # no update, no after_fit_batch
        *fit_batch(0, 1),  # the next batch goes on; the skipped one counted
        *fit_batch(0, 2),
        "after_fit@0:3",
        *validation(0, 3),
        "after_validate@0:3",
        "after_epoch@0:3",
        *epoch(1, 3),
        "after_fit_run@2:6",
    ]
    assert (learner.state.epoch, learner.state.step) == (2, 6)
    assert outcome.seen == [("completed", "bad batch")]
    # The skipped batch left no trace in the weights (not even through its gradient).
    assert_same(weights(learner), reference([[1, 2], [0, 1, 2]]))


async def test_skip_batch_from_before_fit_batch() -> None:
    learner, rec, outcome = setup({"before_fit_batch": SkipBatch()})
    await learner.fit(1)
    assert rec.calls == [
        "before_fit_run@0:0",
        "before_epoch@0:0",
        "before_fit@0:0",
        "before_fit_batch@0:0",
        *fit_batch(0, 1),
        *fit_batch(0, 2),
        "after_fit@0:3",
        *validation(0, 3),
        "after_validate@0:3",
        "after_epoch@0:3",
        "after_fit_run@1:3",
    ]
    assert outcome.seen == [("completed", "SkipBatch")]
    assert_same(weights(learner), reference([[1, 2]]))


async def test_skip_batch_from_after_update_keeps_the_update() -> None:
    learner, rec, _ = setup({"after_update": SkipBatch()})
    await learner.fit(1)
    assert rec.calls[3:8] == fit_batch(0, 0, until="after_update")
    assert rec.calls[8] == "before_fit_batch@0:1"
    assert learner.state.step == 3
    assert_same(weights(learner), reference([[0, 1, 2]]))


async def test_skip_batch_in_validation_leaves_the_batch_out() -> None:
    learner, rec, _ = setup({"before_validate_loss": SkipBatch()})
    await learner.fit(1)
    assert (
        rec.calls[-10:]
        == [
            "before_validate@0:3",
            "before_validate_batch@0:3",
            "before_validate_loss@0:3",  # no after_validate_loss / after_validate_batch
            *validation(0, 3)[1:5],  # the second batch
            "after_validate@0:3",
            "after_epoch@0:3",
            "after_fit_run@1:3",
        ]
    )
    # The validation loss is the second batch's alone.
    model = learner.model
    x, y = make_batches(2, seed=2)[1]
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(x), y))
    assert learner.state.validation["loss"] == pytest.approx(expected, rel=1e-6)


# -- StopEpoch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_stop_epoch_inside_the_training_pass(compute: str) -> None:
    learner, rec, outcome = setup({"after_gradient": StopEpoch("enough")}, compute=compute)
    await learner.fit(2)
    assert rec.calls == [
        "before_fit_run@0:0",
        "before_epoch@0:0",
        "before_fit@0:0",
        *fit_batch(0, 0, until="after_gradient"),
        "after_fit@0:1",  # the pass closes normally
        *validation(0, 1),
        "after_validate@0:1",
        "after_epoch@0:1",
        *epoch(1, 1),  # and the next epoch runs
        "after_fit_run@2:4",
    ]
    assert (learner.state.epoch, learner.state.step) == (2, 4)
    assert outcome.seen == [("completed", "enough")]
    assert_same(weights(learner), reference([[], [0, 1, 2]]))


async def test_stop_epoch_from_before_fit() -> None:
    learner, rec, _ = setup({"before_fit": StopEpoch()})
    await learner.fit(1)
    assert rec.calls == [
        "before_fit_run@0:0",
        "before_epoch@0:0",
        "before_fit@0:0",
        "after_fit@0:0",
        *validation(0, 0),
        "after_validate@0:0",
        "after_epoch@0:0",
        "after_fit_run@1:0",
    ]


async def test_stop_epoch_inside_validation() -> None:
    learner, rec, _ = setup({"after_validate_loss": StopEpoch()})
    await learner.fit(1)
    assert rec.calls[-6:] == [
        "before_validate_batch@0:3",
        "before_validate_loss@0:3",
        "after_validate_loss@0:3",  # after_validate_batch and the second batch are skipped
        "after_validate@0:3",
        "after_epoch@0:3",
        "after_fit_run@1:3",
    ]


async def test_stop_epoch_from_before_epoch_ends_the_epoch() -> None:
    learner, rec, _ = setup({"before_epoch": StopEpoch()})
    await learner.fit(2)
    assert rec.calls == [
        "before_fit_run@0:0",
        "before_epoch@0:0",
        "after_epoch@0:0",
        *epoch(1, 0),
        "after_fit_run@2:3",
    ]


# -- StopFit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_stop_fit_inside_a_batch_then_fit_continues(compute: str) -> None:
    learner, rec, outcome = setup({}, compute=compute)

    class StopAtStep1(Callback):
        reads = frozenset({"step"})
        fired = False

        def after_gradient(self, state: StateView) -> None:
            if state.step == 1 and not self.fired:
                self.fired = True
                raise StopFit("halt")

    learner = make_learner(
        callbacks=[rec, outcome, StopAtStep1()], n_batches=N_BATCHES, compute=compute
    )
    await learner.fit(2)  # returns normally
    assert rec.calls == [
        "before_fit_run@0:0",
        "before_epoch@0:0",
        "before_fit@0:0",
        *fit_batch(0, 0),
        *fit_batch(0, 1, until="after_gradient"),
        "after_fit_run@0:1",  # no after_fit, after_epoch, ...
    ]
    assert outcome.seen == [("stopped", "halt")]
    assert (learner.state.epoch, learner.state.step, learner.state.batch_index) == (0, 1, 1)
    assert_same(weights(learner), reference([[0]]))
    # Calling fit again finishes the run from the interrupted batch.
    rec.calls.clear()
    await learner.fit(2)
    assert rec.calls[:5] == [
        "before_fit_run@0:1",
        "before_epoch@0:1",
        "before_fit@0:1",
        *fit_batch(0, 1)[:2],
    ]
    assert rec.calls[-1] == "after_fit_run@2:6"
    assert outcome.seen[-1][0] == "completed"
    assert_same(weights(learner), reference([[0, 1, 2], [0, 1, 2]]))


async def test_stop_fit_from_after_epoch_counts_the_epoch() -> None:
    learner, rec, outcome = setup({"after_epoch": StopFit()})
    await learner.fit(3)
    assert rec.calls == ["before_fit_run@0:0", *epoch(0, 0), "after_fit_run@1:3"]
    assert learner.state.epoch == 1
    assert outcome.seen == [("stopped", "StopFit")]
    rec.calls.clear()
    await learner.fit(2)
    assert rec.calls == ["before_fit_run@1:3", *epoch(1, 3), "after_fit_run@2:6"]


async def test_stop_fit_from_before_fit_run() -> None:
    learner, rec, outcome = setup({"before_fit_run": StopFit()})
    await learner.fit(1)
    assert rec.calls == ["before_fit_run@0:0", "after_fit_run@0:0"]
    assert outcome.seen == [("stopped", "StopFit")]


async def test_stop_fit_from_validation() -> None:
    learner, rec, outcome = setup({"before_validate_batch": StopFit()})
    await learner.fit(2)
    assert rec.calls[-2:] == ["before_validate_batch@0:3", "after_fit_run@0:3"]
    assert outcome.seen == [("stopped", "StopFit")]
    # Epoch 0's training pass was done, its after_epoch not: the epoch is not counted yet.
    assert (learner.state.epoch, learner.state.step) == (0, 3)
    rec.calls.clear()
    await learner.fit(2)
    # The next fit finishes it (its validation and after_epoch, once), then goes on.
    assert rec.calls == [
        "before_fit_run@0:3",
        "before_epoch@0:3",
        *validation(0, 3),
        "after_validate@0:3",
        "after_epoch@0:3",
        *epoch(1, 3),
        "after_fit_run@2:6",
    ]


@pytest.mark.parametrize("validate", ["sequential", "concurrent"])
async def test_stop_fit_from_after_fit_then_fit_again_runs_after_fit_once(validate: str) -> None:
    learner, rec, _ = setup({"after_fit": StopFit()}, validate=validate)
    await learner.fit(2)
    assert (learner.state.epoch, learner.state.step) == (0, 3)
    await learner.fit(2)
    hooks = [call.split("@")[0] for call in rec.calls]
    assert hooks.count("after_fit") == 2  # once an epoch
    assert hooks.count("after_epoch") == 2
    assert (learner.state.epoch, learner.state.step) == (2, 6)


# -- errors ------------------------------------------------------------------------------------


class HookError(Exception):
    pass


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_error_in_a_hook(compute: str) -> None:
    learner, rec, outcome = setup({"after_gradient": HookError("x")}, compute=compute)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(2)
    assert [type(e) for e in info.value.exceptions] == [HookError]
    assert rec.calls == [
        "before_fit_run@0:0",
        "before_epoch@0:0",
        "before_fit@0:0",
        *fit_batch(0, 0, until="after_gradient"),
        "after_fit_run@0:0",
    ]
    assert outcome.seen == [("error", None)]
    assert (learner.state.epoch, learner.state.step) == (0, 0)
    assert_same(weights(learner), reference([]))


async def test_error_in_a_stage_body() -> None:
    bad = (torch.randn(5, 9), torch.zeros(5, dtype=torch.long))
    data = [*make_batches(N_BATCHES, seed=1)[:1], bad]
    rec = RecordingCallback(with_counters=True)
    outcome = Outcome()
    learner = make_learner(callbacks=[rec, outcome], train_data=data)
    with pytest.raises(RuntimeError):
        await learner.fit(1)
    assert rec.calls == [
        "before_fit_run@0:0",
        "before_epoch@0:0",
        "before_fit@0:0",
        *fit_batch(0, 0),
        *fit_batch(0, 1, until="before_gradient"),
        "after_fit_run@0:1",
    ]
    assert outcome.seen == [("error", None)]
    assert learner.state.step == 1


async def test_error_in_after_fit_run_itself() -> None:
    learner, _, _ = setup({"after_fit_run": HookError("teardown")})
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    assert [type(e) for e in info.value.exceptions] == [HookError]
    assert learner.state.epoch == 1


# -- cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "at_step", "expected_tail"),
    [
        (
            "after_gradient",
            1,
            [*fit_batch(0, 1, until="after_gradient"), "after_fit_run@0:1"],
        ),
        # The batch is committed: its after_fit_batch still runs (every batch counted is
        # recorded), then the cancellation acts.
        ("after_update", 2, [*fit_batch(0, 1), "after_fit_run@0:2"]),
    ],
)
async def test_cancellation_from_outside(hook: str, at_step: int, expected_tail: list[str]) -> None:
    rec = RecordingCallback(with_counters=True)
    outcome = Outcome()
    hang = Hang(hook, at_step)
    learner = make_learner(callbacks=[rec, outcome, hang], n_batches=N_BATCHES)
    after_fit = False
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                nonlocal after_fit
                with anyio.CancelScope() as scope:
                    tg.start_soon(cancel_when_reached, scope)
                    await learner.fit(2)
                    after_fit = True  # never: Cancelled reaches the caller's scope
                assert scope.cancelled_caught

            async def cancel_when_reached(scope: anyio.CancelScope) -> None:
                await hang.reached.wait()
                scope.cancel()

            tg.start_soon(run)
    assert not after_fit
    assert rec.calls[-len(expected_tail) :] == expected_tail
    start = ["before_fit_run@0:0", "before_epoch@0:0", "before_fit@0:0", "before_fit_batch@0:0"]
    assert rec.calls[:4] == start
    assert outcome.seen == [("cancelled", None)]
    assert learner.state.step == at_step
    assert_same(weights(learner), reference([list(range(at_step))]))
    assert learner.status.value == "idle"


async def test_teardown_runs_shielded_after_cancellation() -> None:
    class SlowTeardown(Callback):
        reads = frozenset({"outcome"})

        def __init__(self) -> None:
            self.finished: list[str] = []

        async def after_fit_run(self, state: StateView) -> None:
            # Would raise Cancelled at once were it not shielded.
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            self.finished.append(state.outcome)

    hang = Hang("before_fit_batch", 0)
    teardown = SlowTeardown()
    learner = make_learner(callbacks=[hang, teardown])
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(learner.fit, 1)
            await hang.reached.wait()
            tg.cancel_scope.cancel()
    assert teardown.finished == ["cancelled"]


# -- concurrent control flow -------------------------------------------------------------------


class Stopper(Callback):
    """Raises once its sibling is inside the hook."""

    def __init__(self, sibling_inside: anyio.Event, flow: Exception) -> None:
        self.sibling_inside = sibling_inside
        self.flow = flow
        self.raised = 0

    async def after_gradient(self, state: StateView) -> None:
        await self.sibling_inside.wait()
        self.raised += 1
        raise self.flow


class Finisher(Callback):
    def __init__(self) -> None:
        self.inside = anyio.Event()
        self.finished = 0

    async def after_gradient(self, state: StateView) -> None:
        self.inside.set()
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        self.finished += 1


@pytest.mark.parametrize("flow", [SkipBatch(), StopEpoch(), StopFit()])
async def test_control_flow_does_not_cancel_siblings(flow: Exception) -> None:
    finisher = Finisher()
    stopper = Stopper(finisher.inside, flow)
    rec = RecordingCallback(hooks=["after_gradient", "after_update", "after_fit"])
    learner = make_learner(callbacks=[finisher, stopper, rec], n_batches=1)
    with anyio.fail_after(10):
        await learner.fit(1)
    assert stopper.raised == 1
    assert finisher.finished == 1  # the sibling finished its hook
    assert "after_update" not in rec.calls  # and then the stage acted
    assert ("after_fit" in rec.calls) == (not isinstance(flow, StopFit))


class RaiseDef(Callback):
    def __init__(self, flow: Exception) -> None:
        self.flow = flow

    def after_gradient(self, state: StateView) -> None:
        raise self.flow


class RaiseDef2(RaiseDef):
    pass


class RaiseDef3(RaiseDef):
    pass


@pytest.mark.parametrize(
    ("flows", "expected"),
    [
        ((SkipBatch(), StopEpoch(), StopFit()), "stopped"),
        ((StopFit(), SkipBatch(), StopEpoch()), "stopped"),
        ((SkipBatch(), StopEpoch(), SkipBatch()), "epoch"),
        ((StopEpoch(), SkipBatch(), SkipBatch()), "epoch"),
        ((SkipBatch(), SkipBatch(), SkipBatch()), "batch"),
    ],
)
async def test_the_strongest_control_flow_wins(
    flows: tuple[Exception, Exception, Exception], expected: str
) -> None:
    rec = RecordingCallback(with_counters=True)
    outcome = Outcome()
    callbacks = [RaiseDef(flows[0]), RaiseDef2(flows[1]), RaiseDef3(flows[2])]
    learner = make_learner(callbacks=[rec, outcome, *callbacks], n_batches=2, with_validation=False)
    await learner.fit(1)
    if expected == "stopped":
        assert outcome.seen[0][0] == "stopped"
        assert rec.calls[-1] == "after_fit_run@0:0"
    elif expected == "epoch":
        assert outcome.seen[0][0] == "completed"
        tail = ["after_gradient@0:0", "after_fit@0:1", "after_epoch@0:1", "after_fit_run@1:1"]
        assert rec.calls[-4:] == tail
    else:
        assert outcome.seen[0][0] == "completed"
        assert rec.calls.count("before_update@0:0") == 0
        assert rec.calls.count("after_gradient@0:1") == 1  # both batches ran, both skipped
        assert learner.state.step == 2


async def test_the_strongest_wins_among_concurrent_async_callbacks() -> None:
    class AsyncRaise(Callback):
        def __init__(self, flow: Exception) -> None:
            self.flow = flow

        async def after_fit_batch(self, state: StateView) -> None:
            await anyio.lowlevel.checkpoint()
            raise self.flow

    class AsyncRaise2(AsyncRaise):
        pass

    outcome = Outcome()
    learner = make_learner(
        callbacks=[AsyncRaise(SkipBatch()), AsyncRaise2(StopFit("strong")), outcome]
    )
    await learner.fit(1)
    assert outcome.seen == [("stopped", "strong")]


# -- control flow raised by stages -------------------------------------------------------------


class SkipSecondBatchGradient(Gradient):
    """A user stage that decides, after backward, to drop the batch with index 1."""

    def compute(self, state: State) -> None:
        super().compute(state)
        if state.batch_index == 1:
            raise SkipBatch("stage says no")


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_skip_batch_raised_by_a_stage(compute: str) -> None:
    rec = RecordingCallback(with_counters=True)
    outcome = Outcome()
    learner = make_learner(
        callbacks=[rec, outcome],
        n_batches=N_BATCHES,
        compute=compute,
        stages={"gradient": SkipSecondBatchGradient()},
    )
    await learner.fit(1)
    assert (
        rec.calls[3:16]
        == [
            *fit_batch(0, 0),
            *fit_batch(0, 1, until="before_gradient"),  # after_gradient and the rest skipped
            *fit_batch(0, 2)[:5],
        ]
    )
    assert outcome.seen == [("completed", "stage says no")]
    assert learner.state.step == 3
    # The gradient computed before the stage raised did not reach the weights.
    assert_same(weights(learner), reference([[0, 2]]))


class StopAfterTwo(FitBatch):
    async def run(self, state: State) -> None:
        await super().run(state)
        if state.batch_index == 2:
            raise StopEpoch("two is enough")


async def test_stop_epoch_raised_by_a_custom_batch_stage() -> None:
    rec = RecordingCallback(with_counters=True)
    learner = make_learner(
        callbacks=[rec], n_batches=N_BATCHES, stages={"fit_batch": StopAfterTwo()}
    )
    await learner.fit(2)
    # Each epoch trains on two batches; the batch that raised had been committed.
    assert (learner.state.epoch, learner.state.step) == (2, 4)
    assert rec.calls.count("after_fit@0:2") == 1
    assert rec.calls.count("after_fit@1:4") == 1
    assert_same(weights(learner), reference([[0, 1], [0, 1]]))


# -- teardown time bound -----------------------------------------------------------------------


async def test_teardown_after_cancellation_is_time_bounded() -> None:
    class StuckTeardown(Callback):
        def __init__(self) -> None:
            self.entered = False

        async def after_fit_run(self, state: StateView) -> None:
            self.entered = True
            await anyio.sleep_forever()

    hang = Hang("before_fit_batch", 0)
    stuck = StuckTeardown()
    learner = make_learner(callbacks=[hang, stuck], teardown_timeout=0.05)

    async def fit_cancelled() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(learner.fit, 1)
            await hang.reached.wait()
            tg.cancel_scope.cancel()

    with (
        anyio.fail_after(10),  # without the bound, the shielded teardown never ends
        pytest.warns(UserWarning, match="the hook of StuckTeardown was cut off"),
    ):
        await fit_cancelled()
    assert stuck.entered
    assert learner.status.value == "idle"


# -- errors then fit again ---------------------------------------------------------------------


async def test_fit_again_after_a_callback_error_redoes_the_failed_batch() -> None:
    learner, _, outcome = setup({"after_gradient": HookError("once")})
    with pytest.raises(ExceptionGroup):
        await learner.fit(2)
    assert learner.state.step == 0
    await learner.fit(2)
    assert outcome.seen == [("error", None), ("completed", None)]
    assert_same(weights(learner), reference([[0, 1, 2], [0, 1, 2]]))


# -- control flow from the owner's own after_ hook, and without an owner ----------------------


async def test_stop_epoch_from_after_fit_goes_on_with_validation() -> None:
    learner, rec, outcome = setup({"after_fit": StopEpoch()})
    await learner.fit(2)
    assert rec.calls == ["before_fit_run@0:0", *epoch(0, 0), *epoch(1, 3), "after_fit_run@2:6"]
    assert outcome.seen == [("completed", "StopEpoch")]


async def test_stop_epoch_from_after_validate_goes_on_with_after_epoch() -> None:
    learner, rec, _ = setup({"after_validate": StopEpoch()})
    await learner.fit(2)
    assert rec.calls == ["before_fit_run@0:0", *epoch(0, 0), *epoch(1, 3), "after_fit_run@2:6"]


async def test_skip_batch_where_no_stage_owns_it_is_an_error() -> None:
    learner, rec, outcome = setup({"after_epoch": SkipBatch("misplaced")})
    with pytest.raises(RuntimeError, match="SkipBatch") as info:
        await learner.fit(2)
    assert "misplaced" in str(info.value)
    assert rec.calls == ["before_fit_run@0:0", *epoch(0, 0), "after_fit_run@0:3"]
    assert outcome.seen == [("error", None)]


class StopOnce(Callback):
    """A StopFit at step 2 of the first run; records each run's outcome and stop reason."""

    reads = frozenset({"step", "stop_reason", "outcome"})

    def __init__(self) -> None:
        self.armed = True
        self.runs: list[tuple[str, str]] = []

    def after_fit_batch(self, state: StateView) -> None:
        if self.armed and state.step == 2:
            self.armed = False
            raise StopFit("once")

    def after_fit_run(self, state: StateView) -> None:
        try:
            reason = state.stop_reason
        except StateAccessError:
            reason = "(none)"
        self.runs.append((state.outcome, reason))


async def test_a_stop_reason_does_not_outlive_its_fit_call() -> None:
    callback = StopOnce()
    learner = make_learner(callbacks=[callback])
    await learner.fit(2)
    assert learner.state.stop_reason == "once"
    await learner.fit(2)
    assert callback.runs == [("stopped", "once"), ("completed", "(none)")]
    with pytest.raises(StateAccessError, match="stop_reason"):
        learner.state.stop_reason  # noqa: B018
