"""The Learner: model, optimizer, loss, data, stages and callbacks, built once, run many times."""

from __future__ import annotations

import enum
import inspect
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import anyio
import torch

from ._callbacks import Callback
from ._data import BatchSource, FetchMode
from ._device import DeviceMover
from ._events import EventHub, EventStream
from ._exceptions import ConfigurationError, LearnerBusyError
from ._handle import LearnerSnapshot
from ._locks import ReadWriteLock
from ._plan import HookPlan, build_plan
from ._rng import capture_rng, restore_rng, rng_from_portable, rng_to_portable
from ._runtime import ComputeMode, ComputePolicy, Runtime
from ._stages import ComputeStage, FitRun, Stage, split_batch
from ._state import STAGE_OWNED, VIEW_ATTRIBUTES, State, _ObservedState
from ._trace import Trace
from ._validation import SnapshotPolicy, ValidateEvery, ValidateMode, bind_states, make_validator

__all__ = ["Learner", "LearnerStatus"]

TBatch = TypeVar("TBatch")


class LearnerStatus(enum.Enum):
    """What a learner is doing; each public coroutine may only start from ``IDLE``."""

    IDLE = "idle"
    FITTING = "fitting"
    VALIDATING = "validating"
    PREDICTING = "predicting"


class Learner(Generic[TBatch]):
    """Trains a PyTorch model with a tree of async stages and concurrent, guarded callbacks.

    Args:
        model: the ``torch.nn.Module`` to train.
        optimizer: its optimizer.
        loss_fn: ``loss_fn(output, targets) -> scalar tensor``.
        train_data: an iterable of batches (a DataLoader, a list, ...) or an async iterable; the
            default stages expect ``(inputs, targets)`` pairs.
        val_data: the same for validation, or ``None`` for no validation pass.
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
        teardown_timeout: the time bound of ``after_fit_run`` after an error or a cancellation.
        validate: ``"sequential"`` (default: training waits for each validation pass) or
            ``"concurrent"`` (a snapshot of the weights is validated in the background while
            training goes on); see ``docs/concurrent-validation.md``.
        validate_every: when to validate: ``"epoch"`` (default: at the end of each epoch), an
            ``int`` N (after every N-th optimizer step, counted globally) or a
            ``datetime.timedelta`` (between batches, once that much time has passed).
        max_snapshots: with ``validate="concurrent"``, how many snapshots may be in flight
            (taken and not yet validated); each holds a copy of the model.
        snapshot_policy: with ``validate="concurrent"``, what happens when a validation is due
            and ``max_snapshots`` are in flight: ``"wait"`` (default: training waits for a free
            slot, back-pressure) or ``"skip"`` (this validation is skipped and counted).

    Raises:
        ConfigurationError: callbacks or stages that cannot work together (see the message).
        TypeError: arguments of the wrong kind.

    Example:
        >>> learner = Learner(model, torch.optim.SGD(model.parameters(), 0.1),
        ...                   torch.nn.functional.cross_entropy, train_loader, val_loader)
        >>> await learner.fit(3)          # or learner.fit_sync(3)
        >>> learner.state.validation["loss"]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
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
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
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
        self._val = (
            None
            if val_data is None
            else BatchSource(
                val_data,
                name="val_data",
                mover=mover,
                prefetch=prefetch,
                fetch=fetch,
                fetch_budget=fetch_budget,
            )
        )
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
            val=self._val,
            hub=self._hub,
            trace=self._trace,
            yield_interval=yield_interval,
            teardown_timeout=teardown_timeout,
        )
        self._rt.validator = make_validator(
            validate,
            validate_every,
            max_snapshots,
            snapshot_policy,
            has_val_data=val_data is not None,
        )
        state = State()
        state.model = model
        state.optimizer = optimizer
        state.loss_fn = loss_fn
        state.device = self._device
        state.epoch = 0
        state.step = 0
        state.batch_index = 0
        state.metrics = {}
        object.__setattr__(state, "_trace", self._trace)
        self._state = state
        if trace:
            state.__class__ = _ObservedState
        self._root = _build_tree(stages)
        self._build()

    # -- building -----------------------------------------------------------------------------

    def _build(self) -> None:
        stages = list(self._root.walk())
        names: dict[str, Stage] = {}
        for stage in stages:
            if stage.name in names and names[stage.name] is not stage:
                raise ConfigurationError(
                    f"two stages are named {stage.name!r} ({type(names[stage.name]).__name__} and"
                    f" {type(stage).__name__}); stage names must be unique in the tree"
                )
            if stage._rt is not None and stage._rt is not self._rt:
                raise ConfigurationError(
                    f"stage {stage.name!r} already belongs to another Learner; create a new one"
                )
            names[stage.name] = stage
        hook_owner = {}
        for stage in stages:
            before, after = stage.hook_names
            hook_owner[before] = stage
            hook_owner[after] = stage
        hooked: dict[str, list[tuple[Callback, Any]]] = {h: [] for h in hook_owner}
        for cb in self._callbacks:
            _check_declarations(cb)
            for hook, method in cb.hooks():
                if hook not in hook_owner:
                    known = ", ".join(sorted(hook_owner))
                    raise ConfigurationError(
                        f"unknown hook {hook!r}: no stage of this learner is named "
                        f"{hook.split('_', 1)[1]!r} (hooks: {known})",
                        hook=hook,
                        callbacks=(cb.name,),
                    )
                _check_signature(cb, hook, method)
                hooked[hook].append((cb, method))
        for stage in stages:
            before, after = stage.hook_names
            stage._before = build_plan(
                before, stage.name, hooked[before], self._state, self, self._trace
            )
            stage._after = build_plan(
                after, stage.name, hooked[after], self._state, self, self._trace
            )
            stage._rt = self._rt
            stage._fused = False
            stage._fused_writes = False
        for name in ("fit_batch", "validate_batch"):
            batch_stage = names.get(name)
            if batch_stage is not None and _fusable(batch_stage, root=True):
                batch_stage._fused = True
                batch_stage._fused_writes = any(
                    isinstance(s, ComputeStage) and s.writes_weights for s in batch_stage.walk()
                )
        fit_batch = names.get("fit_batch")
        self._rt.batch_is_atomic = fit_batch is None or fit_batch._fused
        self._stages = names
        bind_states(self)

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
            for parent in self._root.walk():
                for attr, value in list(vars(parent).items()):
                    if value is self._stages[name]:
                        setattr(parent, attr, stage)
                parent.children = tuple(
                    stage if c is self._stages[name] else c for c in parent.children
                )
        self._build()

    # -- public properties --------------------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained."""
        return self._state.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer."""
        return self._state.optimizer

    @property
    def device(self) -> torch.device:
        """Where the model and batches live."""
        return self._device

    @property
    def train_data(self) -> Any:
        """The training data, as given (for tools such as ``aiolearner.callbacks.lr_find``)."""
        return self._train.data

    @property
    def val_data(self) -> Any:
        """The validation data, as given, or ``None``."""
        return None if self._val is None else self._val.data

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
            state.invalidate("phase")
            self._hub.publish("run_end", "learner", state.epoch, state.step, {"outcome": outcome})
            self._hub.close_all()

    def _start_background(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        tg = self._rt.tg
        if tg is None:
            raise LearnerBusyError("start background work", "not running")
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
                after_epoch
            after_fit_run

        Raises:
            LearnerBusyError: the learner is already running.
            ValueError: ``epochs`` is negative.
            Exception: errors of stages (bare, with notes) and callbacks (in an ExceptionGroup).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        self._check_idle("fit")
        if resume is not None:
            # Find and read the file in a worker thread: the loop may be serving other work.
            checkpoint = await anyio.to_thread.run_sync(self._resume_from, resume)
            self.load_state_dict(checkpoint)  # checks again that nobody started meanwhile
        self._rt.target_epochs = epochs
        async with self._running(LearnerStatus.FITTING):
            await self._root(self._state)

    def fit_sync(
        self,
        epochs: int,
        *,
        resume: str | os.PathLike[str] | None = None,
        backend: Literal["asyncio", "trio"] = "asyncio",
    ) -> None:
        """:meth:`fit` for scripts: runs its own event loop (``backend``) until done."""

        async def main() -> None:
            await self.fit(epochs, resume=resume)

        anyio.run(main, backend=backend)

    async def validate(self) -> dict[str, Any]:
        """Run the Validate stage once on the current weights; returns ``state.validation``.

        Raises:
            LearnerBusyError: the learner is running.
            ValueError: the learner has no validation data.
        """
        self._check_idle("validate")
        if self._val is None:
            raise ValueError("this learner has no val_data to validate on")
        validator = self._rt.validator
        async with self._running(LearnerStatus.VALIDATING):
            if validator is None:
                await self._stages["validate"](self._state)
            else:
                await validator.validate_now(self._stages["validate"], self._state)
        return dict(self._state.validation)

    def validate_sync(self, *, backend: Literal["asyncio", "trio"] = "asyncio") -> dict[str, Any]:
        """:meth:`validate` for scripts."""
        return anyio.run(self.validate, backend=backend)

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
                            if rt.policy.hopping:
                                outputs.append(await rt.hop(forward, batch))
                            else:
                                outputs.append(forward(batch))
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

    def describe(self) -> str:
        """A readable tree: stages, each hook's callbacks in run order, declared access."""
        lines = []

        def plan_lines(plan: HookPlan | None, indent: str) -> None:
            if plan is None:
                return
            lines.append(f"{indent}{plan.hook}:")
            for i, layer in enumerate(plan.layers):
                together = [*layer.sync, *layer.concurrent]
                kind = "concurrently" if len(layer.concurrent) > 1 else "in order"
                lines.append(f"{indent}  [{i + 1}] {kind}:")
                for entry in together:
                    mode = "async" if entry.is_async else "def"
                    lines.append(f"{indent}    - {entry.name} ({mode})")

        def walk(stage: Stage, depth: int) -> None:
            indent = "  " * depth
            extra = " [fused batch]" if stage._fused else ""
            kind = " compute" if isinstance(stage, ComputeStage) else ""
            lines.append(f"{indent}{type(stage).__name__} ({stage.name}){kind}{extra}")
            plan_lines(stage._before, indent + "  ")
            for child in stage.children:
                walk(child, depth + 1)
            plan_lines(stage._after, indent + "  ")

        walk(self._root, 0)
        policy = self._rt.policy
        lines.append(f"compute: {policy.mode} (max_blocking={policy.max_blocking}s)")
        if self._callbacks:
            lines.append("callbacks:")
            for cb in self._callbacks:
                hooks = ", ".join(h for h, _ in cb.hooks()) or "-"
                after = ", ".join(t.__name__ for t in cb.after) or "-"
                lines.append(
                    f"  {cb.name}: reads {sorted(cb.reads) or '-'}, writes "
                    f"{sorted(cb.writes) or '-'}, after {after}; hooks {hooks}"
                )
        return "\n".join(lines)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly, in ``torch.load(weights_only=True)``
        compatible form: weights, optimizer, counters and position in the epoch, RNG states,
        callback states. Take it under ``weights_lock.read()`` while training runs."""
        state = self._state
        rt = self._rt
        callbacks: dict[str, Any] = {}
        for key, cb in _callback_keys(self._callbacks):
            callbacks[key] = dict(cb.state_dict())
        return {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": {
                "epoch": state.epoch,
                "step": state.step,
                "batch_index": state.batch_index,
                "pass_done": rt.pass_done,
                "train_losses": [x.detach().float().cpu().reshape(()) for x in rt.train_losses],
                "stream": _stream_to_portable(self._train.stream_state()),
            },
            "metrics": {k: v for k, v in state.metrics.items() if _portable(v)},
            "rng": rng_to_portable(capture_rng()),
            "epoch_rng": None if rt.epoch_rng is None else rng_to_portable(rt.epoch_rng),
            "callbacks": callbacks,
        }

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (when idle)."""
        self._check_idle("load a checkpoint")
        if checkpoint.get("format") != 1:
            raise ValueError("not an aiolearner checkpoint (format 1)")
        state = self._state
        rt = self._rt
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        progress = checkpoint["progress"]
        state.epoch = int(progress["epoch"])
        state.step = int(progress["step"])
        state.batch_index = int(progress["batch_index"])
        rt.pass_done = bool(progress["pass_done"])
        rt.train_losses = [x.to(self._device) for x in progress["train_losses"]]
        state.metrics = dict(checkpoint.get("metrics", {}))
        restore_rng(rng_from_portable(checkpoint["rng"]))
        epoch_rng = checkpoint.get("epoch_rng")
        rt.epoch_rng = None if epoch_rng is None else rng_from_portable(epoch_rng)
        saved = checkpoint.get("callbacks", {})
        for key, cb in _callback_keys(self._callbacks):
            if key in saved:
                cb.load_state_dict(saved[key])
        # Iterators of an earlier run cannot continue a restored one; a stream that outlives
        # epochs (steps_per_epoch) restarts where the checkpoint's stream was.
        self._train.restart(_stream_from_portable(progress.get("stream")))

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Load a checkpoint file written from :meth:`state_dict` (``weights_only=True``)."""
        self.load_state_dict(self._read_checkpoint(Path(path)))

    def _read_checkpoint(self, path: Path) -> Any:
        return torch.load(path, map_location=self._device, weights_only=True)

    def _resume_from(self, resume: str | os.PathLike[str]) -> Any:
        return self._read_checkpoint(self._find_checkpoint(resume))

    def _find_checkpoint(self, resume: str | os.PathLike[str]) -> Path:
        if resume == "last":
            for cb in self._callbacks:
                finder = getattr(cb, "find_checkpoint", None)
                if finder is not None:
                    found = finder("last")
                    if found is not None:
                        return Path(found)
            raise FileNotFoundError(
                "resume='last' found no checkpoint: no callback (such as "
                "aiolearner.callbacks.Checkpoint) has written one yet"
            )
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint file at {path}")
        return path


def _verb(status: LearnerStatus) -> str:
    return {
        LearnerStatus.FITTING: "fit",
        LearnerStatus.VALIDATING: "validate",
        LearnerStatus.PREDICTING: "predict",
        LearnerStatus.IDLE: "idle",
    }[status]


def _stream_to_portable(stream: tuple[int, dict[str, Any] | None] | None) -> Any:
    if stream is None:
        return None
    origin, rng = stream
    return {"origin": origin, "rng": None if rng is None else rng_to_portable(rng)}


def _stream_from_portable(stream: Any) -> tuple[int, dict[str, Any] | None] | None:
    if stream is None:
        return None
    rng = stream["rng"]
    return int(stream["origin"]), None if rng is None else rng_from_portable(rng)


def _portable(value: object) -> bool:
    return isinstance(value, int | float | str | bool) or (
        isinstance(value, torch.Tensor) and value.numel() == 1
    )


def _callback_keys(callbacks: Sequence[Callback]) -> list[tuple[str, Callback]]:
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        n = seen.get(cb.name, 0)
        seen[cb.name] = n + 1
        out.append((cb.name if n == 0 else f"{cb.name}#{n}", cb))
    return out


def _resolve_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _build_tree(stages: Mapping[str, Stage] | FitRun | None) -> Stage:
    if isinstance(stages, FitRun):
        return stages
    root: Stage = FitRun()
    if stages is None:
        return root
    if not isinstance(stages, Mapping):
        raise TypeError("stages must be a mapping of stage name to Stage, or a FitRun")
    known = {s.name: s for s in root.walk()}
    for name, stage in stages.items():
        if not isinstance(stage, Stage):
            raise TypeError(f"stages[{name!r}] must be a Stage, got {type(stage).__name__}")
        if name not in known:
            raise ConfigurationError(
                f"stages: no stage named {name!r} in the default tree ({sorted(known)})"
            )
        if name == "fit_run":
            if not isinstance(stage, FitRun):
                raise TypeError("stages['fit_run'] must be a FitRun")
            root = stage
            known = {s.name: s for s in root.walk()}
            continue
        old = known[name]
        for parent in root.walk():
            for attr, value in list(vars(parent).items()):
                if value is old:
                    setattr(parent, attr, stage)
            parent.children = tuple(stage if c is old else c for c in parent.children)
        known = {s.name: s for s in root.walk()}
    return root


def _check_declarations(cb: Callback) -> None:
    for attr in ("reads", "writes"):
        value = getattr(cb, attr)
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigurationError(
                f"{attr!r} must be a set of field names, got {value!r}", callbacks=(cb.name,)
            )
    owned = sorted(set(cb.writes) & STAGE_OWNED)
    if owned:
        raise ConfigurationError(
            "counters and the run phase are written by stages only; a callback cannot declare"
            " them in 'writes'",
            callbacks=(cb.name,),
            field=owned[0],
        )
    clash = sorted((set(cb.reads) | set(cb.writes)) & VIEW_ATTRIBUTES)
    if clash:
        raise ConfigurationError(
            f"{clash[0]!r} is a name of the state view itself, not a field",
            callbacks=(cb.name,),
            field=clash[0],
        )
    for t in cb.after:
        if not (isinstance(t, type) and issubclass(t, Callback)):
            raise ConfigurationError(
                f"'after' must list Callback classes, got {t!r}", callbacks=(cb.name,)
            )


def _check_signature(cb: Callback, hook: str, method: Any) -> None:
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    params = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    extra_required = [
        p for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    if extra_required or not (len(params) == 1 or (not params and takes_varargs)):
        raise ConfigurationError(
            f"hook {hook!r} of {cb.name} must take exactly one argument (the state view), "
            f"its signature is {sig}",
            hook=hook,
            callbacks=(cb.name,),
        )


def _fusable(stage: Stage, *, root: bool) -> bool:
    """Whether a stage's whole call can run without the event loop (see _stages)."""
    for plan in (stage._before, stage._after):
        if plan is not None and plan.has_async:
            return False
    if isinstance(stage, ComputeStage):
        return type(stage).run is ComputeStage.run and type(stage).run_sync is ComputeStage.run_sync
    if type(stage).run is not Stage.run or type(stage).run_sync is not Stage.run_sync:
        return False
    if type(stage).__call__ is not Stage.__call__:
        return False
    return all(_fusable(child, root=False) for child in stage.children)
