"""Epoch boundaries: one record per validation and per epoch, every epoch run recorded,
validation overlapping training with the default settings, and never moving training's RNG.

Concurrent runs are made late on purpose (a validation held until the next epoch's training pass
is over), so that a record mixing two moments would show."""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from anyio import wait_all_tasks_blocked
from data_helpers import Sized
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Callback, Learner, StateView, StopFit, _worker
from aiolearner._validation import Validator
from aiolearner.callbacks import CSVLogger, EarlyStopping, JSONLinesLogger, Metrics, Recorder
from aiolearner.testing import RecordingCallback, make_batches, make_learner

MODES = ["sequential", "concurrent"]


class Hold(Callback):
    """Holds the validation of epoch ``epoch`` in after_validate until the training pass of
    the next epoch is over (concurrent runs only: a sequential run would wait for itself)."""

    reads = frozenset({"epoch"})

    def __init__(self, epochs: tuple[int, ...] = (0,), *, active: bool = True) -> None:
        self.epochs = epochs
        self.active = active
        self.released: dict[int, anyio.Event] = {}

    def _event(self, epoch: int) -> anyio.Event:
        return self.released.setdefault(epoch, anyio.Event())

    async def after_validate(self, state: StateView) -> None:
        if self.active and state.epoch in self.epochs:
            await self._event(state.epoch).wait()

    def after_fit(self, state: StateView) -> None:
        if state.epoch - 1 in self.epochs:
            self._event(state.epoch - 1).set()


class Seen(Callback):
    """What after_validate, after_epoch and the training side's after_fit see."""

    reads = frozenset({"epoch", "step", "metrics", "validation", "validation_tag"})

    def __init__(self) -> None:
        self.at_fit: dict[int, float] = {}
        self.at_validate: list[tuple[Any, ...]] = []
        self.at_epoch: list[tuple[Any, ...]] = []

    def after_fit(self, state: StateView) -> None:
        self.at_fit[state.epoch] = state.metrics["train_loss"]

    def after_validate(self, state: StateView) -> None:
        m = state.metrics
        tag = tuple(state.validation_tag)
        row = (state.epoch, state.step, tag, m.get("train_loss"), m["val_loss"])
        self.at_validate.append(row)

    def after_epoch(self, state: StateView) -> None:
        m = dict(state.metrics)
        tag = tuple(state.validation_tag) if state.is_valid("validation_tag") else None
        self.at_epoch.append((state.epoch, state.step, tag, sorted(m.items())))


