"""Tiny fakes for testing callbacks and stages: a model, data, and a trace-recording callback.

Example:
    >>> from aiolearner.testing import make_learner, RecordingCallback
    >>> rec = RecordingCallback()
    >>> learner = make_learner(callbacks=[rec])
    >>> learner.fit_sync(1)
    >>> rec.calls[:3]
    ['before_fit_run', 'before_epoch', 'before_fit']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ._callbacks import Callback
from ._learner import Learner
from ._stage import Stage
from ._view import StateView

__all__ = [
    "DEFAULT_HOOKS",
    "RecordingCallback",
    "make_batches",
    "make_learner",
    "tiny_model",
]

#: The hooks of the default stage tree, in the order they first run.
DEFAULT_HOOKS = (
    "before_fit_run",
    "before_epoch",
    "before_fit",
    "before_fit_batch",
    "before_gradient",
    "after_gradient",
    "before_update",
    "after_update",
    "after_fit_batch",
    "after_fit",
    "before_validate",
    "before_validate_batch",
    "before_validate_loss",
    "after_validate_loss",
    "after_validate_batch",
    "after_validate",
    "after_epoch",
    "after_fit_run",
)


def tiny_model(n_in: int = 4, n_out: int = 3, *, seed: int = 0) -> torch.nn.Module:
    """A deterministic two-layer MLP."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(n_in, 8), torch.nn.ReLU(), torch.nn.Linear(8, n_out)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def make_batches(
    n_batches: int = 4,
    batch_size: int = 5,
    *,
    n_in: int = 4,
    n_out: int = 3,
    seed: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of ``(inputs, class targets)`` batches, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, n_in, generator=gen)
    y = torch.randint(0, n_out, (n_batches * batch_size,), generator=gen)
    return [
        (x[i : i + batch_size], y[i : i + batch_size])
        for i in range(0, n_batches * batch_size, batch_size)
    ]


def make_learner(
    *,
    callbacks: Sequence[Callback] = (),
    train_data: Iterable[Any] | Any | None = None,
    val_data: Iterable[Any] | Any | None = None,
    n_batches: int = 4,
    lr: float = 0.1,
    seed: int = 0,
    with_validation: bool = True,
    stages: dict[str, Stage] | None = None,
    **options: Any,
) -> Learner[Any]:
    """A small, deterministic learner (SGD on :func:`tiny_model` with :func:`make_batches`)."""
    model = tiny_model(seed=seed)
    train = train_data if train_data is not None else make_batches(n_batches, seed=seed + 1)
    val = val_data
    if val is None and with_validation:
        val = make_batches(2, seed=seed + 2)
    loss_fn: Callable[[Any, Any], torch.Tensor] = torch.nn.functional.cross_entropy
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        loss_fn,
        train,
        val,
        callbacks=callbacks,
        stages=stages,
        **options,
    )


class RecordingCallback(Callback):
    """Records every default hook it sees, as ``"hook"`` or ``"hook@epoch:step"`` strings,
    in :attr:`calls`, oldest first.

    Args:
        hooks: which hooks to record (default: all of :data:`DEFAULT_HOOKS`).
        with_counters: append ``@epoch:step`` to each entry.
        raise_at: ``{hook: exception}``; the exception is raised the first time that hook runs.
    """

    reads = frozenset({"epoch", "step"})

    def __init__(
        self,
        hooks: Iterable[str] = DEFAULT_HOOKS,
        *,
        with_counters: bool = False,
        raise_at: dict[str, BaseException] | None = None,
        name: str | None = None,
    ) -> None:
        self.calls: list[str] = []
        self._hooks = frozenset(hooks)
        self._with_counters = with_counters
        self._raise_at = dict(raise_at or {})
        self._name = name

    @property
    def name(self) -> str:
        return self._name or type(self).__name__

    def hooks(self) -> Any:
        for hook in sorted(self._hooks):
            yield hook, self._make(hook)

    def _make(self, hook: str) -> Callable[[StateView], None]:
        def record(state: StateView) -> None:
            if self._with_counters:
                self.calls.append(f"{hook}@{state.epoch}:{state.step}")
            else:
                self.calls.append(hook)
            exc = self._raise_at.pop(hook, None)
            if exc is not None:
                raise exc

        record.__name__ = hook
        return record
