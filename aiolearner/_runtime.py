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
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import torch

from ._context import StageContext
from ._data import Batches, BatchSource
from ._events import EventHub
from ._locks import ReadWriteLock
from ._policy import LONE_YIELD_FACTOR, SHARING_RECHECK, ComputePolicy, loop_is_shared
from ._rng import restore_torch_rng
from ._state import State
from ._worker import ComputeWorker, Turn

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._dist._strategy import Strategy
    from ._exceptions import ControlFlow, StopFit
    from ._executor import Executor
    from ._plan import HookProgress
    from ._stage import Stage
    from ._trace import Trace
    from ._validation import Validator

__all__ = [
    "DRIVING",
    "Lane",
    "Runtime",
    "compute_lane",
    "current_set",
    "join_lane",
    "on_snapshot",
    "validation_sources",
]


class Lane(Protocol):
    """A compute worker of its own for a task that runs stages next to the training loop."""

    async def run(
        self,
        tg: TaskGroup,
        fn: Callable[..., Any],
        *args: Any,
        on_cancel: Callable[[], object] | None = None,
    ) -> Any: ...


#: The compute lane of the current task: a task that runs stages next to the training loop (a
#: concurrent validation, a branch of ``Parallel``) sets its own here (a capacity-1 limiter for
#: anyio's worker threads, or a worker of its own), so its hops to worker threads overlap the
#: training's instead of queueing behind them.
compute_lane: ContextVar[anyio.CapacityLimiter | Lane | None] = ContextVar(
    "aiolearner_compute_lane", default=None
)
#: Set while the current task runs a validation pass on other data than the learner's
#: ``val_data``: a concurrent validation's snapshot (iterators opened when the snapshot was
#: taken), ``learner.validate(data)``, ``learner.test(data)``. By set name (``None`` for a single
#: data set), in the order the sets are validated.
validation_sources: ContextVar[dict[str | None, BatchSource] | None] = ContextVar(
    "aiolearner_validation_sources", default=None
)
#: Set while the current task validates a private weight snapshot (concurrent validation):
#: Validate takes no weights lock (nobody else writes the snapshot).
on_snapshot: ContextVar[bool] = ContextVar("aiolearner_on_snapshot", default=False)
#: The validation set the current task's Validate pass is on (``open_pass(state, "validation")``).
current_set: ContextVar[str | None] = ContextVar("aiolearner_current_set", default=None)


def join_lane() -> None:
    """Make the current CUDA stream wait for what the current task's lane queued on a stream of
    its own (a concurrent validation's), before reading its results; nothing elsewhere."""
    join = getattr(compute_lane.get(), "join", None)
    if join is not None:
        join()


#: Set while a batch compiled to run without the event loop runs (see _executor.py): its compute
#: stages then call ``compute`` directly, since the batch as a whole already holds the weights
#: lock, is timed, and runs where the policy put it. A context variable, not a flag on the
#: runtime: a concurrent validation's batches run on the loop while training runs in the worker.
DRIVING: ContextVar[bool] = ContextVar("aiolearner_driving", default=False)


#: What :meth:`Runtime.run_inline` returns when it did not run its function (the caller then
#: awaits :meth:`Runtime.compute`).
NOT_RUN: Any = object()


