"""Capturing and restoring every random number generator training touches."""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["capture_rng", "restore_rng"]

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]


def _cuda_initialized() -> bool:
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def capture_rng() -> dict[str, Any]:
    """The states of the global random generators: torch's CPU (and initialized CUDA) ones,
    numpy's and Python's; :func:`restore_rng` puts them back.

    Example:
        >>> saved = capture_rng()
        >>> trial()              # draws random numbers
        >>> restore_rng(saved)   # as if it had not
    """
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and _cuda_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if _np is not None:
        states["numpy"] = _np.random.get_state()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Put back states from :func:`capture_rng`."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states and _np is not None:
        _np.random.set_state(states["numpy"])


def rng_to_portable(states: dict[str, Any]) -> dict[str, Any]:
    """The states as tensors, ints and strings (loadable with ``weights_only=True``)."""
    out = dict(states)
    if "numpy" in out:
        kind, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    version, internal, gauss_next = out["python"]
    out["python"] = {"version": version, "state": list(internal), "gauss": gauss_next}
    return out


def rng_from_portable(states: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`rng_to_portable`."""
    out = dict(states)
    if "numpy" in out and _np is not None:
        n = out["numpy"]
        out["numpy"] = (
            n["kind"],
            n["keys"].numpy().astype(_np.uint32),
            n["pos"],
            n["has_gauss"],
            n["gauss"],
        )
    p = out["python"]
    out["python"] = (p["version"], tuple(p["state"]), p["gauss"])
    return out
