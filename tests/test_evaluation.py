"""The evaluation API: ``validate(data)``, ``test(data)`` and named validation sets."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from aiolearner import Callback, StateView
from aiolearner.callbacks import Checkpoint, CSVLogger, EarlyStopping, Metrics
from aiolearner.testing import make_batches, make_learner

MODES = ["sequential", "concurrent"]


class Phases(Callback):
    """Which phase and validation sets the validation hooks see."""

    reads = frozenset({"phase", "validation_set", "metrics"})

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.sets: list[str | None] = []

    def after_validate_batch(self, state: StateView) -> None:
        self.sets.append(state.validation_set)

    def after_validate(self, state: StateView) -> None:
        self.phases.append(state.phase)


@pytest.mark.parametrize("mode", MODES)
async def test_validate_on_other_data(mode: str) -> None:
    other = make_batches(3, seed=9)
    learner = make_learner(validate=mode)
    await learner.fit(1)
    results = await learner.validate(other)
    reference = make_learner(val_data=other)
    await reference.fit(1)
    assert results == await reference.validate() == learner.state.validation
    assert learner.state.metrics["val_loss"] == results["loss"]
    # Without val_data, data= is all it needs.
    bare = make_learner(with_validation=False)
    assert set(await bare.validate(other)) == {"loss"}
    with pytest.raises(ValueError, match="pass data="):
        await bare.validate()


@pytest.mark.parametrize("mode", MODES)
async def test_test_returns_test_metrics_and_leaves_validation_alone(mode: str) -> None:
    phases = Phases()
    stop = EarlyStopping("val_loss", patience=5)
    learner = make_learner(
        callbacks=[Metrics(["accuracy"]), stop, phases], validate=mode, n_batches=2
    )
    await learner.fit(2)
    validation, tag = dict(learner.state.validation), learner.state.validation_tag
    stop_state = dict(stop.state_dict())
    test_data = make_batches(3, seed=11)
    results = await learner.test(test_data)
    assert set(results) == {"test_loss", "test_accuracy"}
    assert learner.state.metrics["test_loss"] == results["test_loss"]
    assert learner.state.metrics["test_accuracy"] == results["test_accuracy"]
    assert learner.state.validation == validation
    assert learner.state.validation_tag == tag
    validator = learner._rt.validator
    if validator is not None:  # what later tails take as the latest validation
        assert validator.latest is not None
        assert validator.latest[1] == tag
    assert phases.phases == ["fit", "fit", "test"]
    assert dict(stop.state_dict()) == stop_state  # early stopping ignored the test
    # The same numbers as validating on that data.
    again = await learner.validate(test_data)
    assert again == {"loss": results["test_loss"], "accuracy": results["test_accuracy"]}
    assert learner.test_sync(test_data) == results


@pytest.mark.parametrize("mode", MODES)
async def test_a_tests_results_stay_until_the_next_fit(mode: str) -> None:
    """They were measured on the weights of the test: the next run's records leave them out."""
    from aiolearner.callbacks import Recorder

    class Mine(Callback):
        """A key of its own that happens to start with test_: it stays."""

        reads = frozenset({"epoch"})
        writes = frozenset({"metrics.test_mine"})

        def after_epoch(self, state: StateView) -> None:
            if state.epoch == 0:
                state.metrics["test_mine"] = 7.0

    recorder = Recorder()
    learner = make_learner(callbacks=[Metrics(["accuracy"]), Mine(), recorder], validate=mode)
    await learner.fit(1)
    await learner.test({"a": make_batches(2, seed=12)})
    data = make_batches(3, seed=11)
    await learner.test(data)
    results = await learner.test(data)  # the same values again (concurrent: not rewritten)
    assert {k: learner.state.metrics[k] for k in results} == results
    assert "test_a_loss" in learner.state.metrics
    # Not in checkpoints: a learner that loads one does not carry them into its records.
    saved = learner.state_dict()
    assert [k for k in saved["metrics"] if k.startswith("test_")] == ["test_mine"]

    class SaveDuringTest(Callback):
        """Takes the learner's state in the test's after_validate."""

        reads = frozenset({"phase"})

        def __init__(self) -> None:
            self.saved: dict[str, Any] = {}

        def after_validate(self, state: StateView) -> None:
            if state.phase == "test":
                self.saved = state.state_dict()

    during = SaveDuringTest()
    other = make_learner(callbacks=[Metrics(["accuracy"]), during], validate=mode)
    await other.fit(1)
    await other.test(make_batches(2, seed=13))
    assert not [k for k in during.saved["metrics"] if k.startswith("test_")]
    await learner.fit(3)
    assert [k for k in learner.state.metrics if k.startswith("test_")] == ["test_mine"]
    for record in recorder.history["epochs"]:
        assert [k for k in record if k.startswith("test_")] == ["test_mine"], record
    assert len(recorder.history["epochs"]) == 3


