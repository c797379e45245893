"""The heavy step in a new event loop for every run and in one kept loop: the raw loop, and
aiolearner computing inline and in its worker thread, with the process's minor page faults.

``bench/overhead.py`` makes a new event loop for every run of every variant, so thread mode
starts a new compute worker thread every run. Its heavy row spreads by a few percent from run to
run, thread mode a little more than the others. This script separates the two set-ups:

* ``fresh``: as ``bench/overhead.py`` runs them, a new event loop (and so a new worker thread)
  for every run;
* ``kept``: one event loop for the whole script, each learner fitting one more epoch in every
  repetition (its worker thread kept from one epoch to the next, as in a long run or a service).

The raw loop also runs on a thread of its own, a new one for every run (``fresh``) or one kept
(``kept``): what a thread costs a heavy step with no framework at all.

Each variant's steps are timed between forwards as ``bench/overhead.py`` times them (setup and
teardown left out), with the process's minor faults read at the same points (a heavy step
allocates and frees megabytes: where the C allocator hands memory back between steps, the next
step faults it in again); medians over the repetitions.

Run::

    .venv/bin/python -m bench.heavy_threads
    # the same with glibc's allocator told to keep what it has (no trimming, no mmap per chunk):
    GLIBC_TUNABLES=glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_threshold=33554432 \\
        .venv/bin/python -m bench.heavy_threads
"""

from __future__ import annotations

import argparse
import resource
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import anyio
import torch

from aiolearner import Learner
from bench._common import (
    Batch,
    StampedModel,
    machine,
    make_data,
    make_mlp,
    median,
    raw_step,
    table,
)

SIZES, BATCH = [512, 1024, 1024, 10], 256
VARIANTS = ("raw loop", "raw loop, another thread", "aiolearner inline", "aiolearner thread")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Stamped(StampedModel):
    """``StampedModel``, also recording the process's minor faults as each forward starts."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__(inner)
        self.faults: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.faults.append(_faults())
        return super().forward(x)

    def measured(self, first: int, skip: int) -> tuple[float, float]:
        """Seconds and faults a step from the forward of step ``first + skip`` to that of the
        last step but ``skip`` (the steps of one run, or of one epoch: ``first`` on)."""
        a, b = first + skip, len(self.stamps) - 1 - skip
        return (self.stamps[b] - self.stamps[a]) / (b - a), (self.faults[b] - self.faults[a]) / (
            b - a
        )


def _learner(model: torch.nn.Module, data: list[Batch], compute: str) -> Learner[Batch]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return Learner(model, optimizer, torch.nn.functional.cross_entropy, data, compute=compute)  # type: ignore[arg-type]


def _raw(model: torch.nn.Module, data: list[Batch]) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def run() -> None:
        for x, y in data:
            raw_step(model, optimizer, torch.nn.functional.cross_entropy, x, y)

    return run


def _in_a_new_thread(fn: Callable[[], None]) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def measure(setup: str, reps: int, data: list[Batch]) -> dict[str, list[tuple[float, float]]]:
    """Per variant, a (seconds a step, faults a step) pair for each repetition. The raw loop
    runs on the main thread, and on another: a new one every run (``fresh``), or one kept."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    skip = max(2, len(data) // 20)  # (as bench/overhead.py leaves out)
    if setup == "fresh":
        for _ in range(reps):
            for name in VARIANTS:
                model = Stamped(make_mlp(SIZES))
                if name == "raw loop":
                    _raw(model, data)()
                elif name == "raw loop, another thread":
                    _in_a_new_thread(_raw(model, data))
                else:
                    learner = _learner(model, data, name.split()[1])
                    anyio.run(learner.fit, 1)
                results[name].append(model.measured(0, skip))
        return results

    async def kept(thread: ThreadPoolExecutor) -> None:
        models = {name: Stamped(make_mlp(SIZES)) for name in VARIANTS}
        raw = {name: _raw(models[name], data) for name in VARIANTS if name.startswith("raw")}
        learners = {c: _learner(models[f"aiolearner {c}"], data, c) for c in ("inline", "thread")}
        for rep in range(reps + 1):  # (the first repetition warms every variant up, not kept)
            for name in VARIANTS:
                first = len(models[name].stamps)
                if name == "raw loop":
                    raw[name]()
                elif name == "raw loop, another thread":
                    thread.submit(raw[name]).result()
                else:
                    await learners[name.split()[1]].fit(rep + 1)
                if rep:
                    results[name].append(models[name].measured(first, skip))

    with ThreadPoolExecutor(1) as thread:
        anyio.run(kept, thread)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="batches in an epoch")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = make_data(args.steps, BATCH, SIZES[0], SIZES[-1], seed=1)
    print(f"machine: {machine()}")
    for setup in ("fresh", "kept"):
        results = measure(setup, args.reps, data)
        raw = median([s for s, _ in results["raw loop"]])
        rows = [
            [
                name,
                f"{median([s for s, _ in pairs]) * 1e6:.0f}",
                f"{median([s for s, _ in pairs]) / raw:.3f}",
                f"{median([f for _, f in pairs]):.1f}",
            ]
            for name, pairs in results.items()
        ]
        print(
            f"\n{setup}: heavy MLP, {args.steps} steps a run, {args.reps} repetitions, medians"
            f" ({'a new event loop every run' if setup == 'fresh' else 'one event loop'})"
        )
        print(table(["variant", "us/step", "time / raw", "minor faults/step"], rows))


if __name__ == "__main__":
    main()
