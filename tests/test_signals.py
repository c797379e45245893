"""SIGINT and SIGTERM stop a run gracefully: at a batch boundary, with its teardown, then the
exit a scheduler expects; ``fit_sync`` by default, ``await fit`` inside ``stop_on_signals()``.

The first tests send real signals to this process (the test runner's main thread); the last ones
to child processes that train with checkpoints (one trial of each kind that
``bench/signal_soak.py`` runs by the dozen).
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from aiolearner import (
    Callback,
    FitHandle,
    Interrupted,
    Learner,
    RunState,
    StateView,
    stop_on_signals,
)
from aiolearner.testing import RecordingCallback, make_learner
from bench import signal_soak

N_BATCHES = 4


class SignalAt(Callback):
    """Sends ``signum`` to the main thread (where Python runs handlers) once, at one step, from
    a ``def`` hook: it runs inside the fused batch, in the compute worker in thread mode."""

    reads = frozenset({"step"})

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step = step
        self.signum = signum
        self.sent = False

    def after_update(self, state: StateView) -> None:
        if not self.sent and state.step >= self.step:
            self.sent = True
            main = threading.main_thread().ident
            assert main is not None
            signal.pthread_kill(main, self.signum)


def weights(learner: Learner[Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


def consistent(learner: Learner[Any]) -> bool:
    state = learner.state
    return bool(state.step == state.epoch * N_BATCHES + state.batch_index)


@contextmanager
def exits() -> Iterator[list[SystemExit]]:
    """The block must end in ``SystemExit`` (what leaving ``stop_on_signals()`` after a stop
    raises); the list holds it afterwards."""
    caught: list[SystemExit] = []
    try:
        yield caught
    except SystemExit as exc:
        caught.append(exc)
    assert caught, "the block did not raise SystemExit"


@contextmanager
def handler_kept(signum: int) -> Iterator[None]:
    """The handler of ``signum`` is the same after the block as before it."""
    before = signal.getsignal(signum)
    yield
    assert signal.getsignal(signum) == before


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_signal_stops_fit_at_a_batch_boundary_then_the_block_exits(compute: str) -> None:
    rec = RecordingCallback(hooks=["after_fit_run"])
    learner = make_learner(n_batches=N_BATCHES, compute=compute, callbacks=[SignalAt(step=5), rec])
    with handler_kept(signal.SIGTERM), exits() as exit_info:
        with stop_on_signals():
            with pytest.raises(Interrupted) as info:
                await learner.fit(1000)
            stopped = info.value
            assert stopped.signal == signal.SIGTERM
            assert stopped.exit_code == 143
            assert (stopped.epoch, stopped.step) == (learner.state.epoch, learner.state.step)
            raise stopped  # what an unhandled stop does: the block turns it into the exit
    assert exit_info[0].code == 143
    assert isinstance(exit_info[0].__cause__, Interrupted)
    # Stopped between batches (in thread mode, maybe a few batches later), torn nowhere.
    assert learner.status.value == "idle"
    assert consistent(learner)
    assert learner.state.step >= 5
    assert rec.calls == ["after_fit_run"]
    assert all(p.grad is None for p in learner.model.parameters())
    # Calling fit again continues exactly.
    target = learner.state.epoch + 2
    await learner.fit(target)
    uninterrupted = make_learner(n_batches=N_BATCHES, compute=compute)
    await uninterrupted.fit(target)
    assert all(
        torch.equal(a, b) for a, b in zip(weights(learner), weights(uninterrupted), strict=True)
    )


@pytest.mark.parametrize("with_handle", [False, True])
async def test_a_signal_stop_in_a_task_group_exits_as_without_it(with_handle: bool) -> None:
    """fit (or a FitHandle) next to other tasks in a task group: the group wraps the run's
    Interrupted, and the block still turns it into the signal's exit (143), not an error."""
    learner = make_learner(n_batches=N_BATCHES, callbacks=[SignalAt(step=5)])
    handle = FitHandle(learner, 1000)
    with handler_kept(signal.SIGTERM), exits() as exit_info:
        with stop_on_signals():
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.sleep_forever)
                if with_handle:
                    await handle.run()
                else:
                    await learner.fit(1000)
    assert exit_info[0].code == 143
    assert isinstance(exit_info[0].__cause__, BaseExceptionGroup)
    if with_handle:
        assert handle.state is RunState.CANCELLED  # a signal stop cancels the run's own scope
        assert handle.error is None
    assert consistent(learner)


