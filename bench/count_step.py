"""A training run of a given length, to count what one step costs under ``valgrind``.

Run::

    valgrind --tool=callgrind --callgrind-out-file=a.out .venv/bin/python -m bench.count_step 50
    valgrind --tool=callgrind --callgrind-out-file=b.out .venv/bin/python -m bench.count_step 550
    # (instructions of b - instructions of a) / 500 = one step, torch included

The tiny MLP of ``bench/overhead.py`` (32-64-10, batch 64), default settings except two that a
run under callgrind (about 50 times slower) would otherwise change: ``fetch="inline"`` (what
``auto`` keeps for data in memory; a fetch under callgrind exceeds the budget that moves it to a
producer thread) and ``yield_interval=0.05`` (50 x the default, so that a turn spans as many
batches as in a real run). ``fit_sync(1)`` over that many batches. Counts are deterministic for a
given script and length; compare trees with the same two lengths (the collector's share moves
with the length).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from aiolearner import Learner
from bench._common import make_data, make_mlp

SIZES = [32, 64, 10]
BATCH = 64


def run(batches: int) -> tuple[int, float]:
    """Train one epoch of ``batches`` batches; the steps taken and the epoch's training loss."""
    torch.set_num_threads(1)
    model = make_mlp(SIZES, seed=0)
    data = make_data(batches, BATCH, SIZES[0], SIZES[-1], seed=1)
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        torch.nn.functional.cross_entropy,
        data,
        fetch="inline",
        yield_interval=0.05,
    )
    learner.fit_sync(1)
    return learner.state.step, float(learner.state.metrics["train_loss"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("batches", type=int, help="batches in the run")
    args = parser.parse_args()
    steps, loss = run(args.batches)
    print(f"{steps} steps, train_loss {loss:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
