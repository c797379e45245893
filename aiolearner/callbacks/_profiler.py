"""Profiling chosen training steps with ``torch.profiler``; traces TensorBoard and Perfetto read.

Which steps: a ``torch.profiler.schedule`` (skip, wait, warm up, record; repeated) or an exact
range, both counted in the learner's training steps (``state.step``), so that a resumed run
profiles the same steps it would have profiled uninterrupted. A step's interval runs from the
end of the previous training batch to the end of its own, so it includes waiting for the batch
(and a validation pass that ran before it).

Where the work happens: ``torch.profiler`` records per thread unless told otherwise, and a
learner may run a batch on the event loop or in its compute worker thread from one batch to the
next; the profiler is started with ``profile_all_threads`` so both are recorded. Moving between
windows (``profiler.step()``) happens at the end of each batch, where the batch runs; the
finished window is only handed over there. Writing the trace (serializing every event, which
takes long for big windows) happens in a worker thread, in the learner's background task group,
and ``after_fit_run`` waits for the last one: when ``fit`` returns, the files are on disk.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from aiolearner import Callback, StateView

from ._args import named, ready_directory, usable_directory, whole
from ._files import atomic_write_file

__all__ = ["Profiler"]

RECORDING = (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)


def _cycle_schedule(
    *, wait: int, warmup: int, active: int, repeat: int, skip_first: int
) -> Callable[[int], ProfilerAction]:
    """``torch.profiler.schedule``'s cycles (without its warning for ``warmup=0``)."""
    cycle = wait + warmup + active

    def schedule(step: int) -> ProfilerAction:
        if step < skip_first:
            return ProfilerAction.NONE
        step -= skip_first
        if repeat > 0 and step >= repeat * cycle:
            return ProfilerAction.NONE
        phase = step % cycle
        if phase < wait:
            return ProfilerAction.NONE
        if phase < wait + warmup:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD if phase < cycle - 1 else ProfilerAction.RECORD_AND_SAVE

    return schedule


def _range_schedule(steps: range) -> Callable[[int], ProfilerAction]:
    """Warm up one step before ``steps`` (when there is one), record ``steps``, save at the last."""
    first, last = steps[0], steps[-1]

    def schedule(step: int) -> ProfilerAction:
        if step == last:
            return ProfilerAction.RECORD_AND_SAVE
        if first <= step < last:
            return ProfilerAction.RECORD
        if step == first - 1:
            return ProfilerAction.WARMUP
        return ProfilerAction.NONE

    return schedule


def _all_threads_config() -> Any:
    # torch records the threads that started the profiler only, unless asked; the option is
    # recent (an "experimental" config), hence the fallback.
    from torch._C._profiler import _ExperimentalConfig

    try:
        return _ExperimentalConfig(profile_all_threads=True)
    except TypeError:  # pragma: no cover - older torch: the starting thread only
        return None


