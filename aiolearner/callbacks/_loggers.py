"""Loggers: the :class:`ExperimentLogger` protocol, CSV and JSON lines (standard library),
TensorBoard (optional). MLflow and Weights & Biases adapters are in ``_tracking.py``.

Every logger buffers what it is given in its hooks (rows of floats, the hyperparameters, the
paths of artifacts: no I/O, no waiting) and writes it in a worker thread from the learner's
background task group, one write at a time and in order; ``after_fit_run`` writes what is left,
finalizes the output and waits. So a slow disk or tracking server never blocks the event loop or
the training batch. Under ``torch.distributed`` only rank 0 logs.

Rows: one ``kind="epoch"`` row per epoch with every numeric entry of ``state.metrics``, and with
``every_n_steps`` one ``kind="step"`` row every N training steps with the batch loss (reading it
is a host sync, once per N steps). Each row has ``epoch`` (0-based) and ``step``.

Resuming: a logger's checkpoint state is how many rows it had written and the rows it had
logged but not written yet. Resumed from a checkpoint, it opens its output in ``"resume"`` mode
with that count, so a file logger cuts its file back to those rows (rows logged after the
checkpoint, lost with the run, do not appear twice), and writes the others first (a process
killed before its buffer was written loses no row of the checkpoint). A
logger that was not resumed starts its output afresh (``"new"``) the first time it writes; later
``fit`` calls of the same learner continue it (``"continue"``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import torch

from aiolearner import Callback, StateView

from ._args import optional_whole, ready_directory, usable_directory, usable_file, whole
from ._distributed import is_rank_zero
from ._files import atomic_write, remove_stray_temporaries

__all__ = ["CSVLogger", "ExperimentLogger", "JSONLinesLogger", "OpenMode"]

Row = dict[str, Any]

OpenMode = Literal["new", "resume", "continue"]
"""How :meth:`ExperimentLogger.open` finds its output: see there."""

# The shape of a hook method, as the Callback base class yields them.
_Hook = Callable[[StateView], Awaitable[None] | None]


def _number(value: object) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


class ExperimentLogger(Callback):
    """Base class of loggers: what to log is gathered in hooks, written in a worker thread.

    A logger for another backend subclasses it and implements the protocol below. Each method
    runs in a worker thread (it may block: file or network I/O), one call at a time and in this
    order within a run: :meth:`open` before the first write of each ``fit`` run, then
    :meth:`write_hparams` once, then :meth:`write_metrics` and :meth:`write_artifact` as rows
    and files come, and :meth:`finalize` when the run ends (completed, stopped, failed or
    cancelled). Under ``torch.distributed`` only rank 0 logs; other ranks call none of them.

    Args:
        every_n_steps: also log the batch loss every N training steps (a ``kind="step"`` row).
        flush_rows: start a write once this many rows are buffered (rows are also written at the
            end of every epoch).

    Raises:
        ValueError: ``every_n_steps`` or ``flush_rows`` not an int of at least 1 (a float
            raises a ``TypeError`` that is also a ``ValueError``); when a run starts, an output
            directory that can no longer hold files.

    Reads ``metrics``, ``epoch``, ``step``, ``loss``, ``hparams`` and ``outcome``; writes
    nothing. Its checkpoint state is the number of rows logged (see :meth:`open`).

    Example:
        >>> class PrintLogger(ExperimentLogger):
        ...     def write_metrics(self, rows):
        ...         for row in rows:
        ...             print(row)
        >>> learner = Learner(..., callbacks=[PrintLogger()], hparams={"lr": 0.1})
    """

    reads = frozenset({"metrics", "epoch", "step", "loss", "hparams", "outcome"})

    def __init__(self, *, every_n_steps: int | None = None, flush_rows: int = 256) -> None:
        who = type(self).__name__
        self.every_n_steps = optional_whole(who, "every_n_steps", every_n_steps, 1)
        self.flush_rows = whole(who, "flush_rows", flush_rows, 1)
        # Deques: def hooks may append from the compute worker thread while a flush on the
        # event loop takes entries out (append and popleft are atomic).
        self._rows: deque[Row] = deque()
        self._artifacts: deque[tuple[Path, str | None]] = deque()
        self._hparams: dict[str, Any] = {}
        self._logged = 0
        self._last_step = -1
        self._resume_rows: int | None = None
        self._started = False  # opened at least once (or since a checkpoint was loaded)
        self._open = False  # opened in the current run, not finalized yet
        self._active = True  # rank 0 (or not distributed) in the current run
        self._ready = False  # this run's before_fit_run found the output directories usable
        self._lock: anyio.Lock | None = None
        # Rows are added in hooks (maybe in the compute worker thread) and dropped once written
        # (on the loop): the checkpoint state must see one or the other, never both or neither.
        self._guard = threading.Lock()
        # Held by the thread that writes to the backend: a write abandoned by a cancellation
        # (a hung backend past teardown_timeout) and a later one never use the backend at once.
        self._backend = threading.Lock()

    # -- the protocol (run in a worker thread) ---------------------------------------------------

    def open(self, mode: OpenMode, rows: int) -> None:
        """Get the output ready before the first write of a ``fit`` run.

        ``mode`` is ``"new"`` the first time this logger writes (start the output afresh),
        ``"resume"`` after the learner was restored from a checkpoint taken when this logger
        had logged ``rows`` rows (keep those, drop what came after; ``rows`` is 0 in the other
        modes), and ``"continue"`` for a later run of the same learner (append). Default:
        nothing to do.
        """

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters (``Learner(hparams=...)``, in their JSON form).

        Called once after each :meth:`open`, also when they are empty. Default: nothing.
        """

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write rows: ``kind`` (``"epoch"`` or ``"step"``), ``epoch``, ``step``, then numbers."""
        raise NotImplementedError

    def write_artifact(self, path: Path, name: str) -> None:
        """Keep a copy of the file or directory ``path`` under ``name`` (see :meth:`log_artifact`).

        Raises:
            NotImplementedError: this logger keeps no artifacts (the default).
        """
        raise NotImplementedError(f"{type(self).__name__} does not keep artifacts")

    def finalize(self, outcome: str) -> None:
        """Close the output when a run ends (``outcome``: ``"completed"``, ``"stopped"``,
        ``"error"`` or ``"cancelled"``); a later run calls :meth:`open` again. Default: nothing."""

    def _output_directories(self) -> list[tuple[Path, bool]]:
        """The local directories the logger writes into, checked when a run starts (in a worker
        thread, before any batch), each with whether to create it then: a run does not train
        for hours to find at its first write that its log cannot be written. Default: none."""
        return []

    # -- for users ---------------------------------------------------------------------------

    def log_artifact(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        """Queue a file (or directory) to be kept with the run, under ``name`` (default: its name).

        Non-blocking, callable from any hook or thread: the file is read by the next write (at the
        latest the one in ``after_fit_run``, before :meth:`finalize`), so it must still exist then.
        Queued between runs, it goes with the next run's first write.
        """
        self._artifacts.append((Path(path).expanduser(), name))

    # -- hooks -------------------------------------------------------------------------------

    def hooks(self) -> Iterator[tuple[str, _Hook]]:
        # Without every_n_steps, no per-batch hook at all: a hook nobody uses costs nothing.
        for hook, method in super().hooks():
            if hook != "after_fit_batch" or self.every_n_steps is not None:
                yield hook, method

    async def before_fit_run(self, state: StateView) -> None:
        """Get ready to write (a fresh lock: the next run may use another event loop), and
        check the output directories can still hold files (they may have gone since)."""
        self._active = is_rank_zero()
        self._lock = anyio.Lock()
        self._hparams = _plain(state.hparams) if state.is_valid("hparams") else {}
        self._ready = False
        directories = self._output_directories() if self._active else []
        if directories:
            await anyio.to_thread.run_sync(_check_directories, directories, self.name)
        self._ready = True

    def after_fit_batch(self, state: StateView) -> None:
        """Every ``every_n_steps`` steps: buffer a step row with the batch loss."""
        n = self.every_n_steps
        if n is None or state.step % n or not self._active or not state.is_valid("loss"):
            return
        loss = float(state.loss.detach())
        self._add({"kind": "step", "epoch": state.epoch, "step": state.step, "loss": loss}, state)

    def after_epoch(self, state: StateView) -> None:
        """Buffer the epoch's metrics and start writing them."""
        if not self._active:
            return
        row: Row = {"kind": "epoch", "epoch": state.epoch, "step": state.step}
        for key, value in state.metrics.items():
            number = _number(value)
            if number is not None:
                row[key] = number
        self._add(row, state, flush=True)

    async def after_fit_run(self, state: StateView) -> None:
        """Write what is left, finalize the output, and wait for it."""
        ready, self._ready = self._ready, False
        if not (self._active and ready):
            return  # (an output directory that cannot hold files ended the run at its start)
        await self._flush(final=state.outcome if state.is_valid("outcome") else "completed")

    def _add(self, row: Row, state: StateView, *, flush: bool = False) -> None:
        with self._guard:
            self._rows.append(row)
            self._logged += 1
        self._last_step = int(row["step"])
        if flush or len(self._rows) >= self.flush_rows:
            state.start_soon(self._flush, name=f"{self.name}.flush")

    async def _flush(self, *, final: str | None = None) -> None:
        """Write what is buffered; with ``final`` (the run's outcome), also open and finalize."""
        if self._lock is None:  # pragma: no cover - before_fit_run always runs first
            self._lock = anyio.Lock()
        async with self._lock:
            # Entries leave the buffers only once written: a flush cancelled before its thread
            # started (the run was cancelled) leaves them for after_fit_run, which runs shielded.
            # Entries that failed to write are dropped too (the error leaves fit). A flush task
            # that gets the lock after the final one finds nothing to do: it never reopens.
            rows = list(self._rows)
            artifacts = list(self._artifacts)
            if not (rows or artifacts or final is not None):
                return
            handoff = _Handoff()

            def write() -> None:
                if handoff.take():
                    with self._backend:
                        self._write(rows, artifacts, final)

            try:
                # Abandoned when cancelled (a bounded teardown, a cancelled run): a backend that
                # hangs must not hold fit past teardown_timeout. The thread writes on.
                await anyio.to_thread.run_sync(write, abandon_on_cancel=True)
            except Exception:
                self._drop(len(rows), len(artifacts))
                raise
            except BaseException:
                # Cancelled: the entries stay buffered unless the thread has them (it writes
                # them; written again they would be twice in the log).
                if not handoff.withdraw():
                    self._drop(len(rows), len(artifacts))
                raise
            self._drop(len(rows), len(artifacts))

    def _drop(self, rows: int, artifacts: int) -> None:
        with self._guard:
            for _ in range(rows):
                self._rows.popleft()
        for _ in range(artifacts):
            self._artifacts.popleft()

    def _write(
        self, rows: list[Row], artifacts: list[tuple[Path, str | None]], final: str | None
    ) -> None:
        if not self._open:
            if self._resume_rows is not None:
                self.open("resume", self._resume_rows)
            else:
                self.open("continue" if self._started else "new", 0)
            self._started = True
            self._open = True
            self._resume_rows = None
            self.write_hparams(self._hparams)
        try:
            if rows:
                self.write_metrics(rows)
            for path, name in artifacts:
                self.write_artifact(path, name or path.name)
        finally:
            if final is not None:
                self._open = False
                self.finalize(final)

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> Mapping[str, Any]:
        with self._guard:
            pending = [dict(row) for row in self._rows]
            return {"rows": self._logged, "step": self._last_step, "pending": pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pending = [dict(row) for row in state.get("pending", ())]
        self._logged = int(state.get("rows", 0))
        self._last_step = int(state.get("step", -1))
        # The rows written when the checkpoint was taken; the pending ones are written next.
        self._resume_rows = self._logged - len(pending)
        self._open = False
        self._rows.clear()
        self._rows.extend(pending)


def _check_directories(directories: list[tuple[Path, bool]], who: str) -> None:
    for directory, create in directories:
        ready_directory(directory, who, create)


def _plain(value: Any) -> Any:
    """A plain copy of a value read through a state view (its read-only windows unwrapped)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(item) for item in value]
    return value


def _copy_artifact(path: Path, directory: Path, name: str) -> None:
    """Copy a file or directory into ``directory`` as ``name`` (a plain name, never a path)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"artifact names must be plain file names, got {name!r}")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    if path.is_dir():
        shutil.copytree(path, target, dirs_exist_ok=True)
    else:
        shutil.copy2(path, target)


