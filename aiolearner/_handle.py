"""Running a learner inside an application: status snapshots and fit handles.

An application that trains (a web service, a job runner, a hyperparameter search) needs three things
besides ``await learner.fit(epochs)``:

* a **snapshot** of where a learner is, cheap and JSON-ready, taken from any task without locks
  (:meth:`Learner.snapshot`, :class:`LearnerSnapshot`);
* a **handle** on one fit run that another task can cancel, wait for, and observe
  (:class:`FitHandle`): it owns the cancel scope the run executes in, so cancelling one run never
  touches anything outside it (other learners, the application's task group);
* an **event stream that always ends**: ``learner.events()`` ends with the learner's next run, which
  for a job still waiting in a queue, or one that is already over, may never come;
  :meth:`FitHandle.events` ends when the handle's run is over, whatever happened.

A handle runs at most once. Its lifecycle is a :class:`RunState`::

    PENDING --run()--> RUNNING --> COMPLETED | STOPPED | CANCELLED | FAILED
       \\--cancel() before the run started------------> CANCELLED
"""

from __future__ import annotations

import enum
import math
import os
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import torch

from ._checks import check_positive
from ._events import EventStream
from ._signals import Interrupted

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from ._learner import Learner

__all__ = ["FitHandle", "FitSnapshot", "LearnerSnapshot", "RunState"]


class RunState(enum.Enum):
    """Where a :class:`FitHandle` is in its lifecycle."""

    PENDING = "pending"
    """Created, not yet running (waiting for ``run()`` or for a slot of its limiter)."""
    RUNNING = "running"
    """``learner.fit`` is running (or the handle's finalizer is)."""
    COMPLETED = "completed"
    """``fit`` reached the requested number of epochs."""
    STOPPED = "stopped"
    """``fit`` returned early because a callback raised :class:`StopFit`."""
    CANCELLED = "cancelled"
    """Cancelled through :meth:`FitHandle.cancel` or by an enclosing cancel scope."""
    FAILED = "failed"
    """``fit`` raised an exception (see :attr:`FitHandle.error`)."""

    @property
    def done(self) -> bool:
        """Whether the run is over."""
        return self not in (RunState.PENDING, RunState.RUNNING)


#: The key of the running training loss in :attr:`LearnerSnapshot.metrics`.
RUNNING_LOSS = "train_loss_running"
#: How many times a snapshot reads the learner again when a batch was committed while it read.
_SNAPSHOT_TRIES = 5


