"""When validation runs, and validating a snapshot of the weights while training goes on.

``Learner(validate=..., validate_every=..., max_snapshots=..., snapshot_policy=...)``:

* ``validate="sequential"`` (default): the Validate stage runs in the training loop, on the live
  weights (under the weights' read lock); training waits for it.
* ``validate="concurrent"``: when a validation is due, the training loop takes a *snapshot*: it
  copies the weights (parameters and every buffer, batch-norm statistics included) into a shadow
  model under the weights' read lock, so only fully updated weights are copied, and goes on
  training. A worker task in the learner's run task group validates the snapshot, one snapshot at
  a time, in the order they were taken. Each shadow model is allocated once (a deep copy of the
  model at first use) and refreshed in place afterwards.

A concurrent validation runs its stages (Validate, ValidateBatch, ValidateLoss and any under them)
on a *validation state* of its own, not on the training state: ``model`` is the shadow model,
``epoch``/``step``/``batch_index`` are the counters at the snapshot, ``metrics`` is the training
state's dict (shared), ``optimizer`` is the live optimizer (not a snapshot). So the
``after_validate`` callbacks see ``validation`` and ``validation_tag == (epoch, step)`` of the
snapshot, and a best-model checkpoint saves exactly the weights that were validated. When the
pass ends, its ``validation`` and ``validation_tag`` land in the training state too.

Control flow and errors of a concurrent validation reach the training loop between batches, at
the end of the epoch and when the run ends, whichever comes first:

* ``StopFit`` raised in ``after_validate`` (early stopping) is a *stop request*; the training loop
  raises it at its next batch boundary. With ``snapshot_policy="wait"``, training cannot run
  more than ``max_snapshots`` validation periods ahead of the results, so it stops at most that
  many periods late (one, by default).
* any other exception ends the run as if a stage had raised it (bare, with a note naming the
  snapshot; callback errors in their ExceptionGroup).
* the run (``FitRun``) waits for outstanding validations, and their ``after_validate`` hooks,
  before ``after_fit_run``; an error or a cancellation of the run cancels them.

Random numbers: the validation data's iterator is created when the snapshot is taken, at the point
where a sequential validation would create it (a DataLoader draws its base seed there), so both
modes draw the same numbers. Anything that draws random numbers *while* the pass runs (random
augmentation of validation data, a model that samples in eval mode) draws from the global
generators concurrently with training and changes its random stream; see
docs/concurrent-validation.md.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import anyio
import torch

from ._data import BatchSource
from ._exceptions import ControlFlow, StopFit
from ._parallel import Parallel, rebind
from ._rng import capture_rng, restore_rng
from ._runtime import compute_lane, snapshot_source
from ._stage import epoch_words
from ._state import State

if TYPE_CHECKING:
    from ._learner import Learner
    from ._runtime import Runtime
    from ._stage import Stage

__all__ = [
    "SnapshotPolicy",
    "ValidateEvery",
    "ValidateMode",
    "Validator",
    "bind_states",
    "make_validator",
]

ValidateMode = Literal["sequential", "concurrent"]
SnapshotPolicy = Literal["wait", "skip"]
ValidateEvery: TypeAlias = Literal["epoch"] | int | timedelta


def make_validator(
    mode: ValidateMode,
    every: ValidateEvery,
    max_snapshots: int,
    policy: SnapshotPolicy,
    *,
    has_val_data: bool,
) -> Validator | None:
    """The validator for these options, or ``None`` for the default (sequential, each epoch)."""
    if mode not in ("sequential", "concurrent"):
        raise ValueError(f"validate must be 'sequential' or 'concurrent', got {mode!r}")
    if policy not in ("wait", "skip"):
        raise ValueError(f"snapshot_policy must be 'wait' or 'skip', got {policy!r}")
    if isinstance(max_snapshots, bool) or not isinstance(max_snapshots, int) or max_snapshots < 1:
        raise ValueError(f"max_snapshots must be an int of at least 1, got {max_snapshots!r}")
    steps: int | None = None
    seconds: float | None = None
    if isinstance(every, timedelta):
        seconds = every.total_seconds()
        if seconds <= 0:
            raise ValueError(f"validate_every must be a positive duration, got {every!r}")
    elif isinstance(every, int) and not isinstance(every, bool):
        if every < 1:
            raise ValueError(f"validate_every must be at least 1 step, got {every!r}")
        steps = every
    elif every != "epoch":
        raise ValueError(
            f"validate_every must be 'epoch', an int (steps) or a datetime.timedelta, got {every!r}"
        )
    if not has_val_data or (mode == "sequential" and every == "epoch"):
        return None
    return Validator(
        concurrent=mode == "concurrent",
        steps=steps,
        seconds=seconds,
        max_snapshots=max_snapshots,
        policy=policy,
    )


def bind_states(learner: Learner[Any]) -> None:
    """Point the hooks of stages that run on a state of their own at that state.

    Called at the end of every build: plans are bound to the training state by default; the
    validate subtree of a concurrent validator runs on the validation state, and each branch of a
    :class:`~aiolearner.Parallel` on its branch state.
    """
    rt = learner._rt
    validator = rt.validator
    if validator is not None:
        validator.bind(learner)
    overrides: dict[int, State] = {}
    if validator is not None and validator.concurrent and validator.stage is not None:
        overrides[id(validator.stage)] = validator.state
    for stage in learner._root.walk():
        if isinstance(stage, Parallel):
            for child, branch in zip(stage.children, stage.branch_states, strict=True):
                overrides[id(child)] = branch
    if overrides:
        rebind(learner, overrides)


class _Preopened:
    """Data whose iterator was created already (when the snapshot was taken)."""

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it

    def __iter__(self) -> Iterator[Any]:
        return self._it


class _PreopenedAsync:
    def __init__(self, it: Any) -> None:
        self._it = it

    def __aiter__(self) -> Any:
        return self._it


class _Slot:
    """One snapshot: a shadow model, refreshed in place, and where it was taken."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self._tensors: list[torch.Tensor] = []
        self._stream: Any = None
        self.tag = (0, 0)
        self.batch_index = 0
        self.data: Any = None

    def refresh(self, model: torch.nn.Module) -> None:
        """Make the shadow model equal to ``model`` (call under the weights' read lock)."""
        sources = [*model.parameters(), *model.buffers()]
        shadow = self.model
        if shadow is None or not _same_layout(self._tensors, sources):
            self._allocate(model)
            return
        with torch.no_grad():
            device = sources[0].device if sources else torch.device("cpu")
            if device.type == "cuda":
                # Copy on a side stream after the work already queued, and make the training
                # stream wait for the copy before its next (weight-changing) kernels.
                if self._stream is None:
                    self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                current = torch.cuda.current_stream(device)
                self._stream.wait_stream(current)
                with torch.cuda.stream(self._stream):
                    torch._foreach_copy_(self._tensors, sources)
                current.wait_stream(self._stream)
            else:
                for dst, src in zip(self._tensors, sources, strict=True):
                    dst.copy_(src)

    def _allocate(self, model: torch.nn.Module) -> None:
        self.model = None
        self._tensors = []
        shadow = copy.deepcopy(model)
        for p in shadow.parameters():
            p.grad = None
            p.requires_grad_(False)
        shadow.eval()
        self.model = shadow
        self._tensors = [*shadow.parameters(), *shadow.buffers()]


