"""FitHandle, RunState and snapshots: running a learner as a cancellable job."""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch
from anyio import wait_all_tasks_blocked

from aiolearner import (
    Callback,
    Event,
    FitHandle,
    Learner,
    LearnerBusyError,
    LearnerSnapshot,
    RunState,
    State,
    StateAccessError,
    StateView,
    StopFit,
)
from aiolearner.testing import make_learner


class CancelAtEpoch(Callback):
    """Cancels a handle from inside the run once ``epoch`` epochs are done (a request would)."""

    reads = frozenset({"epoch"})

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.handle: FitHandle | None = None

    def after_epoch(self, state: StateView) -> None:
        if state.epoch + 1 >= self.epoch and self.handle is not None:
            self.handle.cancel()


async def test_cancel_running_handle_finalizes_on_idle_learner() -> None:
    canceller = CancelAtEpoch(2)
    learner = make_learner(callbacks=[canceller], compute="inline")
    seen: list[tuple[str, int]] = []

    async def finalize(handle: FitHandle) -> None:
        seen.append((handle.learner.status.value, handle.learner.state.epoch))
        await anyio.lowlevel.checkpoint()  # may await: runs shielded

    handle = FitHandle(learner, 1000, finalize=finalize)
    canceller.handle = handle
    events = handle.events(kinds={"metrics", "run_end"})
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.run)
        got: list[Event] = [event async for event in events]
    assert handle.state is RunState.CANCELLED
    assert handle.cancel_requested
    assert seen == [("idle", learner.state.epoch)]
    assert [e.kind for e in got][-1] == "run_end"
    assert got[-1].data["outcome"] == "cancelled"
    assert [e.epoch for e in got if e.kind == "metrics"] == [0, 1]
    assert await handle.wait_done() is RunState.CANCELLED


async def test_cancel_while_queued_leaves_the_queue() -> None:
    limiter = anyio.CapacityLimiter(1)
    first = FitHandle(make_learner(compute="inline"), 1)
    finalized: list[FitHandle] = []

    async def finalize(handle: FitHandle) -> None:
        finalized.append(handle)

    queued = FitHandle(make_learner(compute="inline"), 1, finalize=finalize)
    async with anyio.create_task_group() as tg:
        await limiter.acquire()  # the only slot is taken
        tg.start_soon(first.run)
        events = queued.events()
        tg.start_soon(lambda: queued.run(limiter=limiter))
        await wait_all_tasks_blocked()
        assert queued.state is RunState.PENDING
        queued.cancel()
        assert await queued.wait_done() is RunState.CANCELLED
        assert [e async for e in events] == []
        limiter.release()
    assert first.state is RunState.COMPLETED
    assert finalized == []
    assert queued.learner.state.step == 0


async def test_cancel_as_the_queue_hands_the_slot_over_trains_nothing() -> None:
    """The slot is given to the waiting handle, which is cancelled before its task resumes: it
    is done at once, trains nothing, is not finalized, and gives the slot back."""
    limiter = anyio.CapacityLimiter(1)
    finalized: list[FitHandle] = []

    async def finalize(handle: FitHandle) -> None:
        finalized.append(handle)

    queued = FitHandle(make_learner(compute="inline"), 1, finalize=finalize)
    async with anyio.create_task_group() as tg:
        await limiter.acquire()
        tg.start_soon(lambda: queued.run(limiter=limiter))
        await wait_all_tasks_blocked()
        limiter.release()  # to the queued handle, whose task has not run since
        queued.cancel()
        assert queued.done
        assert queued.state is RunState.CANCELLED
    assert await queued.wait_done() is RunState.CANCELLED
    assert finalized == []
    assert queued.learner.state.step == 0
    assert limiter.borrowed_tokens == 0


async def test_fit_called_in_a_cancelled_scope_trains_nothing() -> None:
    learner = make_learner(compute="inline")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await learner.fit(2)
    assert scope.cancelled_caught
    assert learner.state.step == 0


