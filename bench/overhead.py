"""Per-step overhead over a hand-written PyTorch loop: aiolearner, Ignite and Lightning.

Three models: ``null`` (one Linear 4->2, batch 2: the step is almost nothing, so what is measured
is each framework's own per-batch work), ``tiny`` (an MLP 32->64->10, batch 64) and ``heavy``.

Run (the whole benchmark, all models, all variants, interleaved repetitions)::

    .venv/bin/python -m bench.overhead            # needs the `bench` extra for Ignite/Lightning
    # the null row against the bare Engine only, with enough repetitions to narrow its interval:
    .venv/bin/python -m bench.overhead --models null --reps 201 \
        --variants "aiolearner auto (default),Ignite bare Engine"
    # the same, on an iterable that is not a list (a dataset of one's own):
    .venv/bin/python -m bench.overhead --models null --reps 61 --data iterable \
        --variants "aiolearner auto (default),Ignite bare Engine"

Every variant trains a fresh copy of the same model (same seed) with SGD on the same batches, one
epoch, with default settings: aiolearner with no callbacks (``compute`` inline / thread / auto, the
default, on asyncio, and auto on trio); Ignite's ``create_supervised_trainer`` and its bare
``Engine(process_function)`` running the raw step; Lightning's ``Trainer`` with logger,
checkpointing, progress bar and model summary off. Per-step time is measured between steps
``k`` and ``n - k`` (see ``bench/_common.py``), so setup and teardown are left out: by default
every variant trains on the list of batches, and the time is stamped as each step's forward
starts; with ``--data iterable`` it trains on an iterable over the list that is not a list (a
generator's, as a dataset of one's own is), stamped as each batch is requested. For aiolearner
the two differ by little: in a burst of batches it takes either's next batch from the pass's
iterator itself; an iterable that is not a list is also timed (``fetch="auto"`` moves a slow
source to a producer thread) and its draws counted (for an exact resume): two clock reads and
a generator's step a batch. The variants run in a
rotated order in each repetition. The final model of every variant must give bit for bit the
loss the raw loop's model gives on a held-out batch; the script exits with status 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from aiolearner import Learner
from bench._common import (
    Batch,
    StampedData,
    StampedModel,
    machine,
    make_data,
    make_mlp,
    median,
    raw_step,
    table,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS: LossFn = torch.nn.functional.cross_entropy

MODELS: dict[str, tuple[list[int], int]] = {
    # A near-null step (one Linear 4->2, batch 2): what is left is the framework's own work.
    "null": ([4, 2], 2),
    "tiny": ([32, 64, 10], 64),
    "heavy": ([512, 1024, 1024, 10], 256),
}

Runner = Callable[[torch.nn.Module, list[Batch], int], float]


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


#: What every variant trains on (``--data``): ``"list"``, the list of batches itself, with the
#: time stamped as each step's forward starts; or ``"iterable"``, an iterable over it that is not
#: a list (a generator's), stamped as each batch is requested.
DATA = "list"


def instrument(
    model: torch.nn.Module, data: list[Batch]
) -> tuple[torch.nn.Module, Any, Callable[[int], float]]:
    """What a variant trains (the model, or the model stamping its forwards), what it trains
    on, and the per-step time once it has run (see ``DATA``)."""
    if DATA == "list":
        stamped = StampedModel(model)
        return stamped, data, stamped.per_step
    feed = StampedData(data, time.perf_counter)
    return model, feed, feed.per_step


class OneLoader:
    """A list of batches as one loader, for Lightning (which reads a list as several)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


def run_raw(model: torch.nn.Module, data: list[Batch], skip: int) -> float:
    net, feed, per_step = instrument(model, data)
    optimizer = _sgd(model)
    net.train()
    for x, y in feed:
        raw_step(net, optimizer, LOSS, x, y)
    return per_step(skip)


def aiolearner_runner(compute: Any, backend: Any) -> Runner:
    def run(model: torch.nn.Module, data: list[Batch], skip: int) -> float:
        net, feed, per_step = instrument(model, data)
        learner: Learner[Batch] = Learner(net, _sgd(model), LOSS, feed, compute=compute)
        learner.fit_sync(1, backend=backend)
        return per_step(skip)

    return run


def run_ignite(model: torch.nn.Module, data: list[Batch], skip: int) -> float:
    from ignite.engine import create_supervised_trainer

    net, feed, per_step = instrument(model, data)
    trainer = create_supervised_trainer(net, _sgd(model), LOSS)
    trainer.run(feed, max_epochs=1)
    return per_step(skip)


def run_ignite_bare(model: torch.nn.Module, data: list[Batch], skip: int) -> float:
    """Ignite's bare ``Engine(process_function)``: its loop and events, no supervised helpers."""
    from ignite.engine import Engine

    net, feed, per_step = instrument(model, data)
    optimizer = _sgd(model)
    net.train()

    def process(engine: Any, batch: Batch) -> float:
        raw_step(net, optimizer, LOSS, batch[0], batch[1])
        return 0.0

    Engine(process).run(feed, max_epochs=1)
    return per_step(skip)


