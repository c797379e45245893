"""Stopping rules: early stopping on a monitored metric, a time limit, a NaN/Inf guard.

They raise :class:`~aiolearner.StopFit` with a reason (the guard may skip the batch instead);
``fit`` then returns normally, teardown hooks run, and ``state.stop_reason`` says why. Calling
``fit`` again continues the run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch

from aiolearner import Callback, SkipBatch, StateView, StopFit

from ._args import function, named, real, whole

__all__ = ["EarlyStopping", "NonFiniteGuard", "TimeLimit"]


class EarlyStopping(Callback):
    """Stop the run when a metric has stopped improving.

    A validation metric (a name starting with ``val_``) is checked in ``after_validate``, when
    each validation result arrives (after the callbacks that write ``state.metrics`` on that
    hook, such as :class:`Metrics`), which also works when validation runs concurrently with
    training or more than once per epoch; any other metric is checked in ``after_epoch``. A check
    improves on the best value so far when it beats it by more than ``min_delta``; after
    ``patience`` checks in a row without improvement the callback raises
    :class:`~aiolearner.StopFit` (``patience=0`` stops at the first check without improvement,
    as ``patience=1`` does).

    It checks only while ``fit`` runs (not in ``learner.validate()`` or ``learner.test()``).
    With concurrent validation, the check runs on the snapshot's record when its results
    arrive, and the ``StopFit`` is a stop request the training loop acts on (see
    docs/concurrent-validation.md).

    Args:
        monitor: the key in ``state.metrics`` (``"val_loss"``, ``"val_accuracy"``, ...).
        mode: ``"min"`` when lower is better, ``"max"`` when higher is better.
        patience: how many checks (epochs, or validations) without improvement are tolerated.
        min_delta: the smallest change that counts as an improvement (non-negative).
        strict: raise ``KeyError`` when the metric is missing at a check; when ``False`` such a
            check is ignored.
        stop_on_nan: stop at once when the metric is NaN or infinite.
        check_on: ``"validate"`` or ``"epoch"`` to choose the hook (default: from ``monitor``).

    Raises:
        ValueError: on a bad ``mode``, ``patience`` or ``min_delta`` (NaN included).
        TypeError: a ``monitor`` that is not a non-empty str, a ``patience`` that is not an int
            or a ``min_delta`` that is not a number (also a ``ValueError``).

    Reads ``metrics``, ``epoch`` and ``phase``; writes nothing.

    Example:
        >>> stop = EarlyStopping("val_loss", patience=3, min_delta=1e-3)
        >>> learner = Learner(model, opt, loss_fn, train, val, callbacks=[stop])
        >>> await learner.fit(100)          # returns early with state.stop_reason set
    """

    reads = frozenset({"metrics", "epoch", "phase"})

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        strict: bool = True,
        stop_on_nan: bool = True,
        check_on: Literal["validate", "epoch"] | None = None,
    ) -> None:
        who = "EarlyStopping"
        monitor = named(who, "monitor", monitor, "'val_loss' (a key of state.metrics)")
        if check_on not in (None, "validate", "epoch"):
            raise ValueError(f"{who}: check_on must be 'validate' or 'epoch', got {check_on!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"{who}: mode must be 'min' or 'max', got {mode!r}")
        patience = whole(who, "patience", patience, 0, hint="it counts checks")
        min_delta = real(who, "min_delta", min_delta, low=0)
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.strict = strict
        self.stop_on_nan = stop_on_nan
        self.check_on = check_on or ("validate" if monitor.startswith("val_") else "epoch")
        #: The best value seen so far (``None`` before the first epoch).
        self.best: float | None = None
        #: ``state.epoch`` when :attr:`best` was seen: the index of that epoch (0 for the first;
        #: messages number epochs from 1).
        self.best_epoch: int | None = None
        #: Epochs in a row without improvement.
        self.wait = 0

    def hooks(self) -> Iterator[tuple[str, Callable[[StateView], Any]]]:
        # Only the hook it checks on.
        wanted = "after_validate" if self.check_on == "validate" else "after_epoch"
        for hook, method in super().hooks():
            if hook == wanted:
                yield hook, method

    @property
    def _monitored(self) -> str | None:
        # Asked by fit (see _lifecycle.check_fit): a name nothing writes is refused at start.
        return self.monitor if self.strict else None

    def _needs_val_data(self) -> str | None:
        # Asked by fit on a learner without val_data (see _lifecycle.check_fit).
        if self.check_on != "validate":
            return None
        return f"checks {self.monitor!r} after each validation"

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def after_validate(self, state: StateView) -> None:
        """Check a validation metric as its result arrives."""
        if self.check_on == "validate":
            self._check(state, "after validation")

    def after_epoch(self, state: StateView) -> None:
        """Check a metric of the epoch."""
        if self.check_on == "epoch":
            self._check(state, "at the end")

    def _check(self, state: StateView, when: str) -> None:
        if state.is_valid("phase") and state.phase != "fit":
            return
        metrics = state.metrics
        if self.monitor not in metrics:
            if self.strict:
                raise KeyError(
                    f"EarlyStopping: metric {self.monitor!r} is not in state.metrics {when} of"
                    f" epoch {state.epoch + 1} (it has {sorted(metrics)}); pass strict=False to"
                    " ignore checks without it"
                )
            return
        value = float(metrics[self.monitor])
        if not math.isfinite(value):
            if self.stop_on_nan:
                raise StopFit(
                    f"early stopping: {self.monitor} is {value} in epoch {state.epoch + 1}"
                )
            return
        if self.improves(value):
            self.best = value
            self.best_epoch = state.epoch
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            best_in = "?" if self.best_epoch is None else self.best_epoch + 1
            raise StopFit(
                f"early stopping: {self.monitor} has not improved by more than {self.min_delta}"
                f" for {self.wait} {'validations' if self.check_on == 'validate' else 'epochs'}"
                f" (best {self.best:.6g} in epoch {best_in},"
                f" now {value:.6g} in epoch {state.epoch + 1})"
            )

    def state_dict(self) -> Mapping[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "monitor": self.monitor,
            "mode": self.mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = (state.get("monitor", self.monitor), state.get("mode", self.mode))
        if saved != (self.monitor, self.mode):
            # The best value of another metric (or of the other direction) would be compared
            # with this one's: start afresh instead, and say so.
            warnings.warn(
                f"EarlyStopping({self.monitor!r}, mode={self.mode!r}): the checkpoint's state is "
                f"of EarlyStopping({saved[0]!r}, mode={saved[1]!r}); not loaded, the count "
                "starts afresh",
                stacklevel=2,
            )
            self.best, self.best_epoch, self.wait = None, None, 0
            return
        best = state.get("best")
        self.best = None if best is None else float(best)
        best_epoch = state.get("best_epoch")
        self.best_epoch = None if best_epoch is None else int(best_epoch)
        self.wait = int(state.get("wait", 0))


class TimeLimit(Callback):
    """Stop the run once it has trained for a given time.

    The time counts while ``fit`` runs, summed over ``fit`` calls and kept in checkpoints (so a
    resumed run does not get a fresh budget; call :meth:`reset` for that). It is checked after
    every training batch and every epoch: reading a clock costs well under a microsecond and
    needs no host sync. A batch in progress is never interrupted, so the run may overshoot by up
    to one batch (or one validation pass).

    Args:
        seconds: the time budget.
        clock: a function returning seconds (default ``time.monotonic``); tests inject a fake.

    Raises:
        ValueError: ``seconds`` is not a positive, finite number.
        TypeError: ``seconds`` is not a number (also a ``ValueError``), or ``clock`` is not a
            function.

    Reads ``epoch`` and ``step``; writes nothing.

    Example:
        >>> learner = Learner(..., callbacks=[TimeLimit(3600)])   # at most one hour
        >>> await learner.fit(1000)
    """

    reads = frozenset({"epoch", "step"})

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        hint = "the budget in seconds, as TimeLimit(3600) for an hour"
        self.seconds = real("TimeLimit", "seconds", seconds, low=0, low_open=True, hint=hint)
        self.clock = function("TimeLimit", "clock", clock, "clock() -> seconds")
        self._spent = 0.0
        self._started: float | None = None

    @property
    def elapsed(self) -> float:
        """Seconds spent training so far (all ``fit`` calls)."""
        if self._started is None:
            return self._spent
        return self._spent + (self.clock() - self._started)

    def reset(self) -> None:
        """Start a fresh budget."""
        self._spent = 0.0
        if self._started is not None:
            self._started = self.clock()

    def _check(self, state: StateView) -> None:
        elapsed = self.elapsed
        if elapsed >= self.seconds:
            raise StopFit(
                f"time limit: {elapsed:.1f} s spent training (limit {self.seconds:g} s), stopped"
                f" in epoch {state.epoch + 1}, step {state.step}"
            )

    def before_fit_run(self, state: StateView) -> None:
        """Start the clock (and stop at once when the budget is already spent)."""
        self._started = self.clock()
        self._check(state)

    def after_fit_batch(self, state: StateView) -> None:
        """Stop when the budget is spent."""
        self._check(state)

    def after_epoch(self, state: StateView) -> None:
        """Stop when the budget is spent (validation may have taken the time)."""
        self._check(state)

    def after_fit_run(self, state: StateView) -> None:
        """Stop the clock."""
        if self._started is not None:
            self._spent += self.clock() - self._started
            self._started = None

    def state_dict(self) -> Mapping[str, Any]:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._spent = float(state.get("elapsed", 0.0))
        if self._started is not None:
            self._started = self.clock()


class NonFiniteGuard(Callback):
    """Stop the run, or skip the batch, when the loss (or a gradient) is NaN or infinite.

    Checked in ``after_gradient``, before the Update stage: with ``every_n_steps=1`` a bad batch
    never reaches the weights. The reason names the epoch, the step and the batch.

    The trade-off: knowing whether a tensor on the device is finite needs a host sync, which
    stalls the pipeline of queued GPU work. So the guard can check every N steps instead: per
    batch it only keeps the finiteness flag (a device tensor); every N steps it syncs once and
    stops naming the first bad step. (On CPU a sync costs nothing, so checking every step is
    as cheap there.) The weights may then already
    hold up to N - 1 bad updates (resume from a checkpoint taken before). Skipping needs a
    decision per batch, so ``action="skip"`` checks (and syncs) every step.

    Args:
        action: ``"stop"`` (raise :class:`~aiolearner.StopFit`) or ``"skip"`` (raise
            :class:`~aiolearner.SkipBatch`: the batch's gradients are dropped, training goes on).
        every_n_steps: how often to sync and act (``"stop"`` only).
        check_grads: check the gradients' norms as well as the loss. Ignored while a gradient
            scaler is enabled (see :class:`MixedPrecision`): it finds and skips such steps itself.

    Raises:
        ValueError: a bad ``action``, ``every_n_steps`` < 1, or ``"skip"`` with
            ``every_n_steps`` > 1.
        TypeError: ``every_n_steps`` is not an int.

    Reads ``loss``, ``optimizer``, ``grad_scaler`` and the counters; writes nothing.
    :attr:`skipped` lists the steps skipped.

    Example:
        >>> guard = NonFiniteGuard("skip")                # drop bad batches, sync per step
        >>> guard = NonFiniteGuard("stop", every_n_steps=50)   # one sync per 50 steps
    """

    reads = frozenset({"loss", "optimizer", "grad_scaler", "epoch", "step", "batch_index"})

    def __init__(
        self,
        action: Literal["stop", "skip"] = "stop",
        *,
        every_n_steps: int = 1,
        check_grads: bool = False,
    ) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard: action must be 'stop' or 'skip', got {action!r}")
        every_n_steps = whole("NonFiniteGuard", "every_n_steps", every_n_steps, 1)
        if action == "skip" and every_n_steps != 1:
            raise ValueError("action='skip' must decide on every batch: use every_n_steps=1")
        self.action = action
        self.every_n_steps = every_n_steps
        self.check_grads = check_grads
        #: Steps whose batches were skipped (kept in checkpoints).
        self.skipped: list[int] = []
        # Between syncs: one finiteness flag (a device tensor) per step, and the step numbers.
        self._flags: list[torch.Tensor] = []
        self._steps: list[int] = []

    def state_dict(self) -> Mapping[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = [int(s) for s in state.get("skipped", [])]

    def _finite(self, state: StateView) -> tuple[torch.Tensor, str]:
        loss = state.loss.detach()
        ok = torch.isfinite(loss).all()
        what = "loss"
        # Under a distributed strategy the losses differ between ranks, while the gradients
        # (all-reduced: a NaN on any rank reaches every rank) are the same: checking them too
        # makes every rank decide alike, without a collective of its own.
        if self.check_grads or state.strategy is not None:
            scaler = state.grad_scaler if state.is_valid("grad_scaler") else None
            if scaler is None or not scaler.is_enabled():
                grads = [
                    p.grad
                    for group in state.optimizer.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
                if grads:
                    norms = torch.stack(torch._foreach_norm(grads))
                    ok = ok & torch.isfinite(norms).all()
                    what = "loss or gradient"
        return ok, what

    def after_gradient(self, state: StateView) -> None:
        """Check the batch (or record it, between syncs)."""
        ok, what = self._finite(state)
        where = (
            f"epoch {state.epoch + 1}, step {state.step} (batch {state.batch_index} of the epoch)"
        )
        if self.every_n_steps == 1:
            if bool(ok):  # the host sync
                return
            if self.action == "skip":
                self.skipped.append(state.step)
                raise SkipBatch(f"non-finite {what} at {where}: batch skipped")
            raise StopFit(f"non-finite {what} at {where}")
        self._flags.append(ok)
        self._steps.append(state.step)
        if len(self._flags) >= self.every_n_steps:
            self._settle(state, what)

    def _settle(self, state: StateView, what: str) -> None:
        flags, steps = self._flags, self._steps
        self._flags, self._steps = [], []
        if not flags:
            return
        ok = torch.stack(flags)
        if bool(ok.all()):  # the host sync
            return
        first = steps[int((~ok).nonzero()[0, 0])]
        raise StopFit(
            f"non-finite {what} at step {first} (found in epoch {state.epoch + 1}, step"
            f" {state.step}; checked every {self.every_n_steps} steps)"
        )

    def after_fit(self, state: StateView) -> None:
        """Settle the steps not checked yet when the pass ends."""
        self._settle(state, "loss or gradient" if self.check_grads else "loss")
