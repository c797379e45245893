"""Where compute jobs run off the event loop: a learner's own worker, or its loop's shared pool.

A learner alone on its event loop hands jobs to a **dedicated worker**: one thread kept for the
whole run and fed through a queue. Why not ``anyio.to_thread.run_sync`` per batch: each call pays
for a capacity limiter, a cancel scope, a context copy and the worker pool's bookkeeping on top of
the two thread wake-ups; a worker that keeps its thread hops several times faster, which on a
heavy step is the difference between a hop per batch costing a few percent of the step and a
fraction of one (docs/performance.md has the figures). The thread is one of anyio's own worker
threads, borrowed for the whole run by one ``to_thread.run_sync`` call in a task of the run's task
group (``aiolearner.compute``), so it is started lazily by the first hop of a run and handed back
when the run ends (:meth:`ComputeWorker.stop`): nothing outlives the run. A job's result (or
exception) comes back through an :class:`anyio.Event` set with ``anyio.from_thread.run_sync``.

Learners **sharing** an event loop share its :class:`ComputePool` instead: while two or more
runs are open on a loop, every job of theirs is one ``anyio.to_thread.run_sync`` call admitted by
the pool's limiter, so at most :func:`pool_size` jobs (by the number of cores) run at once,
whatever the number of learners. A thread each would let every learner's thread compete for the
GIL with the loop's thread: the loop would get its turn later with every learner added. The
threads are anyio's reusable workers, and the limiter is the pool's own (not anyio's default
one, which producers and user code also use). A job of several batches (a burst, see
``_executor.py``) is kept short while the pool is shared (``SHARED_BURST_SECONDS``), so that
the learners take turns and a cancellation is served soon. A learner's own concurrent validation
has a worker of its own outside the pool (``ComputeWorker(pooled=False)``): it must compute while
the training's job holds the learner's place, and it is not another learner.

The loop's own thread is one more place of the pool: learners that compute **inline** while
they share the loop take it in **turns** (:class:`Turn`). A learner holds the turn while it runs
batches on the loop; at each of its turns (every ``yield_interval``) the loop's other tasks run
while the learners waiting for the turn stay parked, and after ``TURN_SECONDS`` it passes the
turn to the next learner waiting. Without turns every inline learner would run a slice at each
round of the loop, and a task waiting for the loop would wait for all of them; with turns it
waits for one slice, whatever the number of learners. Tiny
Python-heavy batches gain nothing from threads (they share one GIL), so taking turns on the
loop's thread is how ``compute="auto"`` runs many tiny learners (``_policy.py``).

Like ``to_thread.run_sync``, a hop cannot be abandoned: when the waiting task is cancelled, it
still waits (shielded) for the job to finish, then re-raises the cancellation, so a weight
update is never left half done.
"""

from __future__ import annotations

import contextvars
import os
import queue
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._signals import kept_off_this_thread

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = [
    "SHARED_BURST_SECONDS",
    "TURN_SECONDS",
    "ComputePool",
    "ComputeWorker",
    "Turn",
    "pool_size",
]

#: The longest a burst of batches may take in a shared pool (a dedicated worker's bound is
#: ``_executor.BURST_SECONDS``): learners take turns, and a cancellation is served within it.
SHARED_BURST_SECONDS = 0.01
#: How long a learner keeps the loop's thread (its turn, see Turn) while other learners wait
#: for it: the loop's other tasks still get a turn every ``yield_interval``.
TURN_SECONDS = SHARED_BURST_SECONDS
#: The most threads a pool uses, however many cores: beyond a few, threads running Python
#: between torch calls mostly wait for each other's GIL (and make the loop's thread wait too).
MAX_POOL_SIZE = 4