def _plain(value: object) -> int | float | str | bool | None:
    """A number or string for a metric value, or None when it has none cheaply (no device sync)."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu":
        item = value.detach().item()
        return item if isinstance(item, bool | int | float) else None
    return None


def _plain_mapping(data: object) -> dict[str, int | float | str | bool]:
    if not isinstance(data, Mapping):
        return {}
    out: dict[str, int | float | str | bool] = {}
    # Copy first: a callback running in the compute worker thread may add a key meanwhile.
    for key, value in list(dict(data).items()):
        plain = _plain(value)
        if plain is not None:
            out[str(key)] = plain
    return out


def _running_train_loss(learner: Learner[Any], batch_index: int) -> float | None:
    """The mean training loss of the current epoch's first ``batch_index`` batches, for
    :class:`LearnerSnapshot`; ``None`` before the epoch's first batch, or when the losses live
    on an accelerator (a status request must not wait for the device)."""
    rt = learner._rt
    # A copy: the compute thread may append meanwhile. The default batch keeps its loss before
    # its commit, so the losses of the batches that batch_index counts are all there; a batch
    # kept after it (by the end of the batch) may be one more.
    losses = list(rt.train_losses)[:batch_index]
    d = learner._state.__dict__
    current = d.get("loss")
    if (
        len(losses) < batch_index
        and current is not None
        and rt.committed
        and "validation_set" not in d
    ):
        # A training batch committed and not yet over (its after_fit_batch): it counts in
        # batch_index already, so its loss counts here too.
        losses.append(current.detach())
    if not losses or losses[-1].device.type != "cpu":
        return None
    with torch.no_grad():
        return float(torch.cat([x.reshape(-1) for x in losses]).float().mean())


@dataclass(frozen=True, slots=True)
class LearnerSnapshot:
    """Where a learner is, as plain values (from :meth:`Learner.snapshot`).

    Attributes:
        status: the learner's :class:`LearnerStatus` value (``"idle"``, ``"fitting"``, ...).
        epoch: completed epochs.
        step: committed training batches in total.
        batch_index: committed batches of the current epoch.
        metrics: ``state.metrics`` as numbers and strings (values without a cheap host value,
            such as tensors on an accelerator, are left out), plus ``train_loss_running``
            while an epoch trains: the mean training loss of the epoch's batches so far (when
            the losses are on the CPU; on an accelerator it would cost a device sync).
        validation: the latest ``state.validation``, likewise.
        outcome: how the learner's last run ended (``"completed"``, ``"stopped"``, ``"error"``
            or ``"cancelled"``; ``""`` before the first, and while one runs). A ``fit`` refused
            before its run began (bad arguments, a checkpoint that cannot be loaded) raised to
            its caller and leaves this as it was.
    """

    status: str
    epoch: int
    step: int
    batch_index: int
    metrics: Mapping[str, int | float | str | bool] = field(default_factory=dict)
    validation: Mapping[str, int | float | str | bool] = field(default_factory=dict)
    outcome: str = ""

    @classmethod
    def of(cls, learner: Learner[Any]) -> LearnerSnapshot:
        """Take the snapshot (no lock, no await). The compute worker thread may commit a
        batch meanwhile: the counters are read before and after the running loss, again
        (a few times at most) until they agree."""
        d = learner.state.__dict__
        for _ in range(_SNAPSHOT_TRIES):
            counters = (d.get("epoch", 0), d.get("step", 0), d.get("batch_index", 0))
            metrics = _plain_mapping(d.get("metrics"))
            running = _running_train_loss(learner, int(counters[2]))
            if counters == (d.get("epoch", 0), d.get("step", 0), d.get("batch_index", 0)):
                break
        if running is not None:
            metrics[RUNNING_LOSS] = running
        epoch, step, batch_index = counters
        return cls(
            status=learner.status.value,
            epoch=int(epoch),
            step=int(step),
            batch_index=int(batch_index),
            metrics=metrics,
            validation=_plain_mapping(d.get("validation")),
            outcome=learner._rt.last_outcome,
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats become ``None``)."""
        return {
            "status": self.status,
            "epoch": self.epoch,
            "step": self.step,
            "batch_index": self.batch_index,
            "metrics": _finite(self.metrics),
            "validation": _finite(self.validation),
            "outcome": self.outcome,
        }


def _finite(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()
    }


