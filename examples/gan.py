"""A two-optimizer GAN on toy 2-D data: a custom FitBatch, written against the public API.

The real data are points from a tilted 2-D Gaussian. Each training batch runs two compute stages:

* ``DiscriminatorStep``: generate a fake batch, train the discriminator (its own optimizer) to tell
  real from fake;
* ``GeneratorStep``: train the generator (the learner's optimizer) to fool the updated
  discriminator; the batch is committed (``step`` advances) with this update.

Both change weights, so both declare ``writes_weights = True``: they run under the write side of
the learner's weights lock. With ``def`` hooks only (the default here) the batch is *fused*: both
steps run back to back in one call, in one hop to the worker thread when the compute policy hops,
so no one ever sees the discriminator updated without the generator. A callback prints the
distance between the generated and the real distribution after each epoch.

Run it with::

    python examples/gan.py
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import anyio
import torch
from torch.nn.functional import binary_cross_entropy_with_logits

from aiolearner import Callback, ComputeStage, FitBatch, Learner, State, StateView

#: The real distribution: mean and a matrix A such that x = mean + A z, z ~ N(0, I).
REAL_MEAN = torch.tensor([2.0, -1.0])
REAL_MIX = torch.tensor([[0.6, 0.0], [0.3, 0.3]])
NOISE_DIM = 2


class GAN(torch.nn.Module):
    """A generator and a discriminator, kept in one module so the learner sees all weights."""

    def __init__(self) -> None:
        super().__init__()
        # Affine, like the real distribution's map from noise: the GAN has to find it.
        self.generator = torch.nn.Linear(NOISE_DIM, 2)
        self.discriminator = torch.nn.Sequential(
            torch.nn.Linear(2, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 1)
        )

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.generator(noise)  # type: ignore[no-any-return]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` generated points (no gradient)."""
        with torch.no_grad():
            return self.generator(torch.randn(n, NOISE_DIM, generator=generator))  # type: ignore[no-any-return]


class DiscriminatorStep(ComputeStage):
    """Generates ``state.output`` (a fake batch) and takes one discriminator step.

    Sets ``state.d_loss``, a field of this example: stages may add their own, declaring how
    long each stays valid (here one batch: reading it in the next batch's ``before_`` hooks is
    an error, not a stale value).
    """

    writes_weights = True
    fields: ClassVar[dict[str, str]] = {"output": "batch", "d_loss": "batch"}

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        self.optimizer = optimizer

    def compute(self, state: State) -> None:
        gan: GAN = state.model  # type: ignore[assignment]
        real: torch.Tensor = state.batch
        fake = gan(torch.randn(real.shape[0], NOISE_DIM))
        d_real = gan.discriminator(real)
        d_fake = gan.discriminator(fake.detach())
        loss = state.loss_fn(d_real, torch.ones_like(d_real)) + state.loss_fn(
            d_fake, torch.zeros_like(d_fake)
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        state.output = fake
        state.d_loss = loss.detach()


class GeneratorStep(ComputeStage):
    """One generator step on the fake batch against the updated discriminator; commits."""

    writes_weights = True

    def compute(self, state: State) -> None:
        gan: GAN = state.model  # type: ignore[assignment]
        d_fake = gan.discriminator(state.output)
        loss = state.loss_fn(d_fake, torch.ones_like(d_fake))
        optimizer = state.optimizer  # the generator's
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        # The discriminator's gradients from this backward are not wanted.
        gan.discriminator.zero_grad(set_to_none=True)
        state.output = state.output.detach()
        state.loss = loss.detach()
        self.context.commit(state)


class GANFitBatch(FitBatch):
    """One GAN batch: :class:`DiscriminatorStep`, then :class:`GeneratorStep`.

    Pseudo-code, with hook order::

        before_fit_batch
          before_discriminator_step; DiscriminatorStep; after_discriminator_step
          before_generator_step;     GeneratorStep;     after_generator_step   (step += 1)
        after_fit_batch
    """

    def __init__(self, discriminator_optimizer: torch.optim.Optimizer) -> None:
        super().__init__(DiscriminatorStep(discriminator_optimizer), GeneratorStep())


class Distance(Callback):
    """After each epoch, compares 2,000 generated points with the real distribution.

    Puts ``mean_error`` (distance between the means) and ``std_error`` (largest difference of
    the per-axis standard deviations) in ``state.metrics``, and prints them.
    """

    reads = frozenset({"model", "epoch"})
    writes = frozenset({"metrics"})

    def __init__(self, *, verbose: bool = True) -> None:
        self.verbose = verbose
        self._gen = torch.Generator().manual_seed(1234)
        self._real = real_points(2000, torch.Generator().manual_seed(4321))

    def after_epoch(self, state: StateView) -> None:
        fake = state.model.sample(2000, self._gen)
        mean_error = float((fake.mean(0) - self._real.mean(0)).norm())
        std_error = float((fake.std(0) - self._real.std(0)).abs().max())
        state.metrics["mean_error"] = mean_error
        state.metrics["std_error"] = std_error
        if self.verbose:
            print(
                f"epoch {state.epoch + 1:2d}: generator loss {state.metrics['train_loss']:.3f}"
                f"  mean error {mean_error:.3f}  std error {std_error:.3f}",
                flush=True,
            )


def real_points(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of the real distribution."""
    return REAL_MEAN + torch.randn(n, 2, generator=generator) @ REAL_MIX.T


def make_learner(*, seed: int = 0, verbose: bool = True, n_batches: int = 50) -> Learner[Any]:
    """The GAN learner: ``n_batches`` batches of 128 real points per epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    data = [real_points(128, gen) for _ in range(n_batches)]
    gan = GAN()
    g_opt = torch.optim.Adam(gan.generator.parameters(), lr=1e-2, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(gan.discriminator.parameters(), lr=1e-2, betas=(0.5, 0.999))
    # The learner's optimizer is the generator's (what learner.state_dict() saves); the
    # discriminator's belongs to its stage.
    return Learner(
        gan,
        g_opt,
        binary_cross_entropy_with_logits,
        data,
        callbacks=[Distance(verbose=verbose)],
        stages={"fit_batch": GANFitBatch(d_opt)},
    )


async def main(epochs: int = 10, *, verbose: bool = True, seed: int = 0) -> dict[str, float]:
    """Train the GAN; returns the final ``mean_error`` and ``std_error``."""
    learner = make_learner(seed=seed, verbose=verbose)
    await learner.fit(epochs)
    metrics = learner.state.metrics
    return {"mean_error": metrics["mean_error"], "std_error": metrics["std_error"]}


if __name__ == "__main__":
    errors = anyio.run(main)
    sys.exit(0 if errors["mean_error"] < 0.3 else 1)
