"""The learning-rate range test (``await lr_find(learner)``).

It trains for up to ``num_steps`` batches while the learning rate grows exponentially from
``start_lr`` to ``end_lr``, records the smoothed loss, and stops early once the loss diverges. The
run uses a temporary learner on the same model, optimizer, loss and training data (so it goes
through the same stages as training), and afterwards everything is put back to the bit: weights
and buffers, the optimizer's state and hyperparameters, gradients, train/eval mode and the RNG
states of torch, numpy and ``random``.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aiolearner import Callback, Learner, StateView, StopFit, capture_rng, restore_rng

from ._args import real, whole
from ._optional import require

__all__ = ["LRFinderResult", "lr_find"]


@dataclass
class LRFinderResult:
    """What :func:`lr_find` found.

    Attributes:
        lrs: the learning rate of each step.
        losses: the smoothed (bias-corrected exponential moving average) loss of each step.
        raw_losses: the loss of each step.
        suggestion: the learning rate where the smoothed loss falls fastest (steepest negative
            slope against log(lr)) before its minimum; when it does not fall, the rate tested
            nearest to a tenth of ``min_loss_lr`` (so never below ``start_lr``); ``None`` when
            no loss was finite.
        min_loss_lr: the learning rate of the lowest smoothed loss.
        diverged: whether the test stopped because the loss diverged.
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    raw_losses: list[float] = field(default_factory=list)
    suggestion: float | None = None
    min_loss_lr: float | None = None
    diverged: bool = False

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of smoothed loss against learning rate (log scale), marking the suggestion.

        Raises:
            ImportError: matplotlib is not installed (``pip install 'aiolearner[plot]'``).
        """
        figure_mod = require("matplotlib.figure", extra="plot", what="LRFinderResult.plot")
        agg = require("matplotlib.backends.backend_agg", extra="plot", what="LRFinderResult.plot")
        fig = figure_mod.Figure(figsize=(6, 4), layout="constrained")
        agg.FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot(self.lrs, self.raw_losses, lw=0.6, alpha=0.4, label="loss")
        ax.plot(self.lrs, self.losses, label="smoothed loss")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        finite = [x for x in self.losses if math.isfinite(x)]
        if finite:
            # Keep the interesting part in view: the last steps of a divergence go off the scale.
            low, start = min(finite), finite[0]
            ax.set_ylim(low - 0.1 * (start - low + 1e-12), max(start, low) * 1.5 + 1e-12)
        if self.suggestion is not None:
            i = self.lrs.index(self.suggestion)
            ax.plot([self.suggestion], [self.losses[i]], "ro", label=f"{self.suggestion:.2e}")
        ax.legend()
        out = Path(path).expanduser()
        fig.savefig(out, format="png", dpi=100)
        return out


class _RangeTest(Callback):
    """Sets each step's learning rate; records the loss; stops at the end or on divergence."""

    reads = frozenset({"loss", "optimizer"})

    def __init__(
        self, result: LRFinderResult, lrs: list[float], smooth: float, diverge: float
    ) -> None:
        self.result = result
        self.lrs = lrs
        self.smooth = smooth
        self.diverge = diverge
        self._avg = 0.0
        self._best = math.inf

    def before_fit_batch(self, state: StateView) -> None:
        i = len(self.result.lrs)
        lr = self.lrs[i]
        # The optimizer object is ours to change here: the test owns the run.
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        self.result.lrs.append(lr)

    def after_fit_batch(self, state: StateView) -> None:
        result = self.result
        loss = float(state.loss.detach())  # one sync per step: the test needs the value now
        i = len(result.raw_losses)
        result.raw_losses.append(loss)
        self._avg = self.smooth * loss + (1 - self.smooth) * self._avg
        smoothed = self._avg / (1 - (1 - self.smooth) ** (i + 1))
        result.losses.append(smoothed)
        if not math.isfinite(smoothed) or (i > 0 and smoothed > self.diverge * self._best):
            result.diverged = True
            raise StopFit(f"lr_find: the loss diverged at lr {result.lrs[-1]:.3g}")
        self._best = min(self._best, smoothed)
        if len(result.lrs) >= len(self.lrs):
            raise StopFit("lr_find: done")


