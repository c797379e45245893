from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch

from aiolearner import Callback, ConfigurationError, Learner, StateView
from aiolearner.callbacks import (
    Checkpoint,
    EarlyStopping,
    _checkpoint,
    _files,
    load_checkpoint_file,
)
from aiolearner.testing import make_learner

EPOCHS = 3
BATCHES = 6  # per epoch


class Canceller(Callback):
    """Cancels ``scope`` when a counter reaches ``at`` (subclasses say which, and when)."""

    def __init__(self, at: int, scope: anyio.CancelScope) -> None:
        self.at = at
        self.scope = scope


class CancelAt(Canceller):
    """Cancels a scope right after the training batch that brings ``step`` to ``at``."""

    reads = frozenset({"step"})

    async def after_fit_batch(self, state: StateView) -> None:
        if state.step == self.at:
            self.scope.cancel()


class Augmented(torch.utils.data.TensorDataset):
    """Augmentation drawn from the global generators (torch's, numpy's, Python's) as it
    fetches."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, y = (t[i] for t in self.tensors)
        noise = 0.01 * torch.rand(x.shape) + float(np.random.rand()) + random.random()
        return x + noise, y


def build(
    directory: Path, *extra: Callback, augment: bool = False, **options: Any
) -> tuple[Learner[Any], Checkpoint]:
    """A learner whose run depends on every RNG: a shuffling DataLoader and dropout (and,
    with ``augment``, a dataset drawing from the global generators as it fetches)."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 5, 4, generator=gen)
    y = torch.randint(0, 3, (BATCHES * 5,), generator=gen)
    dataset = (Augmented if augment else torch.utils.data.TensorDataset)(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True)
    val = [(x[:10], y[:10])]
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = Checkpoint(directory, every_n_steps=3, monitor="val_loss", top_k=2)
    stop = EarlyStopping("val_loss", patience=100)
    learner: Learner[Any] = Learner(
        model,
        opt,
        torch.nn.functional.cross_entropy,
        loader,
        val,
        callbacks=[ckpt, stop, *extra],
        yield_interval=0.0,
        **options,
    )
    return learner, ckpt


def names(directory: Path, pattern: str = "*") -> list[str]:
    return sorted(p.name for p in directory.glob(pattern))


