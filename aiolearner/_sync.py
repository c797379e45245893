"""Run an async function to completion from synchronous code, event loop or not.

``Learner.fit_sync`` and ``validate_sync`` call :func:`run_sync`. In a script no event loop runs in
the calling thread, and it is plain ``anyio.run``. In a Jupyter cell (or any sync code called from
a task of a running asyncio or trio loop), ``anyio.run`` would refuse with "Already running
asyncio in this thread"; there the function runs on a new thread with its own event loop of the
chosen backend, and the calling thread blocks until it is done, as the user expects of a
``_sync`` call.

Rejected alternatives: nesting the running loop (``nest_asyncio``) patches asyncio globally and
cannot work for trio; raising an error that says "use ``await learner.fit``" is correct but
unhelpful where ``fit_sync`` is what most notebook users type.

A ``KeyboardInterrupt`` in the blocked thread (the kernel's interrupt button raises it in the main
thread) cancels the run in its own loop, waits until it has stopped (its teardown runs shielded
and time-bounded, so the learner is idle and consistent afterwards), then propagates. Further
interrupts while it stops are ignored: returning earlier would leave a run going on behind the
user's back.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

__all__ = ["event_loop_running", "run_sync"]

T = TypeVar("T")


def event_loop_running() -> bool:
    """Whether async code of a running event loop called into this thread's current code.

    The same test ``anyio.run`` makes before it refuses to start (which async library, if any,
    runs the current task).
    """
    try:
        anyio.lowlevel.current_token()
    except RuntimeError:  # NoEventLoopError (sniffio's AsyncLibraryNotFoundError before 4.12)
        return False
    return True


def run_sync(
    fn: Callable[..., Awaitable[T]],
    *args: Any,
    backend: Literal["asyncio", "trio"] = "asyncio",
) -> T:
    """``anyio.run(fn, *args, backend=backend)``, also where an event loop runs in this thread.

    Raises:
        KeyboardInterrupt: an interrupt arrived while ``fn`` ran on its own thread; ``fn`` was
            cancelled and has finished.
        BaseException: whatever ``fn`` raised.
    """
    if backend not in ("asyncio", "trio"):
        raise ValueError(f"backend must be 'asyncio' or 'trio', got {backend!r}")
    if not event_loop_running():
        return anyio.run(fn, *args, backend=backend)
    return _run_on_thread(fn, args, backend)


class _Run:
    """What the loop thread shares with the waiting thread."""

    def __init__(self) -> None:
        self.go = threading.Event()  # the waiting thread is ready for an interrupt
        self.abandoned = False  # interrupted before the run began: do not begin it
        self.entered = threading.Event()  # the cancel scope exists, or the thread has ended
        self.done = threading.Event()
        self.scope: anyio.CancelScope | None = None
        self.token: anyio.lowlevel.EventLoopToken | None = None
        self.result: Any = None
        self.error: BaseException | None = None


def _run_on_thread(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], backend: str) -> T:
    run = _Run()

    async def main() -> Any:
        with anyio.CancelScope() as scope:
            run.scope = scope
            run.token = anyio.lowlevel.current_token()
            run.entered.set()
            return await fn(*args)
        return None  # cancelled by an interrupt: the waiting thread raises KeyboardInterrupt

    def target() -> None:
        try:
            run.go.wait()
            if not run.abandoned:
                run.result = anyio.run(main, backend=backend)
        except BaseException as exc:  # handed to the waiting thread, which raises it
            run.error = exc
        finally:
            run.entered.set()
            run.done.set()

    thread = threading.Thread(target=target, name="aiolearner-sync", daemon=True)
    try:
        # The run begins only once this thread is in the try: an interrupt it causes early on
        # (as soon as it starts) must not land in thread.start(), outside the handler.
        thread.start()
        run.go.set()
        _wait(run.done)
    except KeyboardInterrupt:
        if not run.go.is_set():
            run.abandoned = True  # nothing ran; a thread that did start leaves at once
            run.go.set()
            raise
        _cancel(run)
        _wait_ignoring_interrupts(run.done)
        thread.join()
        if run.error is not None and not isinstance(run.error, KeyboardInterrupt):
            raise run.error  # noqa: B904 (its context is the interrupt, as it should be)
        raise
    thread.join()
    if run.error is not None:
        error = run.error
        run.error = None  # no reference cycle through the traceback
        raise error
    result: T = run.result
    return result


def _cancel(run: _Run) -> None:
    _wait_ignoring_interrupts(run.entered)
    scope, token = run.scope, run.token
    if scope is None or token is None or run.done.is_set():
        return

    def deliver() -> None:
        try:
            anyio.from_thread.run_sync(scope.cancel, token=token)
        except RuntimeError:
            pass  # the loop finished meanwhile (RunFinishedError): nothing left to cancel

    # From a thread of its own: anyio.from_thread refuses to run in a thread where a trio run is
    # active, as the caller's may be (sync code called from a trio task).
    helper = threading.Thread(target=deliver, name="aiolearner-sync-cancel", daemon=True)
    helper.start()
    while helper.is_alive():
        try:
            helper.join(WAKE_SECONDS)
        except KeyboardInterrupt:
            continue


#: How long the waiting thread sleeps at a time. A signal the kernel hands to another thread
#: only flags it for the main thread, which an untimed wait would not notice until the run
#: ends (a notebook's interrupt button ignored); a timed one runs its handler within this.
WAKE_SECONDS = 0.25


def _wait(event: threading.Event) -> None:
    while not event.wait(WAKE_SECONDS):
        pass


def _wait_ignoring_interrupts(event: threading.Event) -> None:
    while True:
        try:
            _wait(event)
        except KeyboardInterrupt:
            continue
        return
