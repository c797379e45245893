"""Save points survive teardown: the final save is shielded whatever the outcome, a later
cancellation never loses a save point, and a crashed writer's temporary files are cleaned up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from aiolearner import Callback, StateView
from aiolearner.callbacks import Checkpoint, _files, load_checkpoint_file
from aiolearner.testing import make_learner

N_BATCHES = 4


class CancelInTeardown(Callback):
    """Cancels ``scope`` from ``after_fit_run``, while the other callbacks of the hook (the
    final checkpoint) are at work, then waits a moment as a slow teardown would."""

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.saw_cancelled = False

    async def after_fit_run(self, state: StateView) -> None:
        self.scope.cancel()
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        self.saw_cancelled = anyio.current_effective_deadline() == float("-inf")


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_cancellation_during_the_final_save_of_a_completed_run_loses_nothing(
    tmp_path: Path, compute: str
) -> None:
    with anyio.CancelScope() as scope:
        canceller = CancelInTeardown(scope)
        learner = make_learner(
            callbacks=[Checkpoint(tmp_path, every_n_epochs=1), canceller],
            n_batches=N_BATCHES,
            compute=compute,
        )
        await learner.fit(3)
        await anyio.lowlevel.checkpoint()  # the cancellation is still pending: it lands here
        pytest.fail("not cancelled")
    # The run had completed; its teardown ran shielded, so the final state is on disk, and the
    # cancellation took effect only afterwards.
    assert scope.cancelled_caught
    assert not canceller.saw_cancelled
    last = load_checkpoint_file(tmp_path / "last.pt")
    assert last["progress"]["step"] == 3 * N_BATCHES
    assert last["progress"]["epoch"] == 3
    assert names(tmp_path, "epoch-*") == [
        "epoch-0001.pt",
        "epoch-0002.pt",
        "epoch-0003.pt",
    ]


class Stall(Callback):
    async def after_fit_run(self, state: StateView) -> None:
        await anyio.sleep_forever()


def names(directory: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in directory.glob(pattern))


async def test_teardown_is_bounded_by_teardown_timeout_in_every_outcome(tmp_path: Path) -> None:
    # A completed run whose after_fit_run never ends: the caller gets control back after
    # teardown_timeout; the final checkpoint (another callback of the hook) is written.
    learner = make_learner(
        callbacks=[Checkpoint(tmp_path), Stall()], n_batches=N_BATCHES, teardown_timeout=0.05
    )
    with (
        anyio.fail_after(30),
        pytest.warns(UserWarning, match=r"teardown_timeout=0.05 s: the hook of Stall was cut off"),
    ):
        await learner.fit(1)
    assert learner._rt.teardown_timed_out
    assert load_checkpoint_file(tmp_path / "last.pt")["progress"]["step"] == N_BATCHES


def test_stray_temporary_files_are_removed_when_the_next_run_starts(tmp_path: Path) -> None:
    hexes = iter(f"{i:032x}" for i in range(1, 10))
    stray = [
        tmp_path / f".last.pt.{next(hexes)}.tmp",
        tmp_path / f".step-00000004.pt.{next(hexes)}.tmp",
    ]
    for path in stray:
        path.write_bytes(b"half a checkpoint")
    mine = tmp_path / "notes.tmp"  # not one of Checkpoint's
    mine.write_text("keep")
    writing = tmp_path / f".last.pt.{next(hexes)}.tmp"  # being written in this process now
    writing.write_bytes(b"")
    learner = make_learner(callbacks=[Checkpoint(tmp_path)], n_batches=2)
    with _files._temporary(tmp_path / "last.pt") as tmp:
        os.replace(writing, tmp)
        learner.fit_sync(1)
        assert tmp.exists()
    assert not any(path.exists() for path in stray)
    assert mine.read_text() == "keep"
    assert load_checkpoint_file(tmp_path / "last.pt")["progress"]["step"] == 2


def test_a_directory_that_cannot_be_used_is_refused_at_construction(tmp_path: Path) -> None:
    a_file = tmp_path / "runs"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        Checkpoint(a_file)
    with pytest.raises(ValueError, match="cannot create directory"):
        Checkpoint(a_file / "ckpt")
    Checkpoint(tmp_path / "new" / "nested")  # fine: created when the run starts
    assert not (tmp_path / "new").exists()


async def test_the_directory_is_created_when_the_run_starts(tmp_path: Path) -> None:
    # (a step period the run does not reach: no file is written, the directory is made)
    ckpt = Checkpoint(tmp_path / "a" / "b", every_n_epochs=None, save_last=False, every_n_steps=99)
    learner = make_learner(callbacks=[ckpt], n_batches=2)
    await learner.fit(1)
    assert (tmp_path / "a" / "b").is_dir()


async def test_a_directory_replaced_by_a_file_before_the_run_fails_at_its_start(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ckpt"
    ckpt = Checkpoint(directory)
    directory.write_text("")
    learner = make_learner(callbacks=[ckpt], n_batches=2)
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="is a file")):
        await learner.fit(1)
    assert learner.state.step == 0


def test_the_final_save_survives_a_stop_signal(tmp_path: Path, anyio_backend: Any) -> None:
    # (in-process: tests/test_signals.py sends real signals to training processes)
    import signal
    import threading

    class Signal(Callback):
        reads = frozenset({"step"})

        def after_fit_batch(self, state: StateView) -> None:
            if state.step == 6:
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)

    learner = make_learner(callbacks=[Checkpoint(tmp_path), Signal()], n_batches=N_BATCHES)
    with pytest.raises(SystemExit):
        learner.fit_sync(100, backend=anyio_backend[0])
    last = load_checkpoint_file(tmp_path / "last.pt")["progress"]
    assert (last["epoch"], last["step"]) == (learner.state.epoch, learner.state.step)


class CancelInAfterEpoch(Callback):
    """Cancels ``scope`` from the ``after_epoch`` of epoch ``at`` (under concurrent
    validation: in the tail, next to Checkpoint judging that epoch's best file)."""

    reads = frozenset({"epoch"})

    def __init__(self, at: int) -> None:
        self.at = at
        self.scope: anyio.CancelScope | None = None

    async def after_epoch(self, state: StateView) -> None:
        if self.scope is not None and state.epoch == self.at:
            self.scope.cancel()
            self.scope = None
            await anyio.lowlevel.checkpoint()


def best_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("best-*"))


