"""Checks of the shipped callbacks' arguments, made when a callback is built.

A bad argument is refused where it is given, with a message that names the callback, the
argument, the value and what to give instead (``Checkpoint: top_k must be a whole number (an
int) of at least 1, got 2.5 (float)``), never later inside a run, where it would fail halfway
through training or, worse, quietly do something else (``every_n_epochs=1.5`` saves epoch 3
alone).
What can only be seen when a run starts (a directory removed or made read-only since) is checked
then, by :func:`ready_directory`, before any batch.

A value of the wrong type (a float for a count, a string for a number) raises
:class:`ArgumentTypeError`, both a ``TypeError`` (Python's convention) and a ``ValueError``
(what several of these callbacks raised for it before); a value of the right type outside its
range raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import operator
import os
import uuid
from pathlib import Path
from typing import Any, TypeVar

import torch

from ._files import check_directory, check_file

__all__ = [
    "ArgumentTypeError",
    "autocast_device_type",
    "expand",
    "function",
    "named",
    "optional_named",
    "optional_real",
    "optional_whole",
    "ready_directory",
    "real",
    "refuse_silent_checkpoint",
    "scheduled_value",
    "shown",
    "text_stream",
    "usable_directory",
    "usable_file",
    "whole",
]


T = TypeVar("T")


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: both a ``TypeError`` and a ``ValueError``."""


def shown(value: object) -> str:
    """A value as messages show it: ``2.5 (float)``."""
    return f"{value!r} ({type(value).__name__})"


def _then(hint: str) -> str:
    return f"; {hint}" if hint else ""


# -- numbers -----------------------------------------------------------------------------------


def _whole_kind(at_least: int | None, none: bool) -> str:
    if at_least is None:
        kind = "a whole number (an int)"
    elif at_least == 0:
        kind = "a non-negative int (a whole number, 0 or more)"
    else:
        kind = f"a whole number (an int) of at least {at_least}"
    return f"None or {kind}" if none else kind


def whole(who: str, what: str, value: object, at_least: int | None = 0, hint: str = "") -> int:
    """``value`` as an int (not a bool) of at least ``at_least`` (``None``: any)."""
    return _whole(who, what, value, at_least, hint, none=False)


def optional_whole(
    who: str, what: str, value: object, at_least: int | None = 0, hint: str = ""
) -> int | None:
    """Like :func:`whole`, where ``None`` is valid too."""
    return None if value is None else _whole(who, what, value, at_least, hint, none=True)


def _whole(who: str, what: str, value: object, at_least: int | None, hint: str, none: bool) -> int:
    kind = _whole_kind(at_least, none)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer() and not hint:
            hint = f"pass {what}={int(value)}"
        raise ArgumentTypeError(f"{who}: {what} must be {kind}, got {shown(value)}{_then(hint)}")
    number = operator.index(value)
    if at_least is not None and number < at_least:
        raise ValueError(f"{who}: {what} must be {kind}, got {number!r}{_then(hint)}")
    return number


def _real_kind(
    low: float | None, high: float | None, low_open: bool, high_open: bool, finite: bool
) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    number = "finite number" if finite else "number"
    if low == 0:
        return f"a positive {number}" if low_open else f"a non-negative {number}"
    if low is not None:
        return f"a {number} above {low:g}" if low_open else f"a {number} of at least {low:g}"
    if high is not None:
        return f"a {number} below {high:g}" if high_open else f"a {number} of at most {high:g}"
    return f"a {number}"


def real(
    who: str,
    what: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    hint: str = "",
) -> float:
    """``value`` as a float: a real number (an int or a float, not a bool), not NaN, finite
    unless ``finite=False``, within the bounds (``low_open``/``high_open``: the bound itself
    is outside)."""
    kind = _real_kind(low, high, low_open, high_open, finite)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, str) and not hint:
            with contextlib.suppress(ValueError):
                if math.isfinite(float(value)):
                    hint = f"pass {what}={float(value)!r} (a number, not a string)"
        raise ArgumentTypeError(
            f"{who}: {what} must be {kind} (an int or a float), got {shown(value)}{_then(hint)}"
        )
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf if operator.gt(value, 0) else -math.inf
    inside = (
        not math.isnan(number)
        and (not finite or math.isfinite(number))
        and (low is None or (number > low if low_open else number >= low))
        and (high is None or (number < high if high_open else number <= high))
    )
    if not inside:
        raise ValueError(f"{who}: {what} must be {kind}, got {value!r}{_then(hint)}")
    return number