def weights(learner: Learner[Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


def same_weights(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- one record per validation, one per epoch ------------------------------------------------


async def test_after_validate_describes_the_snapshot_moment() -> None:
    runs = {}
    for mode in MODES:
        seen = Seen()
        learner = make_learner(
            callbacks=[seen, Hold(active=mode == "concurrent")],
            validate=mode,
            compute="inline",
            n_batches=3,
        )
        await learner.fit(3)
        # The training loss at after_validate is its own epoch's, not the next one's.
        for epoch, _, _, train_loss, _ in seen.at_validate:
            assert train_loss == seen.at_fit[epoch]
        runs[mode] = (seen.at_validate, seen.at_epoch, weights(learner))
    assert runs["concurrent"][0] == runs["sequential"][0]
    assert runs["concurrent"][1] == runs["sequential"][1]
    assert same_weights(runs["concurrent"][2], runs["sequential"][2])
    assert [r[:3] for r in runs["sequential"][0]] == [
        (0, 3, (0, 3)),
        (1, 6, (1, 6)),
        (2, 9, (2, 9)),
    ]


class EpochRows(Callback):
    """A user's per-epoch logger."""

    reads = frozenset({"epoch", "step", "metrics"})

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def after_epoch(self, state: StateView) -> None:
        self.rows.append({"epoch": state.epoch, "step": state.step, **state.metrics})


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


async def collect(learner: Learner[Any], events: list[Any]) -> None:
    async for event in learner.events(kinds={"metrics", "validation"}):
        events.append((event.kind, event.epoch, event.step, dict(event.data)))


async def test_loggers_recorder_and_events_get_the_same_rows_in_both_modes(
    tmp_path: Path,
) -> None:
    results = {}
    for mode in MODES:
        directory = tmp_path / mode
        recorder, rows = Recorder(), EpochRows()
        callbacks = [
            Metrics(["accuracy"]),
            recorder,
            rows,
            CSVLogger(directory / "log.csv"),
            JSONLinesLogger(directory / "log.jsonl"),
            Hold((0, 1), active=mode == "concurrent"),
        ]
        learner = make_learner(callbacks=callbacks, validate=mode, n_batches=3)
        events: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, learner, events)
            await wait_all_tasks_blocked()
            await learner.fit(3)
        table = read_csv(directory / "log.csv")
        lines = (directory / "log.jsonl").read_text().splitlines()
        results[mode] = (
            recorder.history,
            rows.rows,
            table,
            [json.loads(line) for line in lines],
            events,
        )
        assert [r["epoch"] for r in rows.rows] == [0, 1, 2]
        assert all("val_accuracy" in r and "train_accuracy" in r for r in rows.rows)
    assert results["concurrent"] == results["sequential"]


# -- every epoch run is recorded -----------------------------------------------------------------


class ScriptedScore(Callback):
    """Writes a validation score per epoch (the run stops when it stops improving)."""

    reads = frozenset({"epoch"})
    writes = frozenset({"metrics"})

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def after_validate(self, state: StateView) -> None:
        state.metrics["val_score"] = self.scores[state.epoch]


class Outcome(Callback):
    reads = frozenset({"outcome"})
    outcome = ""

    def after_fit_run(self, state: StateView) -> None:
        self.outcome = state.outcome


@pytest.mark.parametrize("mode", MODES)
async def test_early_stopping_leaves_one_row_per_epoch_run(mode: str, tmp_path: Path) -> None:
    recorder, rows, outcome = Recorder(), EpochRows(), Outcome()
    callbacks = [
        ScriptedScore([3.0, 2.0, 2.5, 2.6, 2.7, 1.0, 1.0, 1.0]),
        EarlyStopping("val_score", patience=2),
        CSVLogger(tmp_path / "log.csv"),
        recorder,
        rows,
        outcome,
    ]
    learner = make_learner(callbacks=callbacks, validate=mode, n_batches=2)
    await learner.fit(8)
    assert outcome.outcome == "stopped"
    run = learner.state.epoch
    if mode == "sequential":
        assert run == 4  # epochs 3 and 4 do not improve on epoch 2: stop after epoch 4
    else:
        assert run in (4, 5)  # at most one period late
    table = read_csv(tmp_path / "log.csv")
    assert [int(r["epoch"]) for r in table] == list(range(run))
    assert [int(e["epoch"]) for e in recorder.history["epochs"]] == list(range(run))
    assert [r["epoch"] for r in rows.rows] == list(range(run))
    assert "stopped" in learner.state.stop_reason or "early stopping" in learner.state.stop_reason


async def test_stop_fit_in_after_validate_runs_after_epoch_then_stops() -> None:
    class StopNow(Callback):
        def after_validate(self, state: StateView) -> None:
            raise StopFit("enough")

    rec = RecordingCallback(
        hooks=["after_validate", "after_epoch", "before_epoch", "after_fit_run"],
        with_counters=True,
    )
    learner = make_learner(callbacks=[rec, StopNow()], n_batches=3)
    await learner.fit(3)
    assert rec.calls == [
        "before_epoch@0:0",
        "after_validate@0:3",
        "after_epoch@0:3",
        "after_fit_run@1:3",
    ]
    assert learner.state.epoch == 1


async def test_a_concurrent_stop_at_the_epoch_end_records_that_epoch() -> None:
    # The validation of epoch 1 asks to stop only once epoch 2 has trained: epoch 2 counts, so
    # its after_epoch runs too (without a validation of its own: the run is stopping).
    release = anyio.Event()

    class StopLate(Callback):
        reads = frozenset({"epoch"})

        async def after_validate(self, state: StateView) -> None:
            if state.epoch == 1:
                await release.wait()
                raise StopFit("late")

        def after_fit(self, state: StateView) -> None:
            if state.epoch == 2:
                release.set()

    rows = EpochRows()
    learner = make_learner(
        callbacks=[StopLate(), rows], validate="concurrent", compute="inline", n_batches=3
    )
    await learner.fit(10)
    assert learner.state.epoch == 3
    assert [r["epoch"] for r in rows.rows] == [0, 1, 2]
    assert learner.state.validation_tag == (1, 6)
    assert rows.rows[2]["val_loss"] == rows.rows[1]["val_loss"]  # the latest validation's


# -- validate_every=N: after_epoch behind the epoch's validations ---------------------------------


@pytest.mark.parametrize("every", [2, 3])
async def test_every_n_steps_after_epoch_sees_the_epochs_validations(every: int) -> None:
    runs = {}
    for mode in MODES:
        seen = Seen()
        hold = Hold(active=mode == "concurrent")
        # Four slots: the held validations of epoch 0 wait for epoch 1's training to end.
        learner = make_learner(
            callbacks=[seen, hold],
            validate=mode,
            validate_every=every,
            max_snapshots=4,
            n_batches=4,
        )
        await learner.fit(3)
        runs[mode] = (seen.at_validate, seen.at_epoch, weights(learner))
    assert runs["concurrent"][0] == runs["sequential"][0]
    assert runs["concurrent"][1] == runs["sequential"][1]
    assert same_weights(runs["concurrent"][2], runs["sequential"][2])


# -- overlap with the default settings ---------------------------------------------------------


class Rendezvous:
    """Training and validation forwards meet at a barrier: only possible if they run at once.

    Kept out of the model (the shadow models of concurrent validation are deep copies)."""

    def __init__(self, after: int) -> None:
        #: The training forward that waits for the validation: the first after a snapshot.
        self.after = after
        self.trained = 0
        self.validating = threading.Event()
        self.barrier = threading.Barrier(2, timeout=20)
        self.met: list[str] = []


RENDEZVOUS: dict[int, Rendezvous] = {}


class Meet(torch.nn.Module):
    """A training forward also waits a millisecond (GIL released), so that the default compute
    policy sees batches worth a hop."""

    def __init__(self, key: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        meet = RENDEZVOUS[self.key]
        if torch.is_inference_mode_enabled():
            if not meet.validating.is_set():
                meet.validating.set()
                meet.met.append("validation")
                meet.barrier.wait()
        else:
            threading.Event().wait(0.001)
            meet.trained += 1
            if meet.trained == meet.after:
                assert meet.validating.wait(20), "the validation did not start meanwhile"
                meet.met.append("training")
                meet.barrier.wait()
        return self.linear(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("every", ["epoch", 4])
async def test_validation_overlaps_training_with_the_default_compute(
    every: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A compute pool of one place, as on two cores: the validation's own worker is outside it.
    monkeypatch.setattr(_worker, "pool_size", lambda: 1)
    key = len(RENDEZVOUS)
    meet = RENDEZVOUS[key] = Rendezvous(after=9 if every == "epoch" else 5)
    model = Meet(key)
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        make_batches(8),
        make_batches(2, seed=5),
        validate="concurrent",
        validate_every=every,
    )
    assert learner.compute_policy.mode == "auto"
    with anyio.fail_after(60):
        await learner.fit(2)
    assert meet.met == ["validation", "training"]
    assert learner.compute_policy.shared == 0  # no pass in flight any more


async def test_step_based_back_pressure_holds_from_the_first_round() -> None:
    gate = anyio.Event()

    class Gate(Callback):
        reads = frozenset({"validation_tag"})

        def __init__(self) -> None:
            self.tags: list[tuple[int, int]] = []

        async def after_validate(self, state: StateView) -> None:
            await gate.wait()
            self.tags.append(tuple(state.validation_tag))

    held = Gate()
    learner = make_learner(
        callbacks=[held],
        validate="concurrent",
        validate_every=2,
        max_snapshots=2,
        n_batches=8,
        compute="inline",
    )
    v = learner._rt.validator
    assert isinstance(v, Validator)
    async with anyio.create_task_group() as tg:
        tg.start_soon(learner.fit, 2)
        await wait_all_tasks_blocked()
        # Snapshots at steps 2 and 4 are in flight; the one due at step 6 waits for a slot.
        assert (learner.state.epoch, learner.state.step) == (0, 6)
        assert v.in_flight == 2
        gate.set()
    assert held.tags == [(0, 2), (0, 4), (0, 6), (0, 8), (1, 10), (1, 12), (1, 14), (1, 16)]


# -- validation never moves training's random streams -------------------------------------------


def random_learner(mode: str, *, with_val: bool) -> Learner[Any]:
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    x, y = torch.randn(40, 4, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    train = DataLoader(TensorDataset(x[:24], y[:24]), batch_size=4, shuffle=True)
    val = DataLoader(TensorDataset(x[24:], y[24:]), batch_size=4, shuffle=True)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        train,
        val if with_val else None,
        validate=mode,  # type: ignore[arg-type]
    )


async def test_validation_never_moves_training_random_streams() -> None:
    plain = random_learner("sequential", with_val=False)
    await plain.fit(3)
    expected = (weights(plain), torch.get_rng_state())
    for mode in MODES:
        learner = random_learner(mode, with_val=True)
        await learner.fit(3)
        assert same_weights(weights(learner), expected[0]), mode
        assert torch.equal(torch.get_rng_state(), expected[1]), mode
        assert learner.state.validation_tag == (2, 18)


async def test_a_validation_pass_whose_source_turns_slow_keeps_every_batch() -> None:
    # fetch_budget=0: the second fetch finds the source slow and starts the producer from
    # inside Batches.next(); the batch it fetched must still come, and in its place.
    class Order(Callback):
        reads = frozenset({"batch"})

        def __init__(self) -> None:
            self.seen: list[float] = []

        def after_validate_batch(self, state: StateView) -> None:
            self.seen.append(float(state.batch[0].sum()))

    data = make_batches(3, seed=4)
    for n in (2, 3):
        order = Order()
        learner = make_learner(callbacks=[order], val_data=Sized(data[:n]), fetch_budget=0.0)
        await learner.validate()
        assert order.seen == [float(x.sum()) for x, _ in data[:n]]
        assert "val_data: fetch=auto: a producer thread (found slow)" in learner.describe()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_concurrent_validation_on_its_cuda_stream_gives_the_sequential_results() -> None:
    runs = {}
    for mode in MODES:
        seen = Seen()
        learner = make_learner(
            callbacks=[seen, Metrics(["accuracy"])], validate=mode, device="cuda", n_batches=4
        )
        await learner.fit(3)
        runs[mode] = (seen.at_validate, seen.at_epoch, [w.cpu() for w in weights(learner)])
    assert runs["concurrent"][0] == runs["sequential"][0]
    assert runs["concurrent"][1] == runs["sequential"][1]
    assert same_weights(runs["concurrent"][2], runs["sequential"][2])


async def test_best_checkpoints_are_the_same_in_both_modes(tmp_path: Path) -> None:
    from aiolearner.callbacks import Checkpoint, load_checkpoint_file

    runs = {}
    for mode in MODES:
        ckpt = Checkpoint(tmp_path / mode, monitor="val_accuracy", mode="max", top_k=2)
        learner = make_learner(
            callbacks=[Metrics(["accuracy"]), ckpt, Hold((0, 1), active=mode == "concurrent")],
            validate=mode,
            n_batches=3,
        )
        await learner.fit(4)
        files = {
            e["name"]: load_checkpoint_file(tmp_path / mode / e["name"])["model"] for e in ckpt.best
        }
        runs[mode] = (ckpt.best, files)
    assert runs["concurrent"][0] == runs["sequential"][0]
    for name, weights_seq in runs["sequential"][1].items():
        weights_conc = runs["concurrent"][1][name]  # the validated snapshot's weights
        assert all(torch.equal(weights_conc[k], v) for k, v in weights_seq.items()), name
