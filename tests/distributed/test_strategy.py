"""Strategies in this process: refusals at build, sharding, plans, guards, and the agreement
protocol on a process group of one rank (asyncio and trio); the 2-process behaviour is in
test_ddp.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    TensorDataset,
)

from aiolearner import (
    DDP,
    FSDP,
    Callback,
    CollectiveError,
    ConfigurationError,
    Learner,
    StateView,
    StopFit,
)
from aiolearner._dist._agree import DistributedPlan
from aiolearner._dist._data import EpochSampler, ShardSampler, shard_train, shard_val
from aiolearner._plan import HookPlan
from aiolearner.testing import make_batches, tiny_model


def data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))


def loader(n: int = 32, **kwargs: Any) -> DataLoader[Any]:
    return DataLoader(data(n), batch_size=4, **kwargs)


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A gloo process group of one rank, made (and destroyed) by the test, not the strategy."""
    store = dist.HashStore()  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def make(strategy: Any = None, **options: Any) -> Learner[Any]:
    torch.manual_seed(0)
    model = tiny_model(4, 2)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        options.pop("train", None) or loader(shuffle=True),
        strategy=strategy,
        **options,
    )


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


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


def test_timed_validation_and_skipped_snapshots_are_refused(world_of_one: None) -> None:
    val = loader()
    with pytest.raises(ConfigurationError, match="duration"):
        make(DDP(), val_data=val, validate_every=timedelta(seconds=1))
    with pytest.raises(ConfigurationError, match="snapshot_policy='skip'"):
        make(DDP(), val_data=val, validate="concurrent", snapshot_policy="skip")
    with pytest.raises(ConfigurationError, match="FSDP cannot validate concurrently"):
        make(FSDP(), val_data=val, validate="concurrent")


def test_a_strategy_serves_one_learner(world_of_one: None) -> None:
    strategy = DDP()
    make(strategy)
    with pytest.raises(ConfigurationError, match="a strategy of its own"):
        make(strategy)


def test_too_many_threads_for_the_cores_are_warned_about(
    world_of_one: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.warns(RuntimeWarning, match="torch threads"):
            make(DDP())
    finally:
        torch.set_num_threads(threads)


# -- plans and the guard ---------------------------------------------------------------------------


class Reduces(Callback):
    """An async callback issuing a collective in after_epoch."""

    def __init__(self, name: str, collectives: bool) -> None:
        self._name = name
        self.collectives = collectives  # type: ignore[misc]

    @property
    def name(self) -> str:
        return self._name

    async def after_epoch(self, state: StateView) -> None:
        state.strategy.all_reduce(torch.ones(1))


def test_callbacks_issuing_collectives_run_alone_in_plan_order(world_of_one: None) -> None:
    plain = make(callbacks=[Reduces("A", True), Reduces("B", True)])
    assert "concurrently" in plain.describe()  # without a strategy: as before
    learner = make(DDP(), callbacks=[Reduces("A", True), Reduces("B", True)])
    plan = learner.stage("epoch")._after
    assert isinstance(plan, DistributedPlan)
    assert [[e.name for e in (*layer.sync, *layer.concurrent)] for layer in plan.layers] == [
        ["A"],
        ["B"],
    ]


async def test_concurrent_callbacks_cannot_issue_collectives(world_of_one: None) -> None:
    learner = make(DDP(), callbacks=[Reduces("A", False), Reduces("B", False)])
    with pytest.raises(ExceptionGroup) as caught:
        await learner.fit(1)
    errors = caught.value.exceptions
    assert sorted(str(e.callback) for e in errors if isinstance(e, CollectiveError)) == ["A", "B"]


async def test_background_tasks_cannot_issue_collectives(world_of_one: None) -> None:
    class Background(Callback):
        def after_epoch(self, state: StateView) -> None:
            strategy = state.strategy

            async def reduce() -> None:
                strategy.all_reduce(torch.ones(1))

            state.start_soon(reduce, name="upload")

    learner = make(DDP(), callbacks=[Background()])
    with pytest.raises(ExceptionGroup) as caught:
        await learner.fit(1)
    error = caught.value.exceptions[0]
    assert isinstance(error, CollectiveError)
    assert error.callback == "upload"


# -- the protocol on one rank (asyncio and trio) ---------------------------------------------------


async def test_one_rank_trains_as_one_process(world_of_one: None) -> None:
    # Unshuffled: a shuffling loader gets a DistributedSampler, whose order is its own.
    alone = make(train=loader())
    await alone.fit(2)
    distributed = make(DDP(), train=loader())
    await distributed.fit(2)
    assert torch.equal(flat(alone.model), flat(distributed.model))
    assert distributed.state.train_model is not distributed.model  # the DDP wrapper
    strategy = distributed.strategy
    assert strategy is not None
    assert (strategy.rank, strategy.world_size, strategy.is_main) == (0, 1, True)
    assert not strategy.created_group  # the test's group: reused, and left to the test
    assert "strategy: DDP, rank 0 of 1" in distributed.describe()


async def test_a_stop_in_a_batch_is_acted_on_at_the_next_agreement(world_of_one: None) -> None:
    class StopAt1(Callback):
        reads = frozenset({"step"})

        def after_fit_batch(self, state: StateView) -> None:
            if state.step == 1:
                raise StopFit("enough")

    learner = make(DDP(agree_every=3), callbacks=[StopAt1()])
    await learner.fit(2)
    assert learner.state.step == 3  # the batch completes; the agreement at step 3 stops
    assert learner.state.stop_reason == "rank 0: enough"


async def test_an_outside_cancellation_waits_for_the_agreement(world_of_one: None) -> None:
    scope = anyio.CancelScope()

    class CancelAt2(Callback):
        reads = frozenset({"step"})

        def after_fit_batch(self, state: StateView) -> None:
            if state.step == 2:
                scope.cancel()

    learner = make(DDP(agree_every=5), callbacks=[CancelAt2()], compute="inline")
    with scope:
        await learner.fit(2)
    assert scope.cancelled_caught
    assert learner.state.step == 5  # at the agreement, not at the next await
    await learner.fit(2)  # continues exactly
    whole = make(DDP(agree_every=5), compute="inline")
    await whole.fit(2)
    assert torch.equal(flat(learner.model), flat(whole.model))


async def test_request_stop_from_outside_stops_the_run(world_of_one: None) -> None:
    strategy = DDP(agree_every=2)

    class Ask(Callback):
        reads = frozenset({"step"})

        def after_fit_batch(self, state: StateView) -> None:
            if state.step == 3:
                strategy.request_stop("preempted")

    learner = make(strategy, callbacks=[Ask()])
    await learner.fit(3)
    assert learner.state.step == 4
    assert learner.state.stop_reason == "rank 0: preempted"


async def test_no_sync_is_a_context_of_the_strategy(world_of_one: None) -> None:
    learner = make(DDP())
    context = learner.stage("update").context
    assert context.strategy is learner.strategy
    with context.no_sync():
        assert not learner.state.train_model.require_backward_grad_sync
    plain = make()
    with plain.stage("update").context.no_sync():
        pass
    with contextlib.suppress(AttributeError):
        assert plain.stage("update").context.strategy is None
