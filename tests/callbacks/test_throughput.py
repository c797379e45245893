from __future__ import annotations

import pytest

from aiolearner import TraceRecord
from aiolearner.callbacks import Throughput, stage_times
from aiolearner.testing import make_batches, make_learner


class FakeClock:
    """Advances one second per reading: every timed interval is a whole number of readings."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def test_counts_samples_and_splits_the_time() -> None:
    speed = Throughput(clock=FakeClock())
    learner = make_learner(callbacks=[speed], n_batches=3)
    await learner.fit(2)
    assert len(speed.epochs) == 2
    e = speed.epochs[0]
    assert e["batches"] == 3
    assert e["samples"] == 15  # make_batches: 5 samples a batch
    # readings: before_fit, then per batch before/after: wait 1 + compute 1 per batch,
    # after_fit +1
    assert e["compute"] == 3.0
    assert e["data_wait"] == 3.0
    assert e["seconds"] == 7.0
    assert e["samples_per_sec"] == pytest.approx(15 / 7)
    assert e["validate_seconds"] == 1.0
    total = speed.summary()
    assert total["samples"] == 30
    assert total["epochs"] == 2
    assert total["samples_per_sec"] == pytest.approx(30 / 14)


async def test_state_dict_round_trip() -> None:
    speed = Throughput()
    await make_learner(callbacks=[speed], n_batches=2).fit(1)
    other = Throughput()
    other.load_state_dict(speed.state_dict())
    assert other.epochs == speed.epochs


async def test_stage_times_from_the_trace() -> None:
    speed = Throughput()
    learner = make_learner(callbacks=[speed], n_batches=3, trace=True)
    await learner.fit(2)
    times = stage_times(learner.trace)
    assert times["fit_batch"]["count"] == 6
    assert times["epoch"]["count"] == 2
    assert times["Throughput.after_fit_batch"]["count"] == 6
    assert times["data_wait"]["count"] == 6  # one wait before each batch
    for t in times.values():
        assert t["total"] >= 0
        assert t["mean"] == pytest.approx(t["total"] / t["count"])
    report = speed.report(learner.trace)
    assert "samples/s" in report
    assert "fit_batch" in report


def test_data_wait_from_the_trace_is_the_gap_before_each_batch() -> None:
    from aiolearner import Trace

    trace = Trace()
    for kind, name, t in [
        ("enter", "fit", 0.0),
        ("enter", "fit_batch", 1.0),  # waited 1 s for the first batch
        ("exit", "fit_batch", 3.0),
        ("enter", "fit_batch", 3.5),  # then 0.5 s
        ("exit", "fit_batch", 4.0),
        ("exit", "fit", 6.0),  # the end of the pass is no wait for a batch
        ("enter", "validate", 6.0),
        ("exit", "validate", 7.0),
    ]:
        if kind == "enter":
            trace.records.append(TraceRecord("enter", name, time=t))
        else:
            trace.records.append(TraceRecord("exit", name, time=t, duration=0.0))
    assert stage_times(trace)["data_wait"] == {"count": 2, "total": 1.5, "mean": 0.75}


async def test_counts_samples_of_list_batches_seen_through_the_view() -> None:
    """A DataLoader yields lists; a callback sees them as read-only sequences."""
    speed = Throughput()
    batches = [[x, y] for x, y in make_batches(3)]
    learner = make_learner(callbacks=[speed], train_data=batches, with_validation=False)
    await learner.fit(1)
    assert speed.epochs[0]["samples"] == 15