def run_lightning(model: torch.nn.Module, data: list[Batch], skip: int) -> float:
    import lightning

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.ERROR)  # "GPU available: False", tips

    net, feed, per_step = instrument(model, data)

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = net

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return LOSS(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _sgd(self.model)

    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    # (Lightning reads a list as a collection of loaders: the batches go in a one-loader view.)
    trainer.fit(Module(), train_dataloaders=OneLoader(feed) if type(feed) is list else feed)
    return per_step(skip)


def final_loss(model: torch.nn.Module, probe: Batch) -> torch.Tensor:
    with torch.no_grad():
        return LOSS(model(probe[0]), probe[1])


def ratio_interval(
    ours: list[float], theirs: list[float], *, level: float = 0.9, draws: int = 2000
) -> tuple[float, float]:
    """A bootstrap interval of ``median(ours) / median(theirs)``: the repetitions (pairs of
    per-repetition overheads, which share a raw run) resampled with replacement ``draws`` times
    (fixed seed, so the same figures give the same interval)."""
    rng = random.Random(0)
    n = len(ours)
    ratios = []
    for _ in range(draws):
        picks = [rng.randrange(n) for _ in range(n)]
        denominator = median([theirs[i] for i in picks])
        if denominator > 0:
            ratios.append(median([ours[i] for i in picks]) / denominator)
    if not ratios:
        return math.nan, math.nan
    ratios.sort()
    tail = (1 - level) / 2
    last = len(ratios) - 1
    return ratios[int(tail * last)], ratios[round((1 - tail) * last)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="null,tiny,heavy")
    parser.add_argument("--tiny-steps", type=int, default=1000, help="steps of null and tiny")
    parser.add_argument("--heavy-steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=11, help="repetitions of the tiny model")
    parser.add_argument("--heavy-reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-peers", action="store_true", help="skip Ignite and Lightning")
    parser.add_argument(
        "--data",
        choices=("list", "iterable"),
        default="list",
        help="what the variants train on: the list of batches (stamped at each forward), or an "
        "iterable over it that is not a list (stamped at each request); default: list",
    )
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated names of the variants to run (the raw loop always runs), e.g. "
        "'aiolearner auto (default),Ignite bare Engine'; all when empty",
    )
    args = parser.parse_args()
    global DATA
    DATA = args.data

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "ignite"):
        logging.getLogger(name).setLevel(logging.ERROR)

    variants: dict[str, Runner] = {
        "raw loop": run_raw,
        "aiolearner inline": aiolearner_runner("inline", "asyncio"),
        "aiolearner thread": aiolearner_runner("thread", "asyncio"),
        "aiolearner auto (default)": aiolearner_runner("auto", "asyncio"),
        "aiolearner auto, trio": aiolearner_runner("auto", "trio"),
    }
    if not args.no_peers:
        variants["Ignite Engine"] = run_ignite
        variants["Ignite bare Engine"] = run_ignite_bare
        variants["Lightning Trainer"] = run_lightning

    if args.variants:
        wanted = {name.strip() for name in args.variants.split(",")}
        unknown = wanted - set(variants)
        if unknown:
            parser.error(f"--variants: unknown {sorted(unknown)}; known: {sorted(variants)}")
        variants = {name: run for name, run in variants.items() if name in wanted | {"raw loop"}}

    print(f"machine: {machine()}")
    failed = False
    for model_name in args.models.split(","):
        sizes, batch = MODELS[model_name]
        light = model_name in ("null", "tiny")
        steps = args.tiny_steps if light else args.heavy_steps
        reps = args.reps if light else args.heavy_reps
        skip = max(2, steps // 20)
        data = make_data(steps, batch, sizes[0], sizes[-1], seed=1)
        probe = make_data(1, batch, sizes[0], sizes[-1], seed=2)[0]
        times: dict[str, list[float]] = {v: [] for v in variants}
        losses: dict[str, torch.Tensor] = {}
        order = list(variants.items())
        for rep in range(reps):
            # A rotated order each repetition: no variant always runs first, or always after
            # the same other one (Lightning's teardown leaves work for the next one's collector).
            for name, run in order[rep % len(order) :] + order[: rep % len(order)]:
                model = make_mlp(sizes, seed=0)
                times[name].append(run(model, data, skip))
                loss = final_loss(model, probe)
                if name in losses and not torch.equal(losses[name], loss):
                    raise RuntimeError(f"{name}: final loss changed between repetitions")
                losses[name] = loss
        raw = median(times["raw loop"])
        raw_times = times["raw loop"]
        rows = []
        for name, ts in times.items():
            # Overhead: the median of per-repetition differences with the raw run of the same
            # repetition (adjacent in time, so slow phases of the shared machine cancel out).
            overhead = median([t - r for t, r in zip(ts, raw_times, strict=True)])
            same = torch.equal(losses[name], losses["raw loop"])
            failed |= not same
            rows.append(
                [
                    name,
                    f"{median(ts) * 1e6:.1f}",
                    f"{overhead * 1e6:+.1f}",
                    f"{median(ts) / raw:.3f}",
                    f"{losses[name].item():.6f}" + ("" if same else " (DIFFERS)"),
                ]
            )
        print(
            f"\n{model_name} MLP {'->'.join(map(str, sizes))}, batch {batch}: {steps} steps "
            f"(timed {steps - 2 * skip}), {reps} interleaved repetitions, medians; data: {DATA}"
        )
        print(table(["variant", "us/step", "overhead us/step", "time / raw", "final loss"], rows))
        if "aiolearner auto (default)" in times and light:
            peers = (
                (("Ignite Engine", 0.5), ("Lightning Trainer", 0.03))
                if model_name == "tiny"
                else (("Ignite bare Engine", 0.5),)
            )
            ours_diffs = [
                t - r for t, r in zip(times["aiolearner auto (default)"], raw_times, strict=True)
            ]
            ours = median(ours_diffs)
            for peer, bound in peers:
                if peer not in times:
                    continue
                theirs_diffs = [t - r for t, r in zip(times[peer], raw_times, strict=True)]
                theirs = median(theirs_diffs)
                low, high = ratio_interval(ours_diffs, theirs_diffs)
                print(
                    f"default overhead / {peer} overhead = {ours / theirs:.3f} (target <= {bound});"
                    f" 90% bootstrap interval {low:.3f}-{high:.3f}"
                )
    if failed:
        print("\nFAILED: a final loss differs from the raw loop's")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
