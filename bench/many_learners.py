"""Many tiny learners training on one event loop: the loop's lag and the total throughput.

Run::

    .venv/bin/python -m bench.many_learners                       # 8 and 32 learners
    .venv/bin/python -m bench.many_learners --learners 32 --reps 3

N learners (a small MLP each, its own data and seed) train concurrently in one task group, on
one event loop, while a task on the same loop sleeps 1 ms in a loop and records how late it
wakes up (the lag a web handler on that loop would see). The reference is the same N trainings
one after another on one loop with nothing else on it (each then runs inline, the fastest way);
a second reference runs them one after another with the same ticker on the loop, which shows
what the ticker's thousand wake-ups a second cost by themselves, and the learners also train
concurrently with no ticker (with the first policy listed), which shows what training them at
once costs by itself. Throughput is the total number
of batches over the wall time, reported relative to each reference (1.0 = as fast as training
them one after another): the ratio of the medians, and the median of the ratios within each
repetition (the runs of one repetition are adjacent in time, so slow phases of a shared machine
cancel out). Every learner trained concurrently must end with exactly the weights it has trained
alone. Targets (issue 12): ticker p99 <= 10 ms, throughput >= 0.9 x sequential, with 32 learners.

Two more rows train the same N models as hand-written loops (the raw step, no framework), one
after another: alone, and with the ticker while giving the loop a turn every 1 ms as a learner
sharing the loop does. What the ticker costs them is what its wake-ups cost any loop that keeps
it on time; the script prints it next to what it costs the learners. The hand-written loops
must end with exactly the learners' weights too.

Every run starts from a collected heap (``gc.collect()`` before it starts), so that a
full collection due to the garbage of earlier runs does not land in one variant at random; the
full (generation 2) collections that happen during the timed runs are counted and timed: with
torch imported one takes 0.1-0.2 s here (the whole heap is traversed), which is the ticker's
longest lag whenever one occurs (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import anyio
import torch

from aiolearner import Learner
from bench._common import TICK, Batch, machine, make_data, make_mlp, median, raw_step, table, tick

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


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class FullCollections:
    """Within the block, the duration of every full (generation 2) garbage collection."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._start)

    def __enter__(self) -> list[float]:
        gc.callbacks.append(self._callback)
        return self.pauses

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


class Result(NamedTuple):
    seconds: float
    lags: list[float]
    weights: list[Any]
    #: The full garbage collections during the timed part (seconds each).
    collections: list[float]


def sequential(n: int, batches: int, epochs: int, backend: str, ticker: bool = False) -> Result:
    """The N trainings one after another on one loop, alone or with the 1 ms ticker."""
    learners = [build(i, batches, "auto") for i in range(n)]

    async def train() -> None:
        for learner in learners:
            await learner.fit(epochs)

    return _timed(train, [learner.model for learner in learners], backend, ticker=ticker)


def concurrent(
    n: int, batches: int, epochs: int, backend: str, compute: str, ticker: bool = True
) -> Result:
    """The N trainings at once on one loop, with the 1 ms ticker or alone."""
    learners = [build(i, batches, compute) for i in range(n)]

    async def train() -> None:
        async with anyio.create_task_group() as tg:
            for learner in learners:
                tg.start_soon(learner.fit, epochs)

    return _timed(train, [learner.model for learner in learners], backend, ticker=ticker)


def hand_written(n: int, batches: int, epochs: int, backend: str, ticker: bool = False) -> Result:
    """The N trainings as hand-written loops one after another on one loop: alone (no turns), or
    with the 1 ms ticker, giving the loop a turn every ``TICK`` seconds."""
    models = [make_mlp(SIZES, seed=i) for i in range(n)]
    datas = [make_data(batches, BATCH, SIZES[0], SIZES[-1], seed=1000 + i) for i in range(n)]
    loss_fn = torch.nn.functional.cross_entropy

    async def train() -> None:
        clock = time.perf_counter
        last = clock()
        for model, data in zip(models, datas, strict=True):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            model.train()
            for _ in range(epochs):
                for x, y in data:
                    raw_step(model, optimizer, loss_fn, x, y)
                    if ticker and clock() - last >= TICK:
                        await anyio.lowlevel.checkpoint()
                        last = clock()

    return _timed(train, models, backend, ticker=ticker)


