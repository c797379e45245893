"""Feeding batches to the stages, overlapping data loading with compute.

A :class:`BatchSource` wraps what the user gave as training or validation data: any iterable of
batches (a torch DataLoader included) or an async iterable. For each pass it hands the stage a
:class:`Batches` iterator (``_batches.py``), in one of two modes:

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
producer. A source whose fetches draw from a global generator (augmentation in ``__getitem__``)
that compute draws from too (dropout) stays inline: a producer thread's draws and the compute
thread's would interleave in a different order in every run (see :attr:`BatchSource.kept_inline`;
where compute draws, the fetches are watched for a few batches before the move).

Errors raised by the source surface in the stage that consumes the batch, as their own type, with a
note naming the source and the batch index. Closing a pass cancels the producer and waits for it.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import anyio
from torch.utils.data import IterableDataset

from ._batches import END, WAIT, Batches, fetch_note
from ._checks import check_count, check_source, one_pass
from ._device import DeviceMover
from ._rng import capture_data_streams, capture_rng, restore_data_streams, restore_rng

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ["END", "WAIT", "BatchSource", "Batches", "FetchMode"]

FetchMode = Literal["auto", "thread", "inline"]


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
        check_source(name, data)
        check_count("prefetch", prefetch)
        if fetch not in ("auto", "thread", "inline"):
            raise ValueError(f"fetch must be 'auto', 'thread' or 'inline', got {fetch!r}")
        self.data = data
        self.name = name
        self.mover = mover
        self.prefetch = prefetch
        self.fetch = fetch
        self.fetch_budget = fetch_budget
        self.steps_per_epoch = steps_per_epoch
        self._one_pass = one_pass(data) and not getattr(data, "_is_feed", False)
        self.slow = fetch == "thread"
        #: Consecutive inline fetches over ``fetch_budget`` (fetch="auto").
        self.slow_fetches = 0
        #: With fetch="auto": the global generators the last slow fetch left (see
        #: ``Batches._fetch_inline``), and, once the source was found slow, why it stays inline
        #: (the generators its fetches and compute both draw from), or ``None``.
        self.after_slow: dict[str, Any] | None = None
        self.kept_inline: str | None = None
        #: What those fetches were seen to draw from (``None``: never looked at), what ran
        #: between them drew from, and how many were looked at.
        self.data_draws: set[str] | None = None
        self.compute_draws: set[str] = set()
        self.probes = 0
        # Persisting across passes: the live iterator (when steps_per_epoch cuts passes short)
        # and the batches fetched ahead but not consumed when a pass was interrupted.
        self._it: Any = None
        self._leftover: deque[Any] = deque()
        #: A pass's producer left awaiting an async generator's next batch when the pass
        #: closed (cancelled there, the generator would end): its cancel scope and the event
        #: set when it is over; what it fetched (a batch, a Failure, END) is in :attr:`handoff`,
        #: which the next pass's producer serves first. The run's end cancels it.
        self.detached: tuple[anyio.CancelScope, anyio.Event] | None = None
        self.handoff: Any = None
        #: The live iterator is an async generator a cancellation landed in (the run was
        #: cancelled, or ended, while it fetched): it has ended, and cannot go on.
        self.broken = False
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
        #: Where the current (or last) epoch's pass began: the origin stays that until the
        #: epoch's counters roll over, also once the pass has ended (see :meth:`stream_state`).
        self.pass_origin = 0
        self._resume: tuple[int, dict[str, Any] | None] | None = None
        # The live stream ran out in the current pass (see open()).
        self._ended = False
        #: Fetches done by the source (for tests and the throughput callback).
        self.fetched = 0
        #: Batches the live iterator has drawn from the data since it was created: those the
        #: pass served and those fetched ahead of it (counted where drawing may take random
        #: numbers: any source but a list or a tuple). An interrupted pass is rebuilt up to
        #: there (see :meth:`_create`). A producer thread holds ``draw_lock`` while it draws,
        #: so that a checkpoint reads the count and the random state at one point.
        self.drawn = 0
        self.draw_lock = threading.Lock()
        #: Whether :attr:`drawn` counts (drawing from a list or tuple takes no random numbers).
        self.counts = type(data) not in (list, tuple)
        #: A :meth:`mark` to go back to when the pass closes (a batch was rolled back).
        self._rollback: tuple[dict[str, Any], int] | None = None
        #: A batch drawn and then undone without a mark (a synchronous batch stopped before
        #: its commit), in a 1-tuple: the rebuilt pass serves it again instead of drawing it
        #: again (see :meth:`keep_undone`).
        self.undone: tuple[Any] | None = None
        #: A new iterator that yields nothing is an error (the learner's training and
        #: validation data; not the data of predict).
        self.must_yield = False

    @property
    def persistent(self) -> bool:
        """Whether the live iterator outlives a pass: with steps_per_epoch, and for one-pass
        data (a generator, an iterator; not a Feed, which serves what arrives), whose iterator
        is the data itself: a pass interrupted half way goes on in it, rather than skipping
        what it served in a new one, which would be the same, advanced, iterator."""
        return self.steps_per_epoch is not None or self._one_pass

    def __len__(self) -> int:
        """The batches of the current (or next) pass: with a live stream, what the data has
        left from where this epoch's pass began in it."""
        n = len(self.data)
        if self.steps_per_epoch is None:
            return n
        if self._it is not None and 0 < self.origin < n:
            n -= self.origin
        return min(n, self.steps_per_epoch)

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
        if self.broken and persistent and self._it is not None:
            raise RuntimeError(
                f"{self.name} ({type(self._it).__name__}) cannot go on: a cancellation landed "
                "in the async generator while it fetched a batch (the last run was cancelled, "
                "or ended, while it waited for data), and an async generator ends there. To "
                "continue a stream across fit calls, feed it through aiolearner.Feed (a task "
                "sending into it) or an async iterator class whose __anext__ survives "
                "cancellation"
            )
        # Per pass: a limiter belongs to the event loop it was first used in, and the learner
        # may run under another loop (or backend) next time. One thread at a time works the
        # source's iterator (creating it, then the producer), off anyio's default limiter.
        limiter = anyio.CapacityLimiter(1)
        fresh = False
        if persistent and self._ended and skip:
            # The live stream ended in this epoch's pass, interrupted before it closed: the
            # pass has nothing left (a new stream would serve the next epoch's batches).
            self._it = _nothing() if self.is_async else iter(())
        self._ended = False
        if persistent and self._it is not None and skip == 0 and self._at_end():
            self.exhausted()  # the last pass took the data's last batch: start it again
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
                self.origin = self.pass_origin = origin
            fresh = forward == 0
            if getattr(self.data, "_is_feed", False):
                # A Feed serves records as they arrive, never the same twice: what it serves
                # next comes after what was trained on, also for a fresh learner resumed from a
                # checkpoint (its records of before are gone with the old process). Skipping
                # would drop new ones.
                self._it = aiter(self.data)
            elif self.is_async:
                self._it = aiter(self.data)
                for _ in range(forward):
                    await anext(self._it)
            elif forward or self.slow:
                await anyio.to_thread.run_sync(self._create, forward, start, limiter=limiter)
            else:
                self._create(0, start)
        elif skip == 0:
            self.origin = self.pass_origin = self.position  # a new epoch on the live stream
        batches = Batches(self, self._it, tg, skip, limiter, fresh=fresh)
        try:
            yield batches
        finally:
            await batches.aclose()
            if batches.finished:
                self.origin = self.position  # the next epoch's pass begins here
            if not persistent:
                # The next pass makes a new iterator (an interrupted one is rebuilt): let this
                # one go now, with the worker processes of a DataLoader's.
                it, self._it = self._it, None
                batches.release()
                if self.is_async and it is not None and it is not self.data:
                    await _aclose(it)
            self._apply_rollback()

    def _at_end(self) -> bool:
        """Whether the live stream of sized, re-iterable data has served all its batches (the
        next fetch would end it: a pass would be empty)."""
        if self._leftover or isinstance(getattr(self.data, "dataset", None), IterableDataset):
            return False
        try:
            return self.position >= len(self.data)
        except TypeError:
            return False

    def put_back(self, batch: Any) -> None:
        """A batch taken from the live stream was not trained on (interrupted before its
        commit): it is served again first, as the batches fetched ahead are."""
        if self.persistent and self._it is not None:
            self._leftover.appendleft(batch)
            self.position -= 1
            if self._one_pass and self.steps_per_epoch is None and self.counts:
                # A checkpoint holds it (as keep_undone's): a fresh run resumed from it with
                # a new generator serves this batch, not the same one drawn again.
                self.undone = (batch,)

    def keep_undone(self, batch: Any) -> None:
        """A synchronous batch was undone before its commit, by a stop or an error raised in a
        hook before its update, with no :meth:`mark` of where the generators were before it was
        drawn (reading one per batch costs more than the batch's bookkeeping). Whatever drew
        from the global generators since then (dropout) ran after the batch's own draws
        (augmentation in ``__getitem__``), so those are kept as they are: the pass rebuilt over
        the batches drawn serves this batch object again, where drawing it again from the
        pass's start state would give other numbers. (The draws of a forward that ran before
        the stop are not undone.) Not for a list or tuple, which draw nothing, nor for a live
        stream with steps_per_epoch, which serves the batch again itself (:meth:`put_back`;
        one-pass data without it keeps the batch here too, for a checkpoint to hold)."""
        if self.counts and (not self.persistent or (self._one_pass and not self.steps_per_epoch)):
            self.undone = (batch,)

    def mark(self) -> tuple[dict[str, Any], int]:
        """The global random state and :attr:`drawn` at a batch's start, read between two
        draws of a producer thread, for :meth:`roll_back`."""
        with self.draw_lock:
            return capture_rng(), self.drawn

    def roll_back(self, mark: tuple[dict[str, Any], int]) -> None:
        """An interrupted batch is undone: the global generators go back to ``mark``, where
        they were when it began, once the pass has closed (no producer thread draws then).
        Batches fetched ahead meanwhile drew from them too: the pass is rebuilt as far as it
        had drawn at the mark, and fetches the rest again from the same random state."""
        self._rollback = mark

    def _apply_rollback(self) -> None:
        if self._rollback is None:
            return
        (rng, drawn), self._rollback = self._rollback, None
        if drawn != self.drawn and self.marks_after_fetch and self.data_draws:
            # A one-pass stream's batches fetched ahead since the mark are served again, not
            # drawn again: the generators its fetches draw from stay where those draws left
            # them (compute draws from none of them, or the source would be kept inline).
            rng = {k: v for k, v in rng.items() if k not in self.data_draws}
        restore_rng(rng)
        if drawn != self.drawn:
            if self.persistent and self._it is not None:
                if not one_pass(self.data):
                    # Rebuilt from the stream's start, to this pass's batch.
                    self.restart((self.pass_origin, self.begun), drawn)
                # (A one-pass stream cannot be drawn again: what it served and fetched ahead
                # is kept and served again instead.)
            else:
                self.drawn = drawn

    def draws_ahead(self, generator: str) -> bool:
        """Whether batches fetched ahead (a producer thread) draw from the global
        ``generator`` as they are fetched: undoing a batch must not take that generator back,
        or the batches fetched after it would draw numbers already drawn. (Compute draws none
        of it: the source would have been kept inline. With ``fetch="thread"`` nothing is
        watched, and ``False`` is the answer.)"""
        return self.slow and self.data_draws is not None and generator in self.data_draws

    @property
    def marks_after_fetch(self) -> bool:
        """Whether an awaited batch's :meth:`mark` is taken after its fetch: a one-pass live
        stream serves an undone batch again rather than drawing it again, so what its fetch
        drew (augmentation) must stay drawn; only compute's draws are undone."""
        return self.persistent and one_pass(self.data)

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

        The rebuilt iterator draws as many batches as the interrupted one had (:attr:`drawn`):
        those done, which are skipped, and those it had fetched ahead, which are kept and served
        next. So when the global generators go back to where training was, they are past the
        same draws as the iterator: a dataset that draws augmentation from them while fetching
        ahead (a producer thread, or the loop fetching while compute runs in the worker) gets
        the same numbers for every batch as in the run that was interrupted.
        """
        if start is None:
            begun = {"rng": capture_rng(), **capture_data_streams(self.data)}
            try:
                self._it = self._fast_forward(skip)
            except BaseException:
                # Failed (a batch that cannot be fetched): what the attempt drew is put back, so
                # that the pass made again once the data is fixed draws as this one would have.
                restore_rng(begun["rng"])
                restore_data_streams(self.data, begun, what=self.name)
                raise
            self.begun = begun
            return
        ahead = max(0, self.drawn - skip)
        now = capture_rng()
        restore_rng(start["rng"])
        if "generators" in start:
            restore_data_streams(self.data, start, what=self.name)
        try:
            self._it = self._fast_forward(skip, ahead, self.undone if ahead else None)
        finally:
            restore_rng(now)
        self.begun = start

    def _counted(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self.drawn += 1
            yield batch

    def _fast_forward(
        self, skip: int, ahead: int = 0, undone: tuple[Any] | None = None
    ) -> Iterator[Any]:
        """A new iterator past ``skip`` batches, with the ``ahead`` after them drawn now and
        served first (with no ``skip``, at least the first: samplers draw their order then);
        the first of those is ``undone[0]`` when given (see :meth:`keep_undone`)."""
        it: Iterator[Any] = iter(self.data)
        self.drawn = 0
        self.undone = None
        if self.counts:
            it = self._counted(it)
        kept: list[Any] = []
        for i in range(skip + (ahead if skip else max(1, ahead))):
            try:
                batch = next(it)
            except StopIteration:
                if i < skip:
                    raise RuntimeError(
                        f"cannot resume {self.name} at batch {skip}: it has only {i} batches now"
                    ) from None
                break
            except Exception as exc:
                exc.add_note(fetch_note(self, i))
                raise
            if i >= skip:
                kept.append(batch)
        if undone is not None and kept:
            kept[0] = undone[0]
        if not kept:
            return it if skip else iter(())
        return itertools.chain(kept, it)

    def stop_detached(self) -> None:
        """At the run's end: cancel a producer a pass left fetching (see :attr:`detached`).
        A batch it has fetched (now, or before the cancellation reaches it) stays in
        :attr:`handoff`, served first by the next run's pass: dropping it lost a batch."""
        detached, self.detached = self.detached, None
        if detached is not None:
            detached[0].cancel()

    def exhausted(self) -> None:
        """The live iterator ran out; the next pass starts a new one."""
        self._it = None
        self._ended = True
        self.position = 0
        self.drawn = 0

    def stream_state(self, batch_index: int = 0) -> tuple[int, dict[str, Any] | None] | None:
        """With a live stream: ``(where the pass of the epoch at ``batch_index`` began in the
        stream, the random state the stream began from)``; None without one. With batches of
        the epoch counted, that is where its pass began, even once the pass has ended (a run
        stopped in ``after_fit`` resumes that epoch at ``batch_index``); with none, where the
        next pass begins."""
        if not self.persistent:
            return None
        if self._it is None:
            return self._resume  # a rebuild pending (a batch was rolled back), if any
        return (self.pass_origin if batch_index else self.origin), self.begun

    def goes_on_at(self, here: tuple[int, ...], there: tuple[int, ...]) -> bool:
        """Loading a checkpoint at the counters ``there`` (epoch, step, batch_index) into a
        learner at ``here``: whether the data is a generator (or another one-pass iterator,
        not a Feed) this learner has drawn from, at the point the checkpoint was taken; it
        then goes on as it is. At another point it cannot be taken back there (drawn again from
        its start it would be the same, advanced, generator): refused, before anything is
        loaded.

        Raises:
            ValueError: such data, at another point.
        """
        if not (self._one_pass and self._it is not None):
            return False
        if here == there:
            return True
        raise ValueError(
            f"{self.name} is a {type(self.data).__name__} this learner has already drawn from "
            f"(to epoch {here[0] + 1}, step {here[1]}); the checkpoint is at epoch "
            f"{there[0] + 1}, step {there[1]}, and a generator cannot be taken back there: "
            "resume in a new learner given a new generator of the same data; nothing was loaded"
        )

    def restart(
        self, stream: tuple[int, dict[str, Any] | None] | None = None, drawn: int = 0
    ) -> None:
        """Drop the live iterator (a checkpoint was loaded); ``stream`` is its
        :meth:`stream_state`, to rebuild the stream there, and ``drawn`` the checkpoint's
        :attr:`drawn`, to rebuild the pass as far as it had drawn."""
        self._it = None
        self._ended = False
        self.broken = False
        self._leftover.clear()
        self.handoff = None
        self._resume = stream
        self.drawn = drawn
        self.undone = None


async def _nothing() -> AsyncIterator[Any]:
    """An async iterator that yields nothing."""
    return
    yield


async def _aclose(it: Any) -> None:
    """Close a pass's async iterator (an async generator's ``finally`` runs now, on this loop,
    not whenever it is collected); one made by the data for the pass, never the data itself."""
    aclose = getattr(it, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True), contextlib.suppress(RuntimeError):
        await aclose()
