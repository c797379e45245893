from __future__ import annotations

import csv
import json
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from aiolearner import Callback, StateView
from aiolearner.callbacks import (
    Checkpoint,
    CSVLogger,
    ExperimentLogger,
    JSONLinesLogger,
    Metrics,
    TensorBoardLogger,
    _loggers,
    accuracy,
)
from aiolearner.testing import make_learner


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


async def test_jsonl_logs_epochs_and_every_n_steps(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    learner = make_learner(
        callbacks=[Metrics({"accuracy": accuracy}), JSONLinesLogger(path, every_n_steps=2)],
        n_batches=4,
    )
    await learner.fit(2)
    rows = read_jsonl(path)
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("step", 2),
        ("step", 4),
        ("epoch", 4),
        ("step", 6),
        ("step", 8),
        ("epoch", 8),
    ]
    last = rows[-1]
    assert last["epoch"] == 1
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        assert last[key] == pytest.approx(float(learner.state.metrics[key]))
    assert all(isinstance(r["loss"], float) for r in rows if r["kind"] == "step")


async def test_csv_rewrites_its_header_when_columns_appear(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    learner = make_learner(callbacks=[CSVLogger(path, every_n_steps=3)], n_batches=3)
    await learner.fit(2)
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["kind", "epoch", "step", "loss", "train_loss", "val_loss"]
    rows = read_csv(path)
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("step", "3"),
        ("epoch", "3"),
        ("step", "6"),
        ("epoch", "6"),
    ]
    assert rows[0]["val_loss"] == ""
    assert float(rows[-1]["val_loss"]) == pytest.approx(learner.state.metrics["val_loss"])


async def test_a_second_fit_appends_and_a_new_logger_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    learner = make_learner(callbacks=[JSONLinesLogger(path)], n_batches=2)
    await learner.fit(1)
    await learner.fit(2)
    assert [r["epoch"] for r in read_jsonl(path)] == [0, 1]
    other = make_learner(callbacks=[JSONLinesLogger(path)], n_batches=2)
    await other.fit(1)
    assert [r["epoch"] for r in read_jsonl(path)] == [0]


class CancelAfterEpoch(Callback):
    reads = frozenset({"epoch", "step"})

    def __init__(self, epoch: int, step_in_epoch: int, scope: anyio.CancelScope) -> None:
        self.epoch = epoch
        self.step = step_in_epoch
        self.scope = scope

    async def after_fit_batch(self, state: StateView) -> None:
        if state.epoch == self.epoch and state.step % 4 == self.step:
            self.scope.cancel()


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
async def test_resumed_from_a_checkpoint_it_drops_rows_logged_after_it(
    tmp_path: Path, kind: str
) -> None:
    """Rows of the lost part of a run are cut; the result equals an uninterrupted log."""

    def logger(path: Path) -> CSVLogger | JSONLinesLogger:
        if kind == "csv":
            return CSVLogger(path, every_n_steps=1)
        return JSONLinesLogger(path, every_n_steps=1)

    def read(path: Path) -> list[Any]:
        return read_csv(path) if kind == "csv" else read_jsonl(path)

    ref = tmp_path / f"ref.{kind}"
    await make_learner(callbacks=[logger(ref)], n_batches=4).fit(3)

    path = tmp_path / f"run.{kind}"
    ckpt_dir = tmp_path / "ckpt"
    # every_n_epochs=1: the checkpoint at the start of epoch 2 is "last"; the step checkpoints
    # are off so the rows of epoch 2 logged before the cancellation are lost with the run...
    with anyio.CancelScope() as scope:
        learner = make_learner(
            callbacks=[
                logger(path),
                Checkpoint(ckpt_dir, save_last=False),
                CancelAfterEpoch(2, 2, scope),
            ],
            n_batches=4,
            yield_interval=0.0,  # the cancellation lands right after the batch
        )
        await learner.fit(3)
    assert len(read(path)) == 2 * 5 + 2
    # ... and resumed from epoch-0002.pt, the log is cut back to what that checkpoint saw
    resumed = make_learner(callbacks=[logger(path), Checkpoint(ckpt_dir)], n_batches=4)
    await resumed.fit(3, resume=ckpt_dir / "epoch-0002.pt")
    assert read(path) == read(ref)


async def test_writes_happen_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []
    real = _loggers.JSONLinesLogger.write_metrics

    def spy(self: JSONLinesLogger, rows: list[dict[str, Any]]) -> None:
        threads.append(threading.get_ident())
        real(self, rows)

    monkeypatch.setattr(_loggers.JSONLinesLogger, "write_metrics", spy)
    learner = make_learner(
        callbacks=[JSONLinesLogger(tmp_path / "x.jsonl", every_n_steps=1, flush_rows=2)],
        n_batches=5,
        compute="inline",
    )
    await learner.fit(2)
    assert threads
    assert loop_thread not in threads
    assert len(read_jsonl(tmp_path / "x.jsonl")) == 12


