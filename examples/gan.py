"""A two-optimizer GAN on toy 2-D data: a custom FitBatch, written against the public API.

The real data are points from a tilted 2-D Gaussian. The learner has two optimizers, by name:
``Learner(gan, {"g": g_opt, "d": d_opt}, ...)``. Each training batch runs two steps, each a
gradient stage followed by the update of its own optimizer:

* ``DiscriminatorStep``: generate a fake batch, compute the discriminator's loss (real against
  fake) and its gradients, then ``Update("d", commit=False)`` steps the discriminator's Adam;
* ``GeneratorStep``: the generator's loss against the updated discriminator and its gradients,
  then ``Update("g")`` steps the generator's Adam and commits the batch (``step`` advances).

Every optimizer is in the learner's ``state_dict()``, so a checkpoint holds both Adam states and a
resumed run goes on exactly as an uninterrupted one would (``tests/test_examples.py`` checks it
to the bit). Callbacks take the optimizer they apply to: the discriminator's learning rate
follows a schedule of its own (``LRSchedule(..., optimizer="d")``, stepped in ``after_update_d``,
the hook of ``Update("d")``).

With ``def`` hooks only (the default here) the batch is *fused*: both steps run back to back in
one call, in one hop to the worker thread when the compute policy hops, under the write side of
the weights lock, so no one ever sees the discriminator updated without the generator. A callback
prints the distance between the generated and the real distribution after each epoch.

Run it with::

    python examples/gan.py
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import anyio
import torch
from torch.nn.functional import binary_cross_entropy_with_logits

from aiolearner import Callback, ComputeStage, FitBatch, Learner, Stage, State, StateView, Update
from aiolearner.callbacks import LRSchedule

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


class DiscriminatorGradient(ComputeStage):
    """Generates ``state.output`` (a fake batch); the discriminator's loss and gradients.

    Sets ``state.d_loss``, a field of this example: stages may add their own, declaring how
    long each stays valid (here one batch: reading it in the next batch's ``before_`` hooks is
    an error, not a stale value).
    """

    fields: ClassVar[dict[str, str]] = {"output": "batch", "d_loss": "batch"}

    def compute(self, state: State) -> None:
        gan: GAN = state.model  # type: ignore[assignment]
        real: torch.Tensor = state.batch
        fake = gan(torch.randn(real.shape[0], NOISE_DIM))
        d_real = gan.discriminator(real)
        d_fake = gan.discriminator(fake.detach())
        loss = state.loss_fn(d_real, torch.ones_like(d_real)) + state.loss_fn(
            d_fake, torch.zeros_like(d_fake)
        )
        # Gradients for the discriminator's parameters only (what its optimizer steps).
        loss.backward(inputs=list(gan.discriminator.parameters()))  # type: ignore[no-untyped-call]
        state.output = fake
        state.d_loss = loss.detach()


class GeneratorGradient(ComputeStage):
    """The generator's loss on the fake batch against the updated discriminator; its gradients."""

    def compute(self, state: State) -> None:
        gan: GAN = state.model  # type: ignore[assignment]
        d_fake = gan.discriminator(state.output)
        loss = state.loss_fn(d_fake, torch.ones_like(d_fake))
        # Gradients for the generator's parameters only: the discriminator's stay untouched.
        loss.backward(inputs=list(gan.generator.parameters()))  # type: ignore[no-untyped-call]
        state.output = state.output.detach()
        state.loss = loss.detach()


class DiscriminatorStep(Stage):
    """The discriminator's gradients, then its optimizer's step (``update_d``), no commit."""

    def __init__(self) -> None:
        super().__init__(DiscriminatorGradient(), Update("d", commit=False))


class GeneratorStep(Stage):
    """The generator's gradients, then its optimizer's step (``update_g``), which commits."""

    def __init__(self) -> None:
        super().__init__(GeneratorGradient(), Update("g"))


class GANFitBatch(FitBatch):
    """One GAN batch: :class:`DiscriminatorStep`, then :class:`GeneratorStep`.

    Pseudo-code, with hook order::

        before_fit_batch
          before_discriminator_step
            before_discriminator_gradient; DiscriminatorGradient; after_discriminator_gradient
            before_update_d; Update("d", commit=False); after_update_d
          after_discriminator_step
          before_generator_step
            before_generator_gradient; GeneratorGradient; after_generator_gradient
            before_update_g; Update("g"); after_update_g                    (step += 1)
          after_generator_step
        after_fit_batch
    """

    def __init__(self) -> None:
        super().__init__(DiscriminatorStep(), GeneratorStep())


class Distance(Callback):
    """After each epoch, compares 2,000 generated points with the real distribution.

    Puts ``mean_error`` (distance between the means) and ``std_error`` (largest difference of
    the per-axis standard deviations) in ``state.metrics``, and prints them. It declares the two
    keys it writes (and the one it reads), not the whole ``metrics`` field, so other callbacks
    that add metrics of their own need no order with it.
    """

    reads = frozenset({"model", "epoch", "metrics.train_loss"})
    writes = frozenset({"metrics.mean_error", "metrics.std_error"})

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

    def state_dict(self) -> dict[str, Any]:
        # Its sampling generator moves on every epoch: a resumed run must sample the same.
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: Any) -> None:
        self._gen.set_state(state["generator"])


def real_points(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of the real distribution."""
    return REAL_MEAN + torch.randn(n, 2, generator=generator) @ REAL_MIX.T


def make_learner(
    *,
    seed: int = 0,
    verbose: bool = True,
    n_batches: int = 50,
    callbacks: Sequence[Callback] = (),
    **options: Any,
) -> Learner[Any]:
    """The GAN learner: ``n_batches`` batches of 128 real points per epoch (``options`` go to
    the Learner, ``callbacks`` after the example's own)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    data = [real_points(128, gen) for _ in range(n_batches)]
    gan = GAN()
    g_opt = torch.optim.Adam(gan.generator.parameters(), lr=1e-2, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(gan.discriminator.parameters(), lr=1e-2, betas=(0.5, 0.999))
    # The discriminator's learning rate decays (per optimizer step of "d").
    d_schedule = LRSchedule(
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.999), optimizer="d"
    )
    return Learner(
        gan,
        {"g": g_opt, "d": d_opt},  # state.optimizer is the first: the generator's
        binary_cross_entropy_with_logits,
        data,
        callbacks=[Distance(verbose=verbose), d_schedule, *callbacks],
        stages={"fit_batch": GANFitBatch()},
        **options,
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
