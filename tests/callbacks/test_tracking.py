"""MLflow and W&B loggers, read back with their own clients (no mocks), and the rank-0 rule.

MLflow logs to a local SQLite store; creating its tables takes seconds, so one store is made per
session and each test copies it. W&B runs offline (``WANDB_MODE=offline``), and its run files are
read back with wandb's own record types (see ``wandb_records.py``).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch.distributed as dist
from blockbuster import blockbuster_ctx

from aiolearner import Callback, StateView
from aiolearner.callbacks import (
    Checkpoint,
    ExperimentLogger,
    Metrics,
    MLflowLogger,
    WandbLogger,
    _loggers,
    flatten_hparams,
    is_rank_zero,
    load_checkpoint_file,
)
from aiolearner.testing import make_learner

from .wandb_records import summarize

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")

HPARAMS = {"lr": 0.1, "optim": {"name": "sgd", "nesterov": True}, "layers": [16, 8]}


class Fail(Callback):
    """Raises in ``before_epoch`` of the given epoch."""

    reads = frozenset({"epoch"})

    def __init__(self, epoch: int) -> None:
        self.at = epoch

    def before_epoch(self, state: StateView) -> None:
        if state.epoch == self.at:
            raise RuntimeError("boom")


class QueueArtifact(Callback):
    """Queues ``epoch-<epoch>.txt`` (written beforehand: no file I/O on the loop) on a logger."""

    reads = frozenset({"epoch"})

    def __init__(self, logger: ExperimentLogger, directory: Path, epochs: int) -> None:
        self.logger = logger
        self.directory = directory
        for epoch in range(epochs):
            (directory / f"epoch-{epoch}.txt").write_text(f"epoch {epoch}")

    def after_epoch(self, state: StateView) -> None:
        self.logger.log_artifact(self.directory / f"epoch-{state.epoch}.txt")


# -- MLflow -----------------------------------------------------------------------------------


@pytest.fixture
def mlflow_dir(tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    directory = tmp_path / "mlflow"
    directory.mkdir()
    shutil.copy(mlflow_template, directory / "mlflow.db")
    return directory


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


async def test_mlflow_logs_params_metrics_artifacts_and_status(
    mlflow_dir: Path, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("before the run")
    logger = MLflowLogger("exp", save_dir=mlflow_dir, run_name="r", every_n_steps=2)
    logger.log_artifact(notes, name="renamed.txt")  # queued between runs: sent with the first write
    learner = make_learner(
        callbacks=[Metrics(), logger, QueueArtifact(logger, tmp_path, 2)],
        n_batches=4,
        hparams=HPARAMS,
        compute="thread",
    )
    loop = threading.get_ident()
    threads: list[int] = []
    write = MLflowLogger.write_metrics

    def spy(self: MLflowLogger, rows: Any) -> None:
        threads.append(threading.get_ident())
        write(self, rows)

    MLflowLogger.write_metrics = spy  # type: ignore[method-assign]
    try:
        # No blocking call on the event loop (blockbuster sees them under asyncio).
        with blockbuster_ctx():
            await learner.fit(2)
    finally:
        MLflowLogger.write_metrics = write  # type: ignore[method-assign]
    assert threads
    assert loop not in threads

    assert logger.tracking_uri == f"sqlite:///{mlflow_dir.resolve() / 'mlflow.db'}"  # noqa: ASYNC240
    assert logger.run_id is not None
    client = mlflow.MlflowClient(tracking_uri=logger.tracking_uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r"
    assert run.data.params == {
        "lr": "0.1",
        "optim.name": "sgd",
        "optim.nesterov": "true",
        "layers": "[16, 8]",
    }
    metrics = learner.state.metrics
    val_loss = _history(client, logger.run_id, "val_loss")
    assert [s for s, _ in val_loss] == [4, 8]
    assert val_loss[-1][1] == pytest.approx(metrics["val_loss"])
    assert [s for s, _ in _history(client, logger.run_id, "loss")] == [2, 4, 6, 8]
    assert _history(client, logger.run_id, "epoch") == [(4, 0), (8, 1)]
    assert run.data.metrics["train_accuracy"] == pytest.approx(metrics["train_accuracy"])
    names = sorted(a.path for a in client.list_artifacts(logger.run_id))
    assert names == ["epoch-0.txt", "epoch-1.txt", "renamed.txt"]
    local = client.download_artifacts(logger.run_id, "renamed.txt", str(tmp_path / "down"))
    assert Path(local).read_text() == "before the run"  # noqa: ASYNC240
    # The experiment's artifacts live in the local store's folder.
    assert (mlflow_dir / "artifacts").is_dir()


async def test_mlflow_later_runs_continue_and_failures_are_recorded(mlflow_dir: Path) -> None:
    logger = MLflowLogger("exp", save_dir=mlflow_dir)
    learner = make_learner(callbacks=[logger, Fail(2)], n_batches=2, hparams={"lr": 0.1})
    await learner.fit(1)
    first = logger.run_id
    assert first is not None
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="boom")):
        await learner.fit(3)
    assert logger.run_id == first  # the same run, continued
    client = mlflow.MlflowClient(tracking_uri=logger.tracking_uri)
    assert client.get_run(first).info.status == "FAILED"
    assert [s for s, _ in _history(client, first, "train_loss")] == [2, 4]

    # A fresh logger restored from a checkpoint continues that run too.
    again = MLflowLogger("exp", save_dir=mlflow_dir)
    resumed = make_learner(callbacks=[again], n_batches=2, hparams={"lr": 0.1})
    resumed.load_state_dict(learner.state_dict())
    await resumed.fit(4)
    assert again.run_id == first
    assert client.get_run(first).info.status == "FINISHED"
    assert [s for s, _ in _history(client, first, "train_loss")] == [2, 4, 6, 8]
    assert len(client.search_runs([client.get_run(first).info.experiment_id])) == 1


def test_flatten_hparams() -> None:
    assert flatten_hparams({"a": {"b": {"c": None}}, "d": "x", "e": {}}) == {
        "a.b.c": "null",
        "d": "x",
        "e": "{}",
    }
    assert flatten_hparams({}) == {}


async def test_mlflow_without_hparams_logs_no_params(mlflow_dir: Path) -> None:
    logger = MLflowLogger("exp", save_dir=mlflow_dir)
    learner = make_learner(callbacks=[logger], n_batches=2)
    await learner.fit(1)
    assert logger.run_id is not None
    client = mlflow.MlflowClient(tracking_uri=logger.tracking_uri)
    assert client.get_run(logger.run_id).data.params == {}


async def test_the_final_checkpoint_holds_the_run_the_loggers_opened(
    mlflow_dir: Path, tmp_path: Path
) -> None:
    """The run ends before the loggers' first write (one short epoch, rows buffered): the final
    last.pt is written after their final flush, so it names the backend run and holds no rows
    still to write; a fresh learner resumed from it continues that run, each row once."""
    logger = MLflowLogger("exp", save_dir=mlflow_dir, every_n_steps=1)
    checkpoint = Checkpoint(tmp_path / "ckpt")
    learner = make_learner(callbacks=[checkpoint, logger], n_batches=2, hparams={"lr": 0.1})
    await learner.fit(1)
    saved = load_checkpoint_file(tmp_path / "ckpt" / "last.pt")["callbacks"]["MLflowLogger"]
    assert saved["run_id"] == logger.run_id is not None
    assert saved["pending"] == []
    again = MLflowLogger("exp", save_dir=mlflow_dir, every_n_steps=1)
    resumed = make_learner(
        callbacks=[Checkpoint(tmp_path / "ckpt"), again], n_batches=2, hparams={"lr": 0.1}
    )
    await resumed.fit(2, resume="last")
    assert again.run_id == logger.run_id
    client = mlflow.MlflowClient(tracking_uri=logger.tracking_uri)
    assert [s for s, _ in _history(client, logger.run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.search_runs([client.get_run(logger.run_id).info.experiment_id])) == 1


# -- W&B --------------------------------------------------------------------------------------


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline W&B, with every file it writes under the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    return tmp_path / "runs"


def _wandb_runs(directory: Path) -> list[dict[str, Any]]:
    """Each offline run file, oldest first (names only have a resolution of seconds)."""
    import wandb

    # run.finish() returns before wandb's service process has closed the run file; teardown
    # waits for it (the next wandb.init starts the service again).
    wandb.teardown()
    files = directory.glob("wandb/offline-run-*/run-*.wandb")
    return [summarize(f) for f in sorted(files, key=lambda p: p.stat().st_mtime)]


async def test_wandb_offline_run_holds_config_history_artifacts_and_exit_code(
    wandb_dir: Path, tmp_path: Path
) -> None:
    logger = WandbLogger("proj", name="r", dir=wandb_dir, every_n_steps=2)
    learner = make_learner(
        callbacks=[Metrics(), logger, QueueArtifact(logger, tmp_path, 2)],
        n_batches=4,
        hparams=HPARAMS,
        compute="thread",
    )
    with blockbuster_ctx():
        await learner.fit(2)
    assert logger.run is None  # finished
    [run] = await anyio.to_thread.run_sync(_wandb_runs, wandb_dir)
    assert run["id"] == logger.run_id
    assert run["exit_code"] == 0
    assert {k: v for k, v in run["config"].items() if not k.startswith("_")} == HPARAMS
    history = run["history"]
    assert [row["_step"] for row in history] == [2, 4, 6, 8]
    assert [row["epoch"] for row in history] == [0, 0, 1, 1]
    assert all("loss" in row for row in history)
    last = history[-1]
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        assert last[key] == pytest.approx(learner.state.metrics[key])
    assert run["artifacts"] == ["epoch-0.txt", "epoch-1.txt"]

    # A later run continues the same id; an error ends it with exit code 1.
    failing = make_learner(callbacks=[logger, Fail(3)], n_batches=4)
    with pytest.warns(UserWarning, match=r"\['Metrics'\], which this learner does not have"):
        failing.load_state_dict(learner.state_dict())
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="boom")):
        await failing.fit(4)
    runs = await anyio.to_thread.run_sync(_wandb_runs, wandb_dir)
    assert [r["id"] for r in runs] == [logger.run_id] * 2
    assert runs[1]["exit_code"] == 1
    assert [row["_step"] for row in runs[1]["history"]] == [10, 12]


# -- the protocol and rank 0 ------------------------------------------------------------------


class Recorder(ExperimentLogger):
    """Records the calls of the protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    def open(self, mode: _loggers.OpenMode, rows: int) -> None:
        self.calls.append(("open", mode, rows))

    def write_hparams(self, hparams: Any) -> None:
        self.calls.append(("hparams", hparams))

    def write_metrics(self, rows: Any) -> None:
        self.calls.append(("metrics", [(r["kind"], r["step"]) for r in rows]))

    def finalize(self, outcome: str) -> None:
        self.calls.append(("finalize", outcome))


