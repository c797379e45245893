"""Successive halving: N trials train concurrently in one process; the worst are cancelled.

Every trial is a learner run by an :class:`aiolearner.FitHandle` in one task group. At each rung
(``min_epochs``, ``min_epochs * eta``, ...) the search compares the validation loss of the trials
still alive once all of them reached it, keeps the best ``1 / eta`` and cancels the others through
their handles, wherever they are: trials run at their own pace past a rung, so a cancelled trial
is often in the middle of an epoch. A trial only waits (an ``async`` callback, :class:`RungGate`)
when it reaches the next rung, or its last epoch, before the previous rungs are judged, so that no
trial outruns the rule. The survivors keep training undisturbed (the test checks their weights
against the same trials trained alone, bit for bit). The best trial is checkpointed at the end.
Run it with::

    python -m examples.trials.search [--backend trio]

Trials must not share global random state: each one's model is seeded by its own generator and
its data is fixed (shuffle with a per-learner ``torch.Generator`` if you shuffle).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import torch

from aiolearner import Callback, FitHandle, Learner, RunState, StateView

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrialConfig:
    """The hyperparameters of one trial."""

    lr: float
    hidden: int = 16
    seed: int = 0


@dataclass
class Trial:
    """One trial of the search: its learner, handle and validation loss at each rung."""

    config: TrialConfig
    learner: Learner[Batch]
    handle: FitHandle
    scores: dict[int, float] = field(default_factory=dict)
    pruned_at: int | None = None

    @property
    def val_loss(self) -> float:
        return float(self.learner.state.metrics.get("val_loss", float("inf")))


@dataclass
class SearchResult:
    trials: list[Trial]
    best: Trial
    checkpoint: Path


def make_data(seed: int = 0, n_batches: int = 8) -> tuple[list[Batch], list[Batch]]:
    """A fixed classification task (the same for every trial): train and validation batches."""
    gen = torch.Generator().manual_seed(seed)
    rule = torch.randn(10, 4, generator=gen)

    def batches(n: int) -> list[Batch]:
        out = []
        for _ in range(n):
            x = torch.randn(32, 10, generator=gen)
            out.append((x, (x @ rule).argmax(dim=1)))
        return out

    return batches(n_batches), batches(2)


class RungGate(Callback):
    """Holds a trial at the end of epoch ``e`` (a gate) until every rung before ``e`` is judged."""

    reads = frozenset({"epoch"})

    def __init__(self, gates: set[int], decided: dict[int, anyio.Event]) -> None:
        self.gates = gates
        self.decided = decided

    async def after_epoch(self, state: StateView) -> None:
        finished = state.epoch + 1  # ``epoch`` advances once the epoch is over
        if finished in self.gates:
            for rung, event in self.decided.items():
                if rung < finished:
                    await event.wait()


def make_learner(
    config: TrialConfig,
    train: list[Batch],
    val: list[Batch],
    callbacks: Sequence[Callback] = (),
) -> Learner[Batch]:
    """The trial's model, initialized from its own seed (no global RNG involved)."""
    gen = torch.Generator().manual_seed(config.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, config.hidden), torch.nn.Tanh(), torch.nn.Linear(config.hidden, 4)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    loss_fn = torch.nn.functional.cross_entropy
    return Learner(model, optimizer, loss_fn, train, val, callbacks=callbacks)


def rungs(min_epochs: int, max_epochs: int, eta: int) -> list[int]:
    """The epochs at which trials are compared: min_epochs * eta**k below max_epochs."""
    out = []
    epoch = min_epochs
    while epoch < max_epochs:
        out.append(epoch)
        epoch *= eta
    return out


def save_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def successive_halving(
    configs: Sequence[TrialConfig],
    *,
    max_epochs: int,
    min_epochs: int = 1,
    eta: int = 2,
    directory: Path,
) -> SearchResult:
    """Run the search; returns every trial, the best one and the path of its checkpoint."""
    train, val = make_data()
    schedule = rungs(min_epochs, max_epochs, eta)
    decided = {rung: anyio.Event() for rung in schedule}
    gates = {*schedule, max_epochs}
    trials = []
    for config in configs:
        learner = make_learner(config, train, val, [RungGate(gates, decided)])
        trials.append(Trial(config, learner, FitHandle(learner, max_epochs)))

    def decide() -> None:
        # Rung by rung: judge a rung once every trial still alive has reached it.
        for rung in schedule:
            if decided[rung].is_set():
                continue
            alive = [t for t in trials if t.pruned_at is None]
            if not all(rung in t.scores for t in alive):
                return
            ranked = sorted(alive, key=lambda t: t.scores[rung])
            for trial in ranked[max(1, len(alive) // eta) :]:
                trial.pruned_at = rung
                trial.handle.cancel()  # only this trial's fit: its cancel scope
            decided[rung].set()

    async def watch(trial: Trial, stream: Any) -> None:
        async for event in stream:  # one "metrics" event per finished epoch
            epoch = event.epoch + 1
            if epoch in schedule and "val_loss" in event.data:
                trial.scores[epoch] = float(event.data["val_loss"])
                decide()

    async with anyio.create_task_group() as tg:
        for trial in trials:
            # Subscribed before the run starts: the stream sees all of it, then ends with it.
            tg.start_soon(watch, trial, trial.handle.events(kinds={"metrics"}))
            tg.start_soon(trial.handle.run)

    survivors = [t for t in trials if t.handle.state is RunState.COMPLETED]
    best = min(survivors, key=lambda t: t.val_loss)
    path = directory / "best.pt"
    await anyio.to_thread.run_sync(save_atomically, best.learner.state_dict(), path)
    return SearchResult(trials, best, path)


async def main(n_trials: int, max_epochs: int) -> None:
    configs = [TrialConfig(lr=0.02 * 1.6**i, seed=i) for i in range(n_trials)]
    with tempfile.TemporaryDirectory() as tmp:
        result = await successive_halving(configs, max_epochs=max_epochs, directory=Path(tmp))
        for trial in result.trials:
            snap = trial.handle.snapshot()
            print(
                f"lr={trial.config.lr:.4f}: {snap.state:9} after {snap.epoch} epochs, step "
                f"{snap.step}, rung scores {trial.scores}"
            )
        print(f"best: lr={result.best.config.lr:.4f}, val_loss {result.best.val_loss:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.trials, args.epochs, backend=args.backend)
