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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, ClassVar

import anyio
import torch

from ._device import wait_ready
from ._exceptions import ControlFlow, SkipBatch, StageError, StopEpoch, StopFit
from ._runtime import snapshot_source
from ._stage import ComputeStage, Stage, batch_size, owned, split_batch
from ._state import State

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
]


def forward(
    model: Callable[[Any], Any], loss_fn: Callable[[Any, Any], torch.Tensor], batch: Any, stage: str
) -> tuple[Any, torch.Tensor]:
    """``(output, loss)`` of the model on an ``(inputs, targets)`` batch (``stage`` names the
    caller in the error for a batch of another shape)."""
    inputs, targets = split_batch(batch, stage)
    output = model(inputs)
    return output, loss_fn(output, targets)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step, then the gradients are dropped (``zero_grad(set_to_none=True)``)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Gradient(ComputeStage):
    """Forward, loss and backward for ``state.batch``; sets ``state.output`` and ``state.loss``."""

    name = "gradient"
    fields: ClassVar[dict[str, str]] = {"output": "batch", "loss": "batch"}

    def compute(self, state: State) -> None:
        output, loss = forward(state.model, state.loss_fn, state.batch, self.name)
        loss.backward()  # type: ignore[no-untyped-call]
        state.output = output
        state.loss = loss


class Update(ComputeStage):
    """Optimizer step and zero grad, then the batch is committed (``step`` advances with it)."""

    name = "update"
    writes_weights = True

    def compute(self, state: State) -> None:
        optimizer_step(state.optimizer)
        self.context.commit(state)


class FitBatch(Stage):
    """One training batch: its sub-stages in order (default: Gradient, then Update).

    Owns :class:`SkipBatch`. Any number of sub-stages may run between the default two, e.g.
    ``FitBatch(Gradient(), GradNoise(1e-3), Update())``.

    Pseudo-code, with hook order::

        before_fit_batch
          before_gradient; Gradient; after_gradient
          before_update;   Update;   after_update     (step += 1 with the update)
        after_fit_batch                               (not run when the batch was skipped)

    Args:
        *stages: the sub-stages, run in order (default ``Gradient(), Update()``).
        gradient: with no ``stages``, the first sub-stage instead of :class:`Gradient`.
        update: with no ``stages``, the second sub-stage instead of :class:`Update`.
    """

    name = "fit_batch"
    catches = (SkipBatch,)
    after_hook_when_caught = False
    fields: ClassVar[dict[str, str]] = {"batch": "batch"}

    def __init__(
        self, *stages: Stage, gradient: Stage | None = None, update: Stage | None = None
    ) -> None:
        if stages and (gradient is not None or update is not None):
            raise TypeError("FitBatch takes its sub-stages positionally or as gradient=/update=")
        if not stages:
            stages = (
                gradient if gradient is not None else Gradient(),
                update if update is not None else Update(),
            )
        super().__init__(*stages)

    def _child(self, name: str) -> Stage:
        for child in self.children:
            if child.name == name:
                return child
        raise AttributeError(f"{type(self).__name__} has no sub-stage named {name!r}")

    @property
    def gradient(self) -> Stage:
        """The sub-stage named ``gradient``."""
        return self._child("gradient")

    @property
    def update(self) -> Stage:
        """The sub-stage named ``update``."""
        return self._child("update")

    def acted(self, state: State, flow: ControlFlow) -> None:
        super().acted(state, flow)
        context = self.context
        if not context.committed:
            # A skipped batch must leave nothing behind: its gradients would otherwise be added
            # to the next batch's and reach the weights with the next update; nor its loss in
            # the pass's train_loss. It is consumed all the same (not repeated on resume).
            state.model.zero_grad(set_to_none=True)
            state.invalidate("output", "loss")
            context.commit(state)


class Fit(Stage):
    """One pass over the training data. Owns :class:`StopEpoch` (the pass ends early).

    Pseudo-code::

        before_fit
        for batch in train_data (prefetched, on the device, resuming mid-epoch if interrupted):
            state.batch = batch; FitBatch; the batch's fields expire
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
        rt = self._built()
        state.model.train()
        async with rt.open_pass(state, "train") as batches:
            # Take a batch, run the batch stage's program, finish the batch; until the pass
            # ends (or a StopEpoch ends it: acted on here, as this stage owns it).
            await rt.executor.train_pass(self, state, batches)
        losses = rt.train_losses
        if losses:
            with torch.no_grad():
                mean = torch.stack([x.detach() for x in losses]).mean()
            await wait_ready(mean)
            state.metrics["train_loss"] = float(mean)


class ValidateLoss(ComputeStage):
    """Forward and loss under ``torch.inference_mode``; sets ``state.output``, ``state.loss``."""

    name = "validate_loss"
    fields: ClassVar[dict[str, str]] = {"output": "batch", "loss": "batch"}

    def compute(self, state: State) -> None:
        with torch.inference_mode():
            output, loss = forward(state.model, state.loss_fn, state.batch, self.name)
        state.output = output
        state.loss = loss


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
        with weights_lock.read(), model in eval mode:
            for batch in val_data: state.batch = batch; ValidateBatch; the batch's fields expire
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
        rt = self._built()
        model = state.model
        was_training = model.training
        validate_batch = self.validate_batch
        expire = rt.expiring["batch"]
        d = state.__dict__
        total: list[torch.Tensor] = []
        count = 0
        # A concurrent validation's snapshot is private: no lock (it would stall training).
        lock = rt.weights_lock if snapshot_source.get() is None else None
        if lock is not None:
            await lock.acquire_read()
        try:
            model.eval()
            async with rt.open_pass(state, "validation") as batches:
                while (batch := await batches.next()) is not batches.END:
                    state.batch = batch
                    try:
                        await validate_batch(state)
                        loss = d.get("loss")
                        if loss is not None:
                            n = batch_size(batch)
                            total.append(loss.detach() * n)
                            count += n
                    except BaseException as exc:
                        if not owned(self, state, exc):
                            raise
                        break
                    finally:
                        state.invalidate(*expire)
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
        rt = self._built()
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
                if rt.pass_done:
                    rt.end_epoch(state)
                outcome = "stopped"
            elif isinstance(exc, anyio.get_cancelled_exc_class()):
                outcome = "cancelled"
                raise
            elif isinstance(exc, ControlFlow):
                # A SkipBatch outside a batch, a StopEpoch outside an epoch: nobody owns it.
                raise StageError(
                    f"{type(exc).__name__} was raised where no stage owns it (the stage that "
                    f"would act on it is not running); reason: {exc.reason!r}",
                    stage=self.name,
                ) from exc
            else:
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
        rt = self._built()
        try:
            # Shielded and bounded whatever the outcome: a cancellation that arrives while the
            # final checkpoint is written (a caller's timeout, Ctrl-C right at the end of a
            # completed run) must not lose it, and a teardown that hangs must not hold the
            # caller past teardown_timeout. The cancellation is delivered once it is done.
            with anyio.move_on_after(rt.teardown_timeout, shield=True) as scope:
                await after.run()
            if scope.cancelled_caught:
                rt.teardown_timed_out = True
        except ControlFlow:
            pass  # nothing is left to stop
