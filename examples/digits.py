"""Train a small network on scikit-learn's handwritten digits, under asyncio.

The data set (1,797 8x8 grey-scale images of the digits 0-9) ships inside scikit-learn, so the
demo needs no download. The learner runs inside an ordinary ``asyncio`` program, under a timeout
like any other coroutine, with the shipped practices: ``Metrics`` (accuracy on the device),
``ProgressBar`` (on a terminal), ``Checkpoint`` (``last.pt`` and the best by validation accuracy,
nothing else, written atomically off the event loop), ``EarlyStopping`` and ``Recorder`` (whose
history is plotted to a PNG at the end). On a terminal the bar prints one line per epoch; elsewhere
(a log file, CI) a small callback of the demo does. Epochs are numbered from 1 in what it prints
("epoch 1/10" is the first), while ``state.epoch`` counts the epochs completed. Run it with::

    python examples/digits.py [output directory, default runs/digits]

It exits with status 1 when the final validation accuracy is below 95 %.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import aiolearner
from aiolearner import Callback, Learner, StateView
from aiolearner.callbacks import Checkpoint, EarlyStopping, Metrics, ProgressBar, Recorder

#: The accuracy the demo must reach on held-out digits.
TARGET_ACCURACY = 0.95


class PrintEpoch(Callback):
    """Prints the training loss and accuracy, validation loss and accuracy once per epoch.

    For output that is not a terminal; on a terminal the progress bar prints each epoch's line.
    """

    reads = frozenset({"epoch", "metrics", "validation"})

    def __init__(self, epochs: int, *, out: Any = None) -> None:
        self._epochs = epochs
        self._out = out
        self._start = time.perf_counter()

    def before_fit_run(self, state: StateView) -> None:
        self._start = time.perf_counter()

    def after_epoch(self, state: StateView) -> None:
        # `epoch` counts the completed epochs, and advances once this one is over: the epoch
        # that just ended is number epoch + 1.
        validation = state.validation
        print(
            f"epoch {state.epoch + 1:2d}/{self._epochs}"
            f"  train loss {state.metrics['train_loss']:.4f}"
            f"  train accuracy {state.metrics['train_accuracy']:6.2%}"
            f"  val loss {validation['loss']:.4f}"
            f"  val accuracy {validation['accuracy']:6.2%}"
            f"  ({time.perf_counter() - self._start:.1f} s)",
            file=self._out if self._out is not None else sys.stdout,
            flush=True,
        )


def make_data(
    *, seed: int, batch_size: int = 64, val_fraction: float = 0.2
) -> tuple[DataLoader[tuple[torch.Tensor, ...]], DataLoader[tuple[torch.Tensor, ...]]]:
    """Training and held-out validation loaders of the digits, split with a fixed seed."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    train = TensorDataset(images[train_idx], labels[train_idx])
    val = TensorDataset(images[val_idx], labels[val_idx])
    shuffle = torch.Generator().manual_seed(seed + 1)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=shuffle),
        DataLoader(val, batch_size=256),
    )


def make_model() -> torch.nn.Module:
    """A small convolutional network for 1x8x8 images."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, kernel_size=3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, kernel_size=3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


async def train(
    epochs: int = 10,
    *,
    seed: int = 0,
    verbose: bool = True,
    out: Any = None,
    directory: Path | None = None,
) -> dict[str, Any]:
    """Train on the digits for ``epochs`` epochs; returns the last validation results.

    With ``verbose``, one line per epoch goes to ``out`` (default stdout): from a live progress bar
    when ``out`` is a terminal, else from :class:`PrintEpoch`, never both. With ``directory``,
    ``directory/checkpoints`` holds ``last.pt`` and the best checkpoint by validation accuracy
    (only those: ``keep_periodic=0``), training stops early when validation accuracy stalls for 3
    epochs, and the recorded history is plotted to ``directory/history.png``. Works under any
    anyio backend (the demo's ``main`` uses asyncio).
    """
    torch.manual_seed(seed)
    train_data, val_data = make_data(seed=seed)
    model = make_model()
    # Accuracy is accumulated on the device per batch and reduced once per pass (no host sync
    # per batch); it lands in state.validation["accuracy"] and state.metrics["val_accuracy"].
    callbacks: list[Callback] = [Metrics(["accuracy"])]
    stream = out if out is not None else sys.stdout
    if verbose:
        # One summary per epoch: the bar's on a terminal (printing beside a live bar would garble
        # it), the demo's own lines elsewhere (CI logs, files).
        if stream.isatty():
            callbacks.append(ProgressBar(file=stream))
        else:
            callbacks.append(PrintEpoch(epochs, out=stream))
    recorder = Recorder()
    if directory is not None:
        callbacks += [
            # Every epoch refreshes last.pt; the best by validation accuracy is kept beside it.
            Checkpoint(
                directory / "checkpoints",
                monitor="val_accuracy",
                mode="max",
                top_k=1,
                keep_periodic=0,
            ),
            EarlyStopping("val_accuracy", mode="max", patience=3),
            recorder,
        ]
    learner: Learner[tuple[torch.Tensor, torch.Tensor]] = Learner(
        model,
        torch.optim.Adam(model.parameters(), lr=3e-3),
        torch.nn.functional.cross_entropy,
        train_data,
        val_data,
        callbacks=callbacks,
    )
    await learner.fit(epochs)
    if directory is not None:
        # Plotting is blocking work: off the event loop.
        plot = await anyio.to_thread.run_sync(recorder.plot_history, directory / "history.png")
        if verbose:
            print(f"history plot: {plot}", file=stream)
    return dict(learner.state.validation)


async def amain(epochs: int = 10, directory: Path = Path("runs/digits")) -> float:
    """The demo: train under a one-minute timeout; returns the final validation accuracy."""
    print(
        f"aiolearner {aiolearner.__version__}, torch {torch.__version__}: training a small CNN"
        f" on scikit-learn's digits for {epochs} epochs",
        flush=True,
    )
    # `fit` is an ordinary coroutine: a timeout (or any cancel scope) stops it cleanly.
    with anyio.fail_after(60):
        results = await train(epochs, directory=directory)
    accuracy = float(results["accuracy"])
    print(f"validation accuracy on held-out digits: {accuracy:.2%}", flush=True)
    return accuracy


def main() -> int:
    """Run the demo under asyncio; the exit status says whether it reached the target."""
    # The model's ops are far too small to gain from splitting them across threads; one thread
    # avoids the thread pool's hand-offs, which cost several times the work on a busy machine.
    torch.set_num_threads(1)
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/digits")
    accuracy = asyncio.run(amain(directory=directory))
    if accuracy < TARGET_ACCURACY:
        print(f"FAILED: accuracy below {TARGET_ACCURACY:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
