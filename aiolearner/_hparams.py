"""Hyperparameters: a JSON-able mapping given to the learner, kept in checkpoints and logs."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["check_hparams"]


def _numbers(value: Any) -> Any:
    """``value`` with numpy's scalars (``np.int64(3)``, ``np.bool_(True)``) as Python's."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        item = value.item()
        # (Not a date or bytes: those are refused, by their numpy type's name.)
        return item if isinstance(item, bool | int | float) else value
    if isinstance(value, list | tuple):
        return [_numbers(item) for item in value]  # (as JSON keeps any sequence, a namedtuple too)
    if isinstance(value, Mapping):
        return {key: _numbers(item) for key, item in value.items()}
    return value


def _check(value: object, where: str) -> None:
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}: hyperparameters must be finite numbers")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has the key {key!r} of type {type(key).__name__}: keys of"
                    " hyperparameters must be strings"
                )
            _check(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__} ({value!r:.60}), which is not JSON-able:"
        " hyperparameters may hold None, bools, ints, finite floats, strings, and lists and"
        " string-keyed mappings of those (convert it first, for instance with int(), float()"
        " or str())"
    )


def check_hparams(hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """``hparams`` as its JSON form (a fresh dict: tuples become lists), or ``{}`` for ``None``.

    numpy's scalars become Python's numbers and bools.

    Raises:
        TypeError: not a mapping, a key that is not a string, or a value JSON cannot hold (the
            message names where it is, as ``hparams['optim']['betas'][0]``).
        ValueError: a float that is NaN or infinite (JSON has no such numbers).
    """
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a mapping, got {type(hparams).__name__}")
    plain = _numbers(hparams)
    _check(plain, "hparams")
    copied: dict[str, Any] = json.loads(json.dumps(plain))
    return copied
