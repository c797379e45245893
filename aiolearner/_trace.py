"""Trace mode: a record of every stage and hook entry and exit, and every state write."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["Trace", "TraceRecord"]

TraceKind = Literal["enter", "exit", "write", "control"]


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One thing that happened during a run.

    Attributes:
        kind: ``"enter"``/``"exit"`` of a stage or of a callback's hook, ``"write"`` of a state
            field, ``"control"`` when a stage acts on StopFit/StopEpoch/SkipBatch.
        name: the stage name (``"fit_batch"``), the callback name, or who wrote (``"stage"`` for
            stage code).
        hook: the hook (for callback entries), else ``None``.
        field: the field written (for writes) or the control-flow exception's name.
        epoch: the epoch counter at that time.
        step: the step counter at that time.
        time: ``time.perf_counter()`` at that time.
        duration: for ``"exit"``, seconds since the matching ``"enter"``.
    """

    kind: TraceKind
    name: str
    hook: str | None = None
    field: str | None = None
    epoch: int | None = None
    step: int | None = None
    time: float = 0.0
    duration: float | None = None


class Trace:
    """The records of a learner built with ``trace=True`` (``learner.trace``), oldest first.

    Attributes:
        records: the :class:`TraceRecord` list itself (also iterated by ``for r in trace``).
    """

    def __init__(self) -> None:
        self.records: list[TraceRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[TraceRecord]:
        return iter(self.records)

    def clear(self) -> None:
        """Forget every record."""
        self.records.clear()

    def enter(self, name: str, hook: str | None, epoch: int | None, step: int | None) -> float:
        t = time.perf_counter()
        self.records.append(TraceRecord("enter", name, hook, None, epoch, step, t))
        return t

    def exit(
        self, name: str, hook: str | None, epoch: int | None, step: int | None, start: float
    ) -> None:
        t = time.perf_counter()
        self.records.append(TraceRecord("exit", name, hook, None, epoch, step, t, t - start))

    def write(self, who: str, field: str, epoch: int | None, step: int | None) -> None:
        self.records.append(
            TraceRecord("write", who, None, field, epoch, step, time.perf_counter())
        )

    def control(self, stage: str, exc_name: str, epoch: int | None, step: int | None) -> None:
        self.records.append(
            TraceRecord("control", stage, None, exc_name, epoch, step, time.perf_counter())
        )

    def writes(self, field: str | None = None) -> list[TraceRecord]:
        """The write records, of one field if given."""
        return [
            r for r in self.records if r.kind == "write" and (field is None or r.field == field)
        ]

    def sequence(self, *, hooks: bool = True) -> list[str]:
        """Entries as ``"enter:fit_batch"`` / ``"hook:after_gradient:Name"`` strings, in order."""
        out = []
        for r in self.records:
            if r.kind == "enter":
                if r.hook is None:
                    out.append(f"enter:{r.name}")
                elif hooks:
                    out.append(f"hook:{r.hook}:{r.name}")
            elif r.kind == "exit" and r.hook is None:
                out.append(f"exit:{r.name}")
        return out

    def durations(self) -> dict[str, list[float]]:
        """Seconds spent in each stage (and each ``callback.hook``), per entry."""
        out: dict[str, list[float]] = {}
        for r in self.records:
            if r.kind == "exit" and r.duration is not None:
                key = r.name if r.hook is None else f"{r.name}.{r.hook}"
                out.setdefault(key, []).append(r.duration)
        return out
