"""The learner's compute worker: one thread that runs the blocking work of one batch at a time.

Why not ``anyio.to_thread.run_sync`` per batch: each call pays for a capacity limiter, a cancel
scope, a context copy and the worker pool's bookkeeping on top of the two thread wake-ups. A worker
that keeps one thread for the whole run and hands jobs over through a queue hops several times
faster, which on a heavy step is the difference between a hop per batch costing a few percent of
the step and a fraction of one (docs/performance.md has the figures).

The thread is one of anyio's own worker threads, borrowed for the whole run by one
``to_thread.run_sync`` call in a task of the run's task group (``aiolearner.compute``), so it is
started lazily by the first hop of a run and handed back when the run ends (:meth:`stop`): nothing
outlives the run. A job's result (or exception) comes back through an :class:`anyio.Event` set
with ``anyio.from_thread.run_sync``. Like ``to_thread.run_sync``, a hop cannot be abandoned: when
the waiting task is cancelled, it still waits (shielded) for the job to finish, then re-raises
the cancellation, so a weight update is never left half done.
"""

from __future__ import annotations

import contextvars
import queue
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ["ComputeWorker"]


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
    """Runs jobs one at a time, in order, in one worker thread per run."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        # After stop(), until the next run opens: background work still finishing must not
        # start a thread that nobody would stop (the run's task group would wait on it forever).
        self._closed = False

    def open(self) -> None:
        """A run starts: hops may start the thread again."""
        self._closed = False

    @property
    def running(self) -> bool:
        """Whether a thread is serving this run."""
        return self._jobs is not None

    async def run(
        self,
        tg: TaskGroup,
        fn: Callable[..., Any],
        *args: Any,
        on_cancel: Callable[[], object] | None = None,
    ) -> Any:
        """``fn(*args)`` in the worker thread (started in ``tg`` if needed); its result.

        ``on_cancel`` is called (on the loop) when the waiting task is cancelled, before it
        waits for the job to finish: a job made of several batches uses it to stop early.
        """
        if self._closed:
            return await anyio.to_thread.run_sync(fn, *args)
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
            raise
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        return job.result

    def stop(self) -> None:
        """The run is over: the thread finishes its queue and returns to anyio's pool."""
        jobs, self._jobs = self._jobs, None
        self._closed = True
        if jobs is not None:
            jobs.put(None)

    async def _serve(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        # Shielded: a job may already be queued, and its task waits for it; the thread ends
        # when stop() queues the end marker (the run does so when it ends, however it ends).
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_work, jobs)


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    set_done = anyio.from_thread.run_sync
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            job.result = job.context.run(job.fn, *job.args)
        except BaseException as exc:  # handed to the waiting task, which re-raises it
            job.error = exc
        set_done(job.done.set)
