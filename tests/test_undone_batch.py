"""A synchronous batch undone before its commit by a stop or an error raised in a hook of its
flow is served again as it was drawn, and torch's generators go back to where they were when it
began: the continued run, in the same process or from the file written at that stop, equals an
uninterrupted one, bit for bit, with a dataset that draws augmentation from the global
generators as it fetches and a model with dropout.

Drawing the batch again from the pass's start state, as the rebuilt pass did, gave it other
augmentation numbers (there, between the batches, dropout had drawn too); and a stop after the
forward (``after_gradient``, ``before_update``) left its dropout drawn, so the forward run again
drew other numbers, with any data.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from aiolearner import Callback, Learner, StateView, StopFit
from aiolearner.callbacks import Checkpoint, load_checkpoint_file

EPOCHS = 3
BATCHES = 6  # per epoch
AT = 8  # the step at which the hook stops (epoch 2's third batch)


class Augmented(Dataset[Any]):
    """Augmentation from torch's, numpy's and Python's global generators, as it fetches."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(BATCHES * 4, 6, generator=gen)
        self.y = torch.randint(0, 3, (BATCHES * 4,), generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        noise = 0.1 * torch.rand(6) + float(np.random.rand()) + random.random()
        return self.x[i] + noise, self.y[i]


class Pair(NamedTuple):
    """A batch type of the user's own (no checkpoint holds it)."""

    x: torch.Tensor
    y: torch.Tensor


def collate_pairs(items: list[Any]) -> Pair:
    x, y = torch.utils.data.default_collate(items)
    return Pair(x, y)


class StopsOnce(Callback):
    """Raises ``error`` (a StopFit or a RuntimeError) at step ``AT``, once, in the hook that
    :func:`stops_once` gives it."""

    reads = frozenset({"step"})

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error
        self.fired = False

    def maybe_stop(self, state: StateView) -> None:
        if not self.fired and state.step == AT:
            self.fired = True
            raise self.error("stopped by the test")


def stops_once(hook: str, error: type[BaseException]) -> StopsOnce:
    """A callback stopping in ``hook`` (hooks are found on the class)."""
    kind: type[StopsOnce] = type(f"StopsIn_{hook}", (StopsOnce,), {hook: StopsOnce.maybe_stop})
    return kind(error)


def build(*callbacks: Callback, compute: str, own_batches: bool = False) -> Learner[Any]:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )
    loader = DataLoader(
        Augmented(),
        batch_size=4,
        shuffle=True,
        collate_fn=collate_pairs if own_batches else None,
    )
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.nn.functional.cross_entropy,
        train_data=loader,
        callbacks=list(callbacks),
        compute=compute,  # type: ignore[arg-type]
        # A producer thread ("auto" starts one for a source it finds slow) would draw
        # augmentation while compute draws dropout: an order that is a race (reliability.md).
        fetch="inline",
    )


def weights(learner: Learner[Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


def assert_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, list[torch.Tensor]]:
    out = {}
    for compute in ("auto", "thread"):
        for own in (False, True):
            learner = build(compute=compute, own_batches=own)
            learner.fit_sync(EPOCHS)
            out[f"{compute}-{own}"] = weights(learner)
    return out


async def stop_once(learner: Learner[Any], error: type[BaseException]) -> None:
    if error is StopFit:
        await learner.fit(EPOCHS)
    else:
        with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="stopped by the test")):
            await learner.fit(EPOCHS)


@pytest.mark.parametrize("compute", ["auto", "thread"])
@pytest.mark.parametrize("error", [StopFit, RuntimeError], ids=["StopFit", "error"])
@pytest.mark.parametrize(
    "hook", ["before_fit_batch", "before_gradient", "after_gradient", "before_update"]
)
async def test_an_undone_batch_continues_exactly(
    tmp_path: Path,
    uninterrupted: dict[str, list[torch.Tensor]],
    hook: str,
    error: type[BaseException],
    compute: str,
) -> None:
    expected = uninterrupted[f"{compute}-False"]
    learner = build(stops_once(hook, error), Checkpoint(tmp_path), compute=compute)
    await stop_once(learner, error)
    assert learner.state.step == AT  # the batch was undone, not counted
    saved = load_checkpoint_file(tmp_path / "last.pt")
    assert saved["progress"]["step"] == AT
    assert isinstance(saved["progress"]["undone"], list)  # the batch as it was drawn
    # In the same process:
    await learner.fit(EPOCHS)
    assert learner.state.step == EPOCHS * BATCHES
    assert_equal(weights(learner), expected)
    # From the file written at the stop, in a fresh learner:
    resumed = build(Checkpoint(tmp_path / "again"), compute=compute)
    await resumed.fit(EPOCHS, resume=tmp_path / "last.pt")
    assert_equal(weights(resumed), expected)


async def test_a_batch_no_checkpoint_can_hold_is_drawn_again_on_resume(
    tmp_path: Path, uninterrupted: dict[str, list[torch.Tensor]]
) -> None:
    """A batch of the user's own type stays out of the file (it would not load with
    ``weights_only=True``); the same process still serves it again as it was."""
    expected = uninterrupted["auto-True"]
    learner = build(
        stops_once("before_fit_batch", StopFit),
        Checkpoint(tmp_path),
        compute="auto",
        own_batches=True,
    )
    await learner.fit(EPOCHS)
    assert "undone" not in load_checkpoint_file(tmp_path / "last.pt")["progress"]
    await learner.fit(EPOCHS)
    assert_equal(weights(learner), expected)
    resumed = build(Checkpoint(tmp_path / "again"), compute="auto", own_batches=True)
    await resumed.fit(EPOCHS, resume=tmp_path / "last.pt")  # runs to the end, not exactly
    assert resumed.state.step == EPOCHS * BATCHES


async def test_a_loaded_checkpoint_drops_a_kept_batch(tmp_path: Path) -> None:
    """The batch kept for the continuation belongs to the run it was undone in: loading
    another state (a file of a step before) drops it, and that file's run goes on as its own."""
    reference = build(Checkpoint(tmp_path / "ref", every_n_steps=4), compute="auto")
    await reference.fit(EPOCHS)
    expected = weights(reference)
    learner = build(
        stops_once("before_fit_batch", StopFit), Checkpoint(tmp_path / "other"), compute="auto"
    )
    await learner.fit(EPOCHS)
    assert learner._train.undone is not None
    learner.load_checkpoint(tmp_path / "ref" / "step-00000004.pt")
    assert learner._train.undone is None
    await learner.fit(EPOCHS)
    assert_equal(weights(learner), expected)
