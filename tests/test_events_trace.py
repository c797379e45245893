"""Seeing what happens: the event stream, describe(), and trace mode."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import anyio
import pytest

from aiolearner import (
    Callback,
    Event,
    EventStream,
    SkipBatch,
    StateView,
    StopFit,
    TraceRecord,
)
from aiolearner.testing import make_batches, make_learner

N_BATCHES = 3
EPOCHS = 2


class Noter(Callback):
    reads = frozenset({"step"})
    writes = frozenset({"note"})

    def after_update(self, state: StateView) -> None:
        state.note = state.step


async def collect(stream: EventStream, into: list[Event]) -> None:
    async for event in stream:
        into.append(event)


async def run_with_events(learner: Any, **subscribe: Any) -> list[Event]:
    events: list[Event] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, learner.events(**subscribe), events)
            await learner.fit(EPOCHS)
    return events


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_event_stream_of_a_run(compute: str) -> None:
    learner = make_learner(callbacks=[Noter()], n_batches=N_BATCHES, compute=compute)
    events = await run_with_events(learner)
    # The stream ended by itself once the run was over (the collector returned).
    assert events[0].kind == "run_start"
    assert events[0].data == {"phase": "fit"}
    assert events[-1].kind == "run_end"
    assert events[-1].data == {"outcome": "completed"}
    assert (events[-1].epoch, events[-1].step) == (EPOCHS, EPOCHS * N_BATCHES)
    assert all(e.dropped == 0 for e in events)

    starts = Counter(e.source for e in events if e.kind == "stage_start")
    ends = Counter(e.source for e in events if e.kind == "stage_end")
    assert starts == ends
    assert starts["fit_run"] == 1
    assert starts["epoch"] == EPOCHS
    assert starts["fit_batch"] == starts["gradient"] == starts["update"] == EPOCHS * N_BATCHES
    assert starts["validate_batch"] == EPOCHS * 2
    # Stages nest: a stage ends before its parent does.
    opened: list[str] = []
    for e in events:
        if e.kind == "stage_start":
            opened.append(e.source)
        elif e.kind == "stage_end":
            assert opened.pop() == e.source

    validation = [e for e in events if e.kind == "validation"]
    assert [e.epoch for e in validation] == list(range(EPOCHS))
    assert validation[-1].data["loss"] == learner.state.validation["loss"]
    metrics = [e for e in events if e.kind == "metrics"]
    assert [e.epoch for e in metrics] == list(range(EPOCHS))
    assert set(metrics[-1].data) >= {"train_loss", "val_loss"}
    assert metrics[-1].data["train_loss"] == learner.state.metrics["train_loss"]

    writes = [e for e in events if e.kind == "state_write"]
    notes = [e for e in writes if e.data["field"] == "note"]
    assert [(e.source, e.step) for e in notes] == [("Noter", s) for s in range(1, 7)]
    loss_writes = [e for e in writes if e.data["field"] == "loss" and e.source == "stage"]
    assert len(loss_writes) == EPOCHS * (N_BATCHES + 2)
    steps = [e.step for e in events if e.step is not None]
    assert steps == sorted(steps)  # published in order, also from the worker thread


async def test_kinds_filter() -> None:
    learner = make_learner(n_batches=N_BATCHES)
    events = await run_with_events(learner, kinds={"metrics", "validation"})
    assert [e.kind for e in events] == ["validation", "metrics"] * EPOCHS
    with pytest.raises(ValueError, match="unknown event kinds: nope"):
        learner.events(kinds={"nope"})


async def test_a_consumer_that_never_reads_does_not_block_training() -> None:
    learner = make_learner(n_batches=N_BATCHES)
    stalled = learner.events(buffer=1)
    everything: list[Event] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, learner.events(buffer=math.inf), everything)  # type: ignore[arg-type]
            await learner.fit(EPOCHS)
    assert learner.state.epoch == EPOCHS
    got = [e async for e in stalled]
    assert [e.kind for e in got] == ["run_start"]
    assert stalled.dropped == len(everything) - 1


class ReadOneMidRun(Callback):
    """Reads one event from a stalled stream in after_epoch of epoch 0, freeing its buffer."""

    reads = frozenset({"epoch"})

    def __init__(self) -> None:
        self.stream: EventStream | None = None
        self.got: list[Event] = []

    async def after_epoch(self, state: StateView) -> None:
        if state.epoch == 0:
            assert self.stream is not None
            self.got.append(await self.stream.__anext__())


async def test_dropped_count_arrives_with_the_next_event() -> None:
    reader = ReadOneMidRun()
    learner = make_learner(callbacks=[reader], n_batches=N_BATCHES)
    reader.stream = learner.events(kinds={"stage_start"}, buffer=1)
    everything = await run_with_events(learner, kinds={"stage_start"}, buffer=10_000)
    rest = [e async for e in reader.stream]
    assert [e.source for e in reader.got] == ["fit_run"]
    # The next stage to start after the read is epoch 1; everything in between was dropped.
    (after,) = rest
    k = next(i for i, e in enumerate(everything) if e.source == "epoch" and e.epoch == 1)
    assert (after.source, after.epoch) == ("epoch", 1)
    assert after.dropped == k - 1
    assert reader.stream.dropped == len(everything) - k - 1


async def test_stream_closes_early_and_training_goes_on() -> None:
    learner = make_learner(n_batches=N_BATCHES)
    async with learner.events() as stream:
        pass
    await learner.fit(1)
    assert [e async for e in stream] == []
    assert learner.state.epoch == 1


async def test_publish_reaches_subscribers() -> None:
    class Publisher(Callback):
        def __init__(self) -> None:
            self.learner: Any = None

        def after_fit(self, state: StateView) -> None:
            self.learner.publish("log", "Publisher", {"message": "hello"})

    publisher = Publisher()
    learner = make_learner(callbacks=[publisher])
    publisher.learner = learner
    events = await run_with_events(learner, kinds={"log"})
    assert [(e.source, dict(e.data)) for e in events] == [("Publisher", {"message": "hello"})] * 2


# -- describe() --------------------------------------------------------------------------------


class WriteNote(Callback):
    writes = frozenset({"note"})

    async def after_gradient(self, state: StateView) -> None:
        pass


class ReadNote(Callback):
    reads = frozenset({"note", "step"})

    async def after_gradient(self, state: StateView) -> None:
        pass


class Other(Callback):
    async def after_gradient(self, state: StateView) -> None:
        pass

    def after_epoch(self, state: StateView) -> None:
        pass


def test_describe_shows_stages_hooks_order_groups_and_access() -> None:
    learner = make_learner(callbacks=[ReadNote(), WriteNote(), Other()])
    text = learner.describe()
    lines = text.splitlines()
    # The stage tree, indented by depth.
    for line in [
        "FitRun (fit_run)",
        "  Epoch (epoch)",
        "    Fit (fit)",
        "      FitBatch (fit_batch)",
        "        Gradient (gradient) compute",
        "        Update (update) compute",
        "    Validate (validate)",
        "      ValidateBatch (validate_batch) [fused batch]",
        "        ValidateLoss (validate_loss) compute",
    ]:
        assert line in lines, line
    # after_gradient: the writer and the unrelated callback together, then the reader.
    i = lines.index("          after_gradient:")
    assert lines[i + 1 : i + 6] == [
        "            [1] concurrently:",
        "              - WriteNote (async)",
        "              - Other (async)",
        "            [2] in order:",
        "              - ReadNote (async)",
    ]
    i = lines.index("    after_epoch:")
    assert lines[i + 1 : i + 3] == ["      [1] in order:", "        - Other (def)"]
    assert "  ReadNote: reads ['note', 'step'], writes -, after -; hooks after_gradient" in lines
    assert "  WriteNote: reads -, writes ['note'], after -; hooks after_gradient" in lines
    # A batch with an async hook cannot be fused; one without callbacks is.
    assert "      FitBatch (fit_batch) [fused batch]" not in lines
    plain = make_learner().describe().splitlines()
    assert "      FitBatch (fit_batch) [fused batch]" in plain
    assert not any(line.strip().endswith(":") and "_" in line for line in plain[:9])


# -- trace mode --------------------------------------------------------------------------------


class SkipSecond(Callback):
    reads = frozenset({"step"})
    writes = frozenset({"note"})

    def before_gradient(self, state: StateView) -> None:
        state.note = "seen"
        if state.step == 1:
            raise SkipBatch("second")


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_trace_records_stages_hooks_writes_and_control(compute: str) -> None:
    learner = make_learner(
        callbacks=[SkipSecond()], n_batches=N_BATCHES, trace=True, compute=compute
    )
    await learner.fit(1)
    trace = learner.trace
    seq = trace.sequence()
    assert seq[:4] == ["enter:fit_run", "enter:epoch", "enter:fit", "enter:fit_batch"]
    assert seq[-3:] == ["exit:validate", "exit:epoch", "exit:fit_run"]
    first_batch = seq[3 : 3 + 8]
    assert first_batch == [
        "enter:fit_batch",
        "enter:gradient",
        "hook:before_gradient:SkipSecond",  # hooks run inside their stage's enter/exit
        "exit:gradient",
        "enter:update",
        "exit:update",
        "exit:fit_batch",
        "enter:fit_batch",
    ]
    # The skipped batch: the hook ran, the stage acted, gradient never ran.
    assert seq[10:15] == [
        "enter:fit_batch",
        "enter:gradient",
        "hook:before_gradient:SkipSecond",
        "exit:gradient",
        "exit:fit_batch",
    ]
    controls = [r for r in trace if r.kind == "control"]
    assert [(r.name, r.field, r.epoch, r.step) for r in controls] == [
        ("fit_batch", "SkipBatch", 0, 1)
    ]
    # Every enter has an exit with a duration.
    enters = Counter((r.name, r.hook) for r in trace if r.kind == "enter")
    exits = [r for r in trace if r.kind == "exit"]
    assert enters == Counter((r.name, r.hook) for r in exits)
    assert all(r.duration is not None and r.duration >= 0 for r in exits)
    durations = trace.durations()
    assert len(durations["fit_batch"]) == N_BATCHES
    assert len(durations["SkipSecond.before_gradient"]) == N_BATCHES
    # Writes: who, field, epoch, step.
    notes = trace.writes("note")
    assert [(r.name, r.epoch, r.step) for r in notes] == [("SkipSecond", 0, s) for s in range(3)]
    stage_losses = [(r.name, r.epoch, r.step) for r in trace.writes("loss")]
    assert stage_losses == [("stage", 0, 0), ("stage", 0, 2), ("stage", 0, 3), ("stage", 0, 3)]
    step_writes = [(r.name, r.step) for r in trace.writes("step")]
    assert [n for n, _ in step_writes] == ["stage"] * N_BATCHES
    assert all(isinstance(r, TraceRecord) for r in trace)


@pytest.mark.parametrize("observe", ["trace", "events"])
async def test_keys_of_metrics_and_validation_are_recorded_by_who_wrote_them(
    observe: str,
) -> None:
    """``state.metrics["w"] = ...`` by a callback declaring the key, Metrics' keys and the
    stages' own losses: each as ``"<field>.<key>"`` with its writer."""
    from aiolearner.callbacks import Metrics

    class Logs(Callback):
        writes = frozenset({"metrics.w"})

        def after_epoch(self, state: StateView) -> None:
            state.metrics["w"] = 1.0

    learner = make_learner(
        callbacks=[Logs(), Metrics(["accuracy"])], n_batches=2, trace=observe == "trace"
    )
    seen: list[tuple[str, str]] = []
    if observe == "trace":
        await learner.fit(1)
        seen = [(r.name, r.field or "") for r in learner.trace.writes() if "." in (r.field or "")]
    else:
        async with anyio.create_task_group() as tg:
            stream = learner.events(kinds=["state_write"])

            async def consume() -> None:
                async for event in stream:
                    if "." in event.data["field"]:
                        seen.append((event.source, event.data["field"]))

            tg.start_soon(consume)
            await learner.fit(1)
    assert sorted(seen) == [
        ("Logs", "metrics.w"),
        ("Metrics", "metrics.train_accuracy"),
        ("Metrics", "metrics.val_accuracy"),
        ("Metrics", "validation.accuracy"),
        ("fit", "metrics.train_loss"),
        ("validate", "metrics.val_loss"),
    ]
    if observe == "trace":
        assert [r.step for r in learner.trace.writes("metrics.w")] == [2]