@pytest.mark.parametrize("at", [1, 2, 3])
async def test_a_best_file_judged_on_a_snapshot_survives_a_cancellation(
    tmp_path: Path, at: int
) -> None:
    def build(directory: Path, canceller: Callback | None = None) -> Any:
        checkpoint = Checkpoint(directory, monitor="train_loss", top_k=2, load_best=True)
        callbacks = [checkpoint] if canceller is None else [checkpoint, canceller]
        learner = make_learner(
            callbacks=callbacks, validate="concurrent", n_batches=N_BATCHES, lr=0.05
        )
        return learner, checkpoint

    reference, _ = build(tmp_path / "reference")
    await reference.fit(5)
    expected = best_files(tmp_path / "reference")
    assert len(expected) == 2

    canceller = CancelInAfterEpoch(at)
    learner, checkpoint = build(tmp_path / "again", canceller)
    with anyio.CancelScope() as canceller.scope:
        await learner.fit(5)
    await learner.fit(5)
    assert best_files(tmp_path / "again") == expected
    assert checkpoint.loaded_best is not None
    assert checkpoint.loaded_best.is_file()

    canceller = CancelInAfterEpoch(at)
    learner, _ = build(tmp_path / "resumed", canceller)
    with anyio.CancelScope() as canceller.scope:
        await learner.fit(5)
    fresh, checkpoint = build(tmp_path / "resumed")
    await fresh.fit(5, resume="last")
    assert best_files(tmp_path / "resumed") == expected
    assert checkpoint.loaded_best is not None
    assert checkpoint.loaded_best.is_file()