@dataclass(frozen=True, slots=True)
class FitSnapshot:
    """A :class:`LearnerSnapshot` plus what the handle knows (from :meth:`FitHandle.snapshot`).

    The learner snapshot's fields read directly on this one too (``snap.epoch`` is
    ``snap.learner.epoch``), as they do in the flat :meth:`as_dict`.

    Attributes:
        state: the handle's :class:`RunState` value.
        target_epochs: the ``epochs`` the handle's run aims at.
        cancel_requested: whether :meth:`FitHandle.cancel` was called.
        error: ``repr`` of the run's exception when it failed.
        learner: the learner's snapshot.
        status: ``learner.status`` (the :class:`LearnerStatus` value).
        epoch: ``learner.epoch``, completed epochs.
        step: ``learner.step``, committed training batches in total.
        batch_index: ``learner.batch_index``, committed batches of the current epoch.
        metrics: ``learner.metrics``.
        validation: ``learner.validation``.
        outcome: ``learner.outcome``, how the learner's last ``fit`` ended.
    """

    state: str
    target_epochs: int
    cancel_requested: bool
    error: str | None
    learner: LearnerSnapshot

    # The learner snapshot's fields, delegated (properties, so that they stay typed and a
    # misspelt name is still an AttributeError).
    @property
    def status(self) -> str:
        return self.learner.status

    @property
    def epoch(self) -> int:
        return self.learner.epoch

    @property
    def step(self) -> int:
        return self.learner.step

    @property
    def batch_index(self) -> int:
        return self.learner.batch_index

    @property
    def metrics(self) -> Mapping[str, int | float | str | bool]:
        return self.learner.metrics

    @property
    def validation(self) -> Mapping[str, int | float | str | bool]:
        return self.learner.validation

    @property
    def outcome(self) -> str:
        return self.learner.outcome

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the learner's fields, flattened, plus the handle's."""
        return {
            "state": self.state,
            "target_epochs": self.target_epochs,
            "cancel_requested": self.cancel_requested,
            "error": self.error,
            **self.learner.as_dict(),
        }


#: ``finalize(handle)``: awaited after the run (shielded, time-bounded), e.g. a final checkpoint.
Finalizer = Callable[["FitHandle"], Awaitable[None]]


class FitHandle:
    """One run of ``learner.fit(epochs)`` that other tasks can cancel, await and observe.

    Start it in a task group with ``tg.start_soon(handle.run)`` (or ``await tg.start(handle.run)``
    to continue once training has begun). :meth:`cancel` cancels the run through the handle's own
    cancel scope: ``fit`` stops at its next await point with every weight update either fully
    applied or not at all, ``after_fit_run`` callbacks run shielded, and then ``finalize`` runs.
    Nothing outside the handle is cancelled.

    Args:
        learner: the learner to train (idle when the run starts).
        epochs: passed to ``learner.fit``: the total number of epochs to reach.
        resume: passed to ``learner.fit``.
        finalize: ``async def finalize(handle)``, awaited after ``fit`` ended in any way (also a
            cancellation from outside), in a shielded scope bounded by ``finalize_timeout``
            seconds; the learner is idle then, so ``learner.state_dict()`` is consistent. It is
            not called when the run never started (cancelled while pending). An error it
            raises comes out of :meth:`run` (``state`` keeps the run's own outcome).
        finalize_timeout: the time bound of ``finalize`` (seconds, positive).

    Example:
        >>> async def save(handle):
        ...     torch.save(handle.learner.state_dict(), "final.pt")
        >>> handle = FitHandle(learner, 10, finalize=save)
        >>> async with anyio.create_task_group() as tg:
        ...     await tg.start(handle.run)     # returns once fit has started
        ...     handle.cancel()                 # e.g. from a request handler
        >>> handle.state
        <RunState.CANCELLED: 'cancelled'>
    """

    def __init__(
        self,
        learner: Learner[Any],
        epochs: int,
        *,
        resume: str | os.PathLike[str] | None = None,
        finalize: Finalizer | None = None,
        finalize_timeout: float = 30.0,
    ) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        self._learner = learner
        self._epochs = epochs
        self._resume = resume
        self._finalize = finalize
        check_positive("finalize_timeout", finalize_timeout)
        self._finalize_timeout = finalize_timeout
        # Both made on first use inside the event loop (a handle may be built before it runs).
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._cancel_requested = False
        self._finished = False
        self._finalized = False
        self._state = RunState.PENDING
        self._claimed = False
        #: Waiting for a limiter's slot (see run): a cancel() then ends the handle at once.
        self._queued = False
        self._error: BaseException | None = None
        self._streams: list[EventStream] = []

    @property
    def learner(self) -> Learner[Any]:
        """The learner this handle trains."""
        return self._learner

    @property
    def epochs(self) -> int:
        """The number of epochs the run aims at."""
        return self._epochs

    @property
    def state(self) -> RunState:
        """Where the run is."""
        return self._state

    @property
    def done(self) -> bool:
        """Whether the run is over, its finalizer included."""
        return self._finished

    @property
    def finalized(self) -> bool:
        """Whether ``finalize`` ran to its end (``False`` before, without one, when it raised,
        or when ``finalize_timeout`` cut it off: a ``UserWarning`` says so then)."""
        return self._finalized

    @property
    def error(self) -> BaseException | None:
        """The exception the run failed with (``state`` is ``FAILED``), else ``None``."""
        return self._error

    @property
    def cancel_requested(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel_requested

    def cancel(self) -> None:
        """Cancel the run. A handle whose :meth:`run` was not called yet, or that waits for a
        limiter's slot, is ``CANCELLED`` and done at once: it trains nothing and its finalizer
        does not run (a later :meth:`run` returns at once; a waiting one leaves the queue).

        Call it from the event loop the run is on. It returns at once; await
        :meth:`wait_done` to know when the run (and its finalizer) is over.
        """
        self._cancel_requested = True
        if self._scope is not None:
            self._scope.cancel()
        if self._queued or (not self._claimed and not self._finished):
            # Nothing ran, so there is nothing to finalize: done now.
            self._state = RunState.CANCELLED
            self._finished = True
            for stream in self._streams:
                _end(stream)
            self._streams.clear()
            if self._done is not None:
                self._done.set()

    async def wait_done(self) -> RunState:
        """Wait until the run is over, its finalizer included; returns its final state."""
        if not self._finished:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()
        return self._state

    def snapshot(self) -> FitSnapshot:
        """Where the run is now (see :class:`FitSnapshot`)."""
        return FitSnapshot(
            state=self._state.value,
            target_epochs=self._epochs,
            cancel_requested=self.cancel_requested,
            error=None if self._error is None else repr(self._error),
            learner=LearnerSnapshot.of(self._learner),
        )

    def events(self, *, kinds: Iterable[str] | None = None, buffer: int = 1024) -> EventStream:
        """Subscribe to the learner's events of this run; the stream ends when the run is over.

        Subscribed while the handle is pending, it receives the run from its start (not the
        events of another run of the learner before it); subscribed when the run is over, it
        ends at once. See :meth:`Learner.events` for ``kinds`` and ``buffer``.
        """
        hub = self._learner._hub
        stream = hub.stream(kinds, buffer)
        if self._finished or (self._state.done and self._claimed):
            _end(stream)
            return stream
        if self._state is RunState.RUNNING:
            hub.attach(stream)
        # Else attached when this handle's fit starts (see run()).
        self._streams.append(stream)
        return stream

    async def run(
        self,
        *,
        limiter: anyio.CapacityLimiter | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> RunState:
        """Run ``learner.fit`` under the handle's cancel scope; returns the final state.

        Args:
            limiter: take one of its tokens before training (a queue of jobs with a bounded
                number running at once); cancelling the handle while it waits leaves the queue.
            task_status: for ``tg.start``: reported once ``fit`` starts (or when the run ends
                without starting).

        Raises:
            RuntimeError: the handle has run already.
            LearnerBusyError: the learner is running something else (another handle's
                ``fit``, a ``validate``): this run does not start (``state`` is then
                ``FAILED``), its finalizer does not run and its event streams end empty.
            Exception: what ``fit`` raised (``state`` is then ``FAILED``); a cancellation from
                an enclosing scope propagates too (``state`` is then ``CANCELLED``).
        """
        if self._claimed:
            raise RuntimeError("a FitHandle runs once; create a new one to train further")
        self._claimed = True
        if self._finished:  # cancelled before it was run: done already
            task_status.started()
            return self._state
        started = False
        reported = False
        if self._done is None:
            self._done = anyio.Event()
        self._scope = scope = anyio.CancelScope()
        if self._cancel_requested:
            scope.cancel()
        try:
            with scope:
                if limiter is not None:
                    self._queued = True
                    try:
                        await limiter.acquire()
                    finally:
                        self._queued = False
                try:
                    # A handle cancelled before it ran (or while it waited in the queue, the
                    # slot given to it meanwhile) never starts fit.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    # A learner busy with another run refuses this one before it starts: no
                    # finalizer while the other trains, none of the other's events here.
                    self._learner._check_idle("fit")
                    self._state = RunState.RUNNING
                    started = True
                    hub = self._learner._hub
                    for stream in self._streams:
                        hub.attach(stream)  # from this run's first event on
                    task_status.started()
                    reported = True
                    await self._learner.fit(self._epochs, resume=self._resume)
                finally:
                    if limiter is not None:
                        limiter.release()
            if scope.cancelled_caught:
                self._state = RunState.CANCELLED
            elif (
                self._learner._rt.last_outcome == "stopped"
                or self._learner.state.epoch < self._epochs
            ):
                # Also a stop in the last epoch's concurrent tail (the epoch already counted,
                # its after_epoch left for the next fit).
                self._state = RunState.STOPPED
            else:
                self._state = RunState.COMPLETED
        except anyio.get_cancelled_exc_class():
            self._state = RunState.CANCELLED
            raise
        except Interrupted:
            # A signal stopped the run (under stop_on_signals): a cancellation of its own scope.
            self._state = RunState.CANCELLED
            raise
        except BaseException as exc:
            self._state = RunState.FAILED
            self._error = exc
            raise
        finally:
            try:
                if started and self._finalize is not None:
                    with anyio.move_on_after(self._finalize_timeout, shield=True) as bound:
                        await self._finalize(self)
                    self._finalized = not bound.cancelled_caught
                    if bound.cancelled_caught:
                        warnings.warn(
                            f"the handle's finalize did not finish within finalize_timeout="
                            f"{self._finalize_timeout} s and was cut off: what it had left to do "
                            "(a final save) is not done; raise finalize_timeout, or find what "
                            "hangs there",
                            UserWarning,
                            stacklevel=2,
                        )
            finally:
                for stream in self._streams:
                    _end(stream)
                self._streams.clear()
                self._finished = True
                self._done.set()
        if not reported:
            # Cancelled before it started: tg.start() must still return.
            task_status.started()
        return self._state


def _end(stream: EventStream) -> None:
    """End a subscriber's stream now (what it has buffered is still delivered)."""
    stream._hub.unsubscribe(stream)
    stream._end()  # (on the stream's own loop, whichever thread ends it)