class Runtime:
    """Shared by the stages of one learner; see the module docstring."""

    def __init__(
        self,
        *,
        policy: ComputePolicy,
        train: BatchSource,
        val: dict[str | None, BatchSource],
        hub: EventHub,
        trace: Trace | None,
        device: torch.device,
        yield_interval: float,
        teardown_timeout: float,
    ) -> None:
        self.policy = policy
        self.train = train
        #: The validation data sets by name (``None``: a single ``val_data``), maybe empty.
        self.val_sets = val
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
        #: How the last fit run ended (``state.outcome`` of its ``after_fit_run``).
        self.last_outcome = ""
        #: The ``test_`` keys of ``state.metrics`` that tests wrote since the last fit started
        #: (dropped when the next one starts; left out of checkpoints).
        self.tested: set[str] = set()
        #: While a test runs: ``state.metrics`` as it was when it began (see tested_keys).
        self.testing: dict[str, Any] | None = None
        #: The last run ended stopped (a StopFit acted on, its teardown done) but its caller
        #: saw a cancellation (or a signal) that landed after: the stop's reason. The next fit
        #: ends there as that run did (see FitRun.run), so that "fit again" after it finishes
        #: as the uninterrupted run did.
        self.unseen_stop: str | None = None
        #: The validation sets' own random streams (a loader's ``generator``) as the training
        #: run's current validation began, by set, until it finishes: run again after an
        #: interruption (or resumed from a checkpoint), it draws the same orders.
        self.val_begun: dict[str | None, dict[str, Any]] = {}
        self.pass_done = False
        #: The current epoch's ``after_epoch`` has run (or went to a concurrent tail): a
        #: ``StopFit`` counts the epoch only then, so that every epoch counted is recorded.
        #: (Not in checkpoints: a stopped run's epoch is counted before its teardown saves.)
        self.epoch_recorded = False
        #: The current epoch's validation (sequential, per epoch) has finished, ``after_validate``
        #: included: a resumed run goes on with ``after_epoch``, not with a second validation.
        self.val_done = False
        #: A validation's pass has finished and its ``after_validate`` was interrupted: the
        #: resumed run runs that hook only, with the results in the state.
        self.val_after = False
        #: A StopFit the epoch's ``after_validate`` raised, to raise once its ``after_epoch`` has
        #: run: kept here (and in checkpoints) so that a run interrupted in between stops
        #: there when it resumes.
        self.stop_after_epoch: StopFit | None = None
        #: Which callbacks finished the tracked hooks of the current epoch's tail (see
        #: ``HookPlan.run``); one dict for the learner's life (the plans point at it).
        self.hook_progress: HookProgress = {}
        self.train_losses: list[torch.Tensor] = []
        #: Steps before whose batch a callback takes the learner's state (every n-th, for each
        #: n here; ``StateView.save_points``), set for the run.
        self.save_every: tuple[int, ...] = ()
        #: ``(epoch, step, BatchSource.mark())`` read just before that step's batch was drawn,
        #: when it is one of those: a state taken before the batch is computed holds the random
        #: state from before the draw, so that a resumed run draws the batch again the same.
        self.pre_mark: tuple[int, int, tuple[dict[str, Any], int]] | None = None
        #: ``(batch, capture_torch_rng())`` read as a fused training batch with hooks began
        #: (after its draw): what a stop or an error before its commit puts back, so that its
        #: forward, run again, draws the same dropout (see ``BatchProgram``).
        #: Whether the learner warned that a batch stage leaves gradients for the next batch.
        self.warned_carried = False
        self.batch_rng: tuple[Any, tuple[torch.Tensor, list[torch.Tensor] | None]] | None = None
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
        #: The distributed strategy (None: one process, and nothing of it on any path).
        self.strategy: Strategy | None = None
        self.context = StageContext(self)
        #: The current training batch is final (see StageContext.commit); the executor resets
        #: ``context._committed`` when a batch starts.
        self.commit = self.context.commit

    @property
    def has_val_data(self) -> bool:
        return bool(self.val_sets)

    def validation_sets(self) -> dict[str | None, BatchSource]:
        """The sets the current validation pass goes over (see ``validation_sources``)."""
        sources = validation_sources.get()
        return self.val_sets if sources is None else sources

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

    def run_inline(
        self, fn: Callable[..., object], *args: Any, locks: bool, timed: bool = True
    ) -> object:
        """``fn(*args)`` now, on the loop, if the policy keeps compute inline and (``locks``) the
        weights lock is free: its result, or ``NOT_RUN``. :meth:`compute`'s entry without a
        coroutine, for the batch loops: a tiny model's whole step is a few coroutine creations
        long.
        ``timed=False``: ``fn`` records its batches' times itself (a burst of several batches),
        and the policy may decide again once it returns."""
        policy = self.policy
        if policy.hopping:
            return NOT_RUN
        lock = self.weights_lock if locks else None
        if lock is not None and not lock.acquire_write_nowait():
            return NOT_RUN
        clock = time.perf_counter
        start = clock()
        try:
            return fn(*args)
        finally:
            if lock is not None:
                lock.release_write()
            if timed:
                end = clock()
                policy.observe(end - start, end)
            else:
                policy.maybe_reconsider()

    async def compute(
        self,
        fn: Callable[..., Any],
        *args: Any,
        writes_weights: bool = False,
        timed: bool = True,
        on_cancel: Callable[[], object] | None = None,
        raise_cancel: bool = False,
    ) -> Any:
        """``fn(*args)`` where the policy says, under the weights' write lock if asked.

        ``timed=False``: ``fn`` records its batches' times itself (a burst of several batches).
        ``on_cancel``: see :meth:`ComputeWorker.run`. A cancellation that comes during a
        shielded hop (one that writes weights) is left for the caller's next await: the stage
        that called goes on to its end, its ``after_`` hooks included (a committed batch is
        recorded whole); ``raise_cancel=True`` raises it at once, after the hop (a stage
        author's ``context.compute``, which says so).
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
                # with the update must land with it before a cancellation is raised: here when
                # the caller asks (raise_cancel), else at the caller's next await.
                with anyio.CancelScope(shield=True):
                    result = await self._hop(fn, args, timed, None)
                if raise_cancel:
                    await anyio.lowlevel.checkpoint_if_cancelled()
                return result
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
            if isinstance(lane, anyio.CapacityLimiter):
                # Not timed: the policy's measurements are the training loop's batches.
                result = await anyio.to_thread.run_sync(fn, *args, limiter=lane)
            elif lane is not None:
                assert self.tg is not None
                result = await lane.run(self.tg, fn, *args, on_cancel=on_cancel)
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

    async def take_turn(self, turn: Turn) -> None:
        """Wait for the loop's turn among the learners computing inline on it; the slice until
        the next :meth:`give_turn` starts when it comes."""
        await turn.take()
        self.last_yield = time.perf_counter()

    async def give_turn(self, now: float, turn: Turn | None = None) -> None:
        """Give the event loop a turn; the batch loops call this every ``yield_every`` seconds.
        ``turn``: the training loop's hold on the loop's thread, passed on if held."""
        if turn is not None and turn.held:
            await turn.pass_on(now)
        else:
            await anyio.lowlevel.checkpoint()
        # From when the loop came back: waiting for it (for other learners' turns, say) does
        # not shorten the next slice.
        self.last_yield = time.perf_counter()
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

    def tested_keys(self, metrics: dict[str, Any]) -> set[str]:
        """The ``test_`` keys of ``metrics`` tests wrote since the last fit began, the running
        test's included (those it has written so far)."""
        before = self.testing
        if before is None:
            return self.tested
        return self.tested | {
            k
            for k, v in metrics.items()
            if k.startswith("test_") and (k not in before or before[k] is not v)
        }

    @property
    def committed(self) -> bool:
        """Whether the current training batch is committed."""
        return self.context._committed

    def abandon_batch(self, state: State, mark: tuple[dict[str, Any], int] | None) -> None:
        """A batch was interrupted (error or cancellation): undone if it was not committed
        (with ``mark``, from ``BatchSource.mark`` at its start, the random draws made since
        are undone when the pass closes); if it was (interrupted in ``after_update``, say), it
        counts as done, loss included, as a batch that ends normally does
        (``Executor.finish_batch``)."""
        if self.committed:
            loss = state.__dict__.get("loss")
            if loss is not None:
                self.train_losses.append(loss.detach())
            state.invalidate(*self.batch_fields)
            return
        d = state.__dict__
        batch = d.get("batch")
        state.invalidate(*self.batch_fields)
        if batch is not None:
            self.train.put_back(batch)  # a live stream (steps_per_epoch) serves it again
        # Every optimizer's: a batch may have run the gradient stages of several.
        for optimizer in (d.get("optimizers") or {"": d.get("optimizer")}).values():
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
        if mark is not None:
            self.train.roll_back(mark)
        elif batch is not None:
            self.train.keep_undone(batch)
            began = self.batch_rng
            # The forward's draws (dropout), if it ran; not where a producer thread's fetches
            # draw from torch's generator too (their draws stay: compute draws none of it).
            if began is not None and began[0] is batch and not self.train.draws_ahead("torch"):
                restore_torch_rng(began[1])
        self.batch_rng = None

    #: Where the current epoch is: what a failed checkpoint load puts back.
    PROGRESS = (
        "pass_done",
        "val_done",
        "val_after",
        "stop_after_epoch",
        "unseen_stop",
        "train_losses",
        "epoch_rng",
    )

    def export_progress(self) -> tuple[Any, ...]:
        """The :attr:`PROGRESS` fields, for :meth:`restore_progress`."""
        return tuple(getattr(self, name) for name in self.PROGRESS)

    def restore_progress(self, saved: tuple[Any, ...]) -> None:
        """Undo what happened since :meth:`export_progress`."""
        for name, value in zip(self.PROGRESS, saved, strict=True):
            setattr(self, name, value)

    def end_epoch(self, state: State) -> None:
        state.epoch += 1
        state.batch_index = 0
        self.pass_done = False
        self.epoch_recorded = False
        #: The current epoch's validation (sequential, per epoch) has finished, ``after_validate``
        #: included: a resumed run goes on with ``after_epoch``, not with a second validation.
        self.val_done = False
        self.stop_after_epoch = None
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
                if self.pass_done:
                    raise ValueError(
                        "open_pass: 'train' is the epoch's training pass (a stage in Fit's "
                        "place opens it), and this epoch's has finished; to go over the "
                        "training data again, pass the data itself: open_pass(state, data)"
                    )
                async with self._open_train(state) as batches:
                    yield batches
                return
            if data != "validation":
                raise ValueError(
                    f"open_pass: data must be 'train', 'validation' or batches, got {data!r}"
                )
            sets = self.validation_sets()
            if not sets:
                raise ValueError("open_pass: this learner has no validation data")
            name = current_set.get()
            if name is None and None not in sets:
                if len(sets) > 1:
                    raise ValueError(
                        "open_pass: this learner has several validation sets "
                        f"({', '.join(map(repr, sets))}); the Validate stage goes over each in turn"
                    )
                name = next(iter(sets))
            source = sets[name]
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
            strategy = self.strategy
            if strategy is None:
                yield b
            else:
                # Agreement points between batches (once a pass: nothing per batch without).
                yield strategy._agreed_batches(b, state)  # type: ignore[misc]

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
