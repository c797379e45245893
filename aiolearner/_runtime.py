"""What the stages of one learner share while running (private): compute, progress, data, events.

Stages reach it only through :class:`~aiolearner.StageContext` (``stage.context``); the core's
own stages and the batch executor use it directly. :meth:`Runtime.compute` is the one place that
runs blocking work: it takes the weights lock when asked, hops to the compute worker or runs
inline as the compute policy says, and times the work for the ``auto`` policy.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio
import torch

from ._context import StageContext
from ._data import Batches, BatchSource
from ._events import EventHub
from ._locks import ReadWriteLock
from ._policy import LONE_YIELD_FACTOR, SHARING_RECHECK, ComputePolicy, loop_is_shared
from ._rng import restore_rng
from ._state import State
from ._worker import ComputeWorker

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._exceptions import ControlFlow
    from ._executor import Executor
    from ._stage import Stage
    from ._trace import Trace
    from ._validation import Validator

__all__ = ["DRIVING", "Runtime", "compute_lane", "snapshot_source"]

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
#: Set while a batch compiled to run without the event loop runs (see _executor.py): its compute
#: stages then call ``compute`` directly, since the batch as a whole already holds the weights
#: lock, is timed, and runs where the policy put it. A context variable, not a flag on the
#: runtime: a concurrent validation's batches run on the loop while training runs in the worker.
DRIVING: ContextVar[bool] = ContextVar("aiolearner_driving", default=False)


class Runtime:
    """Shared by the stages of one learner; see the module docstring."""

    def __init__(
        self,
        *,
        policy: ComputePolicy,
        train: BatchSource,
        val: BatchSource | None,
        hub: EventHub,
        trace: Trace | None,
        device: torch.device,
        yield_interval: float,
        teardown_timeout: float,
    ) -> None:
        self.policy = policy
        self.train = train
        self.val = val
        self.hub = hub
        self.trace = trace
        self.device = device
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
        self.train_losses: list[torch.Tensor] = []
        #: The fields stages declared, by lifetime (see Stage.fields), set when the learner is
        #: built: each set is cleared when its batch, epoch or run ends.
        self.expiring: dict[str, tuple[str, ...]] = {"batch": (), "epoch": (), "run": ()}
        #: ``expiring["batch"]``, read once a batch.
        self.batch_fields: tuple[str, ...] = ()
        #: The batch executor (set by the learner: it compiles the batch stages at build).
        self.executor: Executor
        self.tg: TaskGroup | None = None
        #: The compute worker thread of the current run (stopped when the run ends).
        self.worker = ComputeWorker()
        #: Validation mode and schedule (None: sequential, at the end of each epoch).
        self.validator: Validator | None = None
        self.context = StageContext(self)
        #: The current training batch is final (see StageContext.commit); the executor resets
        #: ``context._committed`` when a batch starts.
        self.commit = self.context.commit

    @property
    def has_val_data(self) -> bool:
        return self.val is not None

    @property
    def epoch_rng(self) -> dict[str, Any] | None:
        """The random state the current epoch's training pass began from (global generators
        and the training data's own streams), or ``None`` before it began; kept by the source,
        which sets it where the pass's iterator is created (see ``BatchSource._create``)."""
        return None if self.train.persistent else self.train.begun

    @epoch_rng.setter
    def epoch_rng(self, value: dict[str, Any] | None) -> None:
        if not self.train.persistent:
            self.train.begun = value

    # -- compute ------------------------------------------------------------------------------

    def run_inline(self, fn: Callable[[State], object], state: State, locks: bool) -> bool:
        """``fn(state)`` now, on the loop, if the policy keeps compute inline and (``locks``) the
        weights lock is free; whether it ran. :meth:`compute`'s entry without a coroutine, for
        the batch loop: a tiny model's whole step is a few coroutine creations long."""
        policy = self.policy
        if policy.hopping:
            return False
        lock = self.weights_lock if locks else None
        if lock is not None and not lock.acquire_write_nowait():
            return False
        clock = time.perf_counter
        start = clock()
        try:
            fn(state)
        finally:
            if lock is not None:
                lock.release_write()
            end = clock()
            policy.observe(end - start, end)
        return True

    async def compute(
        self,
        fn: Callable[..., Any],
        *args: Any,
        writes_weights: bool = False,
        timed: bool = True,
        on_cancel: Callable[[], object] | None = None,
    ) -> Any:
        """``fn(*args)`` where the policy says, under the weights' write lock if asked.

        ``timed=False``: ``fn`` records its batches' times itself (a burst of several batches).
        ``on_cancel``: see :meth:`ComputeWorker.run`.
        """
        if DRIVING.get():
            return fn(*args)
        lock = self.weights_lock if writes_weights else None
        if lock is not None:
            await lock.acquire_write()
        try:
            policy = self.policy
            if policy.hopping:
                if lock is None or on_cancel is not None:
                    return await self._hop(fn, args, timed, on_cancel)
                # Shielded: the thread cannot be interrupted anyway, and the counters written
                # with the update must land with it before a cancellation is raised.
                with anyio.CancelScope(shield=True):
                    return await self._hop(fn, args, timed, None)
            clock = time.perf_counter
            start = clock()
            try:
                return fn(*args)
            finally:
                if timed:
                    end = clock()
                    policy.observe(end - start, end)
        finally:
            if lock is not None:
                lock.release_write()

    async def _hop(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        timed: bool,
        on_cancel: Callable[[], object] | None,
    ) -> Any:
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

    async def give_turn(self, now: float) -> None:
        """Give the event loop a turn; the batch loops call this every ``yield_every`` seconds."""
        self.last_yield = now
        await anyio.lowlevel.checkpoint()
        # Alone, every turn looks again (a task that arrives waits ~one lone interval at most);
        # shared, every SHARING_RECHECK seconds (listing the tasks is not free).
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

    @property
    def committed(self) -> bool:
        """Whether the current training batch is committed."""
        return self.context._committed

    def abandon_batch(self, state: State, rng: dict[str, Any] | None) -> None:
        """A batch was interrupted (error or cancellation): undone if it was not committed;
        if it was (interrupted in ``after_update``, say), it counts as done, loss included, as
        a batch that ends normally does (``Executor.finish_batch``)."""
        if self.committed:
            loss = state.__dict__.get("loss")
            if loss is not None:
                self.train_losses.append(loss.detach())
            state.invalidate(*self.batch_fields)
            return
        state.invalidate(*self.batch_fields)
        optimizer = state.__dict__.get("optimizer")
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        if rng is not None:
            restore_rng(rng)

    def end_epoch(self, state: State) -> None:
        state.epoch += 1
        state.batch_index = 0
        self.pass_done = False
        self.train_losses = []
        self.epoch_rng = None
        state.invalidate(*self.expiring["epoch"])

    # -- data ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def open_pass(self, state: State, data: Any) -> AsyncIterator[Batches]:
        """A pass over ``"train"``, ``"validation"`` or other data (see StageContext)."""
        assert self.tg is not None
        if isinstance(data, str):
            if data == "train":
                async with self._open_train(state) as batches:
                    yield batches
                return
            if data != "validation":
                raise ValueError(
                    f"open_pass: data must be 'train', 'validation' or batches, got {data!r}"
                )
            source = snapshot_source.get()
            if source is None:
                source = self.val
            if source is None:
                raise ValueError("open_pass: this learner has no validation data")
        else:
            train = self.train
            source = BatchSource(
                data,
                name=f"data of a {type(data).__name__}",
                mover=train.mover,
                prefetch=train.prefetch,
                fetch=train.fetch,
                fetch_budget=train.fetch_budget,
            )
        async with source.open(self.tg) as batches:
            yield batches

    @asynccontextmanager
    async def _open_train(self, state: State) -> AsyncIterator[Batches]:
        assert self.tg is not None
        # Resuming an epoch whose pass had begun (also at batch 0: a checkpoint taken before
        # the first batch, after the sampler drew its order), the source rebuilds the epoch's
        # iterator from the random state it began from (so a shuffling sampler draws the same
        # order), skips the batches already done, then puts back the global state training had
        # reached. At an epoch's start, it records that state as it creates the iterator.
        async with self.train.open(self.tg, skip=state.batch_index, start=self.epoch_rng) as b:
            yield b

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