async def test_interrupted_is_not_an_exception() -> None:
    learner = make_learner(n_batches=N_BATCHES, callbacks=[SignalAt(step=2)])
    caught: list[BaseException] = []
    with exits(), stop_on_signals():
        try:
            await learner.fit(1000)
        except Exception as exc:
            caught.append(exc)
    assert caught == []


async def test_a_signal_before_fit_stops_the_next_fit_at_once() -> None:
    learner = make_learner(n_batches=N_BATCHES)
    with exits(), stop_on_signals():
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
        with pytest.raises(Interrupted, match="before the run began") as info:
            await learner.fit(2)
        assert not info.value.began
        assert learner.state.step == 0
        # A later fit in the block stops at once too: the block ends in the signal's exit.
        with pytest.raises(Interrupted, match="before the run began"):
            await learner.fit(1)
        assert learner.state.step == 0
    # A new block starts afresh.
    with stop_on_signals():
        await learner.fit(1)
    assert learner.state.step == N_BATCHES


async def test_a_fit_that_starts_after_a_signal_stopped_another_stops_at_once() -> None:
    """Two runs in the block, the second started after the signal stopped the first (another
    thread's, started late): it must not train on while the process waits to exit."""
    first = make_learner(n_batches=N_BATCHES, callbacks=[SignalAt(step=3)])
    second = make_learner(n_batches=N_BATCHES)
    with exits(), stop_on_signals():
        with pytest.raises(Interrupted) as stopped:
            await first.fit(1000)
        assert stopped.value.began
        with pytest.raises(Interrupted) as info:
            await second.fit(50)
        assert not info.value.began
        assert second.state.step == 0


def test_the_same_signal_again_while_no_fit_runs_acts_as_before() -> None:
    seen: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with exits() as info, stop_on_signals([signal.SIGUSR1]):
            signal.raise_signal(signal.SIGUSR1)  # kept for the next fit (there is none)
            assert seen == []
            signal.raise_signal(signal.SIGUSR1)  # again: the user insists
            assert seen == [signal.SIGUSR1]
        assert info[0].code == 128 + signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_stop_on_signals_must_be_entered_in_the_main_thread() -> None:
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            with stop_on_signals():
                pass
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "main thread" in str(errors[0])


def blocked() -> frozenset[int]:
    return frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, []))


class MaskLog(Callback):
    """The signal masks of the threads a run uses: its loop thread, its compute worker (a
    ``def`` hook of the fused batch, with ``compute="thread"``), anyio's worker threads, a
    thread started during the run, and a process forked during it."""

    def __init__(self) -> None:
        self.masks: dict[str, frozenset[int]] = {}

    def after_update(self, state: StateView) -> None:
        self.masks.setdefault("fused hook", blocked())

    async def before_epoch(self, state: StateView) -> None:
        self.masks["loop"] = blocked()
        self.masks["to_thread"] = await anyio.to_thread.run_sync(blocked)
        started: list[frozenset[int]] = []
        thread = threading.Thread(target=lambda: started.append(blocked()))
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        self.masks["new thread"] = started[0]
        self.masks["forked"] = forked_mask()


