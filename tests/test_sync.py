"""fit_sync / validate_sync from code that a running event loop called (a Jupyter cell).

The async tests below call the blocking methods directly from a task, as a notebook cell does:
the run must go to its own thread and loop, and an interrupt must cancel it cleanly.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import pytest
import torch

from aiolearner import Callback, LearnerStatus, StateView
from aiolearner._sync import event_loop_running, run_sync
from aiolearner.testing import RecordingCallback, make_learner

BACKENDS = ["asyncio", "trio"]
N_BATCHES = 4


def consistent(learner: Any) -> bool:
    state = learner.state
    return bool(state.step == state.epoch * N_BATCHES + state.batch_index)


@contextmanager
def kernel_like_sigint() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in the main thread, as ipykernel arranges while a cell runs.

    (The test's own loop would otherwise handle it: asyncio's runner cancels its main task, trio
    delivers it to its own task.)
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class InterruptAt(Callback):
    """Sends SIGINT to the main thread once, after the given step (like the kernel's interrupt)."""

    reads = frozenset({"step"})

    def __init__(self, step: int) -> None:
        self.step = step
        self.sent = False

    def after_fit_batch(self, state: StateView) -> None:
        if not self.sent and state.step >= self.step:
            self.sent = True
            main = threading.main_thread().ident
            assert main is not None
            signal.pthread_kill(main, signal.SIGINT)


def test_no_loop_runs_in_a_plain_test() -> None:
    assert not event_loop_running()


async def test_a_loop_runs_in_an_async_test() -> None:
    assert event_loop_running()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_fit_sync_and_validate_sync_inside_a_running_loop(
    backend: Literal["asyncio", "trio"],
) -> None:
    caller = threading.get_ident()
    seen: list[int] = []

    class Where(Callback):
        async def before_fit_run(self, state: StateView) -> None:
            seen.append(threading.get_ident())  # the thread of the run's event loop

    rec = RecordingCallback(hooks=["after_fit_batch"])
    learner = make_learner(callbacks=[rec, Where()], n_batches=N_BATCHES)
    learner.fit_sync(2, backend=backend)  # blocks this task until done, as a cell would
    assert learner.state.epoch == 2
    assert learner.state.step == 2 * N_BATCHES
    assert rec.calls == ["after_fit_batch"] * (2 * N_BATCHES)
    assert learner.status is LearnerStatus.IDLE
    result = learner.validate_sync(backend=backend)
    assert result == learner.state.validation
    assert result["loss"] > 0
    assert seen[0] != caller
    # And the learner still runs on this loop afterwards.
    await learner.fit(3)
    assert learner.state.step == 3 * N_BATCHES


async def test_the_run_happens_on_another_thread() -> None:
    caller = threading.get_ident()

    async def where() -> int:
        return threading.get_ident()

    assert run_sync(where) != caller
    assert run_sync(where, backend="trio") != caller


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_predict_sync_gives_what_predict_gives(backend: Literal["asyncio", "trio"]) -> None:
    learner = make_learner()
    inputs = [torch.randn(3, 4), torch.randn(2, 4)]
    outputs = learner.predict_sync(inputs, backend=backend)
    assert torch.equal(outputs, torch.cat([learner.model.eval()(x) for x in inputs]).detach())


def test_without_a_loop_the_run_stays_on_this_thread() -> None:
    caller = threading.get_ident()

    async def where() -> int:
        return threading.get_ident()

    assert run_sync(where) == caller


@pytest.mark.parametrize("backend", BACKENDS)
async def test_errors_come_out_as_their_own_type(backend: Literal["asyncio", "trio"]) -> None:
    bad = [(torch.randn(5, 7), torch.zeros(5, dtype=torch.long))]  # the model takes 4 features
    learner = make_learner(train_data=bad)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        learner.fit_sync(1, backend=backend)
    assert learner.status is LearnerStatus.IDLE


@pytest.fixture
def interrupted_learner() -> tuple[Any, InterruptAt, RecordingCallback]:
    # Built outside the test's event loop (a sync fixture): the learner's data source keeps an
    # anyio.CapacityLimiter made in its constructor, which binds to the loop it was made in, so a
    # learner built on an asyncio loop cannot resume mid-epoch under trio (a gap in _data.py).
    interrupt = InterruptAt(step=N_BATCHES + 2)  # in the second epoch
    rec = RecordingCallback(hooks=["after_fit_run"])
    return make_learner(callbacks=[interrupt, rec], n_batches=N_BATCHES), interrupt, rec


# The caller's loop is asyncio only, as in a Jupyter kernel: under the test runner's trio (guest
# mode), the SIGINT this test sends to the main thread now and then reached it only after the run
# had finished. The run's own loop is either backend; tests/test_notebook.py interrupts a real
# kernel.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_interrupt_cancels_the_run_which_then_continues(
    backend: Literal["asyncio", "trio"],
    interrupted_learner: tuple[Any, InterruptAt, RecordingCallback],
) -> None:
    learner, interrupt, rec = interrupted_learner
    with kernel_like_sigint(), pytest.raises(KeyboardInterrupt):
        learner.fit_sync(1000, backend=backend)
    # fit_sync returned only once the run had stopped: teardown ran, the learner is idle.
    assert interrupt.sent
    assert rec.calls == ["after_fit_run"]
    assert learner.status is LearnerStatus.IDLE
    assert consistent(learner)
    stopped_at = learner.state.step
    assert N_BATCHES + 2 <= stopped_at < 1000 * N_BATCHES
    # Calling it again continues the same run.
    target = learner.state.epoch + 2
    learner.fit_sync(target, backend=backend)
    assert learner.state.epoch == target
    assert learner.state.step == target * N_BATCHES


class InterruptViaAnotherThread(Callback):
    """At a step, has a thread of its own (started before the run, so SIGINT is not blocked
    there) take SIGINT: the kernel may hand a process's signal to any such thread, and Python's
    handler there only flags it for the main thread."""

    reads = frozenset({"step"})

    def __init__(self, step: int) -> None:
        self.step = step
        self.go = threading.Event()
        self.thread = threading.Thread(target=self._take)
        self.thread.start()

    def _take(self) -> None:
        self.go.wait()
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    def after_fit_batch(self, state: StateView) -> None:
        if state.step >= self.step:
            self.go.set()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_interrupt_taken_by_another_thread_still_stops_the_run() -> None:
    interrupt = InterruptViaAnotherThread(step=N_BATCHES + 2)
    learner = make_learner(callbacks=[interrupt], n_batches=N_BATCHES)
    try:
        with kernel_like_sigint(), pytest.raises(KeyboardInterrupt):
            learner.fit_sync(1000)
    finally:
        interrupt.go.set()
        interrupt.thread.join()
    # The waiting thread heard of it while the run went on (an untimed wait hears of it
    # only when the run has ended), and the run stopped cleanly.
    assert learner.status is LearnerStatus.IDLE
    assert consistent(learner)
    assert N_BATCHES + 2 <= learner.state.step < 1000 * N_BATCHES
