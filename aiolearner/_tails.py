"""The concurrent validator's queue of tails and the worker task that runs them in order.

The companion of :mod:`aiolearner._validation`, which decides *when* a tail is taken
(scheduling, the run's session, checkpoints); this module holds *how* queued tails run: the
shadow slots they hold, the worker task, each tail's phases (its validation pass, then its
``after_epoch``) on the worker's own state, the landing of what they write into the training
state's ``metrics`` (the *overlay*), and how the worker's stop requests and errors reach the
training loop.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import torch

from ._exceptions import StopFit
from ._runtime import compute_lane, on_snapshot, validation_sources
from ._snapshot import Lane, Sets, Slot, Tail, open_all, preopened
from ._stage import epoch_words, owned
from ._state import State

if TYPE_CHECKING:
    from ._plan import HookPlan
    from ._runtime import Runtime
    from ._stage import Stage
    from ._stages import Epoch

__all__ = ["TailWorker"]


class TailWorker:
    """The queue of an epoch's tails, their shadow slots and the worker that runs them.

    The base of :class:`~aiolearner._validation.Validator`, which queues the tails (taking
    snapshots), binds :attr:`stage`, :attr:`epoch_stage` and the runtime, and opens the run's
    window; a class of its own so that scheduling and running read apart.
    """

    def __init__(self, *, max_snapshots: int) -> None:
        self.max_snapshots = max_snapshots
        #: The state the worker runs tails on (hooks of the validate subtree and the worker's
        #: ``after_epoch`` plan see it).
        self.state = State()
        self.stage: Stage | None = None
        self.epoch_stage: Epoch | None = None
        #: What tails wrote into their records' metrics (see aiolearner._validation's docstring).
        self.overlay: dict[str, Any] = {}
        #: The newest validation results and their tag, as tails landed them.
        self.latest: tuple[dict[str, Any], tuple[int, int]] | None = None
        self._rt: Runtime | None = None
        self._epoch_after: HookPlan | None = None
        self._slots: list[Slot] = []
        self._free: list[Slot] = []
        self._queue: deque[Tail] = deque()
        #: Tails a run left unfinished (cancelled, failed): the next run does them first.
        self._pending: list[Tail] = []
        self._lane: Lane | None = None
        self._main: State | None = None
        self._open = False
        self._closing = False
        #: A tail was stopped inside its pass: no worker runs tails again until the next run
        #: (the stopped tail, queued, would run at once: the run is stopping).
        self._halted = False
        self._changed: anyio.Event | None = None
        self._worker_scope: anyio.CancelScope | None = None
        self._worker_done: anyio.Event | None = None
        self._failure: BaseException | None = None
        self._stop: StopFit | None = None

    @property
    def in_flight(self) -> int:
        """How many snapshots this run has taken and not yet fully validated."""
        return sum(1 for item in self._queue if item.slot is not None)

    @property
    def pending(self) -> int:
        """How many tails an interrupted run left for the next one."""
        return len(self._pending)

    @property
    def shadow_models(self) -> list[torch.nn.Module]:
        """The shadow models allocated so far (at most ``max_snapshots``)."""
        return [s.model for s in self._slots if s.model is not None]

    # -- signals and slots ------------------------------------------------------------------------

    def _share(self) -> None:
        """Tell the compute policy whether a validation is in flight (see set_shared)."""
        rt = self._rt
        if rt is not None:
            shared = self._open and any(item.validate for item in self._queue)
            if shared != bool(rt.policy.shared):
                rt.policy.set_shared(shared)

    def _check(self) -> None:
        self._raise_failure()
        stop = self._take_stop()
        if stop is not None:
            raise stop

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is not None:
            self._failure = None
            raise failure

    def _take_stop(self) -> StopFit | None:
        stop, self._stop = self._stop, None
        return stop

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = anyio.Event()
            changed.set()

    async def _wait_change(self) -> None:
        assert self._changed is not None
        await self._changed.wait()

    def _acquire(self) -> Slot | None:
        if self._free:
            return self._free.pop()
        if len(self._slots) < self.max_snapshots:
            slot = Slot()
            self._slots.append(slot)
            return slot
        return None

    def _release(self, slot: Slot | None) -> None:
        if slot is not None and slot in self._slots and slot not in self._free:
            self._free.append(slot)

    def _resume_pending(self) -> None:
        # Tails a run left unfinished go first, as in the uninterrupted run. Their validation
        # data is opened again under the random state of their snapshot.
        rt = self._rt
        assert rt is not None
        for item in self._pending:
            # (Not one whose pass had finished: its after_validate alone runs again, and the
            # data's own streams are already past the whole pass.)
            if item.validate and item.data is None and item.rng is not None and not item.results:
                item.data = open_all(rt.val_sets, item)
        self._queue.extendleft(reversed(self._pending))
        self._pending = []
        self._share()
        self._start_worker()

    # -- the worker -------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._worker_done is not None or self._halted:
            return
        rt = self._rt
        assert rt is not None
        assert rt.tg is not None
        # Under a strategy an outside cancellation of one rank becomes a stop every rank agrees
        # on (the run is shielded, _dist/_run.py): the tails go on too, or this rank would
        # leave their reductions to the others. The run cancels them itself (_abort).
        self._worker_scope = anyio.CancelScope(shield=rt.strategy is not None)
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
                    item = self._queue[0]
                    # A cancelled or failed item stays queued (see _abort), at the phase it
                    # reached.
                    try:
                        await self._run(item)
                    except StopFit as stop:
                        if self._stop is None:
                            self._stop = stop
                        if item.validate:
                            # Stopped inside its pass: it stays queued, with the tails after
                            # it, for the next run (the run stops; see _run).
                            self._halted = True
                            return
                    except Exception as exc:
                        e, s = item.tag
                        exc.add_note(
                            "aiolearner: raised by the concurrent validation of the weights at "
                            f"{epoch_words(e)}, step {s}"
                            if item.slot is not None
                            else f"aiolearner: raised in after_epoch of {epoch_words(e)}, step {s}"
                            " (run after the concurrent validations before it)"
                        )
                        self._failure = exc
                        self._notify()
                        return
                    self._queue.popleft()
                    self._release(item.slot)
                    self._share()
                    self._notify()
        finally:
            if self._worker_done is done:
                self._worker_scope = None
                self._worker_done = None
            done.set()
            self._notify()

    async def _run(self, item: Tail) -> None:
        """The item's phases: its validation, then its ``after_epoch``."""
        main = self._main
        stage = self.stage
        rt = self._rt
        assert main is not None
        assert rt is not None
        if item.validate:
            assert stage is not None
            try:
                await self._validate(item, stage, main, sets=rt.val_sets)
                self._share()
            except StopFit as exc:
                if item.validate:
                    # Stopped inside the pass (before_validate, a batch): as in sequential
                    # mode, nothing after it runs now, and the next run does this tail again,
                    # from its validation (it stays queued, see _work).
                    raise
                # From after_validate: after_epoch still runs, then the stop (kept on the
                # item, so that a tail interrupted in after_epoch still stops when resumed).
                item.stop = exc
        if item.epoch_fields is not None:
            await self._epoch_end(item, main)
        stop, item.stop = item.stop, None
        if stop is not None:
            raise stop

    def _fill(self, fields: dict[str, Any], model: torch.nn.Module, main: State) -> None:
        """Put a record into the worker's state."""
        v = self.state
        d = v.__dict__
        d.update(fields)
        d["model"] = model
        if self.latest is not None:
            d["validation"], d["validation_tag"] = self.latest
        md = main.__dict__
        d["phase"] = md.get("phase", d.get("phase"))
        object.__setattr__(v, "_trace", md.get("_trace"))
        object.__setattr__(v, "_publish", md.get("_publish"))
        object.__setattr__(v, "_lifetimes", md.get("_lifetimes"))
        v.__class__ = type(main)

    def _overlay(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Bring a record's metrics up to what tails landed since it was taken (once per
        record); returns them as they are before the phase writes anything."""
        metrics.update(self.overlay)
        return dict(metrics)

    def _empty(self) -> None:
        v = self.state
        d = v.__dict__
        v.__class__ = State
        for name in [k for k in d if not k.startswith("_")]:
            del d[name]

    def _land(self, before: dict[str, Any], metrics: dict[str, Any], main: State) -> None:
        changed = {k: v for k, v in metrics.items() if k not in before or _written(before[k], v)}
        self.overlay.update(changed)
        main.metrics.update(changed)

    async def _validate(self, item: Tail, stage: Stage, main: State, *, sets: Sets) -> None:
        """The validation phase of ``item``: ``item.validate`` is cleared once the pass and its
        ``after_validate`` are done (also when ``after_validate`` raised a StopFit)."""
        slot = item.slot
        lane = self._lane
        rt = self._rt
        assert slot is not None
        assert slot.model is not None
        assert lane is not None
        assert rt is not None
        v = self.state
        d = v.__dict__
        self._fill(item.fields, slot.model, main)
        object.__setattr__(v, "_val_streams", None)  # (set when the pass ends, see Validate)
        if item.before is None:
            item.before = self._overlay(item.fields["metrics"])
        after_only = item.results is not None
        if item.results is not None:
            # The pass had finished and its after_validate was interrupted: that hook only.
            d["validation"], d["validation_tag"] = item.results
            sources = None
        else:
            data = item.data
            assert data is not None
            item.data = None
            sources = preopened(sets, data, lane.mover)
        previous = d.get("validation")
        after = stage._after
        if after is not None:
            after.progress = item.hooks
        lane.begin(slot.stream)
        tokens = (compute_lane.set(lane), validation_sources.set(sources), on_snapshot.set(True))
        done = False
        try:
            try:
                if after_only:
                    await _after_hook(stage, v)
                else:
                    await stage(v)
                done = True
            except StopFit:
                # From after_validate (the pass had set its results): the phase is over.
                done = after_only or d.get("validation") is not previous
                raise
        finally:
            if after is not None:
                after.progress = None
            on_snapshot.reset(tokens[2])
            validation_sources.reset(tokens[1])
            compute_lane.reset(tokens[0])
            if sources is not None:
                for name, source in sets.items():
                    source.slow = source.slow or sources[name].slow
                    source.kept_inline = source.kept_inline or sources[name].kept_inline
            results = d.get("validation")
            tag = d.get("validation_tag")
            if not after_only and results is not None and results is not previous and tag:
                item.results = (results, tag)  # the pass finished (whatever comes next)
            metrics = d["metrics"]
            self._empty()
            if done:
                # A StopEpoch from before_validate finishes the phase without results.
                self._land(item.before, metrics, main)
                if item.results is not None:
                    self.latest = item.results
                    main.validation, main.validation_tag = item.results
                item.validate = False
                item.results = None
                item.before = None

    async def _epoch_end(self, item: Tail, main: State) -> None:
        """The ``after_epoch`` phase of ``item`` (and the epoch's ``metrics`` event)."""
        fields = item.epoch_fields
        epoch = self.epoch_stage
        rt = self._rt
        assert fields is not None
        assert epoch is not None
        assert rt is not None
        slot = item.slot
        if slot is None:
            # No snapshot of the epoch's end (validate_every=N not ending the epoch, a skipped
            # validation, a stop): the weights as they are now, copied under the read lock so
            # that the hooks see no half update and hold no lock (one of them may want it).
            slot = Slot()
            async with rt.weights_lock.read():
                slot.refresh(main.model)
        shadow = slot.model
        assert shadow is not None
        plan = self._epoch_after
        self._fill(fields, shadow, main)
        if not (fields is item.fields and item.slot is not None):
            object.__setattr__(self.state, "_val_streams", None)  # (no pass of its own)
        if item.epoch_before is None:
            # The validation's own record has its results already; another record is brought
            # up to date.
            metrics = fields["metrics"]
            validated = fields is item.fields and item.slot is not None
            item.epoch_before = dict(metrics) if validated else self._overlay(metrics)
        if plan is not None:
            plan.progress = item.hooks
        try:
            await epoch.finish(self.state, plan)
        finally:
            if plan is not None:
                plan.progress = None
            metrics = self.state.__dict__["metrics"]
            self._empty()
        self._land(item.epoch_before, metrics, main)
        item.epoch_fields = None
        item.epoch_before = None

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

    async def _abort(self) -> None:
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
        # Every unfinished tail is kept for the next run (its shadow is untouched); its data
        # is opened again then.
        for item in self._queue:
            item.data = None
        self._pending = [*self._queue, *self._pending]
        self._queue.clear()
        self._empty()


def _written(old: object, new: object) -> bool:
    """Whether a metric was written: another object, unless it is the same plain value (a
    record read back from a checkpoint holds copies of its numbers)."""
    if old is new:
        return False
    plain = (int, float, str, bool)
    return not (type(old) is type(new) and isinstance(new, plain) and old == new)


async def _after_hook(stage: Stage, state: State) -> None:
    """A stage's ``after_`` hook alone, acting on the control flow the stage owns."""
    after = stage._after
    if after is None:
        return
    try:
        await after.run()
    except BaseException as exc:
        if not owned(stage, state, exc):
            raise