def _suggest(result: LRFinderResult, skip_start: int, skip_end: int) -> None:
    lrs, losses = result.lrs[: len(result.losses)], result.losses
    finite = [i for i, x in enumerate(losses[: len(losses) - skip_end]) if math.isfinite(x)]
    if not finite:
        return
    best = min(finite, key=lambda i: losses[i])
    result.min_loss_lr = lrs[best]
    # The steepest descent *before* the minimum: past it the loss is rising (or noisy on its way
    # to diverging), and a drop there is no sign of a good learning rate.
    # Slopes over a window of a tenth of the run, not between neighbours: the smoothed loss
    # still wobbles from batch to batch, and the steepest wobble is not the steepest descent.
    w = max(1, len(losses) // 10)
    slopes = []
    for i in range(skip_start, best - w + 1):
        a, b = losses[i], losses[i + w]
        if math.isfinite(a) and math.isfinite(b):
            slopes.append(((b - a) / (math.log(lrs[i + w]) - math.log(lrs[i])), i + w // 2))
    if slopes and min(slopes)[0] < 0:
        result.suggestion = lrs[min(slopes)[1]]
    else:
        # No descent to speak of: a tenth of the rate with the lowest loss (a common rule).
        result.suggestion = min(lrs, key=lambda lr: abs(lr - lrs[best] / 10))


async def lr_find(
    learner: Learner[Any],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smooth: float = 0.05,
    diverge: float = 4.0,
    skip_start: int = 5,
    skip_end: int = 3,
    data: Any = None,
) -> LRFinderResult:
    """Run a learning-rate range test; leave the learner exactly as it was.

    The learning rate of every parameter group grows exponentially from ``start_lr`` to
    ``end_lr`` over ``num_steps`` training batches (the data is reused when it has fewer).
    The test stops early when the smoothed loss exceeds ``diverge`` times the best so far, or is
    not finite. The learner's own callbacks do not run. Afterwards the model (weights, buffers,
    gradients, mode), the optimizer (state and hyperparameters) and the RNG states are restored
    to the bit, whether the test finished, failed or was cancelled.

    Args:
        learner: an idle learner (its model, optimizer, loss and training data are used).
        start_lr: the first learning rate.
        end_lr: the last learning rate.
        num_steps: the most batches to train.
        smooth: the weight of a new loss in the moving average (0 < smooth <= 1).
        diverge: stop when the smoothed loss exceeds this multiple of the best one.
        skip_start: leave the first steps out of the suggestion (noisy).
        skip_end: leave the last steps out of the suggestion (diverging).
        data: batches to use instead of the learner's training data.

    Returns:
        an :class:`LRFinderResult` (``.suggestion``, ``.plot(path)``).

    Raises:
        LearnerBusyError: the learner is running.
        ValueError: bad arguments.

    Example:
        >>> result = await lr_find(learner, end_lr=1.0, num_steps=200)
        >>> result.suggestion, result.plot("lr_find.png")
        >>> for g in learner.optimizer.param_groups: g["lr"] = result.suggestion
    """
    who = "lr_find"
    start_lr = real(who, "start_lr", start_lr, low=0, low_open=True)
    end_lr = real(who, "end_lr", end_lr, low=0, low_open=True)
    if not start_lr < end_lr:
        raise ValueError(f"lr_find: need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    num_steps = whole(who, "num_steps", num_steps, 2)
    smooth = real(who, "smooth", smooth, low=0, high=1, low_open=True)
    diverge = real(who, "diverge", diverge, low=1, low_open=True)
    skip_start = whole(who, "skip_start", skip_start, None)
    skip_end = whole(who, "skip_end", skip_end, None)
    if skip_start < 0 or skip_end < 0:
        raise ValueError(
            f"lr_find: skip_start and skip_end must be at least 0, got {skip_start} and {skip_end}"
        )
    if learner.status.value != "idle":
        from aiolearner import LearnerBusyError

        raise LearnerBusyError("run lr_find", learner.status.value)
    model, optimizer = learner.model, learner.optimizer
    ratio = end_lr / start_lr
    lrs = [start_lr * ratio ** (i / (num_steps - 1)) for i in range(num_steps)]
    result = LRFinderResult()

    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    saved_modes = [m.training for m in model.modules()]
    saved_rng = capture_rng()
    try:
        test: Learner[Any] = Learner(
            model,
            optimizer,
            learner.state.loss_fn,
            learner.train_data if data is None else data,
            None,
            callbacks=[_RangeTest(result, lrs, smooth, diverge)],
            device=learner.device,
            compute="inline",
        )
        # Enough epochs to reach num_steps on short data; StopFit ends the run.
        await test.fit(num_steps)
    finally:
        with torch.no_grad():
            model.load_state_dict(saved_model)
            for p, g in zip(model.parameters(), saved_grads, strict=True):
                p.grad = g
        for m, mode in zip(model.modules(), saved_modes, strict=True):
            m.training = mode
        optimizer.load_state_dict(saved_optimizer)
        restore_rng(saved_rng)
    _suggest(result, skip_start, skip_end)
    return result
