"""Each framework's own per-batch work, timed with a step whose torch calls do nothing.

Run::

    .venv/bin/python -m bench.framework_only          # needs the `bench` extra for Ignite
    .venv/bin/python -m bench.framework_only --reps 41

``bench/overhead.py``'s null row times a real near-null step (one Linear 4->2, batch 2), where
the framework's few microseconds sit beside a raw step of 150-250 us here whose own time moves by
more than that between runs, and where any Python run between two steps slows the next torch calls
too (the interpreter and torch share the caches; docs/performance.md). This script keeps the
framework's code and takes the torch work away: the model returns its input, the loss function
returns a loss whose ``backward`` does nothing, the optimizer's ``step`` and ``zero_grad`` do
nothing. What is left between two batch requests is the loop itself: the raw loop's few
bytecodes, Ignite's bare ``Engine(process_function)`` with its events, and aiolearner's batch
executor (default settings: ``compute="auto"``, on asyncio and on trio, and ``inline``). The
variants run interleaved, in a rotated order; overheads are medians of per-repetition
differences with the raw loop of the same repetition, and the ratio to the bare Engine comes with
a bootstrap interval.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from aiolearner import Learner
from bench._common import StampedData, machine, median, raw_step, table
from bench.overhead import ratio_interval

Batch = tuple[torch.Tensor, torch.Tensor]
#: What the no-op loss gives to keep (aiolearner keeps each batch's loss for ``train_loss``).
ZERO = torch.zeros(())


class NoOpLoss:
    """A loss whose ``backward`` does nothing."""

    def backward(self) -> None:
        pass

    def detach(self) -> torch.Tensor:
        return ZERO


NO_OP_LOSS = NoOpLoss()


def no_op_loss(output: Any, target: Any) -> Any:
    return NO_OP_LOSS


class Identity(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # an optimizer needs a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class NoOpSGD(torch.optim.SGD):
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


def _setup() -> tuple[Identity, NoOpSGD]:
    model = Identity()
    return model, NoOpSGD(model.parameters(), lr=0.1)


def run_raw(data: list[Batch], skip: int) -> float:
    model, optimizer = _setup()
    stamped = StampedData(data, time.perf_counter)
    for x, y in stamped:
        raw_step(model, optimizer, no_op_loss, x, y)
    return stamped.per_step(skip)


def run_ignite_bare(data: list[Batch], skip: int) -> float:
    from ignite.engine import Engine

    model, optimizer = _setup()
    stamped = StampedData(data, time.perf_counter)

    def process(engine: Any, batch: Batch) -> float:
        raw_step(model, optimizer, no_op_loss, batch[0], batch[1])
        return 0.0

    Engine(process).run(stamped, max_epochs=1)
    return stamped.per_step(skip)


def aiolearner_runner(compute: Any, backend: Any) -> Callable[[list[Batch], int], float]:
    def run(data: list[Batch], skip: int) -> float:
        model, optimizer = _setup()
        stamped = StampedData(data, time.perf_counter)
        learner: Learner[Batch] = Learner(model, optimizer, no_op_loss, stamped, compute=compute)
        learner.fit_sync(1, backend=backend)
        return stamped.per_step(skip)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=25)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    variants: dict[str, Callable[[list[Batch], int], float]] = {
        "raw loop": run_raw,
        "aiolearner auto (default)": aiolearner_runner("auto", "asyncio"),
        "aiolearner auto, trio": aiolearner_runner("auto", "trio"),
        "aiolearner inline": aiolearner_runner("inline", "asyncio"),
        "Ignite bare Engine": run_ignite_bare,
    }
    x, y = torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
    data = [(x, y)] * args.steps
    skip = max(2, args.steps // 20)
    for run in variants.values():  # warm up
        run(data[:100], 5)
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for rep in range(args.reps):
        for name, run in order[rep % len(order) :] + order[: rep % len(order)]:
            times[name].append(run(data, skip))
    raw_times = times["raw loop"]
    diffs = {
        name: [t - r for t, r in zip(ts, raw_times, strict=True)] for name, ts in times.items()
    }
    bare = diffs["Ignite bare Engine"]
    rows = []
    for name, ts in times.items():
        row = [name, f"{median(ts) * 1e6:.2f}", f"{median(diffs[name]) * 1e6:+.2f}"]
        if name.startswith("aiolearner"):
            low, high = ratio_interval(diffs[name], bare)
            row.append(f"{median(diffs[name]) / median(bare):.3f} ({low:.3f}-{high:.3f})")
        else:
            row.append("-")
        rows.append(row)
    print(f"machine: {machine()}")
    print(
        f"no-op step: {args.steps} steps (timed {args.steps - 2 * skip}), {args.reps} interleaved "
        "repetitions, medians"
    )
    print(
        table(
            [
                "variant",
                "us/step",
                "overhead us/step",
                "overhead / bare Engine's (90% bootstrap interval)",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
