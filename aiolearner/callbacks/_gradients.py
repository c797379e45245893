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

import contextlib
import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch

from aiolearner import (
    FSDP,
    Callback,
    ComputeStage,
    Fit,
    FitBatch,
    Stage,
    State,
    StateView,
    Update,
    split_batch,
)

from ._args import optional_real, real, whole
from ._per_optimizer import OptimizerCallback

__all__ = ["AccumulateGradients", "GradientClipping", "GroupGradients"]


def _stepped(state: State, update: Stage, default: str | None) -> torch.optim.Optimizer:
    """The optimizer an update stage steps: an Update's own, otherwise ``default``'s."""
    name = update.optimizer if isinstance(update, Update) else default
    return state.optimizer if name is None else state.optimizers[name]


def _listed(window: list[torch.Tensor | None] | None) -> list[torch.Tensor | None] | None:
    return None if window is None else list(window)


def _copied(window: list[torch.Tensor | None] | None) -> list[torch.Tensor | None] | None:
    return None if window is None else [None if g is None else g.clone() for g in window]


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
        #: The group's gradients so far, by the model's parameters (``None``: none yet). They
        #: stay out of ``.grad`` between micro-batches: the learner clears ``.grad`` when a
        #: batch is skipped or interrupted, which must drop that micro-batch's part only.
        self.window: list[torch.Tensor | None] | None = None
        #: A group is in progress (its last micro-batch not yet run).
        self.in_group = False
        #: ``(epoch, step)`` where the pass's short last group was applied: a pass run again
        #: there (interrupted after that update, in its ``after_update``) does not apply it twice.
        self.flushed_at: tuple[int, int] | None = None

    def gather(self, state: State) -> None:
        """Move ``.grad`` (the micro-batch's part) into the group's gradients."""
        params = list(state.model.parameters())
        window: list[torch.Tensor | None] = (
            self.window if self.window is not None else [None] * len(params)
        )
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad
                if g is None:
                    continue
                old = window[i]
                if old is not None:
                    g.add_(old)  # new + old: the same bits as autograd's old += new
                window[i] = g
                p.grad = None
        self.window = window

    def put_back(self, state: State) -> None:
        """The group's gradients into ``.grad`` (added to what is there), for its update."""
        window, self.window = self.window, None
        if window is None:
            return
        with torch.no_grad():
            for p, w in zip(state.model.parameters(), window, strict=True):
                if w is None:
                    continue
                if p.grad is None:
                    p.grad = w
                else:
                    p.grad.add_(w)

    def acted(self, state: State, flow: Any) -> None:
        # A skipped micro-batch leaves nothing (the learner clears its .grad); the group's
        # earlier ones stay. Skipping the group's last one skips the group's update: its
        # gradients are dropped, as a skipped batch's are without accumulation.
        context = self.context
        if context.committed:
            super().acted(state, flow)
            return
        last = (state.batch_index + 1) % self.every == 0
        if context.strategy is None:
            super().acted(state, flow)
            if last:
                self.window = None
            return
        # Under a strategy the ranks must stay paired: DDP's forward and backward hold
        # collectives (a bucket rebuild early on; the group's last micro-batch all-reduces), so a
        # micro-batch skipped before its gradient still runs them, with a zero gradient. Inside
        # a group (no_sync) that adds nothing; for the group's last one this rank takes part
        # with its group's gradients and applies the update every rank applies.
        d = state.__dict__
        if "loss" not in d and "batch" in d:
            if last:
                self.put_back(state)
            inputs, targets = split_batch(d["batch"], self.name)
            with contextlib.nullcontext() if last else context.no_sync():
                loss = state.loss_fn(state.train_model(inputs), targets)
                loss.backward(torch.zeros_like(loss))  # type: ignore[no-untyped-call]
            if last:
                _scale_gradients(self.stepped(state), 1.0 / self.every)
                update = self.update_stage
                if isinstance(update, ComputeStage):
                    update.compute(state)  # commits, with the update
        elif last:
            # After its all-reduce: nothing can be paired; this rank alone skips the update
            # (docs/distributed.md: the next agreement reports the ranks' divergence).
            self.window = None
        if not context.committed:
            state.model.zero_grad(set_to_none=True)  # this micro-batch's part (zeros, or its own)
            state.invalidate("output", "loss")
            context.commit(state)
        super().acted(state, flow)

    def stepped(self, state: State) -> torch.optim.Optimizer:
        """The optimizer its update stage steps."""
        return _stepped(state, self.update_stage, self.optimizer)

    async def run(self, state: State) -> None:
        # batch_index counts the epoch's batches done so far (also after a mid-epoch resume),
        # so groups stay aligned with the epoch whatever interrupted it.
        last = (state.batch_index + 1) % self.every == 0
        if not last:
            await self._micro_batch(state)
            return
        # From put_back on, the group's gradients are in .grad, which the learner clears when
        # the batch is interrupted before its update commits: keep the earlier micro-batches'
        # part (gather adds into the new micro-batch's tensors, not into these) to give back.
        # Under a strategy put_back hands them to the backward, which may add into them.
        kept = _copied(self.window) if self.context.strategy is not None else _listed(self.window)
        try:
            await self._micro_batch(state)
        except BaseException as exc:
            # What this stage catches (a skipped batch) is put right by acted().
            if not self.context.committed and not isinstance(exc, self.catches):
                self.window, self.in_group = kept, kept is not None
            raise

    async def _micro_batch(self, state: State) -> None:
        last = (state.batch_index + 1) % self.every == 0
        if last:
            if self.context.strategy is not None:
                # The strategy all-reduces .grad in this backward: the group's gradients must
                # be there already.
                self.put_back(state)
            await self.gradient_stage(state)
        else:
            # Under a distributed strategy the group's gradients are all-reduced once, with its
            # last micro-batch (a no-op in one process).
            with self.context.no_sync():
                await self.gradient_stage(state)
        self.gather(state)
        self.in_group = not last
        if last:
            self.put_back(state)
            _scale_gradients(self.stepped(state), 1.0 / self.every)
            await self.update_stage(state)
        else:
            # The micro-batch is done once its gradients are in the group's: commit it now, so
            # the counters in after_fit_batch read as after an update, and so an interruption
            # from here on neither repeats it nor loses its part.
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

    Between micro-batches the group's gradients are kept by the stage, out of ``.grad`` (which
    holds the current micro-batch's part during its Gradient stage and its hooks, and the whole
    group's, scaled, from ``before_update`` on). So a micro-batch that is skipped
    (``SkipBatch``, ``NonFiniteGuard("skip")``), fails or is cancelled drops its own part only,
    and a run cancelled anywhere continues exactly; skipping a group's *last* micro-batch skips
    the group's update and drops its gradients. The learner's checkpoints do not hold them:
    when a checkpoint may fall inside a group, add :meth:`checkpoint_callback` to the
    callbacks, which puts them in the checkpoint and back.

    Args:
        every: micro-batches per optimizer step (1 behaves like the default stage).
        gradient: the Gradient stage to use (default: :class:`~aiolearner.Gradient`).
        update: the Update stage to use (default: :class:`~aiolearner.Update`, or
            ``Update(optimizer)`` when ``optimizer`` is given).
        optimizer: the name of the optimizer whose steps it gates, for a learner with several
            (default: the first). The gradients scaled are those of the optimizer the update
            stage steps (an ``Update``'s own ``optimizer``, otherwise this one).

    Raises:
        ValueError: ``every`` is not an int of at least 1 (a float raises a ``TypeError`` that is
            also a ``ValueError``).
    """

    def __init__(
        self,
        every: int,
        *,
        gradient: Stage | None = None,
        update: Stage | None = None,
        optimizer: str | None = None,
    ) -> None:
        every = whole("AccumulateGradients", "every", every, 1, hint="micro-batches per step")
        self.every = every
        super().__init__(_AccumulatingFitBatch(every, gradient, update, optimizer))

    def checkpoint_callback(self) -> Callback:
        """A callback that keeps the gradients of a group in progress in checkpoints."""
        fit_batch = self.fit_batch
        assert isinstance(fit_batch, _AccumulatingFitBatch)
        return GroupGradients(fit_batch)

    async def run(self, state: State) -> None:
        fit_batch = self.fit_batch
        assert isinstance(fit_batch, _AccumulatingFitBatch)
        if state.batch_index == 0:
            fit_batch.flushed_at = None  # a pass from its start applies its own (a load rewound)
        await super().run(state)
        pending = state.batch_index % self.every
        if pending and fit_batch.flushed_at != (state.epoch, state.step):
            await self._flush(state, pending)
        elif not pending and fit_batch.window is not None:
            # The group's last micro-batch was consumed without its gradient (a StopEpoch
            # before it): as when it is skipped, the group's update is skipped, its gradients
            # dropped, not carried into the next epoch's first group.
            fit_batch.window, fit_batch.in_group = None, False

    async def _flush(self, state: State, pending: int) -> None:
        fit_batch = self.fit_batch
        assert isinstance(fit_batch, _AccumulatingFitBatch)
        optimizer = fit_batch.stepped(state)
        # The update is this pass's last act: interrupted before the optimizer steps, the group
        # goes back to the stage, so that the pass's end applies it when the run goes on (and a
        # checkpoint taken at the interruption holds it). A copy: it is scaled in .grad.
        kept = _copied(fit_batch.window)
        fit_batch.put_back(state)
        strategy = self.context.strategy
        if strategy is not None:
            # The group's micro-batches all ran without synchronizing their gradients.
            strategy.average_gradients(optimizer)
        _scale_gradients(optimizer, 1.0 / pending)
        # The last micro-batch is committed already, without an update: this update belongs to
        # it, and its commit (Update commits with the weights) is that same commit, so the
        # counters stay where they are.
        assert self.context.committed
        stepped: list[bool] = []

        def applied(*args: object) -> None:
            stepped.append(True)
            fit_batch.flushed_at = (state.epoch, state.step)

        hook = optimizer.register_step_post_hook(applied)
        try:
            await fit_batch.update_stage(state)
            fit_batch.in_group = False  # (the short group is applied: no group is in progress)
        except BaseException:
            if not stepped:
                # Not inside a batch: nobody else clears .grad, which holds the group, scaled.
                state.model.zero_grad(set_to_none=True)
                fit_batch.window, fit_batch.in_group = kept, kept is not None
            raise
        finally:
            hook.remove()


class GroupGradients(Callback):
    """Carries the gradients of the group in progress through checkpoints.

    Made by :meth:`AccumulateGradients.checkpoint_callback`. Reads ``model``; writes nothing.
    """

    reads = frozenset({"model"})

    def __init__(self, fit_batch: _AccumulatingFitBatch) -> None:
        self._fit_batch = fit_batch
        self._pending: list[torch.Tensor | None] | None = None

    def _check_stages(self, stages: list[Stage]) -> str | None:
        """At build: the group it carries is that of an AccumulateGradients stage."""
        if any(stage is self._fit_batch for stage in stages):
            return None
        return (
            "carries the gradients of an AccumulateGradients stage that is not in this "
            "learner's stages: pass the AccumulateGradients it came from as stages=..."
        )

    def before_fit_run(self, state: StateView) -> None:
        """Put back the group's gradients loaded from a checkpoint (on the model's device)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            params = list(state.model.parameters())
            self._fit_batch.window = [
                None if g is None else g.to(p.device) for p, g in zip(params, pending, strict=True)
            ]

    def state_dict(self) -> Mapping[str, Any]:
        if self._pending is not None:  # loaded, not yet put back
            return {"grads": self._pending}
        fit_batch = self._fit_batch
        if fit_batch.in_group and isinstance(fit_batch.context.strategy, FSDP):
            warnings.warn(
                "a checkpoint taken inside an accumulation group under FSDP does not hold the "
                "group's gradients (FSDP accumulates them in its own buffers until the group's "
                "last micro-batch): a run resumed from it is not exact; save at group "
                "boundaries (every_n_steps a multiple of the group size)",
                RuntimeWarning,
                stacklevel=2,
            )
        saved: dict[str, Any] = {}
        if fit_batch.flushed_at is not None:
            saved["flushed_at"] = list(fit_batch.flushed_at)
        window = fit_batch.window
        if window is None or all(g is None for g in window):
            return saved
        return {**saved, "grads": [None if g is None else g.detach().clone() for g in window]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        grads = state.get("grads")
        self._pending = None if grads is None else list(grads)
        flushed = state.get("flushed_at")
        self._fit_batch.flushed_at = None if flushed is None else (int(flushed[0]), int(flushed[1]))


class GradientClipping(OptimizerCallback):
    """Clip gradients by their total norm and/or by value, just before each optimizer step.

    It runs in ``before_update``, when the gradients are complete: after the last micro-batch
    of a group under :class:`AccumulateGradients`, and after unscaling under
    :class:`MixedPrecision` (it unscales through the ``grad_scaler`` field when that stage set
    one). With ``max_norm``, the total norm that clipping by norm found is kept, as a tensor
    (no host sync), in :attr:`last_norm`: the norm before clipping, or with ``max_value`` too,
    the norm after the values were clipped (they are clipped first).

    Args:
        max_norm: clip the total norm of all gradients to this (``None``: no norm clipping).
        max_value: clip each gradient element to ``[-max_value, max_value]``.
        norm_type: the norm's p (2.0; ``math.inf`` for the max-norm).
        optimizer: the name of the optimizer whose gradients it clips, for a learner with
            several (default: the first); it then runs in ``before_update_<name>``, the hook of
            ``Update(optimizer=name)``, and is named ``GradientClipping[<name>]``.

    Raises:
        ValueError: neither ``max_norm`` nor ``max_value`` is given, one is not a positive
            finite number, or ``norm_type`` is not a positive number or ``"inf"`` (a value of
            the wrong type raises a ``TypeError`` that is also a ``ValueError``).

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
        who = self.name
        if max_norm is None and max_value is None:
            raise ValueError(f"{who}: give max_norm, max_value or both")
        self.max_norm = optional_real(who, "max_norm", max_norm, low=0, low_open=True)
        self.max_value = optional_real(who, "max_value", max_value, low=0, low_open=True)
        if isinstance(norm_type, str) and norm_type == "inf":
            norm_type = math.inf
        hint = "2.0 for the Euclidean norm, math.inf (or 'inf') for the max-norm"
        self.norm_type = real(
            who, "norm_type", norm_type, low=0, low_open=True, finite=False, hint=hint
        )
        #: The total gradient norm the last clipping by norm found (a tensor on the device;
        #: after clipping by value, with ``max_value`` too; ``None`` without ``max_norm``).
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
