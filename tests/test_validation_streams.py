"""A validation loader with its own ``generator`` draws each pass's order from it (and torch's
RandomSampler draws again when a pass ends). Continued after an interruption, in the same
learner, in a fresh one from ``state_dict()`` or from a checkpoint file, a run validates on the
same orders as the uninterrupted one: the validation losses are equal bit for bit, with
sequential and concurrent validation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Callback, Learner, State, StateView, ValidateLoss
from aiolearner.callbacks import Checkpoint
from aiolearner.testing import make_batches, make_learner

EPOCHS = 4


class Losses(Callback):
    """Keeps every validation's loss; at the ``at``-th call of ``hook``, cancels ``scope`` (or
    raises, with ``fail``)."""

    reads = frozenset({"metrics"})

    def __init__(self, hook: str = "", at: int = 0) -> None:
        self.values: list[float] = []
        self.hook, self.at, self.calls = hook, at, 0
        self.scope: anyio.CancelScope | None = None
        self.fail = False

    async def _maybe_cancel(self, hook: str) -> None:
        if hook != self.hook or self.scope is None:
            return
        self.calls += 1
        if self.calls == self.at:
            if self.fail:
                raise RuntimeError("interrupted")
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()

    async def after_validate_batch(self, state: StateView) -> None:
        await self._maybe_cancel("after_validate_batch")

    async def after_validate(self, state: StateView) -> None:
        await self._maybe_cancel("after_validate")
        self.values.append(state.metrics["val_loss"])


def make(mode: Any, directory: Path, losses: Losses) -> Learner[Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(48, 4), torch.randint(0, 3, (48,))
    train = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
    vx, vy = torch.randn(61, 4), torch.randint(0, 3, (61,))
    val = DataLoader(
        TensorDataset(vx, vy),
        batch_size=7,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        train,
        val,
        callbacks=[losses, Checkpoint(directory)],
        validate=mode,
    )


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
@pytest.mark.parametrize("hook", ["after_validate", "after_validate_batch"])
@pytest.mark.parametrize("how", ["fit again", "state_dict", "checkpoint file"])
@pytest.mark.parametrize("interruption", ["cancel", "error"])
async def test_validation_orders_survive_an_interruption(
    tmp_path: Path, mode: str, hook: str, how: str, interruption: str
) -> None:
    reference = Losses()
    await make(mode, tmp_path / "reference", reference).fit(EPOCHS)
    # The second validation, at its end or half way through its pass.
    losses = Losses(hook, at=2 if hook == "after_validate" else 13)
    learner = make(mode, tmp_path / "run", losses)
    losses.fail = interruption == "error"
    with anyio.CancelScope() as scope:
        losses.scope = scope
        if losses.fail:
            with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="interrupted")):
                await learner.fit(EPOCHS)
        else:
            await learner.fit(EPOCHS)
    assert scope.cancelled_caught is not losses.fail
    losses.scope = None
    if how == "fit again":
        await learner.fit(EPOCHS)
        got = losses.values
    else:
        fresh = Losses()
        again = make(mode, tmp_path / "again", fresh)
        if how == "state_dict":
            again.load_state_dict(learner.state_dict())
        else:
            again.load_checkpoint(tmp_path / "run" / "last.pt")
        await again.fit(EPOCHS)
        got = losses.values + fresh.values
    assert got == reference.values


class GradientProbe(ValidateLoss):
    """A validation loss stage of one's own, recording whether autograd was on."""

    seen: list[tuple[bool, bool]]

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def compute(self, state: State) -> None:
        inputs, targets = state.batch
        state.output = state.model(inputs)
        state.loss = state.loss_fn(state.output, targets)
        self.seen.append((torch.is_inference_mode_enabled(), state.loss.requires_grad))


async def test_a_validate_loss_of_ones_own_runs_in_inference_mode(tmp_path: Path) -> None:
    probe = GradientProbe()
    learner = make("sequential", tmp_path, Losses())
    learner.replace_stage("validate_loss", probe)
    await learner.validate()
    assert probe.seen
    assert set(probe.seen) == {(True, False)}


class FailingSecondPass:
    """Validation data whose second pass fails at batch ``index``."""

    def __init__(self, index: int) -> None:
        self.batches = make_batches(3, seed=2)
        self.index, self.passes = index, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        for i, batch in enumerate(self.batches):
            if self.passes == 2 and i == self.index:
                raise ValueError("bad validation batch")
            yield batch


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
@pytest.mark.parametrize("index", [0, 2])
async def test_a_failed_validation_fetch_names_the_set_and_batch(mode: Any, index: int) -> None:
    learner = make_learner(val_data=FailingSecondPass(index), validate=mode)
    with pytest.raises(ValueError, match="bad validation batch") as caught:
        await learner.fit(3)
    notes = "\n".join(caught.value.__notes__)
    assert f"validating: batch {index} of val_data" in notes
    assert "_Preopened" not in notes
    if index:
        assert "raised by val_data (FailingSecondPass) while fetching batch 2" in notes
    if mode == "concurrent":
        assert "raised by the concurrent validation of the weights" in notes