class Profiler(Callback):
    """Profile chosen training steps with ``torch.profiler`` and write one trace per window.

    Each recorded window becomes ``<directory>/<worker_name>.<first step>.pt.trace.json``, a
    Chrome trace: ``tensorboard --logdir <directory>`` shows it with the PyTorch profiler plugin
    (``pip install torch-tb-profiler``), and https://ui.perfetto.dev opens the file as it is.
    In the trace, ``ProfilerStep#k`` marks the k-th step since the run (this ``fit`` call)
    started; the file name carries the learner's own step number.

    Choose the steps with the ``torch.profiler.schedule`` arguments (``skip_first``, ``wait``,
    ``warmup``, ``active``, ``repeat``), applied to the learner's step count, or with ``steps``,
    a ``range`` of steps recorded in one window (after one warm-up step). Step ``n`` is the
    training batch that starts with ``state.step == n`` (0 is the first batch of training).

    Args:
        directory: where the traces go (created when needed).
        wait: steps to skip at the start of each cycle (after ``skip_first``).
        warmup: steps the profiler runs without recording, before each window.
        active: steps recorded in each window.
        repeat: how many windows (0: one every cycle until training ends).
        skip_first: steps skipped once, before the first cycle.
        steps: record exactly these steps instead (``range(100, 105)``); excludes the above.
        activities: what to record (``torch.profiler.ProfilerActivity``); default the CPU, and
            CUDA when it is available.
        record_shapes, profile_memory, with_stack, with_flops: as for
            ``torch.profiler.profile`` (each makes the trace bigger and the profiled steps
            slower).
        worker_name: the trace files' prefix (default ``<host name>_<process id>``).

    Raises:
        ValueError: bad arguments (a step range that is empty or has a stride, counts that are
            not non-negative ints, ``steps`` with schedule arguments, a name that is not a plain
            file name, a ``directory`` where no file can be written; ``~`` is expanded); when
            the run starts, a ``directory`` that can no longer hold files.

    Only one ``torch.profiler`` may run in a process at a time: do not profile two learners at
    once. Reads ``step``; writes nothing.

    Example:
        >>> profiler = Profiler("runs/profile", wait=5, warmup=1, active=3)
        >>> learner = Learner(model, opt, loss_fn, train, callbacks=[profiler])
        >>> await learner.fit(1)
        >>> profiler.traces
        [PosixPath('runs/profile/host_123.00000006.pt.trace.json')]
    """

    reads = frozenset({"step"})

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        wait: int | None = None,
        warmup: int | None = None,
        active: int | None = None,
        repeat: int | None = None,
        skip_first: int | None = None,
        steps: range | None = None,
        activities: Iterable[ProfilerActivity] | None = None,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        with_flops: bool = False,
        worker_name: str | None = None,
    ) -> None:
        counts = {
            "wait": wait,
            "warmup": warmup,
            "active": active,
            "repeat": repeat,
            "skip_first": skip_first,
        }
        given = [name for name, value in counts.items() if value is not None]
        if steps is not None:
            if given:
                raise ValueError(f"Profiler: pass either steps= or {', '.join(given)}, not both")
            if not isinstance(steps, range) or len(steps) == 0 or steps.step != 1:
                raise ValueError(
                    f"Profiler: steps must be a non-empty range with step 1, got {steps!r}"
                )
            if steps.start < 0:
                raise ValueError(f"Profiler: steps must not be negative, got {steps!r}")
            self._schedule = _range_schedule(steps)
        else:
            defaults = {"wait": 1, "warmup": 1, "active": 3, "repeat": 1, "skip_first": 0}
            values = {name: defaults[name] if v is None else v for name, v in counts.items()}
            values = {name: whole("Profiler", name, v, 0) for name, v in values.items()}
            if values["active"] < 1:
                raise ValueError(
                    f"Profiler: active must be at least 1 (steps recorded in each window), got"
                    f" {values['active']}"
                )
            self._schedule = _cycle_schedule(**values)
        name = worker_name if worker_name is not None else f"{socket.gethostname()}_{os.getpid()}"
        name = named("Profiler", "worker_name", name, "'worker0' (the trace files' prefix)")
        if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
            raise ValueError(f"Profiler: worker_name must be a plain file name, got {name!r}")
        self.directory = usable_directory(directory, "Profiler")
        self.worker_name = name
        if activities is None:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
        self.activities = list(activities)
        self.record_shapes = record_shapes
        self.profile_memory = profile_memory
        self.with_stack = with_stack
        self.with_flops = with_flops
        #: The trace files written so far, in order.
        self.traces: list[Path] = []
        # One torch profiler per window: reusing one across windows makes torch warn (and, with
        # warnings as errors, fail halfway through a transition, which can crash the process).
        self._profiler: torch.profiler.profile | None = None
        self._seen = 0
        self._window: list[int] = []
        # Finished windows waiting to be written: (their profile, their steps). Appended where
        # the batch runs (maybe the compute worker), taken by the writer task on the loop.
        self._ready: deque[tuple[Any, list[int]]] = deque()
        self._lock: anyio.Lock | None = None

    # -- hooks ---------------------------------------------------------------------------------

    async def before_fit_run(self, state: StateView) -> None:
        """Check the directory can still hold traces (it may have gone since), then start
        counting steps (and the profiler, when the first step is in a window)."""
        self._lock = anyio.Lock()
        await anyio.to_thread.run_sync(ready_directory, self.directory, "Profiler", False)
        self._seen = state.step
        self._window = []
        self._begin(state.step)

    def after_fit_batch(self, state: StateView) -> None:
        """Close the step's interval (a ``def`` hook: it keeps the batch fused)."""
        step = state.step
        if step == self._seen:
            return  # a skipped batch: its time counts in the next step's interval
        finished, self._seen = self._seen, step
        action = self._schedule(finished)
        if action in RECORDING:
            self._window.append(finished)
        profiler = self._profiler
        if profiler is not None:
            profiler.step()
            if action is ProfilerAction.RECORD_AND_SAVE:
                self._profiler = None  # its window is over (handed to _on_trace_ready)
        if self._profiler is None:
            self._begin(step)
        if self._ready:
            state.start_soon(self._write_ready, name="Profiler.write")

    async def after_fit_run(self, state: StateView) -> None:
        """Stop the profiler (a window in progress is written as it is) and wait for the files."""
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            # Stopping hands over a window in progress, after a device sync: off the loop.
            await anyio.to_thread.run_sync(profiler.stop)
        await self._write_ready()

    def _begin(self, step: int) -> None:
        """Start a profiler for the window that ``step`` begins (warming up or recording)."""
        schedule = self._schedule
        if schedule(step) not in (ProfilerAction.WARMUP, *RECORDING):
            return
        end = step
        while schedule(end) is not ProfilerAction.RECORD_AND_SAVE:
            end += 1

        def window(k: int) -> ProfilerAction:
            return schedule(step + k) if step + k <= end else ProfilerAction.NONE

        self._profiler = torch.profiler.profile(
            activities=self.activities,
            schedule=window,
            on_trace_ready=self._on_trace_ready,
            experimental_config=_all_threads_config(),
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
            with_flops=self.with_flops,
        )
        self._profiler.start()

    # -- writing -------------------------------------------------------------------------------

    def _on_trace_ready(self, profiler: torch.profiler.profile) -> None:
        # Called by profiler.step() or stop(); the finished window's results stay valid after
        # the profiler moves on (the next window gets a new one).
        window, self._window = self._window, []
        self._ready.append((profiler.profiler, window))

    async def _write_ready(self) -> None:
        if self._lock is None:  # pragma: no cover - before_fit_run always runs first
            self._lock = anyio.Lock()
        async with self._lock:  # in order, one at a time
            while self._ready:
                result, window = self._ready[0]
                path = await anyio.to_thread.run_sync(self._export, result, window)
                self._ready.popleft()
                if path is not None:
                    self.traces.append(path)

    def _export(self, result: Any, window: list[int]) -> Path | None:
        if not window:
            return None  # stopped before the window recorded a step
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.worker_name}.{window[0]:08d}.pt.trace.json"
        atomic_write_file(path, lambda tmp: result.export_chrome_trace(str(tmp)))
        return path
