"""SIGINT and SIGTERM stop the runs in progress gracefully.

Python runs signal handlers in the main thread, between two bytecodes of whatever it is doing
there, and lets only the main thread install them. Left alone, SIGINT raises
``KeyboardInterrupt`` there: under trio, at any point of the training code (inside
``loss.backward()``, half way through an optimizer step), which tears the state; and SIGTERM
ends the process without any teardown. :func:`stop_on_signals` installs a handler of its own
instead, which does nothing but ask each run in progress (any thread, any event loop) to stop:
it cancels the run's own cancel scope from that run's event loop (``run_sync_soon``, which is
thread- and signal-safe on both backends). A cancellation is what a run is built to survive: it
takes effect at the next await, never inside a weight update (fused batches are atomic, an
update in a worker thread is waited for, an awaited batch that is not committed is rolled back
and repeated on resume), and the teardown (``after_fit_run``, the final checkpoint) runs
shielded and bounded by ``teardown_timeout``. Then ``fit`` raises :class:`Interrupted`; leaving
the ``with`` block turns the signal into what a script's caller expects: ``KeyboardInterrupt``
for SIGINT, ``SystemExit(128 + signal number)`` otherwise (exit status 143 for SIGTERM, which
SLURM and Kubernetes read as "terminated").

``Learner.fit_sync`` does this by default (in the main thread; elsewhere it relies on a
``stop_on_signals()`` of the main thread).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

import anyio
import anyio.lowlevel

__all__ = ["Interrupted", "StoppableRun", "exit_for", "kept_off_this_thread", "stop_on_signals"]

Handler = Callable[[int, FrameType | None], Any] | int | None


class Interrupted(BaseException):
    """``fit`` stopped gracefully on a signal (see :func:`stop_on_signals`).

    Raised once the run has stopped: at a batch boundary, with the counters matching the
    weights, after ``after_fit_run`` (a final checkpoint) has run; the learner is idle, and
    calling ``fit`` again (or ``fit(resume="last")`` in a new process) continues exactly. A
    ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` does not swallow it.
    Leaving ``stop_on_signals()`` (and ``fit_sync``) turns it into ``KeyboardInterrupt`` (SIGINT)
    or ``SystemExit(exit_code)``.

    Attributes:
        signal: the signal's number.
        epoch: ``state.epoch`` when the run stopped.
        step: ``state.step`` when the run stopped.
        began: whether the run had begun; ``False`` when the signal came while no run was in
            progress: this one then did not begin (no hook ran, no checkpoint was written).
    """

    def __init__(
        self,
        signum: int,
        *,
        epoch: int | None = None,
        step: int | None = None,
        began: bool = True,
    ) -> None:
        self.signal = signum
        self.epoch = epoch
        self.step = step
        self.began = began
        where = "" if epoch is None else f" at epoch {epoch} (completed), step {step}"
        if began:
            what = (
                "the run stopped at a batch boundary and its teardown ran; fit again (or "
                "fit(resume=...)) continues exactly"
            )
        else:
            what = (
                "the signal came before the run began, so it did not begin (no hook ran, no "
                "checkpoint was written); fit again starts it"
            )
        super().__init__(f"fit stopped on {signal_name(signum)}{where}: {what}")

    @property
    def exit_code(self) -> int:
        """The conventional exit status of a process ended by this signal: 128 + its number."""
        return 128 + self.signal


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_for(signum: int) -> BaseException:
    """What a script raises for a signal: ``KeyboardInterrupt`` for SIGINT (Python then ends the
    process as killed by SIGINT), ``SystemExit(128 + signum)`` for the others."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return SystemExit(128 + signum)


class StoppableRun:
    """One ``fit`` in progress, which a signal may stop: a cancel scope the handler cancels from
    the run's event loop. ``with run: ...`` on that loop; then :attr:`signal` says whether it
    was stopped by one."""

    def __init__(self, agreed: Callable[[str], None] | None = None) -> None:
        # Under a distributed strategy, ``agreed`` (its ``request_stop``): a signal asks every
        # rank to stop at the same step instead of cancelling this rank's run alone.
        self._agreed = agreed
        self._scope = anyio.CancelScope()
        self._token: anyio.lowlevel.EventLoopToken | None = None
        #: The signal that stopped the run, if one did.
        self.signal: int | None = None

    def __enter__(self) -> StoppableRun:
        self._token = anyio.lowlevel.current_token()
        self._scope.__enter__()
        _DISPATCH.add(self)
        _MASK.block()
        return self

    def __exit__(self, *exc_info: Any) -> bool:
        _MASK.unblock()
        _DISPATCH.discard(self)
        return bool(self._scope.__exit__(*exc_info))

    @property
    def stopped(self) -> bool:
        """Whether a signal stopped the run (its cancellation reached the run's scope; under a
        strategy, the stop every rank agreed on, or the run's end, came after it)."""
        if self.signal is None:
            return False
        return self._agreed is not None or self._scope.cancelled_caught

    def stop(self, signum: int, *, here: bool = False) -> None:
        """Ask the run to stop (from the signal handler, any thread; ``here``: from the run's
        own event loop)."""
        if self.signal is not None:
            return  # stopping already: further signals change nothing
        self.signal = signum
        if here:
            self._scope.cancel()
            return
        if self._agreed is not None:
            self._agreed(f"{signal_name(signum)} received")  # a dict store: safe here
            return
        token = self._token
        assert token is not None
        with contextlib.suppress(RuntimeError):  # RunFinishedError: the loop has ended
            token.backend_class.run_sync_soon(self._scope.cancel, (), token.native_token)


class _ThreadMask:
    """While a run is in progress in a thread other than the main one, under a
    ``stop_on_signals()`` block, that thread blocks the stop signals, and so do the threads it
    starts meanwhile (a new thread inherits its creator's mask): anyio's worker threads,
    checkpoint writers.

    Why: the kernel hands a process-directed signal to any thread that does not block it, and
    Python's C-level handler, run in that thread, only flags the signal for the main thread.
    A main thread blocked in ``thread.join()`` (the documented way to wait for a thread running
    ``fit_sync``) is not woken by that flag and would wait for a run that never hears of its
    signal. A thread that blocks the signal is never chosen, so the main thread is.

    Only under a block: a process started from the thread inherits its mask (an ``exec`` keeps
    it), so nothing is blocked where nobody handles the signals. A forked child (a DataLoader's
    workers by default on Linux) gets its mask back at once (:meth:`after_fork_in_child`).
    """

    SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

    def __init__(self) -> None:
        # thread ident -> (runs in progress in that thread, the mask before the first, or
        # None when the first did not block); each entry is used by its own thread only.
        self._threads: dict[int, tuple[int, frozenset[int] | None]] = {}

    def block(self) -> None:
        if not hasattr(signal, "pthread_sigmask"):
            return  # Windows: no per-thread masks (and no such delivery to other threads)
        if threading.current_thread() is threading.main_thread():
            return  # the thread that runs the handlers must receive the signals
        ident = threading.get_ident()
        count, before = self._threads.get(ident, (0, None))
        if count == 0 and _DISPATCH.handling():
            wanted = self.SIGNALS | _DISPATCH.handled()
            before = frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, wanted))
        self._threads[ident] = (count + 1, before)

    def unblock(self) -> None:
        ident = threading.get_ident()
        entry = self._threads.get(ident)
        if entry is None:
            return
        count, before = entry
        if count > 1:
            self._threads[ident] = (count - 1, before)
            return
        del self._threads[ident]
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def after_fork_in_child(self) -> None:
        """In a forked child: the forking thread's mask as it was before the runs (the child
        runs none of them; it is a worker process, a subprocess being started)."""
        entry = self._threads.get(threading.get_ident())
        self._threads.clear()
        if entry is not None and entry[1] is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, entry[1])


_MASK = _ThreadMask()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_MASK.after_fork_in_child)


@contextlib.contextmanager
def kept_off_this_thread() -> Iterator[None]:
    """Block the stop signals in this (worker) thread while the block runs, as a run does in
    a thread other than the main one (see :class:`_ThreadMask`): a learner's compute worker
    is a thread borrowed from anyio's pool, which trio keeps across runs, so it does not
    inherit the mask of the run's thread."""
    _MASK.block()
    try:
        yield
    finally:
        _MASK.unblock()


class _Session:
    """One ``stop_on_signals()`` block (main thread)."""

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = signals
        #: The first signal received while the block was active.
        self.received: int | None = None


class _Dispatch:
    """The process's runs in progress and ``stop_on_signals()`` blocks; the handler."""

    def __init__(self) -> None:
        # Mutated by event loop threads (runs) and the main thread (blocks); the handler reads
        # copies. No lock: the handler runs in the main thread between bytecodes and must never
        # wait for one that thread may hold.
        self._runs: dict[int, StoppableRun] = {}
        self._sessions: list[_Session] = []
        self._previous: dict[int, Handler] = {}
        self._installed: dict[int, int] = {}
        #: A signal received while no run was in progress: the next run to start stops at once.
        self._pending: int | None = None

    # -- runs --

    def add(self, run: StoppableRun) -> None:
        self._runs[id(run)] = run
        pending, self._pending = self._pending, None
        if pending is None:
            # A block that received a signal stops every run, also one that starts after it
            # while others were stopping (two threads, one started late).
            pending = next((s.received for s in self._sessions if s.received is not None), None)
        if pending is not None:
            run.stop(pending, here=True)

    def discard(self, run: StoppableRun) -> None:
        self._runs.pop(id(run), None)

    def handled(self) -> frozenset[int]:
        """The signals a ``stop_on_signals()`` block handles now."""
        return frozenset(self._installed)

    def handling(self) -> bool:
        """Whether a ``stop_on_signals()`` block is active (``fit_sync`` enters one)."""
        return bool(self._sessions)

    # -- blocks (main thread only) --

    def enter(self, signals: tuple[int, ...]) -> _Session:
        session = _Session(signals)
        for signum in signals:
            count = self._installed.get(signum, 0)
            if count == 0:
                self._previous[signum] = signal.signal(signum, self._handle)
            self._installed[signum] = count + 1
        self._sessions.append(session)
        return session

    def exit(self, session: _Session) -> None:
        self._sessions.remove(session)
        if not self._sessions:
            self._pending = None
        for signum in reversed(session.signals):
            count = self._installed[signum] - 1
            self._installed[signum] = count
            if count == 0:
                del self._installed[signum]
                previous = self._previous.pop(signum)
                # Put back what was there, unless someone replaced the handler meanwhile.
                if signal.getsignal(signum) == self._handle:
                    signal.signal(signum, previous)

    # -- the handler (main thread, between two bytecodes of anything) --

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sessions = list(self._sessions)
        for session in sessions:
            if signum in session.signals and session.received is None:
                session.received = signum
        runs = list(self._runs.values())
        if runs:
            for run in runs:
                run.stop(signum)
            return
        if self._pending is None:
            # No run in progress (one is about to start, or has just ended): the next run
            # stops at once, and the block raises it when it ends.
            self._pending = signum
            return
        # The same again while nothing runs: the user insists; what would have happened.
        self._fallback(signum, frame)

    def _fallback(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


_DISPATCH = _Dispatch()


@contextlib.contextmanager
def stop_on_signals(
    signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[None]:
    """Stop every ``fit`` in progress gracefully on SIGINT or SIGTERM while the block runs.

    A signal makes each run in progress in this process (in any thread, on any event loop)
    stop at its next batch boundary: never inside a weight update, with the counters matching
    the weights; ``after_fit_run`` (a final checkpoint) runs shielded, bounded by
    ``teardown_timeout``; then ``fit`` raises :class:`Interrupted`. When the block ends after a
    signal, it raises ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(128 + signal number)``
    (SIGTERM: exit status 143, what schedulers expect). Every run that starts in the block
    after its signal stops at once too, before it begins (also when no run was in progress
    when the signal came; the block raises it when it ends); the same signal again while none
    is in progress acts as it would without this block. Signals while runs are stopping change
    nothing.

    ``Learner.fit_sync`` does this by itself. Enter it in the main thread (Python handles
    signals there only), around ``anyio.run``, around ``await learner.fit(...)``, or around
    the code that starts threads running ``fit``.

    Args:
        signals: the signals to handle (default SIGINT and SIGTERM).

    Raises:
        RuntimeError: entered outside the main thread.

    Example:
        >>> with stop_on_signals():
        ...     anyio.run(main)      # main awaits learner.fit(...); exits 143 on SIGTERM
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "stop_on_signals() must be entered in the main thread (Python runs signal handlers"
            " there only): enter it there, around the code that starts the thread running fit"
        )
    session = _DISPATCH.enter(tuple(signals))
    try:
        yield
    except Interrupted as exc:
        _DISPATCH.exit(session)
        raise exit_for(exc.signal) from exc
    except BaseExceptionGroup as group:
        _DISPATCH.exit(session)
        # fit (or a FitHandle) ran in a task group, which wrapped its Interrupted: nothing else
        # went wrong, so the exit is the signal's, as without the group.
        interrupted, rest = group.split(Interrupted)
        if interrupted is not None and rest is None:
            first = _first_leaf(interrupted)
            raise exit_for(first.signal) from group
        raise
    except BaseException:
        _DISPATCH.exit(session)
        raise
    _DISPATCH.exit(session)
    if session.received is not None:
        raise exit_for(session.received)


def _first_leaf(group: BaseExceptionGroup[Interrupted]) -> Interrupted:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, Interrupted)
    return leaf


@contextlib.contextmanager
def for_sync(enabled: bool) -> Iterator[None]:
    """What ``fit_sync`` wraps its run in: :func:`stop_on_signals` in the main thread when
    ``enabled``; anywhere, ``Interrupted`` becomes what a script raises."""
    if enabled and threading.current_thread() is threading.main_thread():
        with stop_on_signals():
            yield
        return
    try:
        yield
    except Interrupted as exc:
        raise exit_for(exc.signal) from exc