def test_tensorboard_logs_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner = make_learner(callbacks=[TensorBoardLogger(tmp_path, every_n_steps=2)], n_batches=4)
    learner.fit_sync(2)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert set(tags) == {"epoch/train_loss", "epoch/val_loss", "step/loss"}
    val = acc.Scalars("epoch/val_loss")
    assert [e.step for e in val] == [4, 8]
    assert val[-1].value == pytest.approx(learner.state.metrics["val_loss"])
    assert [e.step for e in acc.Scalars("step/loss")] == [2, 4, 6, 8]


def test_tensorboard_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"aiolearner\[tensorboard\]"):
        TensorBoardLogger("runs")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        CSVLogger("x.csv", every_n_steps=0)
    with pytest.raises(ValueError, match="flush_rows"):
        JSONLinesLogger("x.jsonl", flush_rows=0)


async def test_tensorboard_resumed_from_a_checkpoint_purges_the_lost_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir, ckpt_dir = tmp_path / "tb", tmp_path / "ckpt"
    with anyio.CancelScope() as scope:
        learner = make_learner(
            callbacks=[
                TensorBoardLogger(logdir, every_n_steps=1),
                Checkpoint(ckpt_dir, save_last=False),
                CancelAfterEpoch(2, 2, scope),
            ],
            n_batches=4,
            yield_interval=0.0,
        )
        await learner.fit(3)
    resumed = make_learner(
        callbacks=[TensorBoardLogger(logdir, every_n_steps=1), Checkpoint(ckpt_dir)], n_batches=4
    )
    await resumed.fit(3, resume=ckpt_dir / "epoch-0002.pt")

    def read() -> EventAccumulator:
        acc = EventAccumulator(str(logdir))
        acc.Reload()
        return acc

    acc = await anyio.to_thread.run_sync(read)
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, 13))
    assert [e.step for e in acc.Scalars("epoch/val_loss")] == [4, 8, 12]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
async def test_file_loggers_keep_hparams_and_artifacts(tmp_path: Path, kind: str) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    path = tmp_path / "logs" / f"run.{kind}"
    logger = CSVLogger(path) if kind == "csv" else JSONLinesLogger(path)
    logger.log_artifact(notes, name="kept.txt")
    learner = make_learner(callbacks=[logger], n_batches=2, hparams={"lr": 0.1, "net": [4, 3]})
    await learner.fit(1)
    hparams = json.loads((tmp_path / "logs" / "run.hparams.json").read_text())
    assert hparams == {"lr": 0.1, "net": [4, 3]}
    assert (tmp_path / "logs" / "artifacts" / "kept.txt").read_text() == "hello"


async def test_csv_files_are_the_same_with_concurrent_validation(tmp_path: Path) -> None:
    # Validating every 4 steps, the first row to bring val_loss comes before the first epoch
    # row in sequential mode and after it in concurrent mode: the columns still agree.
    texts = []
    for mode in ("sequential", "concurrent"):
        path = tmp_path / f"{mode}.csv"
        learner = make_learner(
            callbacks=[CSVLogger(path)], validate=mode, validate_every=4, n_batches=4
        )
        await learner.fit(2)
        texts.append(path.read_text())
    assert texts[0] == texts[1]
    assert texts[0].splitlines()[0] == "kind,epoch,step,train_loss,val_loss"


class HangingBackend(ExperimentLogger):
    """A backend whose finalize blocks until the test lets it go (a server that stopped
    answering); the rows it was given, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.finalized = threading.Event()
        self.rows: list[tuple[str, int]] = []

    def open(self, mode: Any, rows: int) -> None:
        pass

    def write_hparams(self, hparams: Any) -> None:
        pass

    def write_metrics(self, rows: Any) -> None:
        self.rows.extend((row["kind"], row["step"]) for row in rows)

    def finalize(self, outcome: str) -> None:
        self.release.wait()
        self.finalized.set()


async def test_a_backend_that_hangs_in_finalize_does_not_hold_fit_past_teardown_timeout(
    tmp_path: Path,
) -> None:
    backend = HangingBackend()
    learner = make_learner(
        callbacks=[backend, Checkpoint(tmp_path)], n_batches=2, teardown_timeout=0.2
    )
    # The logger's final write is abandoned at the bound (its thread goes on); the Checkpoint
    # after it never ran: both are named.
    with (
        anyio.fail_after(20),
        pytest.warns(UserWarning, match="the hook of HangingBackend, Checkpoint was cut off"),
    ):
        await learner.fit(2)
    assert learner._rt.teardown_timed_out
    assert not backend.finalized.is_set()
    backend.release.set()
    # The next run's writes wait for the abandoned one; every row is written once.
    await learner.fit(3)
    assert backend.finalized.is_set()
    assert backend.rows == [("epoch", 2), ("epoch", 4), ("epoch", 6)]