@pytest.mark.parametrize("mode", MODES)
async def test_named_validation_sets(mode: str, tmp_path: Path) -> None:
    sets = {"clean": make_batches(2, seed=2), "noisy": make_batches(3, seed=3)}
    phases = Phases()
    ckpt = Checkpoint(tmp_path / "ckpt", every_n_epochs=None, monitor="val_noisy_accuracy")
    stop = EarlyStopping("val_clean_loss", patience=10)
    learner = make_learner(
        callbacks=[Metrics(["accuracy"]), stop, ckpt, phases, CSVLogger(tmp_path / "log.csv")],
        val_data=sets,
        validate=mode,
        n_batches=2,
    )
    await learner.fit(2)
    keys = {"clean_loss", "noisy_loss", "clean_accuracy", "noisy_accuracy"}
    assert set(learner.state.validation) == keys
    assert {f"val_{k}" for k in keys} <= set(learner.state.metrics)
    assert phases.sets == (["clean"] * 2 + ["noisy"] * 3) * 2
    # Each set's numbers are those of validating on it alone.
    alone = make_learner(val_data=sets["noisy"], n_batches=2)
    await alone.fit(2)
    assert learner.state.validation["noisy_loss"] == alone.state.validation["loss"]
    assert stop.best is not None
    assert [e["epoch"] for e in ckpt.best] == [ckpt.best[0]["epoch"]]
    header = next(csv.reader(io.StringIO((tmp_path / "log.csv").read_text())))
    assert {"val_clean_loss", "val_noisy_accuracy"} <= set(header)
    # test() and validate() take named sets too.
    assert set(await learner.test(sets)) == {f"test_{k}" for k in keys}
    assert set(await learner.validate({"only": sets["clean"]})) == {
        "only_loss",
        "only_accuracy",
    }


class Rows(Callback):
    reads = frozenset({"epoch", "metrics"})

    def __init__(self) -> None:
        self.rows: list[Any] = []

    def after_epoch(self, state: StateView) -> None:
        self.rows.append((state.epoch, sorted(state.metrics.items())))


async def test_named_sets_give_the_same_records_in_both_modes() -> None:
    sets = {"a": make_batches(2, seed=2), "b": make_batches(2, seed=3)}
    runs: dict[str, Any] = {}
    for mode in MODES:
        rows = Rows()
        learner = make_learner(callbacks=[Metrics(), rows], val_data=sets, validate=mode)
        await learner.fit(3)
        runs[mode] = (rows.rows, [p.detach().clone() for p in learner.model.parameters()])
    assert runs["concurrent"][0] == runs["sequential"][0]
    assert all(
        torch.equal(a, b) for a, b in zip(runs["concurrent"][1], runs["sequential"][1], strict=True)
    )


@pytest.mark.parametrize(
    ("val_data", "match"),
    [({}, "at least one set"), ({"bad name": []}, "identifier"), ({3: []}, "identifier")],
)
def test_bad_validation_sets_are_refused(val_data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_learner(val_data=val_data)