def _same_layout(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> bool:
    if len(dsts) != len(srcs):
        return False
    for d, s in zip(dsts, srcs, strict=True):
        if d.shape != s.shape or d.dtype != s.dtype or d.device != s.device:
            return False
    return True


class Validator:
    """Schedules validation passes and, in concurrent mode, runs them on snapshots.

    One per learner (``runtime.validator``), created only for options other than the default.
    The training loop calls :meth:`between_batches` after every batch and :meth:`at_epoch_end`
    where the sequential validation would run; :class:`~aiolearner.FitRun` wraps the run in
    :meth:`session`.
    """

    def __init__(
        self,
        *,
        concurrent: bool,
        steps: int | None,
        seconds: float | None,
        max_snapshots: int,
        policy: SnapshotPolicy,
    ) -> None:
        self.concurrent = concurrent
        self.steps = steps
        self.seconds = seconds
        self.max_snapshots = max_snapshots
        self.policy = policy
        #: The state concurrent validation passes run on (hooks of the validate subtree see it).
        self.state = State()
        self.stage: Stage | None = None
        #: Snapshots taken, and skipped because ``max_snapshots`` were in flight (``"skip"``).
        self.taken = 0
        self.skipped = 0
        self._rt: Runtime | None = None
        self._val: BatchSource | None = None
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._queue: deque[_Slot] = deque()
        self._lane: anyio.CapacityLimiter | None = None
        self._main: State | None = None
        self._open = False
        self._closing = False
        self._changed: anyio.Event | None = None
        self._worker_scope: anyio.CancelScope | None = None
        self._worker_done: anyio.Event | None = None
        self._failure: BaseException | None = None
        self._stop: StopFit | None = None
        self._last_step = -1
        self._last_time: float | None = None

    def bind(self, learner: Learner[Any]) -> None:
        """Attach to a (re)built learner: its runtime, validation data and validate stage."""
        self._rt = learner._rt
        self._val = learner._rt.val
        epoch = learner._stages.get("epoch")
        stage = getattr(epoch, "validate", None)
        self.stage = stage if stage is not None else learner._stages.get("validate")

    @property
    def in_flight(self) -> int:
        """How many snapshots are taken and not yet fully validated."""
        return len(self._queue)

    @property
    def shadow_models(self) -> list[torch.nn.Module]:
        """The shadow models allocated so far (at most ``max_snapshots``)."""
        return [s.model for s in self._slots if s.model is not None]

    # -- called by the training loop ------------------------------------------------------------

    async def between_batches(self, state: State) -> None:
        """After each training batch: surface a stop request or a failure; maybe validate."""
        if self._failure is not None or self._stop is not None:
            self._check()
        if self.steps is not None:
            step = state.step
            if step % self.steps == 0 and step != self._last_step:
                self._last_step = step
                await self._trigger(state)
        elif self.seconds is not None:
            now = anyio.current_time()
            if self._last_time is None:
                self._last_time = now
            elif now - self._last_time >= self.seconds:
                self._last_time = now
                await self._trigger(state)

    async def at_epoch_end(self, stage: Stage, state: State) -> None:
        """Where the sequential validation would run: validate if the schedule is per epoch."""
        self._check()
        if self.steps is None and self.seconds is None:
            await self._trigger(state, stage)

    async def validate_now(self, stage: Stage, state: State) -> None:
        """Validate once and wait for it (``learner.validate()``, or outside a run session)."""
        if not self.concurrent:
            await stage(state)
            return
        # Outside a session only snapshots of an interrupted run can hold the slots.
        slot = self._acquire() or _Slot()
        self._lane = anyio.CapacityLimiter(1)
        try:
            await self._take(slot, state)
            await self._pass(slot, stage, state)
        finally:
            self._release(slot)

    @asynccontextmanager
    async def session(self, state: State) -> AsyncIterator[None]:
        """The run's window for concurrent validation (opened by FitRun around its epochs).

        On a normal exit, waits for outstanding validations and raises their stop request or
        error; on StopFit, waits for them too; on an error or a cancellation, cancels them.
        """
        self._main = state
        self._open = True
        self._closing = False
        self._lane = anyio.CapacityLimiter(1)  # per run: it belongs to this event loop
        self._changed = anyio.Event()
        self._last_time = anyio.current_time()
        try:
            if self._queue:
                self._resume_pending()
            try:
                yield
            except StopFit:
                await self._drain(stopping=True)
                raise
            await self._drain(stopping=False)
        except BaseException as exc:
            await self._abort(keep=isinstance(exc, anyio.get_cancelled_exc_class()))
            raise
        finally:
            self._open = False
            self._main = None
            self._changed = None
            self._failure = None
            self._stop = None

    # -- scheduling -------------------------------------------------------------------------------

    async def _trigger(self, state: State, stage: Stage | None = None) -> None:
        stage = stage if stage is not None else self.stage
        if stage is None:
            return
        if not self.concurrent:
            await stage(state)
        elif self._open and stage is self.stage:
            await self._submit(state)
        else:
            await self.validate_now(stage, state)

    def _check(self) -> None:
        failure = self._failure
        if failure is not None:
            self._failure = None
            raise failure
        stop = self._stop
        if stop is not None:
            self._stop = None
            raise stop

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = anyio.Event()
            changed.set()

    async def _wait_change(self) -> None:
        assert self._changed is not None
        await self._changed.wait()

    def _acquire(self) -> _Slot | None:
        if self._free:
            return self._free.pop()
        if len(self._slots) < self.max_snapshots:
            slot = _Slot()
            self._slots.append(slot)
            return slot
        return None

    def _release(self, slot: _Slot) -> None:
        slot.data = None
        if slot in self._queue:
            self._queue.remove(slot)
        if slot not in self._free:
            self._free.append(slot)

    async def _submit(self, state: State) -> None:
        slot = self._acquire()
        while slot is None:
            if self.policy == "skip":
                self.skipped += 1
                rt = self._rt
                if rt is not None and rt.observed:
                    rt.publish(
                        "log",
                        "validate",
                        state,
                        {"message": "validation skipped: max_snapshots in flight"},
                    )
                return
            # Back-pressure: training waits for the oldest validation to finish.
            await self._wait_change()
            self._check()
            slot = self._acquire()
        try:
            await self._take(slot, state)
        except BaseException:
            self._release(slot)
            raise
        self._queue.append(slot)
        self.taken += 1
        self._start_worker()
        self._notify()

    async def _take(self, slot: _Slot, state: State) -> None:
        rt = self._rt
        val = self._val
        assert rt is not None
        assert val is not None
        async with rt.weights_lock.read():
            slot.refresh(state.model)
        slot.tag = (state.epoch, state.step)
        slot.batch_index = state.batch_index
        # Created here, where the sequential pass would create it: same random draws.
        slot.data = aiter(val.data) if val.is_async else iter(val.data)

    def _resume_pending(self) -> None:
        # Snapshots whose validation a cancellation interrupted: their shadows are untouched, so
        # they are validated first, as the uninterrupted run would have. Their data iterators
        # are created again without drawing from the training's random stream (the interrupted
        # run drew already, when it took them).
        val = self._val
        assert val is not None
        rng = capture_rng()
        try:
            for slot in self._queue:
                slot.data = aiter(val.data) if val.is_async else iter(val.data)
        finally:
            restore_rng(rng)
        self._start_worker()

    # -- the worker -------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._worker_done is not None:
            return
        rt = self._rt
        assert rt is not None
        assert rt.tg is not None
        self._worker_scope = anyio.CancelScope()
        self._worker_done = anyio.Event()
        rt.tg.start_soon(
            self._work, self._worker_scope, self._worker_done, name="aiolearner.validation"
        )

    async def _work(self, scope: anyio.CancelScope, done: anyio.Event) -> None:
        try:
            with scope:
                while True:
                    if not self._queue:
                        if self._closing:
                            return
                        await self._wait_change()
                        continue
                    slot = self._queue[0]
                    stage = self.stage
                    main = self._main
                    assert stage is not None
                    assert main is not None
                    # A cancelled pass keeps its slot queued (see _resume_pending).
                    try:
                        await self._pass(slot, stage, main)
                    except StopFit as stop:
                        if self._stop is None:
                            self._stop = stop
                    except Exception as exc:
                        exc.add_note(
                            "aiolearner: raised by the concurrent validation of the weights at "
                            f"{epoch_words(slot.tag[0])}, step {slot.tag[1]}"
                        )
                        self._failure = exc
                        self._release(slot)
                        self._notify()
                        return
                    self._release(slot)
                    self._notify()
        finally:
            if self._worker_done is done:
                self._worker_scope = None
                self._worker_done = None
            done.set()
            self._notify()

    async def _pass(self, slot: _Slot, stage: Stage, main: State) -> None:
        """Validate one snapshot on the validation state; land its results in ``main``."""
        val = self._val
        assert val is not None
        assert slot.model is not None
        v = self.state
        d = v.__dict__
        v.model = slot.model
        v.optimizer = main.optimizer
        v.optimizers = main.optimizers
        v.loss_fn = main.loss_fn
        v.device = main.device
        v.epoch, v.step = slot.tag
        v.batch_index = slot.batch_index
        v.metrics = main.metrics
        v.phase = "validate"
        md = main.__dict__
        object.__setattr__(v, "_trace", md.get("_trace"))
        object.__setattr__(v, "_publish", md.get("_publish"))
        object.__setattr__(v, "_lifetimes", md.get("_lifetimes"))
        v.__class__ = type(main)
        data = slot.data
        slot.data = None
        source = BatchSource(
            _PreopenedAsync(data) if val.is_async else _Preopened(data),
            name=val.name,
            mover=val.mover,
            prefetch=val.prefetch,
            fetch=val.fetch,
            fetch_budget=val.fetch_budget,
        )
        source.slow = val.slow
        assert self._lane is not None
        lane = compute_lane.set(self._lane)
        src = snapshot_source.set(source)
        # Results land only from a pass that ran to its end (a StopFit in after_validate too).
        land = False
        try:
            try:
                await stage(v)
            except ControlFlow:
                land = True
                raise
            land = True
        finally:
            snapshot_source.reset(src)
            compute_lane.reset(lane)
            val.slow = val.slow or source.slow
            results = d.get("validation")
            tag = d.get("validation_tag")
            v.__class__ = State
            for name in [k for k in d if not k.startswith("_")]:
                del d[name]
            if land and results is not None and tag is not None:
                main.validation = results
                main.validation_tag = tag

    async def _drain(self, *, stopping: bool) -> None:
        while self._queue and self._failure is None and self._worker_done is not None:
            await self._wait_change()
        self._closing = True
        self._notify()
        done = self._worker_done
        if done is not None:
            await done.wait()
        if stopping:
            self._stop = None
        self._check()

    async def _abort(self, *, keep: bool) -> None:
        scope, done = self._worker_scope, self._worker_done
        if scope is not None and done is not None:
            scope.cancel()
            rt = self._rt
            timeout = rt.teardown_timeout if rt is not None else 30.0
            # Shielded and bounded: a pass in a worker thread finishes its batch first.
            with anyio.move_on_after(timeout, shield=True):
                await done.wait()
        self._worker_scope = None
        self._worker_done = None
        for slot in list(self._queue):
            if keep:
                slot.data = None  # a resumed run opens the data again
            else:
                self._release(slot)
