"""What the side-work callbacks (checkpoints, loggers, progress, recorder, throughput) cost.

Run::

    .venv/bin/python -m bench.side_work

1. **Event-loop lag while checkpointing.** A 12.6M-parameter MLP with Adam (a ~150 MB state)
   trains 12 steps in thread compute mode, saving a checkpoint every 2 steps, while a task on the
   same loop sleeps 1 ms in a loop and records how late it wakes up. Compared with the same run
   without checkpoints: the copy, serialization and writes run in worker threads, so what is left
   on the loop is the GIL the writer threads hold now and then.
2. **Per-batch cost.** A tiny MLP (the null step of ``aiolearner.testing``) trains 2 epochs of 400
   batches inline with each callback alone and with all of them; variants run interleaved and the
   best of the repetitions is reported (it is the least disturbed by other load on the machine).
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import anyio
import torch

from aiolearner import Callback, Learner
from aiolearner.callbacks import Checkpoint, JSONLinesLogger, ProgressBar, Recorder, Throughput
from aiolearner.testing import make_batches, make_learner


def _lag_learner(directory: str, checkpoint: bool) -> Learner[Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2048, 2048),
        torch.nn.Linear(2048, 2048),
        torch.nn.Linear(2048, 2048),
        torch.nn.Linear(2048, 4),
    )
    data = [(torch.randn(8, 2048), torch.randint(0, 4, (8,))) for _ in range(6)]
    callbacks: list[Callback] = []
    if checkpoint:
        callbacks.append(Checkpoint(directory, every_n_steps=2, every_n_epochs=None))
    return Learner(
        model,
        torch.optim.Adam(model.parameters()),
        torch.nn.functional.cross_entropy,
        data,
        callbacks=callbacks,
        compute="thread",
    )


async def _lag(checkpoint: bool) -> tuple[float, float, float, float]:
    lags: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            start = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    with tempfile.TemporaryDirectory() as directory:
        learner = _lag_learner(directory, checkpoint)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            start = time.perf_counter()
            await learner.fit(2)
            seconds = time.perf_counter() - start
            done = True
    lags.sort()
    ms = [lags[len(lags) // 2] * 1e3, lags[int(len(lags) * 0.99)] * 1e3, lags[-1] * 1e3]
    return seconds, ms[0], ms[1], ms[2]


Factory = Callable[[str], list[Callback]]

VARIANTS: dict[str, Factory] = {
    "no callbacks": lambda d: [],
    "Recorder": lambda d: [Recorder()],
    "Throughput": lambda d: [Throughput()],
    "ProgressBar (plain)": lambda d: [ProgressBar(file=io.StringIO())],
    "Checkpoint (per epoch)": lambda d: [Checkpoint(d)],
    "JSONLinesLogger (per epoch)": lambda d: [JSONLinesLogger(d + "/log.jsonl")],
    "all five": lambda d: [
        Recorder(),
        Throughput(),
        ProgressBar(file=io.StringIO()),
        Checkpoint(d),
        JSONLinesLogger(d + "/log.jsonl"),
    ],
}


def _per_batch(backend: str, batches: int = 400, repetitions: int = 5) -> dict[str, float]:
    data = make_batches(batches)
    best = dict.fromkeys(VARIANTS, float("inf"))
    for _ in range(repetitions):
        for name, factory in VARIANTS.items():
            with tempfile.TemporaryDirectory() as directory:
                learner = make_learner(
                    callbacks=factory(directory),
                    train_data=data,
                    with_validation=False,
                    compute="inline",
                )
                learner.fit_sync(1, backend=backend)  # type: ignore[arg-type]
                start = time.perf_counter()
                learner.fit_sync(3, backend=backend)  # type: ignore[arg-type]
                per_batch = (time.perf_counter() - start) / (2 * batches)
                best[name] = min(best[name], per_batch * 1e6)
    return best


def main() -> int:
    torch.set_num_threads(1)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    print("\n1. event-loop lag while saving a ~150 MB checkpoint every 2 steps (12 steps)")
    for backend in ("asyncio", "trio"):
        for checkpoint in (False, True):
            seconds, p50, p99, worst = anyio.run(_lag, checkpoint, backend=backend)
            print(
                f"  {backend:8} checkpoints {'on ' if checkpoint else 'off'}: fit {seconds:.2f} s,"
                f" lag p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.2f} ms"
            )
    print("\n2. per-batch cost, tiny MLP, inline compute (best of 5)")
    for backend in ("asyncio", "trio"):
        best = _per_batch(backend)
        base = best["no callbacks"]
        for name, us in best.items():
            print(f"  {backend:8} {name:28} {us:7.1f} us/batch  (+{us - base:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
