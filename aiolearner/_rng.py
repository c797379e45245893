"""Capturing and restoring every random number generator training touches.

Two kinds of stream: the process's global generators (torch's CPU and CUDA ones, numpy's,
Python's), shared by data and compute, and the streams of one data source
(:func:`capture_data_streams`): the ``torch.Generator`` objects its loader and samplers draw from
(``DataLoader(generator=...)``, ``RandomSampler(generator=...)``) and the epoch of samplers that
shuffle by epoch (``DistributedSampler.set_epoch``). The learner captures both where a pass's
iterator is created (``_data.py``), so that a pass rebuilt later (``fit`` again after a
cancellation, or a checkpoint resumed in a fresh process) draws the same order.
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = [
    "capture_data_streams",
    "capture_rng",
    "drawn_between",
    "restore_data_streams",
    "restore_rng",
]

#: The attributes followed from a data source to the objects that draw its order: a DataLoader's
#: ``generator``, ``sampler`` and ``batch_sampler``, a BatchSampler's ``sampler``, a sampler's
#: ``generator``.
_STREAM_ATTRIBUTES = ("generator", "sampler", "batch_sampler")
#: How many objects the search visits at most (a loader, its samplers, their generators).
_STREAM_SEARCH_LIMIT = 32

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


def capture_torch_rng() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The states of torch's own global generators (CPU, and CUDA's once initialized): what a
    model's dropout draws from. Reading them costs a fraction of :func:`capture_rng`, whose
    numpy and Python states are the dear part."""
    cuda = torch.cuda.get_rng_state_all() if _cuda_initialized() else None
    return torch.default_generator.get_state(), cuda


def restore_torch_rng(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    """Put back states from :func:`capture_torch_rng`."""
    cpu, cuda = states
    torch.default_generator.set_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def drawn_between(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    """Which of the global generators data and compute can both draw from on the CPU (torch's,
    numpy's, Python's) moved between two :func:`capture_rng` states. (CUDA's are not
    compared: dropout on the device and augmentation on the CPU draw from different ones.)"""
    moved = set()
    if not torch.equal(before["torch"], after["torch"]):
        moved.add("torch")
    if before["python"] != after["python"]:
        moved.add("python")
    if "numpy" in before and "numpy" in after:
        _, keys, pos, has_gauss, gauss = before["numpy"]
        _, keys2, pos2, has_gauss2, gauss2 = after["numpy"]
        same = (pos, has_gauss, gauss) == (pos2, has_gauss2, gauss2)
        if not same or not _np.array_equal(keys, keys2):
            moved.add("numpy")
    return moved


def restore_rng(states: dict[str, Any]) -> None:
    """Put back states from :func:`capture_rng` (those it holds)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "python" in states:
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


def data_streams(data: object) -> tuple[list[torch.Generator], list[Any]]:
    """The random streams of a data source besides the global generators: the torch generators
    its loader and samplers draw from, and its samplers that shuffle by epoch (a ``set_epoch``
    method and an int ``epoch``, as ``DistributedSampler`` has), each in a fixed order (the same
    for a source built the same way, so that a checkpoint's states find their generators)."""
    generators: list[torch.Generator] = []
    samplers: list[Any] = []
    seen: set[int] = set()
    todo = [data]
    while todo and len(seen) < _STREAM_SEARCH_LIMIT:
        obj = todo.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            generators.append(obj)
            continue
        if isinstance(obj, str | bytes | int | float | list | tuple | dict | torch.Tensor):
            continue  # data, not a loader or a sampler
        if callable(getattr(obj, "set_epoch", None)) and type(getattr(obj, "epoch", None)) is int:
            samplers.append(obj)
        for attr in _STREAM_ATTRIBUTES:
            child = getattr(obj, attr, None)
            if child is not None:
                todo.append(child)
    return generators, samplers


def capture_data_streams(data: object) -> dict[str, Any]:
    """The states of :func:`data_streams` (``{"generators": [...], "epochs": [...]}``), in a
    form ``torch.load(weights_only=True)`` accepts."""
    generators, samplers = data_streams(data)
    return {
        "generators": [g.get_state() for g in generators],
        "epochs": [int(s.epoch) for s in samplers],
    }


def restore_data_streams(data: object, saved: dict[str, Any], *, what: str) -> None:
    """Put back states from :func:`capture_data_streams` (``what`` names the source in errors).

    Raises:
        ValueError: the source does not have the streams the states were taken from.
    """
    generators, samplers = data_streams(data)
    states, epochs = list(saved["generators"]), list(saved["epochs"])
    if len(states) != len(generators) or len(epochs) != len(samplers):
        raise ValueError(
            f"the saved random streams of {what} ({len(states)} generators, {len(epochs)} "
            f"epoch samplers) do not match it ({len(generators)} generators, {len(samplers)} "
            "epoch samplers): it was built differently"
        )
    for generator, state in zip(generators, states, strict=True):
        generator.set_state(state.cpu())
    for sampler, epoch in zip(samplers, epochs, strict=True):
        sampler.set_epoch(int(epoch))
