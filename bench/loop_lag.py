"""Event-loop lag while training in an async application, and the training's throughput.

Run::

    .venv/bin/python -m bench.loop_lag

A model whose step takes ~8 ms here (MLP 256->512->512->10, batch 128, SGD) trains for one epoch
inside an asyncio program and inside a trio one, with each compute policy. In the "ticker"
variants a task on the same loop sleeps 1 ms in a loop and records how late it wakes up (the lag a
web handler on that loop would see); in the "alone" variants nothing else runs on the loop. The
reference is the same loop written by hand, with no event loop at all. Throughput is reported as
raw time per step / time per step (1.0 = as fast as the raw loop; higher is better), measured
between the requests of batch ``k`` and ``n - k`` (see ``bench/_common.py``). Variants run
interleaved, repetition after repetition; figures are medians over repetitions, and the lag
percentiles are taken over every tick of every repetition. Every variant's final model must give
the raw loop's loss on a held-out batch, bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import torch

from aiolearner import Learner
from bench._common import (
    Batch,
    StampedData,
    machine,
    make_data,
    make_mlp,
    median,
    raw_step,
    table,
    tick,
)

SIZES = [256, 512, 512, 10]
BATCH = 128
LOSS: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


def run_raw(model: torch.nn.Module, data: list[Batch], skip: int) -> tuple[float, list[float]]:
    optimizer = _sgd(model)
    stamped = StampedData(data, time.perf_counter)
    for x, y in stamped:
        raw_step(model, optimizer, LOSS, x, y)
    return stamped.per_step(skip), []


def learner_run(
    compute: Any, backend: str, ticker: bool
) -> Callable[[torch.nn.Module, list[Batch], int], tuple[float, list[float]]]:
    def run(model: torch.nn.Module, data: list[Batch], skip: int) -> tuple[float, list[float]]:
        stamped = StampedData(data, time.perf_counter)
        learner: Learner[Batch] = Learner(model, _sgd(model), LOSS, stamped, compute=compute)
        lags: list[float] = []

        async def main() -> None:
            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                if ticker:
                    tg.start_soon(tick, lags, done)
                    await anyio.sleep(0.01)  # the ticker is running before training starts
                await learner.fit(1)
                done.set()

        anyio.run(main, backend=backend)
        return stamped.per_step(skip), lags

    return run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--batch",
        type=int,
        default=BATCH,
        help="batch size (the issue's ~8 ms step is batch 128 on its machine; pick one that "
        "gives ~8 ms here)",
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--policies", default="auto,thread,inline")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval() for the run (Python's default: 0.005 s)",
    )
    parser.add_argument("--tickers", default="on,off", help="ticker variants: on, off or both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    variants: dict[str, Callable[[torch.nn.Module, list[Batch], int], tuple[float, list[float]]]]
    variants = {"raw loop, no event loop": run_raw}
    for backend in args.backends.split(","):
        for policy in args.policies.split(","):
            for ticker in [t == "on" for t in args.tickers.split(",")]:
                name = f"{backend} {policy}{' (default)' if policy == 'auto' else ''}, " + (
                    "1 ms ticker" if ticker else "alone"
                )
                variants[name] = learner_run(policy, backend, ticker)

    data = make_data(args.steps, args.batch, SIZES[0], SIZES[-1], seed=1)
    probe = make_data(1, args.batch, SIZES[0], SIZES[-1], seed=2)[0]
    skip = max(2, args.steps // 20)
    times: dict[str, list[float]] = {v: [] for v in variants}
    lags: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, torch.Tensor] = {}
    for _ in range(args.reps):
        for name, run in variants.items():
            model = make_mlp(SIZES, seed=0)
            per_step, lag = run(model, data, skip)
            times[name].append(per_step)
            lags[name].extend(lag)
            with torch.no_grad():
                losses[name] = LOSS(model(probe[0]), probe[1])

    print(f"machine: {machine()}")
    print(
        f"MLP {'->'.join(map(str, SIZES))}, batch {args.batch}: {args.steps} steps (timed "
        f"{args.steps - 2 * skip}), {args.reps} interleaved repetitions; ticker period 1 ms"
    )
    raw_times = times["raw loop, no event loop"]
    raw = median(raw_times)
    rows = []
    failed = False
    for name in variants:
        same = torch.equal(losses[name], losses["raw loop, no event loop"])
        failed |= not same
        lag = lags[name]
        throughput = median([r / t for r, t in zip(raw_times, times[name], strict=True)])
        rows.append(
            [
                name,
                f"{median(times[name]) * 1e3:.2f}",
                f"{throughput:.3f}",
                f"{percentile(lag, 0.5) * 1e3:.2f}" if lag else "-",
                f"{percentile(lag, 0.99) * 1e3:.2f}" if lag else "-",
                f"{max(lag) * 1e3:.1f}" if lag else "-",
                "yes" if same else "NO",
            ]
        )
    print(
        table(
            [
                "variant",
                "ms/step",
                "throughput / raw",
                "lag p50 ms",
                "lag p99 ms",
                "lag max ms",
                "same loss",
            ],
            rows,
        )
    )
    print(f"raw loop: {raw * 1e3:.2f} ms/step; GIL switch interval {sys.getswitchinterval()} s")
    if failed:
        print("FAILED: a final loss differs from the raw loop's")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
