"""What the callbacks that act on one optimizer share: which one, and where their hooks go.

A learner may have several optimizers (``Learner(model, {"g": opt_g, "d": opt_d}, ...)``).
Schedules, clipping and the other callbacks that act on one optimizer take ``optimizer=`` (a
name; default: the first, ``state.optimizer``) and follow one rule: they act on that optimizer
and on the hooks of the stage that steps it. ``Update()`` (the default) steps the first
optimizer and is the stage ``update``; ``Update(optimizer="d")`` is the stage ``update_d``. So a
callback given ``optimizer="d"`` runs its ``before_update``/``after_update`` methods on the
hooks ``before_update_d``/``after_update_d``, and its name (for errors, ``describe()`` and its
key in checkpoints) says which optimizer it serves: ``LRSchedule[d]``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import torch

from aiolearner import Callback, StateView

HookMethod = Callable[[StateView], Awaitable[None] | None]

__all__ = ["OptimizerCallback", "optimizer_named"]

_UPDATE_HOOKS = frozenset({"before_update", "after_update"})


def optimizer_named(state: StateView, name: str | None, who: str) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (``None``: the first), or a clear error naming ``who``."""
    if name is None:
        optimizer: torch.optim.Optimizer = state.optimizer
        return optimizer
    optimizers = state.optimizers
    if name not in optimizers:
        raise KeyError(
            f"{who}: the learner has no optimizer named {name!r} (it has {sorted(optimizers)})"
        )
    named: torch.optim.Optimizer = optimizers[name]
    return named


class OptimizerCallback(Callback):
    """Base of the shipped callbacks that act on one of the learner's optimizers.

    Subclasses set :attr:`optimizer` (a name or ``None``) in ``__init__`` with
    :meth:`_target`, and write their hooks as ``before_update``/``after_update``.
    """

    #: The name of the optimizer it acts on; ``None``: the first one (``state.optimizer``).
    optimizer: str | None = None

    def _target(self, optimizer: str | None) -> None:
        if optimizer is not None and not (isinstance(optimizer, str) and optimizer):
            raise TypeError(f"optimizer must be an optimizer's name, got {optimizer!r}")
        self.optimizer = optimizer
        if optimizer is not None:
            # Per instance (the learner reads the attribute): the named optimizer is in the
            # 'optimizers' field.
            self.__dict__["reads"] = frozenset({*type(self).reads, "optimizers"})

    @property
    def name(self) -> str:
        """The class name, with the optimizer's name when one is given: ``LRSchedule[d]``."""
        base = type(self).__name__
        return base if self.optimizer is None else f"{base}[{self.optimizer}]"

    def per_step(self) -> bool:
        """Whether it acts on every optimizer step (its update hooks are wanted)."""
        return True

    def hooks(self) -> Iterator[tuple[str, HookMethod]]:
        """The hooks, with ``before_update``/``after_update`` on the stage that steps the
        optimizer (``update_<name>`` for a named one), and none there when it acts per epoch
        (so it needs no update stage, and costs the batch nothing)."""
        optimizer = self.optimizer
        per_step = self.per_step()
        for hook, method in super().hooks():
            if hook in _UPDATE_HOOKS:
                if not per_step:
                    continue
                if optimizer is not None:
                    hook = f"{hook}_{optimizer}"
            yield hook, method

    def _optimizer(self, state: StateView) -> torch.optim.Optimizer:
        return optimizer_named(state, self.optimizer, self.name)

    def _chosen(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> Any:
        """The optimizer it acts on, of the learner's (``None`` for a name it does not have:
        the learner says so of its update hooks)."""
        if self.optimizer is None:
            return next(iter(optimizers.values()), None)
        return optimizers.get(self.optimizer)
