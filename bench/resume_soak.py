"""Random cancellations, then "fit again" and "resume in a fresh learner": both must be exact.

Run::

    .venv/bin/python -m bench.resume_soak --trials 500            # per backend (both by default)
    .venv/bin/python -m bench.resume_soak --trials 50 --seed 7    # a quick look

Each trial picks a set-up at random: the training data (a list; a DataLoader shuffling from the
global generator; one shuffling from its own ``generator=``; a ``RandomSampler`` with its own
generator, with or without replacement; a ``DistributedSampler`` whose epoch a callback sets),
whether the dataset augments each sample with draws from the global generators (torch's,
numpy's, Python's) as it is fetched, how batches are fetched (``fetch`` inline, thread or auto;
auto with ``fetch_budget=0`` half the time, which finds every fetch slow and so decides at once
whether the source moves to a producer thread), where compute runs (``compute`` inline, thread
or auto), and a model with dropout (so compute draws from the global generator too), left out
where augmentation and compute would draw at the same time from two threads (``fetch="thread"``:
a race, docs/reliability.md).
It then cancels the run at a random point: at a hook of a random epoch and step (epoch starts
included), from a ``def`` hook (the batch stays fused) or an ``async def`` one (the batch is
awaited), or from outside after a random delay. Then two checks, against the same run
uninterrupted:

* **again**: ``fit(epochs)`` on the same learner must end with the same weights, optimizer state,
  training loss and global torch generator, bit for bit;
* **resume**: ``state_dict()`` taken right after the cancellation, saved and loaded with
  ``torch.load(weights_only=True)`` into a learner built afresh the same way, then
  ``fit(epochs)``: the same.

Target (issue 12): 0 inexact results in >= 500 cancellations per backend. ``tests/test_streams.py``
runs a representative subset of the same trials.
"""

from __future__ import annotations

import argparse
import copy
import io
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

from aiolearner import Callback, Learner, StateView

EPOCHS = 3
BATCHES = 5  # per epoch
BATCH = 4

DATA_KINDS = ("list", "global", "loader_generator", "sampler_generator", "replacement", "dist")
FETCHES = ("inline", "thread", "auto")
COMPUTES = ("inline", "thread", "auto")
HOOKS = (
    "before_fit_run",
    "before_epoch",
    "before_fit",
    "before_fit_batch",
    "after_gradient",
    "after_update",
    "after_fit_batch",
    "after_fit",
    "before_validate",
    "after_validate",
    "after_epoch",
)


@dataclass(frozen=True)
class Setup:
    data: str
    fetch: str
    compute: str
    #: The dataset draws from the global generators in ``__getitem__`` (not with "list").
    augment: bool = False
    #: ``fetch_budget``: 0 finds every fetch slow, so ``fetch="auto"`` decides at once whether
    #: the source moves to a producer thread (it must not when its draws are shared).
    budget: float = 0.0005

    @property
    def dropout(self) -> bool:
        """Compute draws too, unless augmentation could draw at the same time elsewhere (a
        producer thread that ``fetch="thread"`` forces)."""
        return not self.augment or self.fetch != "thread"


