"""The examples run and do what they say (quick versions: few epochs)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from aiolearner import Callback, StateView
from examples import digits, gan, grad_accumulation


class CountHooks(Callback):
    """Counts gradient passes and optimizer steps."""

    def __init__(self) -> None:
        self.gradients = 0
        self.updates = 0
        self.batch_sizes: list[int] = []

    reads = frozenset({"batch"})

    def after_gradient(self, state: StateView) -> None:
        self.gradients += 1
        self.batch_sizes.append(int(state.batch[0].shape[0]))

    def after_update(self, state: StateView) -> None:
        self.updates += 1


async def test_grad_accumulation_equals_full_batches() -> None:
    difference = await grad_accumulation.main(epochs=1, micro_batches=4, verbose=False)
    assert difference < 1e-5


async def test_grad_accumulation_runs_gradient_hooks_per_micro_batch() -> None:
    counter = CountHooks()
    learner = grad_accumulation.make_learner(3, callbacks=[counter])
    await learner.fit(1)
    batches = len(grad_accumulation.make_data())
    assert counter.gradients == 3 * batches
    assert counter.updates == batches
    # 32 samples cut in 3 slices: 11, 11, 10.
    assert counter.batch_sizes[:3] == [11, 11, 10]
    assert learner.state.step == batches


def test_accumulating_fit_batch_rejects_zero_micro_batches() -> None:
    with pytest.raises(ValueError, match="micro_batches"):
        grad_accumulation.AccumulatingFitBatch(0)


async def test_gan_generator_learns_the_distribution() -> None:
    learner = gan.make_learner(verbose=False)
    model = learner.model
    assert isinstance(model, gan.GAN)
    start = float((model.sample(2000).mean(0) - gan.REAL_MEAN).norm())
    errors = await gan.main(epochs=3, verbose=False)
    assert start > 1.5
    # (It goes on to about 0.1 in the demo's 10 epochs.)
    assert errors["mean_error"] < 1.0


def test_gan_stages_are_named_after_their_classes() -> None:
    learner = gan.make_learner(verbose=False)
    tree = learner.describe()
    # Both optimizer steps run as one fused batch: one call, one hop, one write-lock hold.
    assert "GANFitBatch (fit_batch) [fused batch]" in tree
    assert "DiscriminatorStep (discriminator_step)" in tree
    assert "GeneratorStep (generator_step)" in tree
    assert learner.stage("fit_batch").children[0].name == "discriminator_step"


async def test_digits_learns_in_two_epochs() -> None:
    out = io.StringIO()
    results = await digits.train(2, out=out)
    assert results["accuracy"] > 0.8
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("epoch  2/2")
    assert "val accuracy" in lines[1]


def test_digits_main_exit_status(monkeypatch: pytest.MonkeyPatch) -> None:
    async def poor(epochs: int = 10, directory: Path = Path("unused")) -> float:
        return 0.5

    monkeypatch.setattr(digits, "amain", poor)
    assert digits.main() == 1


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_digits_on_a_terminal_prints_each_epoch_once() -> None:
    out = FakeTerminal()
    await digits.train(3, out=out)
    text = out.getvalue()
    # The bar's line per epoch, numbered from 1; not the plain lines as well.
    assert [text.count(f"epoch {n}: train_loss") for n in (1, 2, 3)] == [1, 1, 1]
    assert "epoch 0" not in text
    assert "train loss" not in text  # PrintEpoch's format


async def test_digits_keeps_last_and_best_checkpoints_only(tmp_path: Path) -> None:
    out = io.StringIO()
    await digits.train(3, out=out, directory=tmp_path)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(files) == 2
    assert files[1] == "last.pt"
    assert files[0].startswith("best-epoch-")
    assert [line[:10] for line in out.getvalue().splitlines()[:3]] == [
        "epoch  1/3",
        "epoch  2/3",
        "epoch  3/3",
    ]
