"""When validation runs, and the epoch's tail on a snapshot while training goes on.

``Learner(validate=..., validate_every=..., max_snapshots=..., snapshot_policy=...)``:

* ``validate="sequential"`` (default): the Validate stage runs in the training loop, on the live
  weights (under the weights' read lock); training waits for it. Per epoch, the
  :class:`~aiolearner.Epoch` stage runs it (no validator at all: nothing to pay).
* ``validate="concurrent"``: where a validation is due, the training loop takes a *snapshot*:
  the weights (parameters and every buffer, batch-norm statistics included, copied under the
  weights' read lock into a shadow model), the *record* (the training state's fields at that
  moment: counters, a copy of ``metrics``, ...), the validation data's iterators and the random
  state they were opened under; then it goes on training. A worker task in the run's task group
  runs the snapshots' work in the order they were taken.

Per epoch, the snapshot carries the epoch's whole *tail*: the validation pass and then the
``after_epoch`` hooks, both on the snapshot's record, so everything a callback reads there
(``epoch``, ``step``, ``metrics`` with the training metrics, ``validation``) describes the
snapshot's moment, as in sequential mode, while the next epoch trains. With ``validate_every`` N
steps or a time, an epoch that ends while validations are in flight hands its ``after_epoch`` to
the worker too, behind them (on the snapshot of the epoch's end when one was taken there, else on
a copy of the weights as they are when it runs); with none in flight it runs in the loop.

What a tail writes into its record's ``metrics`` (``val_loss``, a callback's ``best_val_loss``)
lands in the training state's ``metrics`` when the tail's phase ends, and in every later
record (the *overlay*): each record sees what it would have seen in sequential mode.

Control flow and errors of the worker reach the training loop between batches, at the end of
the epoch and when the run ends, whichever comes first:

* ``StopFit`` is a *stop request*. From ``after_validate`` it first lets the same tail's
  ``after_epoch`` run. The training loop raises it at its next batch boundary (the epoch in
  progress is not counted) or, if the epoch's training pass is over, at the epoch's end: that
  epoch is counted and its ``after_epoch`` runs, without a validation of its own.
* any other exception ends the run as if a stage had raised it (bare, with a note naming the
  snapshot; callback errors in their ExceptionGroup).
* the run waits for outstanding tails before ``after_fit_run``; an error or a cancellation
  cancels them.

Exact continuation: tails not finished when a run ends (cancelled, failed, or interrupted by an
error anywhere) are kept, with their shadows, records, progress (validated or not) and random
state, in memory and in ``state_dict()``; the next ``fit`` (or ``fit(resume=...)`` in a fresh
process) runs them first, re-opening the validation data under the random state of the
snapshot, so the results are those of the uninterrupted run.

Random numbers: validation never moves training's random streams. A sequential pass puts back
the global generators' state when it ends (however it ends); a snapshot opens the validation
data (a DataLoader draws its seed and its shuffled order there) under a saved state that is put
back at once. What draws from the global generators *while* a concurrent pass runs (random
augmentation of validation data in the main process) draws concurrently with training; see
docs/concurrent-validation.md.

Compute: while a pass is in flight the training loop's compute hops to its worker (``auto``
too, see :meth:`ComputePolicy.set_shared`) and the pass's compute to a worker of its own, so both
compute at once; on CUDA the pass runs on a stream of its own.

This module decides when tails are taken (and keeps them in checkpoints); the worker that runs
them is in :mod:`aiolearner._tails`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import anyio

from ._exceptions import StopFit
from ._parallel import Parallel, rebind
from ._plan import build_plan
from ._rng import capture_rng
from ._snapshot import Lane, Sets, Slot, Tail, open_all, portable_dict
from ._stages import Epoch, validate_record
from ._state import State
from ._tails import TailWorker

if TYPE_CHECKING:
    from ._learner import Learner
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
    # The hooks of an epoch's tail remember which callbacks finished them (see HookPlan.run):
    # on the training state in the run's progress, on a concurrent tail in its item.
    epoch = learner._stages.get("epoch")
    tracked: list[Stage | None] = [
        epoch,
        getattr(epoch, "fit", None),
        getattr(epoch, "validate", None),
    ]
    for tail in tracked:
        if tail is None or tail._after is None:
            continue
        concurrent = validator is not None and validator.concurrent
        on_snapshot_state = concurrent and validator is not None and tail is validator.stage
        tail._after.progress = None if on_snapshot_state else rt.hook_progress


class Validator(TailWorker):
    """Schedules validation and, in concurrent mode, runs the epochs' tails on snapshots.

    One per learner (``runtime.validator``), created only for options other than the default.
    The training loop calls :meth:`between_batches` after every batch (and before the first) and
    :meth:`at_epoch_end` where the sequential validation would run; :class:`~aiolearner.FitRun`
    wraps the run in :meth:`session`. The queue of tails and the worker that runs them are its
    base, :class:`~aiolearner._tails.TailWorker`.
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
        super().__init__(max_snapshots=max_snapshots)
        self.concurrent = concurrent
        self.steps = steps
        self.seconds = seconds
        self.policy = policy
        #: Snapshots taken, and skipped because ``max_snapshots`` were in flight (``"skip"``).
        self.taken = 0
        self.skipped = 0
        self._learner: Learner[Any] | None = None
        #: The last step whose validation is taken care of (validate_every=N): run, or taken
        #: as a snapshot (whose item a checkpoint keeps), or skipped.
        self._accounted = 0
        self._last_time: float | None = None

    def bind(self, learner: Learner[Any]) -> None:
        """Attach to a (re)built learner: its runtime, validate stage and ``after_epoch`` hook."""
        self._learner = learner
        self._rt = learner._rt
        epoch = learner._stages.get("epoch")
        stage = getattr(epoch, "validate", None)
        self.stage = stage if stage is not None else learner._stages.get("validate")
        self.epoch_stage = epoch if isinstance(epoch, Epoch) else None
        self._epoch_after = None
        if self.epoch_stage is not None and self.concurrent:
            hook = self.epoch_stage.hook_names[1]
            hooked = [(cb, m) for cb in learner._callbacks for h, m in cb.hooks() if h == hook]
            self._epoch_after = build_plan(
                hook, self.epoch_stage.name, hooked, self.state, learner, learner._trace
            )

    @property
    def per_epoch(self) -> bool:
        return self.steps is None and self.seconds is None

    # -- called by the training loop ------------------------------------------------------------

    async def between_batches(self, state: State) -> None:
        """After each training batch (and before a pass's first): surface a stop request or a
        failure; maybe validate."""
        if self._failure is not None or self._stop is not None:
            self._check()
        if self.steps is not None:
            step = state.step
            if step % self.steps == 0 and step != self._accounted:
                await self._trigger(state)
        elif self.seconds is not None:
            now = anyio.current_time()
            if self._last_time is None:
                self._last_time = now
            elif now - self._last_time >= self.seconds and state.step != self._accounted:
                # Not the same weights twice (a pass longer than the interval would otherwise
                # validate the step it ended at again before the next pass's first batch).
                self._last_time = now
                await self._trigger(state)

    async def at_epoch_end(
        self, epoch: Epoch, state: State, *, validate: bool
    ) -> tuple[bool, StopFit | None]:
        """Where the sequential validation and ``after_epoch`` would run (concurrent mode).

        ``validate``: the epoch ran its training pass and validates once per epoch. Returns
        whether the tail went to the worker (``after_epoch`` included), and a stop request to
        raise once the epoch is over.
        """
        self._raise_failure()
        # (A stop request from an after_validate: the epoch counts, without a validation of its
        # own. One from inside a pass: the epoch's snapshot is taken for the next run.)
        stopping = self._stop is not None and not self._halted
        if validate and self.per_epoch and not stopping and self.stage is not None:
            item = await self._submit(state, epoch_end=True)
            if item is not None:
                return True, self._take_stop()
        handed = self._hand_epoch_end(state)
        return handed, self._take_stop()

    async def validate_now(self, stage: Stage, state: State, sets: Sets | None = None) -> None:
        """Validate once and wait for it (``learner.validate()``/``test()``, outside a run)."""
        if not self.concurrent:
            await stage(state)
            return
        rt = self._rt
        assert rt is not None
        sets = rt.val_sets if sets is None else sets
        # Outside a session only the tails of an interrupted run can hold the slots.
        slot = self._acquire() or Slot()
        lane = self._lane = Lane(rt.device)
        self._main = state
        rt.policy.set_shared(True)
        try:
            item = await self._take(slot, state, sets=sets, epoch_end=False)
            await self._validate(item, stage, state, sets=sets)
        finally:
            rt.policy.set_shared(False)
            lane.close()
            self._lane = None
            self._main = None
            self._release(slot)

    @asynccontextmanager
    async def session(self, state: State) -> AsyncIterator[None]:
        """The run's window for concurrent validation (opened by FitRun around its epochs).

        On a normal exit, waits for outstanding tails and raises their stop request or error;
        on StopFit, waits for them too; on an error or a cancellation, cancels them and keeps
        the unfinished ones for the next run.
        """
        rt = self._rt
        assert rt is not None
        self._main = state
        self._open = True
        self._closing = False
        self._halted = False
        self._lane = Lane(rt.device)  # per run: its worker belongs to this event loop
        self._changed = anyio.Event()
        self._last_time = anyio.current_time()
        aborted = False
        try:
            if self._pending:
                self._resume_pending()
            try:
                yield
            except StopFit:
                await self._drain(stopping=True)
                raise
            await self._drain(stopping=False)
        except BaseException:
            aborted = True
            await self._abort()
            raise
        finally:
            self._lane.close()
            self._lane = None
            self._open = False
            self._share()
            self._main = None
            self._changed = None
            self._failure = None
            if not aborted:
                # A stop request the interrupted run had not acted on yet is kept (and in
                # checkpoints): the next run acts on it at its first batch boundary.
                self._stop = None

    # -- scheduling -------------------------------------------------------------------------------

    async def _trigger(self, state: State) -> None:
        stage = self.stage
        if stage is None:
            return
        step = state.step
        if not self.concurrent:
            stop = await validate_record(stage, state)
            self._accounted = step
            if stop is not None:
                raise stop
        elif self._open:
            await self._submit(state, epoch_end=False)
            self._accounted = step
        else:
            await self.validate_now(stage, state)
            self._accounted = step

    async def _submit(self, state: State, *, epoch_end: bool) -> Tail | None:
        """Take a snapshot and queue its tail; ``None`` if it was skipped (``"skip"``, or a stop
        request arrived while training waited for a slot)."""
        slot = self._acquire()
        while slot is None:
            if epoch_end and self._halted:
                # A tail was stopped inside its pass: the next run does it again, and then
                # this epoch's, as the uninterrupted run does them. So this epoch's snapshot
                # is taken now, where that run takes it, in a slot beyond max_snapshots (the
                # run is stopping: no worker takes a slot back before it ends).
                slot = Slot()
                break
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
                return None
            # Back-pressure: training waits for the oldest tail to finish.
            await self._wait_change()
            self._raise_failure()
            if self._stop is not None:
                if not epoch_end:
                    self._check()
                if not self._halted:
                    return None  # the caller hands the epoch's end on, then stops
            slot = self._acquire()
        rt = self._rt
        assert rt is not None
        try:
            item = await self._take(slot, state, sets=rt.val_sets, epoch_end=epoch_end)
        except BaseException:
            self._release(slot)
            raise
        self._queue.append(item)
        self.taken += 1
        self._share()
        self._start_worker()
        self._notify()
        return item

    async def _take(self, slot: Slot, state: State, *, sets: Sets, epoch_end: bool) -> Tail:
        rt = self._rt
        assert rt is not None
        async with rt.weights_lock.read():
            slot.refresh(state.model)
        fields = self._record(state)
        rng = capture_rng()
        item = Tail(
            slot, fields, validate=True, epoch_fields=fields if epoch_end else None, rng=rng
        )
        # Opened here, where the sequential pass would open them: the same random draws, and
        # training's random streams are left as they were.
        item.data = open_all(sets, item)
        return item

    def _record(self, state: State) -> dict[str, Any]:
        """The training state's fields now (``metrics`` copied): what a tail runs on."""
        rt = self._rt
        assert rt is not None
        skip = {"model", *rt.batch_fields}
        fields = {k: v for k, v in state.__dict__.items() if k[0] != "_" and k not in skip}
        fields["metrics"] = dict(state.metrics)
        return fields

    def _hand_epoch_end(self, state: State) -> bool:
        """Queue ``after_epoch`` behind the tails in flight (``False``: none are, run it now)."""
        if not self._queue or self.epoch_stage is None:
            return False
        last = self._queue[-1]
        fields = self._record(state)
        if (
            last.slot is not None
            and last.epoch_fields is None
            and last.tag == (state.epoch, state.step)
        ):
            # A snapshot of these very weights is in flight (validate_every=N ending the
            # epoch): after_epoch sees it.
            last.epoch_fields = fields
        else:
            self._queue.append(Tail(None, fields, validate=False, epoch_fields=fields, rng=None))
        self._start_worker()
        self._notify()
        return True

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the validator: unfinished tails, overlay, progress."""
        latest = self.latest
        return {
            "items": [item.to_portable() for item in [*self._pending, *self._queue]],
            "overlay": portable_dict(self.overlay),
            "latest": None
            if latest is None
            else {"validation": portable_dict(latest[0]), "tag": list(latest[1])},
            "accounted": self._accounted,
            "taken": self.taken,
            "skipped": self.skipped,
            "stop": None if self._stop is None else self._stop.reason,
        }

    def export(self) -> tuple[Any, ...]:
        """Everything :meth:`load_state_dict` changes (to put back after a failed load)."""
        return (
            list(self._pending),
            dict(self.overlay),
            self.latest,
            self._accounted,
            self.taken,
            self.skipped,
            self._stop,
        )

    def restore(self, saved: tuple[Any, ...]) -> None:
        """Undo a :meth:`load_state_dict` with what :meth:`export` returned."""
        (
            self._pending,
            self.overlay,
            self.latest,
            self._accounted,
            self.taken,
            self.skipped,
            self._stop,
        ) = saved

    def load_state_dict(self, saved: Mapping[str, Any] | None, state: State) -> None:
        """Restore :meth:`state_dict` (``None``: a checkpoint with nothing in flight)."""
        if self._queue:
            raise RuntimeError("cannot load validation progress while tails are in flight")
        items: list[Tail] = []
        acquired: list[Slot] = []
        try:
            for entry in [] if saved is None else saved.get("items", []):
                weights = entry.get("model")
                slot = None
                if weights is not None:
                    # More in the checkpoint than max_snapshots allows (a run that stopped
                    # inside a validation pass took one more; a learner made with fewer): a
                    # slot for that tail only, dropped once it is done (see _release).
                    slot = self._acquire() or Slot()
                    acquired.append(slot)
                    slot.load(state.model, weights)
                base = {k: v for k, v in state.__dict__.items() if k[0] != "_" and k != "model"}
                items.append(Tail.from_portable(entry, base, slot))
        except BaseException:
            for slot in acquired:
                self._release(slot)
            raise
        for item in self._pending:
            self._release(item.slot)
        self._pending = items
        saved = saved or {}
        self.overlay = dict(saved.get("overlay", {}))
        latest = saved.get("latest")
        self.latest = (
            None
            if latest is None
            else (dict(latest["validation"]), (int(latest["tag"][0]), int(latest["tag"][1])))
        )
        self._accounted = int(saved.get("accounted", 0))
        self.taken = int(saved.get("taken", self.taken))
        self.skipped = int(saved.get("skipped", self.skipped))
        stop = saved.get("stop")
        self._stop = None if stop is None else StopFit(str(stop))


def pending_in(checkpoint: Mapping[str, Any]) -> int:
    """How many unfinished concurrent tails a checkpoint holds."""
    saved = checkpoint.get("validation")
    if not isinstance(saved, Mapping):
        return 0
    return len(saved.get("items", []))
