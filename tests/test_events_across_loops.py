"""Event subscribers on another event loop than the run's (a notebook's watcher and fit_sync).

A subscriber's stream belongs to the loop it was made in; a run on a thread with a loop of its own
hands events over to that loop instead of touching the stream (see ``aiolearner/_events.py``).
Every async test runs under asyncio (debug mode, which flags a loop touched from another thread)
and trio (where touching it raises).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Any, Literal

import anyio
import anyio.to_thread
import pytest
from anyio.abc import TaskStatus

from aiolearner import Event, EventStream, Learner
from aiolearner.testing import make_learner

N_BATCHES = 3
#: Enough for every event of these short runs: nothing is dropped.
UNBOUNDED: Any = math.inf


async def collect(
    stream: EventStream,
    into: list[Event],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    async with stream:
        async for event in stream:
            into.append(event)


def shape(events: list[Event]) -> Counter[tuple[str, str]]:
    return Counter((e.kind, e.source) for e in events)


async def events_of_a_run_on_this_loop(epochs: int, **subscribe: Any) -> list[Event]:
    """What a subscriber of ``await learner.fit(epochs)`` on its own loop receives."""
    learner = make_learner(n_batches=N_BATCHES)
    events: list[Event] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(collect, learner.events(**subscribe), events)
            await learner.fit(epochs)
    return events


async def test_a_run_on_another_thread_reaches_a_subscriber_on_this_loop() -> None:
    learner = make_learner(n_batches=N_BATCHES)
    here = threading.get_ident()
    events: list[Event] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(collect, learner.events(buffer=UNBOUNDED), events)
            # A loop of its own on a worker thread, as fit_sync called inside a loop does.
            await anyio.to_thread.run_sync(learner.fit_sync, 2)
    # (The collector returned: the stream ended.)
    assert learner.state.epoch == 2
    assert threading.get_ident() == here
    expected = await events_of_a_run_on_this_loop(2, buffer=UNBOUNDED)
    assert [e.kind for e in events][:1] == ["run_start"]
    assert events[-1].kind == "run_end"
    assert events[-1].data == {"outcome": "completed"}
    assert shape(events) == shape(expected)
    assert [e.kind for e in events if e.kind in {"metrics", "validation"}] == [
        e.kind for e in expected if e.kind in {"metrics", "validation"}
    ]
    steps = [e.step for e in events if e.step is not None]
    assert steps == sorted(steps)  # delivered in the order published
    assert all(e.dropped == 0 for e in events)
    assert not learner._hub.active


async def test_a_full_buffer_across_threads_counts_what_it_drops() -> None:
    learner = make_learner(n_batches=N_BATCHES)
    stalled = learner.events(buffer=2)  # not read during the run
    everything: list[Event] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(collect, learner.events(buffer=UNBOUNDED), everything)
            await anyio.to_thread.run_sync(learner.fit_sync, 1)
        got = [e async for e in stalled]  # then the end of the stream
    assert len(everything) > 10
    assert 1 <= len(got) <= 2
    assert got[0].kind == "run_start"
    assert len(got) + sum(e.dropped for e in got) + stalled.dropped == len(everything)


@pytest.mark.parametrize("run_backend", ["asyncio", "trio"])
async def test_fit_sync_called_inside_the_loop_of_a_watcher(
    run_backend: Literal["asyncio", "trio"],
) -> None:
    """The notebook: cell 1 starts a watcher task, cell 2 calls fit_sync, blocking the loop."""
    learner = make_learner(n_batches=N_BATCHES)
    watched: list[Event] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            kinds = {"run_start", "metrics", "run_end"}
            await tg.start(collect, learner.events(kinds=kinds), watched)
            # Blocks this loop; the run is on a thread with a loop of its own.
            learner.fit_sync(1, backend=run_backend)
            assert learner.state.epoch == 1
        # The watcher ran once this loop was free again, and its stream ended.
    assert [(e.kind, e.epoch) for e in watched] == [
        ("run_start", 0),
        ("metrics", 0),
        ("run_end", 1),
    ]


async def test_a_blocked_loop_holds_no_more_than_the_buffer() -> None:
    """The home loop sees nothing until the run is over; what waits for it stays bounded."""
    learner = make_learner(n_batches=N_BATCHES)
    stalled = learner.events(buffer=2)
    everything: list[Event] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(collect, learner.events(buffer=UNBOUNDED), everything)
            learner.fit_sync(1)
            assert len(stalled._inbox) <= 2
        got = [e async for e in stalled]
    assert [e.kind for e in got] == ["run_start", everything[1].kind]
    assert sum(e.dropped for e in got) == 0
    assert stalled.dropped == len(everything) - 2


async def test_closing_early_while_another_thread_runs() -> None:
    learner = make_learner(n_batches=N_BATCHES)
    stream = learner.events()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(fit_sync_on_a_worker, learner, 2)
            first = await stream.__anext__()
            await stream.aclose()
    assert first.kind == "run_start"
    assert learner.state.epoch == 2
    assert not learner._hub.active
    # The learner still runs on this loop afterwards, its streams as usual.
    assert shape(await run_here(learner)) == shape(await events_of_a_run_on_this_loop(1))


async def fit_sync_on_a_worker(learner: Learner[Any], epochs: int) -> None:
    await anyio.to_thread.run_sync(learner.fit_sync, epochs)


async def run_here(learner: Learner[Any]) -> list[Event]:
    events: list[Event] = []
    async with anyio.create_task_group() as tg:
        await tg.start(collect, learner.events(), events)
        await learner.fit(learner.state.epoch + 1)
    return events


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_stream_made_on_a_loop_that_has_ended(backend: Literal["asyncio", "trio"]) -> None:
    """Made on a loop that ended before reading it: its home is where it is read, so the run
    fills its buffer from its own thread and ends it; the hub forgets it."""
    learner = make_learner(n_batches=N_BATCHES)
    made: list[EventStream] = []

    async def subscribe() -> None:
        made.append(learner.events(kinds={"run_start", "run_end"}))

    thread = threading.Thread(target=anyio.run, args=(subscribe,), kwargs={"backend": backend})
    thread.start()
    thread.join()
    learner.fit_sync(1)
    assert learner.state.epoch == 1
    assert not learner._hub.active

    async def read() -> list[str]:
        return [event.kind async for event in made[0]]

    assert anyio.run(read, backend=backend) == ["run_start", "run_end"]


async def test_a_stream_made_here_and_read_by_the_run_on_another_loop() -> None:
    """Made on this loop, read by a task of the run's own loop on another thread (a callback
    handing it to state.start_soon, say), while this loop is blocked: delivered there."""
    learner = make_learner(n_batches=N_BATCHES)
    stream = learner.events(kinds={"run_start", "run_end"})
    got: list[str] = []

    async def run_and_read() -> None:
        async def read() -> None:
            async for event in stream:
                got.append(event.kind)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await learner.fit(1)

    thread = threading.Thread(target=anyio.run, args=(run_and_read,))
    thread.start()
    thread.join()  # (this loop blocked while the run reads: the notebook's shape)
    assert got == ["run_start", "run_end"]


async def test_streams_closed_while_idle_after_a_run_elsewhere_are_forgotten() -> None:
    learner = make_learner(n_batches=N_BATCHES)
    learner.fit_sync(1)  # (on a thread of its own: this loop is running)
    for _ in range(3):
        async with learner.events():
            pass
    assert not learner._hub.active


def test_events_arguments() -> None:
    learner = make_learner(n_batches=N_BATCHES)
    for kinds in ("log", "metrics"):
        with pytest.raises(TypeError) as info:
            learner.events(kinds=kinds)
        assert str(info.value) == (
            f"kinds must be a collection of kind names such as {{'log'}}, got the str {kinds!r}"
        )
    with pytest.raises(TypeError, match="kinds must be a collection of kind names"):
        learner.events(kinds=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown event kinds: 3, nope"):
        learner.events(kinds={"nope", 3, "log"})  # type: ignore[arg-type]
    for buffer in (2.5, True, "8", None):
        with pytest.raises(TypeError) as info:
            learner.events(buffer=buffer)  # type: ignore[arg-type]
        assert str(info.value) == (
            f"buffer must be an int of at least 1, or math.inf, got {buffer!r}"
        )
    for buffer in (0, -1):
        with pytest.raises(ValueError, match="buffer must be an int of at least 1"):
            learner.events(buffer=buffer)
    assert learner.events(kinds=["log"], buffer=1).kinds == frozenset({"log"})
    assert learner.events(buffer=UNBOUNDED).kinds is None