async def test_trace_requires_trace_mode() -> None:
    learner = make_learner()
    with pytest.raises(RuntimeError, match="trace=True"):
        learner.trace  # noqa: B018


class Fail(Callback):
    def after_fit(self, state: StateView) -> None:
        raise ValueError("no")


class WaitForever(Callback):
    def __init__(self) -> None:
        self.reached = anyio.Event()

    async def before_fit_batch(self, state: StateView) -> None:
        self.reached.set()
        await anyio.sleep_forever()


async def test_run_end_tells_the_outcome_of_failed_and_cancelled_runs() -> None:
    learner = make_learner(callbacks=[Fail()])
    events: list[Event] = []
    failures: list[BaseException] = []

    async def fit_and_catch() -> None:
        try:
            await learner.fit(1)
        except ExceptionGroup as group:
            failures.append(group)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, learner.events(kinds={"run_start", "run_end"}), events)
            await fit_and_catch()
    assert len(failures) == 1
    assert [(e.kind, dict(e.data)) for e in events] == [
        ("run_start", {"phase": "fit"}),
        ("run_end", {"outcome": "error"}),
    ]

    waiter = WaitForever()
    learner = make_learner(callbacks=[waiter])
    events.clear()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, learner.events(kinds={"run_end"}), events)
            async with anyio.create_task_group() as inner:
                inner.start_soon(learner.fit, 1)
                await waiter.reached.wait()
                inner.cancel_scope.cancel()
    assert [dict(e.data) for e in events] == [{"outcome": "cancelled"}]