def pool_size() -> int:
    """How many compute jobs the learners of one event loop may run at once: half the cores
    this process may use (at least one, at most ``MAX_POOL_SIZE``), leaving the others to the
    event loop's thread, data loading and torch's own intra-op threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_POOL_SIZE, cores // 2))


class ComputePool:
    """The compute jobs of the learners training on one event loop (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = size
        # Made on the loop it serves (a limiter belongs to the loop that first uses it).
        self.limiter = anyio.CapacityLimiter(size)
        #: Runs open on this loop (learners training, validating or predicting).
        self.users = 0
        #: Jobs submitted and not finished, running or waiting for room.
        self.inside = 0
        #: The loop's own thread, taken in turns by learners computing inline (see Turn).
        self.turns = anyio.Lock()

    @classmethod
    def current(cls) -> ComputePool:
        """The pool of the running event loop (made on first use)."""
        pool = _POOL.get(None)
        if pool is None:
            pool = cls(pool_size())
            _POOL.set(pool)
        return pool

    @property
    def shared(self) -> bool:
        """Whether two or more runs are open on the loop."""
        return self.users > 1

    async def run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """``fn(*args)`` in one of anyio's worker threads, once the pool has room for it."""
        self.inside += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        finally:
            self.inside -= 1


class Turn:
    """A learner's hold on its event loop's thread for inline compute while it shares the loop
    with other learners (see the module docstring). Used by one task at a time: the training
    (or validation) loop of one run."""

    __slots__ = ("held", "lock", "since")

    def __init__(self, lock: anyio.Lock) -> None:
        self.lock = lock
        self.held = False
        self.since = 0.0

    async def take(self) -> None:
        """Wait for the turn (first come, first served), unless it is held already."""
        if not self.held:
            await self.lock.acquire()
            self.held = True
            self.since = time.perf_counter()

    def give(self) -> None:
        """Let the turn go (before the training loop waits for anything, and when it ends)."""
        if self.held:
            self.held = False
            self.lock.release()

    async def pass_on(self, now: float) -> None:
        """Give the loop's other tasks a turn; once held for ``TURN_SECONDS``, give the turn to
        the next learner waiting for it too, and wait for it to come back. (Other tasks get the
        loop at every call; the learners take turns less often, since every change of learner
        costs a cold start of its caches.)"""
        if now - self.since < TURN_SECONDS:
            await anyio.lowlevel.checkpoint()
            return
        self.give()
        await self.take()


_POOL: anyio.lowlevel.RunVar[ComputePool] = anyio.lowlevel.RunVar("aiolearner_compute_pool")


class _Job:
    __slots__ = ("args", "context", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        # The caller's context variables, as anyio.to_thread.run_sync gives the thread.
        self.context = contextvars.copy_context()
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class ComputeWorker:
    """Runs one learner's jobs, one at a time, in order: in a dedicated thread per run while the
    learner is alone on its loop, in the loop's :class:`ComputePool` while it shares it."""

    def __init__(self, *, pooled: bool = True) -> None:
        # Not pooled: a companion of a pooled worker, the learner's own concurrent validation
        # (see _snapshot.Lane), which must compute while the training's job runs (holding a
        # place of a pool that may have only one), and which is not another learner.
        self._pooled = pooled
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        # After stop(), until the next run opens: background work still finishing must not
        # start a thread that nobody would stop (the run's task group would wait on it forever).
        self._closed = False
        self._pool: ComputePool | None = None

    def open(self) -> None:
        """A run starts (on the event loop): hops may start the thread again."""
        self._closed = False
        if self._pooled:
            self._pool = pool = ComputePool.current()
            pool.users += 1

    @property
    def running(self) -> bool:
        """Whether a dedicated thread is serving this run."""
        return self._jobs is not None

    @property
    def shared(self) -> bool:
        """Whether this learner's jobs go to its loop's shared pool now."""
        pool = self._pool
        return pool is not None and pool.shared

    def turn(self) -> Turn | None:
        """A hold on the loop's thread for this run's inline compute (``None``: not pooled)."""
        pool = self._pool
        return None if pool is None else Turn(pool.turns)

    async def run(
        self,
        tg: TaskGroup,
        fn: Callable[..., Any],
        *args: Any,
        on_cancel: Callable[[], object] | None = None,
    ) -> Any:
        """``fn(*args)`` off the loop (a dedicated thread started in ``tg`` if needed, or the
        shared pool); its result.

        ``on_cancel`` is called (on the loop) when the waiting task is cancelled, before it
        waits for the job to finish: a job made of several batches uses it to stop early. (In
        the shared pool such a job is short instead, see ``SHARED_BURST_SECONDS``.)
        """
        pool = self._pool
        if self._closed or (pool is None and self._pooled):
            return await anyio.to_thread.run_sync(fn, *args)
        limiter = None
        if pool is not None:
            if pool.shared:
                return await pool.run(fn, args)
            # Alone on the loop, but still one of the pool's places: learners that start
            # meanwhile must find it taken, or more than its size would run at once.
            limiter = pool.limiter
            try:
                limiter.acquire_nowait()
            except anyio.WouldBlock:
                await limiter.acquire()
        try:
            jobs = self._jobs
            if jobs is None:
                jobs = self._jobs = queue.SimpleQueue()
                tg.start_soon(self._serve, jobs, name="aiolearner.compute")
            job = _Job(fn, args)
            jobs.put(job)
            try:
                await job.done.wait()
            except anyio.get_cancelled_exc_class():
                if on_cancel is not None:
                    on_cancel()
                with anyio.CancelScope(shield=True):
                    await job.done.wait()
                if job.error is None:
                    raise
                # The job's own error (a StopEpoch of its batch) says how it ended: raised in
                # the cancellation's place, which lands at the caller's next await.
        finally:
            if limiter is not None:
                limiter.release()
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        return job.result

    def stop(self) -> None:
        """The run is over: the thread finishes its queue and returns to anyio's pool."""
        jobs, self._jobs = self._jobs, None
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.users -= 1
        if jobs is not None:
            jobs.put(None)

    async def _serve(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        # Shielded: a job may already be queued, and its task waits for it; the thread ends
        # when stop() queues the end marker (the run does so when it ends, however it ends).
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_work, jobs)


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    set_done = anyio.from_thread.run_sync
    with kept_off_this_thread():
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                job.result = job.context.run(job.fn, *job.args)
            except BaseException as exc:  # handed to the waiting task, which re-raises it
                job.error = exc
            set_done(job.done.set)
