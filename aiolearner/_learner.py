"""The Learner: model, optimizer, loss, data, stages and callbacks, built once, run many times."""

from __future__ import annotations

import enum
import os
import threading
import types
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import anyio
import torch

from . import _build, _checks, _optim, _persist
from ._callbacks import Callback
from ._data import BatchSource, FetchMode
from ._device import DeviceMover
from ._events import EventHub, EventStream
from ._exceptions import ConfigurationError, LearnerBusyError
from ._executor import Executor
from ._handle import LearnerSnapshot
from ._hparams import check_hparams
from ._locks import ReadWriteLock
from ._policy import ComputeMode, ComputePolicy
from ._runtime import Runtime, validation_sources
from ._signals import Interrupted, StoppableRun, for_sync
from ._stage import Stage, split_batch
from ._stages import FitRun
from ._state import State, _ObservedState
from ._sync import run_sync
from ._trace import Trace
from ._validation import SnapshotPolicy, ValidateEvery, ValidateMode, make_validator

if TYPE_CHECKING:
    from ._dist._strategy import Strategy
    from .callbacks import ModelSummary

__all__ = ["Learner", "LearnerStatus"]

TBatch = TypeVar("TBatch")


class LearnerStatus(enum.Enum):
    """What a learner is doing; each public coroutine may only start from ``IDLE``."""

    IDLE = "idle"
    FITTING = "fitting"
    VALIDATING = "validating"
    TESTING = "testing"
    PREDICTING = "predicting"


