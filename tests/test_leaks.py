"""Background work is joined; nothing (task, thread, reference) outlives ``fit``."""

from __future__ import annotations

import functools
import gc
import threading
import weakref
from typing import Any

import anyio
import pytest
import torch

from aiolearner import Callback, LearnerStatus, StateView
from aiolearner.testing import make_learner

# -- background work ---------------------------------------------------------------------------


class Uploader(Callback):
    """Starts slow side work in after_epoch that only finishes after the run's last hook."""

    reads = frozenset({"epoch"})

    def __init__(self) -> None:
        self.last_hook_done = anyio.Event()
        self.finished: list[int] = []

    async def after_epoch(self, state: StateView) -> None:
        state.start_soon(self._upload, state.epoch, name="upload")

    async def _upload(self, epoch: int) -> None:
        await self.last_hook_done.wait()
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        self.finished.append(epoch)

    async def after_fit_run(self, state: StateView) -> None:
        self.last_hook_done.set()


async def test_background_work_is_joined_before_fit_returns() -> None:
    uploader = Uploader()
    learner = make_learner(callbacks=[uploader], n_batches=2)
    with anyio.fail_after(10):
        await learner.fit(2)
    assert sorted(uploader.finished) == [0, 1]
    assert not any(t.name and t.name.startswith("aiolearner") for t in anyio.get_running_tasks())


class FromWorker(Callback):
    """start_soon from a def hook of a fused batch, which runs in the compute worker thread."""

    reads = frozenset({"step"})

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.done: list[int] = []

    def after_update(self, state: StateView) -> None:
        self.threads.add(threading.get_ident())
        state.start_soon(self._work, state.step)

    async def _work(self, step: int) -> None:
        await anyio.lowlevel.checkpoint()
        self.done.append(step)


async def test_start_soon_from_the_compute_worker_thread() -> None:
    cb = FromWorker()
    learner = make_learner(callbacks=[cb], n_batches=3, compute="thread")
    await learner.fit(1)
    assert threading.get_ident() not in cb.threads
    assert sorted(cb.done) == [1, 2, 3]


class UploadFailedError(Exception):
    pass


class FailingUpload(Callback):
    async def after_fit(self, state: StateView) -> None:
        state.start_soon(self._upload)

    async def _upload(self) -> None:
        await anyio.lowlevel.checkpoint()
        raise UploadFailedError("network down")


async def test_background_error_propagates_from_fit_in_a_group() -> None:
    learner = make_learner(callbacks=[FailingUpload()], n_batches=2)
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as info:
        await learner.fit(3)
    assert any(isinstance(e, UploadFailedError) for e in info.value.exceptions)
    assert learner.status is LearnerStatus.IDLE


# -- nothing outlives fit ----------------------------------------------------------------------


def task_names() -> set[str]:
    return {t.name or "" for t in anyio.get_running_tasks()}


