"""The reader/writer lock on the weights, alone and guarding training."""

from __future__ import annotations

import anyio
import pytest
import torch

from aiolearner import Callback, ReadWriteLock, StateView
from aiolearner.testing import make_learner


async def test_readers_share() -> None:
    lock = ReadWriteLock()
    assert lock.acquire_read_nowait()
    assert lock.acquire_read_nowait()
    async with lock.read():
        assert lock.readers == 3
    assert lock.readers == 2
    assert not lock.acquire_write_nowait()
    lock.release_read()
    lock.release_read()
    assert lock.acquire_write_nowait()
    lock.release_write()


async def test_writer_excludes_readers_and_writers() -> None:
    lock = ReadWriteLock()
    log: list[str] = []

    async def reader(name: str) -> None:
        async with lock.read():
            log.append(f"{name} in")
            await anyio.lowlevel.checkpoint()
            log.append(f"{name} out")

    async def writer(name: str) -> None:
        async with lock.write():
            log.append(f"{name} in")
            await anyio.lowlevel.checkpoint()
            log.append(f"{name} out")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await lock.acquire_write()
            tg.start_soon(reader, "r")
            await anyio.wait_all_tasks_blocked()  # (trio does not start tasks in order)
            tg.start_soon(writer, "w")
            await anyio.wait_all_tasks_blocked()
            assert log == []  # both wait for the writer holding the lock
            assert not lock.acquire_read_nowait()
            assert not lock.acquire_write_nowait()
            lock.release_write()
    # FIFO: the reader queued first goes first, the writer only once it has left.
    assert log == ["r in", "r out", "w in", "w out"]


async def test_fifo_a_waiting_writer_is_not_starved_by_new_readers() -> None:
    lock = ReadWriteLock()
    log: list[str] = []
    hold = {name: anyio.Event() for name in ("r1", "w2", "r3", "r4")}

    async def reader(name: str) -> None:
        async with lock.read():
            log.append(name)
            await hold[name].wait()

    async def writer(name: str) -> None:
        async with lock.write():
            log.append(name)
            await hold[name].wait()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader, "r1")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(writer, "w2")
            await anyio.wait_all_tasks_blocked()
            # r3 would fit beside r1, but the writer queued first.
            assert not lock.acquire_read_nowait()
            tg.start_soon(reader, "r3")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(reader, "r4")
            await anyio.wait_all_tasks_blocked()
            assert log == ["r1"]
            hold["r1"].set()
            await anyio.wait_all_tasks_blocked()
            assert log == ["r1", "w2"]
            assert lock.write_locked
            hold["w2"].set()
            await anyio.wait_all_tasks_blocked()
            # Consecutive readers are admitted together.
            assert log[:2] == ["r1", "w2"]
            assert sorted(log[2:]) == ["r3", "r4"]  # (woken together, in either order)
            assert lock.readers == 2
            hold["r3"].set()
            hold["r4"].set()
    assert lock.readers == 0
    assert not lock.write_locked


async def test_cancelled_waiter_does_not_deadlock_the_queue() -> None:
    lock = ReadWriteLock()
    got: list[str] = []
    await lock.acquire_read()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            writer_scope = anyio.CancelScope()

            async def writer() -> None:
                with writer_scope:
                    await lock.acquire_write()
                    got.append("writer")  # never: cancelled while waiting
                    lock.release_write()

            async def reader() -> None:
                async with lock.read():
                    got.append("reader")

            tg.start_soon(writer)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            assert got == []  # queued behind the writer
            writer_scope.cancel()
            await anyio.wait_all_tasks_blocked()
            # With the writer gone, the reader joins the one still holding the lock.
            assert got == ["reader"]
    lock.release_read()
    assert lock.acquire_write_nowait()
    lock.release_write()


async def test_waiter_granted_and_cancelled_at_once_gives_the_lock_back() -> None:
    lock = ReadWriteLock()
    await lock.acquire_write()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def waiter() -> None:
                with scope:
                    await lock.acquire_write()
                    await anyio.sleep_forever()  # holds it until cancelled
                lock.release_write()

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            lock.release_write()  # hands the lock to the waiter...
            scope.cancel()  # ...which is cancelled before it could run
    assert not lock.write_locked
    assert lock.readers == 0
    assert lock.acquire_write_nowait()


def test_release_without_acquire_raises() -> None:
    lock = ReadWriteLock()
    with pytest.raises(RuntimeError, match="release_read"):
        lock.release_read()
    with pytest.raises(RuntimeError, match="release_write"):
        lock.release_write()


# -- guarding training -------------------------------------------------------------------------


class SnapshotReader(Callback):
    """At step 1, starts background work that holds the read side across several turns of the
    loop while training wants to go on, and checks the weights never move meanwhile."""

    reads = frozenset({"step", "model"})

    def __init__(self) -> None:
        self.checks: list[tuple[bool, bool]] = []
        self.holding = anyio.Event()
        self.saw_waiting_update = False

    async def after_update(self, state: StateView) -> None:
        if state.step == 1:
            state.start_soon(self._read, state.weights_lock, state.model)
            # Training goes on only once the reader holds the lock.
            await self.holding.wait()

    async def _read(self, lock: ReadWriteLock, model: torch.nn.Module) -> None:
        async with lock.read():
            self.holding.set()
            before = [p.detach().clone() for p in model.parameters()]

            def check() -> None:
                same = all(
                    torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
                )
                self.checks.append((same, lock.write_locked))

            # Training runs until its next Update, which must wait for us (in thread mode the
            # loop looks idle while the worker computes, hence the loop).
            while "waiting=1" not in repr(lock):
                await anyio.wait_all_tasks_blocked()
                check()
            self.saw_waiting_update = True
            for _ in range(3):
                await anyio.wait_all_tasks_blocked()
                check()


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_reader_sees_no_update_while_holding_the_read_lock(compute: str) -> None:
    reader = SnapshotReader()
    learner = make_learner(callbacks=[reader], n_batches=4, compute=compute)
    with anyio.fail_after(20):
        await learner.fit(1)
    assert reader.saw_waiting_update
    assert len(reader.checks) >= 3
    assert all(same and not write_locked for same, write_locked in reader.checks)
    assert learner.state.step == 4


async def test_learner_weights_lock_is_free_after_fit() -> None:
    learner = make_learner()
    await learner.fit(1)
    lock = learner.weights_lock
    assert isinstance(lock, ReadWriteLock)
    assert lock.readers == 0
    assert not lock.write_locked