class Learner(Generic[TBatch]):
    """Trains a PyTorch model with a tree of async stages and concurrent, guarded callbacks.

    Args:
        model: the ``torch.nn.Module`` to train.
        optimizer: its optimizer, or several by name (``{"g": opt_g, "d": opt_d}``): the state
            field ``optimizers`` holds them all by name (a single one is named ``"main"``),
            ``optimizer`` the first; every one is in :meth:`state_dict`; ``Update(optimizer=
            "d")`` steps one by name. See ``docs/writing-stages.md``.
        loss_fn: ``loss_fn(output, targets) -> scalar tensor``.
        train_data: an iterable of batches (a DataLoader, a list, ...) or an async iterable; the
            default stages expect ``(inputs, targets)`` pairs.
        val_data: the same for validation, or ``None`` for no validation pass; or a mapping
            ``{name: data}`` of several validation sets, validated one after the other in each
            validation (their results are ``validation["<name>_loss"]`` and
            ``metrics["val_<name>_loss"]``, and likewise for callbacks' metrics).
        callbacks: the callbacks; their hook order is worked out here.
        device: where batches go (default: where the model's parameters are; the model is moved
            there if it is elsewhere).
        stages: replacements for stages of the default tree, by name
            (``{"fit_batch": MyFitBatch()}``), or a whole tree (a :class:`FitRun`).
        compute: ``"auto"`` (default), ``"thread"`` or ``"inline"``; see ``docs/performance.md``.
        max_blocking: with ``compute="auto"``, the longest a batch may block the event loop
            (seconds) when other tasks share the loop; learners training inline on the same
            loop count together.
        prefetch: how many batches the producer fetches ahead (memory stream depth).
        fetch: ``"auto"`` (default: inline while fetching is cheap, a producer thread once a
            fetch takes over ``fetch_budget`` seconds), ``"thread"`` or ``"inline"``.
        fetch_budget: see ``fetch``.
        steps_per_epoch: end each training pass after this many batches (the data iterator then
            continues in the next epoch), for endless or streaming data.
        trace: record every stage/hook entry and exit and every state write in ``learner.trace``.
        yield_interval: the longest (seconds) the training loop runs without giving the event
            loop a turn, between batches, while other tasks share the loop; ten times that while
            nothing else runs on it (turns then only serve cancellation and deadlines).
        teardown_timeout: the time bound (seconds, positive) of ``after_fit_run``, which runs
            shielded from cancellation whatever the outcome (the final checkpoint).
        validate: ``"sequential"`` (default: training waits for each validation pass) or
            ``"concurrent"`` (a snapshot of the weights and of the epoch's record is validated,
            and the epoch's ``after_epoch`` run, in the background while the next epoch
            trains; with the default compute the two overlap); see
            ``docs/concurrent-validation.md``.
        validate_every: when to validate: ``"epoch"`` (default: at the end of each epoch), an
            ``int`` N (after every N-th optimizer step, counted globally) or a
            ``datetime.timedelta`` (between batches, once that much time has passed).
        max_snapshots: with ``validate="concurrent"``, how many snapshots may be in flight
            (taken and not yet validated); each holds a copy of the model.
        snapshot_policy: with ``validate="concurrent"``, what happens when a validation is due
            and ``max_snapshots`` are in flight: ``"wait"`` (default: training waits for a free
            slot, back-pressure) or ``"skip"`` (this validation is skipped and counted).
        hparams: the run's hyperparameters, any JSON-able mapping: kept as :attr:`hparams`,
            in the ``hparams`` state field (for loggers), and in :meth:`state_dict`.
        strategy: a distributed strategy (:class:`DDP`, :class:`FSDP`) to train on several
            processes launched by ``torchrun``; ``None`` (default): one process. Making the
            learner is then collective: every rank makes it, with the same callbacks and stages
            (see ``docs/distributed.md``).

    Raises:
        ConfigurationError: callbacks or stages that cannot work together (see the message).
        TypeError: arguments of the wrong kind.
        ValueError: arguments that cannot work: an optimizer over none of the model's
            parameters, empty data, an iterator (one pass only) as data without
            ``steps_per_epoch``, a non-positive ``teardown_timeout``, ... (see the message and
            docs/reliability.md).

    Example:
        >>> learner = Learner(model, torch.optim.SGD(model.parameters(), 0.1),
        ...                   torch.nn.functional.cross_entropy, train_loader, val_loader)
        >>> await learner.fit(3)          # or learner.fit_sync(3)
        >>> learner.state.validation["loss"]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        train_data: Iterable[TBatch] | Any,
        val_data: Iterable[TBatch] | Any | None = None,
        callbacks: Sequence[Callback] = (),
        device: torch.device | str | None = None,
        *,
        stages: Mapping[str, Stage] | FitRun | None = None,
        compute: ComputeMode = "auto",
        max_blocking: float = 0.002,
        prefetch: int = 2,
        fetch: FetchMode = "auto",
        fetch_budget: float = 0.0005,
        steps_per_epoch: int | None = None,
        trace: bool = False,
        yield_interval: float = 0.001,
        teardown_timeout: float = 30.0,
        validate: ValidateMode = "sequential",
        validate_every: ValidateEvery = "epoch",
        max_snapshots: int = 1,
        snapshot_policy: SnapshotPolicy = "wait",
        hparams: Mapping[str, Any] | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = _optim.named_optimizers(optimizer)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        # Bad input fails here, clearly, rather than silently or half way through training.
        for name, opt in optimizers.items():
            _checks.check_optimizer(model, opt, "optimizer" if len(optimizers) == 1 else name)
        _checks.check_data("train_data", train_data)
        _checks.check_positive("teardown_timeout", teardown_timeout)
        _checks.check_positive("yield_interval", yield_interval, zero=True)
        _checks.check_positive("fetch_budget", fetch_budget, zero=True)
        self._hparams = check_hparams(hparams)
        self._strategy = strategy
        if strategy is not None:
            # Join the process group, then this rank's shard of the data.
            device = strategy._connect(device)
            train_data, val_data = strategy._shard(train_data, val_data)
        self._device = _resolve_device(model, device)
        if any(p.device != self._device for p in model.parameters()):
            model.to(self._device)
        mover = DeviceMover(self._device)
        self._train = BatchSource(
            train_data,
            name="train_data",
            mover=mover,
            prefetch=prefetch,
            fetch=fetch,
            fetch_budget=fetch_budget,
            steps_per_epoch=steps_per_epoch,
        )
        self._train.must_yield = True
        self._mover = mover
        self._val_data = val_data
        self._val_sets = self._sets_for(val_data, "val_data") if val_data is not None else {}
        self._callbacks: tuple[Callback, ...] = tuple(callbacks)
        for cb in self._callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be Callback instances, got {type(cb).__name__}"
                    + (" (a class: instantiate it)" if isinstance(cb, type) else "")
                )
        self._trace = Trace() if trace else None
        self._hub = EventHub(self._events_changed)
        self._status = LearnerStatus.IDLE
        self._loop_thread: int | None = None
        self._rt = Runtime(
            policy=ComputePolicy(compute, max_blocking=max_blocking),
            train=self._train,
            val=self._val_sets,
            hub=self._hub,
            trace=self._trace,
            device=self._device,
            yield_interval=yield_interval,
            teardown_timeout=teardown_timeout,
        )
        self._rt.executor = Executor(self._rt)
        self._rt.validator = make_validator(
            validate,
            validate_every,
            max_snapshots,
            snapshot_policy,
            has_val_data=bool(self._val_sets),
        )
        state = State()
        state.model = model
        # What training batches go through: the model, or its wrapper under a strategy.
        state.train_model = (
            model
            if strategy is None
            else strategy.wrap(model, list(optimizers.values()), self._device)
        )
        state.optimizer = next(iter(optimizers.values()))
        state.optimizers = optimizers
        state.loss_fn = loss_fn
        state.device = self._device
        state.epoch = 0
        state.step = 0
        state.batch_index = 0
        state.metrics = {}
        state.hparams = self._hparams
        object.__setattr__(state, "_trace", self._trace)
        self._state = state
        if trace:
            state.__class__ = _ObservedState
        self._stages: dict[str, Stage] = {}
        self._root = _build.build_tree(stages)
        if strategy is not None:
            strategy._attach(self)
        _build.build(self)

    # -- building -----------------------------------------------------------------------------

    def replace_stage(self, name: str, stage: Stage) -> None:
        """Put ``stage`` in place of the stage called ``name`` (before or between runs).

        Raises:
            KeyError: no stage has that name.
            LearnerBusyError: the learner is running.
            ConfigurationError: the new tree does not build.
        """
        self._check_idle(f"replace stage {name!r}")
        if name not in self._stages:
            raise KeyError(f"no stage named {name!r}; stages: {sorted(self._stages)}")
        if name == self._root.name:
            if not isinstance(stage, FitRun):
                raise TypeError("the root stage must be a FitRun")
            self._root = stage
        else:
            _build.replace_in_tree(self._root, self._stages[name], stage)
        _build.build(self)

    # -- public properties --------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained."""
        return self._state.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer (the first one, when the learner has several)."""
        return self._state.optimizer

    @property
    def optimizers(self) -> Mapping[str, torch.optim.Optimizer]:
        """Every optimizer by name, read-only (a single optimizer is named ``"main"``)."""
        return types.MappingProxyType(self._state.optimizers)

    @property
    def device(self) -> torch.device:
        """Where the model and batches live."""
        return self._device

    @property
    def strategy(self) -> Strategy | None:
        """The distributed strategy, or ``None``."""
        return self._strategy

    @property
    def hparams(self) -> dict[str, Any]:
        """The hyperparameters given to the constructor, in their JSON form."""
        return self._hparams

    @property
    def train_data(self) -> Any:
        """The training data, as given (for tools such as ``aiolearner.callbacks.lr_find``)."""
        return self._train.data

    @property
    def val_data(self) -> Any:
        """The validation data, as given (a mapping for several sets), or ``None``."""
        return self._val_data

    def _sets_for(self, data: Any, what: str) -> dict[str | None, BatchSource]:
        """Validation data as sets by name: ``{None: data}`` for one, the mapping for several."""
        train = self._train
        if isinstance(data, Mapping):
            if not data:
                raise ValueError(f"{what}: a mapping of validation sets needs at least one set")
            if self._strategy is not None:
                raise ConfigurationError(
                    f"{what}: several named validation sets are not supported under a "
                    "distributed strategy (each set would need a reduction of its own, agreed "
                    "by every rank); validate the sets one at a time with "
                    "learner.validate(data)"
                )
            for name in data:
                if not isinstance(name, str) or not name.isidentifier():
                    raise ValueError(
                        f"{what}: the names of validation sets go into metric names"
                        f" (val_<name>_loss), so each must be an identifier; got {name!r}"
                    )
            items: list[tuple[str | None, Any]] = list(data.items())
        else:
            items = [(None, data)]
        sources = {
            name: BatchSource(
                value,
                name=what if name is None else f"{what}[{name!r}]",
                mover=self._mover,
                prefetch=train.prefetch,
                fetch=train.fetch,
                fetch_budget=train.fetch_budget,
            )
            for name, value in items
        }
        for source in sources.values():
            _checks.check_data(source.name, source.data)
            source.must_yield = True
        return sources

    @property
    def state(self) -> State:
        """The training state itself (not a view: code outside callbacks is trusted)."""
        return self._state

    @property
    def status(self) -> LearnerStatus:
        """What the learner is doing now."""
        return self._status

    def snapshot(self) -> LearnerSnapshot:
        """Status, counters and metrics as plain values, for a status page or a log line.

        Cheap and safe from any task on the learner's event loop (no lock, no await, no device
        sync: metrics held as accelerator tensors are left out).
        """
        return LearnerSnapshot.of(self)

    def _running_train_loss(self) -> float | None:
        """The mean training loss of the current epoch so far, for :meth:`snapshot`; ``None``
        before the epoch's first batch, or when the losses live on an accelerator (a status
        request must not wait for the device)."""
        losses = list(self._rt.train_losses)  # a copy: the compute thread may append meanwhile
        if not losses or losses[-1].device.type != "cpu":
            return None
        with torch.no_grad():
            return float(torch.cat([x.reshape(-1) for x in losses]).float().mean())

    @property
    def callbacks(self) -> tuple[Callback, ...]:
        """The callbacks, as given."""
        return self._callbacks

    @property
    def stages(self) -> Stage:
        """The root of the stage tree (a :class:`FitRun`)."""
        return self._root

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        try:
            return self._stages[name]
        except KeyError:
            raise KeyError(f"no stage named {name!r}; stages: {sorted(self._stages)}") from None

    @property
    def trace(self) -> Trace:
        """The trace of a learner built with ``trace=True``."""
        if self._trace is None:
            raise RuntimeError("this learner was built without trace=True")
        return self._trace

    @property
    def weights_lock(self) -> ReadWriteLock:
        """The reader/writer lock on the model's weights and the optimizer."""
        return self._rt.weights_lock

    @property
    def compute_policy(self) -> ComputePolicy:
        """Where compute runs (mode, current decision, measured batch time, hop count)."""
        return self._rt.policy

    # -- running ------------------------------------------------------------------------------

    def _check_idle(self, action: str) -> None:
        if self._status is not LearnerStatus.IDLE:
            raise LearnerBusyError(action, self._status.value)

    @asynccontextmanager
    async def _running(self, status: LearnerStatus) -> AsyncIterator[None]:
        self._check_idle(_verb(status))
        self._status = status
        self._loop_thread = threading.get_ident()
        self._hub.bind_loop_thread()
        state = self._state
        rt = self._rt
        rt.teardown_timed_out = False
        # run_start opens the run's event stream: publish it before the run's first state write.
        phase = _verb(status)
        self._hub.publish("run_start", "learner", state.epoch, state.step, {"phase": phase})
        state.phase = phase
        outcome = "error"
        try:
            failure: BaseException | None = None
            async with anyio.create_task_group() as tg:
                rt.tg = tg
                rt.worker.open()
                rt.policy.enter_run(rt.yield_interval)
                try:
                    yield
                except BaseException as exc:
                    # Keep the body's own exception unwrapped: stop the background work and
                    # re-raise it after the task group has closed (errors of background tasks
                    # still come out grouped).
                    failure = exc
                    tg.cancel_scope.cancel()
                finally:
                    rt.policy.exit_run()
                    # The compute worker thread (if a hop started it) goes back to the pool.
                    rt.worker.stop()
            if failure is not None:
                outcome = (
                    "cancelled" if isinstance(failure, anyio.get_cancelled_exc_class()) else "error"
                )
                raise failure
            outcome = "completed"
        except anyio.get_cancelled_exc_class():
            # Also when closing the task group re-raises an enclosing scope's cancellation
            # (trio does) before the check above runs.
            outcome = "cancelled"
            raise
        finally:
            rt.tg = None
            self._status = LearnerStatus.IDLE
            state.invalidate("phase", *rt.expiring["run"])
            self._hub.publish("run_end", "learner", state.epoch, state.step, {"outcome": outcome})
            self._hub.close_all()

    def _start_background(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        tg = self._rt.tg
        if tg is None:
            raise LearnerBusyError("start background work", "not running")
        if self._strategy is not None:
            # Background work runs in an order of its own on each rank: no collectives there.
            from ._dist._strategy import mark_concurrent

            fn = mark_concurrent(fn, name)
        if threading.get_ident() == self._loop_thread:
            tg.start_soon(fn, *args, name=f"aiolearner.bg.{name}")
        else:
            anyio.from_thread.run_sync(tg.start_soon, fn, *args)

    async def fit(self, epochs: int, *, resume: str | os.PathLike[str] | None = None) -> None:
        """Train until ``epochs`` epochs are complete in total.

        Calling it again after a cancellation or a ``StopFit`` continues exactly where the run
        stopped; calling it with a larger number trains further. ``resume="last"`` or a path
        first loads a checkpoint (see :meth:`load_checkpoint`).

        Pseudo-code, with hook order (see :class:`FitRun`, :class:`Epoch`, :class:`Fit`,
        :class:`FitBatch`, :class:`Validate`)::

            before_fit_run
            for each remaining epoch:
                before_epoch
                  before_fit
                    for each batch:  before_fit_batch
                                       before_gradient  Gradient  after_gradient
                                       before_update    Update    after_update
                                     after_fit_batch
                  after_fit
                  before_validate
                    for each batch:  before_validate_batch
                                       before_validate_loss ValidateLoss after_validate_loss
                                     after_validate_batch
                  after_validate
                after_epoch          (also after a StopFit from after_validate)
            after_fit_run

        With ``validate="concurrent"`` an epoch's validation and ``after_epoch`` run on a
        snapshot, in the background, while the next epoch trains.

        Raises:
            LearnerBusyError: the learner is already running.
            ValueError: ``epochs`` is negative.
            Interrupted: inside :func:`stop_on_signals` (or ``fit_sync``), a SIGINT or SIGTERM
                stopped the run gracefully (see docs/reliability.md).
            Exception: errors of stages (bare, with notes) and callbacks (in an ExceptionGroup).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        self._check_idle("fit")
        self._check_fit(epochs)
        strategy = self._strategy
        # A signal (under stop_on_signals) cancels this scope: a cancellation the run survives
        # by design (at the next await, never inside an update; shielded teardown).
        # Under a strategy, a stop every rank agrees on (ranks get a preemption's SIGTERM at
        # different steps).
        run = StoppableRun(None if strategy is None else strategy.request_stop)
        with run:
            if run.signal is not None:
                # A signal came while no run was in progress: this one does not begin.
                await anyio.lowlevel.checkpoint_if_cancelled()
            if resume is not None:
                if strategy is None:
                    # Find and read the file in a worker thread: the loop may be serving other
                    # work.
                    checkpoint = await anyio.to_thread.run_sync(self._resume_from, resume)
                else:
                    from ._dist._persist import resume as agreed_resume

                    checkpoint = await agreed_resume(strategy, self, resume)
                self.load_state_dict(checkpoint)  # checks again that nobody started meanwhile
            self._rt.target_epochs = epochs
            async with self._running(LearnerStatus.FITTING):
                if strategy is None:
                    await self._root(self._state)
                else:
                    await strategy._run_fit(self)
        if run.stopped:
            assert run.signal is not None
            raise Interrupted(run.signal, epoch=self._state.epoch, step=self._state.step)

    def _check_fit(self, epochs: int) -> None:
        """At fit start. A generator given as data can serve one pass only: refuse a run that
        needs more. Without val_data no validation runs during fit: refuse a callback that
        would act only on one (``EarlyStopping("val_loss")`` would never check)."""
        if not self._val_sets:
            for cb in self._callbacks:
                needs = getattr(cb, "_needs_val_data", None)
                what = None if needs is None else needs()
                if what is not None:
                    raise ConfigurationError(
                        f"{cb.name} {what}, but the learner has no val_data, so no validation"
                        " runs during fit and it would never act; pass val_data=..., or"
                        " monitor a metric of the training pass",
                        callbacks=(cb.name,),
                    )
        state = self._state
        remaining = max(0, epochs - state.epoch)
        if self._train.steps_per_epoch is None:
            _checks.check_passes("train_data", self._train.data, remaining)
        for source in self._val_sets.values():
            _checks.check_passes(source.name, source.data, remaining)

    def fit_sync(
        self,
        epochs: int,
        *,
        resume: str | os.PathLike[str] | None = None,
        backend: Literal["asyncio", "trio"] = "asyncio",
        handle_signals: bool = True,
    ) -> None:
        """:meth:`fit` for scripts and notebooks: runs its own event loop (``backend``) until done.

        Where an event loop already runs in this thread (a Jupyter cell), the run goes to a new
        thread with its own loop and this call blocks until it ends; an interrupt
        (``KeyboardInterrupt``) cancels the run, waits until it has stopped, and propagates.

        With ``handle_signals`` (default), called in the main thread, it runs under
        :func:`stop_on_signals`: SIGINT or SIGTERM stops the run gracefully (batch boundary,
        ``after_fit_run`` and the final checkpoint), then ``KeyboardInterrupt`` (SIGINT) or
        ``SystemExit(143)`` (SIGTERM) is raised. In another thread it relies on a
        ``stop_on_signals()`` of the main thread (Python handles signals there only).
        """

        async def main() -> None:
            await self.fit(epochs, resume=resume)

        with for_sync(handle_signals):
            run_sync(main, backend=backend)

    async def validate(
        self, data: Iterable[Any] | Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run the Validate stage once on the current weights; returns ``state.validation``.

        Args:
            data: what to validate on instead of ``val_data``: batches as for ``val_data``, or
                a mapping ``{name: batches}`` of several sets.

        The results become the learner's latest validation (``state.validation``, the
        ``val_`` keys of ``state.metrics``), with the same callbacks as in training;
        ``state.phase`` is ``"validate"``.

        Raises:
            LearnerBusyError: the learner is running.
            ValueError: no ``data`` and the learner has no validation data.
        """
        self._check_idle("validate")
        sets = self._val_sets if data is None else self._sets_for(data, "data")
        if not sets:
            raise ValueError("this learner has no val_data to validate on; pass data=")
        async with self._running(LearnerStatus.VALIDATING):
            await self._evaluate(None if data is None else sets)
        return dict(self._state.validation)

    def validate_sync(
        self,
        data: Iterable[Any] | Mapping[str, Any] | None = None,
        *,
        backend: Literal["asyncio", "trio"] = "asyncio",
    ) -> dict[str, Any]:
        """:meth:`validate` for scripts and notebooks (see :meth:`fit_sync`)."""

        async def main() -> dict[str, Any]:
            return await self.validate(data)

        return run_sync(main, backend=backend)

    async def test(self, data: Iterable[Any] | Mapping[str, Any]) -> dict[str, Any]:
        """Evaluate the current weights on test data; returns ``test_``-prefixed metrics.

        The Validate stage runs over ``data`` with the same callbacks as a validation (its
        hooks, ``before_validate`` ... ``after_validate``), while ``state.phase == "test"``:
        results go to ``test_`` keys of ``state.metrics`` (``test_loss``, a :class:`Metrics`
        callback's ``test_accuracy``; ``test_<name>_...`` for a mapping of sets), and callbacks
        that act on validation results during training (early stopping, schedulers) leave
        them alone. ``state.validation`` keeps the latest *validation* results.

        Args:
            data: batches as for ``val_data``, or a mapping ``{name: batches}``.

        Returns:
            ``{"test_loss": ..., "test_accuracy": ..., ...}``.

        Raises:
            LearnerBusyError: the learner is running.
        """
        self._check_idle("test")
        sets = self._sets_for(data, "data")
        state = self._state
        d = state.__dict__
        kept: dict[str, Any] = {k: d[k] for k in ("validation", "validation_tag") if k in d}
        validator = self._rt.validator
        latest = None if validator is None else validator.latest
        async with self._running(LearnerStatus.TESTING):
            try:
                await self._evaluate(sets)
                results = dict(state.validation)
            finally:
                # A test is not a validation: the latest validation stays what it was.
                state.invalidate("validation", "validation_tag")
                d.update(kept)
                if validator is not None:
                    validator.latest = latest
        return {f"test_{key}": value for key, value in results.items()}

    def test_sync(
        self,
        data: Iterable[Any] | Mapping[str, Any],
        *,
        backend: Literal["asyncio", "trio"] = "asyncio",
    ) -> dict[str, Any]:
        """:meth:`test` for scripts and notebooks (see :meth:`fit_sync`)."""

        async def main() -> dict[str, Any]:
            return await self.test(data)

        return run_sync(main, backend=backend)

    async def _evaluate(self, sets: dict[str | None, BatchSource] | None) -> None:
        """The Validate stage once, over ``sets`` (``None``: ``val_data``)."""
        stage = self._stages["validate"]
        validator = self._rt.validator
        token = None if sets is None else validation_sources.set(sets)
        try:
            if validator is None:
                await stage(self._state)
            else:
                await validator.validate_now(stage, self._state, sets)
        finally:
            if token is not None:
                validation_sources.reset(token)

    async def predict(self, data: Iterable[Any] | Any) -> Any:
        """The model's outputs for ``data`` (batches of ``(inputs, targets)`` or inputs alone).

        Runs under ``inference_mode`` with the model in eval mode, on fully updated weights, in
        the compute worker when the policy says so. Returns the outputs concatenated along the
        first dimension (a list of per-batch outputs when they are not tensors).
        """
        self._check_idle("predict")
        source = BatchSource(
            data,
            name="predict data",
            mover=DeviceMover(self._device),
            prefetch=self._train.prefetch,
            fetch=self._train.fetch,
            fetch_budget=self._train.fetch_budget,
        )
        outputs: list[Any] = []
        model = self.model
        rt = self._rt

        def forward(batch: Any) -> Any:
            inputs = split_batch(batch, "predict")[0] if isinstance(batch, tuple | list) else batch
            with torch.inference_mode():
                return model(inputs)

        async with self._running(LearnerStatus.PREDICTING):
            assert rt.tg is not None
            was_training = model.training
            async with rt.weights_lock.read():
                model.eval()
                try:
                    async with source.open(rt.tg) as batches:
                        while True:
                            batch = await batches.next()
                            if batch is batches.END:
                                break
                            outputs.append(await rt.compute(forward, batch))
                            await anyio.lowlevel.checkpoint()
                finally:
                    model.train(was_training)
        if outputs and all(isinstance(o, torch.Tensor) for o in outputs):
            return torch.cat(outputs)
        return outputs

    # -- observing ----------------------------------------------------------------------------

    def events(self, *, kinds: Iterable[str] | None = None, buffer: int = 1024) -> EventStream:
        """Subscribe to the learner's events (see :class:`Event`).

        The stream ends when the current run ends (or the next one, if the learner is idle).
        Publishing never waits for a slow consumer: when ``buffer`` events are waiting, newer
        ones are dropped for this subscriber and counted in the next event's ``dropped``.

        Args:
            kinds: only these kinds of event (default: all).
            buffer: how many events may wait for the consumer.
        """
        return self._hub.subscribe(kinds, buffer)

    def _events_changed(self, active: bool) -> None:
        observed = active or self._trace is not None
        self._rt.observed = observed
        self._state.__class__ = _ObservedState if observed else State
        if active:
            object.__setattr__(self._state, "_publish", self._publish_write)
        else:
            object.__setattr__(self._state, "_publish", None)

    def _publish_write(self, kind: str, who: str, data: Any) -> None:
        d = self._state.__dict__
        self._hub.publish(kind, who, d.get("epoch"), d.get("step"), data)

    def publish(self, kind: str, source: str, data: Mapping[str, Any]) -> None:
        """Publish an event (``kind`` "metrics" or "log") on the learner's stream."""
        d = self._state.__dict__
        self._hub.publish(kind, source, d.get("epoch"), d.get("step"), dict(data))

    def summary(self, batch: Any = None, *, max_depth: int | None = None) -> ModelSummary:
        """The model's layers, parameter counts and (given a sample ``batch``) output shapes;
        see :func:`aiolearner.callbacks.model_summary`."""
        from .callbacks import model_summary  # the callbacks are built on this module

        return model_summary(self, batch, max_depth=max_depth)

    def describe(self) -> str:
        """A readable tree: stages (and how each batch stage runs), each hook's callbacks in run
        order, declared access."""
        return _build.describe(self)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly, in ``torch.load(weights_only=True)``
        compatible form: weights, optimizer, counters and position in the epoch, RNG states,
        callback states. Take it under ``weights_lock.read()`` while training runs.

        Under a strategy it is collective (every rank calls it, in the same order): rank 0's
        holds every rank's own state too (``"ranks"``)."""
        if self._strategy is not None:
            from ._dist._persist import state_dict

            return state_dict(self._strategy, self)
        return _persist.state_dict(self)

    def _state_dict_of(self, state: State) -> dict[str, Any]:
        """:meth:`state_dict` as seen from ``state``: a concurrent tail's state is a snapshot."""
        snapshot = None if state is self._state else state
        if self._strategy is not None:
            from ._dist._persist import state_dict

            return state_dict(self._strategy, self, snapshot)
        return _persist.state_dict(self, snapshot=snapshot)

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (when idle).

        All or nothing: weights that do not fit the model (another architecture) are refused
        before anything is loaded, and a failure half way puts everything back, so a failed load
        leaves model, optimizer, counters, random generators and callbacks as they were.

        Raises:
            LearnerBusyError: the learner is running.
            ValueError: not a checkpoint of this kind, or weights that do not fit the model.
        """
        self._check_idle("load a checkpoint")
        if self._strategy is not None:
            from ._dist._persist import load_state_dict

            load_state_dict(self._strategy, self, checkpoint)
            return
        _persist.load_state_dict(self, checkpoint)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Load a checkpoint file written from :meth:`state_dict` (``weights_only=True``).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is damaged or not a checkpoint (the message names it), or its
                weights do not fit the model; the learner is left as it was.
        """
        self.load_state_dict(_persist.read_checkpoint(Path(path), self._device))

    def _resume_from(self, resume: str | os.PathLike[str]) -> Any:
        path = _persist.find_checkpoint(self._callbacks, resume)
        return _persist.read_checkpoint(path, self._device)


def _verb(status: LearnerStatus) -> str:
    return {
        LearnerStatus.FITTING: "fit",
        LearnerStatus.VALIDATING: "validate",
        LearnerStatus.TESTING: "test",
        LearnerStatus.PREDICTING: "predict",
        LearnerStatus.IDLE: "idle",
    }[status]


def _resolve_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
