"""Gradient accumulation over micro-batches (a Fit stage) and gradient clipping (a callback).

Accumulation changes which batches end in an optimizer step, so it is a stage, not a callback:
a callback cannot keep the Update stage from running. :class:`AccumulateGradients` replaces the
``fit`` stage with one whose batches run Gradient on every micro-batch and Update on every n-th,
after dividing the summed gradients by the number of micro-batches. The loss itself is left
alone, so ``train_loss`` and loss metrics keep their meaning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

from aiolearner import Callback, Fit, FitBatch, Stage, State, StateView

__all__ = ["AccumulateGradients", "GradientClipping", "GroupGradients"]


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

    def __init__(self, every: int, gradient: Stage | None = None, update: Stage | None = None):
        super().__init__(gradient=gradient, update=update)
        self.every = every

    async def run(self, state: State) -> None:
        # batch_index counts the epoch's batches done so far (also after a mid-epoch resume),
        # so groups stay aligned with the epoch whatever interrupted it.
        if (state.batch_index + 1) % self.every == 0:
            await self.gradient(state)
        else:
            # Under a distributed strategy the group's gradients are all-reduced once, with its
            # last micro-batch (a no-op in one process).
            with self.context.no_sync():
                await self.gradient(state)
        if (state.batch_index + 1) % self.every == 0:
            _scale_gradients(state.optimizer, 1.0 / self.every)
            await self.update(state)
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
        update: the Update stage to use (default: :class:`~aiolearner.Update`).

    Raises:
        ValueError: ``every`` is less than 1.
    """

    def __init__(
        self, every: int, *, gradient: Stage | None = None, update: Stage | None = None
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = every
        super().__init__(_AccumulatingFitBatch(every, gradient, update))

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
        assert isinstance(fit_batch, FitBatch)
        strategy = self.context.strategy
        if strategy is not None:
            # The group's micro-batches all ran without synchronizing their gradients.
            strategy.average_gradients(state.optimizer)
        _scale_gradients(state.optimizer, 1.0 / pending)
        # The last micro-batch is committed already, without an update: this update belongs to
        # it, and its commit (Update commits with the weights) is that same commit, so the
        # counters stay where they are.
        assert self.context.committed
        await fit_batch.update(state)


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


class GradientClipping(Callback):
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

    Raises:
        ValueError: neither ``max_norm`` nor ``max_value`` is given, or one is not positive.

    Reads ``optimizer`` and ``grad_scaler``; writes nothing (it changes the gradients).

    Example:
        >>> learner = Learner(..., callbacks=[GradientClipping(max_norm=1.0)])
    """

    reads = frozenset({"optimizer", "grad_scaler"})

    def __init__(
        self,
        max_norm: float | None = None,
        *,
        max_value: float | None = None,
        norm_type: float | Literal["inf"] = 2.0,
    ) -> None:
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
        """Unscale (under mixed precision), then clip the gradients."""
        optimizer = state.optimizer
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
