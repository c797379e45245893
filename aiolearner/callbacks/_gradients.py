"""Gradient accumulation over micro-batches (a Fit stage) and gradient clipping (a callback).

Accumulation changes which batches end in an optimizer step, so it is a stage, not a callback:
a callback cannot keep the Update stage from running. :class:`AccumulateGradients` replaces the
``fit`` stage with one whose batches run Gradient on every micro-batch and Update on every n-th,
after dividing the summed gradients by the number of micro-batches. The loss itself is left
alone, so ``train_loss`` and loss metrics keep their meaning.

Both take the optimizer they apply to, for a learner with several (``optimizer="d"``; default:
the first): accumulation then gates ``Update(optimizer="d")`` and scales that optimizer's
gradients; clipping clips that optimizer's gradients in ``before_update_d``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

from aiolearner import Callback, Fit, FitBatch, Stage, State, StateView, Update

from ._per_optimizer import OptimizerCallback

__all__ = ["AccumulateGradients", "GradientClipping", "GroupGradients"]


def _stepped(state: State, update: Stage, default: str | None) -> torch.optim.Optimizer:
    """The optimizer an update stage steps: an Update's own, otherwise ``default``'s."""
    name = update.optimizer if isinstance(update, Update) else default
    return state.optimizer if name is None else state.optimizers[name]


def _scale_gradients(optimizer: torch.optim.Optimizer, factor: float) -> None:
    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    if grads and factor != 1.0:
        with torch.no_grad():
            torch._foreach_mul_(grads, factor)


class _AccumulatingFitBatch(FitBatch):
    """A FitBatch that runs Update only on every n-th micro-batch of the epoch."""

    fusable = True  # run awaits only its sub-stages: the batch can run without the event loop

    def __init__(
        self,
        every: int,
        gradient: Stage | None = None,
        update: Stage | None = None,
        optimizer: str | None = None,
    ):
        if update is None and optimizer is not None:
            update = Update(optimizer)
        super().__init__(gradient=gradient, update=update)
        self.every = every
        self.optimizer = optimizer
        # By reference, not by name: an update stage for a named optimizer is 'update_<name>'
        # (replacing a stage in the tree replaces these attributes too).
        self.gradient_stage, self.update_stage = self.children

    def stepped(self, state: State) -> torch.optim.Optimizer:
        """The optimizer its update stage steps."""
        return _stepped(state, self.update_stage, self.optimizer)

    async def run(self, state: State) -> None:
        # batch_index counts the epoch's batches done so far (also after a mid-epoch resume),
        # so groups stay aligned with the epoch whatever interrupted it.
        if (state.batch_index + 1) % self.every == 0:
            await self.gradient_stage(state)
        else:
            # Under a distributed strategy the group's gradients are all-reduced once, with its
            # last micro-batch (a no-op in one process).
            with self.context.no_sync():
                await self.gradient_stage(state)
        if (state.batch_index + 1) % self.every == 0:
            _scale_gradients(self.stepped(state), 1.0 / self.every)
            await self.update_stage(state)
        else:
            # The micro-batch is done once its gradients are in .grad: commit it now, so the
            # counters in after_fit_batch read as after an update, and so an interruption from
            # here on neither repeats it nor clears the group's gradients.
            self.context.commit(state)


class AccumulateGradients(Fit):
    """The training pass, with one optimizer step per ``every`` micro-batches.

    Each micro-batch runs the Gradient stage (forward, loss, backward: gradients add up in
    ``.grad``); every ``every``-th one then divides the gradients by ``every`` and runs the
    Update stage, so an update over n micro-batches of equal size equals one over their
    concatenation. A group left incomplete when the pass ends is applied then, divided by its
    own size. ``step`` and ``batch_index`` still count batches (micro-batches); the hooks
    ``before_update``/``after_update`` run only for real updates, so schedulers, clipping and
    EMA see optimizer steps.

    Use it as the ``fit`` stage; other replacements (such as :class:`MixedPrecision`'s stages)
    go after it in the mapping, so that they replace the stages inside it::

        Learner(..., stages={"fit": AccumulateGradients(4), **amp.stages()})

    The gradients of a group in progress live in ``.grad``, which the learner's checkpoints do
    not hold. When a checkpoint may fall inside a group, add :meth:`checkpoint_callback` to the
    callbacks: it puts them in the checkpoint and back. Cancelling the run *inside* a
    micro-batch's Gradient stage still loses them (the learner clears the gradients of an
    interrupted batch), so that group is applied with fewer micro-batches.

    Args:
        every: micro-batches per optimizer step (1 behaves like the default stage).
        gradient: the Gradient stage to use (default: :class:`~aiolearner.Gradient`).
        update: the Update stage to use (default: :class:`~aiolearner.Update`, or
            ``Update(optimizer)`` when ``optimizer`` is given).
        optimizer: the name of the optimizer whose steps it gates, for a learner with several
            (default: the first). The gradients scaled are those of the optimizer the update
            stage steps (an ``Update``'s own ``optimizer``, otherwise this one).

    Raises:
        ValueError: ``every`` is less than 1.
    """

    def __init__(
        self,
        every: int,
        *,
        gradient: Stage | None = None,
        update: Stage | None = None,
        optimizer: str | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = every
        super().__init__(_AccumulatingFitBatch(every, gradient, update, optimizer))

    def checkpoint_callback(self) -> Callback:
        """A callback that keeps the gradients of a group in progress in checkpoints."""
        return GroupGradients()

    async def run(self, state: State) -> None:
        await super().run(state)
        pending = state.batch_index % self.every
        if pending:
            await self._flush(state, pending)

    async def _flush(self, state: State, pending: int) -> None:
        fit_batch = self.fit_batch
        assert isinstance(fit_batch, _AccumulatingFitBatch)
        optimizer = fit_batch.stepped(state)
        strategy = self.context.strategy
        if strategy is not None:
            # The group's micro-batches all ran without synchronizing their gradients.
            strategy.average_gradients(optimizer)
        _scale_gradients(optimizer, 1.0 / pending)
        # The last micro-batch is committed already, without an update: this update belongs to
        # it, and its commit (Update commits with the weights) is that same commit, so the
        # counters stay where they are.
        assert self.context.committed
        await fit_batch.update_stage(state)


class GroupGradients(Callback):
    """Carries the gradients accumulated so far (``.grad``) through checkpoints.

    Made by :meth:`AccumulateGradients.checkpoint_callback`. Reads ``model``; writes nothing.
    """

    reads = frozenset({"model"})

    def __init__(self) -> None:
        self._model: torch.nn.Module | None = None
        self._pending: list[torch.Tensor | None] | None = None

    def before_fit_run(self, state: StateView) -> None:
        """Remember the model; put back gradients loaded from a checkpoint."""
        model = state.model
        self._model = model
        pending, self._pending = self._pending, None
        if pending is not None:
            for p, g in zip(model.parameters(), pending, strict=True):
                p.grad = None if g is None else g.to(p.device)

    def state_dict(self) -> Mapping[str, Any]:
        if self._model is None:
            return {} if self._pending is None else {"grads": self._pending}
        grads = [
            None if p.grad is None else p.grad.detach().clone() for p in self._model.parameters()
        ]
        if all(g is None for g in grads):
            return {}
        return {"grads": grads}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        grads = state.get("grads")
        self._pending = None if grads is None else list(grads)


class GradientClipping(OptimizerCallback):
    """Clip gradients by their total norm and/or by value, just before each optimizer step.

    It runs in ``before_update``, when the gradients are complete: after the last micro-batch
    of a group under :class:`AccumulateGradients`, and after unscaling under
    :class:`MixedPrecision` (it unscales through the ``grad_scaler`` field when that stage set
    one). The total norm before clipping is kept, as a tensor (no host sync), in
    :attr:`last_norm`.

    Args:
        max_norm: clip the total norm of all gradients to this (``None``: no norm clipping).
        max_value: clip each gradient element to ``[-max_value, max_value]``.
        norm_type: the norm's p (2.0; ``math.inf`` for the max-norm).
        optimizer: the name of the optimizer whose gradients it clips, for a learner with
            several (default: the first); it then runs in ``before_update_<name>``, the hook of
            ``Update(optimizer=name)``, and is named ``GradientClipping[<name>]``.

    Raises:
        ValueError: neither ``max_norm`` nor ``max_value`` is given, or one is not positive.

    Reads ``optimizer`` (``optimizers`` for a named one) and ``grad_scaler``; writes nothing
    (it changes the gradients).

    Example:
        >>> learner = Learner(..., callbacks=[GradientClipping(max_norm=1.0)])
        >>> gan = Learner(gan, {"g": opt_g, "d": opt_d}, ...,
        ...               callbacks=[GradientClipping(1.0, optimizer="d")])
    """

    reads = frozenset({"optimizer", "grad_scaler"})

    def __init__(
        self,
        max_norm: float | None = None,
        *,
        max_value: float | None = None,
        norm_type: float | Literal["inf"] = 2.0,
        optimizer: str | None = None,
    ) -> None:
        self._target(optimizer)
        if max_norm is None and max_value is None:
            raise ValueError("give max_norm, max_value or both")
        for label, value in (("max_norm", max_norm), ("max_value", max_value)):
            if value is not None and not value > 0:
                raise ValueError(f"{label} must be positive, got {value}")
        self.max_norm = max_norm
        self.max_value = max_value
        self.norm_type = math.inf if norm_type == "inf" else float(norm_type)
        #: The total gradient norm before the last clipping (a tensor on the device).
        self.last_norm: torch.Tensor | None = None

    def before_update(self, state: StateView) -> None:
        """Unscale (under mixed precision), then clip the gradients (``before_update_<name>``
        for a named optimizer)."""
        optimizer = self._optimizer(state)
        if state.is_valid("grad_scaler"):
            scaler = state.grad_scaler
            if scaler is not None and scaler.is_enabled():
                scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.max_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.max_value, foreach=True)
        if self.max_norm is not None:
            self.last_norm = torch.nn.utils.clip_grad_norm_(
                params, self.max_norm, norm_type=self.norm_type, foreach=True
            )
