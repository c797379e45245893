"""One pass over a data source: :class:`Batches`, its consumer side and its producer.

``BatchSource.open`` (``_data.py``) hands a stage a ``Batches`` for each pass. The consumer
takes batches with ``next_nowait()`` (the training loop's fast path) or ``await next()``; the
batches come from the source's iterator on the calling thread (inline) or from a producer that
fetches ahead: a worker thread for sync iterables, a task for async ones (see ``_data.py``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio

from ._prefetch import Failure, LoopFeed, Moved, ThreadFeed
from ._rng import capture_rng, drawn_between

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._data import BatchSource

__all__ = ["END", "WAIT", "Batches", "fetch_note"]


#: Slow fetches in a row a source whose compute draws random numbers is watched for before it
#: moves to a producer thread (see ``Batches._probed``).
PROBE_FETCHES = 8


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
    described = getattr(data, "described", None)  # (a concurrent validation's opened data)
    return described if isinstance(described, str) else type(data).__name__


def fetch_note(source: BatchSource, index: int) -> str:
    """The note an error raised by a source's iterator gets: which source, which batch."""
    return (
        f"aiolearner: raised by {source.name} ({_describe(source.data)}) while fetching batch "
        f"{index} of this pass"
    )


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
        self._receive: LoopFeed[Any] | ThreadFeed | None = None
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._mover = source.mover
        self._inflight: Any = END
        #: The async producer awaits the iterator's next batch; told to stop once it has it.
        self._fetching = False
        self._stop_after_fetch = False
        # Set when the producer was started by an inline fetch: next() gives it a turn first.
        self._producer_fresh = False
        # A list or a tuple of batches: they are made, so a fetch is a step of its iterator,
        # never slow (not timed, never a producer).
        self._timed = source.fetch == "auto" and source.counts
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
        source = self.source
        if self._limit is not None and self._taken >= self._limit:
            self.finished = True
            return END
        if source._leftover:
            item = source._leftover.popleft()
            if source.undone is not None and item is source.undone[0]:
                source.undone = None  # served again (see BatchSource.put_back)
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

    def direct(self) -> tuple[Iterator[Any], float | None] | None:
        """For a burst of batches, where taking a batch is taking the next item of the pass's
        iterator on the calling thread (no producer, nothing put back waiting to be served
        first, no step limit, no slow fetch being watched): that iterator and the seconds a
        fetch may take (``None``: not timed), else ``None``.

        The burst moves each item it takes (:attr:`move`), counts them (:meth:`count_taken`)
        before it ends or takes a batch by :meth:`next_nowait`, notes a failed fetch with
        :meth:`failed`, the end with :meth:`end`, and a fetch over budget with
        :meth:`slow_fetch`, after which it takes its batches by :meth:`next_nowait`: what a
        second slow fetch in a row decides is that method's (see ``_fetch_inline``)."""
        source = self.source
        if self._limit is not None or source.slow or source._leftover or self._receive is not None:
            return None
        if not self._timed or source.kept_inline is not None:
            return self._it, None
        return (self._it, source.fetch_budget) if not source.slow_fetches else None

    def slow_fetch(self) -> None:
        """A fetch taken by a burst (see :meth:`direct`) took over the budget, the first in a
        row: as :meth:`_fetch_inline` notes one."""
        self.source.slow_fetches = 1
        self.source.after_slow = capture_rng()

    def failed(self, exc: Exception, taken: int = 0) -> BaseException:
        """``exc``, raised by the iterator while fetching the pass's next batch, ``taken``
        batches after those counted (by a burst, see :meth:`direct`), with a note saying which."""
        return self._failed(exc, self.index + taken)

    def end(self) -> Any:
        """The pass's iterator ran out (taken by a burst, see :meth:`direct`): ``END``."""
        return self._accept(END)

    def count_taken(self, n: int) -> None:
        """``n`` batches more were taken from the pass's iterator."""
        source = self.source
        source.fetched += n
        source.position += n
        self._taken += n
        self.index += n

    @property
    def move(self) -> Callable[[Any], Any] | None:
        """Moves a batch taken on the calling thread to the training device; ``None`` where a
        move is the batch itself (``DeviceMover.identity``)."""
        return None if self._mover.identity else self._mover.move_inline

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
            f"{'train' if source.name == 'train_data' else 'evaluate'} on nothing{hint}"
        )

    def _failed(self, exc: BaseException, index: int) -> BaseException:
        exc.add_note(fetch_note(self.source, index))
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
        source = self.source
        auto = self._timed and source.kept_inline is None
        # After a slow fetch, whether this one and what ran since the last one draw from the
        # global generators (read only then: a slow fetch pays for it, a cheap one does not).
        before = capture_rng() if auto and source.slow_fetches >= 1 else None
        drawn = source.drawn
        start = time.perf_counter()
        try:
            batch = next(self._it)
        except StopIteration:
            return self._accept(END)
        except Exception as exc:
            raise self._failed(exc, self.index) from None
        source.fetched += 1
        if auto:
            took = time.perf_counter() - start
            if took <= source.fetch_budget:
                source.slow_fetches = 0
            else:
                # Slow: two fetches in a row over budget. One alone may be a garbage collection
                # or the machine being busy (a fetch of tensors in memory can take many times its
                # usual time on a loaded machine), so even a long single fetch is not enough.
                # Fetch ahead in a worker thread from now on, unless its draws say otherwise
                # (see _probed).
                source.slow_fetches += 1
                if source.slow_fetches == 1 or (source.counts and source.drawn == drawn):
                    # The first slow fetch, or one that served a batch drawn earlier (a rebuilt
                    # pass serves those its iterator had fetched ahead): what it draws says
                    # nothing, the decision waits for a fetch that draws from the data.
                    source.slow_fetches = 1
                    source.after_slow = capture_rng()
                elif before is None or self._probed(source, before):
                    source.slow = True
                    if not off_loop:  # a task can only be started from the loop
                        self._start_producer(handed=1)
                        self._producer_fresh = True
                        # Handed back through the leftover queue, counted when taken.
                        raise _Switched(self._mover.move_inline(batch))
        moved = self._mover.move_inline(batch)
        self._taken += 1
        self.index += 1
        source.position += 1
        return moved

    @staticmethod
    def _probed(source: BatchSource, before: dict[str, Any]) -> bool:
        """After a slow fetch that followed another: whether the source may move to a
        producer thread. Not while its fetches and what ran between them (the batches'
        compute, their hooks) draw from one global generator in common: fetched ahead, the
        two threads' draws would interleave as the threads happen to run, in another order
        every run, so it stays inline (:attr:`BatchSource.kept_inline`). With compute drawing,
        the fetches are watched for ``PROBE_FETCHES`` before the move: a source whose batches
        draw only now and then (augmentation applied at random) must be seen drawing."""
        after, since = capture_rng(), source.after_slow
        source.after_slow = after  # where the next look begins
        if since is None:
            return True
        data = drawn_between(before, after)
        source.data_draws = data if source.data_draws is None else source.data_draws | data
        source.compute_draws |= drawn_between(since, before)
        shared = source.data_draws & source.compute_draws
        if shared:
            source.kept_inline = (
                f"its fetches draw from the global {', '.join(sorted(shared))} generator"
                f"{'s' if len(shared) > 1 else ''} as compute does"
            )
            return False
        source.probes += 1
        return not source.compute_draws or source.probes >= PROBE_FETCHES

    # -- producer side ---------------------------------------------------------------------------

    def _start_producer(self, handed: int = 0) -> None:
        """Start fetching ahead; ``handed``: batches fetched already and not yet counted (the
        one that found the source slow), which the consumer takes before the producer's."""
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        name = f"aiolearner.{self.source.name}"
        # The pass's index of the producer's first batch (for the note on a failed fetch): the
        # batches counted, then those waiting to be taken before its own.
        index = self.index + len(self.source._leftover) + handed
        if self.source.is_async:
            buffer = LoopFeed[Any](self.source.prefetch)
            self._receive = buffer
            self._tg.start_soon(self._produce, buffer, self._scope, self._done, index, name=name)
        else:
            feed = ThreadFeed(self.source.prefetch)
            self._receive = feed
            self._tg.start_soon(
                self._produce_in_thread, feed, self._scope, self._done, index, name=name
            )

    def _fetch_sync(self) -> Any:
        try:
            with self.source.draw_lock:
                batch = next(self._it)
        except StopIteration:
            return END
        self.source.fetched += 1
        moved, event = self._mover.move_ahead(batch)
        if event is None:
            return moved
        return (Moved(moved), event)

    async def _produce_in_thread(
        self, feed: ThreadFeed, scope: anyio.CancelScope, done: anyio.Event, index: int
    ) -> None:
        # One hop for the whole pass: the thread fetches batch after batch on its own, so
        # fetching goes on while the event loop is busy (with inline compute, say). A hop per
        # batch would need a turn of the loop to start each fetch and so would not overlap it.
        try:
            with scope:
                await anyio.to_thread.run_sync(
                    self._produce_sync, feed, index, limiter=self._limiter
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
        self,
        buffer: LoopFeed[Any],
        scope: anyio.CancelScope,
        done: anyio.Event,
        index: int,
    ) -> None:
        item: Any = END
        source = self.source
        try:
            with scope:
                detached = source.detached
                if detached is not None:
                    # The last pass's fetch under way: its batch goes first.
                    await detached[1].wait()
                    source.detached = None
                if source.handoff is not None:  # (also one the last run's end let finish)
                    handed, source.handoff = source.handoff, None
                    if handed is END:
                        buffer.finish()
                        return
                    if handed is not None:
                        item = handed  # (in flight until put: a pass closed at once keeps it)
                        await buffer.put(handed)
                        item = END
                        if type(handed) is Failure:
                            buffer.finish()
                            return
                        index += 1
                while True:
                    try:
                        self._fetching = True
                        try:
                            raw = await anext(self._it)
                        except StopAsyncIteration:
                            if self._stop_after_fetch:
                                source.handoff = END
                                return
                            buffer.finish()
                            return
                        except anyio.get_cancelled_exc_class():
                            if self._it is source._it and inspect.isasyncgen(self._it):
                                source.broken = True  # (raised when a pass goes on with it)
                            raise
                        finally:
                            self._fetching = False
                        source.fetched += 1
                        item = self._mover.move_inline(raw)
                        if self._stop_after_fetch:  # detached: for the next pass
                            source.handoff, item = item, END
                            return
                    except Exception as exc:
                        item = END
                        if self._stop_after_fetch:
                            source.handoff = Failure(exc, index)
                            return
                        await buffer.put(Failure(exc, index))
                        buffer.finish()
                        return
                    # A cancelled put has not put the item (LoopFeed): it stays in flight.
                    await buffer.put(item)
                    item = END
                    index += 1
        finally:
            # Fetched but never handed over (the pass was closed): aclose() keeps it for the next
            # pass, after the batches still in the buffer, which were fetched before it.
            # Cancelled (the pass closing, or the run cancelled), the producer does not finish
            # the buffer: its consumer must not take that for the end of the data.
            self._inflight = item
            done.set()

    def release(self) -> None:
        """Drop the pass's iterator (the source makes a new one for its next pass)."""
        self._it = None

    async def aclose(self) -> None:
        """Stop the producer and keep what it fetched ahead for the next pass."""
        if self._scope is None or self._done is None or self._receive is None:
            return
        if type(self._receive) is ThreadFeed:
            # The thread stops before its next fetch (or as soon as a full buffer has room).
            self._receive.stop()
        elif self._fetching and self.source.persistent and inspect.isasyncgen(self._it):
            # Cancelled inside its next batch, an async generator ends (its finally runs): a
            # live stream goes on in the next pass, so the fetch under way goes on, detached,
            # and the next pass serves its batch first (see _produce). Nobody waits for it now.
            self._stop_after_fetch = True
            self.source.detached = (self._scope, self._done)
        if self.source.detached is None or self.source.detached[1] is not self._done:
            self._scope.cancel()
            with anyio.CancelScope(shield=True):
                await self._done.wait()
        leftover = self.source._leftover
        while True:
            try:
                item = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            if item is not END:
                # A failed fetch too: the batch it stands for raises when it is taken (a
                # one-pass stream's error would otherwise read as its end next pass).
                leftover.append(item)
        if self._inflight is not END:
            leftover.append(self._inflight)
        self._receive.close()
