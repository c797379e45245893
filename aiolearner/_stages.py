"""The default stage tree, and the helpers its steps share with the batch executor.

::

    FitRun                 (learner.fit; hooks before_fit_run / after_fit_run: setup, teardown)
    └─ Epoch               (once per epoch)
       ├─ Fit              (one pass over the training data)
       │  └─ FitBatch      (one batch; any number of sub-stages)
       │     ├─ Gradient   forward, loss, backward
       │     └─ Update     optimizer step, zero grad, commit   (holds the weights' write lock)
       └─ Validate         (one pass over the validation data)
          └─ ValidateBatch
             └─ ValidateLoss   forward + loss under inference_mode

A stage's ``run`` awaits its sub-stages; calling a stage runs its hooks around ``run`` and acts on
the control flow it owns (``_stage.py``). Leaf stages that do blocking torch work subclass
:class:`ComputeStage` and put that work in a plain ``def compute``. Every batch runs through the
batch executor (``_executor.py``), which compiles each batch stage once, when the learner is
built: a batch that needs no event loop runs as one synchronous call, inline or in the compute
worker; the others are awaited. :func:`forward` and :func:`optimizer_step` are the one definition
of the default step: ``Gradient``, ``Update`` and the executor's compiled default batch call them.

The training branch (``Fit``, ``FitBatch``, ``Gradient``, ``Update``) and the step helpers live in
``_train_stages.py`` and are re-exported here; this module holds the validation branch, the
epoch with its tail, and the run with its teardown.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import torch

from ._data import END, WAIT
from ._device import wait_ready
from ._exceptions import ControlFlow, SkipBatch, StopEpoch, StopFit
from ._rng import capture_data_streams, capture_rng, restore_data_streams, restore_rng
from ._runtime import current_set, join_lane, on_snapshot
from ._stage import (
    ComputeStage,
    Stage,
    batch_size,
    note_stage_error,
    owned,
    unowned,
    validating,
)
from ._state import State
from ._train_stages import Fit, FitBatch, Gradient, Update, forward, optimizer_step

if TYPE_CHECKING:
    from ._data import BatchSource
    from ._plan import HookPlan
    from ._runtime import Runtime

__all__ = [
    "Epoch",
    "Fit",
    "FitBatch",
    "FitRun",
    "Gradient",
    "Update",
    "Validate",
    "ValidateBatch",
    "ValidateLoss",
    "forward",
    "optimizer_step",
    "validate_record",
]


class ValidateLoss(ComputeStage):
    """Forward and loss under ``torch.inference_mode``; sets ``state.output``, ``state.loss``.

    A subclass's own ``compute`` runs under ``inference_mode`` too (as Lightning's
    ``validation_step`` runs without gradients): validation builds no autograd graph. One
    that needs gradients (an adversarial evaluation with ``torch.enable_grad()``), or that
    creates tensors it keeps for training (a model made on first use), sets the class
    attribute ``inference_mode = False`` and manages it itself.
    """

    name = "validate_loss"
    fields: ClassVar[dict[str, str]] = {"output": "batch", "loss": "batch"}
    #: Whether a subclass's own ``compute`` is called under ``torch.inference_mode``.
    inference_mode: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("compute")
        if own is None or getattr(own, "_in_inference_mode", False):
            return

        @functools.wraps(own)
        def compute(self: ValidateLoss, state: State) -> None:
            if not self.inference_mode:
                own(self, state)
                return
            with torch.inference_mode():
                own(self, state)

        compute._in_inference_mode = True  # type: ignore[attr-defined]
        cls.compute = compute  # type: ignore[method-assign]

    def compute(self, state: State) -> None:
        with torch.inference_mode():
            output, loss = forward(state.model, state.loss_fn, state.batch, self.name)
        state.output = output
        state.loss = loss


def _streams_from_start(rt: Runtime, name: str | None, source: BatchSource) -> None:
    """A training run's validation set about to be gone over: its own random streams (a
    loader's ``generator``, which draws the pass's order) are kept as they are now, or, when
    the validation runs again after an interruption (a cancellation in it, a resumed
    checkpoint), put back where they were when it first began."""
    kept = rt.val_begun.get(name)
    if kept is None:
        rt.val_begun[name] = capture_data_streams(source.data)
    else:
        restore_data_streams(source.data, kept, what=source.name)


def _not_a_loss(loss: Any) -> None:
    """A validation batch's ``loss`` the pass cannot average (a subclass of Tensor is fine)."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return
    shape = (
        f"a tensor of shape {tuple(loss.shape)}"
        if isinstance(loss, torch.Tensor)
        else (f"a {type(loss).__name__}")
    )
    raise ValueError(
        f"the validation batch's loss is {shape}, not a scalar tensor: the pass averages one "
        "loss per batch, weighted by its size; loss_fn must return the batch's mean loss as a "
        "tensor (for torch's losses, reduction='mean'; not .item())"
    )


