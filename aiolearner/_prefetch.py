"""What a pass's producer hands to its consumer besides plain batches (see ``_data.py``).

* :class:`ThreadFeed`: the bounded, thread-safe buffer from a producer thread to the event loop;
* :class:`Failure`: a fetch that raised, handed over in the batch's place so that the error
  surfaces where the batch would have been consumed;
* :class:`Moved`: a batch moved on a side CUDA stream, which the consumer must wait for.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import anyio

__all__ = ["Failure", "Moved", "ThreadFeed"]


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
