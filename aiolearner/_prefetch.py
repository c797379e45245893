"""What a pass's producer hands to its consumer besides plain batches (see ``_data.py``).

* :class:`ThreadFeed`: the bounded, thread-safe buffer from a producer thread to the event loop;
* :class:`LoopFeed`: the bounded buffer between tasks of the event loop (an async source's
  producer task and the pass; a :class:`~aiolearner.Feed`'s producers and the learner);
* :class:`Failure`: a fetch that raised, handed over in the batch's place so that the error
  surfaces where the batch would have been consumed;
* :class:`Moved`: a batch moved on a side CUDA stream, which the consumer must wait for.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Generic, TypeVar

import anyio

__all__ = ["Failure", "LoopFeed", "Moved", "ThreadFeed"]

T = TypeVar("T")


class Failure:
    """A fetch that raised: the consumer raises ``exc``, naming batch ``index`` of the pass."""

    __slots__ = ("exc", "index")

    def __init__(self, exc: BaseException, index: int) -> None:
        self.exc = exc
        self.index = index


class Moved:
    """Marks a batch moved on a side CUDA stream (the consumer must wait on its event)."""

    __slots__ = ("batch",)

    def __init__(self, batch: Any) -> None:
        self.batch = batch


class ThreadFeed:
    """A bounded, thread-safe buffer from a producer thread to the event loop.

    The producer thread blocks while ``depth`` batches wait (it stops there, or before its next
    fetch, once :meth:`stop` is called). The consumer takes batches without blocking the loop
    and, when none is there, waits on an event the producer sets through
    ``anyio.from_thread.run_sync`` (only then: a ready batch costs no cross-thread call).
    """

    def __init__(self, depth: int) -> None:
        self._items: deque[Any] = deque()
        self._depth = depth
        self._cond = threading.Condition()
        self._closed = False
        self.stopped = False
        #: Set by the producer thread when it begins (read by the loop, see Batches.next).
        self.started = False
        self._waiter: anyio.Event | None = None

    # -- event loop side --

    def _take_locked(self) -> Any:
        # With self._cond held: the next item (waking the producer), or EndOfStream/WouldBlock.
        if self._items:
            item = self._items.popleft()
            self._cond.notify()
            return item
        if self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    def receive_nowait(self) -> Any:
        with self._cond:
            return self._take_locked()

    async def receive(self) -> Any:
        while True:
            with self._cond:
                try:
                    return self._take_locked()
                except anyio.WouldBlock:
                    event = self._waiter = anyio.Event()
            await event.wait()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()

    def close(self) -> None:
        self.stop()

    # -- producer thread side --

    def put(self, item: Any) -> bool:
        """Hand over one item; ``False`` (item not taken) once the consumer has stopped."""
        with self._cond:
            while len(self._items) >= self._depth and not self.stopped:
                self._cond.wait()
            if self.stopped:
                return False
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            anyio.from_thread.run_sync(waiter.set)
        return True

    def finish(self) -> None:
        """No more items will come."""
        with self._cond:
            self._closed = True
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            anyio.from_thread.run_sync(waiter.set)


class LoopFeed(Generic[T]):
    """A bounded buffer between tasks of one event loop whose hand-overs survive cancellation.

    An item moves only in synchronous code: :meth:`put` appends it once there is room,
    :meth:`receive` takes what is there. So a cancelled ``put`` has not put its item and a
    cancelled ``receive`` has not taken one. (anyio's memory object streams hand an item straight
    from a waiting sender to a waiting receiver; on asyncio a cancellation that reaches either
    task before it resumes loses the item, or leaves the sender believing it was not sent.)

    The producers' side ends with :meth:`finish` (the consumer takes what is left, then
    ``EndOfStream``); the consumer's with :meth:`close` (a producer's ``put`` then raises
    ``BrokenResourceError``).
    """

    def __init__(self, size: int) -> None:
        self._items: deque[T] = deque()
        self._size = size
        self._finished = False
        self._closed = False
        self._ready: anyio.Event | None = None  # the consumer waits for an item
        self._room: anyio.Event | None = None  # producers wait for room

    def __len__(self) -> int:
        return len(self._items)

    # -- producers --

    def put_nowait(self, item: T) -> None:
        if self._finished:
            raise anyio.ClosedResourceError
        if self._closed:
            raise anyio.BrokenResourceError
        if len(self._items) >= self._size:
            raise anyio.WouldBlock
        self._items.append(item)
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.set()

    async def put(self, item: T) -> None:
        """Put ``item``, waiting while the buffer is full."""
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                self.put_nowait(item)
                return
            except anyio.WouldBlock:
                if self._room is None:
                    self._room = anyio.Event()
                await self._room.wait()

    def finish(self) -> None:
        """No more items: the consumer takes what is buffered, then sees the end."""
        self._finished = True
        self._wake_all()

    # -- the consumer --

    def receive_nowait(self) -> T:
        if self._items:
            item = self._items.popleft()
            room, self._room = self._room, None
            if room is not None:
                room.set()
            return item
        if self._finished or self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> T:
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                if self._ready is None:
                    self._ready = anyio.Event()
                await self._ready.wait()

    def close(self) -> None:
        """The consumer is gone: buffered items are dropped, producers' puts fail."""
        self._closed = True
        self._items.clear()
        self._wake_all()

    def _wake_all(self) -> None:
        for event in (self._ready, self._room):
            if event is not None:
                event.set()
        self._ready = self._room = None
