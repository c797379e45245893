"""Schedules: any torch LR scheduler per step or per epoch, one-cycle, warmup + cosine, and any
optimizer hyperparameter as a function of the step.

A per-step scheduler steps once per *optimizer step*, not per batch: it watches the optimizer
with ``register_step_post_hook``, so batches that only accumulate gradients (see
:class:`~aiolearner.callbacks.AccumulateGradients`) and steps a gradient scaler skipped after an
overflow (see :class:`~aiolearner.callbacks.MixedPrecision`) do not advance the schedule.

With several optimizers, each schedule takes the one it drives: ``LRSchedule(...,
optimizer="d")`` schedules ``state.optimizers["d"]`` and steps in ``after_update_d``, the hook of
``Update(optimizer="d")`` (see ``_per_optimizer.py``).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from aiolearner import ConfigurationError, StateView

from ._args import function, named, real, scheduled_value, whole
from ._per_optimizer import OptimizerCallback

__all__ = ["LRSchedule", "OneCycle", "ParamSchedule", "WarmupCosine"]

Scheduler = LRScheduler | ReduceLROnPlateau
SchedulerFactory = Callable[[torch.optim.Optimizer], Scheduler]


class _Default(str):
    """A default argument, told apart from the same value given."""

    __slots__ = ()


_VAL_LOSS = _Default("val_loss")


def _required_after_first(cls: type) -> list[str]:
    """The required arguments of ``cls(...)`` after the first (a scheduler's optimizer)."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return []
    required = [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return required[1:]


class LRSchedule(OptimizerCallback):
    """Steps a torch learning-rate scheduler during training.

    Args:
        scheduler: a scheduler built on the learner's optimizer, or a function
            ``make(optimizer) -> scheduler`` called when training starts (convenient when the
            optimizer is created with the learner).
        interval: ``"step"`` (after every optimizer step) or ``"epoch"`` (after every epoch's
            training pass; ``ReduceLROnPlateau`` after the epoch's validation or ``after_epoch``).
        monitor: for ``ReduceLROnPlateau`` only: the key in ``state.metrics`` passed to its
            ``step`` (``"val_loss"`` by default): after each validation for a ``val_`` metric,
            at the end of each epoch otherwise. Given with a factory, it is checked at ``fit``
            start as a ``ReduceLROnPlateau``'s is (the factory's scheduler is built then).
        frequency: step the scheduler every this many steps or epochs.
        optimizer: the name of the optimizer it schedules, for a learner with several
            (default: the first, stepped by the unnamed ``Update()``; where every update is
            named, name one). A per-step schedule then steps in ``after_update_<name>``, the
            hook of ``Update(optimizer=name)``, and the callback is named
            ``LRSchedule[<name>]``.

    Raises:
        ValueError: ``ReduceLROnPlateau`` with ``interval="step"``, a bad ``interval``, or a
            ``frequency`` that is not an int of at least 1.
        TypeError: a scheduler class that needs more than the optimizer (pass a factory), or a
            ``monitor`` that is not a non-empty str.
        ConfigurationError: (when the Learner is built) a scheduler built on another optimizer,
            or an ``optimizer`` name the learner has no update stage for; (when ``fit``
            starts) a monitored metric nothing writes.
        KeyError: (during ``fit``) the monitored metric is missing at the end of an epoch,
            where the learner could not know its metrics in advance.

    The scheduler's state is part of :meth:`state_dict`, so checkpoints resume the schedule.
    ``ReduceLROnPlateau`` on a validation metric steps only while ``fit`` runs (not in
    ``learner.validate()`` or ``learner.test()``). Reads ``optimizer`` (``optimizers`` for a
    named one), ``metrics`` and ``phase``; writes nothing (it changes the optimizer's learning
    rates, as schedulers do).

    Example:
        >>> schedule = LRSchedule(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10),
        ...                       interval="epoch")
        >>> plateau = LRSchedule(lambda opt: ReduceLROnPlateau(opt, patience=2),
        ...                      interval="epoch", monitor="val_loss")
        >>> discriminator = LRSchedule(lambda opt: StepLR(opt, 1000), optimizer="d")
    """

    reads = frozenset({"optimizer", "metrics", "phase"})

    def __init__(
        self,
        scheduler: Scheduler | SchedulerFactory,
        *,
        interval: Literal["step", "epoch"] = "step",
        monitor: str = _VAL_LOSS,
        frequency: int = 1,
        optimizer: str | None = None,
    ) -> None:
        self._target(optimizer)
        # Given, with a factory (whose scheduler is built at fit), it is checked at fit start
        # as a ReduceLROnPlateau's would be: what else would it be given for.
        self._monitor_given = type(monitor) is not _Default
        self._known: frozenset[str] | None = None
        if interval not in ("step", "epoch"):
            raise ValueError(f"{self.name}: interval must be 'step' or 'epoch', got {interval!r}")
        frequency = whole(self.name, "frequency", frequency, 1)
        monitor = str(named(self.name, "monitor", monitor, "'val_loss' (a key of state.metrics)"))
        if isinstance(scheduler, ReduceLROnPlateau) and interval == "step":
            raise ValueError(
                "ReduceLROnPlateau reacts to a metric computed once per epoch: use interval='epoch'"
            )
        self.interval = interval
        self.monitor = monitor
        self.frequency = frequency
        self._factory: SchedulerFactory | None = None
        self.scheduler: Scheduler | None = None
        if isinstance(scheduler, LRScheduler | ReduceLROnPlateau):
            self.scheduler = scheduler
        elif isinstance(scheduler, type) and _required_after_first(scheduler):
            name = scheduler.__name__
            raise TypeError(
                f"LRSchedule was given the class {name}, which needs more than the optimizer "
                f"({', '.join(_required_after_first(scheduler))}): pass a scheduler, "
                f"LRSchedule({name}(optimizer, ...)), or a factory, "
                f"LRSchedule(lambda opt: {name}(opt, ...))"
            )
        elif callable(scheduler):
            self._factory = scheduler
        else:
            raise TypeError(
                "scheduler must be a torch LR scheduler or a function optimizer -> scheduler,"
                f" got {type(scheduler).__name__}"
            )
        self._pending: Mapping[str, Any] | None = None
        self._optimizer_steps = 0
        self._counted = 0
        self._hook: Any = None

    def _build(self, optimizer: torch.optim.Optimizer) -> Scheduler:
        # Building a scheduler resets the optimizer's hyperparameters to the schedule's start
        # (the rate, and the momentum for one-cycle). When resuming, the optimizer already holds
        # the values the checkpointed run had reached: keep them and put them back.
        reached = None
        if self._pending is not None:
            reached = [
                {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
            ]
        if self.scheduler is None:
            assert self._factory is not None
            scheduler = self._factory(optimizer)
            if not isinstance(scheduler, LRScheduler | ReduceLROnPlateau):
                raise TypeError(
                    f"the scheduler factory returned {type(scheduler).__name__}, not a torch LR"
                    " scheduler"
                )
            if isinstance(scheduler, ReduceLROnPlateau) and self.interval == "step":
                raise ValueError(
                    "ReduceLROnPlateau reacts to a metric computed once per epoch: use"
                    " interval='epoch'"
                )
            known = self._known
            if (
                isinstance(scheduler, ReduceLROnPlateau)
                and known is not None
                and self.monitor not in known
            ):
                close = difflib.get_close_matches(self.monitor, known, n=1)
                raise ConfigurationError(
                    f"the scheduler factory made a ReduceLROnPlateau, which judges by the metric "
                    f"{self.monitor!r}, but nothing in this learner writes it into state.metrics "
                    f"(its metrics will be {sorted(known)}), so the schedule would never step: "
                    "pass LRSchedule(..., monitor=...)"
                    + (f" (did you mean {close[0]!r}?)" if close else "")
                    + " or give the learner val_data"
                )
            self.scheduler = scheduler
        if self.scheduler.optimizer is not optimizer:
            which = "the learner's" if self.optimizer is None else f"optimizer {self.optimizer!r}"
            raise ValueError(f"the scheduler was built on another optimizer than {which}")
        if self._pending is not None:
            self.scheduler.load_state_dict(dict(self._pending))
            self._pending = None
        if reached is not None:
            for group, values in zip(optimizer.param_groups, reached, strict=True):
                group.update(values)
        return self.scheduler

    def per_step(self) -> bool:
        """Whether it steps per optimizer step (``interval="step"``)."""
        return self.interval == "step"

    def _check_optimizers(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> str | None:
        """At build: a scheduler given built must be on the optimizer it schedules."""
        chosen = self._chosen(optimizers)
        if self.scheduler is None or chosen is None or self.scheduler.optimizer is chosen:
            return None
        which = "the learner's" if self.optimizer is None else f"optimizer {self.optimizer!r}"
        return (
            f"its {type(self.scheduler).__name__} was built on another optimizer than {which}: "
            "build it on the optimizer given to the Learner (or pass a factory, "
            "lambda opt: ...)"
        )

    def _metrics_known(self, known: set[str] | None) -> None:
        # Told by fit as it starts (None: not knowable); a factory's scheduler is checked when
        # it is made (_build), the others by fit itself (_monitored).
        self._known = None if known is None else frozenset(known)

    def _count(self, *args: object, **kwargs: object) -> None:
        self._optimizer_steps += 1

    def before_fit_run(self, state: StateView) -> None:
        """Build the scheduler (from the factory) and watch the optimizer's steps."""
        optimizer = self._optimizer(state)
        self._build(optimizer)
        if self.interval == "step" and self._hook is None:
            self._hook = optimizer.register_step_post_hook(self._count)

    def after_update(self, state: StateView) -> None:
        """Step a per-step scheduler once per optimizer step (``after_update_<name>`` for a
        named optimizer)."""
        if self.interval != "step":
            return
        scheduler = self.scheduler
        assert scheduler is not None
        while self._counted < self._optimizer_steps:
            self._counted += 1
            if self._counted % self.frequency == 0:
                scheduler.step()

    @property
    def _monitored(self) -> str | None:
        # Asked by fit (see _lifecycle.check_fit); a factory's scheduler is not known yet.
        if isinstance(self.scheduler, ReduceLROnPlateau):
            return self.monitor
        if self.scheduler is None and self._monitor_given and self.interval == "epoch":
            return self.monitor
        return None

    def _on_validation(self) -> bool:
        # ReduceLROnPlateau on a validation metric steps as each validation result arrives:
        # that also works when validation runs concurrently with training.
        return isinstance(self.scheduler, ReduceLROnPlateau) and self.monitor.startswith("val_")

    def after_validate(self, state: StateView) -> None:
        """Step ``ReduceLROnPlateau`` on a validation metric (``val_...``)."""
        if self.interval == "epoch" and self._on_validation():
            self._step_epoch(state)

    def after_fit(self, state: StateView) -> None:
        """Step a per-epoch scheduler when the epoch's training pass ends: in the training
        loop's order, also when the epoch's validation and ``after_epoch`` run concurrently
        with the next epoch (see docs/concurrent-validation.md)."""
        if self.interval == "epoch" and not isinstance(self.scheduler, ReduceLROnPlateau):
            self._step_epoch(state)

    def after_epoch(self, state: StateView) -> None:
        """Step ``ReduceLROnPlateau`` on a metric other than a validation one, with the epoch's
        record."""
        if self.interval == "epoch" and isinstance(self.scheduler, ReduceLROnPlateau):
            if not self._on_validation():
                self._step_epoch(state)

    def _step_epoch(self, state: StateView) -> None:
        if state.is_valid("phase") and state.phase != "fit":
            return
        scheduler = self.scheduler
        assert scheduler is not None
        self._counted += 1
        if self._counted % self.frequency != 0:
            return
        if isinstance(scheduler, ReduceLROnPlateau):
            metrics = state.metrics
            if self.monitor not in metrics:
                raise KeyError(
                    f"LRSchedule: metric {self.monitor!r} for ReduceLROnPlateau is not in"
                    f" state.metrics (it has {sorted(metrics)})"
                )
            scheduler.step(float(metrics[self.monitor]))
        else:
            scheduler.step()

    def after_fit_run(self, state: StateView) -> None:
        """Step for an update whose ``after_update`` was interrupted (a cancellation or a stop
        there, after the optimizer stepped), before the final checkpoint saves the schedule;
        stop watching the optimizer."""
        if self._counted < self._optimizer_steps:
            self.after_update(state)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def last_lr(self) -> list[float]:
        """The learning rate of each parameter group after the last step."""
        scheduler = self.scheduler
        if scheduler is None:
            raise RuntimeError("the scheduler is built when training starts")
        return [float(lr) for lr in scheduler.get_last_lr()]

    def state_dict(self) -> Mapping[str, Any]:
        scheduler = self.scheduler
        saved = scheduler.state_dict() if scheduler is not None else self._pending
        # The optimizer's steps too: between an update and its after_update they differ.
        return {"scheduler": saved, "counted": self._counted, "steps": self._optimizer_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("scheduler")
        self._counted = int(state.get("counted", 0))
        self._optimizer_steps = int(state.get("steps", self._counted))
        if saved is None:
            return
        if self.scheduler is None:
            self._pending = saved
        else:
            # A scheduler built before the learner: the learner has just loaded the optimizer,
            # so only the scheduler's own state is missing.
            self.scheduler.load_state_dict(dict(saved))


class OneCycle(LRSchedule):
    """The one-cycle policy (``torch.optim.lr_scheduler.OneCycleLR``), stepped per step.

    Args:
        max_lr: the peak learning rate (or one per parameter group).
        total_steps: the number of optimizer steps of the whole run.
        optimizer: the name of the optimizer it schedules (default: the first); see
            :class:`LRSchedule`.
        **kwargs: passed to ``OneCycleLR`` (``pct_start``, ``anneal_strategy``, ...).

    Raises:
        ValueError: ``total_steps`` is not an int of at least 1, or ``max_lr`` (or one of its
            items) is not a positive finite number (one of the wrong type raises a
            ``TypeError`` that is also a ``ValueError``).
        ConfigurationError: (when ``fit`` starts) the run takes more optimizer steps than
            ``total_steps``, where that is known: a batch is one step (no accumulation, one
            update) and the epochs have a length (sized data, or a stream cut by
            ``steps_per_epoch``).

    Example:
        >>> learner = Learner(..., callbacks=[OneCycle(0.1, total_steps=epochs * len(loader))])
    """

    def __init__(
        self,
        max_lr: float | list[float],
        total_steps: int,
        *,
        optimizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        who = "OneCycle" if optimizer is None else f"OneCycle[{optimizer}]"
        total_steps = whole(who, "total_steps", total_steps, 1, hint="optimizer steps of the run")
        if isinstance(max_lr, list | tuple) and max_lr:
            max_lr = [
                real(who, f"max_lr[{i}]", lr, low=0, low_open=True) for i, lr in enumerate(max_lr)
            ]
        else:
            max_lr = real(
                who,
                "max_lr",
                max_lr,
                low=0,
                low_open=True,
                hint="the peak rate, or a list of one per group",
            )

        def make(opt: torch.optim.Optimizer) -> Scheduler:
            return OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps, **kwargs)

        super().__init__(make, interval="step", optimizer=optimizer)
        self.total_steps = total_steps

    def _check_run_steps(self, steps: int, run: str) -> str | None:
        """At fit start, the run's optimizer steps when known: OneCycleLR fails past its total."""
        if steps <= self.total_steps:
            return None
        return (
            f"total_steps={self.total_steps}, but the run takes {steps} optimizer steps "
            f"({run}) and the schedule fails past its total; give total_steps={steps}"
        )


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, min_factor: float
) -> float:
    """The factor on the base learning rate at ``step`` of linear warmup then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_factor
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRSchedule):
    """Linear warmup, then cosine decay to ``min_factor`` times the base rate, per step.

    Args:
        warmup_steps: optimizer steps of linear warmup (the rate climbs towards the base rate).
        total_steps: optimizer steps of the whole run; after them the rate stays at the minimum.
        min_factor: the final rate as a fraction of the optimizer's base rate.
        optimizer: the name of the optimizer it schedules (default: the first); see
            :class:`LRSchedule`.

    Raises:
        ValueError: not ``0 <= warmup_steps < total_steps`` (both ints), or ``min_factor``
            not a number in ``[0, 1]`` (one of the wrong type raises a ``TypeError`` that is
            also a ``ValueError``).

    Example:
        >>> learner = Learner(..., callbacks=[WarmupCosine(500, total_steps=20_000)])
    """

    def __init__(
        self,
        warmup_steps: int,
        total_steps: int,
        *,
        min_factor: float = 0.0,
        optimizer: str | None = None,
    ) -> None:
        who = "WarmupCosine" if optimizer is None else f"WarmupCosine[{optimizer}]"
        warmup_steps = whole(who, "warmup_steps", warmup_steps, None)
        total_steps = whole(who, "total_steps", total_steps, None)
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError(
                f"{who}: need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}"
            )
        min_factor = real(who, "min_factor", min_factor, low=0, high=1)

        def make(opt: torch.optim.Optimizer) -> Scheduler:
            return LambdaLR(
                opt,
                lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_factor),
            )

        super().__init__(make, interval="step", optimizer=optimizer)
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_factor = min_factor


class ParamSchedule(OptimizerCallback):
    """Sets any optimizer hyperparameter from a function of the step (or epoch) count.

    For what torch has no scheduler for: weight decay, momentum, Adam's betas, or a
    learning rate given as a formula. Before each optimizer step (``interval="step"``) or each
    epoch (``"epoch"``), every parameter group's ``name`` is set to ``fn(t)``, where ``t``
    counts the updates (epochs) done so far, from 0.

    Args:
        name: the param-group key (``"weight_decay"``, ``"momentum"``, ``"lr"``, ...).
        fn: ``fn(t) -> value``.
        interval: ``"step"`` or ``"epoch"``.
        optimizer: the name of the optimizer it sets, for a learner with several (default: the
            first); per step, it then runs on the hooks of ``Update(optimizer=name)``, as
            :class:`LRSchedule` does.

    Raises:
        ValueError: a bad ``interval``.
        TypeError: a ``name`` that is not a non-empty str, or an ``fn`` that is not callable.
        ConfigurationError: (when the Learner is built) the optimizer has no such
            hyperparameter, or the learner has no update stage for an ``optimizer`` name.

    A value ``fn`` returns is checked before it is set: one of another kind than the
    optimizer's (a string or ``None`` for a number), NaN, infinite, negative for ``lr``,
    ``weight_decay``, ``momentum``, ``dampening`` or ``eps``, or outside ``[0, 1)`` for
    ``betas`` raises an error naming the step (or epoch), and no update runs with it.

    Reads ``optimizer`` (``optimizers`` for a named one) and ``epoch``; writes nothing (it
    changes the optimizer's param groups). The count is in :meth:`state_dict`; per epoch it is
    ``state.epoch`` (epochs completed).

    Example:
        >>> ParamSchedule("weight_decay", lambda t: 0.05 * min(1.0, t / 1000))
    """

    reads = frozenset({"optimizer", "epoch"})

    def __init__(
        self,
        name: str,
        fn: Callable[[int], Any],
        *,
        interval: Literal["step", "epoch"] = "step",
        optimizer: str | None = None,
    ) -> None:
        self._target(optimizer)
        if interval not in ("step", "epoch"):
            raise ValueError(f"{self.name}: interval must be 'step' or 'epoch', got {interval!r}")
        self.param = named(self.name, "name", name, "'weight_decay' (a param-group key)")
        hint = f"for a constant, pass lambda t: {fn!r}" if isinstance(fn, int | float) else ""
        self.fn = function(self.name, "fn", fn, "fn(t) -> value", hint)
        self.interval = interval
        #: Updates (or epochs) done so far.
        self.count = 0

    def per_step(self) -> bool:
        """Whether it sets the value per optimizer step (``interval="step"``)."""
        return self.interval == "step"

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        t = self.count
        value = self.fn(t)
        groups = optimizer.param_groups
        if groups:  # refused before any group is set: the update then never runs with it
            per_step = self.interval == "step"
            scheduled_value(self.name, self.param, value, groups[0].get(self.param), t, per_step)
        for group in groups:
            group[self.param] = value

    def _check_optimizers(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> str | None:
        """At build: the hyperparameter must be one the optimizer has."""
        chosen = self._chosen(optimizers)
        for group in [] if chosen is None else chosen.param_groups:
            if self.param not in group:
                keys = sorted(k for k in group if k != "params")
                close = difflib.get_close_matches(self.param, keys, n=1)
                return (
                    f"the optimizer ({type(chosen).__name__}) has no hyperparameter "
                    f"{self.param!r} (it has {keys})"
                    + (f"; did you mean {close[0]!r}?" if close else "")
                )
        return None

    def before_update(self, state: StateView) -> None:
        """Set the value for this optimizer step."""
        if self.interval == "step":
            self._apply(self._optimizer(state))

    def after_update(self, state: StateView) -> None:
        """Count the step."""
        if self.interval == "step":
            self.count += 1

    def before_epoch(self, state: StateView) -> None:
        """Set the value for this epoch (counted by the epochs completed, so a resumed epoch
        or one whose after_epoch runs concurrently gets the same)."""
        if self.interval == "epoch":
            self.count = state.epoch
            self._apply(self._optimizer(state))

    def state_dict(self) -> Mapping[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state.get("count", 0))
