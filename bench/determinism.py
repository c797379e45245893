"""The same run, again and again: how many different results, and at what speed.

Run::

    .venv/bin/python -m bench.determinism --runs 20
    .venv/bin/python -m bench.determinism --runs 10 --variants "default,fetch='thread'"

The set-up is the one where a producer thread makes results differ: a map-style dataset whose
``__getitem__`` is slow (a sleep per sample, batches of 16: past ``fetch_budget``) and draws
augmentation from torch's global generator, a ``DataLoader`` shuffling from the global
generator, and a model with dropout (compute draws from the same generator). Each variant trains
a fresh learner from the same seeds ``--runs`` times, interleaved with the other variants, and
reports the number of distinct final weights (a hash of every parameter) and the median time of
a run. Variants:

* ``default``: ``fetch="auto"``, which keeps such a source inline (docs/reliability.md);
* ``fetch='thread'``: a producer thread from the start: loading overlaps compute, and the two
  threads' draws interleave as they happen to run;
* ``workers=2``: ``DataLoader(num_workers=2)`` with the default ``fetch``: worker processes
  seeded from the loader's draw, overlapping and exact.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from aiolearner import Learner

VARIANTS = ("default", "fetch='thread'", "workers=2")


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """256 samples; each fetch sleeps ``delay`` seconds and adds noise from torch's global
    generator."""

    def __init__(self, delay: float) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(256, 16, generator=g)
        self.y = torch.randint(0, 4, (256,), generator=g)
        self.delay = delay

    def __len__(self) -> int:
        return 256

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay)
        return self.x[i] + 0.1 * torch.randn(16), self.y[i]


def run(variant: str, delay: float, epochs: int) -> tuple[str, float, str]:
    """One run: the hash of its final weights, its time and how ``train_data`` was fetched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 4))
    workers = 2 if variant == "workers=2" else 0
    loader = DataLoader(Augmented(delay), batch_size=16, shuffle=True, num_workers=workers)
    options: dict[str, Any] = {"fetch": "thread"} if variant == "fetch='thread'" else {}
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.functional.cross_entropy,
        loader,
        **options,
    )
    start = time.perf_counter()
    learner.fit_sync(epochs)
    took = time.perf_counter() - start
    digest = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    data = next(line for line in learner.describe().splitlines() if line.startswith("data: "))
    return digest.hexdigest()[:12], took, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per variant")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0001, help="seconds a sample's fetch")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    hashes: dict[str, list[str]] = {v: [] for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    fetched: dict[str, str] = {}
    for _ in range(args.runs):
        for v in variants:  # interleaved: the host's load moves every variant alike
            digest, took, data = run(v, args.delay, args.epochs)
            hashes[v].append(digest)
            times[v].append(took)
            fetched[v] = data
    first = statistics.median(times[variants[0]])
    header = f"{'variant':<16} {'distinct':>8} {'median s':>9} {'/ first':>8}"
    print(f"{header}  how train_data was fetched")
    for v in variants:
        median = statistics.median(times[v])
        distinct = len(set(hashes[v]))
        print(
            f"{v:<16} {distinct:>4} of {len(hashes[v]):<2} {median:>9.3f} {median / first:>8.3f}"
            f"  {fetched[v]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
