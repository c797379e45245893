"""Where a learner's compute runs: the compute policy, and whether the event loop is shared.

Compute placement (``Learner(compute=...)``):

* ``"inline"``: stages run their torch work on the event loop. Lowest overhead; the loop is
  blocked for as long as a batch computes (it still yields every ``yield_interval`` seconds,
  between batches, so other tasks get turns and cancellation stays prompt; ten times less
  often while no other task is on the loop, and at every epoch's end for cancellation). The
  batches between two turns run as one call (an inline burst, ``_executor.py``). Learners
  computing inline while they share the loop take its thread in turns (``_worker.Turn``).
* ``"thread"``: the blocking work runs in the learner's compute worker (one thread borrowed from
  anyio's pool for the whole run, fed through a queue; while other learners run on the same
  loop, the loop's shared compute pool instead, a few threads by the number of cores; see
  ``_worker.py``). Fused batches (the
  default tree with ``def`` hooks) go over in bursts, several batches a hop (``_executor.py``);
  an unfused batch hops once per compute stage.
* ``"auto"`` (default): runs inline while that blocks the loop for at most ``max_blocking``
  seconds per batch *or* nothing else is running on the loop; otherwise hops. Learners training
  inline on one loop count together: they take the loop's thread in turns (``_worker.Turn``),
  so a task waiting for the loop waits for one slice (a batch, or the batches between two
  turns), the longest of theirs, against ``max_blocking``; a learner whose batches await (no
  turns) adds its slice to that. It re-decides every ``recheck_interval`` seconds from
  measured batch times and the loop's task list, so a tiny model keeps inline overhead, and a
  heavy model keeps a web service on the same loop responsive. While a pass of the learner's own
  concurrent validation is in flight, it hops (:meth:`ComputePolicy.set_shared`): that pass is work
  sharing the loop, and the two passes can only compute at once from two threads.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Literal

import anyio

from ._checks import check_positive

__all__ = [
    "LONE_YIELD_FACTOR",
    "SHARED_MIN_BATCH",
    "SHARING_RECHECK",
    "ComputeMode",
    "ComputePolicy",
    "loop_is_shared",
]

ComputeMode = Literal["auto", "thread", "inline"]


def loop_is_shared(*, own_tasks: bool = False) -> bool:
    """Whether tasks other than this one, its ancestors and aiolearner's own are on the loop.

    With ``own_tasks=True`` (does the training loop need to give the loop turns often?), the
    ancestors and aiolearner's own tasks count too: a parent that started ``fit`` in a task group
    may well go on with work of its own, and a data producer or a concurrent validation needs
    turns as much as a user's task does; only the compute worker's task, which just waits on its
    thread, does not.
    """
    me = anyio.get_current_task()
    tasks = anyio.get_running_tasks()
    mine = {me.id}
    if not own_tasks:
        by_id = {t.id: t for t in tasks}
        node: Any = me
        while node is not None:
            mine.add(node.id)
            node = by_id.get(node.parent_id) if node.parent_id is not None else None
    ignored = ("<", "aiolearner.compute") if own_tasks else ("<", "aiolearner.")
    for task in tasks:
        if task.id in mine or task.name is None:
            continue
        if task.name.startswith(ignored):
            continue
        return True
    return False


#: While nothing else runs on the loop, the training loop gives it a turn this many times less
#: often than ``yield_interval``: a turn then only serves cancellation and deadlines, and on a
#: tiny model each costs a noticeable share of a batch (docs/performance.md). How often a shared
#: loop is checked for still being shared (listing the tasks is not free); a lone one is checked
#: at every turn.
LONE_YIELD_FACTOR = 10
SHARING_RECHECK = 0.5
#: With ``auto``, the shortest training batch (seconds) worth a hop so that it computes while a
#: concurrent validation does: below it, two hops a batch (training's and validation's) cost
#: about what overlapping saves, and the passes take turns on the loop instead.
SHARED_MIN_BATCH = 0.0005


class ComputePolicy:
    """Where stage compute runs; see the module docstring."""

    def __init__(
        self, mode: ComputeMode, *, max_blocking: float, recheck_interval: float = 0.5
    ) -> None:
        if mode not in ("auto", "thread", "inline"):
            raise ValueError(f"compute must be 'auto', 'thread' or 'inline', got {mode!r}")
        check_positive("max_blocking", max_blocking)
        self.mode = mode
        self.max_blocking = max_blocking
        self.recheck_interval = recheck_interval
        self.hopping = mode == "thread"
        #: Concurrent validation passes in flight (see :meth:`set_shared`).
        self.shared = 0
        self._typical: float | None = None
        self._next_check = 0.0
        # Set while a run is on (see enter_run): the event loop's thread, the turn interval.
        self._loop_thread: int | None = None
        self._turn = 0.0
        #: How many hops were made (for tests and the throughput report).
        self.hops = 0
        #: Whether the learner's batches take the loop's turn when they compute inline while
        #: other learners share the loop (synchronous batch programs; see ``_worker.Turn``):
        #: then a task waiting for the loop waits for one such learner's slice, not all theirs.
        self.in_turns = False

    def __repr__(self) -> str:
        typical = self._typical
        batch = "unmeasured" if typical is None else f"{typical * 1e3:.3g} ms"
        decision = "thread" if self.hopping else "inline"
        return (
            f"ComputePolicy(mode={self.mode!r}, decision={decision!r}, batch_time={batch},"
            f" max_blocking={self.max_blocking * 1e3:g} ms, hops={self.hops})"
        )

    def record(self, seconds: float, count: int = 1) -> None:
        """Record how long one batch (or compute stage) took, or (``count``) each of that many
        batches on average, as that many records would; safe from the worker thread."""
        typical = self._typical
        kept = 0.8**count
        self._typical = seconds if typical is None else kept * typical + (1 - kept) * seconds

    def observe(self, seconds: float, now: float | None = None) -> None:
        """Record a duration and maybe change the decision (on the event loop only).

        ``now``: the current ``time.perf_counter()``, when the caller has it (the training loop
        does; this runs once a batch, so a saved clock call counts for a tiny model).
        """
        typical = self._typical
        self._typical = seconds if typical is None else 0.8 * typical + 0.2 * seconds
        if self.mode == "auto":
            if now is None:
                now = time.perf_counter()
            if now >= self._next_check:
                self._next_check = now + self.recheck_interval
                self.reconsider()

    def decision_due(self) -> float:
        """When auto's next decision is due (``time.perf_counter()`` time; infinity for the
        other policies): a burst of batches then hands back to the loop, which takes it."""
        return self._next_check if self.mode == "auto" else math.inf

    def maybe_reconsider(self) -> None:
        """Re-decide if ``recheck_interval`` has passed (on the event loop only)."""
        if self.mode == "auto":
            now = time.perf_counter()
            if now >= self._next_check:
                self._next_check = now + self.recheck_interval
                self.reconsider()

    def enter_run(self, turn_interval: float, *, turns: bool = False) -> None:
        """A run of this learner starts on the current thread's event loop (``turns``: its
        batches take the loop's turn when they compute inline, see ``in_turns``)."""
        self._loop_thread = threading.get_ident()
        self._turn = turn_interval
        self.in_turns = turns
        with _RUNNING_LOCK:
            _RUNNING.add(self)

    def off_loop_thread(self) -> bool:
        """Whether this is called from another thread than the running run's event loop's."""
        return self._loop_thread is not None and self._loop_thread != threading.get_ident()

    def exit_run(self) -> None:
        """The run is over."""
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        self._loop_thread = None
        self.in_turns = False

    def blocking_slice(self) -> float:
        """How long this learner, running inline, holds the event loop at a time: a batch, or
        the batches between two turns, whichever is longer."""
        return max(self._typical or 0.0, self._turn)

    def set_shared(self, shared: bool) -> None:
        """Whether the learner's own concurrent validation has a pass in flight (from the
        snapshot on): with ``auto``, training's compute then hops to its worker, so the two
        passes compute at once (the validation hops to a worker of its own) instead of taking
        turns on the event loop. ``inline`` stays inline: the passes then interleave between
        batches."""
        self.shared = int(shared)
        if self.mode == "auto":
            self.reconsider()

    def reconsider(self) -> None:
        typical = self._typical
        if self.shared and (typical is None or typical >= SHARED_MIN_BATCH):
            self.hopping = True
            return
        heavy = typical is not None and typical > self.max_blocking
        if typical is not None and not heavy and self._loop_thread is not None:
            # Several learners training inline on one event loop each hold it for a slice: a
            # task waiting for the loop waits for all of them, except that learners taking
            # turns (in_turns) hold it one at a time: of theirs, the longest slice counts.
            loop = self._loop_thread
            with _RUNNING_LOCK:  # learners may run on event loops in other threads too
                running = list(_RUNNING)
            inline = [self] + [
                other
                for other in running
                if other is not self and other._loop_thread == loop and not other.hopping
            ]
            crowd = sum(p.blocking_slice() for p in inline if not p.in_turns) + max(
                (p.blocking_slice() for p in inline if p.in_turns), default=0.0
            )
            heavy = crowd > self.max_blocking
        self.hopping = heavy and loop_is_shared()

    @property
    def typical_seconds(self) -> float | None:
        """The smoothed duration of a batch, as measured: its compute, and in a burst of
        batches its fetch and end too (what it holds the loop, or the worker, for)."""
        return self._typical


#: The compute policies of the learners running now (any event loop, any thread): ``auto``
#: counts the other learners training inline on its own event loop. A run always leaves it
#: (``_lifecycle.running`` calls ``exit_run`` in a ``finally``).
_RUNNING: set[ComputePolicy] = set()
_RUNNING_LOCK = threading.Lock()
