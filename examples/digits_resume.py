"""The digits demo with the everyday callbacks, interrupted and resumed from a checkpoint.

It trains the small CNN of ``examples/digits.py`` with ``Metrics`` (accuracy), a ``ProgressBar``
(plain lines when the output is not a terminal), ``Checkpoint`` (last, one per epoch, and the
two best by validation accuracy), ``EarlyStopping`` and a ``Recorder``. The first run is
cancelled part-way through an epoch, as a timeout or a closing service would; a second
learner, built from scratch as a new process would, continues it with
``fit(epochs, resume="last")``. At the end the recorder draws the history to a PNG. Run it with::

    python examples/digits_resume.py [output directory]

It needs the ``demo``, ``rich`` and ``plot`` extras and exits with status 1 when the final
validation accuracy is below 95 %.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import anyio
import torch

from aiolearner import Callback, Learner, StateView
from aiolearner.callbacks import Checkpoint, EarlyStopping, Metrics, ProgressBar, Recorder

try:
    from examples import digits
except ImportError:  # run as a script: examples/ itself is on sys.path
    import digits  # type: ignore[no-redef,import-not-found]


class CancelAtStep(Callback):
    """Cancels a scope after the training step ``at`` (stands in for a timeout or a crash)."""

    reads = frozenset({"step"})

    def __init__(self, at: int, scope: anyio.CancelScope) -> None:
        self.at = at
        self.scope = scope

    async def after_fit_batch(self, state: StateView) -> None:
        if state.step == self.at:
            self.scope.cancel()


def build(
    directory: Path, *, out: TextIO | None = None, extra: tuple[Callback, ...] = ()
) -> tuple[Learner[Any], Checkpoint, Recorder]:
    """The learner, built the same way for the first run and for the resumed one."""
    torch.manual_seed(0)
    train_data, val_data = digits.make_data(seed=0)
    model = digits.make_model()
    checkpoint = Checkpoint(directory / "checkpoints", monitor="val_accuracy", mode="max", top_k=2)
    recorder = Recorder()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.Adam(model.parameters(), lr=3e-3),
        torch.nn.functional.cross_entropy,
        train_data,
        val_data,
        callbacks=[
            Metrics(["accuracy"]),
            ProgressBar(file=out),
            checkpoint,
            EarlyStopping("val_accuracy", mode="max", patience=3),
            recorder,
            *extra,
        ],
    )
    return learner, checkpoint, recorder


async def run(
    directory: Path, *, epochs: int = 8, interrupt_at: int = 30, out: TextIO | None = None
) -> dict[str, Any]:
    """Train, interrupted after step ``interrupt_at``, then resume; returns what happened."""
    with anyio.CancelScope() as scope:
        first, _, _ = build(directory, out=out, extra=(CancelAtStep(interrupt_at, scope),))
        await first.fit(epochs)
    interrupted = (first.state.epoch, first.state.step)

    # A fresh learner (as in a new process) continues the run from checkpoints/last.pt.
    learner, checkpoint, recorder = build(directory, out=out)
    await learner.fit(epochs, resume="last")
    plot = await anyio.to_thread.run_sync(recorder.plot_history, directory / "history.png")
    return {
        "interrupted_at": interrupted,
        "epochs": learner.state.epoch,
        "accuracy": float(learner.state.metrics["val_accuracy"]),
        "best": checkpoint.best_path,
        "plot": plot,
        "history": recorder.history,
    }


def main() -> int:
    """Run the demo under asyncio; the exit status says whether it reached 95 % accuracy."""
    torch.set_num_threads(1)  # see examples/digits.py
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    result = anyio.run(run, directory)
    epoch, step = result["interrupted_at"]
    # `epoch` is state.epoch then: completed epochs, so the run was in epoch number epoch + 1.
    print(f"interrupted in epoch {epoch + 1}, step {step}; resumed from {directory}/checkpoints")
    print(f"validation accuracy after {result['epochs']} epochs: {result['accuracy']:.2%}")
    print(f"best checkpoint: {result['best']}; history plot: {result['plot']}")
    if result["accuracy"] < digits.TARGET_ACCURACY:
        print(f"FAILED: accuracy below {digits.TARGET_ACCURACY:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
