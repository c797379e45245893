"""Stages: the async coroutines that make up the training logic, and the default tree.

::

    FitRun                 (learner.fit; hooks before_fit_run / after_fit_run: setup, teardown)
    └─ Epoch               (once per epoch)
       ├─ Fit              (one pass over the training data)
       │  └─ FitBatch      (one batch)
       │     ├─ Gradient   forward, loss, backward
       │     └─ Update     optimizer step, zero grad      (holds the weights' write lock)
       └─ Validate         (one pass over the validation data)
          └─ ValidateBatch
             └─ ValidateLoss   forward + loss under inference_mode

A stage's ``run`` awaits its sub-stages; calling a stage (``await stage(state)``) runs its
``before_`` hook, its ``run``, and its ``after_`` hook, and acts on the control-flow exceptions the
stage owns. Leaf stages that do blocking torch work subclass :class:`ComputeStage` and put that work
in a plain ``def compute``: the learner's compute policy then decides whether it runs on the event
loop or in the compute worker thread. A batch stage whose whole subtree is plain (default ``run``,
compute leaves, ``def`` hooks only) is *fused*: it runs as one synchronous call, on the loop or,
in thread mode, in the compute worker, several batches a hop (``_fused.py``). The base classes
are in ``_stage.py``.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import anyio
import torch

from . import _fused
from ._data import END, WAIT
from ._device import wait_ready
from ._exceptions import ControlFlow, SkipBatch, StopEpoch, StopFit
from ._runtime import snapshot_source
from ._stage import (
    ComputeStage,
    FlatProgram,
    Stage,
    batch_size,
    note_stage_error,
    split_batch,
)
from ._state import State

if TYPE_CHECKING:
    from ._data import Batches
    from ._runtime import Runtime

__all__ = [
    "ComputeStage",
    "Epoch",
    "Fit",
    "FitBatch",
    "FitRun",
    "Gradient",
    "Stage",
    "Update",
    "Validate",
    "ValidateBatch",
    "ValidateLoss",
    "batch_size",
    "note_stage_error",
    "split_batch",
]


class Gradient(ComputeStage):
    """Forward, loss and backward for ``state.batch``; sets ``state.output`` and ``state.loss``."""

    name = "gradient"

    def compute(self, state: State) -> None:
        inputs, targets = split_batch(state.batch, self.name)
        output = state.model(inputs)
        loss = state.loss_fn(output, targets)
        loss.backward()  # type: ignore[no-untyped-call]
        state.output = output
        state.loss = loss


class Update(ComputeStage):
    """Optimizer step and zero grad, then the batch is committed (``step`` advances with it)."""

    name = "update"
    writes_weights = True

    def compute(self, state: State) -> None:
        optimizer = state.optimizer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.runtime.commit(state)


class FitBatch(Stage):
    """One training batch: Gradient, then Update. Owns :class:`SkipBatch`.

    Pseudo-code, with hook order::

        before_fit_batch
          before_gradient; Gradient; after_gradient
          before_update;   Update;   after_update     (step += 1 with the update)
        after_fit_batch                               (not run when the batch was skipped)
    """

    name = "fit_batch"
    catches = (SkipBatch,)
    after_hook_when_caught = False

    def __init__(self, gradient: Stage | None = None, update: Stage | None = None) -> None:
        self.gradient = gradient if gradient is not None else Gradient()
        self.update = update if update is not None else Update()
        super().__init__(self.gradient, self.update)

    def acted(self, state: State, flow: ControlFlow) -> None:
        super().acted(state, flow)
        rt = self._rt
        if rt is not None and not rt.committed:
            # A skipped batch must leave nothing behind: its gradients would otherwise be added
            # to the next batch's and reach the weights with the next update.
            state.model.zero_grad(set_to_none=True)
            # Nor its loss in the pass's train_loss.
            state.invalidate("output", "loss")


class Fit(Stage):
    """One pass over the training data. Owns :class:`StopEpoch` (the pass ends early).

    Pseudo-code::

        before_fit
        for batch in train_data (prefetched, on the device, resuming mid-epoch if interrupted):
            state.batch = batch; FitBatch; clear batch/output/loss
            (validate_every=N steps or a timedelta: Validate, or a snapshot, when one is due;
             a concurrent validation's StopFit or error is raised here)
        metrics["train_loss"] = mean loss of the pass      (one host sync per epoch)
        after_fit
    """

    name = "fit"
    catches = (StopEpoch,)

    def __init__(self, fit_batch: Stage | None = None) -> None:
        self.fit_batch = fit_batch if fit_batch is not None else FitBatch()
        super().__init__(self.fit_batch)

    async def run(self, state: State) -> None:
        rt = self.runtime
        state.model.train()
        losses = rt.train_losses
        fit_batch = self.fit_batch
        atomic = rt.batch_is_atomic
        validator = rt.validator
        policy = rt.policy
        # A fused batch (default stages, def hooks only) that needs no hop is one plain call:
        # no coroutine per stage, no event-loop round trip. This is what Stage.__call__ and
        # Runtime.run_fused would do, minus ~2 us a batch (a tiny model's whole budget).
        fused = fit_batch._fused
        lock = rt.weights_lock if fit_batch._fused_writes else None
        flat = _fused.flat_program(fit_batch) if fused else None
        plain = flat is not None and _is_default_batch(fit_batch)
        clock = time.perf_counter
        # Thread mode, fused batches, no validation between batches: a burst of batches per hop.
        bursts = fused and validator is None
        after_burst: Any = None
        async with rt.open_train(state) as batches:
            take = batches.next_nowait
            while True:
                if after_burst is None:
                    batch = take()
                else:
                    batch, after_burst = after_burst, None
                if batch is WAIT:
                    batch = await batches.next()
                if batch is END:
                    break
                state.batch = batch
                rt.committed = False
                rng = None if atomic else rt.capture_rng()
                try:
                    if (
                        fused
                        and not policy.hopping
                        and (lock is None or lock.acquire_write_nowait())
                    ):
                        start = clock()
                        try:
                            if plain and not rt.observed:
                                _fused.run_default_batch(fit_batch, rt, state, losses)
                            else:
                                _fused.run_fused(fit_batch, rt, state, losses, plain, flat)
                        finally:
                            if lock is not None:
                                lock.release_write()
                            end = clock()
                            policy.observe(end - start, end)
                    elif bursts and policy.hopping:
                        after_burst = await self._burst(rt, state, batches, losses, plain, flat)
                    else:
                        await fit_batch(state)
                except StopEpoch as flow:
                    if not rt.committed:
                        # As for a skipped batch: its gradients must not leak into the next
                        # epoch's first update.
                        state.model.zero_grad(set_to_none=True)
                    rt.finish_batch(state, losses)
                    self.acted(state, flow)
                    break
                except BaseException:
                    rt.abandon_batch(state, rng)
                    raise
                rt.finish_batch(state, losses)
                if validator is not None:
                    # A validation due by steps or time; a concurrent one's StopFit or error.
                    await validator.between_batches(state)
                now = clock()
                if now - rt.last_yield >= rt.yield_every:
                    await rt.give_turn(now)
        if losses:
            with torch.no_grad():
                mean = torch.stack([x.detach() for x in losses]).mean()
            await wait_ready(mean)
            state.metrics["train_loss"] = float(mean)

    async def _burst(
        self,
        rt: Runtime,
        state: State,
        batches: Batches,
        losses: list[torch.Tensor],
        plain: bool,
        flat: FlatProgram | None,
    ) -> Any:
        """``state.batch`` and the batches after it, in one hop to the compute worker.

        A hop costs two wake-ups of a sleeping thread, ~0.3-0.7 ms on the development machine
        after a long batch (a CPU left idle wakes slowly), which is 3-7 % of a 10 ms batch. A
        burst goes on in the worker with the next batch while one is ready without the event
        loop, and hands back when the loop is needed: a batch to await, the end of the pass, a
        cancellation (after the batch in progress), a task waiting for the weights lock, auto's
        next decision, or ``_fused.BURST_SECONDS``. The loop stays free all along; each batch is
        finished exactly as on the loop. Returns what the loop takes next: ``None`` (take a batch),
        ``WAIT`` or ``END``.
        """
        fit_batch = self.fit_batch
        lock = rt.weights_lock if fit_batch._fused_writes else None
        if lock is not None and not lock.acquire_write_nowait():
            await lock.acquire_write()
        stop: list[bool] = []
        try:
            return await rt.hop(
                _fused.burst_sync,
                fit_batch,
                rt,
                state,
                batches,
                losses,
                plain,
                flat,
                lock,
                stop,
                timed=False,
                on_cancel=lambda: stop.append(True),
            )
        finally:
            if lock is not None:
                lock.release_write()
            batches.start_producer_if_slow()


def _is_default_batch(stage: Stage) -> bool:
    """Whether a flat batch stage is exactly the default FitBatch(Gradient(), Update())."""
    return (
        type(stage) is FitBatch
        and len(stage.children) == 2
        and type(stage.children[0]) is Gradient
        and type(stage.children[1]) is Update
    )


class ValidateLoss(ComputeStage):
    """Forward and loss under ``torch.inference_mode``; sets ``state.output``, ``state.loss``."""

    name = "validate_loss"

    def compute(self, state: State) -> None:
        inputs, targets = split_batch(state.batch, self.name)
        with torch.inference_mode():
            output = state.model(inputs)
            loss = state.loss_fn(output, targets)
        state.output = output
        state.loss = loss


class ValidateBatch(Stage):
    """One validation batch. Owns :class:`SkipBatch` (the batch is left out of the results)."""

    name = "validate_batch"
    catches = (SkipBatch,)
    after_hook_when_caught = False

    def __init__(self, validate_loss: Stage | None = None) -> None:
        self.validate_loss = validate_loss if validate_loss is not None else ValidateLoss()
        super().__init__(self.validate_loss)

    def acted(self, state: State, flow: ControlFlow) -> None:
        super().acted(state, flow)
        # Left out of the results even when the loss was already computed (a SkipBatch raised
        # in after_validate_loss): Validate counts only batches that still have a loss.
        state.invalidate("output", "loss")


class Validate(Stage):
    """One pass over the validation data, on fully updated weights. Owns :class:`StopEpoch`.

    Pseudo-code::

        before_validate
        with weights_lock.read(), model in eval mode:
            for batch in val_data: state.batch = batch; ValidateBatch; clear batch/output/loss
        state.validation = {"loss": sample-weighted mean loss}; validation_tag = (epoch, step)
        metrics["val_loss"] = validation["loss"]
        after_validate       (callbacks add their metrics to state.validation here)
    """

    name = "validate"
    catches = (StopEpoch,)

    def __init__(self, validate_batch: Stage | None = None) -> None:
        self.validate_batch = validate_batch if validate_batch is not None else ValidateBatch()
        super().__init__(self.validate_batch)

    async def run(self, state: State) -> None:
        rt = self.runtime
        model = state.model
        was_training = model.training
        validate_batch = self.validate_batch
        total: list[torch.Tensor] = []
        count = 0
        # A concurrent validation's snapshot is private: no lock (it would stall training).
        lock = rt.weights_lock if snapshot_source.get() is None else None
        if lock is not None:
            await lock.acquire_read()
        try:
            model.eval()
            async with rt.open_val(state) as batches:
                while True:
                    batch = await batches.next()
                    if batch is batches.END:
                        break
                    state.batch = batch
                    try:
                        await validate_batch(state)
                        loss = state.__dict__.get("loss")
                        if loss is not None:
                            n = batch_size(batch)
                            total.append(loss.detach() * n)
                            count += n
                    except StopEpoch as flow:
                        self.acted(state, flow)
                        break
                    finally:
                        state.invalidate("batch", "output", "loss")
                    now = time.perf_counter()
                    if now - rt.last_yield >= rt.yield_every:
                        await rt.give_turn(now)
        finally:
            model.train(was_training)
            if lock is not None:
                lock.release_read()
        results: dict[str, Any] = {}
        if count:
            summed = torch.stack(total).sum()
            await wait_ready(summed)
            results["loss"] = float(summed) / count
            state.metrics["val_loss"] = results["loss"]
        state.validation = results
        state.validation_tag = (state.epoch, state.step)
        if rt.observed:
            rt.publish("validation", self.name, state, dict(results))


class Epoch(Stage):
    """One epoch: the training pass, then validation. Owns :class:`StopEpoch` from its hooks.

    Pseudo-code::

        before_epoch
        Fit          (skipped when resuming an epoch whose training pass had finished)
        Validate     (when the learner has validation data; with validate="concurrent" a
                      snapshot of the weights is taken here and validated in the background)
        after_epoch
    """

    name = "epoch"
    catches = (StopEpoch,)

    def __init__(self, fit: Stage | None = None, validate: Stage | None = None) -> None:
        self.fit = fit if fit is not None else Fit()
        self.validate = validate if validate is not None else Validate()
        super().__init__(self.fit, self.validate)

    async def run(self, state: State) -> None:
        rt = self.runtime
        if not rt.pass_done:
            await self.fit(state)
            rt.pass_done = True
        if rt.has_val_data:
            validator = rt.validator
            if validator is None:
                await self.validate(state)
            else:
                # Concurrent: snapshot now, validate in the background; or another schedule.
                await validator.at_epoch_end(self.validate, state)


class FitRun(Stage):
    """The whole run of ``learner.fit(epochs)``. Owns :class:`StopFit`.

    Pseudo-code::

        before_fit_run                       (setup)
        while epoch < epochs:
            Epoch; epoch += 1
        (wait for concurrent validations still running, and their after_validate hooks)
        after_fit_run                        (teardown: always runs, see docs/errors.md;
                                              shielded with a time bound after an error or
                                              a cancellation; state.outcome says which)
    """

    name = "fit_run"
    catches = (StopFit,)

    def __init__(self, epoch: Stage | None = None) -> None:
        self.epoch = epoch if epoch is not None else Epoch()
        super().__init__(self.epoch)

    async def run(self, state: State) -> None:
        rt = self.runtime
        validator = rt.validator
        # Concurrent validations still running are awaited (their after_validate hooks too)
        # before after_fit_run, and cancelled if the run fails (see docs/concurrent-validation.md).
        async with contextlib.nullcontext() if validator is None else validator.session(state):
            while state.epoch < rt.target_epochs:
                await self.epoch(state)
                if rt.observed:
                    rt.publish("metrics", self.name, state, dict(state.metrics))
                rt.end_epoch(state)
                # A cancellation requested during the epoch (by a hook, say) lands here, at the
                # epoch boundary, however short epochs are and whatever the turn interval.
                await anyio.lowlevel.checkpoint_if_cancelled()

    async def __call__(self, state: State) -> None:
        rt = self.runtime
        observed = rt.observed
        start = rt.enter(self, state) if observed else 0.0
        outcome = "error"
        try:
            if self._before is not None:
                await self._before.run()
            await self.run(state)
            outcome = "completed"
        except StopFit as flow:
            self.acted(state, flow)
            if rt.pass_done:
                rt.end_epoch(state)
            outcome = "stopped"
        except ControlFlow as flow:
            # A SkipBatch outside a batch, a StopEpoch outside an epoch: nobody owns it.
            raise RuntimeError(
                f"{type(flow).__name__} was raised where no stage owns it (the stage that would "
                f"act on it is not running); reason: {flow.reason!r}"
            ) from flow
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        except Exception as exc:
            note_stage_error(exc, self.name, state)
            raise
        finally:
            state.outcome = outcome
            try:
                await self._teardown(state, outcome)
            finally:
                state.invalidate("outcome")
                if observed:
                    rt.exit(self, state, start)

    async def _teardown(self, state: State, outcome: str) -> None:
        after = self._after
        if after is None:
            return
        rt = self.runtime
        try:
            if outcome in ("completed", "stopped"):
                await after.run()
            else:
                with anyio.move_on_after(rt.teardown_timeout, shield=True) as scope:
                    await after.run()
                if scope.cancelled_caught:
                    rt.teardown_timed_out = True
        except ControlFlow:
            pass  # nothing is left to stop
