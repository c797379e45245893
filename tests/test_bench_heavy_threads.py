"""``bench/heavy_threads.py``'s measurements: a pair (seconds, faults) a step for every variant
and repetition, read between the forwards both set-ups stamp. (Timings are the script's
business; this checks only what it reads them from, on a small model.)"""

from __future__ import annotations

import pytest
import torch

from bench import heavy_threads
from bench._common import make_data


@pytest.mark.parametrize("setup", ["fresh", "kept"])
def test_every_variant_is_measured_once_a_repetition(
    setup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(heavy_threads, "SIZES", [4, 2])
    results = heavy_threads.measure(setup, 2, make_data(10, 2, 4, 2, seed=1))
    assert set(results) == set(heavy_threads.VARIANTS)
    for pairs in results.values():
        assert len(pairs) == 2
        assert all(seconds > 0 and faults >= 0 for seconds, faults in pairs)


def test_a_stamped_model_reads_the_faults_with_each_forward() -> None:
    model = heavy_threads.Stamped(torch.nn.Linear(4, 2))
    for _ in range(6):
        model(torch.zeros(1, 4))
    assert len(model.stamps) == len(model.faults) == 6
    seconds, faults = model.measured(1, 1)  # (from the forward of step 2 to that of step 4)
    assert seconds == pytest.approx((model.stamps[4] - model.stamps[2]) / 2)
    assert faults == (model.faults[4] - model.faults[2]) / 2
