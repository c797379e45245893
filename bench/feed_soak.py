"""A ``Feed`` read by a learner whose ``fit`` is cancelled and called again, over and over:
every record must be trained on once, in order, and the counters must match.

Run::

    .venv/bin/python -m bench.feed_soak                     # 20 runs per backend and compute
    .venv/bin/python -m bench.feed_soak --runs 40 --records 1200

Each run: one producer task sends ``--records`` numbered records into a ``Feed(batch_size=4,
buffer=5)``; the learner (``steps_per_epoch=3``) trains on it with ``fit`` wrapped in
``move_on_after`` of a random 0.5-8 ms, called again after a random pause of up to 10 ms, until
the feed ends. A ``def after_update`` callback notes the records of every batch whose update was
applied. A run is *bad* when a record was trained on twice or never, out of order, or when
``step`` is not records / 4. The pauses only make the cancellations land at varied points of the
pass (while the producer waits for room, while the learner waits for a record, during a batch);
nothing is ordered by them.

Target (docs/reliability.md): 0 bad runs for every backend and compute policy.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from typing import Any

import anyio
import torch

from aiolearner import Callback, Feed, Learner, StateView

BATCH = 4


class Trained(Callback):
    reads = frozenset({"batch"})

    def __init__(self) -> None:
        self.ids: list[int] = []

    def after_update(self, state: StateView) -> None:
        self.ids.extend(int(v) for v in state.batch[0][:, 0].tolist())


async def one_run(seed: int, records: int, compute: Any) -> tuple[int, str | None]:
    """``(cancellations, what went wrong or None)``."""
    rnd = random.Random(seed)
    feed = Feed[tuple[torch.Tensor, torch.Tensor]](batch_size=BATCH, buffer=5)
    trained = Trained()
    model = torch.nn.Linear(2, 3)
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        lambda output, _: (output * 0).sum(),
        feed,
        callbacks=[trained],
        steps_per_epoch=3,
        compute=compute,
    )

    async def produce() -> None:
        async with feed:
            for i in range(records):
                await feed.send((torch.tensor([float(i), 0.0]), torch.tensor(0)))

    cancellations = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        while True:
            with anyio.move_on_after(rnd.uniform(0.0005, 0.008)) as scope:
                await learner.fit(learner.state.epoch + 10_000)
            if not scope.cancelled_caught:
                break
            cancellations += 1
            await anyio.sleep(rnd.uniform(0, 0.01))
        tg.cancel_scope.cancel()
    counts = Counter(trained.ids)
    twice = sorted(k for k, v in counts.items() if v > 1)
    never = sorted(set(range(records)) - set(counts))
    problems = []
    if twice:
        problems.append(f"trained twice: {twice[:8]}")
    if never:
        problems.append(f"never trained: {never[:8]}")
    if trained.ids != sorted(trained.ids):
        problems.append("out of order")
    if learner.state.step != records // BATCH:
        problems.append(f"step {learner.state.step}, not {records // BATCH}")
    return cancellations, "; ".join(problems) or None


async def soak(runs: int, records: int, compute: str, seed: int) -> tuple[int, int, list[str]]:
    bad: list[str] = []
    total = 0
    for i in range(runs):
        cancellations, problem = await one_run(seed + i, records, compute)
        total += cancellations
        if problem is not None:
            bad.append(f"run {i} (seed {seed + i}): {problem}")
    return runs, total, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per backend and compute")
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--computes", default="auto,inline,thread")
    args = parser.parse_args()
    torch.set_num_threads(1)
    failed = False
    print("| backend | compute | runs | cancellations | bad runs |")
    print("|---|---|---|---|---|")
    for backend in args.backends.split(","):
        for compute in args.computes.split(","):
            runs, total, bad = anyio.run(
                soak, args.runs, args.records, compute, args.seed, backend=backend
            )
            print(f"| {backend} | {compute} | {runs} | {total} | {len(bad)} |", flush=True)
            for line in bad:
                print(f"    {line}")
            failed = failed or bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
