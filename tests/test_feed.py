"""Feed: records from a producer task, batched for the learner, with back-pressure."""

from __future__ import annotations

import gc
import warnings

import anyio
import pytest
import torch
from anyio import wait_all_tasks_blocked

from aiolearner import Callback, Feed, FitHandle, RunState, StateView
from aiolearner.testing import make_learner

Record = tuple[torch.Tensor, torch.Tensor]


def record(i: int) -> Record:
    """Record ``i``: its inputs carry ``i`` so that batches can be traced back to records."""
    return torch.full((4,), float(i)), torch.tensor(i % 3)


class SeenRecords(Callback):
    reads = frozenset({"batch"})

    def __init__(self) -> None:
        self.ids: list[list[int]] = []

    def before_fit_batch(self, state: StateView) -> None:
        inputs, _ = state.batch
        self.ids.append([int(v) for v in inputs[:, 0]])


async def test_every_record_once_in_order_across_epochs_then_stopped() -> None:
    feed = Feed[Record](batch_size=3, buffer=4)
    seen = SeenRecords()
    learner = make_learner(
        train_data=feed, with_validation=False, steps_per_epoch=2, callbacks=[seen]
    )

    async def produce() -> None:
        async with feed:
            for i in range(20):
                await feed.send(record(i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        state = await FitHandle(learner, 100).run()
    # 20 records in batches of 3: six full batches and a short one; then the feed has ended.
    assert state is RunState.STOPPED
    assert [i for batch in seen.ids for i in batch] == list(range(20))
    assert [len(b) for b in seen.ids] == [3, 3, 3, 3, 3, 3, 2]
    assert learner.state.step == 7
    assert learner.state.epoch == 3


async def test_producer_failure_raises_in_fit_after_earlier_records() -> None:
    feed = Feed[Record](batch_size=2, buffer=2)
    seen = SeenRecords()
    learner = make_learner(train_data=feed, with_validation=False, callbacks=[seen])

    async def produce() -> None:
        async with feed:
            for i in range(5):
                await feed.send(record(i))
            raise ConnectionError("sensor went away")

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        with pytest.raises(ConnectionError, match="sensor went away") as info:
            await learner.fit(1)
    assert any("train_data (Feed)" in note for note in info.value.__notes__)
    assert [i for batch in seen.ids for i in batch] == [0, 1, 2, 3, 4]


async def test_send_waits_while_the_buffer_is_full() -> None:
    feed = Feed[Record](batch_size=2, buffer=3)
    sent = 0

    async def produce() -> None:
        nonlocal sent
        async with feed:
            for i in range(10):
                await feed.send(record(i))
                sent += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        await wait_all_tasks_blocked()
        assert sent == 3  # the producer waits for the learner instead of buffering more
        batch = await feed.__anext__()
        assert batch[0].shape == (2, 4)
        await wait_all_tasks_blocked()
        assert sent == 5
        tg.cancel_scope.cancel()
    assert feed.closed
    await feed.aclose()


def test_feed_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        Feed[Record](batch_size=0)
    with pytest.raises(ValueError, match="buffer"):
        Feed[Record](batch_size=1, buffer=0)


async def test_a_feed_or_event_stream_dropped_unread_frees_its_buffer_quietly() -> None:
    # The run stopped before the feed (or a subscriber) read everything: no ResourceWarning
    # for the memory streams inside, whenever the garbage collector gets to them.
    feed = Feed[tuple[torch.Tensor, int]](batch_size=2)
    for _ in range(3):
        await feed.send((torch.zeros(3), 0))
    feed.close()
    stream = make_learner().events()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del feed, stream
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