class Augmented(TensorDataset):
    """Samples with noise from the global torch, numpy and Python generators, drawn as each
    sample is fetched (the usual random augmentation)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        x, y = (t[index] for t in self.tensors)
        noise = 0.01 * torch.rand(x.shape) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
        return x + noise, y


@dataclass(frozen=True)
class Cancel:
    """Where to cancel: at ``hook`` the first time ``epoch``/``step`` are reached (``how``:
    ``"def"`` or ``"async"`` hook), or after ``delay`` seconds (``how == "timer"``)."""

    how: str
    hook: str = ""
    epoch: int = 0
    step: int = 0
    delay: float = 0.0


class SetEpoch(Callback):
    """What a user of DistributedSampler writes: the sampler's epoch at each epoch's start."""

    reads = frozenset({"epoch"})

    def __init__(self, sampler: DistributedSampler[Any]) -> None:
        self.sampler = sampler

    def before_epoch(self, state: StateView) -> None:
        self.sampler.set_epoch(state.epoch)


def make_data(kind: str, augment: bool = False) -> tuple[Any, list[Callback]]:
    gen = torch.Generator().manual_seed(11)
    n = BATCHES * BATCH
    x = torch.randn(n, 6, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    if kind == "list":
        return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, n, BATCH)], []
    dataset = Augmented if augment else TensorDataset
    ds = dataset(x, y)
    if kind == "global":
        return DataLoader(ds, batch_size=BATCH, shuffle=True), []
    if kind == "loader_generator":
        own = torch.Generator().manual_seed(5)
        return DataLoader(ds, batch_size=BATCH, shuffle=True, generator=own), []
    if kind in ("sampler_generator", "replacement"):
        own = torch.Generator().manual_seed(6)
        sampler = RandomSampler(ds, replacement=kind == "replacement", generator=own)
        return DataLoader(ds, batch_size=BATCH, sampler=sampler), []
    if kind == "dist":
        # Two replicas' worth of data, this process rank 0 of them.
        big = dataset(torch.cat([x, x.flip(0)]), torch.cat([y, y.flip(0)]))
        dist: DistributedSampler[Any] = DistributedSampler(
            big, num_replicas=2, rank=0, shuffle=True, seed=3
        )
        return DataLoader(big, batch_size=BATCH, sampler=dist), [SetEpoch(dist)]
    raise ValueError(kind)


def build(setup: Setup, callbacks: list[Callback]) -> Learner[Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.25) if setup.dropout else torch.nn.Identity(),
        torch.nn.Linear(12, 3),
    )
    data, extra = make_data(setup.data, setup.augment)
    val = [(torch.randn(4, 6, generator=torch.Generator().manual_seed(9)), torch.zeros(4).long())]
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        torch.nn.functional.cross_entropy,
        data,
        val,
        callbacks=[*extra, *callbacks],
        fetch=setup.fetch,  # type: ignore[arg-type]
        fetch_budget=setup.budget,
        compute=setup.compute,  # type: ignore[arg-type]
    )


def outcome(learner: Learner[Any]) -> dict[str, Any]:
    return {
        "weights": [p.detach().clone() for p in learner.model.parameters()],
        # A copy: the live state's tensors change with later steps.
        "optimizer": copy.deepcopy(learner.optimizer.state_dict()),
        "train_loss": learner.state.metrics.get("train_loss"),
        "rng": torch.get_rng_state(),
        "counters": (learner.state.epoch, learner.state.step),
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return (
            isinstance(b, list | tuple)
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


class Canceller(Callback):
    """Cancels ``scope`` at one hook, the first time the epoch and step are reached."""

    reads = frozenset({"epoch", "step"})

    def __init__(self, cancel: Cancel, scope: anyio.CancelScope, loop_thread: int) -> None:
        self.cancel = cancel
        self.scope = scope
        self.loop_thread = loop_thread
        self.done = False

    def hooks(self) -> Any:
        c = self.cancel

        def due(state: StateView) -> bool:
            if self.done or state.epoch != c.epoch:
                return False
            if c.hook in ("before_fit_batch", "after_gradient", "after_update", "after_fit_batch"):
                # The step the batch starts from (before its update) or reached (after).
                if state.step != c.step:
                    return False
            self.done = True
            return True

        def sync_hook(state: StateView) -> None:
            if due(state):
                if threading.get_ident() == self.loop_thread:
                    self.scope.cancel()
                else:  # a fused batch in the compute worker
                    anyio.from_thread.run_sync(self.scope.cancel)

        async def async_hook(state: StateView) -> None:
            if due(state):
                self.scope.cancel()
                await anyio.lowlevel.checkpoint()

        yield c.hook, (async_hook if c.how == "async" else sync_hook)


def random_cancel(rng: random.Random, duration: float) -> Cancel:
    if rng.random() < 0.3:
        return Cancel("timer", delay=rng.uniform(0.0, duration))
    hook = rng.choice(HOOKS)
    epoch = rng.randrange(EPOCHS)
    step = epoch * BATCHES + rng.randrange(BATCHES)
    if hook in ("after_update", "after_fit_batch"):
        step += 1  # the step an update has just reached
    return Cancel(rng.choice(("def", "async")), hook, epoch, step)


_REFERENCES: dict[Setup, tuple[dict[str, Any], float]] = {}


async def reference(setup: Setup) -> tuple[dict[str, Any], float]:
    """The uninterrupted run's outcome and duration (cached per set-up)."""
    if setup not in _REFERENCES:
        learner = build(setup, [])
        start = time.perf_counter()
        await learner.fit(EPOCHS)
        _REFERENCES[setup] = (outcome(learner), time.perf_counter() - start)
    return _REFERENCES[setup]


async def trial(setup: Setup, cancel: Cancel) -> tuple[bool, bool, str]:
    """One cancellation: (fit again exact, resume exact, where it stopped)."""
    expected, _ = await reference(setup)
    scope = anyio.CancelScope()
    callbacks: list[Callback] = []
    if cancel.how != "timer":
        callbacks.append(Canceller(cancel, scope, threading.get_ident()))
    learner = build(setup, callbacks)
    with scope:
        if cancel.how == "timer":
            scope.deadline = anyio.current_time() + cancel.delay
        await learner.fit(EPOCHS)
    state = learner.state
    where = f"epoch {state.epoch} step {state.step} batch {state.batch_index}"
    saved = io.BytesIO()
    torch.save(learner.state_dict(), saved)
    await learner.fit(EPOCHS)
    again = same(outcome(learner), expected)
    fresh = build(setup, [])
    saved.seek(0)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    await fresh.fit(EPOCHS)
    resumed = same(outcome(fresh), expected)
    return again, resumed, where


def random_setup(rng: random.Random) -> Setup:
    data = rng.choice(DATA_KINDS)
    augment = data != "list" and rng.random() < 0.4
    fetch = rng.choice(FETCHES)
    budget = 0.0 if fetch == "auto" and rng.random() < 0.5 else 0.0005
    return Setup(data, fetch, rng.choice(COMPUTES), augment, budget)


async def soak(trials: int, seed: int, log: Callable[[str], None]) -> tuple[int, int]:
    rng = random.Random(seed)
    bad = 0
    for i in range(trials):
        setup = random_setup(rng)
        _, duration = await reference(setup)
        cancel = random_cancel(rng, duration)
        again, resumed, where = await trial(setup, cancel)
        if not (again and resumed):
            bad += 1
            log(
                f"INEXACT trial {i}: {setup} {cancel} stopped at {where}: again={again}"
                f" resume={resumed}"
            )
    return trials, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=500, help="cancellations per backend")
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # bit-exact comparisons across threads
    failed = False
    for backend in args.backends.split(","):
        start = time.perf_counter()
        total, bad = anyio.run(soak, args.trials, args.seed, print, backend=backend)
        _REFERENCES.clear()
        took = time.perf_counter() - start
        print(f"{backend}: {total} random cancellations, {bad} inexact ({took:.0f} s)")
        failed |= bad > 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
