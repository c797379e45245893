"""Feeding batches to the stages, overlapping data loading with compute.

A :class:`BatchSource` wraps what the user gave as training or validation data: any iterable of
batches (a torch DataLoader included) or an async iterable. For each pass it hands the stage a
:class:`Batches` iterator, in one of two modes:

* **inline**: ``next()`` on the source is called on the event loop when the batch is needed. This
  is what a cheap source (tensors in memory, a DataLoader whose worker processes keep up) needs: a
  thread hop costs far more than such a fetch (docs/performance.md).
* **producer**: a producer task, started in the learner's run task group, fetches batches ahead of
  use (in a worker thread for sync iterables, so a slow ``__getitem__`` or collate never blocks the
  loop; directly for async iterables), moves them to the device (pinned memory and a side stream
  on CUDA) and sends them into a bounded memory object stream of ``prefetch`` batches (from a
  thread, a buffer of its own: ``_prefetch.py``).

With ``fetch="auto"`` (the default) a sync source starts inline and moves to the producer as soon
as two fetches in a row take longer than ``fetch_budget`` seconds; async iterables always use the
producer.

Errors raised by the source surface in the stage that consumes the batch, as their own type, with a
note naming the source and the batch index. Closing a pass cancels the producer and waits for it.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._device import DeviceMover
from ._prefetch import Failure, Moved, ThreadFeed
from ._rng import capture_data_streams, capture_rng, restore_data_streams, restore_rng

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ["END", "WAIT", "BatchSource", "Batches", "FetchMode"]

FetchMode = Literal["auto", "thread", "inline"]


class _End:
    def __repr__(self) -> str:
        return "END"


#: Returned by ``Batches.next()`` when the pass has no more batches.
END: Any = _End()


class _Wait:
    def __repr__(self) -> str:
        return "WAIT"


#: Returned by ``Batches.next_nowait()`` when the next batch must be awaited.
WAIT: Any = _Wait()


#: The most turns the consumer gives a producer thread it has just started to begin fetching.
PRODUCER_START_TURNS = 20


class _Switched(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by an inline fetch that has just started the producer: the loop should give the
    producer a turn before the batch (``batch``, already fetched) is computed."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch


def _describe(data: object) -> str:
    return type(data).__name__


class BatchSource:
    """One data set of a learner (``train_data`` or ``val_data``)."""

    def __init__(
        self,
        data: Any,
        *,
        name: str,
        mover: DeviceMover,
        prefetch: int,
        fetch: FetchMode,
        fetch_budget: float,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.is_async = hasattr(data, "__aiter__")
        if not self.is_async and not hasattr(data, "__iter__"):
            raise TypeError(
                f"{name} must be an iterable of batches (a torch DataLoader, a list, a generator)"
                f" or an async iterable, got {type(data).__name__}"
            )
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        if fetch not in ("auto", "thread", "inline"):
            raise ValueError(f"fetch must be 'auto', 'thread' or 'inline', got {fetch!r}")
        self.data = data
        self.name = name
        self.mover = mover
        self.prefetch = prefetch
        self.fetch = fetch
        self.fetch_budget = fetch_budget
        self.steps_per_epoch = steps_per_epoch
        self.slow = fetch == "thread"
        #: Consecutive inline fetches over ``fetch_budget`` (fetch="auto").
        self.slow_fetches = 0
        # Persisting across passes: the live iterator (when steps_per_epoch cuts passes short)
        # and the batches fetched ahead but not consumed when a pass was interrupted.
        self._it: Any = None
        self._leftover: deque[Any] = deque()
        #: The random state the live iterator was created from (see :meth:`_create`): the
        #: global generators (``"rng"``) and the source's own streams (``"generators"``,
        #: ``"epochs"``, see ``_rng.capture_data_streams``); ``None`` before a pass begins.
        #: Without steps_per_epoch it is the current pass's (the learner clears it when the
        #: epoch ends); with it, the stream's.
        self.begun: dict[str, Any] | None = None
        #: With steps_per_epoch: batches taken from the live iterator since it started, and
        #: where in it the current epoch's pass began (what a checkpoint needs, with
        #: :attr:`begun`, to rebuild the stream exactly).
        self.position = 0
        self.origin = 0
        self._resume: tuple[int, dict[str, Any] | None] | None = None
        #: Fetches done by the source (for tests and the throughput callback).
        self.fetched = 0
        #: A new iterator that yields nothing is an error (the learner's training and
        #: validation data; not the data of predict).
        self.must_yield = False

    @property
    def persistent(self) -> bool:
        """Whether the live iterator outlives a pass (steps_per_epoch)."""
        return self.steps_per_epoch is not None

    def __len__(self) -> int:
        n = len(self.data)
        return n if self.steps_per_epoch is None else min(n, self.steps_per_epoch)

    @asynccontextmanager
    async def open(
        self, tg: TaskGroup, *, skip: int = 0, start: dict[str, Any] | None = None
    ) -> AsyncIterator[Batches]:
        """One pass. ``skip`` batches of it are done already (resuming mid-epoch); ``start``:
        the random state (:attr:`begun`) the pass's iterator was first created from, to rebuild
        it drawing the same order (resuming a pass that had begun).

        A new iterator is fast-forwarded over them; with ``steps_per_epoch`` the live stream
        continues instead (or, after a checkpoint was loaded, restarts at its saved position).
        """
        persistent = self.persistent
        # Per pass: a limiter belongs to the event loop it was first used in, and the learner
        # may run under another loop (or backend) next time. One thread at a time works the
        # source's iterator (creating it, then the producer), off anyio's default limiter.
        limiter = anyio.CapacityLimiter(1)
        fresh = False
        if self._it is None or not persistent:
            self._leftover.clear()
            forward = skip
            if persistent:
                # A stream outlives epochs: it restarts where the checkpoint's epoch began in it,
                # from the stream's own start state, not from the epoch's.
                origin = 0
                start = None
                if self._resume is not None:
                    origin, start = self._resume
                    forward = origin + skip
                self._resume = None
                self.position = forward
                self.origin = origin
            fresh = forward == 0
            if self.is_async:
                self._it = aiter(self.data)
                for _ in range(forward):
                    await anext(self._it)
            elif forward or self.slow:
                await anyio.to_thread.run_sync(self._create, forward, start, limiter=limiter)
            else:
                self._create(0, start)
        elif skip == 0:
            self.origin = self.position  # a new epoch on the live stream
        batches = Batches(self, self._it, tg, skip, limiter, fresh=fresh)
        try:
            yield batches
        finally:
            await batches.aclose()
            if batches.finished:
                self.origin = self.position  # the next epoch's pass begins here

    def _create(self, skip: int, start: dict[str, Any] | None) -> None:
        """Create the live iterator, in whichever thread fetches, and take its first batch.

        Samplers draw their order on the first fetch, not when the iterator is created, so the
        first batch is fetched here, in the same call: no cancellation can fall between the
        iterator's creation and its draw, and :attr:`begun` (set here too, not by the caller,
        which a cancellation may stop before it sees the result) always describes an iterator
        that has drawn. With ``start`` (a pass rebuilt), the global generators and the source's
        own streams are put at that state for the creation and the fast-forward; then the global
        ones go back to where training is (they are shared with compute), while the source's
        own are left where the replay took them, where the first run had them.
        """
        if start is None:
            begun = capture_rng()
            streams = capture_data_streams(self.data)
            self._it = self._fast_forward(skip)
            self.begun = {"rng": begun, **streams}
            return
        now = capture_rng()
        restore_rng(start["rng"])
        if "generators" in start:
            restore_data_streams(self.data, start, what=self.name)
        try:
            self._it = self._fast_forward(skip)
        finally:
            restore_rng(now)
        self.begun = start

    def _fast_forward(self, skip: int) -> Iterator[Any]:
        it: Iterator[Any] = iter(self.data)
        if not skip:
            try:
                first = next(it)
            except StopIteration:
                return iter(())
            return itertools.chain([first], it)
        for i in range(skip):
            try:
                next(it)
            except StopIteration:
                raise RuntimeError(
                    f"cannot resume {self.name} at batch {skip}: it has only {i} batches now"
                ) from None
        return it

    def exhausted(self) -> None:
        """The live iterator ran out; the next pass starts a new one."""
        self._it = None
        self.position = 0

    def stream_state(self) -> tuple[int, dict[str, Any] | None] | None:
        """With steps_per_epoch: ``(where this epoch's pass began in the stream, the random
        state the stream began from)``; None without a live stream."""
        if not self.persistent or self._it is None:
            return None
        return self.origin, self.begun

    def restart(self, stream: tuple[int, dict[str, Any] | None] | None = None) -> None:
        """Drop the live iterator (a checkpoint was loaded); ``stream`` is its
        :meth:`stream_state`, to rebuild the stream there."""
        self._it = None
        self._leftover.clear()
        self._resume = stream


class Batches:
    """The batches of one pass: ``await batches.next()`` until it returns ``batches.END``."""

    END = END
    WAIT = WAIT

    def __init__(
        self,
        source: BatchSource,
        it: Any,
        tg: TaskGroup,
        index: int,
        limiter: anyio.CapacityLimiter,
        *,
        fresh: bool = False,
    ) -> None:
        self.source = source
        self._it = it
        self._tg = tg
        self.index = index
        self._limiter = limiter
        # A new iterator from its first batch: ending before any is empty data.
        self._fresh = fresh
        self._taken = 0
        #: Whether the pass ran to its end (not interrupted).
        self.finished = False
        # A resumed pass takes only what its epoch has left.
        steps = source.steps_per_epoch
        self._limit = None if steps is None else max(0, steps - index)
        self._receive: MemoryObjectReceiveStream[Any] | ThreadFeed | None = None
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._mover = source.mover
        self._inflight: Any = END
        # Set when the producer was started by an inline fetch: next() gives it a turn first.
        self._producer_fresh = False
        if source.is_async or source.slow:
            self._start_producer()

    # -- consumer side ---------------------------------------------------------------------------

    def next_nowait(self, *, off_loop: bool = False) -> Any:
        """The next batch if it is ready now, ``END``, or ``WAIT``: then await :meth:`next`.

        The training loop's fast path: a batch that needs no waiting costs no coroutine.
        ``off_loop``: called from the compute worker thread (a burst of batches, see ``Fit``):
        ``WAIT`` wherever going on needs the event loop (an async source's stream), and a source
        found slow gets its producer once the loop calls :meth:`start_producer_if_slow`.
        """
        if self._limit is not None and self._taken >= self._limit:
            self.finished = True
            return END
        source = self.source
        if source._leftover:
            item = source._leftover.popleft()
        elif self._receive is None:
            try:
                return self._fetch_inline(off_loop)
            except _Switched as switched:
                # The batch goes first, then what the producer fetches after it; the caller
                # awaits next(), which gives the producer its first turn before that batch.
                source._leftover.appendleft(switched.batch)
                return WAIT
        elif off_loop and type(self._receive) is not ThreadFeed:
            return WAIT
        else:
            try:
                item = self._receive.receive_nowait()
            except anyio.WouldBlock:
                return WAIT
            except anyio.EndOfStream:
                item = END
        return self._accept(item)

    async def next(self) -> Any:
        """The next batch, on the device, or ``END``."""
        if self._producer_fresh:
            # Started by an inline fetch just now: a few turns let its thread begin fetching the
            # batch after this one, which then overlaps this one's compute instead of following
            # it. (Starting a worker thread takes anyio a few turns; bounded, once per source.)
            self._producer_fresh = False
            feed = self._receive
            for _ in range(PRODUCER_START_TURNS):
                await anyio.lowlevel.checkpoint()
                if type(feed) is not ThreadFeed or feed.started:
                    break
        item = self.next_nowait()
        if item is WAIT and self._producer_fresh:
            # This very fetch found the source slow and started the producer: the batch it
            # fetched waits in the leftover queue, taken after the producer's first turns.
            return await self.next()
        if item is WAIT:
            assert self._receive is not None
            try:
                item = await self._receive.receive()
            except anyio.EndOfStream:
                item = END
            item = self._accept(item)
        return item

    def _accept(self, item: Any) -> Any:
        if item is END:
            if self._fresh and not self._taken and self.source.must_yield:
                raise self._empty() from None
            self.source.exhausted()
            self.finished = True
            return END
        if type(item) is Failure:
            raise self._failed(item.exc, item.index)
        self._taken += 1
        self.index += 1
        self.source.position += 1
        if type(item) is tuple and len(item) == 2 and type(item[0]) is Moved:
            return self._mover.ready(item[0].batch, item[1])
        return item

    def _empty(self) -> ValueError:
        source = self.source
        hint = (
            " (an iterator or a generator can be iterated only once: did an earlier pass use it"
            " up? pass something that makes a new iterator for each pass, such as a list or a"
            " DataLoader)"
            if isinstance(source.data, Iterator | AsyncIterator)
            else ""
        )
        return ValueError(
            f"{source.name} ({_describe(source.data)}) yielded no batch: a pass over it would "
            f"train on nothing{hint}"
        )

    def _failed(self, exc: BaseException, index: int) -> BaseException:
        exc.add_note(
            f"aiolearner: raised by {self.source.name} ({_describe(self.source.data)}) while "
            f"fetching batch {index} of this pass"
        )
        return exc

    @property
    def wants_producer(self) -> bool:
        """Whether the source was found slow off the loop and waits for its producer."""
        return self._receive is None and self.source.slow

    def start_producer_if_slow(self) -> None:
        """On the event loop, after a burst: start the producer a slow source now needs."""
        if self.wants_producer:
            self._start_producer()

    def _fetch_inline(self, off_loop: bool = False) -> Any:
        """Fetch on the calling thread; what :meth:`next_nowait` returns (the batch counted as
        :meth:`_accept` counts one: it is done here, once a batch a call fewer)."""
        start = time.perf_counter()
        try:
            batch = next(self._it)
        except StopIteration:
            return self._accept(END)
        except Exception as exc:
            raise self._failed(exc, self.index) from None
        source = self.source
        source.fetched += 1
        if source.fetch == "auto":
            took = time.perf_counter() - start
            if took <= source.fetch_budget:
                source.slow_fetches = 0
            else:
                # Slow: two fetches in a row over budget. One alone may be a garbage collection
                # or the machine being busy (a fetch of tensors in memory can take many times its
                # usual time on a loaded machine), so even a long single fetch is not enough.
                # Fetch ahead in a worker thread from now on.
                source.slow_fetches += 1
                if source.slow_fetches >= 2:
                    source.slow = True
                    if not off_loop:  # a task can only be started from the loop
                        self._start_producer()
                        self._producer_fresh = True
                        # Handed back through the leftover queue, counted when taken.
                        raise _Switched(self._mover.move_inline(batch))
        moved = self._mover.move_inline(batch)
        self._taken += 1
        self.index += 1
        source.position += 1
        return moved

    # -- producer side ---------------------------------------------------------------------------

    def _start_producer(self) -> None:
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        name = f"aiolearner.{self.source.name}"
        if self.source.is_async:
            send, receive = anyio.create_memory_object_stream[Any](self.source.prefetch)
            self._receive = receive
            self._tg.start_soon(self._produce, send, self._scope, self._done, name=name)
        else:
            feed = ThreadFeed(self.source.prefetch)
            self._receive = feed
            self._tg.start_soon(self._produce_in_thread, feed, self._scope, self._done, name=name)

    def _fetch_sync(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            return END
        self.source.fetched += 1
        moved, event = self._mover.move_ahead(batch)
        if event is None:
            return moved
        return (Moved(moved), event)

    async def _produce_in_thread(
        self, feed: ThreadFeed, scope: anyio.CancelScope, done: anyio.Event
    ) -> None:
        # One hop for the whole pass: the thread fetches batch after batch on its own, so
        # fetching goes on while the event loop is busy (with inline compute, say). A hop per
        # batch would need a turn of the loop to start each fetch and so would not overlap it.
        try:
            with scope:
                await anyio.to_thread.run_sync(
                    self._produce_sync, feed, self.index, limiter=self._limiter
                )
        finally:
            done.set()

    def _produce_sync(self, feed: ThreadFeed, index: int) -> None:
        feed.started = True
        item: Any = END
        try:
            while not feed.stopped:
                try:
                    item = self._fetch_sync()
                except Exception as exc:
                    item = END
                    feed.put(Failure(exc, index))
                    return
                if item is END or not feed.put(item):
                    return
                item = END
                index += 1
        finally:
            # Fetched but never handed over (the pass was closed): aclose() keeps it.
            self._inflight = item
            feed.finish()

    async def _produce(
        self, send: MemoryObjectSendStream[Any], scope: anyio.CancelScope, done: anyio.Event
    ) -> None:
        index = self.index
        item: Any = END
        try:
            with scope, send:
                while True:
                    try:
                        try:
                            raw = await anext(self._it)
                        except StopAsyncIteration:
                            return
                        self.source.fetched += 1
                        item = self._mover.move_inline(raw)
                    except Exception as exc:
                        item = END
                        await send.send(Failure(exc, index))
                        return
                    await send.send(item)
                    item = END
                    index += 1
        finally:
            # Fetched but never handed over (the pass was closed): aclose() keeps it for the next
            # pass, after the batches still in the buffer, which were fetched before it.
            self._inflight = item
            done.set()

    async def aclose(self) -> None:
        """Stop the producer and keep what it fetched ahead for the next pass."""
        if self._scope is None or self._done is None or self._receive is None:
            return
        if type(self._receive) is ThreadFeed:
            # The thread stops before its next fetch (or as soon as a full buffer has room).
            self._receive.stop()
        self._scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._done.wait()
        leftover = self.source._leftover
        while True:
            try:
                item = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            if item is not END and type(item) is not Failure:
                leftover.append(item)
        if self._inflight is not END:
            leftover.append(self._inflight)
        self._receive.close()
