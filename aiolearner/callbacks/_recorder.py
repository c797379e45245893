"""The Recorder: the history of losses, metrics and learning rates, and a PNG plot of it.

Per training batch it keeps the detached loss tensor (no ``.item()``, no host sync) and the
learning rates (plain floats already). The losses become floats once per epoch, in one transfer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aiolearner import Callback, StateView

from ._distributed import is_rank_zero
from ._optional import require

__all__ = ["Recorder", "plot_history"]


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


class Recorder(Callback):
    """Record the loss and learning rates of every training step and the metrics of every epoch.

    :attr:`history` holds plain Python numbers (it is also this callback's checkpoint state, so
    a resumed run continues its history); :meth:`plot_history` draws it to a PNG with matplotlib
    (the ``plot`` extra).

    Reads ``loss``, ``optimizer``, ``metrics``, ``epoch`` and ``step``; writes nothing.

    Example:
        >>> recorder = Recorder()
        >>> learner = Learner(model, opt, loss_fn, train, val, callbacks=[recorder])
        >>> await learner.fit(5)
        >>> recorder.history["epochs"][-1]        # {"epoch": 4, "step": ..., "val_loss": ...}
        >>> recorder.plot_history("history.png")  # loss, metrics and learning-rate curves
    """

    reads = frozenset({"loss", "optimizer", "metrics", "epoch", "step"})

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._losses: list[float] = []
        self._lrs: list[list[float]] = []
        self._epochs: list[dict[str, float]] = []
        self._pending: list[torch.Tensor | None] = []
        self._lr_now: list[float] = []
        # Batches begun in this pass, and the one an update after the last row ran in: the
        # same as the last row's for an epoch's short last group of micro-batches, applied
        # after its last batch; not for a batch skipped after its update (it has no row).
        self._begun = 0
        self._row_at = 0
        self._late: int | None = None
        self._hook: Any = None

    # -- hooks ---------------------------------------------------------------------------------

    def before_fit_run(self, state: StateView) -> None:
        """Watch the optimizer's steps: the rates are read as each one begins, after whatever
        set them for it (a schedule, a per-step ``ParamSchedule``, a stage of one's own)."""
        if self._hook is None:
            self._hook = state.optimizer.register_step_pre_hook(self._stepping)

    def _stepping(self, optimizer: torch.optim.Optimizer, *_: object) -> None:
        self._lr_now = _lrs(optimizer)
        self._late = self._begun

    def before_fit_batch(self, state: StateView) -> None:
        """Note the learning rates now (a batch that only accumulates gradients keeps these)."""
        self._begun += 1
        self._lr_now = _lrs(state.optimizer)

    def after_fit_batch(self, state: StateView) -> None:
        """Keep the batch's loss (a detached tensor) and learning rates."""
        # None for a batch without a loss (a custom stage): recorded as NaN.
        self._pending.append(state.loss.detach() if state.is_valid("loss") else None)
        self._steps.append(state.step)
        self._lrs.append(self._lr_now)
        self._row_at = self._begun
        self._late = None

    def after_fit(self, state: StateView) -> None:
        """Turn the pass's losses into floats (one transfer per epoch); an update that ran
        after the pass's last row (its short last group) gives that row its rates."""
        if self._late is not None and self._late == self._row_at and self._lrs:
            self._lrs[-1] = self._lr_now
        self._late = None
        self._begun = self._row_at = 0
        self._flush()

    def after_fit_run(self, state: StateView) -> None:
        """Stop watching the optimizer."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def after_epoch(self, state: StateView) -> None:
        """Keep the epoch's metrics."""
        row: dict[str, float] = {"epoch": float(state.epoch), "step": float(state.step)}
        for key, value in state.metrics.items():
            number = _number(value)
            if number is not None:
                row[key] = number
        self._epochs.append(row)

    def _flush(self) -> None:
        # Taken first: a checkpoint written by a concurrent validation's tail reads the history
        # on the event loop while training's after_fit_batch may append from the compute thread.
        pending = self._pending
        if pending:
            self._pending = []
            # Stacked where they are, then one transfer (not one per step).
            valid = [x.reshape(()).float() for x in pending if x is not None]
            values = iter(torch.stack(valid).cpu().tolist() if valid else [])
            self._losses.extend(math.nan if x is None else next(values) for x in pending)

    # -- results -------------------------------------------------------------------------------

    @property
    def history(self) -> dict[str, Any]:
        """``{"step": [...], "loss": [...], "lr": [[per group], ...], "epochs": [{...}, ...]}``.

        ``step``, ``loss`` and ``lr`` have one entry per training batch (``step`` counted after
        the batch's update, ``lr`` the rates the update used); ``epochs`` one dict per epoch with
        ``epoch`` (0-based), ``step`` and every numeric metric. A batch whose ``after_fit_batch``
        hooks a cancellation cut short after its update (at an ``await`` of another callback's
        ``async def after_fit_batch``, before this one's turn) has no entry: it is done, so
        the next run does not repeat it, and ``step`` shows the gap.
        """
        self._flush()
        return {
            "step": list(self._steps),
            "loss": list(self._losses),
            "lr": [list(x) for x in self._lrs],
            "epochs": [dict(e) for e in self._epochs],
        }

    def plot_history(self, path: str | os.PathLike[str]) -> Path:
        """Draw the loss, metric and learning-rate curves to a PNG file (needs matplotlib).

        It draws with matplotlib's object API (no pyplot global state), so it may run in a worker
        thread: ``await anyio.to_thread.run_sync(recorder.plot_history, path)``. Under
        torch.distributed only rank 0 draws (the path is returned on every rank).
        """
        if not is_rank_zero():
            return Path(path)
        return plot_history(self.history, path)

    def state_dict(self) -> Mapping[str, Any]:
        return self.history

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps = [int(s) for s in state.get("step", [])]
        self._losses = [float(x) for x in state.get("loss", [])]
        self._lrs = [[float(v) for v in x] for x in state.get("lr", [])]
        self._epochs = [{k: float(v) for k, v in e.items()} for e in state.get("epochs", [])]
        self._pending = []


def plot_history(history: Mapping[str, Any] | Recorder, path: str | os.PathLike[str]) -> Path:
    """Write a PNG of a :class:`Recorder`'s history: losses, other metrics, learning rates.

    Args:
        history: a recorder or its :attr:`Recorder.history`.
        path: the PNG file to write.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'aiolearner[plot]'``).
    """
    figure_mod = require("matplotlib.figure", extra="plot", what="plot_history")
    agg = require("matplotlib.backends.backend_agg", extra="plot", what="plot_history")
    if isinstance(history, Recorder):
        history = history.history
    steps = history["step"]
    epochs = history["epochs"]
    fig = figure_mod.Figure(figsize=(12, 3.6), layout="constrained")
    agg.FigureCanvasAgg(fig)
    ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)

    ax_loss.set_title("loss")
    if steps:
        ax_loss.plot(steps, history["loss"], lw=0.8, alpha=0.6, label="train (per step)")
    metric_keys = sorted({k for e in epochs for k in e} - {"epoch", "step"})
    for key in [k for k in metric_keys if "loss" in k]:
        points = [(e["step"], e[key]) for e in epochs if key in e]
        ax_loss.plot(*zip(*points, strict=True), marker="o", label=f"{key} (per epoch)")
    ax_loss.set_xlabel("step")
    if steps or epochs:
        ax_loss.legend(fontsize="small")

    ax_metric.set_title("metrics")
    others = [k for k in metric_keys if "loss" not in k]
    for key in others:
        points = [(e["epoch"] + 1, e[key]) for e in epochs if key in e]
        ax_metric.plot(*zip(*points, strict=True), marker="o", label=key)
    ax_metric.set_xlabel("epoch")
    if others:
        ax_metric.legend(fontsize="small")
    else:
        ax_metric.text(0.5, 0.5, "no other metrics", ha="center", va="center")

    ax_lr.set_title("learning rate")
    lrs = history["lr"]
    if lrs:
        for g in range(len(lrs[0])):
            ax_lr.plot(steps, [x[g] if g < len(x) else math.nan for x in lrs], label=f"group {g}")
        if len(lrs[0]) > 1:
            ax_lr.legend(fontsize="small")
    ax_lr.set_xlabel("step")

    out = Path(path)
    fig.savefig(out, format="png", dpi=100)
    return out
