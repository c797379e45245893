"""What the stages of one learner share while running: compute placement, data, progress.

Compute placement (``Learner(compute=...)``):

* ``"inline"``: stages run their torch work on the event loop. Lowest overhead; the loop is
  blocked for as long as a batch computes (it still yields every ``yield_interval`` seconds,
  between batches, so other tasks get turns and cancellation stays prompt; ten times less
  often while no other task is on the loop, and at every epoch's end for cancellation).
* ``"thread"``: the blocking work runs in the learner's compute worker (one thread borrowed from
  anyio's pool for the whole run, fed through a queue; see ``_worker.py``). Fused batches (the
  default tree with ``def`` hooks) go over in bursts, several batches a hop (``Fit._burst``);
  an unfused batch hops once per compute stage.
* ``"auto"`` (default): runs inline while that blocks the loop for at most ``max_blocking``
  seconds per batch *or* nothing else is running on the loop; otherwise hops. Learners training
  inline on one loop count together: their slices (a batch, or the batches between two turns)
  add up against ``max_blocking``. It re-decides every ``recheck_interval`` seconds from
  measured batch times and the loop's task list, so a tiny model keeps inline overhead, and a
  heavy model keeps a web service on the same loop responsive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

import anyio
import torch

from ._data import Batches, BatchSource
from ._events import EventHub
from ._locks import ReadWriteLock
from ._rng import capture_rng, restore_rng
from ._state import State
from ._worker import ComputeWorker

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._exceptions import ControlFlow
    from ._stages import Stage
    from ._trace import Trace
    from ._validation import Validator

__all__ = ["ComputeMode", "ComputePolicy", "Runtime"]

ComputeMode = Literal["auto", "thread", "inline"]

#: The compute lane of the current task: a task that runs stages next to the training loop (a
#: concurrent validation, a branch of ``Parallel``) sets its own capacity-1 limiter here, so its
#: hops to worker threads overlap the training's instead of queueing behind them.
compute_lane: ContextVar[anyio.CapacityLimiter | None] = ContextVar(
    "aiolearner_compute_lane", default=None
)
#: Set while the current task validates a private weight snapshot (concurrent validation): the
#: pass reads this source (opened when the snapshot was taken) instead of the learner's
#: ``val_data``, and Validate takes no weights lock (nobody else writes the snapshot).
snapshot_source: ContextVar[BatchSource | None] = ContextVar(
    "aiolearner_snapshot_source", default=None
)


def loop_is_shared(*, own_tasks: bool = False) -> bool:
    """Whether tasks other than this one, its ancestors and aiolearner's own are on the loop.

    With ``own_tasks=True`` (does the training loop need to give the loop turns often?), the
    ancestors and aiolearner's own tasks count too: a parent that started ``fit`` in a task group
    may well go on with work of its own, and a data producer or a concurrent validation needs
    turns as much as a user's task does; only the compute worker's task, which just waits on its
    thread, does not.
    """
    me = anyio.get_current_task()
    tasks = anyio.get_running_tasks()
    mine = {me.id}
    if not own_tasks:
        by_id = {t.id: t for t in tasks}
        node: Any = me
        while node is not None:
            mine.add(node.id)
            node = by_id.get(node.parent_id) if node.parent_id is not None else None
    ignored = ("<", "aiolearner.compute") if own_tasks else ("<", "aiolearner.")
    for task in tasks:
        if task.id in mine or task.name is None:
            continue
        if task.name.startswith(ignored):
            continue
        return True
    return False


#: While nothing else runs on the loop, the training loop gives it a turn this many times less
#: often than ``yield_interval`` (a turn then only serves cancellation and deadlines; at the 1 ms
#: default each costs a tiny model ~2 us a batch). How often a shared loop is checked for still
#: being shared (listing the tasks costs ~10-20 us); a lone one is checked at every turn.
LONE_YIELD_FACTOR = 10
SHARING_RECHECK = 0.5


class ComputePolicy:
    """Where stage compute runs; see the module docstring."""

    def __init__(
        self, mode: ComputeMode, *, max_blocking: float, recheck_interval: float = 0.5
    ) -> None:
        if mode not in ("auto", "thread", "inline"):
            raise ValueError(f"compute must be 'auto', 'thread' or 'inline', got {mode!r}")
        if max_blocking <= 0:
            raise ValueError(f"max_blocking must be positive, got {max_blocking}")
        self.mode = mode
        self.max_blocking = max_blocking
        self.recheck_interval = recheck_interval
        self.hopping = mode == "thread"
        self.limiter = anyio.CapacityLimiter(1)
        self._typical: float | None = None
        self._next_check = 0.0
        # Set while a run is on (see enter_run): the event loop's thread, the turn interval.
        self._loop_thread: int | None = None
        self._turn = 0.0
        #: How many hops were made (for tests and the throughput report).
        self.hops = 0

    def record(self, seconds: float) -> None:
        """Record how long one batch (or compute stage) took; safe from the worker thread."""
        typical = self._typical
        self._typical = seconds if typical is None else 0.8 * typical + 0.2 * seconds

    def observe(self, seconds: float, now: float | None = None) -> None:
        """Record a duration and maybe change the decision (on the event loop only).

        ``now``: the current ``time.perf_counter()``, when the caller has it (the training loop
        does; this runs once a batch, so the calls it saves count for a tiny model).
        """
        typical = self._typical
        self._typical = seconds if typical is None else 0.8 * typical + 0.2 * seconds
        if self.mode == "auto":
            if now is None:
                now = time.perf_counter()
            if now >= self._next_check:
                self._next_check = now + self.recheck_interval
                self.reconsider()

    def reconsider_due(self, now: float) -> bool:
        """Whether auto's next decision is due (a burst of batches then hands back to the loop)."""
        return self.mode == "auto" and now >= self._next_check

    def maybe_reconsider(self) -> None:
        """Re-decide if ``recheck_interval`` has passed (on the event loop only)."""
        if self.mode == "auto":
            now = time.perf_counter()
            if now >= self._next_check:
                self._next_check = now + self.recheck_interval
                self.reconsider()

    def enter_run(self, turn_interval: float) -> None:
        """A run of this learner starts on the current thread's event loop."""
        self._loop_thread = threading.get_ident()
        self._turn = turn_interval
        with _RUNNING_LOCK:
            _RUNNING.add(self)

    def exit_run(self) -> None:
        """The run is over."""
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        self._loop_thread = None

    def blocking_slice(self) -> float:
        """How long this learner, running inline, holds the event loop at a time: a batch, or
        the batches between two turns, whichever is longer."""
        return max(self._typical or 0.0, self._turn)

    def reconsider(self) -> None:
        typical = self._typical
        heavy = typical is not None and typical > self.max_blocking
        if typical is not None and not heavy and self._loop_thread is not None:
            # Several learners training inline on one event loop each hold it for a slice in
            # turn: a task waiting for the loop waits for all of them. Count theirs too.
            loop = self._loop_thread
            with _RUNNING_LOCK:  # learners may run on event loops in other threads too
                running = list(_RUNNING)
            crowd = self.blocking_slice() + sum(
                other.blocking_slice()
                for other in running
                if other is not self and other._loop_thread == loop and not other.hopping
            )
            heavy = crowd > self.max_blocking
        self.hopping = heavy and loop_is_shared()

    @property
    def typical_seconds(self) -> float | None:
        """The smoothed duration of a batch's compute, as measured."""
        return self._typical


