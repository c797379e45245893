"""Strategies without a second process: nothing of them without one, refusals, sharding; and, in
a subprocess, the agreement protocol, plans and guards on a group of one rank (``_one_rank.py``).
The 2-process behaviour is in ``test_ddp.py``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from data_helpers import Sized
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
)

from aiolearner import (
    DDP,
    Callback,
    ConfigurationError,
    StateView,
)
from aiolearner._dist._data import EpochSampler, ShardSampler, shard_train, shard_val
from aiolearner._dist._settings import differences, settings_of
from aiolearner._plan import HookPlan
from aiolearner.testing import make_batches

from ._helpers import data, loader, make

ONE_RANK = Path(__file__).with_name("_one_rank.py")


# -- nothing of it without a strategy --------------------------------------------------------------


async def test_no_strategy_means_none_of_it() -> None:
    class Hooked(Callback):
        def after_fit_batch(self, state: StateView) -> None:
            pass

        def after_epoch(self, state: StateView) -> None:
            assert state.strategy is None

    learner = make(callbacks=[Hooked()])
    assert learner.strategy is None
    assert learner._rt.strategy is None
    assert learner.state.train_model is learner.model
    plans = [p for s in learner.stages.walk() for p in (s._before, s._after) if p is not None]
    assert plans
    assert all(type(p) is HookPlan for p in plans)
    assert "strategy" not in learner.describe()
    await learner.fit(1)


# -- refusals, with the way out --------------------------------------------------------------------


def test_ddp_without_a_group_or_torchrun_says_how_to_launch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="torchrun --nproc-per-node=N"):
        make(DDP())


@pytest.mark.parametrize(
    ("train", "words"),
    [
        (make_batches(4), "a list"),
        (DataLoader(data(), batch_size=None), "custom batch_sampler"),
        (DataLoader(data(), batch_size=4, sampler=range(32)), "sampler of its own"),
        (
            DataLoader(
                data(),
                batch_size=4,
                sampler=torch.utils.data.RandomSampler(data(), replacement=True),
            ),
            "replacement",
        ),
    ],
)
def test_unshardable_training_data_is_refused_with_the_way_out(train: Any, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words) as caught:
        shard_train(train, rank=0, world_size=2, seed=0, epoch_of=lambda: 0)
    assert "shard_data=False" in str(caught.value)


def test_an_iterable_dataset_is_refused() -> None:
    class Stream(IterableDataset[int]):
        def __iter__(self) -> Iterator[int]:
            return iter(range(8))

    with pytest.raises(ConfigurationError, match="IterableDataset"):
        shard_val(DataLoader(Stream(), batch_size=2), rank=0, world_size=2)


def test_validation_shards_cover_every_sample_once() -> None:
    shards = [list(ShardSampler(101, rank, 2)) for rank in (0, 1)]
    assert [len(s) for s in shards] == [51, 50]
    assert sorted(shards[0] + shards[1]) == list(range(101))
    val = shard_val(DataLoader(data(101), batch_size=10), rank=1, world_size=2)
    assert sum(len(y) for _, y in val) == 50


def test_the_training_sampler_follows_the_learners_epoch() -> None:
    epoch = [0]
    train, sampler = shard_train(
        loader(shuffle=True), rank=1, world_size=2, seed=3, epoch_of=lambda: epoch[0]
    )
    assert isinstance(sampler, EpochSampler)
    assert isinstance(sampler.sampler, DistributedSampler)
    first = list(sampler)
    epoch[0] = 1
    second = list(sampler)
    assert sampler.epoch == 1
    assert first != second
    assert len(first) == len(second) == 16
    assert len(train) == 4  # 16 of the 32 samples, in batches of 4


def test_a_random_samplers_own_generator_is_replaced_with_a_warning() -> None:
    chosen = torch.Generator().manual_seed(1)
    own = DataLoader(data(32), batch_size=4, sampler=RandomSampler(data(32), generator=chosen))
    with pytest.warns(UserWarning, match="generator of its own.*sampler_seed"):
        shard_train(own, rank=0, world_size=2, seed=3, epoch_of=lambda: 0)
    # The loader's own generator (shuffle=True, generator=...) still seeds its workers: no word.
    given = DataLoader(data(32), batch_size=4, shuffle=True, generator=chosen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shard_train(given, rank=0, world_size=2, seed=3, epoch_of=lambda: 0)


# -- on a process group of one rank (in a process of its own) --------------------------------------


def test_on_a_group_of_one_rank_in_a_process_of_its_own() -> None:
    """``_one_rank.py``: the protocol, plans and guards on one rank, asyncio and trio."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ONE_RANK)],
        cwd=ONE_RANK.parents[2],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]


