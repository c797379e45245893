"""The learner's event stream: a producer (the learner) feeding bounded per-subscriber streams.

Publishing never waits: when a subscriber's buffer is full the new event is dropped for that
subscriber and counted, and the next event it does receive carries the count in ``dropped``.
Training never slows down for a slow consumer; a consumer that must not miss metrics subscribes to
those kinds only (``learner.events(kinds={"metrics"})``), which keeps its buffer free.

Events published from the compute worker thread are held and published on the event loop right
after the thread hop (memory streams are not thread-safe).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["Event", "EventStream"]

#: Every kind of event the learner publishes.
EVENT_KINDS = frozenset(
    {
        "run_start",
        "run_end",
        "stage_start",
        "stage_end",
        "metrics",
        "validation",
        "state_write",
        "control",
        "log",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened in the learner.

    Attributes:
        kind: one of ``run_start``, ``run_end``, ``stage_start``, ``stage_end``, ``metrics``,
            ``validation``, ``state_write``, ``control``, ``log``.
        source: the stage or callback it came from.
        epoch: the epoch counter then.
        step: the step counter then.
        time: ``time.time()`` then (wall clock, for display).
        data: details: the metrics for ``metrics``/``validation``, ``{"field": ...}`` for
            ``state_write``, ``{"outcome": ...}`` for ``run_end``, ...
        dropped: how many events this subscriber lost, because its buffer was full, just before
            this one.
    """

    kind: str
    source: str
    epoch: int | None
    step: int | None
    time: float
    data: Mapping[str, Any] = field(default_factory=dict)
    dropped: int = 0


class EventStream:
    """An async iterator of :class:`Event`, from ``learner.events()``.

    It ends when the learner's current run (``fit``, ``validate`` or ``predict``) ends, or the next
    one if the learner is idle when subscribing. Close it early with ``await stream.aclose()`` or
    by using it as ``async with learner.events() as stream:``.

    Attributes:
        dropped: events dropped (a full buffer) since the last one delivered; the next event
            carries the count. Events dropped at the end of the run, with no later event to
            carry them, stay counted here once the stream has ended.
    """

    def __init__(self, hub: EventHub, kinds: frozenset[str] | None, buffer: int) -> None:
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        self._send: MemoryObjectSendStream[Event] = send
        self._receive: MemoryObjectReceiveStream[Event] = receive
        self._hub = hub
        self.kinds = kinds
        self.dropped = 0

    def __aiter__(self) -> EventStream:
        return self

    def __del__(self) -> None:
        # A stream dropped without being read to its end or closed (a consumer that stopped
        # early): free the buffer quietly; its events have no one left to read them.
        # (Not there when __init__ raised before making them.)
        for side in (getattr(self, "_send", None), getattr(self, "_receive", None)):
            if side is not None:
                side.close()

    async def __anext__(self) -> Event:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            # Ended by the learner: free the receiving side, so that a stream consumed with
            # ``async for`` needs no explicit aclose().
            self._receive.close()
            raise StopAsyncIteration from None
        except anyio.ClosedResourceError:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop receiving events and free the buffer."""
        self._hub.unsubscribe(self)
        self._send.close()
        self._receive.close()
        await anyio.lowlevel.checkpoint()

    def _offer(self, event: Event) -> None:
        if self.kinds is not None and event.kind not in self.kinds:
            return
        if self.dropped:
            event = Event(
                event.kind,
                event.source,
                event.epoch,
                event.step,
                event.time,
                event.data,
                self.dropped,
            )
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._hub.unsubscribe(self)
        else:
            self.dropped = 0


class EventHub:
    """The publishing side; owned by a learner."""

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self._subscribers: list[EventStream] = []
        self._pending: list[Event] = []
        self._loop_thread: int | None = None
        self._on_change = on_change

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self, kinds: Iterable[str] | None, buffer: int) -> EventStream:
        stream = self.stream(kinds, buffer)
        self.attach(stream)
        return stream

    def stream(self, kinds: Iterable[str] | None, buffer: int) -> EventStream:
        """A stream of this hub's events, not receiving any until :meth:`attach`."""
        chosen = None if kinds is None else frozenset(kinds)
        if chosen is not None and not chosen <= EVENT_KINDS:
            unknown = ", ".join(sorted(chosen - EVENT_KINDS))
            raise ValueError(f"unknown event kinds: {unknown}; known: {sorted(EVENT_KINDS)}")
        if buffer < 1 and buffer != math.inf:
            raise ValueError(f"buffer must be at least 1, got {buffer}")
        return EventStream(self, chosen, buffer)

    def attach(self, stream: EventStream) -> None:
        """``stream`` receives the events published from now on."""
        self._subscribers.append(stream)
        if len(self._subscribers) == 1:
            self._on_change(True)

    def unsubscribe(self, stream: EventStream) -> None:
        if stream in self._subscribers:
            self._subscribers.remove(stream)
            if not self._subscribers:
                self._on_change(False)

    def bind_loop_thread(self) -> None:
        self._loop_thread = threading.get_ident()

    def publish(
        self,
        kind: str,
        source: str,
        epoch: int | None,
        step: int | None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        if not self._subscribers:
            return
        event = Event(kind, source, epoch, step, time.time(), data or {})
        if threading.get_ident() != self._loop_thread:
            self._pending.append(event)
            return
        for stream in list(self._subscribers):
            stream._offer(event)

    def flush(self) -> None:
        """Publish what the worker thread produced (called on the event loop after a hop)."""
        if self._pending:
            pending, self._pending = self._pending, []
            for event in pending:
                for stream in list(self._subscribers):
                    stream._offer(event)

    def close_all(self) -> None:
        """End every subscriber's stream (at the end of a run)."""
        self.flush()
        for stream in self._subscribers:
            stream._send.close()
        self._subscribers.clear()
        self._on_change(False)
