"""The training state, its per-callback views, and the read-only containers they hand out.

The state is a plain namespace: a field that is valid now is an instance attribute, a field that is
not valid now is *absent*. Reading a valid field therefore costs what reading any attribute costs,
and reading an invalid one falls through to ``__getattr__``, which raises
:class:`StateAccessError` saying when the field is valid. There is never a stale value to return.

Stages write the state directly (they are the trusted core); callbacks see it only through a
:class:`StateView` built once per (callback, hook) when the learner is built, which checks every
read and write against the callback's declarations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, overload

import torch

from ._exceptions import StateAccessError

if TYPE_CHECKING:
    from ._learner import Learner
    from ._trace import Trace

__all__ = ["FIELD_LIFETIMES", "ReadOnlyDict", "ReadOnlyList", "State", "StateView"]

#: When each built-in field is valid. Used in the message of StateAccessError.
FIELD_LIFETIMES: dict[str, str] = {
    "model": "it is always valid",
    "optimizer": "it is always valid",
    "loss_fn": "it is always valid",
    "device": "it is always valid",
    "epoch": "it is always valid (written by stages only)",
    "step": "it is always valid (written by stages only)",
    "batch_index": "it is always valid (written by stages only)",
    "metrics": "it is always valid",
    "phase": "it is valid while the learner runs fit, validate or predict",
    "batch": (
        "it is set by FitBatch (ValidateBatch) for the current batch and cleared when that batch "
        "ends, so it is not valid outside a batch"
    ),
    "output": (
        "it is produced by Gradient (ValidateLoss) for the current batch and cleared when the "
        "batch ends, so it is not valid before that stage has run in this batch"
    ),
    "loss": (
        "it is produced by Gradient (ValidateLoss) for the current batch and cleared when the "
        "batch ends, so it is not valid before that stage has run in this batch"
    ),
    "validation": (
        "it is set by Validate when a validation pass has finished (with the epoch and step it "
        "belongs to in 'validation_tag')"
    ),
    "validation_tag": "it is set by Validate together with 'validation'",
    "outcome": (
        "it is set when the run ends ('completed', 'stopped', 'error' or 'cancelled'), so it is "
        "valid in after_fit_run only"
    ),
    "stop_reason": "it is set when a StopFit, StopEpoch or SkipBatch is acted on",
}

#: Fields only stages may write.
STAGE_OWNED = frozenset({"epoch", "step", "batch_index", "phase", "outcome"})


class State:
    """Every variable involved in training at one point.

    Valid fields are attributes; reading a field that is not valid raises
    :class:`~aiolearner.StateAccessError`. Stages read and write it directly; callbacks get a
    :class:`StateView`. User stages may add fields of their own by assigning them.
    """

    # Set on the instance by the learner; kept out of field listings by the leading underscore.
    _trace: Trace | None
    _publish: Callable[[str, str, Any], None] | None
    #: Fields stages declare (``Stage.fields``): name -> (stage, lifetime), set when built.
    _lifetimes: dict[str, tuple[str, str]]

    # The built-in fields (annotations only: a field that is not valid is absent).
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Any, Any], torch.Tensor]
    device: torch.device
    epoch: int
    step: int
    batch_index: int
    metrics: dict[str, Any]
    phase: str
    batch: Any
    output: Any
    loss: torch.Tensor
    validation: dict[str, Any]
    validation_tag: tuple[int, int]
    outcome: str
    stop_reason: str

    def __init__(self) -> None:
        object.__setattr__(self, "_trace", None)
        object.__setattr__(self, "_publish", None)

    if TYPE_CHECKING:
        # Stages may add fields of their own.
        def __setattr__(self, name: str, value: Any) -> None: ...

    def __getattr__(self, name: str) -> Any:
        # Only reached when `name` is not an instance attribute: the field is not valid now.
        if name.startswith("__"):
            raise AttributeError(name)
        raise StateAccessError(name, reason=f"it is not valid at this point; {_when(self, name)}")

    def is_valid(self, name: str) -> bool:
        """Whether field ``name`` holds a value now."""
        return name in self.__dict__ and not name.startswith("_")

    def fields(self) -> dict[str, object]:
        """A shallow copy of the valid fields."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def invalidate(self, *names: str) -> None:
        """Make fields invalid (stage API): later reads raise instead of returning old values."""
        d = self.__dict__
        for name in names:
            d.pop(name, None)

    def write(self, name: str, value: object, *, who: str) -> None:
        """Set a field on behalf of ``who``, recording it when tracing or publishing."""
        # Not setattr: while observed, that would record the write a second time, as the stage's.
        object.__setattr__(self, name, value)
        self._record_write(name, who)

    def _record_write(self, name: str, who: str) -> None:
        d = self.__dict__
        trace = d["_trace"]
        if trace is not None:
            trace.write(who, name, d.get("epoch"), d.get("step"))
        publish = d["_publish"]
        if publish is not None:
            publish("state_write", who, {"field": name})


