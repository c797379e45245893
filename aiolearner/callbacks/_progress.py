"""A progress display: live in Jupyter, a rich bar on a terminal, plain log lines elsewhere.

The hooks only note counters and keep a reference to the latest loss tensor (no ``.item()``, no
I/O); a background task renders at most every ``refresh_interval`` seconds, in a worker thread.
So a fast training loop does not pay for drawing, the one host sync per render happens off the
batch, and a slow terminal or pipe never blocks the event loop. The end of an epoch wakes the
renderer at once, so that the epoch's line appears when the epoch ends, not during the next one
(with epochs shorter than ``refresh_interval``, the bar would otherwise trail a whole epoch).

Epochs are numbered from 1 on screen ("epoch 1" is the first), while ``state.epoch`` counts the
completed ones.
"""

from __future__ import annotations

import html
import sys
import threading
import time
from collections import deque
from typing import Any, Literal, TextIO

import anyio
import torch

from aiolearner import Callback, StateView, batch_size

from ._args import real, text_stream
from ._distributed import is_rank_zero
from ._optional import require

__all__ = ["ProgressBar"]

Display = Literal["auto", "notebook", "rich", "plain"]


def _in_jupyter() -> bool:
    """Whether this process is a Jupyter kernel (IPython with a kernel attached)."""
    ipython = sys.modules.get("IPython")  # never imported here: a kernel has imported it
    if ipython is None:
        return False
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if get_ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def _fmt(value: object) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressBar(Callback):
    """Show epochs and batches with the loss, the metrics and the throughput.

    The display is chosen by where the output goes: in a Jupyter kernel, a live display updated
    in place (an IPython display handle with an HTML progress bar; no ipywidgets needed); on a
    terminal, a rich progress bar (rich is the ``rich`` extra); elsewhere (CI logs, files), plain
    lines: one per epoch, and one every ``log_interval`` seconds during long epochs. The number of
    batches per epoch is learned from the first epoch.

    Args:
        refresh_interval: the shortest time between two renders of the bar (seconds).
        log_interval: in plain mode, the shortest time between two progress lines inside an
            epoch (seconds).
        display: ``"notebook"``, ``"rich"`` or ``"plain"`` to force one; ``"auto"`` (default)
            picks the notebook display in a Jupyter kernel writing to its own stdout, the rich
            bar when ``file`` is a terminal (or a ``console`` is given), plain lines otherwise.
        plain: the older switch: ``True`` for ``display="plain"``, ``False`` for ``"rich"``.
        file: where to write (default ``sys.stdout``).
        console: a ``rich.console.Console`` to draw on (implies the bar).

    Raises:
        ImportError: the bar is wanted and rich is not installed.
        ValueError: an interval that is not a positive number; (when the run starts) a
            ``file`` that is closed.
        TypeError: a ``file`` that is not a text stream (a path: open it first).

    Reads ``epoch``, ``step``, ``batch_index``, ``batch``, ``loss`` and ``metrics``; writes
    nothing.

    Example:
        >>> learner = Learner(..., callbacks=[Metrics(accuracy), ProgressBar()])
        >>> await learner.fit(10)
        epoch 1: train_loss 0.52  train_accuracy 0.84  val_loss 0.41  (100 batches, 3.2 s, ...)
        epoch 2 ━━━━━━━━━━━━━━━━━━╸━━━━━━━━  61/100  0:00:02  loss 0.412  1830 samples/s
    """

    reads = frozenset({"epoch", "step", "batch_index", "batch", "loss", "metrics"})

    def __init__(
        self,
        *,
        refresh_interval: float = 0.1,
        log_interval: float = 10.0,
        display: Display = "auto",
        plain: bool | None = None,
        file: TextIO | None = None,
        console: Any = None,
    ) -> None:
        who = "ProgressBar"
        for what, value in (("refresh_interval", refresh_interval), ("log_interval", log_interval)):
            real(who, what, value, low=0, low_open=True, hint="in seconds")
        self.refresh_interval = float(refresh_interval)
        self.log_interval = float(log_interval)
        if display not in ("auto", "notebook", "rich", "plain"):
            raise ValueError(
                f"{who}: display must be auto, notebook, rich or plain, got {display!r}"
            )
        self._file = None if file is None else text_stream(who, "file", file)
        self._console = console
        if plain is not None:
            display = "plain" if plain else "rich"
        if display == "auto":
            out = file if file is not None else sys.stdout
            if console is not None:
                display = "rich"
            elif file is None and _in_jupyter():
                display = "notebook"
            elif hasattr(out, "isatty") and out.isatty():
                display = "rich"
            else:
                display = "plain"
        #: The display in use: ``"notebook"``, ``"rich"`` or ``"plain"``.
        self.display: Display = display
        self.plain = display == "plain"
        if display == "rich":
            require("rich.progress", extra="rich", what="ProgressBar")
        elif display == "notebook":
            require("IPython.display", extra="notebook", what="ProgressBar's notebook display")
        self._handle: Any = None  # the IPython display handle (notebook display)
        self._progress: Any = None
        self._task: Any = None
        self._stop: anyio.Event | None = None
        self._total: int | None = None
        self._epoch = 0
        self._batches = 0
        self._samples = 0
        self._started = 0.0
        # The training pass's (batches, seconds, samples/s) by epoch, until its line is made.
        self._passes: dict[int, tuple[int, float, float]] = {}
        self._loss: torch.Tensor | None = None
        self._last_line = 0.0
        self._dirty = False
        self._live = False
        self._new_epoch = False
        self._finished = False
        self._render_lock = threading.Lock()
        # Set to wake the renderer before its next tick (an epoch ended, or the run).
        self._nudge: anyio.Event | None = None
        self._loop_thread: int | None = None
        # Lines waiting for the renderer (hooks append, the render thread pops).
        self._lines: deque[str] = deque()
        # Whether this process shows anything: rank 0 only under torch.distributed.
        self._active = True

    @property
    def file(self) -> TextIO:
        return self._file if self._file is not None else sys.stdout

    # -- hooks (cheap: counters only) ------------------------------------------------------------

    def before_fit_run(self, state: StateView) -> None:
        """Start the renderer (on rank 0 only, under torch.distributed)."""
        self._active = is_rank_zero()
        if not self._active:
            return
        if self._console is None and getattr(self.file, "closed", False):
            # Here, not at the first line written (an epoch into the run, from a worker thread).
            raise ValueError(
                f"ProgressBar: its file {self.file!r} is closed: give an open text stream, such"
                " as sys.stderr or open(path, 'w'), kept open while the run lasts"
            )
        self._stop = anyio.Event()
        self._nudge = anyio.Event()
        self._loop_thread = threading.get_ident()
        self._finished = False
        self._handle = None
        if self.display == "rich":
            rp = require("rich.progress", extra="rich", what="ProgressBar")
            self._progress = rp.Progress(
                rp.TextColumn("{task.description}"),
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                rp.TimeElapsedColumn(),
                rp.TextColumn("{task.fields[info]}"),
                console=self._console or self._make_console(),
                auto_refresh=False,
            )
            self._task = self._progress.add_task("", total=None, info="")
            self._live = False
        state.start_soon(self._render_loop, name="ProgressBar.render")

    def _make_console(self) -> Any:
        console_mod = require("rich.console", extra="rich", what="ProgressBar")
        return console_mod.Console(file=self._file)

    def before_epoch(self, state: StateView) -> None:
        """Start counting an epoch."""
        if not self._active:
            return
        self._epoch = state.epoch
        self._batches = state.batch_index
        self._samples = 0
        self._loss = None
        self._started = self._last_line = time.perf_counter()
        self._dirty = True
        self._new_epoch = True  # the renderer restarts the bar's clock (resetting draws)

    def after_fit_batch(self, state: StateView) -> None:
        """Note the batch (the loss stays a tensor until the next render)."""
        if not self._active:
            return
        self._batches = state.batch_index
        self._samples += batch_size(state.batch)
        if state.is_valid("loss"):
            self._loss = state.loss.detach()
        self._dirty = True

    def after_fit(self, state: StateView) -> None:
        """Learn how many batches an epoch has; keep the training pass's figures for the
        epoch's line (with concurrent validation, after_epoch comes while the next epoch
        trains)."""
        if not self._active:
            return
        if self._total is None or state.batch_index > self._total:
            self._total = state.batch_index
        self._passes[state.epoch] = (
            self._batches,
            time.perf_counter() - self._started,
            self._throughput(),
        )

    def after_epoch(self, state: StateView) -> None:
        """Queue the epoch's line (metrics and throughput) for the renderer."""
        if not self._active:
            return
        self._lines.append(self._epoch_line(state))
        self._dirty = True
        self._wake()

    async def after_fit_run(self, state: StateView) -> None:
        """Stop the renderer; draw the final state and the lines still queued."""
        if not self._active:
            return
        if self._stop is not None:
            self._stop.set()
            self._wake()
        await anyio.to_thread.run_sync(self._finish)

    # -- rendering (in the background task) ------------------------------------------------------

    def _wake(self) -> None:
        # anyio events are set from the event loop's thread only; elsewhere (a hook run in the
        # compute worker) the renderer's next tick comes soon enough.
        if self._nudge is not None and threading.get_ident() == self._loop_thread:
            self._nudge.set()

    def _throughput(self) -> float:
        elapsed = time.perf_counter() - self._started
        return self._samples / elapsed if elapsed > 0 else 0.0

    def _info(self) -> str:
        parts = []
        if self._loss is not None:
            parts.append(f"loss {float(self._loss):.4g}")
        parts.append(f"{self._throughput():.0f} samples/s")
        return "  ".join(parts)

    def _epoch_line(self, state: StateView) -> str:
        metrics = "  ".join(
            f"{k} {_fmt(v)}"
            for k, v in state.metrics.items()
            if isinstance(v, int | float) or (isinstance(v, torch.Tensor) and v.numel() == 1)
        )
        batches, elapsed, rate = self._passes.pop(
            state.epoch, (self._batches, time.perf_counter() - self._started, self._throughput())
        )
        return (
            f"epoch {state.epoch + 1}: {metrics}  ({batches} batches, {elapsed:.1f} s,"
            f" {rate:.0f} samples/s)"
        )

    # Everything below writes to the terminal or file: it runs in a worker thread, so a slow
    # terminal or pipe never blocks the event loop (rich's Progress is thread-safe).

    def _print_lines(self) -> None:
        lines = self._lines
        while lines:
            line = lines.popleft()
            if self._progress is not None:
                self._progress.console.print(line, highlight=False)
            else:
                print(line, file=self.file, flush=True)

    def _bundle(self) -> dict[str, str]:
        """The notebook display: an HTML progress bar, and a text form for plain frontends."""
        total = self._total
        done = self._batches
        count = f"{done}/{total}" if total else f"{done}"
        elapsed = time.perf_counter() - self._started if self._started else 0.0
        text = f"epoch {self._epoch + 1}  {count}  {elapsed:.1f}s  {self._info()}"
        bar = (
            f'<progress value="{done}" max="{total}" style="width: 20em"></progress>'
            if total
            else '<progress style="width: 20em"></progress>'  # indeterminate: first epoch
        )
        return {
            "text/plain": text,
            "text/html": f"<div>{bar} <code>{html.escape(text)}</code></div>",
        }

    def _render_notebook(self) -> None:
        ipy_display = require("IPython.display", extra="notebook", what="ProgressBar")
        bundle = self._bundle()
        if self._handle is None:
            self._handle = ipy_display.display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)

    def _render(self) -> None:
        # One renderer at a time: the final render of after_fit_run may start while the
        # background one is still drawing.
        with self._render_lock:
            if not self._finished:
                self._render_locked()

    def _render_locked(self) -> None:
        if self.display == "notebook":
            # The bar first, so that it stays above the epoch lines printed under it.
            self._render_notebook()
            self._print_lines()
            return
        self._print_lines()
        progress = self._progress
        if progress is None:
            now = time.perf_counter()
            if now - self._last_line >= self.log_interval and self._batches:
                self._last_line = now
                total = f"/{self._total}" if self._total else ""
                print(
                    f"epoch {self._epoch + 1} batch {self._batches}{total}  {self._info()}",
                    file=self.file,
                    flush=True,
                )
            return
        if not self._live:
            progress.start()
            self._live = True
        description = f"epoch {self._epoch + 1}"
        if self._new_epoch:
            self._new_epoch = False
            # Reset and relabel in one step: reset() draws, and a frame with the new epoch's
            # count under the old epoch's label would show the bar an epoch behind.
            progress.reset(
                self._task,
                total=self._total,
                completed=self._batches,
                description=description,
                info=self._info(),
            )
        progress.update(
            self._task,
            description=description,
            completed=self._batches,
            total=self._total,
            info=self._info(),
        )
        progress.refresh()

    def _finish(self) -> None:
        with self._render_lock:
            if self._progress is not None:
                self._render_locked()
                self._progress.stop()
                self._progress = None
            elif self.display == "notebook":
                self._render_locked()
            else:
                self._print_lines()
            self._finished = True

    async def _render_loop(self) -> None:
        stop = self._stop
        assert stop is not None
        while not stop.is_set():
            nudge = self._nudge
            assert nudge is not None
            with anyio.move_on_after(self.refresh_interval):
                await nudge.wait()
            if nudge.is_set():
                self._nudge = anyio.Event()
            if stop.is_set() or not self._dirty:
                continue
            self._dirty = False
            await anyio.to_thread.run_sync(self._render)