async def test_start_reports_when_fit_begins_and_queue_order() -> None:
    limiter = anyio.CapacityLimiter(1)
    a = FitHandle(make_learner(compute="inline"), 2)
    b = FitHandle(make_learner(compute="inline"), 2)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: a.run(limiter=limiter, task_status=task_status))
        assert a.state is RunState.RUNNING
        tg.start_soon(lambda: b.run(limiter=limiter))
        await wait_all_tasks_blocked()
        assert b.state is RunState.PENDING or a.done
    assert (a.state, b.state) == (RunState.COMPLETED, RunState.COMPLETED)


class StopAfterOne(Callback):
    def after_epoch(self, state: StateView) -> None:
        raise StopFit("enough")


async def test_stopped_and_failed_states() -> None:
    stopped = FitHandle(make_learner(callbacks=[StopAfterOne()]), 5)
    assert await stopped.run() is RunState.STOPPED

    bad = make_learner(train_data=[(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))])
    failed = FitHandle(bad, 1)
    with pytest.raises(RuntimeError):
        await failed.run()
    assert failed.state is RunState.FAILED
    assert isinstance(failed.error, RuntimeError)
    assert failed.snapshot().error is not None
    with pytest.raises(RuntimeError, match="runs once"):
        await failed.run()


async def test_events_after_the_run_end_at_once() -> None:
    handle = FitHandle(make_learner(), 1)
    await handle.run()
    assert [e async for e in handle.events()] == []


async def test_outer_cancellation_marks_cancelled_and_finalizes() -> None:
    finalized: list[RunState] = []

    async def finalize(handle: FitHandle) -> None:
        finalized.append(handle.state)

    handle = FitHandle(make_learner(compute="inline"), 10_000, finalize=finalize)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(handle.run)
            scope.cancel()
    assert handle.state is RunState.CANCELLED
    assert finalized == [RunState.CANCELLED]


def test_snapshot_is_plain_and_json_ready() -> None:
    learner = make_learner()
    learner.state.metrics["a"] = torch.tensor(2.0)
    learner.state.metrics["b"] = math.nan
    learner.state.metrics["c"] = torch.ones(3)  # not a scalar: left out
    snap = learner.snapshot()
    assert isinstance(snap, LearnerSnapshot)
    assert snap.metrics["a"] == 2.0
    assert "c" not in snap.metrics
    d = snap.as_dict()
    assert d["metrics"]["b"] is None
    assert (d["status"], d["epoch"], d["step"]) == ("idle", 0, 0)
    assert FitHandle(learner, 3).snapshot().as_dict()["state"] == "pending"
    with pytest.raises(ValueError, match="epochs"):
        FitHandle(learner, -1)


async def test_the_snapshot_tells_how_the_last_fit_ended() -> None:
    """``state.outcome`` is valid in after_fit_run only; afterwards the snapshot says it."""
    learner = make_learner(n_batches=2)
    assert learner.snapshot().outcome == ""
    await learner.fit(1)
    assert learner.snapshot().outcome == "completed"
    assert learner.snapshot().as_dict()["outcome"] == "completed"
    with pytest.raises(StateAccessError, match=r"^Cannot access .*learner.snapshot\(\).outcome"):
        learner.state.outcome  # noqa: B018

    class Stop(Callback):
        def after_fit_batch(self, state: StateView) -> None:
            raise StopFit("enough")

    stopping = make_learner(n_batches=2, callbacks=[Stop()])
    await stopping.fit(2)
    handle = FitHandle(stopping, 2)
    assert handle.snapshot().outcome == stopping.snapshot().outcome == "stopped"


