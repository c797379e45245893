"""Loggers: CSV and JSON lines (standard library), TensorBoard (optional).

Every logger buffers rows in memory in its hooks (a dict of floats: no I/O, no waiting) and
writes them in a worker thread from the learner's background task group, one write at a time and
in order; ``after_fit_run`` writes what is left and waits for it. So a slow disk never blocks the
event loop or the training batch.

Rows: one ``kind="epoch"`` row per epoch with every numeric entry of ``state.metrics``, and with
``every_n_steps`` one ``kind="step"`` row every N training steps with the batch loss (reading it
is a host sync, once per N steps). Each row has ``epoch`` (0-based) and ``step``.

Resuming: a logger's checkpoint state is how many rows it had logged. Resumed from a checkpoint,
it first cuts its file back to those rows, so rows logged after the checkpoint (and lost with the
run) do not appear twice. A logger that was not resumed starts its file afresh the first time it
writes; later ``fit`` calls of the same learner append.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import torch

from aiolearner import Callback, StateView

from ._checkpoint import atomic_write
from ._optional import require

__all__ = ["CSVLogger", "JSONLinesLogger", "TensorBoardLogger"]

Row = dict[str, Any]


def _number(value: object) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


class _BufferedLogger(Callback):
    """Collects rows in hooks; writes them off the event loop (subclasses: ``_write_rows``)."""

    reads = frozenset({"metrics", "epoch", "step", "loss"})

    def __init__(self, *, every_n_steps: int | None = None, flush_rows: int = 256) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be at least 1, got {flush_rows}")
        self.every_n_steps = every_n_steps
        self.flush_rows = flush_rows
        # A deque: def hooks may append from the compute worker thread while a flush on the
        # event loop takes rows out (append and popleft are atomic).
        self._rows: deque[Row] = deque()
        self._logged = 0
        self._last_step = -1
        self._resume_rows: int | None = None
        self._started = False
        self._lock: anyio.Lock | None = None

    def hooks(self) -> Iterator[tuple[str, Callable[[StateView], Any]]]:
        # Without every_n_steps, no per-batch hook at all: a hook nobody uses costs nothing.
        for hook, method in super().hooks():
            if hook != "after_fit_batch" or self.every_n_steps is not None:
                yield hook, method

    def before_fit_run(self, state: StateView) -> None:
        """Get ready to write (a fresh lock: the next run may use another event loop)."""
        self._lock = anyio.Lock()

    def after_fit_batch(self, state: StateView) -> None:
        """Every ``every_n_steps`` steps: buffer a step row with the batch loss."""
        n = self.every_n_steps
        if n is None or state.step % n or not state.is_valid("loss"):
            return
        loss = float(state.loss.detach())
        self._add({"kind": "step", "epoch": state.epoch, "step": state.step, "loss": loss}, state)

    def after_epoch(self, state: StateView) -> None:
        """Buffer the epoch's metrics and start writing them."""
        row: Row = {"kind": "epoch", "epoch": state.epoch, "step": state.step}
        for key, value in state.metrics.items():
            number = _number(value)
            if number is not None:
                row[key] = number
        self._add(row, state, flush=True)

    async def after_fit_run(self, state: StateView) -> None:
        """Write what is left, and wait for it."""
        await self._flush()
        await anyio.to_thread.run_sync(self._close)

    def _add(self, row: Row, state: StateView, *, flush: bool = False) -> None:
        self._rows.append(row)
        self._logged += 1
        self._last_step = int(row["step"])
        if flush or len(self._rows) >= self.flush_rows:
            state.start_soon(self._flush, name=f"{self.name}.flush")

    async def _flush(self) -> None:
        if self._lock is None:  # pragma: no cover - before_fit_run always runs first
            self._lock = anyio.Lock()
        async with self._lock:
            # Rows leave the buffer only once written: a flush cancelled before its thread
            # started (the run was cancelled) leaves them for after_fit_run, which runs shielded.
            # Rows that failed to write are dropped too (the error leaves fit).
            rows = list(self._rows)
            try:
                if rows or not self._started:
                    await anyio.to_thread.run_sync(self._write, rows)
            except Exception:
                self._drop(len(rows))
                raise
            self._drop(len(rows))

    def _drop(self, n: int) -> None:
        for _ in range(n):
            self._rows.popleft()

    def _write(self, rows: list[Row]) -> None:
        if not self._started:
            self._start(self._resume_rows)
            self._started = True
            self._resume_rows = None
        if rows:
            self._write_rows(rows)

    # -- for subclasses (run in a worker thread) --------------------------------------------------

    def _start(self, keep_rows: int | None) -> None:
        """Prepare the output: keep its first ``keep_rows`` rows, or start it empty (``None``)."""
        raise NotImplementedError

    def _write_rows(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """Release what the logger holds open (nothing by default)."""

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> Mapping[str, Any]:
        return {"rows": self._logged, "step": self._last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._logged = int(state.get("rows", 0))
        self._last_step = int(state.get("step", -1))
        self._resume_rows = self._logged
        self._started = False
        self._rows.clear()


class JSONLinesLogger(_BufferedLogger):
    """Log rows as JSON objects, one per line, to a file.

    Args:
        path: the ``.jsonl`` file.
        every_n_steps: also log the batch loss every N training steps.
        flush_rows: start a write once this many rows are buffered (rows are also written at the
            end of every epoch).

    Reads ``metrics``, ``epoch``, ``step`` and ``loss``; writes nothing.

    Example:
        >>> log = JSONLinesLogger("runs/metrics.jsonl", every_n_steps=50)
        >>> learner = Learner(..., callbacks=[Metrics(accuracy), log])
        >>> await learner.fit(10)
        >>> [json.loads(line) for line in open("runs/metrics.jsonl")][-1]
        {'kind': 'epoch', 'epoch': 9, 'step': 1000, 'train_loss': 0.12, ...}
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        flush_rows: int = 256,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, flush_rows=flush_rows)
        self.path = Path(path)

    def _start(self, keep_rows: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = b""
        if keep_rows and self.path.is_file():
            lines = self.path.read_bytes().splitlines(keepends=True)[:keep_rows]
            kept = b"".join(lines)
        atomic_write(self.path, kept)

    def _write_rows(self, rows: list[Row]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


class CSVLogger(_BufferedLogger):
    """Log rows to a CSV file with a header; a new column rewrites the file with it.

    Columns: ``kind``, ``epoch``, ``step``, then every metric in the order first seen. Cells of a
    row without that column are empty.

    Args:
        path: the ``.csv`` file.
        every_n_steps: also log the batch loss every N training steps.
        flush_rows: start a write once this many rows are buffered.

    Reads ``metrics``, ``epoch``, ``step`` and ``loss``; writes nothing.

    Example:
        >>> log = CSVLogger("runs/metrics.csv")
        >>> learner = Learner(..., callbacks=[log])
        >>> await learner.fit(10)
        >>> list(csv.DictReader(open("runs/metrics.csv")))[-1]["val_loss"]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        flush_rows: int = 256,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, flush_rows=flush_rows)
        self.path = Path(path)
        self._columns: list[str] = []
        self._all: list[Row] = []

    def _start(self, keep_rows: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._all = []
        self._columns = []
        if keep_rows and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or [])
                for i, row in enumerate(reader):
                    if i >= keep_rows:
                        break
                    self._all.append({k: v for k, v in row.items() if v != ""})
        self._rewrite()

    def _rewrite(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self._columns, lineterminator="\n")
        if self._columns:
            writer.writeheader()
        writer.writerows(self._all)
        atomic_write(self.path, buffer.getvalue().encode("utf-8"))

    def _write_rows(self, rows: list[Row]) -> None:
        self._all.extend(rows)
        new = [k for row in rows for k in row if k not in self._columns]
        if new:
            for key in new:
                if key not in self._columns:
                    self._columns.append(key)
            self._rewrite()
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self._columns, lineterminator="\n").writerows(rows)