def final_state(learner: Learner[Any]) -> dict[str, Any]:
    stop = next(cb for cb in learner.callbacks if isinstance(cb, EarlyStopping))
    return {
        "model": learner.model.state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "epoch": learner.state.epoch,
        "step": learner.state.step,
        "metrics": {k: float(v) for k, v in learner.state.metrics.items()},
        "early_stopping": dict(stop.state_dict()),
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal to the bit: tensors with torch.equal, containers element by element."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), where
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


async def resume_main(directory: str, out: str, resume: str) -> None:
    """What the fresh process runs: build the learner anew, resume, save the final state."""
    learner, _ = build(Path(directory))
    await learner.fit(EPOCHS, resume=resume)
    torch.save(final_state(learner), out)


async def reference(tmp_path: Path) -> dict[str, Any]:
    learner, _ = build(tmp_path / "reference")
    await learner.fit(EPOCHS)
    return final_state(learner)


async def interrupted(directory: Path, at: int) -> None:
    with anyio.CancelScope() as scope:
        learner, _ = build(directory, CancelAt(at, scope))
        await learner.fit(EPOCHS)
    assert scope.cancelled_caught
    assert learner.state.step == at
    assert learner.state.batch_index == at % BATCHES != 0  # inside an epoch


async def test_cancelled_mid_epoch_then_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    expected = await reference(tmp_path)
    directory = tmp_path / "run"
    await interrupted(directory, at=8)
    saved = load_checkpoint_file(directory / "last.pt")
    assert saved["progress"]["step"] == 8
    assert saved["progress"]["batch_index"] == 2

    learner, _ = build(directory)
    await learner.fit(EPOCHS, resume="last")
    assert_same(final_state(learner), expected)


def test_resumed_in_a_fresh_process_equals_uninterrupted(
    tmp_path: Path, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    backend = anyio_backend[0]
    expected = anyio.run(reference, tmp_path, backend=backend)
    directory = tmp_path / "run"
    anyio.run(interrupted, directory, 10, backend=backend)
    out = tmp_path / "final.pt"
    code = (
        "import importlib.util, sys, anyio\n"
        "spec = importlib.util.spec_from_file_location('ckpt_case', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "anyio.run(mod.resume_main, sys.argv[2], sys.argv[3], 'last', backend=sys.argv[4])\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code, __file__, str(directory), str(out), backend],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    got = torch.load(out, weights_only=True)
    assert_same(got, expected)


@pytest.mark.parametrize("name", ["step-00000003.pt", "step-00000006.pt", "epoch-0001.pt"])
async def test_resume_from_a_periodic_checkpoint_equals_uninterrupted(
    tmp_path: Path, name: str
) -> None:
    expected = await reference(tmp_path)
    directory = tmp_path / "reference"
    assert (directory / name).is_file()
    learner, _ = build(tmp_path / "other")
    await learner.fit(EPOCHS, resume=directory / name)
    assert_same(final_state(learner), expected)


# fetch="inline": a producer thread (which "auto" starts for a source found slow) would draw
# from the global generators while compute draws from them too, in an order that is a race.
@pytest.mark.parametrize("compute", ["auto", "inline", "thread"])
async def test_resume_from_a_periodic_checkpoint_of_augmented_data_equals_uninterrupted(
    tmp_path: Path, compute: str
) -> None:
    """A periodic file is taken before its step's batch is computed, once the batch is drawn:
    it must hold the random state from before the draw, or the resumed run draws that batch's
    augmentation from where dropout had left the generators."""
    options = {"fetch": "inline", "compute": compute}
    learner, _ = build(tmp_path / "reference", augment=True, **options)
    await learner.fit(EPOCHS)
    expected = final_state(learner)
    files = names(tmp_path / "reference", "step-*.pt") + names(tmp_path / "reference", "epoch-*")
    assert len(files) == 8  # steps 3, 6, ..., 15 and epochs 1-3
    for name in files:
        resumed, _ = build(tmp_path / name, augment=True, **options)
        await resumed.fit(EPOCHS, resume=tmp_path / "reference" / name)
        assert_same(final_state(resumed), expected, name)


async def test_files_written(tmp_path: Path) -> None:
    learner, ckpt = build(tmp_path)
    await learner.fit(EPOCHS)
    written = names(tmp_path)
    steps = [f"step-{s:08d}.pt" for s in range(3, EPOCHS * BATCHES, 3)]
    epochs = [f"epoch-{e:04d}.pt" for e in range(1, EPOCHS + 1)]
    best = [e["name"] for e in ckpt.best]
    assert len(best) == 2
    assert written == sorted({*steps, *epochs, *best, "last.pt"})
    last = load_checkpoint_file(tmp_path / "last.pt")
    assert last["progress"]["epoch"] == EPOCHS
    assert_same(last["model"], learner.model.state_dict())
    assert ckpt.find_checkpoint("last") == tmp_path / "last.pt"
    assert ckpt.find_checkpoint("best") == ckpt.best_path


class Scores(Callback):
    """Puts a given score for each epoch into state.metrics."""

    reads = frozenset({"epoch"})
    writes = frozenset({"metrics"})

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def after_epoch(self, state: StateView) -> None:
        state.metrics["score"] = self.scores[state.epoch]


@pytest.mark.parametrize(
    ("mode", "keep"),
    [("min", {4: 1.0, 5: 2.0}), ("max", {1: 5.0, 3: 4.0})],
)
async def test_top_k_keeps_exactly_the_k_best(
    tmp_path: Path, mode: Any, keep: dict[int, float]
) -> None:
    scores = [5.0, 3.0, 4.0, 1.0, 2.0]
    ckpt = Checkpoint(tmp_path, every_n_epochs=None, monitor="score", mode=mode, top_k=2)
    learner = make_learner(callbacks=[ckpt, Scores(scores)], n_batches=2)
    await learner.fit(len(scores))
    files = names(tmp_path, "best-*.pt")
    assert len(files) == 2
    assert {e["epoch"]: e["score"] for e in ckpt.best} == keep
    assert files == sorted(e["name"] for e in ckpt.best)
    for entry in ckpt.best:
        saved = load_checkpoint_file(tmp_path / entry["name"])
        assert saved["progress"]["epoch"] == entry["epoch"]
        assert saved["metrics"]["score"] == entry["score"]
    assert ckpt.best_path == tmp_path / ckpt.best[0]["name"]


async def test_keep_periodic_prunes_the_oldest(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, every_n_steps=1, every_n_epochs=None, keep_periodic=2)
    learner = make_learner(callbacks=[ckpt], n_batches=5)
    await learner.fit(1)
    assert names(tmp_path) == [
        "last.pt",
        "step-00000003.pt",
        "step-00000004.pt",
    ]


async def test_missing_monitor_is_a_clear_error(tmp_path: Path) -> None:
    # Nothing in the learner writes it: refused when fit starts, before any training.
    learner = make_learner(callbacks=[Checkpoint(tmp_path, monitor="nope")], n_batches=1)
    with pytest.raises(ConfigurationError, match="'nope', which nothing in this learner writes"):
        await learner.fit(1)
    assert learner.state.step == 0
    # A callback that may write any metric: the name is looked for when the epoch ends.
    learner = make_learner(
        callbacks=[Checkpoint(tmp_path, monitor="nope"), Scores([1.0])], n_batches=1
    )
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    assert info.group_contains(KeyError, match="nope")


async def test_resume_last_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    learner = make_learner(callbacks=[Checkpoint(tmp_path)])
    with pytest.raises(FileNotFoundError, match="resume='last'"):
        await learner.fit(1, resume="last")


def test_atomic_write_failing_before_the_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    _files.atomic_write(path, b"old")

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(_files, "_replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        _files.atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["last.pt"]


async def test_a_crash_while_writing_never_leaves_a_corrupt_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Checkpoint(tmp_path)
    learner = make_learner(callbacks=[ckpt], n_batches=2)
    await learner.fit(1)
    before = load_checkpoint_file(tmp_path / "last.pt")

    real_fsync = os.fsync

    def crash(fd: int) -> None:
        real_fsync(fd)
        raise OSError("power cut")

    monkeypatch.setattr(_files, "_fsync", crash)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(2)
    assert info.group_contains(OSError, match="power cut")
    monkeypatch.undo()
    after = load_checkpoint_file(tmp_path / "last.pt")
    assert_same(after, before)
    assert not [n for n in names(tmp_path) if n.endswith(".tmp")]
    # the failed write is not retried forever: the next run saves again
    await learner.fit(3)
    assert load_checkpoint_file(tmp_path / "last.pt")["progress"]["epoch"] == 3


def test_paths_cannot_leave_the_directory(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path / "ckpt")
    for bad in ["../evil.pt", "/etc/passwd", "a/b.pt", "..", "", "x\\y.pt"]:
        with pytest.raises(ValueError, match="plain file name"):
            ckpt.path(bad)
    with pytest.raises(ValueError, match="plain file name"):
        ckpt.load_state_dict(
            {"best": [{"name": "../../evil.pt", "score": 0.0, "epoch": 1, "step": 1}]}
        )
    with pytest.raises(ValueError, match="plain file name"):
        ckpt.load_state_dict({"periodic": ["../x.pt"]})
    with pytest.raises(ValueError, match="'last' or 'best'"):
        ckpt.find_checkpoint("../last")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        Checkpoint("d", mode="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        Checkpoint("d", top_k=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        Checkpoint("d", every_n_steps=0)


async def test_checkpoint_does_not_wait_on_the_event_loop(tmp_path: Path) -> None:
    """Every write happens in a worker thread: the loop thread never writes a file."""
    import threading

    loop_thread = threading.get_ident()
    writers: list[int] = []
    real = _checkpoint.atomic_write

    def spy(path: Path, data: Any) -> None:
        writers.append(threading.get_ident())
        real(path, data)

    learner = make_learner(
        callbacks=[Checkpoint(tmp_path, every_n_steps=1)], n_batches=3, compute="inline"
    )
    old = _checkpoint.atomic_write
    _checkpoint.atomic_write = spy
    try:
        await learner.fit(2)
    finally:
        _checkpoint.atomic_write = old
    assert writers
    assert loop_thread not in writers


async def test_a_save_point_just_before_a_cancellation_is_still_written(tmp_path: Path) -> None:
    """The epoch checkpoint's write task never got to run; the shielded teardown writes it.

    The cancellation (asked for during the second epoch) lands at the end of that epoch, a save
    point of its own, which the teardown writes too.
    """
    with anyio.CancelScope() as scope:
        learner = make_learner(
            callbacks=[Checkpoint(tmp_path, save_last=False), CancelAt(5, scope)],
            n_batches=4,
            yield_interval=1e9,  # no turn for the write task between the save and the cancel
            compute="inline",
        )
        await learner.fit(3)
    assert scope.cancelled_caught
    assert (learner.state.epoch, learner.state.step) == (2, 8)
    assert names(tmp_path) == ["epoch-0001.pt", "epoch-0002.pt"]
    assert load_checkpoint_file(tmp_path / "epoch-0001.pt")["progress"]["step"] == 4
    assert load_checkpoint_file(tmp_path / "epoch-0002.pt")["progress"]["step"] == 8


class CancelBeforeEpoch(Canceller):
    """Cancels a scope in ``before_epoch`` of epoch ``at``, next to Checkpoint's save there."""

    reads = frozenset({"epoch"})

    async def before_epoch(self, state: StateView) -> None:
        if state.epoch == self.at:
            self.scope.cancel()


async def test_a_cancellation_while_a_save_point_is_copied_does_not_lose_it(
    tmp_path: Path,
) -> None:
    """Cancelled while the boundary's snapshot is taken: the teardown still saves that point."""
    with anyio.CancelScope() as scope:
        learner = make_learner(
            callbacks=[Checkpoint(tmp_path, save_last=False), CancelBeforeEpoch(1, scope)],
            n_batches=4,
            compute="inline",
        )
        await learner.fit(3)
    assert scope.cancelled_caught
    # Where it lands depends on the backend (trio finishes a thread call it cannot abandon
    # before it notices a cancellation); either way every epoch boundary passed is saved.
    ended = learner.state.epoch
    assert ended >= 1
    assert names(tmp_path) == [f"epoch-{e:04d}.pt" for e in range(1, ended + 1)]
    for e in range(1, ended + 1):
        assert load_checkpoint_file(tmp_path / f"epoch-{e:04d}.pt")["progress"]["step"] == 4 * e


@pytest.mark.parametrize("compute", ["thread", "inline"])
async def test_step_checkpoints_from_the_compute_thread_resume_exactly(
    tmp_path: Path, compute: Any
) -> None:
    def learner_for(directory: Path) -> tuple[Learner[Any], Checkpoint]:
        ckpt = Checkpoint(directory, every_n_steps=2, every_n_epochs=None)
        return make_learner(callbacks=[ckpt], n_batches=5, compute=compute), ckpt

    reference, _ = learner_for(tmp_path / "a")
    await reference.fit(2)
    assert names(tmp_path / "a") == [
        "last.pt",
        "step-00000002.pt",
        "step-00000004.pt",
        "step-00000006.pt",
        "step-00000008.pt",
    ]
    resumed, _ = learner_for(tmp_path / "b")
    await resumed.fit(2, resume=tmp_path / "a" / "step-00000006.pt")
    assert_same(resumed.model.state_dict(), reference.model.state_dict())
    assert_same(resumed.optimizer.state_dict(), reference.optimizer.state_dict())
    assert resumed.state.metrics == reference.state.metrics


async def test_no_blocking_call_on_the_event_loop(tmp_path: Path) -> None:
    """blockbuster (asyncio only; a no-op check on trio) sees no file I/O on the loop."""
    from blockbuster import blockbuster_ctx

    from aiolearner.callbacks import CSVLogger, JSONLinesLogger, Recorder

    def learner() -> Learner[Any]:
        return make_learner(
            callbacks=[
                Checkpoint(tmp_path / "ckpt", every_n_steps=2, monitor="val_loss"),
                CSVLogger(tmp_path / "log.csv", every_n_steps=1),
                JSONLinesLogger(tmp_path / "log.jsonl", every_n_steps=1),
                Recorder(),
            ],
            n_batches=3,
            compute="thread",
        )

    first, second = learner(), learner()  # building may touch files (torch imports)
    with blockbuster_ctx():
        await first.fit(2)
        await second.fit(3, resume="last")
    assert second.state.epoch == 3


def build_with_practices(directory: Path, *extra: Callback) -> tuple[Learner[Any], Any]:
    """Every practice with state of its own: schedule, EMA, bf16 autocast, metrics, stopping."""
    from aiolearner.callbacks import EMA, GradientClipping, Metrics, MixedPrecision, OneCycle

    amp = MixedPrecision("bf16")
    ema = EMA(0.8)
    learner, _ = build(directory)
    practices = [
        Metrics(["accuracy", "loss"]),
        OneCycle(0.05, total_steps=EPOCHS * BATCHES),
        GradientClipping(1.0),
        amp,
        ema,
        Checkpoint(directory, every_n_steps=4, monitor="val_accuracy", mode="max"),
        EarlyStopping("val_loss", patience=100),
        *extra,
    ]
    learner = Learner(
        learner.model,
        learner.optimizer,
        torch.nn.functional.cross_entropy,
        learner.train_data,
        learner.val_data,
        callbacks=practices,
        stages={**amp.stages(), **ema.stages()},
        yield_interval=0.0,
    )
    return learner, ema


async def test_with_every_practice_cancelled_and_resumed_equals_uninterrupted(
    tmp_path: Path,
) -> None:
    whole, whole_ema = build_with_practices(tmp_path / "whole")
    await whole.fit(EPOCHS)

    with anyio.CancelScope() as scope:
        first, _ = build_with_practices(tmp_path / "run", CancelAt(9, scope))
        await first.fit(EPOCHS)
    assert first.state.step == 9

    resumed, ema = build_with_practices(tmp_path / "run")
    await resumed.fit(EPOCHS, resume="last")
    assert_same(resumed.model.state_dict(), whole.model.state_dict())
    assert_same(resumed.optimizer.state_dict(), whole.optimizer.state_dict())
    assert_same(ema.model.state_dict(), whole_ema.model.state_dict())
    assert resumed.state.metrics == whole.state.metrics


async def test_resume_of_a_stream_that_outlives_epochs(tmp_path: Path) -> None:
    """steps_per_epoch: the checkpoint records where the epoch began in the stream, and the
    stream's start RNG state (a shuffling loader), so every checkpoint resumes exactly."""

    def learner_for(directory: Path) -> Learner[Any]:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(35, 4, generator=gen), torch.randint(0, 3, (35,), generator=gen)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=5, shuffle=True
        )  # 7 batches a stream, 3 an epoch: streams end and restart inside epochs
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3))
        return Learner(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.nn.functional.cross_entropy,
            loader,
            callbacks=[Checkpoint(directory, every_n_steps=1)],
            steps_per_epoch=3,
        )

    reference = learner_for(tmp_path / "a")
    await reference.fit(5)
    files = [n for n in names(tmp_path / "a") if n != "last.pt"]
    assert len(files) > 10
    for name in files:
        resumed = learner_for(tmp_path / "b")
        await resumed.fit(5, resume=tmp_path / "a" / name)
        assert resumed.state.step == reference.state.step, name
        assert_same(resumed.model.state_dict(), reference.model.state_dict(), name)
        assert resumed.state.metrics == reference.state.metrics, name


def test_no_per_batch_hook_unless_saving_every_n_steps() -> None:
    from aiolearner.callbacks import CSVLogger, JSONLinesLogger

    def hooks(cb: Callback) -> set[str]:
        return {h for h, _ in cb.hooks()}

    assert "before_fit_batch" not in hooks(Checkpoint("d"))
    assert "before_fit_batch" in hooks(Checkpoint("d", every_n_steps=10))
    assert "after_fit_batch" not in hooks(JSONLinesLogger("x.jsonl"))
    assert "after_fit_batch" in hooks(CSVLogger("x.csv", every_n_steps=10))
    learner = make_learner(callbacks=[Checkpoint("d"), JSONLinesLogger("x.jsonl")])
    assert "before_fit_batch" not in learner.describe()
    assert "after_fit_batch" not in learner.describe()


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
async def test_save_points_takes_a_positive_int(bad: Any) -> None:
    class Saves(Callback):
        async def before_fit_run(self, state: StateView) -> None:
            state.save_points(bad)

    learner = make_learner(callbacks=[Saves()])
    message = re.escape(f"every_n_steps must be a positive int, got {bad!r}")
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match=message)):
        await learner.fit(1)
    assert learner.state.step == 0
