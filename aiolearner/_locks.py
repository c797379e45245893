"""An async reader/writer lock guarding the model's weights and the optimizer.

The Update stage holds the write side while it changes weights (also while the change runs in the
compute worker thread); whatever copies or saves weights holds the read side. Waiters are served in
arrival order, with consecutive readers admitted together, so a stream of weight updates cannot
starve a checkpoint and a slow reader cannot starve training for longer than its own read.

The uncontended paths do not suspend: acquiring a free lock is a few attribute updates. This is the
same trade as ``anyio.Lock(fast_acquire=True)``: the training loop takes the write side once per
batch and must not pay a scheduler round-trip for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

__all__ = ["ReadWriteLock"]


class _Waiter:
    __slots__ = ("event", "granted", "write")

    def __init__(self, write: bool) -> None:
        self.write = write
        self.granted = False
        self.event = anyio.Event()


class ReadWriteLock:
    """Many readers or one writer, FIFO between them.

    Example:
        >>> async with learner.weights_lock.read():
        ...     torch.save(model.state_dict(), path)
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiters: deque[_Waiter] = deque()

    def __repr__(self) -> str:
        return (
            f"<ReadWriteLock readers={self._readers} writer={self._writer} "
            f"waiting={len(self._waiters)}>"
        )

    @property
    def readers(self) -> int:
        """How many holders of the read side there are now."""
        return self._readers

    @property
    def waiting(self) -> int:
        """How many tasks wait to take either side now."""
        return len(self._waiters)

    @property
    def write_locked(self) -> bool:
        """Whether the write side is held now."""
        return self._writer

    def acquire_read_nowait(self) -> bool:
        """Take the read side if that needs no waiting; return whether it was taken."""
        if self._writer or self._waiters:
            return False
        self._readers += 1
        return True

    def acquire_write_nowait(self) -> bool:
        """Take the write side if that needs no waiting; return whether it was taken."""
        if self._writer or self._readers or self._waiters:
            return False
        self._writer = True
        return True

    async def acquire_read(self) -> None:
        """Take the read side, waiting for a writer (and earlier waiters) to finish."""
        if not self.acquire_read_nowait():
            await self._wait(_Waiter(write=False))

    async def acquire_write(self) -> None:
        """Take the write side, waiting for readers (and earlier waiters) to finish."""
        if not self.acquire_write_nowait():
            await self._wait(_Waiter(write=True))

    async def _wait(self, waiter: _Waiter) -> None:
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                # Granted and cancelled in the same breath: give it back so nobody deadlocks.
                self._release(waiter.write)
            else:
                self._waiters.remove(waiter)
                self._grant()
            raise

    def release_read(self) -> None:
        """Give back the read side."""
        if self._readers <= 0:
            raise RuntimeError("release_read() without a matching acquire_read()")
        self._release(write=False)

    def release_write(self) -> None:
        """Give back the write side."""
        if not self._writer:
            raise RuntimeError("release_write() without a matching acquire_write()")
        self._writer = False
        if self._waiters:
            self._grant()

    def _release(self, write: bool) -> None:
        if write:
            self._writer = False
        else:
            self._readers -= 1
        if self._waiters:
            self._grant()

    def _grant(self) -> None:
        # Hand the lock over to the waiters at the head of the queue, in order.
        waiters = self._waiters
        while waiters and not self._writer:
            head = waiters[0]
            if head.write:
                if self._readers:
                    return
                self._writer = True
            else:
                self._readers += 1
            waiters.popleft()
            head.granted = True
            head.event.set()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        """``async with lock.read():`` hold the read side for the block."""
        await self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        """``async with lock.write():`` hold the write side for the block."""
        await self.acquire_write()
        try:
            yield
        finally:
            self.release_write()
