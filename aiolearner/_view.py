"""The per-callback view of the training state: what a callback's hook reads and writes.

A :class:`StateView` is built once per (callback, hook) when the learner is built and checks every
read and write against the callback's declarations (``reads``, ``writes``, per-key names such as
``"metrics.best"``). The state itself, the read-only containers a view hands out and the messages
of refused accesses are in :mod:`aiolearner._state`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from ._exceptions import StateAccessError
from ._state import KeyedDict, _refuse, _when, _wrap_readonly, split_declaration

if TYPE_CHECKING:
    from ._learner import Learner
    from ._state import State

__all__ = ["VIEW_ATTRIBUTES", "StateView"]


#: Built-in fields a callback may assign, and the type a value must have (the stages rely on it).
_FIELD_TYPES: dict[str, type] = {"metrics": dict}

#: Attribute names of StateView itself; no field may use them.
VIEW_ATTRIBUTES = frozenset(
    {
        "start_soon",
        "weights_lock",
        "hook",
        "callback",
        "is_valid",
        "learner_status",
        "state_dict",
        "strategy",
    }
)


class StateView:
    """What a callback sees of the state while one of its hooks runs.

    Reads of fields in the callback's ``reads`` or ``writes`` and writes of fields in its
    ``writes`` go through; anything else raises :class:`~aiolearner.StateAccessError` naming the
    callback, the field and the hook. Dicts and lists read without write permission come back as
    read-only windows.

    Besides fields, a view offers :meth:`start_soon` (background work joined before ``fit``
    returns) and :attr:`weights_lock` (the reader/writer lock on the weights).

    Example:
        >>> class LossPrinter(Callback):
        ...     reads = {"loss", "step"}
        ...     def after_gradient(self, state):
        ...         print(state.step, state.loss)
    """

    __slots__ = ("_callback", "_hook", "_keyed", "_learner", "_readable", "_state", "_writes")

    def __init__(
        self,
        state: State,
        learner: Learner[Any],
        *,
        callback: str,
        hook: str,
        reads: frozenset[str],
        writes: frozenset[str],
    ) -> None:
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_learner", learner)
        object.__setattr__(self, "_callback", callback)
        object.__setattr__(self, "_hook", hook)
        whole_reads = frozenset(n for n in reads if "." not in n)
        whole_writes = frozenset(n for n in writes if "." not in n)
        keyed_writes: dict[str, set[str]] = {}
        keyed_reads: dict[str, set[str]] = {}
        for names, out in ((writes, keyed_writes), (reads, keyed_reads)):
            for name in names:
                field, key = split_declaration(name)
                if key is not None:
                    out.setdefault(field, set()).add(key)
        # Fields declared by key only (and not whole in 'writes'): handed out as a KeyedDict.
        keyed: dict[str, tuple[frozenset[str], frozenset[str] | None]] = {}
        for field in keyed_writes.keys() | keyed_reads.keys():
            if field in whole_writes:
                continue
            mine = frozenset(keyed_writes.get(field, ()))
            if not mine and field in whole_reads:
                continue  # per-key reads add nothing to reading the whole field
            readable = None if field in whole_reads else mine | keyed_reads.get(field, set())
            keyed[field] = (mine, readable)
        object.__setattr__(self, "_readable", whole_reads | whole_writes | keyed.keys())
        object.__setattr__(self, "_writes", whole_writes)
        object.__setattr__(self, "_keyed", keyed)

    def __getattr__(self, name: str) -> Any:
        if name not in self._readable:
            if name.startswith("__"):
                raise AttributeError(name)
            raise StateAccessError(
                name,
                reason="it is not declared in the callback's 'reads' (or 'writes')",
                callback=self._callback,
                hook=self._hook,
            )
        try:
            value = self._state.__dict__[name]
        except KeyError:
            raise StateAccessError(
                name,
                reason=f"it is not valid at this point; {_when(self._state, name)}",
                callback=self._callback,
                hook=self._hook,
            ) from None
        if name in self._writes:
            return value
        keyed = self._keyed.get(name)
        if keyed is not None:
            if type(value) is not dict:
                raise StateAccessError(
                    name,
                    reason="the callback declares keys of it, but it is not a dict (it is a "
                    f"{type(value).__name__})",
                    callback=self._callback,
                    hook=self._hook,
                )
            return KeyedDict(value, name, self, *keyed)
        return _wrap_readonly(value, name, self)

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self._writes:
            if name in self._keyed:
                raise StateAccessError(
                    name,
                    reason="the callback declares some of its keys, not the whole field; set "
                    f"keys (state.{name}[key] = ...) or declare {name!r} in 'writes'",
                    callback=self._callback,
                    hook=self._hook,
                )
            if name in self._readable:
                _refuse(self, name, "it cannot be assigned")
            raise StateAccessError(
                name,
                reason="it is not declared in the callback's 'writes'",
                callback=self._callback,
                hook=self._hook,
            )
        if name in _FIELD_TYPES and not isinstance(value, _FIELD_TYPES[name]):
            # Refused here, naming who did it, rather than failing later in a stage.
            raise StateAccessError(
                name,
                reason=f"it must be a {_FIELD_TYPES[name].__name__} (got "
                f"{type(value).__name__} {value!r:.40}; to set one metric: "
                f"state.{name}['name'] = value)",
                callback=self._callback,
                hook=self._hook,
            )
        self._state.write(name, value, who=self._callback)

    def __delattr__(self, name: str) -> NoReturn:
        raise StateAccessError(
            name, reason="callbacks cannot delete fields", callback=self._callback, hook=self._hook
        )

    def __dir__(self) -> list[str]:
        return sorted(self._readable | VIEW_ATTRIBUTES)

    def __repr__(self) -> str:
        return f"<StateView of {self._callback!r} in {self._hook!r}>"

    @property
    def hook(self) -> str:
        """The hook being run."""
        hook: str = object.__getattribute__(self, "_hook")
        return hook

    @property
    def callback(self) -> str:
        """The name of the callback this view belongs to."""
        name: str = object.__getattribute__(self, "_callback")
        return name

    def is_valid(self, name: str) -> bool:
        """Whether a declared field holds a value now (never raises)."""
        return name in self._readable and self._state.is_valid(name)

    @property
    def weights_lock(self) -> Any:
        """The learner's :class:`~aiolearner.ReadWriteLock` on the model's weights and optimizer.

        Hold its read side (``async with state.weights_lock.read():``) while copying or saving
        weights; the Update stage holds the write side while it changes them.
        """
        return self._learner.weights_lock

    @property
    def strategy(self) -> Any:
        """The learner's distributed :class:`~aiolearner.Strategy`, or ``None`` (one process).

        Callbacks reach collectives through it (``state.strategy.all_reduce(t)``); a callback
        that does declares ``collectives = True``. ``state.strategy is None or
        state.strategy.is_main`` tells whether this process writes files and logs.
        """
        return self._learner._strategy

    def state_dict(self) -> dict[str, Any]:
        """The learner's :meth:`~aiolearner.Learner.state_dict`: what a checkpoint must hold.

        Its tensors are the live ones (no copies): take it and copy what you keep under
        ``weights_lock.read()``, or from a ``def`` hook of the training batch, which runs while
        the batch holds the weights. Checkpointing callbacks need it; they could not reach the
        learner otherwise. In a hook of a concurrent validation's tail, the weights, counters
        and metrics are the snapshot's (see docs/concurrent-validation.md).
        """
        snapshot: dict[str, Any] = self._learner._state_dict_of(self._state)
        return snapshot

    def save_points(self, every_n_steps: int) -> None:
        """Say that this callback takes :meth:`state_dict` before every ``every_n_steps``-th
        training step, in ``before_fit_batch`` (a periodic checkpoint); call it in
        ``before_fit_run``, it lasts for the run.

        The batch of a step is drawn before its ``before_fit_batch`` hooks run, so a state
        taken there would hold the random state after the draw, and a run resumed from it
        would draw that batch from elsewhere (a dataset drawing augmentation from the global
        generators as it fetches would get other numbers once dropout has drawn too). Said
        beforehand, the learner reads the random state just before it draws those steps'
        batches, and a state taken before the batch is computed holds that one.

        Raises:
            ValueError: ``every_n_steps`` is not a positive int.
        """
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        rt = self._learner._rt
        if every_n_steps not in rt.save_every:
            rt.save_every = (*rt.save_every, every_n_steps)

    def start_soon(self, fn: Callable[..., Any], *args: object, name: str | None = None) -> None:
        """Run ``await fn(*args)`` in the learner's background task group.

        The task is joined before ``fit`` (``validate``, ``predict``) returns; its error
        propagates out of that call. Usable from ``def`` hooks too, also when they run in the
        compute worker thread.
        """
        self._learner._start_background(fn, args, name or f"{self._callback}.{self._hook}")
