"""examples/online: an async producer feeding the learner, with back-pressure, end and failure."""

from __future__ import annotations

import pytest

from aiolearner import RunState
from examples.online.train import Sensor, train_online


async def test_endless_stream_trains_with_bounded_buffering() -> None:
    sensor = Sensor()
    learner, feed, state = await train_online(4, sensor, steps_per_epoch=5, batch_size=8, buffer=16)
    assert state is RunState.COMPLETED
    assert (learner.state.epoch, learner.state.step) == (4, 20)
    # The learner took its 20 batches plus at most its prefetch depth and one in flight.
    assert 20 * 8 <= feed.received <= (20 + 3) * 8
    # Back-pressure: the sensor got at most `buffer` readings ahead of the learner.
    assert sensor.sent <= feed.received + feed.buffer


async def test_stream_end_stops_fit_after_the_last_records() -> None:
    sensor = Sensor(records=100)
    learner, feed, state = await train_online(10, sensor, steps_per_epoch=2, batch_size=32)
    assert state is RunState.STOPPED
    assert feed.received == 100
    assert learner.state.step == 4  # three full batches and one of 4 records
    assert learner.state.epoch == 2


async def test_producer_failure_surfaces_in_fit_as_itself() -> None:
    sensor = Sensor(fail_after=70)
    with pytest.raises(ConnectionError, match="after 70 readings") as info:
        await train_online(10, sensor, steps_per_epoch=100, batch_size=32)
    assert any("raised by train_data (Feed)" in note for note in info.value.__notes__)
    assert sensor.sent == 70


async def test_it_learns() -> None:
    longer, _, _ = await train_online(6, Sensor(seed=3), steps_per_epoch=20)
    shorter, _, _ = await train_online(1, Sensor(seed=3), steps_per_epoch=20)
    assert longer.state.metrics["train_loss"] < 0.6 * shorter.state.metrics["train_loss"]
