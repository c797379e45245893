"""Throughput and timing: samples per second, time per stage, data wait versus compute.

:class:`Throughput` times the training loop with its own clocks on hooks (a ``perf_counter``
read per hook: no host sync, and its hooks are ``def`` so the batch stays fused). A learner
built with ``trace=True`` records every stage's enter and exit anyway; :func:`stage_times`
summarizes that trace per stage.

What the numbers mean, per training pass:

* ``compute``: from ``before_fit_batch`` to ``after_fit_batch`` (forward, backward, update and
  the batch's hooks; on CUDA, the time to *queue* the work unless something syncs);
* ``data_wait``: from the end of one batch to the start of the next (fetching the batch, moving
  it to the device, and whatever else the loop does between batches);
* ``seconds``: the whole pass, so ``seconds - compute - data_wait`` is the pass's own overhead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aiolearner import Callback, StateView, Trace, batch_size

from ._args import function

__all__ = ["Throughput", "stage_times"]


def stage_times(trace: Trace) -> dict[str, dict[str, float]]:
    """Per stage (and per ``callback.hook``) of a trace: ``count``, ``total``, ``mean`` seconds.

    Also ``"data_wait"``: in each training pass, the time from its start or the end of a batch to
    the start of the next batch (the batch's fetch, its move to the device, the loop between
    batches), one entry per batch.

    Example:
        >>> learner = Learner(..., trace=True)
        >>> await learner.fit(1)
        >>> stage_times(learner.trace)["fit_batch"]["mean"]
    """
    durations = trace.durations()
    waits: list[float] = []
    mark: float | None = None  # when the loop started waiting for the next batch
    for r in trace.records:
        if r.hook is not None or r.name not in ("fit", "fit_batch"):
            continue
        if r.kind == "enter" and r.name == "fit":
            mark = r.time
        elif r.kind == "enter" and mark is not None:
            waits.append(r.time - mark)
            mark = None
        elif r.kind == "exit" and r.name == "fit_batch":
            mark = r.time
        elif r.kind == "exit":
            mark = None
    if waits:
        durations["data_wait"] = waits
    out: dict[str, dict[str, float]] = {}
    for name, values in durations.items():
        total = sum(values)
        out[name] = {"count": len(values), "total": total, "mean": total / len(values)}
    return out


class Throughput(Callback):
    """Measure samples per second and where the time of each epoch goes.

    After each epoch, :attr:`epochs` gets a dict with ``epoch``, ``batches``, ``samples``,
    ``seconds`` (training pass), ``samples_per_sec``, ``compute``, ``data_wait``,
    ``validate_seconds`` and ``epoch_seconds``; :meth:`summary` adds them up. It writes nothing to
    the state (so it never conflicts with metric callbacks); :meth:`report` formats it.

    With concurrent validation an epoch's ``after_epoch`` comes while the next epoch trains: its
    figures are kept by epoch until then.

    Args:
        clock: a function returning seconds (default ``time.perf_counter``); tests inject a
            fake.

    Raises:
        TypeError: a ``clock`` that is not a function.

    Reads ``batch`` and ``epoch``; writes nothing.

    Example:
        >>> speed = Throughput()
        >>> learner = Learner(..., callbacks=[speed], trace=True)
        >>> await learner.fit(3)
        >>> speed.epochs[-1]["samples_per_sec"]
        >>> print(speed.report(learner.trace))   # with per-stage times from the trace
    """

    reads = frozenset({"batch", "epoch"})

    def __init__(self, *, clock: Any = time.perf_counter) -> None:
        self.clock = function(
            "Throughput", "clock", clock, "clock() -> seconds, such as time.perf_counter"
        )
        #: One dict per epoch (see the class docstring).
        self.epochs: list[dict[str, float]] = []
        self._reset_pass()
        self._validate_start = 0.0
        # By epoch, until its after_epoch: when it started, its training pass's figures, and
        # its validations' time.
        self._epoch_start: dict[int, float] = {}
        self._passes: dict[int, dict[str, float]] = {}
        self._validate_seconds: dict[int, float] = {}

    def _reset_pass(self) -> None:
        self._pass_start = 0.0
        self._last_end = 0.0
        self._batch_start = 0.0
        self._in_batch = False
        self._compute = 0.0
        self._wait = 0.0
        self._samples = 0
        self._batches = 0
        self._pass_seconds = 0.0

    # -- hooks ----------------------------------------------------------------------------------

    def before_epoch(self, state: StateView) -> None:
        """Start the epoch's clocks."""
        self._epoch_start.setdefault(state.epoch, self.clock())
        self._reset_pass()

    def before_fit(self, state: StateView) -> None:
        """Start the pass's clock."""
        now = self.clock()
        self._pass_start = self._last_end = now

    def before_fit_batch(self, state: StateView) -> None:
        """End the wait for this batch; start its compute."""
        now = self.clock()
        if self._in_batch:
            # The previous batch was skipped (no after_fit_batch): its time was compute.
            self._compute += now - self._batch_start
        else:
            self._wait += now - self._last_end
        self._batch_start = now
        self._in_batch = True

    def after_fit_batch(self, state: StateView) -> None:
        """End the batch's compute; count its samples."""
        now = self.clock()
        self._compute += now - self._batch_start
        self._last_end = now
        self._in_batch = False
        self._samples += batch_size(state.batch)
        self._batches += 1

    def after_fit(self, state: StateView) -> None:
        """End the pass."""
        now = self.clock()
        if self._in_batch:
            self._compute += now - self._batch_start
            self._in_batch = False
        self._pass_seconds = now - self._pass_start
        self._passes[state.epoch] = self._pass_figures()

    def before_validate(self, state: StateView) -> None:
        """Start the validation clock."""
        self._validate_start = self.clock()

    def after_validate(self, state: StateView) -> None:
        """Stop the validation clock."""
        seconds = self.clock() - self._validate_start
        epoch = state.epoch
        self._validate_seconds[epoch] = self._validate_seconds.get(epoch, 0.0) + seconds

    def after_epoch(self, state: StateView) -> None:
        """Record the epoch."""
        epoch = state.epoch
        figures = self._passes.pop(epoch, None) or self._pass_figures()
        start = self._epoch_start.pop(epoch, self.clock())
        self.epochs.append(
            {
                "epoch": float(epoch),
                **figures,
                "validate_seconds": self._validate_seconds.pop(epoch, 0.0),
                "epoch_seconds": self.clock() - start,
            }
        )

    def _pass_figures(self) -> dict[str, float]:
        seconds = self._pass_seconds
        return {
            "batches": float(self._batches),
            "samples": float(self._samples),
            "seconds": seconds,
            "samples_per_sec": self._samples / seconds if seconds > 0 else 0.0,
            "compute": self._compute,
            "data_wait": self._wait,
        }

    # -- results --------------------------------------------------------------------------------

    def summary(self) -> dict[str, float]:
        """The epochs added up (``samples_per_sec`` over all training passes)."""
        keys = ("batches", "samples", "seconds", "compute", "data_wait", "validate_seconds")
        total = {k: sum(e[k] for e in self.epochs) for k in keys}
        total["epochs"] = float(len(self.epochs))
        seconds = total["seconds"]
        total["samples_per_sec"] = total["samples"] / seconds if seconds > 0 else 0.0
        return total

    def report(self, trace: Trace | None = None) -> str:
        """A readable summary; with a learner's ``trace``, also the time per stage."""
        s = self.summary()
        lines = [
            f"{s['epochs']:.0f} epochs, {s['samples']:.0f} samples in {s['seconds']:.3f} s of"
            f" training: {s['samples_per_sec']:.1f} samples/s",
            f"  compute {s['compute']:.3f} s, data wait {s['data_wait']:.3f} s,"
            f" validation {s['validate_seconds']:.3f} s",
        ]
        if trace is not None:
            lines.append("  per stage (from the trace):")
            for name, t in sorted(stage_times(trace).items(), key=lambda kv: -kv[1]["total"]):
                lines.append(
                    f"    {name:<32} {t['count']:>7.0f} x {t['mean'] * 1e6:>10.1f} us"
                    f" = {t['total']:.4f} s"
                )
        return "\n".join(lines)

    def state_dict(self) -> Mapping[str, Any]:
        return {"epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epochs = [{k: float(v) for k, v in e.items()} for e in state.get("epochs", [])]