def optional_real(
    who: str,
    what: str,
    value: object,
    *,
    low: float | None = None,
    low_open: bool = False,
    hint: str = "",
) -> float | None:
    """Like :func:`real` (bounded below at most), where ``None`` is valid too."""
    if value is None:
        return None
    return real(who, what, value, low=low, low_open=low_open, hint=hint)


# -- names, functions, streams -----------------------------------------------------------------


def named(who: str, what: str, value: object, example: str = "") -> str:
    """``value`` as a non-empty string (the name of a metric, a field, ...)."""
    such = f" such as {example}" if example else ""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{who}: {what} must be a non-empty str{such}, got {shown(value)}")
    if not value:
        raise ValueError(f"{who}: {what} must be a non-empty str{such}, got ''")
    return value


def optional_named(who: str, what: str, value: object, example: str = "") -> str | None:
    """Like :func:`named`, where ``None`` is valid too."""
    return None if value is None else named(who, what, value, example)


def function(who: str, what: str, value: T, shape: str, hint: str = "") -> T:
    """``value`` if it is callable; ``shape`` says how it is called (``fn(t) -> value``)."""
    if not callable(value):
        raise ArgumentTypeError(
            f"{who}: {what} must be a function {shape}, got {shown(value)}{_then(hint)}"
        )
    return value


def text_stream(who: str, what: str, value: T) -> T:
    """``value`` if it is a text stream one can ``write()`` strings to."""
    wanted = f"{who}: {what} must be a text stream with write() (such as sys.stderr, or a file"
    if isinstance(value, str | bytes | os.PathLike):
        raise ArgumentTypeError(
            f"{wanted} opened with open(path, 'w')), got the path {value!r}: open it first,"
            f" {what}=open({str(value)!r}, 'w')"
        )
    if isinstance(value, io.RawIOBase | io.BufferedIOBase):
        raise ArgumentTypeError(
            f"{wanted} opened with open(path, 'w')), got a binary stream, {shown(value)}: open"
            " it in text mode ('w', not 'wb')"
        )
    if not callable(getattr(value, "write", None)):
        raise ArgumentTypeError(f"{wanted} opened with open(path, 'w')), got {shown(value)}")
    return value


def autocast_device_type(who: str, value: object) -> str:
    """A device type ``torch.autocast`` knows (the device need not be here)."""
    known = [
        t
        for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "maia")
        if _autocast_available(t)
    ]
    wanted = f"{who}: device_type must be one of torch.autocast's device types ({', '.join(known)})"
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{wanted}, got {shown(value)}")
    if ":" in value:
        raise ValueError(f"{wanted}, got {value!r}: a device type, without the index")
    if not _autocast_available(value):
        raise ValueError(f"{wanted}, got {value!r}")
    return value


def _autocast_available(device_type: str) -> bool:
    try:
        return bool(torch.amp.autocast_mode.is_autocast_available(device_type))
    except RuntimeError:  # not a device type torch parses
        return False


# -- paths -------------------------------------------------------------------------------------


def expand(value: object) -> object:
    """A path argument with a leading ``~`` expanded (as a shell would); anything else as is
    (the checks of ``_files`` refuse it by name)."""
    if isinstance(value, str | os.PathLike):
        try:
            return Path(value).expanduser()
        except RuntimeError as exc:  # ("~nosuchuser/...")
            raise ValueError(f"cannot expand {str(value)!r}: {exc}") from None
    return value


def usable_directory(directory: object, who: str, *, probe: bool = True) -> Path:
    """A directory argument: ``~`` expanded, refused when it cannot hold files (see
    :func:`check_directory`), or (``probe``) when it exists and no file can be created in it.
    A callback that may be made only to read its directory (a Checkpoint finding the files of
    a run on a read-only mount) leaves the probe to the run's start."""
    path = check_directory(expand(directory), who)
    if probe and path.is_dir():
        _probe(path, who, None)
    return path


def usable_file(path: object, who: str, example: str) -> Path:
    """A file argument: ``~`` expanded, refused when it is a directory or its directory cannot
    hold it (see :func:`check_file`), or when that exists and no file can be created in it."""
    checked = check_file(expand(path), who, example)
    if checked.parent.is_dir():
        _probe(checked.parent, who, checked.name)
    return checked


