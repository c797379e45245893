"""Parallel: independent sub-stages at the same time, with the hooks' error and cancel rules."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
import torch

import aiolearner
from aiolearner import Callback, ComputeStage, Parallel, Stage, State, StateView, StopFit
from aiolearner.testing import make_learner


class Probe(Stage):
    """Sets ``state.<field> = value``; optionally signals, then waits, before that."""

    def __init__(
        self,
        name: str,
        field: str,
        value: Any,
        *,
        signal: anyio.Event | None = None,
        wait_for: anyio.Event | None = None,
        raise_: BaseException | None = None,
    ) -> None:
        super().__init__()
        self.__dict__["name"] = name
        self.field = field
        self.value = value
        self.signal = signal
        self.wait_for = wait_for
        self.raise_ = raise_
        self.runs = 0
        self.saw_batch: list[Any] = []

    async def run(self, state: State) -> None:
        self.runs += 1
        state.batch = self.name  # what a batch stage does: must not collide with the sibling
        if self.signal is not None:
            self.signal.set()
        if self.wait_for is not None:
            await self.wait_for.wait()
        self.saw_batch.append(state.batch)
        if self.raise_ is not None:
            raise self.raise_
        setattr(state, self.field, self.value)
        state.invalidate("batch")


def learner_with(parallel: Parallel, **options: Any) -> aiolearner.Learner[Any]:
    return make_learner(stages={"validate": parallel}, n_batches=2, **options)


def aiolearner_tasks() -> list[str]:
    names = [t.name or "" for t in anyio.get_running_tasks()]
    return [n for n in names if n.startswith("aiolearner.")]


def test_parallel_is_exported() -> None:
    assert "Parallel" in aiolearner.__all__
    assert aiolearner.Parallel.__module__ == "aiolearner"


async def test_branches_run_at_the_same_time_and_their_fields_are_merged() -> None:
    a_ready, b_ready = anyio.Event(), anyio.Event()
    # Each branch waits for the other to have started: sequential execution would deadlock.
    a = Probe("branch_a", "result_a", 1, signal=a_ready, wait_for=b_ready)
    b = Probe("branch_b", "result_b", 2, signal=b_ready, wait_for=a_ready)
    learner = learner_with(Parallel(a, b, name="validate"))
    with anyio.fail_after(10):
        await learner.fit(1)
    state = learner.state
    assert (state.result_a, state.result_b) == (1, 2)
    # each branch saw its own batch field, though both set it and waited
    assert a.saw_batch == ["branch_a"]
    assert b.saw_batch == ["branch_b"]
    assert not state.is_valid("batch")
    assert all(not s.fields() for s in learner.stage("validate").branch_states)  # type: ignore[attr-defined]
    assert aiolearner_tasks() == []


async def test_hooks_of_branch_stages_see_their_branch_state() -> None:
    seen: dict[str, Any] = {}

    class Watch(Callback):
        reads = frozenset({"batch", "epoch"})

        def before_branch_a(self, state: StateView) -> None:
            seen["a_epoch"] = state.epoch

        def after_branch_a(self, state: StateView) -> None:
            seen["a_valid_batch"] = state.is_valid("batch")

        def after_branch_b(self, state: StateView) -> None:
            seen["b_valid_batch"] = state.is_valid("batch")

        def after_validate(self, state: StateView) -> None:
            seen["parent_batch"] = state.is_valid("batch")

    a = Probe("branch_a", "result_a", 1)
    b = Probe("branch_b", "result_b", 2)
    learner = learner_with(Parallel(a, b, name="validate"), callbacks=[Watch()])
    await learner.fit(1)
    assert seen == {
        "a_epoch": 0,
        "a_valid_batch": False,
        "b_valid_batch": False,
        "parent_batch": False,
    }


async def test_two_branches_changing_one_field_is_an_error() -> None:
    a = Probe("branch_a", "result", 1)
    b = Probe("branch_b", "result", 2)
    learner = learner_with(Parallel(a, b, name="validate"))
    with pytest.raises(RuntimeError, match="both changed state field 'result'"):
        await learner.fit(1)
    assert not learner.state.is_valid("result")


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_an_error_cancels_the_sibling_and_comes_out_grouped(compute: str) -> None:
    started = anyio.Event()
    never = anyio.Event()
    blocked = Probe("branch_a", "result_a", 1, signal=started, wait_for=never)
    failing = Probe("branch_b", "result_b", 2, wait_for=started, raise_=ValueError("bad"))
    learner = learner_with(Parallel(blocked, failing, name="validate"), compute=compute)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    assert info.group_contains(ValueError, match="bad")
    group = info.value
    assert "parallel stage 'validate'" in str(group)
    assert [type(e) for e in group.exceptions] == [ValueError]  # alone, still grouped
    assert blocked.saw_batch == []  # cancelled while waiting
    assert not learner.state.is_valid("result_a")
    assert aiolearner_tasks() == []


async def test_errors_of_both_branches_are_both_reported() -> None:
    # Neither awaits before raising, so neither can be cancelled before it fails.
    a = Probe("branch_a", "x", 1, raise_=KeyError("a"))
    b = Probe("branch_b", "y", 2, raise_=KeyError("b"))
    learner = learner_with(Parallel(a, b, name="validate"))
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    assert sorted(str(e) for e in info.value.exceptions) == ["'a'", "'b'"]


async def test_control_flow_lets_the_sibling_finish_then_is_raised() -> None:
    a_started = anyio.Event()
    b_done = anyio.Event()

    class StopAfterSibling(Stage):
        name = "stopper"

        async def run(self, state: State) -> None:
            a_started.set()
            state.stopper_ran = True
            raise StopFit("enough")

    b = Probe("branch_b", "result_b", 2, wait_for=a_started, signal=b_done)
    outcome: list[str] = []

    class Outcome(Callback):
        reads = frozenset({"outcome"})

        def after_fit_run(self, state: StateView) -> None:
            outcome.append(state.outcome)

    learner = learner_with(Parallel(StopAfterSibling(), b, name="validate"), callbacks=[Outcome()])
    await learner.fit(3)
    assert b.runs == 1  # not cancelled by the StopFit
    assert learner.state.result_b == 2  # the branches' changes were applied
    assert learner.state.stopper_ran is True
    assert outcome == ["stopped"]
    # Stopped in the epoch's validation, before its after_epoch: not counted yet (the next fit
    # finishes it).
    assert (learner.state.epoch, learner.state.step) == (0, 2)


async def test_cancelling_the_run_cancels_every_branch() -> None:
    a_started, b_started, never = anyio.Event(), anyio.Event(), anyio.Event()
    a = Probe("branch_a", "x", 1, signal=a_started, wait_for=never)
    b = Probe("branch_b", "y", 2, signal=b_started, wait_for=never)
    learner = learner_with(Parallel(a, b, name="validate"))

    async def run_and_cancel() -> None:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(learner.fit, 1)
                await a_started.wait()
                await b_started.wait()
                scope.cancel()

    await run_and_cancel()
    assert aiolearner_tasks() == []
    assert a.saw_batch == b.saw_batch == []
    assert not learner.state.is_valid("x")
    assert learner.status.value == "idle"


async def test_branches_compute_overlaps_in_thread_mode() -> None:
    # Each branch's compute waits at a barrier for the other's: only overlapping threads pass.
    barrier = threading.Barrier(2, timeout=10)

    class Meet(ComputeStage):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.__dict__["name"] = name

        def compute(self, state: State) -> None:
            barrier.wait()
            setattr(state, self.name, torch.ones(1))

    learner = learner_with(Parallel(Meet("left"), Meet("right"), name="validate"), compute="thread")
    await learner.fit(1)
    assert torch.equal(learner.state.left, learner.state.right)


async def test_parallel_validation_inside_concurrent_validation() -> None:
    seen: list[tuple[str, tuple[int, int]]] = []

    class Tagged(Probe):
        async def run(self, state: State) -> None:
            await super().run(state)
            seen.append((self.name, (state.epoch, state.step)))
            # a branch of a concurrent validation sees the snapshot model, in eval mode
            assert not state.model.training

    class Land(Callback):
        reads = frozenset({"result_a", "result_b", "epoch", "step"})
        writes = frozenset({"validation", "validation_tag"})

        def after_validate(self, state: StateView) -> None:
            state.validation = {"a": state.result_a, "b": state.result_b}
            state.validation_tag = (state.epoch, state.step)

    both = Parallel(
        Tagged("branch_a", "result_a", 1), Tagged("branch_b", "result_b", 2), name="validate"
    )
    learner = make_learner(
        stages={"validate": both}, callbacks=[Land()], validate="concurrent", n_batches=2
    )
    # Parallel's branches start from the state it is called with: in concurrent mode, the
    # validation state, whose model is the snapshot (kept in eval mode).
    await learner.fit(2)
    assert sorted(seen) == [
        ("branch_a", (0, 2)),
        ("branch_a", (1, 4)),
        ("branch_b", (0, 2)),
        ("branch_b", (1, 4)),
    ]
    assert learner.state.validation == {"a": 1, "b": 2}
    assert learner.state.validation_tag == (1, 4)
    assert aiolearner_tasks() == []


def test_parallel_needs_stages() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Parallel()
    with pytest.raises(TypeError, match="takes stages"):
        Parallel("validate")  # type: ignore[arg-type]


def test_one_learner_runs_parallel_under_asyncio_then_trio() -> None:
    learner = learner_with(
        Parallel(
            Probe("branch_a", "result_a", 1), Probe("branch_b", "result_b", 2), name="validate"
        ),
        compute="thread",
    )
    learner.fit_sync(1, backend="asyncio")
    learner.fit_sync(2, backend="trio")
    assert (learner.state.result_a, learner.state.result_b) == (1, 2)
    assert learner.state.epoch == 2