def _timed(
    train: Callable[[], Awaitable[None]],
    models: Sequence[torch.nn.Module],
    backend: str,
    *,
    ticker: bool,
) -> Result:
    """``train()`` on a fresh event loop, timed, with the ticker on the loop or not; the models'
    weights after it."""
    lags: list[float] = []

    async def main() -> tuple[float, list[float]]:
        done = anyio.Event()
        async with anyio.create_task_group() as outer:
            if ticker:
                outer.start_soon(tick, lags, done)
                await anyio.sleep(0.01)  # the ticker runs before training starts
            start = time.perf_counter()
            with FullCollections() as pauses:
                await train()
            seconds = time.perf_counter() - start
            done.set()
        return seconds, pauses

    gc.collect()  # before the ticker starts: a collection is a lag
    seconds, pauses = anyio.run(main, backend=backend)
    return Result(seconds, lags, [weights(model) for model in models], pauses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learners", default="8,32", help="comma-separated learner counts")
    parser.add_argument("--batches", type=int, default=40, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--policies", default="auto,thread")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after the warm-up: full collections then skip the heap made so far",
    )
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
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
        print(f"gc.freeze(): {gc.get_freeze_count()} objects left out of full collections")
    rows = []
    notes: list[str] = []
    failed = False
    for n in (int(x) for x in args.learners.split(",")):
        for backend in args.backends.split(","):
            runs: dict[str, Callable[[], Result]] = {
                "one after another": partial(sequential, n, args.batches, args.epochs, backend),
                "one after another, ticker": partial(
                    sequential, n, args.batches, args.epochs, backend, ticker=True
                ),
            }
            for policy in args.policies.split(","):
                runs[f"concurrent, compute={policy}"] = partial(
                    concurrent, n, args.batches, args.epochs, backend, policy
                )
            # The learners' throughput without the ticker's wake-ups (the first policy).
            first = args.policies.split(",")[0]
            runs[f"concurrent, compute={first}, no ticker"] = partial(
                concurrent, n, args.batches, args.epochs, backend, first, ticker=False
            )
            runs["hand-written loops, one after another"] = partial(
                hand_written, n, args.batches, args.epochs, backend
            )
            runs["hand-written loops, one after another, ticker"] = partial(
                hand_written, n, args.batches, args.epochs, backend, ticker=True
            )
            results: dict[str, list[Result]] = {name: [] for name in runs}
            order = list(runs)
            for rep in range(args.reps):
                # A rotated order each repetition: no variant always runs first.
                for name in order[rep % len(order) :] + order[: rep % len(order)]:
                    results[name].append(runs[name]())
            alone = results["one after another"]
            for name, rs in results.items():
                if name.startswith(("concurrent", "hand-written")):
                    for a, b in zip(alone, rs, strict=True):
                        failed |= not all(
                            torch.equal(x, y)
                            for wa, wb in zip(a.weights, b.weights, strict=True)
                            for x, y in zip(wa, wb, strict=True)
                        )
            total = n * args.batches * args.epochs
            seq_times = [r.seconds for r in alone]
            ticked_times = [r.seconds for r in results["one after another, ticker"]]
            seq = median(seq_times)
            ticked = median(ticked_times)
            hand = [r.seconds for r in results["hand-written loops, one after another"]]
            hand_ticked = [
                r.seconds for r in results["hand-written loops, one after another, ticker"]
            ]
            notes.append(
                f"{n} learners, {backend}: with the ticker, one after another, the learners ran at "
                f"{seq / ticked:.3f} of their speed without it, hand-written loops at "
                f"{median(hand) / median(hand_ticked):.3f} (ratios of medians; within "
                "repetitions "
                f"{median([a / b for a, b in zip(seq_times, ticked_times, strict=True)]):.3f} and "
                f"{median([a / b for a, b in zip(hand, hand_ticked, strict=True)]):.3f})"
            )
            for name, rs in results.items():
                times = [r.seconds for r in rs]
                lags = [lag for r in rs for lag in r.lags]
                pauses = [p for r in rs for p in r.collections]
                t = median(times)
                paired = median([a / b for a, b in zip(seq_times, times, strict=True)])
                rows.append(
                    [
                        f"{n} learners, {backend}, {name}",
                        f"{total / t:.0f}",
                        f"{seq / t:.3f}",
                        f"{paired:.3f}",
                        f"{ticked / t:.3f}",
                        f"{percentile(lags, 0.5) * 1e3:.2f}" if lags else "-",
                        f"{percentile(lags, 0.99) * 1e3:.2f}" if lags else "-",
                        f"{max(lags) * 1e3:.1f}" if lags else "-",
                        f"{len(pauses)}" + (f" ({max(pauses) * 1e3:.0f})" if pauses else ""),
                    ]
                )
    print(
        table(
            [
                "variant",
                "batches/s",
                "throughput / sequential",
                "median of ratios in a rep",
                "/ sequential with ticker",
                "lag p50 ms",
                "lag p99 ms",
                "lag max ms",
                "full GCs (longest ms)",
            ],
            rows,
        )
    )
    for note in notes:
        print(note)
    print(f"GIL switch interval {sys.getswitchinterval()} s")
    if failed:
        print(
            "FAILED: a learner trained concurrently, or a hand-written loop, differs from the "
            "same learner alone"
        )
        return 1
    print(
        "every learner trained concurrently, and every hand-written loop, is bit-identical to "
        "the same learner alone"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
