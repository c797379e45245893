"""Profiler: traces of the chosen steps, written off the event loop, readable as Chrome traces."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from aiolearner import Callback, Learner, StateView
from aiolearner.callbacks import Profiler, _files, _profiler
from aiolearner.testing import make_batches, tiny_model


class Mark(torch.nn.Module):
    """The tiny model, with each forward pass labelled by the step it belongs to."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function(f"forward@{self.step}"):
            out: torch.Tensor = self.model(x)
        return out


class StepLabel(Callback):
    """Tells Mark which step runs (before the batch, on the batch's thread)."""

    reads = frozenset({"step"})

    def __init__(self, mark: Mark) -> None:
        self.mark = mark

    def before_fit_batch(self, state: StateView) -> None:
        self.mark.step = state.step


def build(profiler: Profiler, *extra: Callback, **options: Any) -> Learner[Any]:
    """4 training batches an epoch, no validation; forward passes labelled with their step."""
    mark = Mark(tiny_model())
    learner: Learner[Any] = Learner(
        mark,
        torch.optim.SGD(mark.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        make_batches(4),
        callbacks=[profiler, StepLabel(mark), *extra],
        **options,
    )
    return learner


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def events(path: Path) -> set[str]:
    data = json.loads(path.read_text())
    return {e["name"] for e in data["traceEvents"] if "name" in e}


def forwards(path: Path) -> list[int]:
    return sorted(int(n.split("@")[1]) for n in events(path) if n.startswith("forward@"))


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_schedule_records_the_chosen_steps(tmp_path: Path, compute: str) -> None:
    profiler = Profiler(tmp_path, wait=1, warmup=1, active=2, worker_name="w")
    learner = build(profiler, compute=compute)
    await learner.fit(2)  # steps 0..7
    assert profiler.traces == [tmp_path / "w.00000002.pt.trace.json"]
    assert names(tmp_path) == ["w.00000002.pt.trace.json"]
    seen = events(profiler.traces[0])
    # The recorded steps' forward passes, wherever they ran (loop or compute worker), and
    # nothing of the other steps.
    assert forwards(profiler.traces[0]) == [2, 3]
    assert len({n for n in seen if n.startswith("ProfilerStep#")}) == 2
    assert {"aten::addmm", "Optimizer.step#SGD.step"} <= seen
    assert not torch._C._autograd._profiler_enabled()


async def test_repeated_windows_and_a_step_range(tmp_path: Path) -> None:
    repeated = Profiler(tmp_path / "a", wait=0, warmup=1, active=1, repeat=3, worker_name="w")
    learner = build(repeated)
    await learner.fit(2)
    assert [p.name for p in repeated.traces] == [
        "w.00000001.pt.trace.json",
        "w.00000003.pt.trace.json",
        "w.00000005.pt.trace.json",
    ]
    assert [forwards(p) for p in repeated.traces] == [[1], [3], [5]]
    exact = Profiler(tmp_path / "b", steps=range(5, 8), worker_name="w")
    learner = build(exact)
    await learner.fit(3)
    assert [p.name for p in exact.traces] == ["w.00000005.pt.trace.json"]
    assert forwards(exact.traces[0]) == [5, 6, 7]


async def test_steps_are_the_learners_across_fit_calls(tmp_path: Path) -> None:
    profiler = Profiler(tmp_path, steps=range(5, 7), worker_name="w")
    learner = build(profiler)
    await learner.fit(1)  # steps 0..3: nothing recorded yet
    assert profiler.traces == []
    await learner.fit(2)  # steps 4..7
    assert [p.name for p in profiler.traces] == ["w.00000005.pt.trace.json"]
    assert forwards(profiler.traces[0]) == [5, 6]


async def test_a_window_cut_by_a_cancellation_is_still_written(tmp_path: Path) -> None:
    class CancelAt(Callback):
        reads = frozenset({"step"})

        def __init__(self, scope: anyio.CancelScope) -> None:
            self.scope = scope

        async def after_fit_batch(self, state: StateView) -> None:
            if state.step == 3:
                self.scope.cancel()

    profiler = Profiler(tmp_path, steps=range(1, 6), worker_name="w")
    with anyio.CancelScope() as scope:
        learner = build(profiler, CancelAt(scope))
        await learner.fit(2)
    assert scope.cancelled_caught
    assert [p.name for p in profiler.traces] == ["w.00000001.pt.trace.json"]
    # The steps up to the cancellation (which lands at the next await, maybe a batch later).
    recorded = forwards(profiler.traces[0])
    assert recorded[:2] == [1, 2]
    assert recorded[-1] < 5
    assert not torch._C._autograd._profiler_enabled()


async def test_traces_are_written_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    writers: list[int] = []
    real = _files.atomic_write_file

    def spy(path: Path, write: Any) -> None:
        writers.append(threading.get_ident())
        real(path, write)

    monkeypatch.setattr(_profiler, "atomic_write_file", spy)
    profiler = Profiler(tmp_path, wait=0, warmup=0, active=1, repeat=2, worker_name="w")
    await build(profiler, compute="inline").fit(1)
    assert len(writers) == 2
    assert loop_thread not in writers
    # Atomic: no temporary file is left behind.
    assert names(tmp_path) == [
        "w.00000000.pt.trace.json",
        "w.00000001.pt.trace.json",
    ]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="either steps= or wait, active"):
        Profiler("d", steps=range(3), wait=1, active=2)
    with pytest.raises(ValueError, match="non-empty range with step 1"):
        Profiler("d", steps=range(3, 3))
    with pytest.raises(ValueError, match="non-empty range with step 1"):
        Profiler("d", steps=range(0, 10, 2))
    with pytest.raises(ValueError, match="must not be negative"):
        Profiler("d", steps=range(-2, 3))
    with pytest.raises(ValueError, match="warmup must be a non-negative int"):
        Profiler("d", warmup=-1)
    with pytest.raises(ValueError, match="active must be at least 1"):
        Profiler("d", active=0)
    with pytest.raises(ValueError, match="worker_name must be a plain file name"):
        Profiler("d", worker_name="../x")


async def test_an_error_mid_window_stops_the_profiler_and_keeps_the_trace(
    tmp_path: Path,
) -> None:
    class Fail(Callback):
        reads = frozenset({"step"})

        def after_fit_batch(self, state: StateView) -> None:
            if state.step == 3:
                raise RuntimeError("boom")

    profiler = Profiler(tmp_path, steps=range(1, 6), worker_name="w")
    learner = build(profiler, Fail())
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(2)
    assert info.group_contains(RuntimeError, match="boom")
    assert not torch._C._autograd._profiler_enabled()
    assert [p.name for p in profiler.traces] == ["w.00000001.pt.trace.json"]
    assert forwards(profiler.traces[0])[:2] == [1, 2]
    # The profiler is usable again afterwards.
    again = Profiler(tmp_path / "again", steps=range(0, 1), worker_name="w")
    await build(again).fit(1)
    assert forwards(again.traces[0]) == [0]
