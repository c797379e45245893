"""Experiment tracking: MLflow and Weights & Biases adapters of :class:`ExperimentLogger`.

Both clients are imported and called only in the logger's worker thread (importing mlflow takes
seconds), so neither the import, nor a slow tracking server, nor a blocking upload ever runs on the
event loop. Both are optional dependencies: ``pip install 'aiolearner[mlflow]'`` or
``'aiolearner[wandb]'``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._args import named, usable_directory
from ._loggers import ExperimentLogger, OpenMode
from ._optional import require, require_installed

__all__ = ["MLflowLogger", "WandbLogger", "flatten_hparams"]

# Row keys that say where a row belongs rather than what was measured.
_PLACE = ("kind", "step")


def flatten_hparams(hparams: Mapping[str, Any], *, sep: str = ".") -> dict[str, str]:
    """Nested hyperparameters as flat ``{"optim.lr": "0.1"}`` strings (MLflow params are flat).

    Strings stay as they are; every other value (numbers, booleans, ``None``, lists) is written
    as JSON, so ``True`` becomes ``"true"`` and ``[16, 8]`` becomes ``"[16, 8]"``.

    Example:
        >>> flatten_hparams({"optim": {"name": "sgd", "lr": 0.1}, "layers": [16, 8]})
        {'optim.name': 'sgd', 'optim.lr': '0.1', 'layers': '[16, 8]'}
    """

    def walk(prefix: str, value: Any) -> Iterator[tuple[str, str]]:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                yield from walk(f"{prefix}{sep}{key}" if prefix else str(key), item)
        elif isinstance(value, str):
            yield prefix, value
        else:
            yield prefix, json.dumps(value)

    # No hparams: no params (an empty mapping would otherwise become a param with no name).
    return dict(walk("", hparams)) if hparams else {}


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class MLflowLogger(ExperimentLogger):
    """Log to an MLflow tracking store with the official ``mlflow`` client.

    By default the store is local: a SQLite database ``save_dir/mlflow.db`` with artifacts in
    ``save_dir/artifacts`` (browse it with ``mlflow ui --backend-store-uri
    sqlite:///runs/mlflow/mlflow.db``). Give ``tracking_uri`` (or set ``MLFLOW_TRACKING_URI``)
    to log to a server instead.

    What goes where: the hyperparameters become the run's params (flattened with
    :func:`flatten_hparams`), every number of a row becomes a metric at the row's training
    ``step`` (``train_loss``, ``val_accuracy``, ..., and ``epoch`` at the step each epoch
    ended; the step rows of ``every_n_steps`` give ``loss``),
    :meth:`~ExperimentLogger.log_artifact` files become run
    artifacts, and the run ends ``FINISHED`` (completed or stopped), ``FAILED`` (an error) or
    ``KILLED`` (cancelled). A later ``fit`` of the same learner, or one resumed from a
    checkpoint, continues the same run (its id is in the logger's checkpoint state). MLflow
    cannot delete metrics, so values logged after the checkpoint a run was resumed from stay in
    the history next to the resumed run's values for the same steps; params cannot change
    within a run.

    Args:
        experiment: the experiment's name (created when missing).
        save_dir: where the default local store lives.
        tracking_uri: the tracking store or server (default: ``MLFLOW_TRACKING_URI`` if set,
            else the local store in ``save_dir``).
        run_name: the run's display name.
        run_id: continue this existing run instead of creating one.
        tags: tags for a new run.
        every_n_steps: also log the batch loss every N training steps.
        flush_rows: start a write once this many rows are buffered.

    Raises:
        ImportError: mlflow is not installed (the ``mlflow`` extra).
        ValueError: a ``save_dir`` where no file can be written (``~`` is expanded); when a
            run starts, one that can no longer hold files.

    Reads ``metrics``, ``epoch``, ``step``, ``loss``, ``hparams`` and ``outcome``; writes
    nothing. Under ``torch.distributed`` it logs on rank 0 only.

    Example:
        >>> logger = MLflowLogger("digits", run_name="baseline")
        >>> learner = Learner(..., callbacks=[Metrics(), logger], hparams={"lr": 0.1})
        >>> await learner.fit(10)
        >>> logger.run_id      # then: mlflow.MlflowClient(logger.tracking_uri).get_run(...)
    """

    def __init__(
        self,
        experiment: str = "aiolearner",
        *,
        save_dir: str | os.PathLike[str] = "runs/mlflow",
        tracking_uri: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        every_n_steps: int | None = None,
        flush_rows: int = 256,
    ) -> None:
        require_installed("mlflow", extra="mlflow", what="MLflowLogger")
        super().__init__(every_n_steps=every_n_steps, flush_rows=flush_rows)
        self.experiment = named("MLflowLogger", "experiment", experiment, "'aiolearner'")
        self.save_dir = usable_directory(save_dir, "MLflowLogger")
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = f"sqlite:///{self.save_dir.resolve() / 'mlflow.db'}"
        #: The tracking store the run is logged to.
        self.tracking_uri = uri
        self.run_name = run_name
        #: The MLflow run's id (``None`` until the first write of a new run).
        self.run_id = run_id
        self.tags = dict(tags or {})
        self._client: Any = None

    def _output_directories(self) -> list[tuple[Path, bool]]:
        return [(self.save_dir, True)]

    def open(self, mode: OpenMode, rows: int) -> None:
        if self._client is None:
            tracking = require("mlflow.tracking", extra="mlflow", what="MLflowLogger")
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self._client = tracking.MlflowClient(tracking_uri=self.tracking_uri)
        client = self._client
        if self.run_id is None:
            run = client.create_run(
                self._experiment_id(), run_name=self.run_name, tags=self.tags or None
            )
            self.run_id = run.info.run_id
        else:
            client.update_run(self.run_id, status="RUNNING")

    def _experiment_id(self) -> str:
        client = self._client
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        location = (self.save_dir.resolve() / "artifacts").as_uri()
        try:
            return str(client.create_experiment(self.experiment, artifact_location=location))
        except Exception:
            # Another logger created it meanwhile (the store refuses a duplicate name).
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        entities = require("mlflow.entities", extra="mlflow", what="MLflowLogger")
        params = [entities.Param(k, v) for k, v in flatten_hparams(hparams).items()]
        for chunk in _chunks(params, 100):  # MLflow's limit per batch
            self._client.log_batch(self.run_id, params=chunk)

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        entities = require("mlflow.entities", extra="mlflow", what="MLflowLogger")
        now = int(time.time() * 1000)
        metrics = [
            entities.Metric(key, float(value), now, int(row["step"]))
            for row in rows
            for key, value in row.items()
            # ``epoch`` once per epoch: a step row may share its step with the epoch row, and
            # MLflow would keep both values in the history.
            if key not in _PLACE and (key != "epoch" or row["kind"] == "epoch")
        ]
        for chunk in _chunks(metrics, 1000):  # MLflow's limit per batch
            self._client.log_batch(self.run_id, metrics=chunk)

    def write_artifact(self, path: Path, name: str) -> None:
        client = self._client
        if path.is_dir():
            client.log_artifacts(self.run_id, str(path), artifact_path=name)
        elif path.name == name:
            client.log_artifact(self.run_id, str(path))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                renamed = Path(tmp) / name
                shutil.copy2(path, renamed)
                client.log_artifact(self.run_id, str(renamed))

    def finalize(self, outcome: str) -> None:
        status = {"error": "FAILED", "cancelled": "KILLED"}.get(outcome, "FINISHED")
        self._client.set_terminated(self.run_id, status=status)

    def state_dict(self) -> Mapping[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id") or self.run_id


class WandbLogger(ExperimentLogger):
    """Log to Weights & Biases with the official ``wandb`` client.

    The run is created with ``wandb.init`` (``reinit="create_new"``, so several learners in one
    process each get their own run) when the logger first writes. The hyperparameters become
    the run's config, every number of a row is logged at the row's training ``step``
    (``train_loss``, ``val_accuracy``, ..., ``epoch``; the step rows of ``every_n_steps`` give
    ``loss``), :meth:`~ExperimentLogger.log_artifact` files become artifacts of type ``"file"``,
    and the run finishes with exit code 0 (completed or stopped) or 1 (an error or a
    cancellation). A later ``fit`` of the same learner, or one resumed from a checkpoint,
    continues the same run id (``resume="allow"``); W&B ignores values logged at a step lower
    than one it has seen.

    Offline (no account, no network): ``WANDB_MODE=offline`` or ``mode="offline"``; the run is
    written under ``dir/wandb/offline-run-*`` for a later ``wandb sync``.

    Args:
        project: the W&B project.
        name: the run's display name.
        dir: where wandb writes its files (its ``wandb`` folder goes inside).
        id: continue this run id (default: a new run).
        every_n_steps: also log the batch loss every N training steps.
        flush_rows: start a write once this many rows are buffered.
        **init_kwargs: passed on to ``wandb.init`` (``entity``, ``mode``, ``tags``,
            ``group``, ``settings``, ...).

    Raises:
        ImportError: wandb is not installed (the ``wandb`` extra).
        ValueError: a ``dir`` where no file can be written (``~`` is expanded); when a run
            starts, one that can no longer hold files.

    Reads ``metrics``, ``epoch``, ``step``, ``loss``, ``hparams`` and ``outcome``; writes
    nothing. Under ``torch.distributed`` it logs on rank 0 only.

    Example:
        >>> logger = WandbLogger("digits", name="baseline", mode="offline")
        >>> learner = Learner(..., callbacks=[Metrics(), logger], hparams={"lr": 0.1})
        >>> await learner.fit(10)
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        name: str | None = None,
        dir: str | os.PathLike[str] = "runs",
        id: str | None = None,
        every_n_steps: int | None = None,
        flush_rows: int = 256,
        **init_kwargs: Any,
    ) -> None:
        require_installed("wandb", extra="wandb", what="WandbLogger")
        super().__init__(every_n_steps=every_n_steps, flush_rows=flush_rows)
        self.project = project
        self.run_name = name
        self.dir = usable_directory(dir, "WandbLogger")
        #: The W&B run's id (``None`` until the first write of a new run).
        self.run_id = id
        self.init_kwargs = init_kwargs
        #: The ``wandb`` run object while a run is open.
        self.run: Any = None

    def _output_directories(self) -> list[tuple[Path, bool]]:
        return [(self.dir, True)]

    def open(self, mode: OpenMode, rows: int) -> None:
        wandb = require("wandb", extra="wandb", what="WandbLogger")
        self.dir.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {"reinit": "create_new", **self.init_kwargs}
        if self.run_id is not None:
            options.update(id=self.run_id, resume="allow")
        self.run = wandb.init(
            project=self.project, name=self.run_name, dir=str(self.dir), **options
        )
        self.run_id = self.run.id

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        if hparams:
            self.run.config.update(dict(hparams), allow_val_change=True)

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            data = {k: v for k, v in row.items() if k not in _PLACE}
            self.run.log(data, step=int(row["step"]))

    def write_artifact(self, path: Path, name: str) -> None:
        wandb = require("wandb", extra="wandb", what="WandbLogger")
        # Artifact names allow letters, digits, '-', '_' and '.'.
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "_", name), type="file")
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path), name=name)
        self.run.log_artifact(artifact)

    def finalize(self, outcome: str) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=0 if outcome in ("completed", "stopped") else 1)

    def state_dict(self) -> Mapping[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id") or self.run_id
