"""Every random stream a batch depends on is captured where a pass's iterator is created, so that
"fit again" and "resume from a state dict" are exact from any cancellation point.

The cases are trials of ``bench/resume_soak.py`` (which runs hundreds of random ones): per-loader
generators, samplers with their own generator (with and without replacement), a
DistributedSampler whose epoch a callback sets, the global generator; inline and threaded
fetching and compute; epoch starts; fused and awaited batches.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    TensorDataset,
)

from aiolearner import Learner
from aiolearner._rng import capture_data_streams, data_streams, restore_data_streams
from aiolearner.testing import make_batches, make_learner
from bench.resume_soak import (
    EPOCHS,
    Cancel,
    Setup,
    build,
    make_data,
    outcome,
    reference,
    same,
    trial,
)

CASES = [
    # A per-loader generator (docs/embedding.md's advice for concurrent trials), mid-epoch.
    (Setup("loader_generator", "inline", "inline"), Cancel("def", "before_fit_batch", 1, 7)),
    (Setup("loader_generator", "thread", "thread"), Cancel("async", "after_gradient", 1, 6)),
    # Epoch starts, the iterator made by a producer thread (issue 12, item 5).
    (Setup("global", "thread", "inline"), Cancel("async", "before_fit", 1, 0)),
    (Setup("sampler_generator", "thread", "inline"), Cancel("def", "before_epoch", 1, 0)),
    (Setup("loader_generator", "thread", "auto"), Cancel("def", "before_epoch", 2, 0)),
    # A sampler drawing as it goes (with replacement), a fetch policy that may switch.
    (Setup("replacement", "auto", "thread"), Cancel("def", "after_fit_batch", 2, 12)),
    # DistributedSampler: its epoch is part of the stream.
    (Setup("dist", "inline", "inline"), Cancel("async", "after_update", 1, 8)),
    # Committed, then interrupted in after_update: the batch's loss still counts.
    (Setup("list", "inline", "inline"), Cancel("async", "after_update", 2, 12)),
    # A dataset drawing augmentation from the global generators while batches are fetched
    # ahead (by a producer thread, or by the loop while compute runs in the worker): the
    # rebuilt pass draws the batches fetched ahead again, so the generators agree with it.
    (Setup("global", "thread", "inline", True), Cancel("def", "after_fit_batch", 0, 2)),
    (Setup("loader_generator", "inline", "thread", True), Cancel("async", "after_update", 1, 7)),
    (Setup("sampler_generator", "auto", "thread", True), Cancel("def", "before_fit_batch", 2, 11)),
    (Setup("replacement", "thread", "thread", True), Cancel("async", "after_gradient", 1, 5)),
    (Setup("dist", "thread", "auto", True), Cancel("def", "before_epoch", 1, 0)),
    (Setup("global", "inline", "inline", True), Cancel("def", "after_fit_batch", 1, 8)),
    # Augmentation and dropout both draw, fetched inline: an awaited batch undone half way
    # fetches again from the state before its fetch (what bench.resume_soak found).
    (Setup("global", "inline", "inline", True), Cancel("async", "after_gradient", 1, 7)),
    # The same with default settings (fetch and compute "auto").
    (Setup("global", "auto", "auto", True), Cancel("async", "after_gradient", 1, 7)),
    (Setup("loader_generator", "auto", "auto", True), Cancel("def", "before_epoch", 2, 0)),
    # Every fetch found slow (fetch_budget 0): fetch="auto" keeps the source inline, its draws
    # shared with dropout's, also in a fresh learner whose rebuilt pass first serves batches
    # drawn before the cancellation (those draw nothing as they are served).
    (
        Setup("sampler_generator", "auto", "auto", True, 0.0),
        Cancel("async", "after_fit_batch", 0, 4),
    ),
    (Setup("dist", "auto", "thread", True, 0.0), Cancel("timer", delay=0.005)),
    (Setup("global", "auto", "inline", True, 0.0), Cancel("def", "after_gradient", 1, 7)),
]


@pytest.mark.parametrize(("setup", "cancel"), CASES, ids=lambda c: str(c))
async def test_fit_again_and_resume_are_exact(setup: Setup, cancel: Cancel) -> None:
    torch.manual_seed(0)
    again, resumed, where = await trial(setup, cancel)
    assert again, f"fit again after a cancellation at {where}"
    assert resumed, f"resume from the state dict taken at {where}"


def test_the_streams_of_a_loader_and_its_samplers_are_found() -> None:
    loader, _ = make_data("loader_generator")
    generators, samplers = data_streams(loader)
    assert generators == [loader.generator]  # the sampler's is the same object
    assert samplers == []
    own = torch.Generator().manual_seed(1)
    ten = TensorDataset(torch.arange(10))
    sampler = RandomSampler(ten, generator=own)
    batched = DataLoader(ten, batch_sampler=BatchSampler(sampler, 3, drop_last=False))
    assert data_streams(batched)[0] == [own]
    dist_loader, _ = make_data("dist")
    assert isinstance(dist_loader.sampler, DistributedSampler)
    assert data_streams(dist_loader)[1] == [dist_loader.sampler]
    assert data_streams(make_batches(3)) == ([], [])


def test_streams_are_put_back_and_checked() -> None:
    loader, _ = make_data("dist")
    saved = capture_data_streams(loader)
    loader.sampler.set_epoch(7)
    restore_data_streams(loader, saved, what="train_data")
    assert loader.sampler.epoch == 0
    other, _ = make_data("loader_generator")
    with pytest.raises(ValueError, match="do not match"):
        restore_data_streams(other, saved, what="train_data")


async def test_a_checkpoint_of_other_data_streams_is_refused_and_changes_nothing() -> None:
    learner = build(Setup("loader_generator", "inline", "inline"), [])
    await learner.fit(1)
    checkpoint = learner.state_dict()
    plain = build(Setup("list", "inline", "inline"), [])
    before = [p.detach().clone() for p in plain.model.parameters()]
    with pytest.raises(ValueError, match="train_data"):
        plain.load_state_dict(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(before, plain.model.parameters(), strict=True))
    assert (plain.state.epoch, plain.state.step) == (0, 0)


def test_a_learner_runs_under_another_event_loop_and_backend_next_time() -> None:
    # Nothing bound to an event loop is made when the learner is built or kept between runs
    # (the producer's capacity limiter was): fit_sync on asyncio, then on trio, fetching in a
    # producer thread.
    learner: Learner[Any] = make_learner(fetch="thread", n_batches=3)
    learner.fit_sync(1, backend="asyncio")
    learner.fit_sync(2, backend="trio")
    learner.fit_sync(3, backend="asyncio")
    assert learner.state.step == 9


async def test_fit_again_after_a_cancellation_before_the_iterator_was_made() -> None:
    # Cancelled before the run's first await, which is the hop to the producer thread that
    # creates the first epoch's iterator: the pass had not begun (nothing drew from the
    # generators), so fit again begins it afresh.
    setup = Setup("global", "thread", "inline")
    expected, _ = await reference(setup)
    learner = build(setup, [])
    with anyio.CancelScope() as scope:
        scope.cancel()
        await learner.fit(EPOCHS)
    assert learner.state.step == 0
    await learner.fit(EPOCHS)
    assert same(outcome(learner), expected)
