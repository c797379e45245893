"""Many tiny learners training on one event loop: the loop's lag and the total throughput.

Run::

    .venv/bin/python -m bench.many_learners                       # 8 and 32 learners
    .venv/bin/python -m bench.many_learners --learners 32 --reps 3

N learners (a small MLP each, its own data and seed) train concurrently in one task group, on
one event loop, while a task on the same loop sleeps 1 ms in a loop and records how late it
wakes up (the lag a web handler on that loop would see). The reference is the same N trainings
one after another on one loop with nothing else on it (each then runs inline, the fastest way);
a second reference runs them one after another with the same ticker on the loop, which shows
what the ticker's thousand wake-ups a second cost by themselves. Throughput is the total number
of batches over the wall time, reported relative to each reference (1.0 = as fast as training
them one after another). Every learner trained
concurrently must end with exactly the weights it has trained alone. Targets (issue 12): ticker
p99 <= 10 ms, throughput >= 0.9 x sequential, with 32 learners.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import anyio
import torch

from aiolearner import Learner
from bench._common import Batch, machine, make_data, make_mlp, median, table, tick

SIZES = [32, 64, 10]
BATCH = 32


def build(i: int, batches: int, compute: str) -> Learner[Batch]:
    model = make_mlp(SIZES, seed=i)
    data = make_data(batches, BATCH, SIZES[0], SIZES[-1], seed=1000 + i)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        torch.nn.functional.cross_entropy,
        data,
        compute=compute,  # type: ignore[arg-type]
    )


def weights(learner: Learner[Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sequential(
    n: int, batches: int, epochs: int, backend: str, ticker: bool = False
) -> tuple[float, list[float], list[Any]]:
    """The N trainings one after another on one loop, alone or with the 1 ms ticker:
    (seconds, lags, final weights)."""
    learners = [build(i, batches, "auto") for i in range(n)]
    lags: list[float] = []

    async def main() -> float:
        done = anyio.Event()
        async with anyio.create_task_group() as outer:
            if ticker:
                outer.start_soon(tick, lags, done)
                await anyio.sleep(0.01)  # the ticker runs before training starts
            start = time.perf_counter()
            for learner in learners:
                await learner.fit(epochs)
            seconds = time.perf_counter() - start
            done.set()
        return seconds

    seconds = anyio.run(main, backend=backend)
    return seconds, lags, [weights(learner) for learner in learners]


def concurrent(
    n: int, batches: int, epochs: int, backend: str, compute: str
) -> tuple[float, list[float], list[Any]]:
    """The N trainings at once on one loop with a 1 ms ticker: (seconds, lags, final weights)."""
    learners = [build(i, batches, compute) for i in range(n)]
    lags: list[float] = []

    async def main() -> float:
        done = anyio.Event()
        async with anyio.create_task_group() as outer:
            outer.start_soon(tick, lags, done)
            await anyio.sleep(0.01)  # the ticker runs before training starts
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for learner in learners:
                    tg.start_soon(learner.fit, epochs)
            seconds = time.perf_counter() - start
            done.set()
        return seconds

    seconds = anyio.run(main, backend=backend)
    return seconds, lags, [weights(learner) for learner in learners]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learners", default="8,32", help="comma-separated learner counts")
    parser.add_argument("--batches", type=int, default=40, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--policies", default="auto,thread")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"machine: {machine()}")
    print(
        f"MLP {'->'.join(map(str, SIZES))}, batch {BATCH}, {args.batches} batches x "
        f"{args.epochs} epochs per learner; {args.reps} repetitions; ticker period 1 ms"
    )
    # Warm up (torch's first calls, anyio's worker threads) before anything is timed.
    for backend in args.backends.split(","):
        sequential(2, 4, 1, backend, ticker=True)
        for policy in args.policies.split(","):
            concurrent(4, 4, 1, backend, policy)
    rows = []
    failed = False
    for n in (int(x) for x in args.learners.split(",")):
        for backend in args.backends.split(","):
            seq_times: list[float] = []
            ticked_times: list[float] = []
            ticked_lags: list[float] = []
            results: dict[str, tuple[list[float], list[float]]] = {
                p: ([], []) for p in args.policies.split(",")
            }
            alone: list[Any] = []
            for _ in range(args.reps):
                seconds, _, alone = sequential(n, args.batches, args.epochs, backend)
                seq_times.append(seconds)
                seconds, lag, _ = sequential(n, args.batches, args.epochs, backend, ticker=True)
                ticked_times.append(seconds)
                ticked_lags.extend(lag)
                for policy, (times, lags) in results.items():
                    seconds, lag, together = concurrent(
                        n, args.batches, args.epochs, backend, policy
                    )
                    times.append(seconds)
                    lags.extend(lag)
                    for a, b in zip(alone, together, strict=True):
                        if not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
                            failed = True
            total = n * args.batches * args.epochs
            seq = median(seq_times)
            ticked = median(ticked_times)
            rows.append(
                [f"{n} learners, {backend}, one after another", f"{total / seq:.0f}", "1.000"]
                + ["-"] * 4
            )
            variants = [
                (f"{n} learners, {backend}, one after another, ticker", ticked_times, ticked_lags)
            ]
            variants += [
                (f"{n} learners, {backend}, concurrent, compute={policy}", times, lags)
                for policy, (times, lags) in results.items()
            ]
            for name, times, lags in variants:
                t = median(times)
                rows.append(
                    [
                        name,
                        f"{total / t:.0f}",
                        f"{seq / t:.3f}",
                        f"{ticked / t:.3f}",
                        f"{percentile(lags, 0.5) * 1e3:.2f}",
                        f"{percentile(lags, 0.99) * 1e3:.2f}",
                        f"{max(lags) * 1e3:.1f}",
                    ]
                )
    print(
        table(
            [
                "variant",
                "batches/s",
                "throughput / sequential",
                "/ sequential with ticker",
                "lag p50 ms",
                "lag p99 ms",
                "lag max ms",
            ],
            rows,
        )
    )
    print(f"GIL switch interval {sys.getswitchinterval()} s")
    if failed:
        print("FAILED: a learner trained concurrently differs from the same learner alone")
        return 1
    print("every learner trained concurrently is bit-identical to the same learner alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
