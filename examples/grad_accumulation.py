"""Gradient accumulation over micro-batches: a custom FitBatch, written against the public API.

Each training batch is split into ``micro_batches`` slices. The Gradient stage runs once per slice
(so ``before_gradient``/``after_gradient`` run per slice too) with its loss scaled by the slice's
share of the batch; the gradients add up in ``.grad``, and the Update stage then steps the
optimizer once for the whole batch. Peak activation memory is that of one slice, and the result is
the full batch's gradient step: the demo trains the same model both ways and compares the weights.

Run it with::

    python examples/grad_accumulation.py
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import anyio
import torch

from aiolearner import Callback, FitBatch, Gradient, Learner, State, split_batch


class ScaledGradient(Gradient):
    """Gradient whose backward pass is scaled by ``scale`` (the slice's share of the batch).

    It keeps the stage name ``gradient`` (inherited from :class:`Gradient`), so callbacks hooked
    on ``before_gradient``/``after_gradient`` see each micro-batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def compute(self, state: State) -> None:
        inputs, targets = split_batch(state.batch, self.name)
        # train_model: under a distributed strategy, DDP's wrapper (it averages the gradients).
        output = state.train_model(inputs)
        loss = state.loss_fn(output, targets)
        (loss * self.scale).backward()  # type: ignore[no-untyped-call]
        state.output = output
        state.loss = loss


class AccumulatingFitBatch(FitBatch):
    """One training batch as ``micro_batches`` gradient passes and one optimizer step.

    Pseudo-code, with hook order::

        before_fit_batch
          for each slice of the batch:
            before_gradient; ScaledGradient (backward of loss * share); after_gradient
          state.batch, output, loss = the whole batch's (loss: the sample-weighted mean)
          before_update; Update (one optimizer step, step += 1); after_update
        after_fit_batch

    Args:
        micro_batches: how many slices each batch is cut into (the last ones may be smaller).
    """

    def __init__(self, micro_batches: int) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        self.scaled = ScaledGradient()
        super().__init__(gradient=self.scaled)
        self.micro_batches = micro_batches

    async def run(self, state: State) -> None:
        inputs, targets = split_batch(state.batch, self.name)
        total = int(inputs.shape[0])
        outputs: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        slices = list(
            zip(inputs.chunk(self.micro_batches), targets.chunk(self.micro_batches), strict=True)
        )
        for i, (x, y) in enumerate(slices):
            share = x.shape[0] / total
            self.scaled.scale = share
            state.batch = (x, y)
            if i < len(slices) - 1:
                # Under a distributed strategy the summed gradients are all-reduced once, with
                # the last slice's backward (no_sync is a no-op in one process).
                with self.context.no_sync():
                    await self.gradient(state)
            else:
                await self.gradient(state)
            outputs.append(state.output.detach())
            losses.append(state.loss.detach() * share)
        # The callbacks after this point see the whole batch, as with the default FitBatch.
        state.batch = (inputs, targets)
        state.output = torch.cat(outputs)
        state.loss = torch.stack(losses).sum()
        await self.update(state)


def make_data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eight batches of 32 samples of a 10-class problem with a learnable rule."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 20, generator=gen)
    y = (x[:, :10].argmax(dim=1) + (x[:, 10] > 0).long()) % 10
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]


def make_model(seed: int = 0) -> torch.nn.Module:
    """A small MLP with a fixed initialisation (no batch norm: slices must not change it)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def make_learner(
    micro_batches: int | None, *, seed: int = 0, callbacks: Sequence[Callback] = ()
) -> Learner[Any]:
    """A learner on :func:`make_data`; with ``micro_batches``, it accumulates gradients."""
    model = make_model(seed)
    stages = None if micro_batches is None else {"fit_batch": AccumulatingFitBatch(micro_batches)}
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.nn.functional.cross_entropy,
        make_data(seed),
        callbacks=callbacks,
        stages=stages,
    )


async def main(epochs: int = 3, micro_batches: int = 4, *, verbose: bool = True) -> float:
    """Train with and without accumulation; returns the largest weight difference."""
    plain = make_learner(None)
    accumulating = make_learner(micro_batches)
    await plain.fit(epochs)
    await accumulating.fit(epochs)
    difference = max(
        float((a.detach() - b.detach()).abs().max())
        for a, b in zip(plain.model.parameters(), accumulating.model.parameters(), strict=True)
    )
    if verbose:
        print(accumulating.describe())
        print(
            f"after {epochs} epochs ({accumulating.state.step} steps):"
            f" train loss {plain.state.metrics['train_loss']:.4f} (full batches),"
            f" {accumulating.state.metrics['train_loss']:.4f}"
            f" ({micro_batches} micro-batches per batch);"
            f" largest weight difference {difference:.2e}"
        )
    return difference


if __name__ == "__main__":
    diff = anyio.run(main)
    # Float sums in a different order differ in the last bits, nothing more.
    sys.exit(0 if diff < 1e-5 else 1)
