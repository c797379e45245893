"""Exact resume from any interruption point of an epoch, its tail included.

The matrix: interruption point (a hook of the epoch: the end of the training pass, the
validation, ``after_epoch``, the start of the next epoch) x {an error, a cancellation from
outside} x {list, shuffling DataLoader} x {sequential, concurrent validation} x both backends.
Each case interrupts one run, then continues it twice: in the same learner (``fit`` again) and
in a fresh learner loading the run's checkpoint (``state_dict`` as ``last.pt`` holds it, read
back with ``weights_only=True``). Both must end bit-identical to the uninterrupted run: weights,
the global random state, and every stateful callback (early stopping's counters, a per-epoch
LR schedule, the best-checkpoint list, the recorder's history) having counted each epoch once.
One more test resumes a batch of such checkpoints in a real subprocess.

The model has dropout and the DataLoaders shuffle, so any random number drawn out of place
(validation drawing from training's stream, an epoch's order drawn again) changes the weights.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Callback, Learner, StateView
from aiolearner.callbacks import Checkpoint, EarlyStopping, LRSchedule, Metrics, Recorder

EPOCHS = 3
BATCHES = 3
POINTS = [
    ("after_fit", 1),
    ("before_validate", 1),
    ("after_validate_batch", 1),
    ("after_validate", 1),
    ("after_epoch", 1),
    ("before_epoch", 2),  # between epoch 1's tail and epoch 2's training
]


class Crash(Exception):  # noqa: N818 (what the test raises)
    pass


class Interrupt(Callback):
    """At ``hook`` of ``epoch`` (once): raises, or waits to be cancelled from outside.

    ``async``, so on its hook it runs after the ``def`` callbacks of its layer: the stateful
    callbacks have counted the epoch when the interruption comes, and must not count it again.
    """

    reads = frozenset({"epoch"})

    def __init__(self, hook: str = "after_epoch", epoch: int = -1, kind: str = "error") -> None:
        self.hook = hook
        self.epoch = epoch
        self.kind = kind
        self.fired = False
        self.reached = anyio.Event()

    def hooks(self) -> Any:
        async def interrupt(state: StateView) -> None:
            if self.fired or state.epoch != self.epoch:
                return
            self.fired = True
            if self.kind == "error":
                raise Crash(f"{self.hook} of epoch {self.epoch}")
            self.reached.set()
            await anyio.sleep_forever()

        interrupt.__name__ = self.hook
        yield self.hook, interrupt


def data(kind: str, n: int, seed: int) -> Any:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n * 4, 4, generator=gen)
    y = torch.randint(0, 3, (n * 4,), generator=gen)
    if kind == "list":
        return [(x[i : i + 4], y[i : i + 4]) for i in range(0, n * 4, 4)]
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)


def build(
    mode: str,
    kind: str,
    directory: Path,
    interrupt: Interrupt | None = None,
    *,
    every: Any = "epoch",
) -> tuple[Learner[Any], dict[str, Any]]:
    torch.manual_seed(1234)  # every run draws dropout masks and shuffles from here on
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.25), torch.nn.Linear(8, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    parts = {
        "stop": EarlyStopping("val_loss", patience=100, min_delta=10.0),
        "schedule": LRSchedule(
            lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), interval="epoch"
        ),
        "ckpt": Checkpoint(
            directory, every_n_epochs=None, save_last=False, monitor="val_accuracy", mode="max"
        ),
        "recorder": Recorder(),
    }
    callbacks = [
        Metrics(["accuracy"]),
        *parts.values(),
        interrupt if interrupt is not None else Interrupt(),
    ]
    learner = Learner(
        model,
        optimizer,
        torch.nn.functional.cross_entropy,
        data(kind, BATCHES, 1),
        data(kind, 2, 2),
        callbacks=callbacks,
        validate=mode,  # type: ignore[arg-type]
        validate_every=every,
    )
    return learner, parts


def final(learner: Learner[Any], parts: dict[str, Any]) -> dict[str, Any]:
    """What must match the uninterrupted run, in ``torch.save``-able form."""
    history = parts["recorder"].history
    return {
        "weights": {k: v.clone() for k, v in learner.model.state_dict().items()},
        "rng": torch.get_rng_state(),
        "counters": [learner.state.epoch, learner.state.step, learner.state.batch_index],
        "stop": dict(parts["stop"].state_dict()),
        "schedule": parts["schedule"].last_lr,
        "best": [[e["name"], e["score"], e["epoch"], e["step"]] for e in parts["ckpt"].best],
        "epochs": history["epochs"],
        "losses": history["loss"],
    }


def assert_same(got: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key == "weights":
            for name, tensor in value.items():
                assert torch.equal(got[key][name], tensor), f"{where}: weights {name}"
        elif key == "rng":
            assert torch.equal(got[key], value), f"{where}: random state"
        else:
            assert got[key] == value, f"{where}: {key}"


_REFERENCES: dict[tuple[str, str], dict[str, Any]] = {}


async def reference(mode: str, kind: str, tmp: Path, every: Any = "epoch") -> dict[str, Any]:
    key = (mode, kind) if every == "epoch" else (mode, f"{kind}, every {every}")
    if key not in _REFERENCES:
        learner, parts = build(mode, kind, tmp / "reference", every=every)
        await learner.fit(EPOCHS)
        _REFERENCES[key] = final(learner, parts)
    return _REFERENCES[key]


def through_a_file(checkpoint: dict[str, Any]) -> Any:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


async def interrupted(
    mode: str, kind: str, how: str, point: tuple[str, int], tmp: Path, every: Any = "epoch"
) -> Any:
    """Interrupt a run at ``point``; the learner, its callbacks, and its checkpoint."""
    interrupt = Interrupt(*point, kind=how)
    learner, parts = build(mode, kind, tmp / "run", interrupt, every=every)
    if how == "error":
        with pytest.RaisesGroup(Crash, allow_unwrapped=True, flatten_subgroups=True):
            await learner.fit(EPOCHS)
    else:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(learner.fit, EPOCHS)
                await interrupt.reached.wait()
                scope.cancel()
    assert interrupt.fired
    return learner, parts, through_a_file(learner.state_dict())


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
@pytest.mark.parametrize("kind", ["list", "loader"])
@pytest.mark.parametrize("how", ["error", "cancel"])
@pytest.mark.parametrize("point", POINTS, ids=[f"{h}@{e}" for h, e in POINTS])
async def test_resume_from_any_point_equals_uninterrupted(
    mode: str, kind: str, how: str, point: tuple[str, int], tmp_path: Path
) -> None:
    expected = await reference(mode, kind, tmp_path)
    learner, parts, checkpoint = await interrupted(mode, kind, how, point, tmp_path)

    await learner.fit(EPOCHS)  # continued in the same learner
    assert_same(final(learner, parts), expected, "continued")

    fresh, fresh_parts = build(mode, kind, tmp_path / "fresh")
    fresh.load_state_dict(checkpoint)  # as fit(resume=...) does
    await fresh.fit(EPOCHS)
    assert_same(final(fresh, fresh_parts), expected, "fresh learner")


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
@pytest.mark.parametrize("how", ["error", "cancel"])
@pytest.mark.parametrize("hook", ["after_validate", "after_validate_batch"])
async def test_resume_in_a_validation_inside_an_epoch(
    mode: str, how: str, hook: str, tmp_path: Path
) -> None:
    # validate_every=2 steps of 3-batch epochs: epoch 1's first validation is at step 4, after
    # its first batch; the resumed run must do it (or finish it) before that epoch's next batch.
    expected = await reference(mode, "loader", tmp_path, every=2)
    learner, parts, checkpoint = await interrupted(
        mode, "loader", how, (hook, 1), tmp_path, every=2
    )
    await learner.fit(EPOCHS)
    assert_same(final(learner, parts), expected, "continued")
    fresh, fresh_parts = build(mode, "loader", tmp_path / "fresh", every=2)
    fresh.load_state_dict(checkpoint)
    await fresh.fit(EPOCHS)
    assert_same(final(fresh, fresh_parts), expected, "fresh learner")


def test_both_modes_end_the_same() -> None:
    # Validation never changes training: the references of both modes are one run.
    for kind in ("list", "loader"):
        seq, conc = (_REFERENCES.get((mode, kind)) for mode in ("sequential", "concurrent"))
        if seq is None or conc is None:
            pytest.skip("needs the matrix's references (run the whole module)")
        assert_same(conc, seq, f"{kind}: concurrent against sequential")


# -- a fresh process ---------------------------------------------------------------------------

SUBPROCESS_CASES = [
    ("sequential", "error", ("after_validate", 1), "asyncio"),
    ("sequential", "cancel", ("after_epoch", 1), "trio"),
    ("concurrent", "cancel", ("after_validate", 1), "asyncio"),
    ("concurrent", "error", ("after_epoch", 1), "trio"),
]


def resume_main(cases: str, out: str) -> None:
    """What the fresh process runs: build each learner anew, load its checkpoint, finish."""
    torch.set_num_threads(1)
    results = {}
    for i, case in enumerate(cases.split(os.pathsep)):
        path, backend = case.rsplit("@", 1)
        mode = Path(path).parent.name

        async def finish(path: str = path, mode: str = mode) -> dict[str, Any]:
            learner, parts = build(mode, "loader", Path(path).parent / "fresh")
            await learner.fit(EPOCHS, resume=path)
            return final(learner, parts)

        results[str(i)] = anyio.run(finish, backend=backend)
    torch.save(results, out)


def test_resumed_in_a_fresh_process_equals_uninterrupted(tmp_path: Path) -> None:
    # One subprocess for a batch of cases (starting one costs seconds), both backends among them.
    cases = []
    for i, (mode, how, point, backend) in enumerate(SUBPROCESS_CASES):
        where = tmp_path / f"case{i}" / mode
        checkpoint = anyio.run(
            lambda: interrupted(mode, "loader", how, point, where),  # noqa: B023
            backend=backend,
        )[2]
        where.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, where / "last.pt")
        cases.append(f"{where / 'last.pt'}@{backend}")
    expected = {
        mode: anyio.run(reference, mode, "loader", tmp_path)
        for mode in ("sequential", "concurrent")
    }
    out = tmp_path / "final.pt"
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('resume_case', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod.resume_main(sys.argv[2], sys.argv[3])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, __file__, os.pathsep.join(cases), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    got = torch.load(out, weights_only=True)
    for i, (mode, how, point, backend) in enumerate(SUBPROCESS_CASES):
        label = f"fresh process: {mode}, {how} at {point}, {backend}"
        assert_same(got[str(i)], expected[mode], label)
