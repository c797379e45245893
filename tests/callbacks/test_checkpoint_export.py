"""Checkpoint's weights-only and safetensors files, ``keep_periodic=0`` and ``load_best``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest
import safetensors.torch
import torch

from aiolearner import Callback, Learner, StateView
from aiolearner.callbacks import Checkpoint, _files, load_checkpoint_file, load_weights
from aiolearner.testing import make_learner, tiny_model


class Scores(Callback):
    """Puts a given score for each epoch into state.metrics."""

    reads = frozenset({"epoch"})
    writes = frozenset({"metrics"})

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def after_epoch(self, state: StateView) -> None:
        state.metrics["score"] = self.scores[state.epoch]


class CancelAtStep(Callback):
    reads = frozenset({"step"})

    def __init__(self, at: int, scope: anyio.CancelScope) -> None:
        self.at = at
        self.scope = scope

    async def after_fit_batch(self, state: StateView) -> None:
        if state.step == self.at:
            self.scope.cancel()


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def weights_of(learner: Learner[Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


async def test_weights_only_files_hold_the_state_dict_alone(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, save_weights_only=True, monitor="score", mode="min")
    learner = make_learner(callbacks=[ckpt, Scores([2.0, 1.0])], n_batches=2)
    await learner.fit(2)
    assert names(tmp_path) == [
        "best-epoch-0002-step-00000004.pt",
        "epoch-0001.pt",
        "epoch-0002.pt",
        "last.pt",
    ]
    # Plain PyTorch loads it: a flat state dict, nothing else.
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert_weights_equal(saved, weights_of(learner))
    fresh = tiny_model()
    fresh.load_state_dict(saved)
    # Weights cannot resume a run: resume="last" finds no resumable file.
    assert ckpt.find_checkpoint("last") is None
    with pytest.raises(FileNotFoundError, match="resume='last'"):
        await learner.fit(3, resume="last")


async def test_resume_uses_the_full_checkpoint_beside_a_weights_only_export(
    tmp_path: Path,
) -> None:
    export = Checkpoint(tmp_path / "export", save_weights_only=True, format="safetensors")
    full = Checkpoint(tmp_path / "full")
    learner = make_learner(callbacks=[export, full], n_batches=2)
    await learner.fit(1)
    again = make_learner(
        callbacks=[
            Checkpoint(tmp_path / "export", save_weights_only=True, format="safetensors"),
            Checkpoint(tmp_path / "full"),
        ],
        n_batches=2,
    )
    await again.fit(2, resume="last")
    assert again.state.epoch == 2
    assert names(tmp_path / "export") == [
        "epoch-0001.safetensors",
        "epoch-0002.safetensors",
        "last.safetensors",
    ]


async def test_safetensors_files(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, save_weights_only=True, format="safetensors", every_n_steps=3)
    learner = make_learner(callbacks=[ckpt], n_batches=2)
    await learner.fit(2)
    assert names(tmp_path) == [
        "epoch-0001.safetensors",
        "epoch-0002.safetensors",
        "last.safetensors",
        "step-00000003.safetensors",
    ]
    assert ckpt.last_path == tmp_path / "last.safetensors"
    final = weights_of(learner)
    assert_weights_equal(safetensors.torch.load_file(tmp_path / "last.safetensors"), final)
    with safetensors.safe_open(tmp_path / "epoch-0001.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "epoch": "1", "step": "2"}
    # The library's own readers load them too.
    fresh = tiny_model(seed=5)
    load_weights(fresh, tmp_path / "last.safetensors")
    assert_weights_equal(fresh.state_dict(), final)
    assert_weights_equal(load_checkpoint_file(tmp_path / "last.safetensors"), final)


async def test_keep_periodic_zero_keeps_last_and_best_only(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="score", mode="max", keep_periodic=0)
    learner = make_learner(callbacks=[ckpt, Scores([1.0, 3.0, 2.0, 0.0])], n_batches=2)
    await learner.fit(4)
    assert names(tmp_path) == ["best-epoch-0002-step-00000004.pt", "last.pt"]
    assert load_checkpoint_file(tmp_path / "last.pt")["progress"]["epoch"] == 4


async def test_keep_periodic_zero_still_refreshes_last_at_each_save_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Checkpoint(tmp_path, keep_periodic=0, every_n_steps=3)
    written: list[tuple[str, int]] = []
    write = ckpt._write_sync

    def spy(snap: dict[str, Any], targets: list[str], *rest: Any) -> None:
        written.extend((name, snap["progress"]["step"]) for name in targets)
        write(snap, targets, *rest)

    monkeypatch.setattr(ckpt, "_write_sync", spy)
    learner = make_learner(callbacks=[ckpt], n_batches=2)
    await learner.fit(3)
    # Every epoch boundary and every third step, then the end: last.pt only.
    assert written == [("last.pt", 2), ("last.pt", 3), ("last.pt", 4), ("last.pt", 6)]
    assert names(tmp_path) == ["last.pt"]


async def test_load_best_loads_the_best_weights_at_the_end(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="score", mode="min", load_best=True, keep_periodic=0)
    learner = make_learner(callbacks=[ckpt, Scores([3.0, 1.0, 2.0])], n_batches=2)
    await learner.fit(3)
    reference = make_learner(n_batches=2)
    await reference.fit(2)  # the best score was after the second epoch
    assert ckpt.loaded_best == ckpt.best_path == tmp_path / "best-epoch-0002-step-00000004.pt"
    assert_weights_equal(weights_of(learner), weights_of(reference))
    # Only the weights: the counters and last.pt are those of the end of the run.
    assert (learner.state.epoch, learner.state.step) == (3, 6)
    last = load_checkpoint_file(tmp_path / "last.pt")
    assert last["progress"]["epoch"] == 3
    assert not torch.equal(last["model"]["0.weight"], learner.model.state_dict()["0.weight"])


async def test_load_best_from_safetensors_after_early_stopping(tmp_path: Path) -> None:
    class StopAfter(Callback):
        reads = frozenset({"epoch"})

        def after_epoch(self, state: StateView) -> None:
            if state.epoch == 2:
                from aiolearner import StopFit

                raise StopFit("enough")

    ckpt = Checkpoint(
        tmp_path,
        monitor="score",
        mode="max",
        load_best=True,
        save_weights_only=True,
        format="safetensors",
    )
    learner = make_learner(callbacks=[ckpt, Scores([5.0, 1.0, 2.0, 9.0]), StopAfter()])
    await learner.fit(4)
    assert learner.state.epoch == 3  # stopped
    reference = make_learner()
    await reference.fit(1)
    assert ckpt.loaded_best == tmp_path / "best-epoch-0001-step-00000004.safetensors"
    assert_weights_equal(weights_of(learner), weights_of(reference))


async def test_no_load_best_after_a_cancellation(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="score", mode="max", load_best=True)
    with anyio.CancelScope() as scope:
        learner = make_learner(
            callbacks=[ckpt, Scores([5.0, 1.0, 2.0]), CancelAtStep(6, scope)], n_batches=4
        )
        await learner.fit(3)
    assert scope.cancelled_caught
    assert ckpt.best_path is not None
    assert ckpt.loaded_best is None
    # The model holds the weights training had reached: fit continues from them exactly.
    assert_weights_equal(weights_of(learner), load_checkpoint_file(ckpt.last_path)["model"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="save_weights_only=True"):
        Checkpoint("d", format="safetensors")
    with pytest.raises(ValueError, match="format must be"):
        Checkpoint("d", format="npz")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="monitor"):
        Checkpoint("d", load_best=True)
    with pytest.raises(ValueError, match="keep_periodic"):
        Checkpoint("d", keep_periodic=-1)


async def test_a_crash_while_writing_safetensors_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Checkpoint(tmp_path, save_weights_only=True, format="safetensors")
    learner = make_learner(callbacks=[ckpt], n_batches=2)
    await learner.fit(1)
    before = safetensors.torch.load_file(tmp_path / "last.safetensors")
    real_fsync = os.fsync

    def crash(fd: int) -> None:
        real_fsync(fd)
        raise OSError("power cut")

    monkeypatch.setattr(_files, "_fsync", crash)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(2)
    assert info.group_contains(OSError, match="power cut")
    monkeypatch.undo()
    assert_weights_equal(safetensors.torch.load_file(tmp_path / "last.safetensors"), before)
    assert not [n for n in names(tmp_path) if n.endswith(".tmp")]


def test_safetensors_refuses_non_tensor_state_clearly(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"entry 'extra' is a int; safetensors files hold"):
        _files.save_safetensors({"extra": 3}, {}, tmp_path / "x.safetensors")


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_no_blocking_call_on_the_event_loop(tmp_path: Path, compute: str) -> None:
    """blockbuster (asyncio only; a no-op check on trio) sees no file I/O on the loop."""
    from blockbuster import blockbuster_ctx

    from aiolearner.callbacks import Profiler

    callbacks: list[Callback] = [
        Checkpoint(tmp_path / "a", monitor="val_loss", load_best=True, keep_periodic=0),
        Checkpoint(
            tmp_path / "b",
            every_n_steps=3,
            monitor="val_loss",
            load_best=True,
            save_weights_only=True,
            format="safetensors",
        ),
        Profiler(tmp_path / "p", wait=1, warmup=1, active=1, repeat=2, worker_name="w"),
    ]
    learner = make_learner(callbacks=callbacks, n_batches=3, compute=compute)
    with blockbuster_ctx():
        await learner.fit(2)
    assert learner.state.epoch == 2
