"""``bench/step_phases.py``'s instrumentation: every variant it times must mark each step's four
points once, in order, or its phases would mix steps. (Timings are the script's business; this
checks only what it reads them from.)"""

from __future__ import annotations

import pytest
import torch

from bench import step_phases
from bench._common import make_data, make_mlp

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
STEPS = 12


def _marked(variant: step_phases.Runner) -> tuple[step_phases.Marks, torch.nn.Module]:
    marks = step_phases.Marks()
    inner = make_mlp([4, 2], seed=0)
    model = step_phases.Marked(inner, marks)
    parts = (
        model,
        step_phases.MarkedSGD(model.parameters(), marks),
        step_phases.marked_loss(marks),
    )
    variant(parts, make_data(STEPS, 2, 4, 2, seed=1))
    return marks, inner


def _check_marks(marks: step_phases.Marks) -> None:
    times = marks.times
    assert len(times) == len(step_phases.MARKS) * STEPS
    assert times == sorted(times)
    phases = marks.phases(skip=2)
    assert set(phases) == set(step_phases.PHASES)
    assert all(value >= 0 for value in phases.values())


@BACKENDS
def test_aiolearner_default_marks_every_step_once_and_trains_as_the_raw_loop(
    backend: str,
) -> None:
    marks, model = _marked(step_phases.aiolearner_runner(backend))  # type: ignore[arg-type]
    _check_marks(marks)
    _, raw_model = _marked(step_phases.run_raw)
    for ours, raw in zip(model.parameters(), raw_model.parameters(), strict=True):
        assert torch.equal(ours, raw)


def test_raw_variants_mark_every_step_once() -> None:
    for variant in (step_phases.run_raw, step_phases.run_raw_keeping_losses):
        marks, _ = _marked(variant)
        _check_marks(marks)


def test_marks_that_are_not_whole_steps_are_refused() -> None:
    marks = step_phases.Marks()
    marks.times.extend(range(len(step_phases.MARKS) * 3 + 1))
    with pytest.raises(RuntimeError, match="not a whole number of steps"):
        marks.phases(skip=0)
