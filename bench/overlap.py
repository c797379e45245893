"""Data loading overlapping compute: epoch wall time against the ideal and the serial loop.

Run::

    .venv/bin/python -m bench.overlap

Two scenarios, each over ``n`` batches:

* **waits**: fetching a batch takes ``L`` ms and a training step ``C`` ms, both modelled with
  GIL-releasing waits (``time.sleep``, like file or network I/O and native kernels). The ideal
  epoch is ``n * max(L, C)`` and the serial loop takes ``n * (L + C)``.
* **real work**: fetching is CPU-bound Python (a loop that holds the GIL for ``L`` ms, like
  decoding or augmenting in Python) and the step is real torch work on an MLP, calibrated here
  to take about ``C`` ms. A thread cannot hide work that holds the GIL; DataLoader worker
  processes can, and aiolearner composes with them.

Variants: the serial hand-written loop; the hand-written loop over a torch DataLoader with one
worker process; aiolearner with default settings (``fetch="auto"``: the source is read inline
until two fetches in a row turn out slow, then by a producer thread); aiolearner with
``fetch="thread"`` (the source declared slow: no probe fetches); and aiolearner reading the same
DataLoader with one worker. Variants run interleaved, repetition after repetition; times are
medians. Every variant's final model must give the serial loop's loss, bit for bit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from aiolearner import Learner
from bench._common import Batch, machine, make_data, make_mlp, median, raw_step, table

LOSS: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy


def spin(seconds: float) -> None:
    """Busy Python for ``seconds``: holds the GIL except at the interpreter's switch points."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


class SlowBatches(Dataset[Batch]):
    """Batches that take ``seconds`` each to produce, waiting (``sleep``) or computing."""

    def __init__(self, batches: list[Batch], seconds: float, work: str) -> None:
        self.batches = batches
        self.seconds = seconds
        self.work = work

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        if i >= len(self.batches):
            raise IndexError(i)
        if self.work == "sleep":
            time.sleep(self.seconds)
        else:
            spin(self.seconds)
        return self.batches[i]

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self[i]


class SleepyMLP(torch.nn.Module):
    """An MLP whose forward also waits ``seconds`` with the GIL released (modelled compute)."""

    def __init__(self, mlp: torch.nn.Module, seconds: float) -> None:
        super().__init__()
        self.mlp = mlp
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.mlp(x)  # type: ignore[no-any-return]


def loader(data: SlowBatches) -> DataLoader[Batch]:
    # batch_size=None: each item already is a batch. One worker process, two batches ahead.
    return DataLoader(data, batch_size=None, num_workers=1, prefetch_factor=2)


def run_serial(model: torch.nn.Module, data: Any) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    start = time.perf_counter()
    for x, y in data:
        raw_step(model, optimizer, LOSS, x, y)
    return time.perf_counter() - start


def run_learner(model: torch.nn.Module, data: Any, fetch: Any = "auto") -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    learner: Learner[Batch] = Learner(model, optimizer, LOSS, data, fetch=fetch)
    start = time.perf_counter()
    learner.fit_sync(1)
    return time.perf_counter() - start


def run_learner_thread(model: torch.nn.Module, data: Any) -> float:
    """The source declared slow: a producer thread from the first batch, no probe fetches."""
    return run_learner(model, data, fetch="thread")


def run_scenario(scenario: str, n: int, load: float, compute: float, reps: int) -> bool:
    """Runs and prints one scenario; whether every final loss matched the serial loop's."""
    if scenario == "waits":
        sizes, batch = [32, 64, 10], 64
    else:
        # About 20 ms a step on the development machine when it is quiet (C close to L).
        sizes, batch = [256, 1024, 1024, 10], 96
    batches = make_data(n, batch, sizes[0], sizes[-1], seed=1)
    probe = make_data(1, batch, sizes[0], sizes[-1], seed=2)[0]
    work = "sleep" if scenario == "waits" else "python"
    step = compute
    if scenario == "real":
        # Calibrate: what one real step takes here, alone.
        step = run_serial(make_mlp(sizes), batches[:10]) / 10

    def go(name: str, run: Callable[[torch.nn.Module, Any], float], with_loader: bool) -> float:
        mlp = make_mlp(sizes, seed=0)
        model = SleepyMLP(mlp, compute) if scenario == "waits" else mlp
        source = SlowBatches(batches, load, work)
        data: Any = loader(source) if with_loader else source
        seconds = run(model, data)
        with torch.no_grad():
            losses[name] = LOSS(model(probe[0]), probe[1])
        return seconds

    variants: dict[str, tuple[Callable[[torch.nn.Module, Any], float], bool]] = {
        "serial loop": (run_serial, False),
        "loop over DataLoader (1 worker)": (run_serial, True),
        "aiolearner (default)": (run_learner, False),
        "aiolearner, fetch='thread'": (run_learner_thread, False),
        "aiolearner over DataLoader (1 worker)": (run_learner, True),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, torch.Tensor] = {}
    for _ in range(reps):
        for name, (run, with_loader) in variants.items():
            times[name].append(go(name, run, with_loader))
    ideal = n * max(load, step)
    serial = n * (load + step)
    rows = []
    ok = True
    for name, ts in times.items():
        same = torch.equal(losses[name], losses["serial loop"])
        ok &= same
        rows.append(
            [
                name,
                f"{median(ts):.3f}",
                f"{median(ts) / ideal:.3f}",
                f"{median(ts) / serial:.3f}",
                "yes" if same else "NO",
            ]
        )
    what = (
        "GIL-releasing waits"
        if scenario == "waits"
        else "Python loading (holds the GIL), real torch step"
    )
    print(
        f"\n{scenario}: {what}; n = {n}, L = {load * 1e3:.0f} ms, C = {step * 1e3:.1f} ms"
        f"{' (measured)' if scenario == 'real' else ''}; ideal n*max(L, C) = {ideal:.3f} s, "
        f"serial n*(L + C) = {serial:.3f} s; {reps} interleaved repetitions, medians"
    )
    print(table(["variant", "epoch s", "/ ideal", "/ serial", "same loss"], rows))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--load-ms", type=float, default=20.0)
    parser.add_argument("--compute-ms", type=float, default=20.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--scenarios", default="waits,real")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, load, compute = args.batches, args.load_ms / 1e3, args.compute_ms / 1e3

    print(f"machine: {machine()}")
    failed = False
    for scenario in args.scenarios.split(","):
        failed |= not run_scenario(scenario, n, load, compute, args.reps)
    if failed:
        print("FAILED: a final loss differs from the serial loop's")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