class _ObservedState(State):
    """State whose direct (stage) writes are recorded too; swapped in while tracing/publishing.

    The learner switches ``state.__class__`` between :class:`State` and this class, so the
    unobserved hot path pays nothing for the feature.
    """

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if not name.startswith("_"):
            self._record_write(name, "stage")


def _when(state: State, name: str) -> str:
    """When field ``name`` is valid: from the stages' declarations, or the built-in fields'."""
    declared = state.__dict__.get("_lifetimes")
    if declared is not None and name in declared:
        stage, lifetime = declared[name]
        return (
            f"it is added by stage {stage!r} with lifetime {lifetime!r}, so it is valid from "
            f"where that stage sets it until its {lifetime} ends"
        )
    return FIELD_LIFETIMES.get(name, "no stage or callback has set it in this run")


def _refuse(view: StateView | None, field: str, what: str) -> NoReturn:
    callback = view._callback if view is not None else None
    hook = view._hook if view is not None else None
    raise StateAccessError(
        field,
        reason=f"{what}: the callback declares it in 'reads' only, add it to 'writes'",
        callback=callback,
        hook=hook,
    )


class ReadOnlyDict(Mapping[str, Any]):
    """A read-only window on a dict field; mutating it raises :class:`StateAccessError`."""

    __slots__ = ("_data", "_field", "_view")

    def __init__(self, data: Mapping[str, Any], field: str, view: StateView | None = None) -> None:
        self._data = data
        self._field = field
        self._view = view

    def __getitem__(self, key: str) -> Any:
        return _wrap_readonly(self._data[key], f"{self._field}[{key!r}]", self._view)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ReadOnlyDict({self._data!r})"

    def _mutate(self, *args: object, **kwargs: object) -> NoReturn:
        _refuse(self._view, self._field, "it is read-only here and cannot be changed in place")

    __setitem__ = __delitem__ = _mutate
    update = pop = popitem = clear = setdefault = _mutate


class ReadOnlyList(Sequence[Any]):
    """A read-only window on a list field; mutating it raises :class:`StateAccessError`."""

    __slots__ = ("_data", "_field", "_view")

    def __init__(self, data: list[Any], field: str, view: StateView | None = None) -> None:
        self._data = data
        self._field = field
        self._view = view

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return ReadOnlyList(self._data[index], self._field, self._view)
        return _wrap_readonly(self._data[index], f"{self._field}[{index}]", self._view)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ReadOnlyList({self._data!r})"

    def _mutate(self, *args: object, **kwargs: object) -> NoReturn:
        _refuse(self._view, self._field, "it is read-only here and cannot be changed in place")

    __setitem__ = __delitem__ = __iadd__ = _mutate
    append = extend = insert = pop = remove = clear = sort = reverse = _mutate


def _wrap_readonly(value: Any, field: str, view: StateView | None) -> Any:
    t = type(value)
    if t is dict:
        return ReadOnlyDict(value, field, view)
    if t is list:
        return ReadOnlyList(value, field, view)
    return value


#: Attribute names of StateView itself; no field may use them.
#: Built-in fields a callback may assign, and the type a value must have (the stages rely on it).
_FIELD_TYPES: dict[str, type] = {"metrics": dict}

VIEW_ATTRIBUTES = frozenset(
    {"start_soon", "weights_lock", "hook", "callback", "is_valid", "learner_status", "state_dict"}
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

    __slots__ = ("_callback", "_hook", "_learner", "_readable", "_state", "_writes")

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
        object.__setattr__(self, "_readable", reads | writes)
        object.__setattr__(self, "_writes", writes)

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
        return _wrap_readonly(value, name, self)

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self._writes:
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

    def state_dict(self) -> dict[str, Any]:
        """The learner's :meth:`~aiolearner.Learner.state_dict`: what a checkpoint must hold.

        Its tensors are the live ones (no copies): take it and copy what you keep under
        ``weights_lock.read()``, or from a ``def`` hook of the training batch, which runs while
        the batch holds the weights. Checkpointing callbacks need it; they could not reach the
        learner otherwise.
        """
        snapshot: dict[str, Any] = self._learner.state_dict()
        return snapshot

    def start_soon(self, fn: Callable[..., Any], *args: object, name: str | None = None) -> None:
        """Run ``await fn(*args)`` in the learner's background task group.

        The task is joined before ``fit`` (``validate``, ``predict``) returns; its error
        propagates out of that call. Usable from ``def`` hooks too, also when they run in the
        compute worker thread.
        """
        self._learner._start_background(fn, args, name or f"{self._callback}.{self._hook}")
