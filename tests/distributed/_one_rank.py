"""Strategies on a process group of one rank, in a process of its own.

``test_strategy.py`` runs this file with pytest in a subprocess: a process group (gloo's
threads) left in the main test process would make later tests that fork DataLoader workers
crash. The tests here exercise the agreement protocol, the plans and the guards under asyncio
and trio without a second process.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import anyio
import pytest
import torch
import torch.distributed as dist

from aiolearner import (
    DDP,
    FSDP,
    Callback,
    CollectiveError,
    ConfigurationError,
    StateView,
    StopFit,
)
from aiolearner._dist._agree import DistributedPlan

from ._helpers import flat, loader, make


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A gloo process group of one rank, made (and destroyed) by the test, not the strategy."""
    store = dist.HashStore()  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


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


async def test_a_stop_requested_before_fit_stops_that_run_only(world_of_one: None) -> None:
    # A signal that comes as fit starts, before the run has begun, is not lost; the request is
    # dropped when that run ends.
    strategy = DDP(agree_every=2)
    learner = make(strategy)
    strategy.request_stop("SIGTERM received")
    await learner.fit(3)
    assert learner.state.step == 0  # agreed when the first pass starts
    assert learner.state.stop_reason == "rank 0: SIGTERM received"
    await learner.fit(1)
    assert learner.state.step == len(loader())  # the next run is not stopped


async def test_no_sync_is_a_context_of_the_strategy(world_of_one: None) -> None:
    learner = make(DDP())
    context = learner.stage("update").context
    assert context.strategy is learner.strategy
    with context.no_sync():
        assert not learner.state.train_model.require_backward_grad_sync
    plain = make()
    with plain.stage("update").context.no_sync():
        pass
    assert plain.stage("update").context.strategy is None


async def test_a_concurrent_validation_cannot_block_on_a_collective(world_of_one: None) -> None:
    class ReducesInValidation(Callback):
        async def after_validate(self, state: StateView) -> None:
            state.strategy.all_reduce(torch.ones(1))

    learner = make(
        DDP(), callbacks=[ReducesInValidation()], val_data=loader(), validate="concurrent"
    )
    with pytest.raises(ExceptionGroup) as caught:
        await learner.fit(1)
    error = caught.value.exceptions[0]
    assert isinstance(error, CollectiveError)
    assert "sum_at_end_of" in str(error)