def test_the_settings_ranks_compare_name_each_difference_with_every_ranks_value() -> None:
    """What ``Learner(...)`` gathers from every rank before it wraps the model (the 2-rank
    launch in test_ddp.py raises it on both ranks)."""

    def found(hidden: int, lr: float, layers: int) -> dict[str, Any]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(4, hidden) for _ in range(layers)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        return settings_of(DDP(agree_every=3), model, {"main": optimizer})

    assert differences([found(4, 0.1, 1), found(4, 0.1, 1)]) == []
    assert differences([found(4, 0.1, 1), found(5, 0.2, 2)]) == [
        "the model's number of parameters (rank 0: 2, rank 1: 4)",
        "model parameter '0.weight' (rank 0: '(4, 4) float32', rank 1: '(5, 4) float32')",
        "model parameter '0.bias' (rank 0: '(4,) float32', rank 1: '(5,) float32')",
        "the optimizer's parameter groups (rank 0: (2,), rank 1: (4,))",
        "the optimizer's lr (group 0) (rank 0: 0.1, rank 1: 0.2)",
        "model parameter '1.weight' (rank 0: (none), rank 1: '(5, 4) float32')",
        "model parameter '1.bias' (rank 0: (none), rank 1: '(5,) float32')",
    ]

    # Alike: a NaN on every rank, an implementation option, a device of each rank's own.
    def options(foreach: bool, device: int) -> dict[str, Any]:
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=float("nan"), foreach=foreach)
        return settings_of(DDP(output_device=device), model, {"main": optimizer})

    assert differences([options(True, 0), options(False, 1)]) == []
    lazy = settings_of(DDP(), torch.nn.LazyLinear(2), {"main": torch.optim.SGD([torch.ones(1)])})
    assert lazy["model parameter 'weight'"] == "uninitialized"
    norm = settings_of(DDP(), torch.nn.BatchNorm1d(3), {"main": torch.optim.SGD([torch.ones(1)])})
    assert norm["model buffer 'running_mean'"] == "(3,) float32"
    lazy_norm = settings_of(
        DDP(), torch.nn.LazyBatchNorm1d(), {"main": torch.optim.SGD([torch.ones(1)])}
    )
    assert lazy_norm["model buffer 'running_mean'"] == "uninitialized"
    # Buffers DDP is told not to broadcast may be each rank's own.
    unsent = DDP(broadcast_buffers=False)
    kept = settings_of(unsent, torch.nn.BatchNorm1d(3), {"main": torch.optim.SGD([torch.ones(1)])})
    assert not [key for key in kept if key.startswith("model buffer")]


# -- found while testing the strategies ------------------------------------------------------------


async def test_a_pass_handed_to_its_producer_on_its_last_batch_keeps_it() -> None:
    """``Batches.next()`` (what Validate and users' passes call) when the inline fetch of the last
    batch hands the source over to the producer thread: that batch still arrives, first."""
    seen: list[int] = []

    class Count(Callback):
        reads = frozenset({"batch"})

        def after_validate_batch(self, state: StateView) -> None:
            seen.append(len(state.batch[1]))

    val = Sized(make_batches(2, batch_size=3, n_out=2))
    # Every fetch is over a zero budget: the second one of a pass switches to the producer.
    learner = make(
        train=make_batches(2, n_out=2), val_data=val, fetch_budget=0.0, callbacks=[Count()]
    )
    await learner.validate()
    await learner.validate()
    assert seen == [3, 3, 3, 3]
    assert "val_data: fetch=auto: a producer thread (found slow)" in learner.describe()