def _artifacts_dir(given: object, path: Path, who: str) -> Path:
    """Where a file logger copies artifacts: ``given``, or ``artifacts`` beside its file."""
    return usable_directory(given or path.parent / "artifacts", who)


def _remove_own_temporaries(path: Path) -> None:
    """The temporaries of a rewrite of ``path`` (or of its hyperparameters file) that a killed
    run left beside it."""
    remove_stray_temporaries(path.parent, (path.name, f"{path.stem}.hparams.json"))


def _write_hparams_file(path: Path, hparams: Mapping[str, Any]) -> None:
    if not hparams:
        return  # no file for a run without hyperparameters
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(hparams, indent=2, sort_keys=True) + "\n").encode("utf-8"))


class JSONLinesLogger(ExperimentLogger):
    """Log rows as JSON objects, one per line, to a file.

    The hyperparameters (if any) go to ``<path stem>.hparams.json`` beside it; artifacts are copied
    into ``artifacts_dir``.

    Args:
        path: the ``.jsonl`` file (``~`` is expanded).
        every_n_steps: also log the batch loss every N training steps.
        flush_rows: start a write once this many rows are buffered (rows are also written at the
            end of every epoch).
        artifacts_dir: where :meth:`~ExperimentLogger.log_artifact` copies files (default:
            ``artifacts`` beside the file).

    Raises:
        ValueError: a ``path`` that is a directory, or one (or an ``artifacts_dir``) where no
            file can be written; checked again when a run starts.

    Reads ``metrics``, ``epoch``, ``step``, ``loss``, ``hparams`` and ``outcome``; writes
    nothing.

    Example:
        >>> log = JSONLinesLogger("runs/metrics.jsonl", every_n_steps=50)
        >>> learner = Learner(..., callbacks=[Metrics(accuracy), log])
        >>> await learner.fit(10)
        >>> [json.loads(line) for line in open("runs/metrics.jsonl")][-1]
        {'kind': 'epoch', 'epoch': 9, 'step': 1000, 'train_loss': 0.12, ...}
    """

    _writes_into = property(lambda self: self.path)  # one logger of a kind a file

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        flush_rows: int = 256,
        artifacts_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, flush_rows=flush_rows)
        self.path = usable_file(path, "JSONLinesLogger", "log.jsonl")
        self.artifacts_dir = _artifacts_dir(artifacts_dir, self.path, "JSONLinesLogger")

    def _output_directories(self) -> list[tuple[Path, bool]]:
        return [(self.path.parent, True), (self.artifacts_dir, False)]

    def open(self, mode: OpenMode, rows: int) -> None:
        if mode == "continue":
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_own_temporaries(self.path)
        kept = b""
        if mode == "resume" and rows and self.path.is_file():
            lines = self.path.read_bytes().splitlines(keepends=True)[:rows]
            kept = b"".join(lines)
        atomic_write(self.path, kept)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        _write_hparams_file(self.path.with_name(f"{self.path.stem}.hparams.json"), hparams)

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def write_artifact(self, path: Path, name: str) -> None:
        _copy_artifact(path, self.artifacts_dir, name)


