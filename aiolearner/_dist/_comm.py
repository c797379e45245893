"""Control collectives: awaiting them on the event loop, guarding their order, failure reports.

Three things every collective of a strategy needs, whoever issues it:

* **Awaiting without blocking the loop.** A gloo/NCCL collective issued with ``async_op=True``
  completes on a backend thread; :func:`wait_work` wakes the event loop from that thread through
  the run's token (asyncio and trio alike). The completion callback runs *inline* when the work
  has already finished, on the loop's own thread: waking the loop through the token from there
  would wait for the loop, which is the caller, so the thread is checked first.
* **A guard on order.** Collectives pair by their order in a group. Callbacks that run
  concurrently and background tasks run in an order that differs from rank to rank, so they are
  marked (:data:`CONCURRENT`) and :func:`guard` refuses collectives there.
* **Failures that name the failed rank.** A rank that fails writes its error to the process
  group's store before its teardown (:class:`FailureReports`); the others, whose next collective
  then fails (at once when the failed process exits, at the group's timeout when it lives on),
  quote it. While a control collective is awaited the store is polled, so a failed rank that
  lives on is noticed within a fraction of a second there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import anyio
import torch.distributed as dist

from .._exceptions import CollectiveError

__all__ = [
    "CONCURRENT",
    "FailureReports",
    "guard",
    "is_comm_failure",
    "wait_work",
]

#: The callback (or background task) whose code runs now, when it runs concurrently with other
#: code of the learner, in an order that differs from rank to rank (set by hook plans for layers
#: of two or more ``async def`` hooks, and around background tasks under a strategy).
CONCURRENT: ContextVar[str | None] = ContextVar("aiolearner_concurrent_code", default=None)

#: How often a wait for a control collective looks in the store for a failed rank's report.
POLL_SECONDS = 0.25


def guard(what: str) -> None:
    """Refuse a collective issued where its order may differ between ranks."""
    who = CONCURRENT.get()
    if who is not None:
        raise CollectiveError(what, callback=who)


async def wait_work(work: Any, on_poll: Callable[[], None] | None = None) -> None:
    """Wait for an async collective without blocking the event loop; its error is raised.

    ``on_poll`` is called every :data:`POLL_SECONDS` while waiting (it raises to give up: a
    failed rank reported itself). The wait itself is not cancellable: the caller shields it,
    because a rank that leaves a collective it entered desyncs the group.
    """
    future = work.get_future()
    if not future.done():
        token = anyio.lowlevel.current_token()
        done = anyio.Event()
        loop_thread = threading.get_ident()

        def wake(_: Any) -> None:
            if threading.get_ident() == loop_thread:
                done.set()  # already complete: called inline, on the loop
                return
            try:
                anyio.from_thread.run_sync(done.set, token=token)
            except Exception:  # the loop has gone (the run ended meanwhile)
                pass

        future.add_done_callback(wake)
        while not done.is_set():
            with anyio.move_on_after(POLL_SECONDS):
                await done.wait()
            if not done.is_set() and on_poll is not None:
                on_poll()
    future.wait()  # raises the collective's error


# What torch's process groups put in the plain RuntimeErrors they raise (gloo's name its source
# file, .../gloo/transport/tcp/pair.cc); specific enough not to catch a user's own RuntimeError.
_COMM_WORDS = (
    "gloo",
    "nccl",
    "processgroup",
    "c10d",
    "connection closed by peer",
    "connection reset by peer",
    "application timeout caused pair closure",
)


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error grouped in it, or its cause) is a collective that failed."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, dist.DistError):
            return True
        if isinstance(e, RuntimeError) and type(e) is RuntimeError:
            text = str(e).lower()
            if any(word in text for word in _COMM_WORDS):
                return True
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        stack.append(e.__cause__)
    return False


def _bounded(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()`` in a daemon thread, given up after ``seconds`` (a store whose host is gone may
    block a client for its whole timeout); ``None`` when it did not finish or failed."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception:
            pass

    thread = threading.Thread(target=run, name="aiolearner-store", daemon=True)
    thread.start()
    thread.join(seconds)
    return result[0] if result else None


class FailureReports:
    """Errors of failed ranks, kept in the process group's store under a run's own prefix."""

    def __init__(self, rank: int, world_size: int, prefix: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix
        try:
            self._store: Any = dist.distributed_c10d._get_default_store()
        except Exception:  # no store (a group made without one)
            self._store = None

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/error/{rank}"

    def report(self, text: str) -> None:
        """Leave this rank's error for the others (bounded: never hangs a failing rank)."""
        store = self._store
        if store is not None:
            _bounded(lambda: store.set(self._key(self.rank), text.encode()), 2.0)

    def find(self) -> tuple[int, str] | None:
        """The first other rank that reported an error, with its text."""
        store = self._store
        if store is None:
            return None

        def look() -> tuple[int, str] | None:
            for rank in range(self.world_size):
                if rank == self.rank:
                    continue
                key = self._key(rank)
                if store.check([key]):
                    return rank, bytes(store.get(key)).decode(errors="replace")
            return None

        found: tuple[int, str] | None = _bounded(look, 2.0)
        return found
