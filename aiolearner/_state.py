"""The training state and the read-only containers its per-callback views hand out.

The state is a plain namespace: a field that is valid now is an instance attribute, a field that is
not valid now is *absent*. Reading a valid field therefore costs what reading any attribute costs,
and reading an invalid one falls through to ``__getattr__``, which raises
:class:`StateAccessError` saying when the field is valid. There is never a stale value to return.

Stages write the state directly (they are the trusted core); callbacks see it only through a
:class:`StateView` built once per (callback, hook) when the learner is built, which checks every
read and write against the callback's declarations (in :mod:`aiolearner._view`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, overload

import torch

from ._exceptions import StateAccessError, StateKeyError

if TYPE_CHECKING:
    from ._trace import Trace
    from ._view import StateView

__all__ = [
    "declared_key",
    "FIELD_LIFETIMES",
    "KeyedDict",
    "ReadOnlyDict",
    "ReadOnlyList",
    "State",
    "split_declaration",
]

#: When each built-in field is valid. Used in the message of StateAccessError.
FIELD_LIFETIMES: dict[str, str] = {
    "model": "it is always valid",
    "train_model": "it is always valid (the model, or its DDP/FSDP wrapper under a strategy)",
    "optimizer": "it is always valid",
    "optimizers": "it is always valid",
    "loss_fn": "it is always valid",
    "device": "it is always valid",
    "epoch": "it is always valid (written by stages only)",
    "step": "it is always valid (written by stages only)",
    "batch_index": "it is always valid (written by stages only)",
    "metrics": "it is always valid",
    "phase": (
        "it is valid while the learner runs fit, validate, test or predict ('fit', 'validate',"
        " 'test', 'predict')"
    ),
    "validation_set": (
        "it is set by Validate while it goes over a validation set (the set's name in a val_data"
        " mapping, None for a single val_data), so it is valid in the batches of a validation"
        " pass only"
    ),
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
        "valid in after_fit_run only (after the run: learner.snapshot().outcome)"
    ),
    "stop_reason": "it is set when a StopFit, StopEpoch or SkipBatch is acted on",
}

#: Fields only stages may write.
STAGE_OWNED = frozenset({"epoch", "step", "batch_index", "phase", "outcome", "validation_set"})

#: Keys the default stages put in dict fields, and when (for the message of StateKeyError).
STAGE_KEYS: dict[str, dict[str, str]] = {
    "metrics": {
        "train_loss": "the Fit stage sets it at the end of each training pass",
        "val_loss": "the Validate stage sets it at the end of each validation pass",
    },
    "validation": {"loss": "the Validate stage sets it at the end of each validation pass"},
}


def split_declaration(name: str) -> tuple[str, str | None]:
    """A declared name as ``(field, key)``: ``"metrics.best"`` -> ``("metrics", "best")``,
    ``"metrics"`` -> ``("metrics", None)``. A field name never holds a dot (it is an attribute
    name), so everything after the first dot is the key."""
    field, dot, key = name.partition(".")
    return (field, key) if dot else (name, None)


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
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    optimizers: dict[str, torch.optim.Optimizer]
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
    validation_set: str | None
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
        """Record a write of field ``name`` (``"metrics.val_loss"`` for one key of a dict
        field) by ``who`` when tracing or publishing."""
        d = self.__dict__
        trace = d.get("_trace")
        if trace is not None:
            trace.write(who, name, d.get("epoch"), d.get("step"))
        publish = d.get("_publish")
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
        try:
            value = self._data[key]
        except KeyError:
            raise _key_error(self._view, self._field, key) from None
        return _wrap_readonly(value, f"{self._field}[{key!r}]", self._view)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._data:
            return self[key]
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ReadOnlyDict({self._data!r})"

    def _mutate(self, *args: object, **kwargs: object) -> NoReturn:
        _refuse(self._view, self._field, "it is read-only here and cannot be changed in place")

    __setitem__ = __delitem__ = __ior__ = _mutate
    update = pop = popitem = clear = setdefault = _mutate

    # Operators that make a new dict work as on a dict (``metrics | {...}``).
    def __or__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return {**self, **other}

    def __ror__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return {**other, **self}


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

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _mutate
    append = extend = insert = pop = remove = clear = sort = reverse = _mutate

    # Operators that make a new list work as on a list (``losses + [x]``).
    def __add__(self, other: list[Any]) -> list[Any]:
        return [*self, *other]

    def __radd__(self, other: list[Any]) -> list[Any]:
        return [*other, *self]


class KeyedDict(Mapping[str, Any]):
    """A dict field as a callback that declares some of its keys sees it.

    A callback with ``writes={"metrics.best_val_loss"}`` gets ``state.metrics`` as this window:
    it may set (and delete) the keys it declares; it may read those, the keys it declares in
    ``reads`` (``"metrics.val_loss"``), or every key when it declares the whole field in
    ``reads``. Anything else raises :class:`StateAccessError`; reading a declared key that is not
    set raises :class:`StateKeyError` (also a ``KeyError``, so ``.get`` works).
    """

    __slots__ = ("_data", "_field", "_readable", "_view", "_writable")

    def __init__(
        self,
        data: dict[str, Any],
        field: str,
        view: StateView | None,
        writable: frozenset[str],
        readable: frozenset[str] | None,
    ) -> None:
        self._data = data
        self._field = field
        self._view = view
        self._writable = writable
        #: The keys it may read; ``None``: every key.
        self._readable = readable

    def _declared(self, key: str) -> str:
        """The declared name of ``key``: itself, or, for a validation result, the single-set
        name it stands for (see :func:`declared_key`)."""
        view = self._view
        if view is None:
            return key
        state = view._state.__dict__
        if "phase" not in state:
            return key
        sets = view._learner._rt.validation_sets()
        return declared_key(self._field, key, state.get("phase"), [n for n in sets if n])

    def _check_read(self, key: str) -> None:
        readable = self._readable
        if readable is not None and key not in readable and self._declared(key) not in readable:
            raise _undeclared_key(self._view, self._field, key, "read")

    def _check_write(self, key: str) -> None:
        writable = self._writable
        if key not in writable and self._declared(key) not in writable:
            raise _undeclared_key(self._view, self._field, key, "write")

    def __getitem__(self, key: str) -> Any:
        self._check_read(key)
        try:
            value = self._data[key]
        except KeyError:
            raise _key_error(self._view, self._field, key) from None
        if key in self._writable or self._declared(key) in self._writable:
            return value
        return _wrap_readonly(value, f"{self._field}[{key!r}]", self._view)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        self._check_read(key)
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        self._check_read(key)
        if key in self._data:
            return self[key]
        return default

    def __iter__(self) -> Iterator[str]:
        readable = self._readable
        keys = list(self._data)
        if readable is None:
            return iter(keys)
        return iter([k for k in keys if k in readable or self._declared(k) in readable])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"KeyedDict({ {k: self._data[k] for k in self}!r})"

    def _recorded(self, key: str) -> None:
        """A key written: recorded as ``"<field>.<key>"`` by the callback, when observed."""
        view = self._view
        if view is not None:
            view._state._record_write(f"{self._field}.{key}", view._callback)

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_write(key)
        self._data[key] = value
        self._recorded(key)

    def __delitem__(self, key: str) -> None:
        self._check_write(key)
        del self._data[key]
        self._recorded(key)

    def update(self, other: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        items = {**(other or {}), **kwargs}
        for key in items:
            self._check_write(key)  # every key before any is set
        self._data.update(items)
        for key in items:
            self._recorded(key)

    def __ior__(self, other: Mapping[str, Any]) -> KeyedDict:
        self.update(other)
        return self

    def __or__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return {**self, **other}

    def __ror__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return {**other, **self}

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key: str, *default: Any) -> Any:
        self._check_write(key)
        had = key in self._data
        value = self._data.pop(key, *default)
        if had:
            self._recorded(key)
        return value

    def clear(self) -> None:
        """Remove every key: allowed when every key present is one this callback writes."""
        keys = list(self._data)
        for key in keys:
            self._check_write(key)
        for key in keys:
            del self._data[key]
            self._recorded(key)


def declared_key(field: str, key: str, phase: str | None, sets: Sequence[str]) -> str:
    """The key a callback declares for ``key`` of a dict field, given the pass running now.

    Keys of validation results are declared as for a single validation set: ``"metrics.val_acc"``
    and ``"validation.acc"``. The same declarations cover what a pass writes in their place:
    ``metrics["test_acc"]`` in ``learner.test()``, and ``metrics["val_<set>_acc"]`` /
    ``validation["<set>_acc"]`` (``test_<set>_acc``) for named validation sets (``sets``). So a
    callback declares its keys once, whatever sets the learner validates on, and two callbacks
    conflict on a key exactly when they would on its single-set name.
    """
    if field == "metrics":
        start = "test_" if phase == "test" else "val_"
        for prefix in [f"{start}{name}_" for name in sets] or [start]:
            if key.startswith(prefix) and prefix != "val_":
                return "val_" + key[len(prefix) :]
    elif field == "validation":
        for name in sets:
            if key.startswith(f"{name}_"):
                return key[len(name) + 1 :]
    return key


def _undeclared_key(view: StateView | None, field: str, key: str, what: str) -> StateAccessError:
    declared = (
        f"'writes' (as '{field}.{key}', or '{field}' for every key)"
        if what == "write"
        else f"'reads' or 'writes' (as '{field}.{key}', or '{field}' for every key)"
    )
    return StateAccessError(
        f"{field}[{key!r}]",
        reason=f"the callback may {what} only the keys of {field!r} it declares; add it to "
        + declared,
        callback=view._callback if view is not None else None,
        hook=view._hook if view is not None else None,
    )


def _key_error(view: StateView | None, field: str, key: str) -> StateKeyError:
    """The error for a key of a dict field that is not set, saying who would set it."""
    return StateKeyError(
        f"{field}[{key!r}]",
        reason=f"the key is not set at this point; {_key_when(view, field, key)}",
        callback=view._callback if view is not None else None,
        hook=view._hook if view is not None else None,
    )


def _key_when(view: StateView | None, field: str, key: str) -> str:
    stage = STAGE_KEYS.get(field, {}).get(key)
    if stage is not None:
        return stage
    learner = view._learner if view is not None else None
    writers = []
    if learner is not None:
        for cb in learner.callbacks:
            writes = set(cb.writes)
            if f"{field}.{key}" in writes or field in writes:
                hooks = ", ".join(h for h, _ in cb.hooks()) or "no hooks"
                writers.append(f"{cb.name!r} (hooks: {hooks})")
    if writers:
        return "callbacks that declare writing it: " + "; ".join(writers)
    return (
        f"no callback declares writing it (writes={{'{field}.{key}'}}) and no stage has set it "
        "in this run"
    )


def _wrap_readonly(value: Any, field: str, view: StateView | None) -> Any:
    t = type(value)
    if t is dict:
        return ReadOnlyDict(value, field, view)
    if t is list:
        return ReadOnlyList(value, field, view)
    return value
