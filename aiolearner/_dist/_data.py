"""Sharding a learner's data across ranks.

Training: a plain ``DataLoader`` over a map-style dataset is re-created with a
``DistributedSampler`` (shuffling as the given loader did, with a seed every rank shares), and the
sampler follows the learner's epochs: its ``set_epoch`` is called each time an epoch's iterator
starts, with the epoch that iterator belongs to, so a resumed epoch (mid-epoch included) draws
the order it drew the first time. A loader that already has a ``DistributedSampler`` keeps it
(only the epoch is driven).

Validation: every sample exactly once, without the padding a ``DistributedSampler`` adds, so the
reduced sums are those of one process over the whole set (:class:`ShardSampler`; shards may then
differ by one sample, which is fine: a validation pass issues no collective per batch).

Anything else cannot be sharded safely here and is refused with the way out: a DataLoader, or
``shard_data=False`` when every rank is given its own shard already.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from .._exceptions import ConfigurationError

__all__ = ["EpochSampler", "ShardSampler", "shard_train", "shard_val"]


class ShardSampler(Sampler[int]):
    """The indices ``rank, rank + world, ...`` of ``n`` samples: each sample on one rank, once."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n = n
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class EpochSampler(Sampler[int]):
    """A sampler with ``set_epoch`` (a ``DistributedSampler``) whose epoch follows the learner.

    ``epoch_of()`` gives the epoch the iterator being created belongs to; it is set just before
    the inner sampler draws its order, which happens when the epoch's iterator starts (also when
    a resumed epoch's iterator is rebuilt and fast-forwarded).
    """

    def __init__(self, sampler: DistributedSampler[Any], epoch_of: Callable[[], int]) -> None:
        self.sampler = sampler
        self.epoch_of = epoch_of

    def __iter__(self) -> Iterator[int]:
        self.sampler.set_epoch(self.epoch_of())
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        """The epoch the inner sampler drew its last order for."""
        return int(self.sampler.epoch)


def _how_to(name: str) -> str:
    return (
        f"give {name} as a torch.utils.data.DataLoader over a map-style Dataset (with its default "
        "sampler, shuffle=True or not, or a DistributedSampler), or shard the data per rank "
        "yourself and pass shard_data=False to the strategy"
    )


def _plain_loader(data: Any, name: str) -> DataLoader[Any]:
    if type(data) is not DataLoader:
        kind = type(data).__name__
        raise ConfigurationError(
            f"the strategy cannot shard {name} (a {kind}) across ranks safely: " + _how_to(name)
        )
    loader: DataLoader[Any] = data
    if isinstance(loader.dataset, IterableDataset):
        raise ConfigurationError(
            f"{name} is a DataLoader over an IterableDataset, which the strategy cannot split "
            "across ranks (every rank would see every sample): shard it in the dataset "
            "(torch.utils.data.get_worker_info and the rank) and pass shard_data=False, or "
            + _how_to(name)
        )
    if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
        raise ConfigurationError(
            f"{name} has a custom batch_sampler (or batch_size=None), which the strategy cannot "
            "split across ranks: " + _how_to(name)
        )
    return loader


def _rebuild(loader: DataLoader[Any], sampler: Sampler[int]) -> DataLoader[Any]:
    """``loader`` again, with ``sampler`` (everything else as it was)."""
    workers = loader.num_workers
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
        in_order=getattr(loader, "in_order", True),
    )


def shard_train(
    data: Any,
    *,
    rank: int,
    world_size: int,
    seed: int,
    epoch_of: Callable[[], int],
) -> tuple[DataLoader[Any], EpochSampler]:
    """The training loader of this rank, and its sampler (which follows the learner's epochs)."""
    loader = _plain_loader(data, "train_data")
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        inner: DistributedSampler[Any] = sampler
    elif type(sampler) is RandomSampler or type(sampler) is SequentialSampler:
        shuffle = isinstance(sampler, RandomSampler)
        if isinstance(sampler, RandomSampler) and (
            sampler.replacement or sampler._num_samples is not None
        ):
            raise ConfigurationError(
                "train_data samples with replacement (or a num_samples of its own), which the "
                "strategy cannot split across ranks: " + _how_to("train_data")
            )
        own = sampler.generator if isinstance(sampler, RandomSampler) else None
        if own is not None and own is not loader.generator:
            warnings.warn(
                "train_data's RandomSampler has a generator of its own, which the strategy does "
                "not use: the loader is re-created with a DistributedSampler that shuffles from "
                f"sampler_seed ({seed}); give the strategy sampler_seed= to choose the order",
                UserWarning,
                stacklevel=2,
            )
        inner = DistributedSampler(
            loader.dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
    else:
        raise ConfigurationError(
            f"train_data has a sampler of its own ({type(sampler).__name__}), which the strategy "
            "cannot split across ranks: use a torch.utils.data.DistributedSampler (the strategy "
            "calls its set_epoch every epoch), or shard the data yourself and pass "
            "shard_data=False"
        )
    follow = EpochSampler(inner, epoch_of)
    return _rebuild(loader, follow), follow


def shard_val(data: Any, *, rank: int, world_size: int) -> DataLoader[Any]:
    """The validation loader of this rank: its share of the samples, none twice."""
    loader = _plain_loader(data, "val_data")
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return loader  # the user's choice (it pads: some samples count twice)
    if type(sampler) is not SequentialSampler and type(sampler) is not RandomSampler:
        raise ConfigurationError(
            f"val_data has a sampler of its own ({type(sampler).__name__}), which the strategy "
            "cannot split across ranks: " + _how_to("val_data")
        )
    n = len(loader.dataset)  # type: ignore[arg-type]
    return _rebuild(loader, ShardSampler(n, rank, world_size))