async def test_protocol_call_order_across_runs_and_resume() -> None:
    rec = Recorder()
    learner = make_learner(callbacks=[rec], n_batches=2, hparams={"a": [1]})
    await learner.fit(1)
    checkpoint = learner.state_dict()
    await learner.fit(2)
    learner.load_state_dict(checkpoint)
    await learner.fit(2)
    assert rec.calls == [
        ("open", "new", 0),
        ("hparams", {"a": [1]}),
        ("metrics", [("epoch", 2)]),
        ("finalize", "completed"),
        ("open", "continue", 0),
        ("hparams", {"a": [1]}),
        ("metrics", [("epoch", 4)]),
        ("finalize", "completed"),
        ("open", "resume", 1),
        ("hparams", {"a": [1]}),
        ("metrics", [("epoch", 4)]),
        ("finalize", "completed"),
    ]


async def test_only_rank_zero_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    assert not is_rank_zero()
    rec = Recorder()
    await make_learner(callbacks=[rec], n_batches=2).fit(1)
    assert rec.calls == []
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    await make_learner(callbacks=[rec], n_batches=2).fit(1)
    assert [c[0] for c in rec.calls] == ["open", "hparams", "metrics", "finalize"]


def test_rank_zero_in_a_real_process_group(tmp_path: Path) -> None:
    assert is_rank_zero()  # no process group
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        assert is_rank_zero()
    finally:
        dist.destroy_process_group()


def test_missing_clients_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"aiolearner\[mlflow\]"):
        MLflowLogger()
    with pytest.raises(ImportError, match=r"aiolearner\[wandb\]"):
        WandbLogger()


def test_a_logger_without_artifacts_says_so(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="Recorder does not keep artifacts"):
        Recorder().write_artifact(tmp_path, "x")
