"""A checkpoint resumed by another number of ranks than saved it.

Each rank's share of the data then has another length: an epoch interrupted half way goes on
from the same share of its batches (batch 3 of 8 on two ranks is batch 6 of 16 on one), with a
warning saying the run is not exact. It used to go on from the same batch index, which could be
past the end of the shorter share (``RuntimeError: cannot resume train_data at batch 9``); and a
checkpoint of several ranks resumed by one process gave no warning at all.
(``tests/distributed`` runs the same with torchrun; here one process stands in for one rank.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from aiolearner import Callback, Learner, StateView, StopFit
from aiolearner._dist._persist import on_another_world_size
from aiolearner.testing import make_batches, tiny_model


class StopAt(Callback):
    reads = frozenset({"step"})

    def after_fit_batch(self, state: StateView) -> None:
        if state.step == 3:
            raise StopFit("preempted")


def learner(batches: int, callbacks: list[Callback] | None = None) -> Learner[Any]:
    model = tiny_model(seed=0)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        make_batches(batches),
        callbacks=callbacks or [],
    )


async def mid_epoch_checkpoint() -> dict[str, Any]:
    first = learner(8, [StopAt()])
    await first.fit(1)
    assert first.state.batch_index == 3
    return dict(first.state_dict())


async def test_a_checkpoint_of_two_ranks_resumed_by_one_process_goes_on_from_the_same_share() -> (
    None
):
    checkpoint = await mid_epoch_checkpoint()
    checkpoint["ranks"] = {"world_size": 2, "entries": None}
    second = learner(16)
    with pytest.warns(RuntimeWarning, match=r"saved by 2 rank\(s\) and is resumed by 1.*batch 6"):
        second.load_state_dict(checkpoint)
    assert (second.state.step, second.state.batch_index) == (3, 6)
    await second.fit(1)
    assert second.state.step == 3 + 10  # the epoch's 10 batches left


async def test_a_one_process_checkpoint_resumed_by_more_ranks_starts_within_their_share() -> None:
    checkpoint = await mid_epoch_checkpoint()
    with pytest.warns(RuntimeWarning, match=r"saved by 1 rank\(s\) and is resumed by 2.*batch 1"):
        moved = on_another_world_size(checkpoint, 2)
    assert moved["progress"]["batch_index"] == 1  # 3 of 8 batches: 1 of each rank's 4
    assert checkpoint["progress"]["batch_index"] == 3  # (the given one is left as it was)


async def test_the_same_number_of_ranks_changes_nothing() -> None:
    checkpoint = await mid_epoch_checkpoint()
    assert on_another_world_size(checkpoint, 1) is checkpoint
    checkpoint["ranks"] = {"world_size": 2, "entries": None}
    assert on_another_world_size(checkpoint, 2) is checkpoint
