"""What the tiny model's overhead is made of: the framework's own work, and its effect on torch.

Run::

    .venv/bin/python -m bench.interference

Two measurements, interleaved repetitions, medians:

1. **Null step.** ``fit`` over 20,000 batches with Gradient and Update replaced by stages that do
   no torch work (the batch is unpacked, a constant loss kept, the batch committed): what the
   framework's per-batch work costs on its own.
2. **Python between torch steps.** The raw tiny-MLP loop (32-64-10, batch 64, SGD), and the same
   loop with ``k`` rounds of plain Python (attribute and dict operations) after each step, for a
   few ``k``; next to it, what those rounds cost alone in a tight loop. When a round costs more
   between torch steps than alone, the Python work is slowing the torch calls around it.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from aiolearner import ComputeStage, Learner
from bench._common import StampedData, machine, make_data, make_mlp, median, raw_step, table

LOSS = torch.nn.functional.cross_entropy


class _NullGradient(ComputeStage):
    name = "gradient"
    _loss = torch.tensor(1.0)

    def compute(self, state: Any) -> None:
        inputs, _ = state.batch
        state.output = inputs
        state.loss = self._loss


class _NullUpdate(ComputeStage):
    name = "update"
    writes_weights = True

    def compute(self, state: Any) -> None:
        self.context.commit(state)


def null_step(n: int) -> float:
    x = torch.zeros(2)
    data = [(x, x)] * n
    model = torch.nn.Linear(2, 2)
    stamped = StampedData(data, time.perf_counter)
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        torch.nn.functional.mse_loss,
        stamped,
        stages={"gradient": _NullGradient(), "update": _NullUpdate()},
        compute="inline",
    )
    learner.fit_sync(1)
    return stamped.per_step(n // 20)


class _Box:
    value = 0


def python_work(rounds: int) -> None:
    box, d = _Box(), {}
    for i in range(rounds):
        box.value = i
        d["x"] = box.value
        d.pop("x")


def raw_with_python(data: list[Any], rounds: int) -> float:
    model = make_mlp([32, 64, 10], seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stamped = StampedData(data, time.perf_counter)
    for x, y in stamped:
        raw_step(model, optimizer, LOSS, x, y)
        if rounds:
            python_work(rounds)
    return stamped.per_step(len(data) // 20)


def python_alone(rounds: int, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        python_work(rounds)
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--rounds", default="0,20,60")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")

    nulls = [null_step(20_000) for _ in range(args.reps)]
    print(f"\nnull step: {median(nulls) * 1e6:.2f} us a batch (median of {args.reps})")

    data = make_data(1000, 64, 32, 10, seed=1)
    rounds = [int(r) for r in args.rounds.split(",")]
    steps: dict[int, list[float]] = {r: [] for r in rounds}
    alone: dict[int, list[float]] = {r: [] for r in rounds}
    for _ in range(args.reps):
        for r in rounds:
            steps[r].append(raw_with_python(data, r))
            alone[r].append(python_alone(r, 900))
    base = steps[rounds[0]]
    rows = []
    for r in rounds:
        added = median([t - b for t, b in zip(steps[r], base, strict=True)])
        cost = median(alone[r])
        rows.append(
            [
                str(r),
                f"{median(steps[r]) * 1e6:.1f}",
                f"{added * 1e6:+.2f}",
                f"{cost * 1e6:.2f}",
                f"{added / cost:.1f}" if r and cost > 0 else "-",
            ]
        )
    print(
        f"\nraw tiny-MLP loop with k rounds of Python after each step "
        f"({args.reps} interleaved repetitions, medians)"
    )
    print(
        table(
            ["k", "us/step", "added us/step", "the rounds alone, us", "added / alone"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