async def test_run_end_says_cancelled_when_another_task_cancels() -> None:
    # A prefetching producer task in the learner's task group: closing that group re-raises
    # the cancellation under trio.
    handle = FitHandle(make_learner(fetch="thread"), 10_000)
    async with anyio.create_task_group() as tg:
        await tg.start(handle.run)
        got = []
        async for event in handle.events(kinds={"metrics", "run_end"}):
            handle.cancel()  # after the first epoch, with the producer running
            got.append(event)
    assert got[0].kind == "metrics"
    assert got[-1].data["outcome"] == "cancelled"
    assert handle.state is RunState.CANCELLED


async def test_done_and_wait_done_include_the_finalizer() -> None:
    release = anyio.Event()
    entered = anyio.Event()

    async def finalize(handle: FitHandle) -> None:
        entered.set()
        await release.wait()

    handle = FitHandle(make_learner(), 1, finalize=finalize)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.run)
        await entered.wait()
        assert handle.state is RunState.COMPLETED
        assert not handle.done
        assert [e async for e in handle.events()] == []  # no run will come: ends at once
        release.set()
        assert await handle.wait_done() is RunState.COMPLETED
        assert handle.done


async def test_cancelled_before_run_never_fits() -> None:
    finalized: list[FitHandle] = []

    async def finalize(handle: FitHandle) -> None:
        finalized.append(handle)

    handle = FitHandle(make_learner(), 3, finalize=finalize)
    handle.cancel()
    assert await handle.run() is RunState.CANCELLED
    assert handle.learner.state.step == 0
    assert finalized == []


def test_fit_snapshot_reads_the_learner_snapshot_fields() -> None:
    learner = make_learner()
    learner.state.metrics["a"] = 1.5
    snap = FitHandle(learner, 3).snapshot()
    inner = snap.learner
    # As described: the learner's snapshot plus the handle's state, read flat.
    assert (snap.status, snap.epoch, snap.step, snap.batch_index) == (
        inner.status,
        inner.epoch,
        inner.step,
        inner.batch_index,
    )
    assert snap.metrics == inner.metrics == {"a": 1.5}
    assert snap.validation == inner.validation
    assert snap.state == "pending"
    flat = snap.as_dict()
    for name in ("status", "epoch", "step", "batch_index"):
        assert flat[name] == getattr(snap, name)
    with pytest.raises(AttributeError):
        snap.epochs  # type: ignore[attr-defined]  # noqa: B018


class WatchRunningLoss(Callback):
    """Notes each batch's loss and, before each batch, what the learner's snapshot says."""

    reads = frozenset({"loss", "epoch", "batch_index"})

    def __init__(self) -> None:
        self.learner: Learner[Any] | None = None
        self.losses: dict[int, list[float]] = {}
        self.seen: list[tuple[int, int, float | None, float | None]] = []

    def before_fit_batch(self, state: StateView) -> None:
        assert self.learner is not None
        metrics = self.learner.snapshot().metrics
        running = metrics.get("train_loss_running")
        done = self.losses.get(state.epoch, [])
        expected = sum(done) / len(done) if done else None
        self.seen.append(
            (state.epoch, state.batch_index, None if running is None else float(running), expected)
        )

    def after_fit_batch(self, state: StateView) -> None:
        self.losses.setdefault(state.epoch, []).append(float(state.loss.detach()))