#: The compute policies of the learners running now (any event loop, any thread): ``auto``
#: counts the other learners training inline on its own event loop. A run always leaves it
#: (``Learner._running`` calls ``exit_run`` in a ``finally``).
_RUNNING: set[ComputePolicy] = set()
_RUNNING_LOCK = threading.Lock()


class Runtime:
    """Shared by the stages of one learner (the stage API: ``stage.runtime``)."""

    def __init__(
        self,
        *,
        policy: ComputePolicy,
        train: BatchSource,
        val: BatchSource | None,
        hub: EventHub,
        trace: Trace | None,
        yield_interval: float,
        teardown_timeout: float,
    ) -> None:
        self.policy = policy
        self.train = train
        self.val = val
        self.hub = hub
        self.trace = trace
        self.weights_lock = ReadWriteLock()
        self.yield_interval = yield_interval
        self.teardown_timeout = teardown_timeout
        self.teardown_timed_out = False
        self.observed = trace is not None
        self.last_yield = time.perf_counter()
        #: The current interval between turns: ``yield_interval`` while other tasks share the
        #: loop, LONE_YIELD_FACTOR times that while the training loop has it alone.
        self.yield_every = yield_interval
        self._sharing_checked_at = -SHARING_RECHECK
        # progress
        self.target_epochs = 0
        self.pass_done = False
        self.committed = False
        self.train_losses: list[torch.Tensor] = []
        self.epoch_rng: dict[str, Any] | None = None
        self.batch_is_atomic = True
        self.tg: TaskGroup | None = None
        #: The compute worker thread of the current run (stopped when the run ends).
        self.worker = ComputeWorker()
        #: Validation mode and schedule (None: sequential, at the end of each epoch).
        self.validator: Validator | None = None

    # -- compute ------------------------------------------------------------------------------

    @property
    def offloading(self) -> bool:
        return self.policy.mode != "inline"

    @property
    def hop_leaves(self) -> bool:
        """Whether unfused compute stages hop to the worker now."""
        return self.policy.hopping

    @property
    def has_val_data(self) -> bool:
        return self.val is not None

    async def hop(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timed: bool = True,
        on_cancel: Callable[[], object] | None = None,
    ) -> Any:
        """Run ``fn(*args)`` in the compute worker; returns its result.

        ``timed=False``: ``fn`` records its batches' times itself (a burst of several batches).
        ``on_cancel``: see :meth:`ComputeWorker.run`.
        """
        policy = self.policy
        policy.hops += 1
        lane = compute_lane.get()
        try:
            if lane is not None:
                # Not timed: the policy's measurements are the training loop's batches.
                result = await anyio.to_thread.run_sync(fn, *args, limiter=lane)
            else:
                assert self.tg is not None
                if timed and policy.mode == "auto":
                    result = await self.worker.run(
                        self.tg, self._timed, fn, *args, on_cancel=on_cancel
                    )
                else:
                    result = await self.worker.run(self.tg, fn, *args, on_cancel=on_cancel)
        finally:
            self.last_yield = time.perf_counter()
            self.hub.flush()
        if policy.mode == "auto":
            policy.maybe_reconsider()
        return result

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            # In the worker thread: record only; the decision is taken back on the loop.
            self.policy.record(time.perf_counter() - start)

    async def run_fused(self, stage: Stage, state: State) -> None:
        """Run a fused batch stage (all sync) inline or in one hop, holding the write lock."""
        lock = self.weights_lock if stage._fused_writes else None
        if lock is not None and not lock.acquire_write_nowait():
            await lock.acquire_write()
        try:
            policy = self.policy
            if policy.hopping:
                await self.hop(stage.call_sync, state)
            elif policy.mode == "auto":
                start = time.perf_counter()
                try:
                    stage.call_sync(state)
                finally:
                    policy.observe(time.perf_counter() - start)
            else:
                stage.call_sync(state)
        finally:
            if lock is not None:
                lock.release_write()

    async def give_turn(self, now: float) -> None:
        """Give the event loop a turn; the batch loops call this every ``yield_every`` seconds."""
        self.last_yield = now
        await anyio.lowlevel.checkpoint()
        # Alone, every turn looks again (a task that arrives waits ~one lone interval at most);
        # shared, every SHARING_RECHECK seconds (listing the tasks costs ~10-20 us).
        if (
            self.yield_every > self.yield_interval
            or now - self._sharing_checked_at >= SHARING_RECHECK
        ):
            self._sharing_checked_at = now
            if loop_is_shared(own_tasks=True):
                self.yield_every = self.yield_interval
            else:
                self.yield_every = self.yield_interval * LONE_YIELD_FACTOR

    # -- progress -----------------------------------------------------------------------------

    def commit(self, state: State) -> None:
        """The current training batch is final: it will not be repeated on resume."""
        state.step += 1
        state.batch_index += 1
        self.committed = True

    def finish_batch(self, state: State, losses: list[torch.Tensor]) -> None:
        d = state.__dict__
        loss = d.get("loss")
        if loss is not None:
            # Detached: keeping the loss with its autograd graph alive until the end of the
            # epoch costs ~8 us a step on a tiny model (allocator and graph bookkeeping).
            losses.append(loss.detach())
        d.pop("batch", None)
        d.pop("output", None)
        d.pop("loss", None)
        if not self.committed:
            self.commit(state)

    def abandon_batch(self, state: State, rng: dict[str, Any] | None) -> None:
        """A batch was interrupted (error or cancellation) before it was committed."""
        state.invalidate("batch", "output", "loss")
        if self.committed:
            return
        optimizer = state.__dict__.get("optimizer")
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        if rng is not None:
            restore_rng(rng)

    def capture_rng(self) -> dict[str, Any]:
        return capture_rng()

    def end_epoch(self, state: State) -> None:
        state.epoch += 1
        state.batch_index = 0
        self.pass_done = False
        self.train_losses = []
        self.epoch_rng = None

    # -- data ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def open_train(self, state: State) -> AsyncIterator[Batches]:
        assert self.tg is not None
        skip = state.batch_index
        reset: Callable[[Callable[[], Any]], Any] | None = None
        if self.epoch_rng is None:
            self.epoch_rng = capture_rng()
        else:
            # Resuming an epoch whose pass had started (also at batch 0: a checkpoint taken
            # before the first batch, after the sampler drew its order): rebuild the epoch's
            # iterator from the RNG state it started with (so a shuffling sampler draws the same
            # order), skip the batches already done, then put back the RNG state training had
            # reached.
            epoch_rng = self.epoch_rng

            def reset_rng(make: Callable[[], Any]) -> Any:
                now = capture_rng()
                restore_rng(epoch_rng)
                try:
                    return make()
                finally:
                    restore_rng(now)

            reset = reset_rng

        async with self.train.open(self.tg, skip=skip, reset=reset) as batches:
            yield batches

    @asynccontextmanager
    async def open_val(self, state: State) -> AsyncIterator[Batches]:
        assert self.tg is not None
        assert self.val is not None
        source = snapshot_source.get()
        if source is None:
            source = self.val
        async with source.open(self.tg) as batches:
            yield batches

    # -- observation (trace and events) ---------------------------------------------------------

    def enter(self, stage: Stage, state: State) -> float:
        d = state.__dict__
        self.hub.publish("stage_start", stage.name, d.get("epoch"), d.get("step"))
        if self.trace is not None:
            return self.trace.enter(stage.name, None, d.get("epoch"), d.get("step"))
        return 0.0

    def exit(self, stage: Stage, state: State, start: float) -> None:
        d = state.__dict__
        self.hub.publish("stage_end", stage.name, d.get("epoch"), d.get("step"))
        if self.trace is not None:
            self.trace.exit(stage.name, None, d.get("epoch"), d.get("step"), start)

    def observe_control(self, stage: Stage, flow: ControlFlow, state: State) -> None:
        d = state.__dict__
        kind = type(flow).__name__
        self.hub.publish(
            "control",
            stage.name,
            d.get("epoch"),
            d.get("step"),
            {"kind": kind, "reason": flow.reason},
        )
        if self.trace is not None:
            self.trace.control(stage.name, kind, d.get("epoch"), d.get("step"))

    def publish(self, kind: str, source: str, state: State, data: dict[str, Any]) -> None:
        d = state.__dict__
        self.hub.publish(kind, source, d.get("epoch"), d.get("step"), data)