class ValidateBatch(Stage):
    """One validation batch. Owns :class:`SkipBatch` (the batch is left out of the results)."""

    name = "validate_batch"
    catches = (SkipBatch,)
    after_hook_when_caught = False
    fields: ClassVar[dict[str, str]] = {"batch": "batch"}

    def __init__(self, *stages: Stage, validate_loss: Stage | None = None) -> None:
        if stages and validate_loss is not None:
            raise TypeError("ValidateBatch takes its sub-stages positionally or validate_loss=")
        if not stages:
            stages = (validate_loss if validate_loss is not None else ValidateLoss(),)
        super().__init__(*stages)

    @property
    def validate_loss(self) -> Stage:
        """The first sub-stage (the one that computes the loss)."""
        return self.children[0]

    def acted(self, state: State, flow: ControlFlow) -> None:
        super().acted(state, flow)
        # Left out of the results even when the loss was already computed (a SkipBatch raised
        # in after_validate_loss): Validate counts only batches that still have a loss.
        state.invalidate("output", "loss")


class Validate(Stage):
    """One pass over the validation data, on fully updated weights. Owns :class:`StopEpoch`.

    Pseudo-code::

        before_validate
        with weights_lock.read(), model in eval mode, training's random streams put back after:
            for each validation set (one, or each value of a val_data mapping, in order):
                state.validation_set = its name (None for a single val_data)
                for batch in the set: state.batch = batch; ValidateBatch; the batch's fields expire
        state.validation = {"loss": sample-weighted mean loss}   ("<set>_loss" for each named set)
        validation_tag = (epoch, step); metrics["val_" + key] = validation[key]
                                        ("test_" + key while learner.test() runs)
        after_validate       (callbacks add their metrics to state.validation here)

    On a concurrent validation's snapshot the pass takes no lock (the snapshot is private) and
    leaves the random streams alone (training draws from them meanwhile; the data's iterators
    were created when the snapshot was taken).
    """

    name = "validate"
    catches = (StopEpoch,)

    def __init__(self, validate_batch: Stage | None = None) -> None:
        self.validate_batch = validate_batch if validate_batch is not None else ValidateBatch()
        super().__init__(self.validate_batch)

    async def run(self, state: State) -> None:
        rt = self._built()
        model = state.model
        was_training = model.training
        validate_batch = self.validate_batch
        rt.executor.program(validate_batch)  # compiled again if patched since (see _executor)
        expire = rt.expiring["batch"]
        d = state.__dict__
        sets = rt.validation_sets()
        sums: dict[str | None, tuple[list[torch.Tensor], int]] = {}
        snapshot = on_snapshot.get()
        # A concurrent validation's snapshot is private: no lock (it would stall training).
        lock = None if snapshot else rt.weights_lock
        # Validation never moves training's random streams (a shuffling DataLoader draws its
        # order when its iterator is created): they are put back however the pass ends, so an
        # interrupted run is resumed from the state validation started from.
        rng = None if snapshot else capture_rng()
        if lock is not None:
            await lock.acquire_read()
        strategy = rt.strategy
        # Computing inline while other learners share the loop, the pass takes the loop's
        # thread in turns as training does (see _worker.Turn); a concurrent validation computes
        # in a lane of its own.
        turn = None if snapshot or validate_batch._program is None else rt.worker.turn()
        taking = rt.executor.taking_turns(turn)
        try:
            model.eval()
            if strategy is not None:
                strategy._begin_validation(model)  # FSDP gathers the weights for the pass
            for name in sets:
                total: list[torch.Tensor] = []
                count = 0
                token = current_set.set(name)
                state.validation_set = name
                stopped = False
                where: list[Any] = [name, 0]  # the set, and the index of its current batch
                noted = validating.set(where)
                if not snapshot and d.get("phase") == "fit":
                    _streams_from_start(rt, name, sets[name])
                try:
                    async with rt.open_pass(state, "validation") as batches:
                        while True:
                            batch = batches.next_nowait()
                            if batch is WAIT:
                                if turn is not None:
                                    turn.give()
                                batch = await batches.next()
                            if batch is END:
                                break
                            state.batch = batch
                            if taking and not turn.held:  # type: ignore[union-attr]
                                await rt.take_turn(turn)  # type: ignore[arg-type]
                            try:
                                await validate_batch(state)
                                loss = d.get("loss")
                                if loss is not None:
                                    if type(loss) is not torch.Tensor or loss.numel() != 1:
                                        _not_a_loss(loss)
                                    n = batch_size(batch)
                                    total.append(loss.detach() * n)
                                    count += n
                            except BaseException as exc:
                                if not owned(self, state, exc):
                                    raise
                                stopped = True
                                break
                            finally:
                                state.invalidate(*expire)
                                where[1] += 1
                            now = time.perf_counter()
                            if now - rt.last_yield >= rt.yield_every:
                                await rt.give_turn(now, turn)
                                taking = rt.executor.taking_turns(turn)
                except Exception as exc:
                    # Noted here, while the set and its batch are known (a failed fetch).
                    note_stage_error(exc, self.name, state)
                    raise
                finally:
                    if turn is not None:
                        turn.give()
                    current_set.reset(token)
                    validating.reset(noted)
                sums[name] = (total, count)
                if stopped:
                    break
            if snapshot:
                # Where the sets' own streams are once this pass is over (the next validation
                # draws from there): what a checkpoint taken in the tail gives them.
                object.__setattr__(
                    state,
                    "_val_streams",
                    {n: capture_data_streams(s.data) for n, s in rt.val_sets.items()},
                )
            else:
                rt.val_begun.clear()  # (the pass is over: the next begins where this one left)
        finally:
            state.invalidate("validation_set")
            model.train(was_training)
            if strategy is not None:
                strategy._end_validation(model)
            if lock is not None:
                lock.release_read()
            if rng is not None:
                restore_rng(rng)
        if snapshot:
            # On CUDA the pass ran on a stream of its own: what reads its results from here
            # (the sums below, after_validate callbacks) goes after it.
            join_lane()
        results: dict[str, Any] = {}
        prefix = "test_" if d.get("phase") == "test" else "val_"
        for name, (total, count) in sums.items():
            key = "loss" if name is None else f"{name}_loss"
            if strategy is not None:
                # Sums over every rank's shard (one reduction; every rank, even with an empty
                # one). A strategy validates one set (it refuses several).
                part: dict[str, Any] = {}
                count = await strategy._reduce_validation(total, count, part)
                if count:
                    results[key] = part["loss"]
                    state.metrics[prefix + key] = results[key]
            elif count:
                summed = torch.stack(total).sum()
                await wait_ready(summed)
                results[key] = float(summed) / count
                state.metrics[prefix + key] = results[key]
        state.validation = results
        state.validation_tag = (state.epoch, state.step)
        if rt.observed:
            for key in results:
                state._record_write(f"metrics.{prefix}{key}", self.name)
            rt.publish("validation", self.name, state, dict(results))


