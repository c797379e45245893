"""Concurrent validation: wall time of fit against training alone, validation alone, and both.

Run::

    .venv/bin/python -m bench.concurrent_validation                  # every scenario, 3 reps
    .venv/bin/python -m bench.concurrent_validation --reps 5 --only per-epoch
    .venv/bin/python -m bench.concurrent_validation --only real --threads 1
    .venv/bin/python -m bench.concurrent_validation --quick          # a smoke run (seconds)

Scenarios:

* **per-epoch**: ``E`` epochs (default 4) of ``n`` training batches (20), each followed by a
  validation of ``v`` batches (20), ``validate_every="epoch"``: concurrent validation overlaps
  epoch k's validation with epoch k+1's training, so at best it takes (E + 1) / 2E of the
  sequential time when T = V (0.625 for 4 epochs).
* **every-N**: one epoch of ``n`` batches (100) validating every ``every`` steps (5) on ``v``
  batches (5).

In both a training batch takes ``T`` ms and a validation batch ``V`` ms (10 each) of
GIL-releasing waits (``time.sleep`` inside the model's forward, like GPU kernels or remote
calls), so both can proceed at once. **real**: an MLP doing real CPU work, per epoch; two
CPU-bound passes share the machine's cores, so overlap cannot help much (reported as measured).

Every scenario runs with the default settings (``compute="auto"``, ``max_snapshots=1``), then
with explicit policies as extra rows (``compute="thread"``; ``max_snapshots=2``, a spare slot
that absorbs jitter between equal periods). Variants, run interleaved (one repetition of each,
then the next), medians reported:

* ``train only``: ``fit`` with no validation data;
* ``validation only``: the same number of validation passes (``learner.validate()``) alone;
* ``sequential``: ``fit`` with ``validate="sequential"``;
* ``concurrent``: ``fit`` with ``validate="concurrent"``.

Targets (docs/concurrent-validation.md): per-epoch, default settings, concurrent / sequential
<= 0.70; every-N, default settings, concurrent <= 1.10 x max(train only, validation only). The
script checks that the concurrent and sequential runs end with the same weights and the same
records (every ``after_validate`` and ``after_epoch`` row), bit for bit.
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


class Records(Callback):
    """Every row a logger would write: after_validate and after_epoch."""

    reads = frozenset({"validation", "validation_tag", "epoch", "step", "metrics"})

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def after_validate(self, state: StateView) -> None:
        self.rows.append(("validate", tuple(state.validation_tag), state.validation["loss"]))

    def after_epoch(self, state: StateView) -> None:
        self.rows.append(("epoch", state.epoch, state.step, sorted(state.metrics.items())))


class Scenario:
    def __init__(
        self,
        name: str,
        make_model: Callable[[], torch.nn.Module],
        train: list[Batch],
        val: list[Batch],
        *,
        epochs: int,
        every: Any,
    ) -> None:
        self.name = name
        self.make_model = make_model
        self.train = train
        self.val = val
        self.epochs = epochs
        self.every = every

    @property
    def passes(self) -> int:
        if self.every == "epoch":
            return self.epochs
        return self.epochs * len(self.train) // int(self.every)

    def build(self, mode: str, options: dict[str, Any], *, val: bool = True) -> Learner[Any]:
        model = self.make_model()
        return Learner(
            model,
            torch.optim.SGD(model.parameters(), lr=0.05),
            LOSS,
            self.train,
            self.val if val else None,
            callbacks=[Records()],
            validate=mode,  # type: ignore[arg-type]
            validate_every=self.every,
            **options,
        )


async def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def measure(scenario: Scenario, label: str, options: dict[str, Any], reps: int) -> list[str]:
    times: dict[str, list[float]] = {k: [] for k in ("train", "val", "seq", "conc")}
    for _ in range(reps):
        learner = scenario.build("sequential", options, val=False)
        times["train"].append(await timed(lambda: learner.fit(scenario.epochs)))  # noqa: B023

        alone = scenario.build("sequential", options)

        async def validations() -> None:
            for _ in range(scenario.passes):
                await alone.validate()  # noqa: B023

        times["val"].append(await timed(validations))
        finals = {}
        for mode, key in (("sequential", "seq"), ("concurrent", "conc")):
            run = scenario.build(mode, options)
            times[key].append(await timed(lambda: run.fit(scenario.epochs)))  # noqa: B023
            records = run.callbacks[0]
            assert isinstance(records, Records)
            finals[mode] = ([p.detach().clone() for p in run.model.parameters()], records.rows)
        seq_w, seq_r = finals["sequential"]
        conc_w, conc_r = finals["concurrent"]
        assert all(torch.equal(a, b) for a, b in zip(seq_w, conc_w, strict=True)), "weights differ"
        assert seq_r == conc_r, "records differ"
        assert sum(1 for r in conc_r if r[0] == "validate") == scenario.passes
    t, v, s, c = (median(times[k]) for k in ("train", "val", "seq", "conc"))
    longest = max(t, v)
    return [
        scenario.name,
        label,
        f"{scenario.passes} x {len(scenario.val)}",
        f"{t * 1e3:.0f}",
        f"{v * 1e3:.0f}",
        f"{s * 1e3:.0f}",
        f"{c * 1e3:.0f}",
        f"{c / s:.2f}",
        f"{s / longest:.2f}",
        f"{c / longest:.2f}",
    ]


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    out = []
    n_in, n_out = 16, 4

    def waiting() -> torch.nn.Module:
        return Waiting(n_in, n_out, train_wait=args.t / 1e3, eval_wait=args.vt / 1e3)

    waits = f"T {args.t:g} ms, V {args.vt:g} ms"
    if args.only in (None, "per-epoch"):
        out.append(
            Scenario(
                f"per-epoch, {args.epochs} epochs, waits ({waits})",
                waiting,
                make_data(args.epoch_n, 8, n_in, n_out, seed=1),
                make_data(args.epoch_v, 8, n_in, n_out, seed=2),
                epochs=args.epochs,
                every="epoch",
            )
        )
    if args.only in (None, "every-n"):
        out.append(
            Scenario(
                f"every {args.every} steps, waits ({waits})",
                waiting,
                make_data(args.n, 8, n_in, n_out, seed=1),
                make_data(args.v, 8, n_in, n_out, seed=2),
                epochs=1,
                every=args.every,
            )
        )
    if args.only in (None, "real"):
        sizes = [256, 512, 512, 10]
        out.append(
            Scenario(
                f"per-epoch, {args.epochs} epochs, real work: MLP {sizes},"
                f" {torch.get_num_threads()} torch threads",
                lambda: make_mlp(sizes, seed=0),
                make_data(args.epoch_n, 64, sizes[0], sizes[-1], seed=1),
                make_data(args.epoch_v, 256, sizes[0], sizes[-1], seed=2),
                epochs=args.epochs,
                every="epoch",
            )
        )
    return out


SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("default (auto, K=1)", {}),
    ('compute="thread"', {"compute": "thread"}),
    ("max_snapshots=2", {"max_snapshots": 2}),
]


async def main(args: argparse.Namespace) -> None:
    rows = []
    for scenario in scenarios(args):
        for label, options in SETTINGS[: 1 if args.quick else None]:
            rows.append(await measure(scenario, label, options, args.reps))
    print(machine())
    print(
        table(
            [
                "scenario",
                "settings",
                "validations",
                "train only (ms)",
                "validation only (ms)",
                "sequential (ms)",
                "concurrent (ms)",
                "concurrent / sequential",
                "sequential / max",
                "concurrent / max",
            ],
            rows,
        )
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="per-epoch: epochs")
    parser.add_argument("--epoch-n", type=int, default=20, help="per-epoch: training batches")
    parser.add_argument("--epoch-v", type=int, default=20, help="per-epoch: validation batches")
    parser.add_argument("--n", type=int, default=100, help="every-N: training batches")
    parser.add_argument("--v", type=int, default=5, help="every-N: validation batches per pass")
    parser.add_argument("--every", type=int, default=5, help="every-N: validate every N steps")
    parser.add_argument("--t", type=float, default=10.0, help="waits: ms per training batch")
    parser.add_argument("--vt", type=float, default=10.0, help="waits: ms per validation batch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", choices=["per-epoch", "every-n", "real"], default=None)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: small sizes, 1 rep, default settings"
    )
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.epoch_n, args.epoch_v = 2, 4, 4
        args.n, args.v, args.every, args.reps = 10, 2, 5, 1
        args.t = args.vt = 2.0
    return args


if __name__ == "__main__":
    arguments = parse()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    anyio.run(main, arguments, backend=arguments.backend)
