"""The learner's event stream: a producer (the learner) feeding bounded per-subscriber streams.

Publishing never waits: when a subscriber's buffer is full the new event is dropped for that
subscriber and counted, and the next event it does receive carries the count in ``dropped``.
Training never slows down for a slow consumer; a consumer that must not miss metrics subscribes to
those kinds only (``learner.events(kinds={"metrics"})``), which keeps its buffer free.

Events published from the compute worker thread are held and published on the event loop right
after the thread hop (memory streams are not thread-safe).

A subscriber may also live on another event loop than the run: a notebook's watcher task on the
kernel's loop while ``fit_sync`` trains on a thread with a loop of its own (see ``_sync.py``). Its
memory stream belongs to its own loop, which must be the only one to touch it, so each stream keeps
its *home*, the loop that reads it (thread and a way to call into that loop from elsewhere, set
when it first waits for an event; before that no reader waits to be woken, and the publishing
thread fills its buffer directly): an event
from another thread waits in a small locked inbox, and one scheduled call at a time moves the
inbox into the memory stream on the home loop. The home loop may be blocked for the whole run (the
kernel's thread waits in ``fit_sync``), so the inbox is bounded by the stream's buffer and there is
never more than one call pending, however many events arrive.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
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
        data: details: the metrics for ``metrics``; for ``validation``, the pass's results
            (its losses), published when the pass ends, before the ``after_validate`` hooks
            (a callback's metrics, such as ``Metrics``' ``val_accuracy``, are in the epoch's
            ``metrics`` event, after ``after_epoch``); ``{"field": ...}`` for ``state_write``;
            ``{"outcome": ...}`` for ``run_end`` (``completed``, ``stopped``, ``cancelled`` or
            ``error``), ...
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
        self._buffer = buffer
        # Home: the thread of the loop that reads it (set when it first waits for an event,
        # see _settle) and how to call into that loop from another thread. Until then (None),
        # the publishing thread delivers into the buffer, where no reader waits to be woken.
        self._home: int | None = None
        self._call_home: Callable[[Callable[[], None]], object] | None = None
        # What other threads hand over (under _lock): (events lost just before, event) pairs,
        # the events lost since the last pair, whether a drain is scheduled, whether the
        # stream is to end after the inbox. _gone: the consumer or its loop has left, and the
        # publishing thread is to forget this stream.
        self._lock = threading.Lock()
        self._inbox: deque[tuple[int, Event]] = deque()
        self._lost = 0
        self._drain_pending = False
        self._ending = False
        self._gone = False

    def __aiter__(self) -> EventStream:
        return self

    def __del__(self) -> None:
        # A stream dropped without being read to its end or closed (a consumer that stopped
        # early): free the buffer quietly; its events have no one left to read them.
        # (Not there when __init__ raised before making them.)
        for side in (getattr(self, "_send", None), getattr(self, "_receive", None)):
            if side is not None:
                side.close()

    def _settle(self) -> None:
        """The reading loop is this stream's home: events from another thread go through it."""
        # anyio's own test of which loop runs here (the one anyio.run makes). Its native token
        # is the asyncio loop or the TrioToken, which both schedule a call without waiting
        # (anyio's from_thread calls wait for the result); duck-typed, as the package imports
        # neither library.
        token: Any = anyio.lowlevel.current_token().native_token
        with self._lock:  # (a publisher delivering directly is done, or sees the home)
            self._call_home = (
                token.call_soon_threadsafe
                if hasattr(token, "call_soon_threadsafe")  # an asyncio loop
                else token.run_sync_soon
            )
            self._home = threading.get_ident()

    async def __anext__(self) -> Event:
        if self._home is None:
            self._settle()
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
        self._leave()
        self._send.close()
        self._receive.close()
        await anyio.lowlevel.checkpoint()

    def _offer(self, event: Event) -> None:
        """Deliver ``event`` (called on the hub's publishing thread, and by :meth:`_drain`)."""
        if self.kinds is not None and event.kind not in self.kinds:
            return
        home = self._home
        if home is None:
            with self._lock:
                if self._home is None:  # no reader waits yet: into the buffer from here
                    self._deliver(event)
                    return
            home = self._home
        if threading.get_ident() != home:
            self._offer_from_afar(event)
            return
        self._deliver(event)

    def _deliver(self, event: Event) -> None:
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
            self._leave()
        else:
            self.dropped = 0

    def _offer_from_afar(self, event: Event) -> None:
        """Hand ``event`` to the home loop; never waits, never touches the memory stream."""
        if self._gone:
            self._hub.unsubscribe(self)  # (on the hub's publishing thread, where it belongs)
            return
        with self._lock:
            if len(self._inbox) >= self._buffer:
                self._lost += 1  # the buffer-full rule, before the home loop has seen them
                return
            self._inbox.append((self._lost, event))
            self._lost = 0
            if self._drain_pending:
                return
            self._drain_pending = True
        self._schedule_drain()

    def _end(self) -> None:
        """End the stream once what it holds is delivered; from any thread."""
        if threading.get_ident() == self._home:
            self._send.close()
            return
        with self._lock:
            if self._home is None:  # no reader waits yet
                self._send.close()
                return
            self._ending = True
            if self._drain_pending:
                return  # the pending drain ends it
            self._drain_pending = True
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        assert self._call_home is not None
        try:
            self._call_home(self._drain)
        except RuntimeError:
            # The home loop has ended (asyncio: closed; trio: RunFinishedError): nobody is left
            # to read; stop collecting.
            self._gone = True
            with self._lock:
                self._inbox.clear()

    def _drain(self) -> None:
        """On the home loop: deliver the inbox with the usual rules, then end if asked to.

        Under trio an exception here would crash the home run: the memory stream's errors are
        all handled in :meth:`_offer`.
        """
        with self._lock:
            inbox, self._inbox = self._inbox, deque()
            lost, self._lost = self._lost, 0
            ending = self._ending
            self._drain_pending = False
        for lost_before, event in inbox:
            self.dropped += lost_before
            self._offer(event)
        # Lost after the last event handed over: carried by the next one delivered, or left
        # in ``dropped`` once the stream has ended.
        self.dropped += lost
        if ending:
            self._send.close()

    def _leave(self) -> None:
        """The hub forgets this stream, on the thread that publishes to it.

        From the home thread of a stream fed by a run on another thread, unsubscribing there
        would switch the learner's observation off under the running thread's feet; the flag
        makes that thread forget the stream at its next event (or at the run's end).
        """
        publisher = self._hub._loop_thread
        if self._home is None or publisher is None or threading.get_ident() == publisher:
            self._hub.unsubscribe(self)
        else:
            self._gone = True


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
        # A str is iterable: kinds="log" would otherwise be refused as the kinds g, l and o.
        if isinstance(kinds, str) or not isinstance(kinds, Iterable | None):
            raise TypeError(
                "kinds must be a collection of kind names such as {'log'}, got the "
                f"{type(kinds).__name__} {kinds!r}"
            )
        chosen = None if kinds is None else frozenset(kinds)
        if chosen is not None and not chosen <= EVENT_KINDS:
            unknown = ", ".join(sorted(map(str, chosen - EVENT_KINDS)))
            raise ValueError(f"unknown event kinds: {unknown}; known: {sorted(EVENT_KINDS)}")
        if isinstance(buffer, bool) or not (isinstance(buffer, int) or buffer == math.inf):
            raise TypeError(f"buffer must be an int of at least 1, or math.inf, got {buffer!r}")
        if buffer < 1:
            raise ValueError(f"buffer must be an int of at least 1, or math.inf, got {buffer}")
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
            stream._end()
        self._subscribers.clear()
        self._on_change(False)
        self._loop_thread = None  # (idle: a stream closed now is forgotten at once)