async def validate_record(validate: Stage, state: State) -> StopFit | None:
    """Run a validation (the ``validate`` stage) on the training state, resumably.

    If an earlier attempt's pass finished and its ``after_validate`` was interrupted (an error,
    a cancellation), the pass is not run again: that hook runs alone, on the results the pass
    left in the state, and the callbacks that had finished it are not called again (the hook is
    tracked, see ``HookPlan.run``). Returns a StopFit raised by ``after_validate``: the
    validation is over, the caller acts on it when its record is complete.
    """
    rt = validate._built()
    d = state.__dict__
    if rt.val_after:
        after = validate._after
        try:
            if after is not None:
                await after.run()
        except StopFit as stop:
            rt.val_after = False
            return stop
        except BaseException as exc:
            if not owned(validate, state, exc):
                raise
        rt.val_after = False
        return None
    before = d.get("validation")
    try:
        await validate(state)
    except StopFit as stop:
        if d.get("validation") is not before:
            return stop  # from after_validate: the pass had finished
        raise
    except BaseException:
        if d.get("validation") is not before:
            rt.val_after = True  # the pass finished; its after_validate did not
        raise
    return None


class Epoch(Stage):
    """One epoch: the training pass, then its *tail*: validation and ``after_epoch``.

    Owns :class:`StopEpoch` from its hooks.

    Pseudo-code::

        before_epoch
        Fit          (skipped when resuming an epoch whose training pass had finished)
        Validate     (when the learner has validation data and validates once per epoch;
                      skipped when resuming an epoch whose validation had finished)
        after_epoch  (also after a StopFit from after_validate: every finished epoch is
                      recorded; the StopFit then ends the run)

    With ``validate="concurrent"`` the tail is handed to the background: a snapshot of the
    weights and of the epoch's record is taken where Validate would run, the next epoch starts
    training, and Validate then ``after_epoch`` run on the snapshot (see
    docs/concurrent-validation.md). Each epoch's ``metrics`` event is published after its
    ``after_epoch``.
    """

    name = "epoch"
    catches = (StopEpoch,)

    def __init__(self, fit: Stage | None = None, validate: Stage | None = None) -> None:
        self.fit = fit if fit is not None else Fit()
        self.validate = validate if validate is not None else Validate()
        super().__init__(self.fit, self.validate)

    async def run(self, state: State) -> None:
        rt = self._built()
        if not rt.pass_done:
            try:
                await self.fit(state)
            except StopFit as flow:
                if flow.raised_in is not None and flow.raised_in[1] == self.fit.hook_names[1]:
                    # From after_fit, which every callback finished: the pass is done, and
                    # the run continued later goes on with the epoch's validation.
                    rt.pass_done = True
                raise
            rt.pass_done = True
        if rt.has_val_data and rt.validator is None and not rt.val_done:
            stop = await validate_record(self.validate, state)
            rt.val_done = True
            if stop is not None:
                # From after_validate: the epoch's record is complete, so after_epoch still
                # runs (see __call__); the StopFit ends the run after it, also when the run
                # is interrupted in after_epoch and resumed (kept in checkpoints).
                rt.stop_after_epoch = stop
                raise stop

    async def __call__(self, state: State) -> None:
        """Like :meth:`Stage.__call__`, with the epoch's tail: see the class docstring."""
        rt = self._built()
        observed = rt.observed
        start = rt.enter(self, state) if observed else 0.0
        stop: StopFit | None = None
        try:
            ran = True
            try:
                if self._before is not None:
                    await self._before.run()
                await self.run(state)
            except StopFit as exc:
                if not rt.val_done:
                    raise
                stop = exc
            except BaseException as exc:
                if not owned(self, state, exc):
                    raise
                ran = False  # a StopEpoch from before_epoch: no pass, no validation
            else:
                # Resumed after after_validate had asked to stop: after_epoch, then the stop.
                stop = rt.stop_after_epoch
            validator = rt.validator
            handed = False
            if validator is not None and validator.concurrent:
                # The tail (or after_epoch alone, behind the tails in flight) may go to the
                # background; a stop request that arrived meanwhile ends the run after it.
                handed, late = await validator.at_epoch_end(self, state, validate=ran)
                stop = stop or late
            if not handed:
                try:
                    await self.finish(state, self._after)
                except StopFit:
                    rt.epoch_recorded = True  # every after_epoch callback ran
                    raise
            rt.epoch_recorded = True
        finally:
            if observed:
                rt.exit(self, state, start)
        if stop is not None:
            raise stop

    async def finish(self, state: State, after: HookPlan | None) -> None:
        """``after_epoch`` (``after``: the hook's plan on ``state``, the training state or the
        state a concurrent tail runs on) and the epoch's ``metrics`` event."""
        if after is not None:
            try:
                await after.run()
            except BaseException as exc:
                if not owned(self, state, exc):
                    raise
        rt = self._built()
        if rt.observed:
            rt.publish("metrics", self.name, state, dict(state.metrics))