#: The CSV file's first columns; the metrics follow in alphabetical order.
_CSV_FIRST = ("kind", "epoch", "step")


class CSVLogger(ExperimentLogger):
    """Log rows to a CSV file with a header; a new column rewrites the file with it.

    Columns: ``kind``, ``epoch``, ``step``, then every metric in alphabetical order (so a run
    writes the same columns whichever row brings a metric first, concurrent validation or not,
    and a new column rewrites the file in that order; with concurrent validation and
    ``every_n_steps``, epoch rows may fall among the next epoch's step rows). Cells of a
    row without that column are empty. The hyperparameters (if any) go to
    ``<path stem>.hparams.json`` beside it, and artifacts are copied into ``artifacts_dir``.

    Args:
        path: the ``.csv`` file (``~`` is expanded).
        every_n_steps: also log the batch loss every N training steps.
        flush_rows: start a write once this many rows are buffered.
        artifacts_dir: where :meth:`~ExperimentLogger.log_artifact` copies files (default:
            ``artifacts`` beside the file).

    Raises:
        ValueError: a ``path`` that is a directory, or one (or an ``artifacts_dir``) where no
            file can be written; checked again when a run starts.

    Reads ``metrics``, ``epoch``, ``step``, ``loss``, ``hparams`` and ``outcome``; writes
    nothing.

    Example:
        >>> log = CSVLogger("runs/metrics.csv")
        >>> learner = Learner(..., callbacks=[log])
        >>> await learner.fit(10)
        >>> list(csv.DictReader(open("runs/metrics.csv")))[-1]["val_loss"]
    """

    _writes_into = property(lambda self: self.path)  # one logger of a kind a file

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        flush_rows: int = 256,
        artifacts_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, flush_rows=flush_rows)
        self.path = usable_file(path, "CSVLogger", "log.csv")
        self.artifacts_dir = _artifacts_dir(artifacts_dir, self.path, "CSVLogger")
        self._columns: list[str] = []
        self._all: list[Row] = []

    def _output_directories(self) -> list[tuple[Path, bool]]:
        return [(self.path.parent, True), (self.artifacts_dir, False)]

    def open(self, mode: OpenMode, rows: int) -> None:
        if mode == "continue":
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_own_temporaries(self.path)
        self._all = []
        self._columns = []
        if mode == "resume" and rows and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or [])
                for i, row in enumerate(reader):
                    if i >= rows:
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

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        _write_hparams_file(self.path.with_name(f"{self.path.stem}.hparams.json"), hparams)

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._all.extend(dict(row) for row in rows)
        new = {k for row in rows for k in row if k not in self._columns}
        if new:
            columns = {*self._columns, *new}
            first = [k for k in _CSV_FIRST if k in columns]
            self._columns = first + sorted(columns.difference(first))
            self._rewrite()
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self._columns, lineterminator="\n").writerows(rows)

    def write_artifact(self, path: Path, name: str) -> None:
        _copy_artifact(path, self.artifacts_dir, name)


class _Handoff:
    """Entries handed to a writer thread: either the thread takes them (and writes them) or the
    event loop withdraws them (the write was abandoned before the thread started), never both."""

    __slots__ = ("_lock", "_state")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = ""

    def take(self) -> bool:
        """In the thread: whether it may write them (they were not withdrawn)."""
        with self._lock:
            if self._state:
                return False
            self._state = "taken"
            return True

    def withdraw(self) -> bool:
        """On the loop: whether they were withdrawn (False: the thread has taken them)."""
        with self._lock:
            if self._state == "taken":
                return False
            self._state = "withdrawn"
            return True