class Noise(Callback):
    """Two concurrent async hooks and background work: tasks of every kind aiolearner makes."""

    async def after_fit_batch(self, state: StateView) -> None:
        state.start_soon(anyio.lowlevel.checkpoint)

    async def after_fit(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()


class Noise2(Callback):
    async def after_fit(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()


async def fit_with_everything(**options: Any) -> None:
    learner = make_learner(callbacks=[Noise(), Noise2()], n_batches=3, **options)
    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            async for _ in learner.events():
                pass

        tg.start_soon(consume)
        await learner.fit(2)
    assert learner.status is LearnerStatus.IDLE


def pool_thread(name: str) -> bool:
    """Whether a thread belongs to anyio's (or trio's) pool of reusable worker threads."""
    return name == "AnyIO worker thread" or name.startswith("Trio thread")


@pytest.mark.parametrize(("compute", "fetch"), [("inline", "inline"), ("thread", "thread")])
async def test_no_task_or_thread_outlives_fit(compute: str, fetch: str) -> None:
    threads_before = {t.ident for t in threading.enumerate()}
    # A first run lets anyio start the worker threads it keeps around idle.
    await fit_with_everything(compute=compute, fetch=fetch)
    tasks_before = task_names()
    counts = [threading.active_count()]
    for _ in range(6):
        await fit_with_everything(compute=compute, fetch=fetch)
        counts.append(threading.active_count())
        assert task_names() == tasks_before
        assert not any(name.startswith("aiolearner") for name in task_names())
    # aiolearner starts no threads of its own: new ones are the backend's idle workers, and
    # their number does not grow with the number of runs (a worker may be busy returning
    # itself to the pool when the next run asks for one, hence a small allowance).
    new = [t for t in threading.enumerate() if t.ident not in threads_before]
    assert all(pool_thread(t.name) for t in new), [t.name for t in new]
    assert max(counts) <= counts[0] + 2, counts


async def test_no_task_outlives_a_failed_or_cancelled_fit() -> None:
    before = task_names()
    learner = make_learner(callbacks=[FailingUpload()], fetch="thread")
    with pytest.raises(ExceptionGroup):
        await learner.fit(2)
    with anyio.move_on_after(0):
        await learner.fit(2)
    assert task_names() == before
    assert learner.status is LearnerStatus.IDLE


# -- references ----------------------------------------------------------------------------------


async def settle_worker_threads() -> None:
    """Make every idle worker thread run one more call.

    anyio's asyncio worker drops its references to the last call it ran (here a stage bound to
    the learner) only after it has reported the result, so right after ``fit`` returns it may
    still hold them for a moment. A barrier makes each worker take a new call at the same time,
    which it can only do once it has let go of the previous one.
    """
    n = sum(pool_thread(t.name) for t in threading.enumerate())
    if not n:
        return
    barrier = threading.Barrier(n, timeout=10)
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(functools.partial(anyio.to_thread.run_sync, barrier.wait))


async def assert_collectable(*refs: weakref.ref[Any]) -> None:
    await settle_worker_threads()
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == []


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_learner_and_model_are_collected_after_fit(compute: str) -> None:
    learner = make_learner(callbacks=[Noise(), Noise2()], compute=compute, fetch="thread")
    await learner.fit(1)
    refs = (weakref.ref(learner), weakref.ref(learner.model), weakref.ref(learner.optimizer))
    del learner
    await assert_collectable(*refs)


async def test_learner_is_collected_after_a_failed_fit() -> None:
    learner = make_learner(callbacks=[FailingUpload()])
    refs = (weakref.ref(learner), weakref.ref(learner.model))
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    del info, learner
    await assert_collectable(*refs)


def test_learner_is_collected_after_fit_sync() -> None:
    learner = make_learner(trace=True)
    learner.fit_sync(1, backend="trio")
    refs = (weakref.ref(learner), weakref.ref(learner.model))
    del learner
    gc.collect()
    assert [r() for r in refs if r() is not None] == []


# -- garbage for the cycle collector -----------------------------------------------------------


def shuffling_loader() -> torch.utils.data.DataLoader[Any]:
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(3)), torch.arange(32) % 3
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compute": "thread", "fetch": "thread"},
        {"validate": "concurrent"},
        {"train_data": "loader"},
    ],
    ids=["default", "thread", "concurrent-validation", "shuffling-loader"],
)
async def test_training_makes_no_reference_cycles(options: dict[str, Any]) -> None:
    """Epochs of training leave nothing for the cycle collector: a full collection (which walks
    the whole heap while the loop waits, see docs/reliability.md) is not brought nearer by
    training. (Checkpoint is left out: ``torch.save`` makes a class per call.)"""
    if options.get("train_data") == "loader":
        options = {**options, "train_data": shuffling_loader()}
    learner = make_learner(callbacks=[Noise(), Noise2()], **options)
    await learner.fit(1)  # the first run builds the plan and starts what is kept
    found = []
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector would free is kept in gc.garbage
    try:
        for epochs in (2, 5):
            await learner.fit(epochs)
            await settle_worker_threads()
            gc.collect()
            found.extend(gc.garbage)
            gc.garbage.clear()
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert [type(o).__name__ for o in ours(found)] == []


#: Libraries whose background threads (started by earlier tests: the tracking loggers) may make
#: cyclic garbage at any moment; a collection here sees it too.
OTHERS = ("wandb", "opentelemetry", "mlflow", "google", "sentry_sdk", "tensorboard", "grpc")


def ours(garbage: list[Any]) -> list[Any]:
    """The garbage left out of the cycles that hold an object of one of :data:`OTHERS`."""
    ids = {id(o): o for o in garbage}
    component: dict[int, int] = {}
    for start in ids:
        if start in component:
            continue
        component[start] = start
        todo = [ids[start]]
        while todo:  # the objects of the garbage linked to ``start``, either way
            obj = todo.pop()
            linked = [*gc.get_referents(obj), *gc.get_referrers(obj)]
            for other in linked:
                if id(other) in ids and id(other) not in component:
                    component[id(other)] = start
                    todo.append(other)
    foreign = {
        component[i] for i, o in ids.items() if (type(o).__module__ or "").split(".")[0] in OTHERS
    }
    return [o for i, o in ids.items() if component[i] not in foreign]
