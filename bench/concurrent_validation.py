"""Concurrent validation: wall time of fit against training alone, validation alone, and both.

Run::

    .venv/bin/python -m bench.concurrent_validation            # both scenarios
    .venv/bin/python -m bench.concurrent_validation --reps 5 --only waits
    .venv/bin/python -m bench.concurrent_validation --reps 5 --only real --threads 1

Two scenarios, each training ``n`` batches and validating every ``every`` steps (``n / every``
validation periods, each a pass over ``v`` validation batches):

* **waits**: a training batch takes ``T`` ms and a validation batch ``V`` ms of GIL-releasing
  waits (``time.sleep`` inside the model's forward, like GPU kernels or remote calls), so both
  can proceed at once. ``compute="thread"``: training and the concurrent validation each hop to
  worker threads of their own.
* **real work**: an MLP doing real CPU work, the same model for training and validation. On a
  2-core machine the two compete for the same cores (and torch's intra-op threads), so the
  overlap is partial at best; the figure is reported as measured.

Variants, run interleaved (one repetition of each, then the next), medians reported:

* ``train only``: ``fit`` with no validation data;
* ``validation only``: the same number of validation passes (``learner.validate()``) on their own;
* ``sequential``: ``fit`` with ``validate="sequential"`` (training waits for each pass);
* ``concurrent``: ``fit`` with ``validate="concurrent"`` and ``max_snapshots=K`` (default 2:
  with training and validation periods of equal length, one spare slot absorbs the jitter that
  would otherwise make training wait; ``--max-snapshots 1`` shows the difference).

The goal for the waits scenario: ``concurrent <= 1.10 * max(train only, validation only)``, while
``sequential`` is about their sum. The script checks that concurrent and sequential runs end with
the same weights and the same validation results, bit for bit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import anyio
import torch

from aiolearner import Callback, Learner, StateView
from bench._common import Batch, machine, make_data, make_mlp, median, table

LOSS: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy


class Waiting(torch.nn.Module):
    """A small linear model whose forward also waits: ``train_wait`` or ``eval_wait`` seconds."""

    def __init__(self, n_in: int, n_out: int, *, train_wait: float, eval_wait: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(n_in, n_out)
        self.train_wait = train_wait
        self.eval_wait = eval_wait

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.train_wait if self.training else self.eval_wait)  # releases the GIL
        out: torch.Tensor = self.linear(x)
        return out


class Results(Callback):
    reads = frozenset({"validation", "validation_tag"})

    def __init__(self) -> None:
        self.seen: list[tuple[Any, float]] = []

    def after_validate(self, state: StateView) -> None:
        self.seen.append((tuple(state.validation_tag), state.validation["loss"]))


def build(
    make_model: Callable[[], torch.nn.Module],
    train: list[Batch],
    val: list[Batch] | None,
    *,
    mode: str,
    every: int,
    callbacks: list[Callback],
    max_snapshots: int = 1,
) -> Learner[Any]:
    model = make_model()
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        LOSS,
        train,
        val,
        callbacks=callbacks,
        compute="thread",
        validate=mode,  # type: ignore[arg-type]
        validate_every=every,
        max_snapshots=max_snapshots,
    )


async def time_fit(learner: Learner[Any]) -> float:
    start = time.perf_counter()
    await learner.fit(1)
    return time.perf_counter() - start


async def time_validation(learner: Learner[Any], passes: int) -> float:
    start = time.perf_counter()
    for _ in range(passes):
        await learner.validate()
    return time.perf_counter() - start


async def scenario(
    name: str,
    make_model: Callable[[], torch.nn.Module],
    train: list[Batch],
    val: list[Batch],
    *,
    every: int,
    reps: int,
    max_snapshots: int,
) -> list[object]:
    passes = len(train) // every
    times: dict[str, list[float]] = {k: [] for k in ("train", "val", "seq", "conc")}
    for _ in range(reps):
        times["train"].append(
            await time_fit(
                build(make_model, train, None, mode="sequential", every=every, callbacks=[])
            )
        )
        times["val"].append(
            await time_validation(
                build(make_model, train, val, mode="sequential", every=every, callbacks=[]), passes
            )
        )
        finals = {}
        for mode, key in (("sequential", "seq"), ("concurrent", "conc")):
            rec = Results()
            learner = build(
                make_model,
                train,
                val,
                mode=mode,
                every=every,
                callbacks=[rec],
                max_snapshots=max_snapshots,
            )
            times[key].append(await time_fit(learner))
            finals[mode] = ([p.detach().clone() for p in learner.model.parameters()], rec.seen)
        seq_w, seq_r = finals["sequential"]
        conc_w, conc_r = finals["concurrent"]
        assert all(torch.equal(a, b) for a, b in zip(seq_w, conc_w, strict=True)), "weights differ"
        assert seq_r == conc_r, "validation results differ"
        assert len(conc_r) == passes
    t, v, s, c = (median(times[k]) for k in ("train", "val", "seq", "conc"))
    ratio = c / max(t, v)
    return [
        name,
        f"{passes} x {len(val)} batches, K={max_snapshots}",
        f"{t * 1e3:.0f}",
        f"{v * 1e3:.0f}",
        f"{s * 1e3:.0f}",
        f"{c * 1e3:.0f}",
        f"{s / max(t, v):.2f}",
        f"{ratio:.2f}",
    ]


async def main(args: argparse.Namespace) -> None:
    rows = []
    if args.only in (None, "waits"):
        n_in, n_out = 16, 4
        train = make_data(args.n, 8, n_in, n_out, seed=1)
        val = make_data(args.v, 8, n_in, n_out, seed=2)

        def waiting() -> torch.nn.Module:
            return Waiting(n_in, n_out, train_wait=args.t / 1e3, eval_wait=args.vt / 1e3)

        rows.append(
            await scenario(
                f"waits: train {args.t} ms/batch, validation {args.vt} ms/batch",
                waiting,
                train,
                val,
                every=args.every,
                reps=args.reps,
                max_snapshots=args.max_snapshots,
            )
        )
    if args.only in (None, "real"):
        sizes = [256, 512, 512, 10]
        train = make_data(args.n, 64, sizes[0], sizes[-1], seed=1)
        val = make_data(args.v, 256, sizes[0], sizes[-1], seed=2)
        rows.append(
            await scenario(
                f"real work: MLP {sizes}, train batch 64, validation batch 256,"
                f" {torch.get_num_threads()} torch threads",
                lambda: make_mlp(sizes, seed=0),
                train,
                val,
                every=args.every,
                reps=args.reps,
                max_snapshots=args.max_snapshots,
            )
        )
    print(machine())
    print(
        table(
            [
                "scenario",
                "validations",
                "train only (ms)",
                "validation only (ms)",
                "sequential (ms)",
                "concurrent (ms)",
                "sequential / max",
                "concurrent / max",
            ],
            rows,
        )
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100, help="training batches")
    parser.add_argument("--v", type=int, default=5, help="validation batches per pass")
    parser.add_argument("--every", type=int, default=5, help="validate every this many steps")
    parser.add_argument("--t", type=float, default=10.0, help="waits: ms per training batch")
    parser.add_argument("--vt", type=float, default=10.0, help="waits: ms per validation batch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--max-snapshots", type=int, default=2, help="concurrent: snapshots in flight (K)"
    )
    parser.add_argument("--only", choices=["waits", "real"], default=None)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    anyio.run(main, arguments, backend=arguments.backend)
