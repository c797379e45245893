"""TensorBoard's logger: the run's rows as scalars in event files."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._args import usable_directory
from ._loggers import ExperimentLogger, OpenMode, _copy_artifact
from ._optional import require

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(ExperimentLogger):
    """Log scalars for TensorBoard (needs the ``tensorboard`` package: the ``tensorboard`` extra).

    Epoch rows are logged as ``epoch/<metric>`` and step rows as ``step/loss``, at the training
    step. Resumed from a checkpoint, it purges the events logged after it (``purge_step``). The
    hyperparameters are logged as JSON text under the tag ``hparams`` (TensorBoard's Text tab);
    artifacts are copied into ``log_dir / "artifacts"``.

    Args:
        log_dir: the directory for the event files (``~`` is expanded).
        every_n_steps: also log the batch loss every N training steps.
        flush_rows: start a write once this many rows are buffered.

    Raises:
        ImportError: tensorboard is not installed.

    Reads ``metrics``, ``epoch``, ``step``, ``loss``, ``hparams`` and ``outcome``; writes
    nothing.

    Example:
        >>> learner = Learner(..., callbacks=[TensorBoardLogger("runs/tb", every_n_steps=10)])
        >>> await learner.fit(10)       # then: tensorboard --logdir runs/tb
    """

    _writes_into = property(lambda self: self.log_dir)  # one logger of a kind a directory

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        flush_rows: int = 256,
    ) -> None:
        require("tensorboard", extra="tensorboard", what="TensorBoardLogger")
        super().__init__(every_n_steps=every_n_steps, flush_rows=flush_rows)
        self.log_dir = usable_directory(log_dir, "TensorBoardLogger")
        self._writer: Any = None
        self._purge_step: int | None = None

    def _output_directories(self) -> list[tuple[Path, bool]]:
        return [(self.log_dir, True)]

    def open(self, mode: OpenMode, rows: int) -> None:
        if self._writer is None:
            tb = require("torch.utils.tensorboard", extra="tensorboard", what="TensorBoardLogger")
            purge = self._purge_step if mode == "resume" else None
            self._writer = tb.SummaryWriter(str(self.log_dir), purge_step=purge)
            self._purge_step = None

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        if hparams:
            text = json.dumps(hparams, indent=2, sort_keys=True)
            # Markdown: indented by four spaces, the JSON shows as a code block.
            self._writer.add_text("hparams", "    " + text.replace("\n", "\n    "))

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        writer = self._writer
        for row in rows:
            step = int(row["step"])
            prefix = row["kind"]
            for key, value in row.items():
                if key in ("kind", "epoch", "step"):
                    continue
                writer.add_scalar(f"{prefix}/{key}", float(value), global_step=step)
        writer.flush()

    def write_artifact(self, path: Path, name: str) -> None:
        _copy_artifact(path, self.log_dir / "artifacts", name)

    def finalize(self, outcome: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        # Events after the checkpoint's last logged step belong to the lost part of the run,
        # and those of the rows not yet written then are written again (first).
        first = next(iter(self._rows), None)
        if first is not None:
            self._purge_step = int(first["step"])
        else:
            self._purge_step = self._last_step + 1 if self._last_step >= 0 else None
        self._close()
