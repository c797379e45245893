"""The digits demo on several processes: ``strategy=DDP()``, launched by ``torchrun``.

The same small CNN as ``examples/digits.py`` learns scikit-learn's handwritten digits, now on
every rank of a torch.distributed job: each rank trains on its shard of every epoch (a
``DistributedSampler`` the strategy puts in), DDP averages the gradients, validation is split
across ranks without duplicates and reduced, and every rank stops at the same step when early
stopping (or anything else) asks. Only rank 0 prints and writes checkpoints; with ``--resume`` a
new job continues from ``last.pt``. Run it on one machine with::

    torchrun --standalone --nproc-per-node=2 examples/distributed/digits_ddp.py

on GPUs with ``--nproc-per-node=gpu`` (NCCL), and on a cluster with the same command on every
node::

    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=$HEAD_NODE:29500 --rdzv-id=$JOB_ID examples/distributed/digits_ddp.py

It exits with status 1 when the final validation accuracy is below 95 %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (torchrun): the demo's helpers are two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from aiolearner import DDP, Callback, Learner, StateView
from aiolearner.callbacks import Checkpoint, EarlyStopping, Metrics, ProgressBar
from examples.digits import TARGET_ACCURACY, PrintEpoch, make_data, make_model


class PrintOnRankZero(PrintEpoch):
    """The demo's epoch line, printed by rank 0 only.

    Every rank has the same callbacks (the ranks agree on each hook's stops, so their hooks must
    be the same): the others simply print nothing.
    """

    def after_epoch(self, state: StateView) -> None:
        if state.strategy is None or state.strategy.is_main:
            super().after_epoch(state)


def train(
    epochs: int = 10,
    *,
    directory: Path = Path("runs/digits-ddp"),
    resume: bool = False,
    seed: int = 0,
    backend: str = "asyncio",
    strategy: Any = None,
) -> dict[str, Any]:
    """Train on every rank; returns the last validation results (the same on every rank)."""
    torch.manual_seed(seed)
    train_data, val_data = make_data(seed=seed)
    model = make_model()
    callbacks: list[Callback] = [
        Metrics(["accuracy"]),  # reduced across ranks: the accuracy over the whole set
        Checkpoint(directory / "checkpoints", monitor="val_accuracy", mode="max", keep_periodic=0),
        EarlyStopping("val_accuracy", mode="max", patience=3),
    ]
    callbacks.append(ProgressBar() if sys.stdout.isatty() else PrintOnRankZero(epochs))
    learner: Learner[tuple[torch.Tensor, torch.Tensor]] = Learner(
        model,
        torch.optim.Adam(model.parameters(), lr=3e-3),
        torch.nn.functional.cross_entropy,
        train_data,  # a DataLoader: the strategy shards it (per-rank batches of 64)
        val_data,
        callbacks=callbacks,
        strategy=DDP() if strategy is None else strategy,
    )
    learner.fit_sync(epochs, resume="last" if resume else None, backend=backend)  # type: ignore[arg-type]
    if learner.state.is_valid("stop_reason") and learner.strategy is not None:
        if learner.strategy.is_main:
            print(f"stopped: {learner.state.stop_reason}", flush=True)
    return dict(learner.state.validation)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--directory", type=Path, default=Path("runs/digits-ddp"))
    parser.add_argument("--resume", action="store_true", help="continue from last.pt")
    args = parser.parse_args()
    results = train(args.epochs, directory=args.directory, resume=args.resume)
    accuracy = float(results["accuracy"])
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"validation accuracy on held-out digits: {accuracy:.2%}", flush=True)
    return 0 if accuracy >= TARGET_ACCURACY else 1


if __name__ == "__main__":
    sys.exit(main())