class StopAtSecondBatch(Callback):
    reads = frozenset({"step"})

    def after_fit_batch(self, state: StateView) -> None:
        if state.step == 2:
            raise StopFit("enough")


async def test_run_end_tells_a_stopped_run_and_a_later_validation_completed() -> None:
    learner = make_learner(callbacks=[StopAtSecondBatch()])
    events: list[Event] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(collect, learner.events(kinds={"run_end"}), events)
        await learner.fit(2)
    assert [dict(e.data) for e in events] == [{"outcome": "stopped"}]
    events.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(collect, learner.events(kinds={"run_end"}), events)
        await learner.validate()
    assert [dict(e.data) for e in events] == [{"outcome": "completed"}]


async def test_events_of_validate_and_predict() -> None:
    learner = make_learner()
    events: list[Event] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(collect, learner.events(kinds={"run_start", "validation"}), events)
        await learner.validate()
    assert [e.kind for e in events] == ["run_start", "validation"]
    assert events[0].data == {"phase": "validate"}
    events.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(collect, learner.events(kinds={"run_start", "run_end"}), events)
        await learner.predict([x for x, _ in make_batches(2)])
    assert [(e.kind, dict(e.data)) for e in events] == [
        ("run_start", {"phase": "predict"}),
        ("run_end", {"outcome": "completed"}),
    ]