def forked_mask() -> frozenset[int]:
    """The mask of a process forked here (a DataLoader worker's, by default on Linux)."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: report and leave at once, touching nothing else
        os.write(write, ",".join(str(int(s)) for s in blocked()).encode() + b";")
        os._exit(0)
    os.close(write)
    data = b""
    while not data.endswith(b";"):
        chunk = os.read(read, 1024)
        assert chunk, "the forked child said nothing"
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return frozenset(int(s) for s in data[:-1].decode().split(",") if s)


def train_in_a_thread(learner: Learner[Any], backend: str) -> dict[str, frozenset[int]]:
    seen: dict[str, frozenset[int]] = {}

    def work() -> None:
        seen["before"] = blocked()
        learner.fit_sync(1, backend=backend)  # type: ignore[arg-type]
        seen["after"] = blocked()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return seen


STOPS = {signal.SIGINT, signal.SIGTERM}


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no per-thread signal masks")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_run_outside_the_main_thread_leaves_the_stop_signals_to_the_main_thread(
    backend: str,
) -> None:
    """The kernel hands a process signal to any thread that does not block it; Python's handler
    then only flags it for the main thread, which a ``join()`` does not wake (a run that never
    hears of its signal, a process that never ends). So under ``stop_on_signals()`` a run in
    another thread blocks SIGINT and SIGTERM there, and in the threads started during it, until
    it ends; a process forked meanwhile gets them back."""
    log = MaskLog()
    learner = make_learner(n_batches=N_BATCHES, callbacks=[log], compute="thread")
    with handler_kept(signal.SIGINT), handler_kept(signal.SIGTERM), stop_on_signals():
        seen = train_in_a_thread(learner, backend)
    assert set(log.masks) == {"loop", "to_thread", "new thread", "fused hook", "forked"}
    assert not STOPS & log.masks.pop("forked")
    if backend == "trio":
        # trio's threads are a cache of its own, kept across runs: one made by an earlier run
        # (of the main thread) does not inherit the mask, and the compute worker sets its own.
        del log.masks["to_thread"]
    for where, mask in log.masks.items():
        assert mask >= STOPS, where
    assert not STOPS & seen["before"]
    assert seen["after"] == seen["before"]
    # Without a block nobody handles the signals: the run's thread blocks nothing (a process
    # started from it would inherit the mask). (trio's cached worker threads keep the mask
    # they were made with: those made during the run above block them still.)
    alone = MaskLog()
    train_in_a_thread(make_learner(n_batches=N_BATCHES, callbacks=[alone]), backend)
    for where in ("loop", "new thread", "forked"):
        assert not STOPS & alone.masks[where], where
    # In the main thread, the one that runs the handlers, nothing is blocked.
    main = MaskLog()
    make_learner(n_batches=N_BATCHES, callbacks=[main]).fit_sync(1, backend=backend)  # type: ignore[arg-type]
    assert not STOPS & main.masks["loop"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize(
    ("signum", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)]
)
def test_fit_sync_handles_signals_by_default(
    backend: Any, signum: int, raised: type[BaseException]
) -> None:
    learner = make_learner(n_batches=N_BATCHES, callbacks=[SignalAt(step=6, signum=signum)])
    with handler_kept(signum), pytest.raises(raised) as info:
        learner.fit_sync(1000, backend=backend)
    if raised is SystemExit:
        assert info.value.code == 143  # type: ignore[attr-defined]
    assert isinstance(info.value.__cause__, Interrupted)
    assert learner.status.value == "idle"
    assert consistent(learner)
    assert 6 <= learner.state.step < 1000 * N_BATCHES
    learner.fit_sync(learner.state.epoch + 1, backend=backend)
    assert learner.state.batch_index == 0


# -- real signals to training processes -------------------------------------------------------

TRIALS: dict[str, list[tuple[str, int]]] = {
    "asyncio": [("sync", signal.SIGINT), ("async", signal.SIGTERM), ("thread", signal.SIGTERM)],
    "trio": [("sync", signal.SIGTERM), ("async", signal.SIGINT), ("thread", signal.SIGINT)],
}


# Beyond the children's own bound (bench.signal_soak.CHILD_TIMEOUT), so that a child that does
# not end is reported with its threads' stacks.
@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_signalled_training_processes_leave_exact_checkpoints(backend: str, tmp_path: Path) -> None:
    """fit_sync, await fit in stop_on_signals(), and fit_sync in a worker thread: a real signal
    at a random point of a batch; exit status, last.pt at the stop point with the weights of
    that step, and the resumed run equal to the uninterrupted one."""
    with signal_soak.TRAINING:
        reference = signal_soak.Reference()
    trial: Callable[..., signal_soak.Result] = signal_soak.trial
    with ThreadPoolExecutor(len(TRIALS[backend])) as pool:
        futures = [
            pool.submit(trial, mode, backend, signum, 4 + 3 * i, reference, tmp_path)
            for i, (mode, signum) in enumerate(TRIALS[backend])
        ]
        results = [f.result() for f in futures]
    for result in results:
        assert result.problem == "", result
