"""Run order of the callbacks on one hook, from their declarations; real concurrency."""

from __future__ import annotations

import threading

import anyio
import pytest

from aiolearner import Callback, StateView
from aiolearner.testing import make_learner


class Log:
    def __init__(self) -> None:
        self.entries: list[str] = []


class Writer(Callback):
    """Writes field ``note`` in after_gradient, after giving the loop a turn."""

    reads = frozenset({"step"})
    writes = frozenset({"note"})

    def __init__(self, log: Log) -> None:
        self.log = log

    async def after_gradient(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        state.note = f"written at {state.step}"
        self.log.entries.append(f"write {state.step}")


class Reader(Callback):
    reads = frozenset({"note", "step"})

    def __init__(self, log: Log) -> None:
        self.log = log
        self.seen: list[str] = []

    async def after_gradient(self, state: StateView) -> None:
        self.seen.append(state.note)
        self.log.entries.append(f"read {state.step}")


@pytest.mark.parametrize("reader_first", [True, False])
async def test_reader_runs_after_the_writer_of_its_field(reader_first: bool) -> None:
    log = Log()
    writer, reader = Writer(log), Reader(log)
    callbacks = [reader, writer] if reader_first else [writer, reader]
    learner = make_learner(callbacks=callbacks, n_batches=3, with_validation=False)
    await learner.fit(1)
    assert log.entries == ["write 0", "read 0", "write 1", "read 1", "write 2", "read 2"]
    assert reader.seen == ["written at 0", "written at 1", "written at 2"]


class First(Callback):
    def __init__(self, log: Log) -> None:
        self.log = log

    async def before_fit_batch(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        self.log.entries.append("first")


class Second(Callback):
    after = (First,)

    def __init__(self, log: Log) -> None:
        self.log = log

    async def before_fit_batch(self, state: StateView) -> None:
        self.log.entries.append("second")


class SubFirst(First):
    """Satisfies ``after = (First,)`` declarations as an instance of First."""


class Third(Callback):
    after = (Second,)

    def __init__(self, log: Log) -> None:
        self.log = log

    def before_fit_batch(self, state: StateView) -> None:
        self.log.entries.append("third")


async def test_after_declarations_order_a_hook() -> None:
    log = Log()
    learner = make_learner(
        callbacks=[Third(log), Second(log), SubFirst(log)], n_batches=2, with_validation=False
    )
    await learner.fit(1)
    assert log.entries == ["first", "second", "third"] * 2


class ChainA(Callback):
    writes = frozenset({"x"})

    def __init__(self, log: Log) -> None:
        self.log = log

    def before_fit(self, state: StateView) -> None:
        state.x = 1
        self.log.entries.append("A")


class ChainB(Callback):
    reads = frozenset({"x"})
    writes = frozenset({"y"})

    def __init__(self, log: Log) -> None:
        self.log = log

    async def before_fit(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        state.y = state.x + 1
        self.log.entries.append("B")


class ChainC(Callback):
    reads = frozenset({"y"})

    def __init__(self, log: Log) -> None:
        self.log = log
        self.y: list[int] = []

    def before_fit(self, state: StateView) -> None:
        self.y.append(state.y)
        self.log.entries.append("C")


async def test_reads_after_writes_make_a_chain_whatever_the_list_order() -> None:
    log = Log()
    c = ChainC(log)
    learner = make_learner(callbacks=[c, ChainB(log), ChainA(log)], with_validation=False)
    await learner.fit(2)
    assert log.entries == ["A", "B", "C"] * 2
    assert c.y == [2, 2]
    text = learner.describe()
    hook = text[text.index("before_fit:") :]
    assert hook.index("ChainA") < hook.index("ChainB") < hook.index("ChainC")


class Ping(Callback):
    """Sets its own event, then waits for its partner's: deadlocks unless run concurrently."""

    def __init__(self, mine: anyio.Event, other: anyio.Event) -> None:
        self.mine = mine
        self.other = other
        self.done = 0

    async def after_gradient(self, state: StateView) -> None:
        self.mine.set()
        await self.other.wait()
        self.done += 1


class Pong(Ping):
    pass


async def test_unordered_async_hooks_run_concurrently() -> None:
    a, b = anyio.Event(), anyio.Event()
    ping, pong = Ping(a, b), Pong(b, a)
    learner = make_learner(callbacks=[ping, pong], n_batches=2, with_validation=False)
    with anyio.fail_after(10):  # a serialized run would wait forever
        await learner.fit(1)
    assert ping.done == pong.done == 2


class TaskProbe(Callback):
    """Records, for each hook, which task and thread ran it."""

    def __init__(self) -> None:
        self.tasks: dict[str, set[int]] = {}
        self.threads: dict[str, set[int]] = {}
        self.loop_thread = threading.get_ident()

    def _seen(self, hook: str) -> None:
        if threading.get_ident() == self.loop_thread:
            self.tasks.setdefault(hook, set()).add(anyio.get_current_task().id)
        self.threads.setdefault(hook, set()).add(threading.get_ident())

    def before_fit_run(self, state: StateView) -> None:
        self._seen("before_fit_run")

    def before_fit_batch(self, state: StateView) -> None:
        self._seen("before_fit_batch")

    async def after_fit(self, state: StateView) -> None:
        self._seen("after_fit")

    def after_fit_run(self, state: StateView) -> None:
        self._seen("after_fit_run")


class AsyncProbe(Callback):
    def __init__(self) -> None:
        self.tasks: set[int] = set()

    async def after_epoch(self, state: StateView) -> None:
        self.tasks.add(anyio.get_current_task().id)


class OtherAsyncProbe(AsyncProbe):
    pass


async def test_def_hooks_and_a_lone_async_hook_run_in_the_fit_task() -> None:
    probe, one, two = TaskProbe(), AsyncProbe(), OtherAsyncProbe()
    learner = make_learner(callbacks=[probe, one, two], n_batches=2, compute="inline")
    me = anyio.get_current_task().id
    await learner.fit(1)
    # def hooks (and a hook with a single async callback) need no task of their own.
    assert probe.tasks == {
        "before_fit_run": {me},
        "before_fit_batch": {me},
        "after_fit": {me},
        "after_fit_run": {me},
    }
    assert probe.threads["before_fit_batch"] == {threading.get_ident()}
    # Two unordered async callbacks on after_epoch: each ran in a task of its own.
    assert me not in one.tasks
    assert me not in two.tasks
    assert len(one.tasks) == len(two.tasks) == 1
    assert one.tasks != two.tasks  # both were alive at once, so ids cannot be reused
    text = learner.describe()
    after_fit = text[text.index("after_fit:") :].splitlines()
    assert after_fit[1].strip() == "[1] in order:"
    after_epoch = text[text.index("after_epoch:") :].splitlines()
    assert after_epoch[1].strip() == "[1] concurrently:"


async def test_def_hooks_of_a_batch_run_in_the_compute_worker_in_thread_mode() -> None:
    probe = TaskProbe()
    learner = make_learner(callbacks=[probe], n_batches=2, compute="thread")
    await learner.fit(1)
    here = threading.get_ident()
    # Run-level hooks stay on the loop; the fused batch (hooks included) is one hop.
    assert probe.threads["before_fit_run"] == {here}
    assert here not in probe.threads["before_fit_batch"]
    assert learner.compute_policy.hops >= 2