class FitRun(Stage):
    """The whole run of ``learner.fit(epochs)``. Owns :class:`StopFit`.

    Pseudo-code::

        before_fit_run                       (setup)
        while epoch < epochs:
            Epoch; epoch += 1
        (wait for concurrent validations still running, and their after_validate hooks)
        after_fit_run                        (teardown: always runs, see docs/errors.md;
                                              shielded from cancellation, bounded by
                                              teardown_timeout; state.outcome says how the
                                              run ended)

    Unlike other stages its ``after_`` hook always runs (it is the teardown), so it is called
    with its own ``__call__``; control flow nobody owned ends here as a :class:`StageError`.
    """

    name = "fit_run"
    catches = (StopFit,)

    def __init__(self, epoch: Stage | None = None) -> None:
        self.epoch = epoch if epoch is not None else Epoch()
        super().__init__(self.epoch)

    async def run(self, state: State) -> None:
        rt = self._built()
        if rt.unseen_stop is not None:
            # The last run had stopped when its caller was cancelled: this one ends as it did.
            reason, rt.unseen_stop = rt.unseen_stop, None
            raise StopFit(reason)
        validator = rt.validator
        # Concurrent validations still running are awaited (their after_validate hooks too)
        # before after_fit_run, and cancelled if the run fails (see docs/concurrent-validation.md).
        async with contextlib.nullcontext() if validator is None else validator.session(state):
            while state.epoch < rt.target_epochs:
                await self.epoch(state)
                rt.end_epoch(state)
                # A cancellation requested during the epoch (by a hook, say) lands here, at the
                # epoch boundary, however short epochs are and whatever the turn interval.
                await anyio.lowlevel.checkpoint_if_cancelled()

    async def __call__(self, state: State) -> None:
        rt = self._built()
        observed = rt.observed
        start = rt.enter(self, state) if observed else 0.0
        outcome = "error"
        try:
            if self._before is not None:
                await self._before.run()
            await self.run(state)
            outcome = "completed"
        except BaseException as exc:
            if owned(self, state, exc):
                if rt.pass_done and rt.epoch_recorded:
                    # Stopped once the epoch was recorded; one stopped before (in after_fit,
                    # in validation) is finished by the next fit: validation, after_epoch.
                    rt.end_epoch(state)
                outcome = "stopped"
            elif isinstance(exc, anyio.get_cancelled_exc_class()):
                outcome = "cancelled"
                raise
            elif isinstance(exc, ControlFlow):
                # A SkipBatch outside a batch, a StopEpoch outside an epoch: nobody owns it.
                raise unowned(exc, self.name) from exc
            else:
                raise
        finally:
            state.outcome = outcome
            rt.last_outcome = outcome
            try:
                await self._teardown(state, outcome)
            finally:
                state.invalidate("outcome")
                if observed:
                    rt.exit(self, state, start)
        # The run ended normally: a cancellation that came during the (shielded) teardown is
        # delivered here, so the caller sees it whatever the backend and the compute policy.
        await anyio.lowlevel.checkpoint_if_cancelled()

    async def _teardown(self, state: State, outcome: str) -> None:
        after = self._after
        if after is None:
            return
        rt = self._built()
        try:
            # Shielded and bounded whatever the outcome: a cancellation that arrives while the
            # final checkpoint is written (a caller's timeout, Ctrl-C right at the end of a
            # completed run) must not lose it, and a teardown that hangs must not hold the
            # caller past teardown_timeout. The cancellation is delivered once it is done.
            cut = await after.run_within(rt.teardown_timeout)
            if cut:
                rt.teardown_timed_out = True
                message = (
                    f"after_fit_run did not finish within teardown_timeout={rt.teardown_timeout}"
                    f" s: the hook of {', '.join(cut)} was cut off unfinished (what it had left"
                    " to do is lost: a Checkpoint's final save, and the files of its last save"
                    " point stay); raise teardown_timeout, or find what hangs there"
                )
                if rt.observed:
                    rt.publish("log", self.name, state, {"message": message})
                warnings.warn(message, UserWarning, stacklevel=2)
        except StopFit as flow:
            self.acted(state, flow)  # its owner's own after_ hook: nothing is left to stop
        except ControlFlow as flow:
            raise unowned(flow, self.name) from flow  # no batch or epoch is running