class TensorBoardLogger(_BufferedLogger):
    """Log scalars for TensorBoard (needs the ``tensorboard`` package: the ``tensorboard`` extra).

    Epoch rows are logged as ``epoch/<metric>`` and step rows as ``step/loss``, at the training
    step. Resumed from a checkpoint, it purges the events logged after it (``purge_step``).

    Args:
        log_dir: the directory for the event files.
        every_n_steps: also log the batch loss every N training steps.
        flush_rows: start a write once this many rows are buffered.

    Raises:
        ImportError: tensorboard is not installed.

    Reads ``metrics``, ``epoch``, ``step`` and ``loss``; writes nothing.

    Example:
        >>> learner = Learner(..., callbacks=[TensorBoardLogger("runs/tb", every_n_steps=10)])
        >>> await learner.fit(10)       # then: tensorboard --logdir runs/tb
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        flush_rows: int = 256,
    ) -> None:
        require("tensorboard", extra="tensorboard", what="TensorBoardLogger")
        super().__init__(every_n_steps=every_n_steps, flush_rows=flush_rows)
        self.log_dir = Path(log_dir)
        self._writer: Any = None
        self._purge_step: int | None = None

    def _start(self, keep_rows: int | None) -> None:
        if self._writer is None:
            tb = require("torch.utils.tensorboard", extra="tensorboard", what="TensorBoardLogger")
            self._writer = tb.SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
            self._purge_step = None

    def _write_rows(self, rows: list[Row]) -> None:
        writer = self._writer
        for row in rows:
            step = int(row["step"])
            prefix = row["kind"]
            for key, value in row.items():
                if key in ("kind", "epoch", "step"):
                    continue
                writer.add_scalar(f"{prefix}/{key}", float(value), global_step=step)
        writer.flush()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        last = self._last_step
        # Events after the checkpoint's last logged step belong to the lost part of the run.
        self._purge_step = last + 1 if last >= 0 else None
        self._close()
