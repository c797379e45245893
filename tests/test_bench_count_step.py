"""``bench/count_step.py`` runs what its docstring says: one epoch of the given number of
batches, each a training step, so the difference of two counts over the difference of lengths
is one step."""

from __future__ import annotations

import math

from bench import count_step


def test_the_counted_run_takes_one_step_a_batch() -> None:
    steps, loss = count_step.run(7)
    assert steps == 7
    assert math.isfinite(loss)