async def test_snapshot_has_a_running_training_loss_before_the_first_epoch_ends() -> None:
    watch = WatchRunningLoss()
    learner = make_learner(callbacks=[watch], n_batches=4, compute="inline")
    watch.learner = learner
    assert "train_loss_running" not in learner.snapshot().metrics
    await learner.fit(2)
    # Before the epoch's first batch there is none; then the mean of the epoch's batches so far.
    for epoch, index, running, expected in watch.seen:
        if index == 0:
            assert running is None, (epoch, index)
        else:
            assert running == pytest.approx(expected, rel=1e-6), (epoch, index)
    assert [s[:2] for s in watch.seen] == [(e, i) for e in range(2) for i in range(4)]
    # Between epochs (and after fit) the epoch's mean is train_loss; no running value then.
    final = learner.snapshot().metrics
    assert "train_loss_running" not in final
    assert final["train_loss"] == pytest.approx(sum(watch.losses[1]) / 4, rel=1e-6)


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_snapshot_taken_around_a_commit_has_the_running_loss_of_the_batches_it_counts(
    compute: str,
) -> None:
    # In thread mode a snapshot may be taken at any instant of the default batch, in the
    # worker: just before its commit and just after, the running loss covers exactly the
    # batches that batch_index counts (it covered one fewer just after a commit).
    learner = make_learner(n_batches=4, compute=compute, with_validation=False)
    rt = learner._rt
    commit = rt.commit
    seen: list[tuple[int, object]] = []
    losses: list[float] = []  # the epoch's, as the batches keep them

    def commit_seen_by_snapshots(state: State) -> None:
        before = learner.snapshot()
        seen.append((before.batch_index, before.metrics.get("train_loss_running")))
        commit(state)
        after = learner.snapshot()
        seen.append((after.batch_index, after.metrics.get("train_loss_running")))
        losses[:] = [float(x) for x in rt.train_losses]

    rt.commit = commit_seen_by_snapshots
    await learner.fit(1)
    assert [index for index, _ in seen] == [0, 1, 1, 2, 2, 3, 3, 4]
    for index, running in seen:
        if index == 0:
            assert running is None
        else:
            assert running == pytest.approx(sum(losses[:index]) / index, rel=1e-6), index


async def test_events_of_a_pending_handle_are_its_own_run_not_the_one_before() -> None:
    learner = make_learner(n_batches=2)
    first, second = FitHandle(learner, 2), FitHandle(learner, 4)
    seen: list[tuple[str, int | None]] = []

    async def watch(stream: Any) -> None:
        async with stream:
            async for event in stream:
                seen.append((event.kind, event.epoch))

    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        # Subscribed while the learner runs the first handle: the second handle's run only.
        tg.start_soon(watch, second.events(kinds={"run_start", "metrics", "run_end"}))
        await first.wait_done()
        await second.run()
    assert seen == [("run_start", 2), ("metrics", 2), ("metrics", 3), ("run_end", 4)]


async def test_a_handle_refused_by_a_busy_learner_neither_finalizes_nor_sees_its_run() -> None:
    learner = make_learner(n_batches=2)
    first = FitHandle(learner, 50)
    finalized: list[str] = []

    async def finalize(handle: FitHandle) -> None:
        finalized.append(learner.status.value)

    second = FitHandle(learner, 50, finalize=finalize)
    seen: list[str] = []

    async def watch(stream: Any) -> None:
        async with stream:
            async for event in stream:
                seen.append(event.kind)

    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        tg.start_soon(watch, second.events())
        with pytest.raises(LearnerBusyError):
            await second.run()
        assert second.state is RunState.FAILED
        first.cancel()
    # The refused run did not start: nothing to finalize, and its stream ended empty.
    assert finalized == []
    assert seen == []


async def test_a_finalizer_cut_off_by_finalize_timeout_says_so() -> None:
    learner = make_learner(n_batches=2)
    finished: list[bool] = []

    async def stuck(handle: FitHandle) -> None:
        await anyio.sleep_forever()
        finished.append(True)

    handle = FitHandle(learner, 1, finalize=stuck, finalize_timeout=0.05)
    with anyio.fail_after(20), pytest.warns(UserWarning, match="finalize_timeout=0.05 s"):
        assert await handle.run() is RunState.COMPLETED
    assert handle.done
    assert not handle.finalized
    assert not finished

    saved: list[int] = []

    async def save(handle: FitHandle) -> None:
        saved.append(handle.learner.state.step)

    second = FitHandle(learner, 2, finalize=save)
    assert not second.finalized
    await second.run()
    assert second.finalized
    assert saved == [4]