def ready_directory(directory: Path, who: str, create: bool) -> None:
    """At a run's start (blocking: in a worker thread): the directory can still hold files;
    created first with ``create``."""
    check_directory(directory, who)
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"{who}: cannot create directory {str(directory)!r}: {exc.strerror}"
            ) from exc
    if directory.is_dir():
        _probe(directory, who, None)


def _probe(directory: Path, who: str, target: str | None) -> None:
    """Create a file in ``directory`` and remove it. Permission bits do not tell: root may
    write anywhere by them, yet not in ``/proc`` or ``/sys``, nor on a read-only mount. The
    file is named as a temporary of ``_files.atomic_write``: one a crash left is removed with
    the others when the next run starts."""
    probe = directory / f".{target or 'probe'}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        what = f"write {str(directory / target)!r}" if target else "write files"
        raise ValueError(
            f"{who}: cannot {what}: no file can be created in {str(directory)!r}"
            f" ({exc.strerror}); give a path this process can write to"
        ) from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


# -- what one callback needs -------------------------------------------------------------------


def refuse_silent_checkpoint(
    save_last: bool,
    monitor: str | None,
    every_n_steps: int | None,
    every_n_epochs: int | None,
    keep_periodic: int | None,
) -> None:
    """A Checkpoint configured to write no file at all is refused."""
    if save_last or monitor is not None:
        return
    if keep_periodic == 0 and (every_n_steps or every_n_epochs):
        why = "keep_periodic=0 keeps no periodic file"
    elif not (every_n_steps or every_n_epochs):
        why = f"every_n_epochs={every_n_epochs!r} and every_n_steps=None save at no point"
    else:
        return
    raise ValueError(
        f"Checkpoint(save_last=False) with no monitor= would write no file ({why}): keep"
        " save_last=True, or give monitor=..., every_n_epochs=N or every_n_steps=N"
    )


#: Hyperparameters no optimizer takes below 0.
_NON_NEGATIVE = frozenset({"lr", "weight_decay", "momentum", "dampening", "eps"})


def _number_fault(value: object, low: float | None, high: float | None) -> str | None:
    """What is wrong with ``value`` as a hyperparameter in ``[low, high)``, or ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "a number (an int or a float)"
    number = float(value)
    if not math.isfinite(number):
        return "a finite number"
    if low is not None and number < low:
        return f"at least {low:g}" if high is None else f"in [{low:g}, {high:g})"
    if high is not None and number >= high:
        return f"in [{0 if low is None else low:g}, {high:g})"
    return None


def scheduled_value(who: str, param: str, value: Any, current: Any, t: int, per_step: bool) -> None:
    """Refuse a value a schedule's function returned for hyperparameter ``param`` (called with
    ``t``, optimizer steps or epochs done), before it is set: one of another kind than
    ``current`` (what the optimizer holds), NaN or infinite, negative for a rate, outside
    ``[0, 1)`` for betas. Kinds it does not know pass. Cheap: it runs on every step."""
    fault: str | None = None
    wrong_type = False
    if isinstance(current, bool):
        if not isinstance(value, bool):
            fault, wrong_type = "a bool", True
    elif isinstance(current, numbers.Real | torch.Tensor):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1):  # (reading it syncs)
            fault = _number_fault(value, 0.0 if param in _NON_NEGATIVE else None, None)
            wrong_type = fault == "a number (an int or a float)"
    elif isinstance(current, tuple | list):
        low, high = (0.0, 1.0) if param == "betas" else (None, None)
        if not isinstance(value, tuple | list):
            fault, wrong_type = f"a tuple of {len(current)} numbers, as {current!r}", True
        elif len(value) != len(current) or any(_number_fault(v, low, high) for v in value):
            fault = f"{len(current)} finite numbers" + (" in [0, 1)" if high else "")
    if fault is not None:
        where = f"optimizer step {t}" if per_step else f"epoch {t + 1}"
        raise (ArgumentTypeError if wrong_type else ValueError)(
            f"{who}: fn({t}) returned {shown(value)} for {param!r} (for {where}); it must be"
            f" {fault}. Nothing was set: no update ran with it"
        )
