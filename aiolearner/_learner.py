"""The Learner: model, optimizer, loss, data, stages and callbacks, built once, run many times.

The class holds the whole public API with its docstrings; the longer bodies live in modules of
their own: construction in ``_construct.py``, runs (status, run scope, ``fit``) in
``_lifecycle.py``, ``validate`` / ``test`` / ``predict`` in ``_evaluation.py``.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import torch

from . import _build, _construct, _evaluation, _lifecycle, _persist
from ._callbacks import Callback
from ._data import BatchSource, FetchMode
from ._device import DeviceMover
from ._events import EventHub, EventStream
from ._exceptions import LearnerBusyError
from ._handle import LearnerSnapshot
from ._hparams import check_hparams
from ._lifecycle import LearnerStatus
from ._locks import ReadWriteLock
from ._policy import ComputeMode, ComputePolicy
from ._signals import for_sync
from ._stage import Stage
from ._stages import FitRun
from ._state import State, _ObservedState
from ._sync import run_sync
from ._trace import Trace
from ._validation import SnapshotPolicy, ValidateEvery, ValidateMode

if TYPE_CHECKING:
    from ._dist._strategy import Strategy
    from .callbacks import ModelSummary

__all__ = ["Learner", "LearnerStatus"]

TBatch = TypeVar("TBatch")


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
            continues in the next epoch), for endless or streaming data. With finite data, a
            pass that reaches the end of the iterator ends there (a shorter epoch), and the next
            pass starts a new iterator.
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
            parameters, empty data, a non-positive ``teardown_timeout``, ... (see the message
            and docs/reliability.md). An iterator or generator (one pass only) as data without
            ``steps_per_epoch`` is refused by ``fit`` when the run needs more than one pass.

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
        optimizers = _construct.check_arguments(
            model,
            optimizer,
            loss_fn,
            train_data,
            steps_per_epoch=steps_per_epoch,
            teardown_timeout=teardown_timeout,
            yield_interval=yield_interval,
            fetch_budget=fetch_budget,
        )
        self._hparams = check_hparams(hparams)
        self._callbacks = _construct.check_callbacks(callbacks)  # (once: it may be an iterator)
        self._strategy = strategy
        if strategy is not None:
            from ._dist._strategy import Strategy as StrategyType

            if not isinstance(strategy, StrategyType):
                raise TypeError(
                    "strategy must be a distributed strategy (aiolearner.DDP(), aiolearner.FSDP()),"
                    f" got {type(strategy).__name__} {strategy!r}"
                )
            parts = (self._callbacks, stages, train_data)  # (joins; then this rank's shard)
            device = strategy._connect(device, model, optimizers, parts)
            train_data, val_data = strategy._shard(train_data, val_data)
        self._device = _construct.resolve_device(model, device)
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
        self._val_sets = (
            _evaluation.sets_for(self, val_data, "val_data") if val_data is not None else {}
        )
        self._trace = Trace() if trace else None
        self._hub = EventHub(self._events_changed)
        self._status = LearnerStatus.IDLE
        self._loop_thread: int | None = None
        self._rt = _construct.runtime(
            self,
            compute=compute,
            max_blocking=max_blocking,
            yield_interval=yield_interval,
            teardown_timeout=teardown_timeout,
            validate=validate,
            validate_every=validate_every,
            max_snapshots=max_snapshots,
            snapshot_policy=snapshot_policy,
        )
        self._state = _construct.initial_state(
            model, optimizers, loss_fn, self._device, self._hparams, strategy, self._trace
        )
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
            TypeError: ``stage`` is not a Stage (the root must be a FitRun).
            LearnerBusyError: the learner is running.
            ConfigurationError: the new tree does not build.
        """
        self._check_idle(f"replace stage {name!r}")
        _build.replace_stage(self, name, stage)

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

    def _start_background(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        _lifecycle.start_background(self, fn, args, name)

    async def fit(self, epochs: int, *, resume: str | os.PathLike[str] | None = None) -> None:
        """Train until ``epochs`` epochs are complete in total.

        Calling it again after a cancellation or a ``StopFit`` continues exactly where the run
        stopped; calling it with a larger number trains further. ``resume="last"``,
        ``resume="best"`` (the best file of a ``Checkpoint`` with a monitor) or a path first
        loads a checkpoint (see :meth:`load_checkpoint`).

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
        await _lifecycle.fit(self, epochs, resume)

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
        return await _evaluation.validate(self, data)

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
        results go to ``test_`` keys of ``state.metrics`` until the next ``fit`` (``test_loss``,
        a :class:`Metrics` callback's ``test_accuracy``; ``test_<name>_...`` for sets); callbacks
        that act on validation results during training (early stopping, schedulers) leave
        them alone. ``state.validation`` keeps the latest *validation* results.

        Args:
            data: batches as for ``val_data``, or a mapping ``{name: batches}``.

        Returns:
            ``{"test_loss": ..., "test_accuracy": ..., ...}``.

        Raises:
            LearnerBusyError: the learner is running.
        """
        return await _evaluation.test(self, data)

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

    async def predict(self, data: Iterable[Any] | Any) -> Any:
        """The model's outputs for ``data``: batches of ``(inputs, targets)``, of ``(inputs,)`` (a
        DataLoader over ``TensorDataset(inputs)``) or of inputs alone (a tensor: one batch).

        Runs under ``inference_mode`` in eval mode, on fully updated weights, in the compute
        worker when the policy says so; it draws from the global generators as torch code does
        (each call anew: a DataLoader's seed, a model sampling in ``forward``). Returns the
        outputs concatenated along the first dimension (a list when they are not tensors).
        """
        return await _evaluation.predict(self, data)

    def predict_sync(
        self, data: Iterable[Any] | Any, *, backend: Literal["asyncio", "trio"] = "asyncio"
    ) -> Any:
        """:meth:`predict` for scripts and notebooks (see :meth:`fit_sync`)."""
        return run_sync(functools.partial(self.predict, data), backend=backend)

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
        """Publish an event (``kind`` "metrics" or "log") on the learner's stream.

        Raises:
            ValueError: another ``kind`` (the others are the learner's own events).
        """
        if kind not in ("metrics", "log"):
            raise ValueError(
                f"publish: kind must be 'metrics' or 'log', got {kind!r} (the other kinds are "
                "the learner's own events)"
            )
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
        if isinstance(checkpoint, Mapping) and checkpoint.get("ranks") is not None:
            from ._dist._persist import on_another_world_size  # saved by several ranks

            checkpoint = on_another_world_size(dict(checkpoint), 1)
        _persist.load_state_dict(self, checkpoint)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Load a checkpoint file written from :meth:`state_dict` (``weights_only=True``).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is damaged or not a checkpoint (the message names it), or its
                weights do not fit the model; the learner is left as it was.
        """
        if not isinstance(path, str | os.PathLike):
            raise TypeError(
                f"load_checkpoint takes a checkpoint file's path, got {type(path).__name__}"
            )
        checkpoint = _persist.read_checkpoint(Path(path), self._device)
        try:
            self.load_state_dict(checkpoint)
        except ValueError as exc:  # (the learner is as it was)
            raise ValueError(f"checkpoint file {str(path)!r}: {exc}") from exc
