"""The training branch of the default tree, and the one definition of the default step.

``Fit`` (a pass over the training data) > ``FitBatch`` (one batch) > ``Gradient``, ``Update``.
:func:`forward` and :func:`optimizer_step` are the default step itself: ``Gradient``,
``Update``, ``ValidateLoss`` (``_stages.py``) and the executor's compiled default batch call them,
so the step has one definition. Re-exported by ``_stages.py``, the home of the whole tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import torch

from ._device import wait_ready
from ._exceptions import ControlFlow, SkipBatch, StopEpoch, StopFit
from ._plan import HookPlan, stronger
from ._stage import ComputeStage, Stage, split_batch
from ._state import State

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = [
    "Fit",
    "FitBatch",
    "Gradient",
    "Update",
    "forward",
    "note_loss_problem",
    "optimizer_step",
]


def forward(
    model: Callable[[Any], Any], loss_fn: Callable[[Any, Any], torch.Tensor], batch: Any, stage: str
) -> tuple[Any, torch.Tensor]:
    """``(output, loss)`` of the model on an ``(inputs, targets)`` batch (``stage`` names the
    caller in the error for a batch of another shape)."""
    kind = type(batch)
    if (kind is tuple or kind is list) and len(batch) == 2:
        inputs, targets = batch  # the common case, without a call (run once a batch)
    else:
        inputs, targets = split_batch(batch, stage)
    output = model(inputs)
    return output, loss_fn(output, targets)


def note_loss_problem(exc: BaseException, loss: object, model: torch.nn.Module) -> None:
    """On an error from ``loss.backward()``: a note saying what is wrong with the loss when it
    is the cause (torch's own message does not name ``loss_fn``). Only on the error path."""
    if not isinstance(exc, AttributeError | RuntimeError):
        return
    if not isinstance(loss, torch.Tensor):
        problem = (
            f"loss_fn returned a {type(loss).__name__}, not a tensor: it must return a scalar "
            "tensor computed from the model's output (did it call .item() or float()?)"
        )
    elif loss.numel() != 1:
        problem = (
            f"loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar: reduce it "
            "(a mean or a sum; for torch's losses, reduction='mean')"
        )
    elif not loss.requires_grad:
        trainable = any(p.requires_grad for p in model.parameters())
        problem = "the loss does not depend on any trainable parameter: " + (
            "loss_fn's result is cut off from the model's output (made with .detach(), "
            ".item(), .data, or as a new tensor)"
            if trainable
            else "none of the model's parameters requires grad (a frozen model, or one "
            "without parameters)"
        )
    else:
        return
    exc.add_note(f"aiolearner: {problem}")


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step, then the gradients are dropped (``zero_grad(set_to_none=True)``)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Gradient(ComputeStage):
    """Forward, loss and backward for ``state.batch``; sets ``state.output`` and ``state.loss``."""

    name = "gradient"
    fields: ClassVar[dict[str, str]] = {"output": "batch", "loss": "batch"}

    def compute(self, state: State) -> None:
        # train_model: the model, or under a strategy its wrapper (which all-reduces gradients).
        output, loss = forward(state.train_model, state.loss_fn, state.batch, self.name)
        try:
            loss.backward()  # type: ignore[no-untyped-call]
        except BaseException as exc:
            note_loss_problem(exc, loss, state.model)
            raise
        state.output = output
        state.loss = loss


class Update(ComputeStage):
    """Optimizer step and zero grad, then the batch is committed (``step`` advances with it).

    Args:
        optimizer: the name of the optimizer it steps (``state.optimizers[optimizer]``), for a
            learner with several; default: the first (``state.optimizer``). A named one is
            the stage ``update_<optimizer>``, so two of them fit in one batch and callbacks
            given ``optimizer="d"`` find their hooks (``before_update_d``, ``after_update_d``).
        commit: commit the batch with this update. In a batch that steps several optimizers,
            commit with the last one only (``commit=False`` on the others), so an interrupted
            batch counts as done only once all its updates are.

    Example:
        >>> FitBatch(DiscriminatorGradient(), Update("d", commit=False),
        ...          GeneratorGradient(), Update("g"))
    """

    name = "update"
    writes_weights = True

    def __init__(self, optimizer: str | None = None, *, commit: bool = True) -> None:
        super().__init__()
        if optimizer is not None and not (isinstance(optimizer, str) and optimizer):
            raise TypeError(f"optimizer must be an optimizer's name, got {optimizer!r}")
        self.optimizer = optimizer
        self.commit = commit
        if optimizer is not None:
            # An instance's name (as Parallel's): the stage and its hooks are per optimizer.
            self.__dict__["name"] = f"{type(self).name}_{optimizer}"

    def compute(self, state: State) -> None:
        name = self.optimizer
        optimizer_step(state.optimizer if name is None else state.optimizers[name])
        if self.commit:
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
        strategy = self._built().strategy
        if strategy is not None and not context.committed:
            # Skipped on this rank only: the other ranks' gradient all-reduce needs this rank's
            # part (zeros), and every rank must apply the same update (see _dist/_strategy.py).
            strategy._skipped_batch(self, state)
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
        # Resumed in an after_fit that callbacks had begun: the metrics are as they left them
        # (a callback may have written train_loss over the pass's own).
        begun = rt.hook_progress.get(self.hook_names[1])
        if begun is None or not begun[1] or begun[0][:2] != (state.epoch, state.step):
            await record_train_loss(rt, state)


async def record_train_loss(rt: Runtime, state: State) -> None:
    """``metrics["train_loss"]``: the mean of the pass's kept losses (one host sync)."""
    losses = rt.train_losses
    before = state.metrics.get("train_loss")
    if rt.strategy is not None:
        # The mean over every rank's batches (one reduction; every rank, even without any).
        await rt.strategy._reduce_train_loss(state, losses)
    elif losses:
        with torch.no_grad():
            mean = torch.stack(losses).mean()  # detached as they were kept
        await wait_ready(mean)
        state.metrics["train_loss"] = float(mean)
    if rt.observed and state.metrics.get("train_loss") is not before:  # (a pass with a loss)
        state._record_write("metrics.train_loss", "fit")


async def record_interrupted(
    stage: Stage, state: State, exc: BaseException, committed: bool
) -> BaseException:
    """A committed batch interrupted before its ``after_fit_batch`` (a stop or a cancellation
    in ``after_update``, say) is recorded all the same: every batch counted is seen by that
    hook (the epoch's training metrics count it), as every epoch counted is by ``after_epoch``.
    Not after an error (the run fails there), nor when the hook itself was interrupted (some of
    its callbacks may have seen the batch already). Shielded (a cancellation has come) and
    bounded by ``teardown_timeout``, as the teardown is: a hook that hangs there is abandoned.

    Returns what to raise: ``exc``, or the stronger control flow the hook raised (a StopFit
    over a StopEpoch). Under a cancellation a StopFit of the hook is kept for the next fit,
    which ends there as the uninterrupted run did (``Runtime.unseen_stop``)."""
    after = stage._after
    if after is None or not committed:
        return exc
    cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
    if isinstance(exc, ControlFlow):
        if exc.raised_in is not None and exc.raised_in[1] == after.hook:
            return exc
    elif not cancelled or _raised_in(exc, after):
        return exc
    rt = stage._built()
    with anyio.move_on_after(rt.teardown_timeout, shield=True):
        try:
            await after.run()
        except ControlFlow as flow:
            if isinstance(exc, ControlFlow):
                return stronger(exc, flow)
            if isinstance(flow, StopFit) and rt.strategy is None:
                rt.unseen_stop = flow.reason or type(flow).__name__
    return exc


def _raised_in(exc: BaseException, plan: HookPlan) -> bool:
    """Whether ``exc`` came through ``plan``'s run (its traceback goes through that frame)."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is HookPlan.run.__code__ and frame.f_locals.get("self") is plan:
            return True
        tb = tb.tb_next
    return False
