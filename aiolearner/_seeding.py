"""Reproducible runs: seeding every global random generator, and DataLoader workers.

What makes two runs with the same seed deal the same batches:

* :func:`seed_everything` seeds Python's ``random``, numpy's global generator and torch's CPU and
  CUDA generators; with ``deterministic=True`` it also makes torch refuse nondeterministic
  kernels.
* A DataLoader draws its shuffling order and the base seed of its workers from torch's global
  generator (or from its own ``generator``) when an epoch's iterator is made. Torch seeds each
  worker's ``random``, numpy and torch generators from that base seed; :func:`seed_worker`
  also reseeds the generators a dataset keeps as its own attributes (``numpy.random.Generator``,
  ``random.Random``, ``torch.Generator``), which nothing else would, and which every worker would
  otherwise inherit in the same state.

Checkpoints (``Learner.state_dict``) capture the global generators, and the state they had when
the epoch began, so a resumed run deals the same batches again; a loader's own ``generator`` is
not captured, which is why :func:`dataloader_seeding` leaves it out unless asked.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import random
from typing import Any

import torch

__all__ = ["SeedState", "dataloader_seeding", "seed_everything", "seed_worker"]

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

# cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2); torch raises without it
# once deterministic algorithms are on.
_CUBLAS = "CUBLAS_WORKSPACE_CONFIG"


@dataclasses.dataclass(frozen=True)
class SeedState:
    """What :func:`seed_everything` set.

    Attributes:
        seed: the seed.
        numpy: whether numpy's global generator was seeded (numpy is installed).
        cuda: whether CUDA generators were seeded (CUDA is available; torch seeds them lazily).
        deterministic: whether deterministic algorithms were switched on.
        env: environment variables set (``CUBLAS_WORKSPACE_CONFIG`` in deterministic mode).
    """

    seed: int
    numpy: bool
    cuda: bool
    deterministic: bool
    env: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        """The record as a JSON-able dict (for ``Learner(hparams=...)`` or a log)."""
        return dataclasses.asdict(self)


def seed_everything(seed: int, *, deterministic: bool = False) -> SeedState:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device).

    Call it before building the model and the data, so that initial weights, shuffling and
    augmentation all follow from ``seed``. With ``deterministic=True`` it also calls
    ``torch.use_deterministic_algorithms(True)`` (an operation without a deterministic
    implementation then raises instead of varying), sets cuDNN to deterministic and turns its
    benchmark (autotuning) off, and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless it is set.
    With ``deterministic=False`` those switches are left as they are.

    Args:
        seed: an integer in ``[0, 2**32 - 1]`` (numpy's range).
        deterministic: also switch torch to deterministic algorithms.

    Returns:
        What was set, as a :class:`SeedState`.

    Raises:
        ValueError: a seed out of range.
        TypeError: a seed that is not an integer.

    Example:
        >>> seeded = seed_everything(42, deterministic=True)
        >>> learner = Learner(..., hparams={"seed": seeded.seed})
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)  # a numpy integer, say
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32 - 1], got {seed}")
    random.seed(seed)
    if _np is not None:
        _np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device's generator
    env: dict[str, str] = {}
    if deterministic:
        if _CUBLAS not in os.environ:
            os.environ[_CUBLAS] = env[_CUBLAS] = ":4096:8"
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return SeedState(
        seed=seed,
        numpy=_np is not None,
        cuda=torch.cuda.is_available(),
        deterministic=deterministic,
        env=env,
    )


def _reseed_owned(obj: object, seed: int) -> None:
    """Reseed the generators an object holds as attributes, each from its own derived seed."""
    try:
        attributes = sorted(vars(obj).items())
    except TypeError:  # no __dict__
        return
    for i, (_, value) in enumerate(attributes):
        derived = (seed + 0x9E3779B1 * (i + 1)) % 2**32
        if _np is not None and isinstance(value, _np.random.Generator):
            value.bit_generator.state = type(value.bit_generator)(derived).state
        elif isinstance(value, random.Random):
            value.seed(derived)
        elif isinstance(value, torch.Generator):
            value.manual_seed(derived)


def seed_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: reseed the generators the dataset holds, per worker.

    Torch gives each worker the seed ``base_seed + worker_id`` (the base seed is drawn from
    torch's global generator, or the loader's ``generator``, for each epoch's iterator) and
    seeds the worker's ``random``, numpy and torch global generators from it. Generators that
    the dataset keeps as attributes (``numpy.random.Generator``, ``random.Random``,
    ``torch.Generator``) are not seeded by anyone: copied into each worker from the main
    process, they give every worker the same numbers, and, made without a seed
    (``numpy.random.default_rng()``), different numbers in every run. This function reseeds each
    of them from the worker's seed, so each worker and each epoch gets its own stream, and the
    same seed gives the same streams. (Generators nested deeper, in attributes of attributes,
    are left alone.)

    Example:
        >>> DataLoader(dataset, num_workers=2, worker_init_fn=seed_worker)
        >>> DataLoader(dataset, num_workers=2, **dataloader_seeding())  # the same
    """
    info = torch.utils.data.get_worker_info()
    if info is not None:
        _reseed_owned(info.dataset, info.seed % 2**32)


def dataloader_seeding(seed: int | None = None) -> dict[str, Any]:
    """Keyword arguments for a ``torch.utils.data.DataLoader`` that make its workers reproducible.

    ``{"worker_init_fn": seed_worker}``, and with ``seed`` also ``{"generator":
    torch.Generator().manual_seed(seed)}``: the loader then draws its shuffling order and worker
    seeds from its own generator instead of torch's global one, so other users of the global
    generator (model initialization, dropout, augmentation in the main process) do not change
    the order. Leave ``seed`` out for a training loader whose runs must resume exactly from a
    mid-run checkpoint: the learner's checkpoints capture the global generators, not a loader's
    own (its resumed epoch would deal the first epoch's order again).

    Example:
        >>> seed_everything(0)
        >>> train = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2,
        ...                    **dataloader_seeding())
    """
    kwargs: dict[str, Any] = {"worker_init_fn": seed_worker}
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return kwargs
