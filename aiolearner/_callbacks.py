"""The Callback base class.

A callback is a bag of hook methods named ``before_<stage>`` / ``after_<stage>``, each taking the
callback's view of the state. It declares what it reads and writes; the learner turns those
declarations into the run order of each hook when it is built (see ``_plan.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, ClassVar

from ._view import StateView

__all__ = ["Callback", "HookMethod"]

HookMethod = Callable[[StateView], Awaitable[None] | None]


class Callback:
    """Base class of callbacks: override the hooks you need, declare what you touch.

    Class (or instance) attributes:
        reads: names of state fields the callback reads.
        writes: names of state fields the callback writes (and may read). Counters (``epoch``,
            ``step``, ``batch_index``) are written by stages only. A name may also be one key
            of a dict field, ``"metrics.best_val_loss"``: the callback then touches that key
            only, and callbacks writing different keys need no order between them.
        after: callback types this callback must run after, on every hook they share.
        collectives: ``True`` when the callback's hooks issue collectives under a distributed
            strategy (``state.strategy.all_reduce``, ...): its hooks then run alone, in the
            order of the callbacks list, on every rank (see ``docs/distributed.md``).

    Hooks are methods named ``before_<stage>`` / ``after_<stage>`` for any stage of the learner's
    tree (``before_fit_run``, ``after_gradient``, ``after_validate``, ...), written as ``def`` or
    ``async def`` and taking one argument, the state view. A ``def`` hook runs inline (in the
    compute worker thread when the batch runs there); an ``async def`` hook runs on the event loop,
    concurrently with the other async hooks it has no declared order with.

    Example:
        >>> class PrintLoss(Callback):
        ...     reads = {"loss", "step"}
        ...
        ...     def after_gradient(self, state: StateView) -> None:
        ...         if state.step % 100 == 0:
        ...             print(state.step, float(state.loss))
    """

    reads: ClassVar[frozenset[str] | set[str]] = frozenset()
    writes: ClassVar[frozenset[str] | set[str]] = frozenset()
    after: ClassVar[tuple[type[Callback], ...] | list[type[Callback]]] = ()
    collectives: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The name used in errors, traces and ``describe()``: the class name by default."""
        return type(self).__name__

    def hooks(self) -> Iterator[tuple[str, HookMethod]]:
        """The hook methods this callback defines, as ``(hook name, bound method)`` pairs."""
        for attr in sorted(dir(type(self))):
            if attr.startswith(("before_", "after_")) and attr != "after":
                method = getattr(self, attr)
                if callable(method):
                    yield attr, method

    def state_dict(self) -> Mapping[str, Any]:
        """What a checkpoint must keep of this callback to resume exactly (default: nothing)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (default: nothing to restore)."""

    def __repr__(self) -> str:
        return f"<{self.name} reads={sorted(self.reads)} writes={sorted(self.writes)}>"


def is_async_hook(fn: Callable[..., Any]) -> bool:
    """Whether a hook method is a coroutine function (bound methods and partials included)."""
    import inspect

    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn)
