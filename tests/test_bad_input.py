"""No silent bad input: each case of issue 12 (item 8) gets a clear error, at construction or at
fit start where it can be seen there, or a documented behaviour (docs/reliability.md)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Callback, ConfigurationError, Learner, StateAccessError, StateView
from aiolearner.callbacks import Checkpoint, EarlyStopping
from aiolearner.testing import make_batches, make_learner, tiny_model


def build(**options: Any) -> Learner[Any]:
    model = tiny_model(seed=0)
    args: dict[str, Any] = {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loss_fn": torch.nn.functional.cross_entropy,
        "train_data": make_batches(3),
    }
    args.update(options)
    return Learner(**args)


def test_an_optimizer_over_another_models_parameters() -> None:
    model, other = tiny_model(seed=0), tiny_model(seed=0)
    with pytest.raises(ValueError, match="updates none of the model's parameters"):
        build(model=model, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    # A copy is another model too (a classic: the model was copied after the optimizer).
    with pytest.raises(ValueError, match="none of the model's parameters"):
        build(model=copy.deepcopy(model), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_an_optimizer_with_extra_parameters_or_a_partly_frozen_model_is_fine() -> None:
    model = tiny_model(seed=0)
    temperature = torch.nn.Parameter(torch.ones(()))
    build(model=model, optimizer=torch.optim.SGD([*model.parameters(), temperature], lr=0.1))
    first = next(model.parameters())
    build(model=model, optimizer=torch.optim.SGD([first], lr=0.1))


def test_the_same_callback_twice() -> None:
    cb = Callback()
    with pytest.raises(ConfigurationError, match="the same callback instance is given twice"):
        make_learner(callbacks=[cb, cb])


@pytest.mark.parametrize("who", ["EarlyStopping", "Checkpoint", "LRSchedule"])
def test_a_monitored_metric_nothing_writes(tmp_path: Path, who: str) -> None:
    """A typo in a monitored name failed only after the first epoch had trained (a KeyError in
    an exception group): refused when fit starts, with the closest name."""
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    from aiolearner.callbacks import LRSchedule, Metrics

    model = tiny_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    judge: Callback
    if who == "EarlyStopping":
        judge = EarlyStopping("val_acc", mode="max")
    elif who == "Checkpoint":
        judge = Checkpoint(tmp_path, monitor="val_acc", mode="max")
    else:
        judge = LRSchedule(ReduceLROnPlateau(optimizer), interval="epoch", monitor="val_acc")
    learner = build(
        model=model,
        optimizer=optimizer,
        val_data=make_batches(2, seed=2),
        callbacks=[Metrics(["accuracy"]), judge],
    )
    message = rf"{who} judges by the metric 'val_acc'.*did you mean 'val_accuracy'\?"
    with pytest.raises(ConfigurationError, match=message):
        learner.fit_sync(2)
    assert learner.state.step == 0


def test_a_monitored_metric_of_a_named_validation_set() -> None:
    """Named validation sets: their metrics are val_<set>_<name>."""
    from aiolearner.callbacks import Metrics

    sets = {"a": make_batches(2, seed=5), "b": make_batches(2, seed=6)}
    stop = EarlyStopping("val_a_accuracy", mode="max")
    build(val_data=sets, callbacks=[Metrics(["accuracy"]), stop]).fit_sync(1)
    typo = EarlyStopping("val_a_acc", mode="max")
    with pytest.raises(ConfigurationError, match="did you mean 'val_a_accuracy'"):
        build(val_data=sets, callbacks=[Metrics(["accuracy"]), typo]).fit_sync(1)
    # With named sets there is no plain val_loss: refused before anything trains.
    plain = build(val_data=sets, callbacks=[EarlyStopping("val_loss")])
    with pytest.raises(
        ConfigurationError, match=r"'val_loss', which nothing.*'val_a_loss', 'val_b_loss'"
    ):
        plain.fit_sync(1)
    assert plain.state.step == 0


def test_two_checkpoints_or_file_loggers_in_one_place(tmp_path: Path) -> None:
    """They would overwrite (and prune) each other's files: refused at construction, naming
    both callbacks and the place; other places, or different kinds in one place, are fine."""
    from aiolearner.callbacks import CSVLogger, JSONLinesLogger

    where = r"\(callbacks\[0\] and callbacks\[2\]\) write into '.*ckpt'"
    with pytest.raises(ConfigurationError, match=rf"two Checkpoint callbacks {where}"):
        make_learner(
            callbacks=[
                Checkpoint(tmp_path / "ckpt", monitor="val_loss"),
                Callback(),
                Checkpoint(tmp_path / "." / "ckpt", every_n_steps=2),
            ]
        )
    with pytest.raises(ConfigurationError, match=r"two CSVLogger .* into .*log\.csv"):
        make_learner(callbacks=[CSVLogger(tmp_path / "log.csv"), CSVLogger(tmp_path / "log.csv")])
    make_learner(
        callbacks=[
            Checkpoint(tmp_path / "best", monitor="val_loss"),
            Checkpoint(tmp_path / "periodic", every_n_steps=2),
            CSVLogger(tmp_path / "log.csv"),
            JSONLinesLogger(tmp_path / "log.jsonl"),
        ]
    ).fit_sync(1)


@pytest.mark.parametrize(
    "data",
    [[], DataLoader(TensorDataset(torch.zeros(0, 7), torch.zeros(0).long()), batch_size=4)],
    ids=["list", "DataLoader"],
)
def test_empty_data(data: Any) -> None:
    with pytest.raises(ValueError, match=r"train_data is empty .* train on nothing"):
        build(train_data=data)
    with pytest.raises(ValueError, match=r"val_data is empty .* val_data=None"):
        build(val_data=data)


class Nothing:
    """An iterable without a length that yields nothing (an empty stream)."""

    def __iter__(self) -> Iterator[Any]:
        return iter(())


async def test_unsized_data_that_yields_nothing_fails_its_first_pass() -> None:
    learner = build(train_data=Nothing())
    with pytest.raises(ValueError, match=r"train_data \(Nothing\) yielded no batch"):
        await learner.fit(3)
    assert learner.state.step == 0


async def test_a_generator_as_data_serves_one_pass_only() -> None:
    def batches() -> Iterator[Any]:
        yield from make_batches(3)

    # A run that needs several passes is refused at its start, before any batch.
    learner = build(train_data=batches())
    with pytest.raises(ValueError, match="generator: it can be iterated only once"):
        await learner.fit(3)
    assert learner.state.step == 0
    # One pass works; a later run finds it used up and says so.
    await learner.fit(1)
    assert learner.state.step == 3
    with pytest.raises(ValueError, match=r"yielded no batch.*iterated only once"):
        await learner.fit(2)
    assert learner.state.step == 3
    # As a stream cut into epochs (steps_per_epoch), it serves every epoch.
    stream = build(train_data=(b for b in make_batches(6)), steps_per_epoch=2)
    await stream.fit(3)
    assert stream.state.step == 6


async def test_early_stopping_on_a_validation_metric_without_val_data() -> None:
    learner = make_learner(callbacks=[EarlyStopping("val_loss")], with_validation=False)
    with pytest.raises(ConfigurationError, match="no val_data") as info:
        await learner.fit(1)
    assert info.value.callbacks == ("EarlyStopping",)
    assert learner.state.step == 0
    # A training metric is checked after each epoch: fine without validation.
    await make_learner(callbacks=[EarlyStopping("train_loss")], with_validation=False).fit(1)
    # Evaluation on data given to validate() runs it (it checks only during fit).
    await learner.validate(make_batches(2))


async def test_best_checkpoints_by_a_validation_metric_without_val_data(tmp_path: Path) -> None:
    learner = make_learner(
        callbacks=[Checkpoint(tmp_path, monitor="val_loss")], with_validation=False
    )
    with pytest.raises(ConfigurationError, match="no val_data") as info:
        await learner.fit(1)
    assert info.value.callbacks == ("Checkpoint",)
    # By a training metric: fine.
    by_train = Checkpoint(tmp_path / "train", monitor="train_loss")
    await make_learner(callbacks=[by_train], with_validation=False).fit(1)
    assert by_train.best_path is not None


@pytest.mark.parametrize("value", [-1, 0, float("nan")])
def test_a_teardown_timeout_that_would_skip_the_final_checkpoint(value: float) -> None:
    with pytest.raises((ValueError, TypeError), match="teardown_timeout"):
        build(teardown_timeout=value)


def test_other_time_options() -> None:
    with pytest.raises(ValueError, match="yield_interval must be non-negative"):
        build(yield_interval=-0.001)
    with pytest.raises(ValueError, match="fetch_budget must be non-negative"):
        build(fetch_budget=-1)
    build(yield_interval=0, teardown_timeout=float("inf"))


def test_a_checkpoint_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        Checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="cannot create directory"):
        Checkpoint(tmp_path / "ckpt" / "inner")


class SetsMetrics(Callback):
    writes = frozenset({"metrics"})

    def after_epoch(self, state: StateView) -> None:
        state.metrics = 5


async def test_a_callback_setting_metrics_to_a_number_is_refused_where_it_does_it() -> None:
    learner = make_learner(callbacks=[SetsMetrics()], n_batches=2)
    with pytest.RaisesGroup(pytest.RaisesExc(StateAccessError, match="must be a dict")) as info:
        await learner.fit(1)
    error = info.value.exceptions[0]
    assert isinstance(error, StateAccessError)
    assert (error.callback, error.hook, error.field) == ("SetsMetrics", "after_epoch", "metrics")
    assert isinstance(learner.state.metrics, dict)


def snapshot(learner: Learner[Any]) -> dict[str, Any]:
    return {
        "model": copy.deepcopy(learner.model.state_dict()),
        "optimizer": copy.deepcopy(learner.optimizer.state_dict()),
        "counters": (learner.state.epoch, learner.state.step, learner.state.batch_index),
        "metrics": dict(learner.state.metrics),
        "callbacks": [dict(cb.state_dict()) for cb in learner.callbacks],
    }


def assert_untouched(before: dict[str, Any], learner: Learner[Any]) -> None:
    after = snapshot(learner)
    assert before["counters"] == after["counters"]
    assert before["metrics"] == after["metrics"]
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k
    assert str(before["optimizer"]) == str(after["optimizer"])
    assert before["callbacks"] == after["callbacks"]


async def test_a_truncated_checkpoint_names_the_file_and_changes_nothing(tmp_path: Path) -> None:
    saved = make_learner(callbacks=[Checkpoint(tmp_path / "a", monitor="val_loss")], n_batches=2)
    await saved.fit(2)
    ckpt = Checkpoint(tmp_path / "b", monitor="val_loss")
    learner = make_learner(callbacks=[ckpt], n_batches=2)
    await learner.fit(1)
    data = (tmp_path / "a" / "last.pt").read_bytes()
    (tmp_path / "b" / "last.pt").write_bytes(data[: len(data) // 2])  # a crash mid-copy, say
    before = snapshot(learner)
    with pytest.raises(ValueError, match=r"last\.pt.*damaged \(truncated\?\)"):
        learner.load_checkpoint(tmp_path / "b" / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt.*damaged"):
        await learner.fit(3, resume="last")
    assert_untouched(before, learner)


async def test_a_checkpoint_with_a_flipped_bit_is_refused_by_its_checksum(tmp_path: Path) -> None:
    """torch.load does not compare a record's CRC: a bit flipped inside a tensor's data loaded
    as a wrong weight. Every reader of a file compares them first."""
    import zipfile

    from aiolearner.callbacks import load_checkpoint_file, load_weights

    saved = make_learner(callbacks=[Checkpoint(tmp_path / "a")], n_batches=2)
    await saved.fit(1)
    ckpt = Checkpoint(tmp_path / "b")
    learner = make_learner(callbacks=[ckpt], n_batches=2)
    await learner.fit(1)
    good = tmp_path / "a" / "last.pt"
    with zipfile.ZipFile(good) as archive:  # the largest tensor's data
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
        record = max(tensors, key=lambda info: info.file_size)
    data = bytearray(good.read_bytes())
    # The record's data starts after its local header: 30 bytes, then the name and the extra
    # field (torch's alignment padding), whose lengths the header holds at offsets 26 and 28.
    header = record.header_offset
    lengths = (int.from_bytes(data[header + at : header + at + 2], "little") for at in (26, 28))
    start = header + 30 + sum(lengths)
    data[start + record.file_size // 2] ^= 0x10
    damaged = tmp_path / "b" / "last.pt"
    damaged.write_bytes(bytes(data))
    assert torch.load(damaged, weights_only=True)["format"]  # what torch itself accepts
    before = snapshot(learner)
    pattern = rf"last\.pt.*damaged: its record '{record.filename}' does not match the checksum"
    with pytest.raises(ValueError, match=pattern):
        learner.load_checkpoint(damaged)
    with pytest.raises(ValueError, match=pattern):
        await learner.fit(3, resume="last")
    assert_untouched(before, learner)
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint_file(damaged)
    with pytest.raises(ValueError, match=pattern):
        load_weights(tiny_model(seed=1), damaged)
    # The intact file reads as before.
    learner.load_checkpoint(good)


async def test_a_checkpoint_of_another_architecture_changes_nothing(tmp_path: Path) -> None:
    wide = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    other = build(model=wide, optimizer=torch.optim.SGD(wide.parameters(), lr=0.1))
    other.fit_sync(1)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    learner = make_learner(callbacks=[EarlyStopping("val_loss")], n_batches=2)
    await learner.fit(1)
    before = snapshot(learner)
    with pytest.raises(ValueError, match=r"do not fit this model.*nothing was loaded"):
        learner.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt.*do not fit this model"):
        await learner.fit(2, resume=tmp_path / "other.pt")
    assert_untouched(before, learner)
    # And a checkpoint whose weights fit but whose optimizer does not: put back half way.
    checkpoint = learner.state_dict()
    checkpoint["optimizer"] = {"state": {}, "param_groups": []}
    checkpoint["progress"] = dict(checkpoint["progress"], epoch=7)
    with pytest.raises(ValueError):  # noqa: PT011 (torch's own message)
        learner.load_state_dict(checkpoint)
    assert_untouched(before, learner)


async def test_a_checkpoint_of_another_kind_of_optimizer_changes_nothing(tmp_path: Path) -> None:
    model = tiny_model(seed=0)
    adam = build(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01))
    adam.fit_sync(1)
    checkpoint = adam.state_dict()
    learner = make_learner(callbacks=[EarlyStopping("val_loss")], n_batches=2)
    await learner.fit(1)
    before = snapshot(learner)
    with pytest.raises(ValueError, match=r"lacks \['dampening', 'momentum'\].*Adam.*nothing"):
        learner.load_state_dict(checkpoint)
    assert_untouched(before, learner)
    # A checkpoint that does not say which kind saved it (written before it did) is refused
    # all the same, on the settings the optimizer needs.
    del checkpoint["optimizer_types"]
    torch.save(checkpoint, tmp_path / "adam.pt")
    with pytest.raises(
        ValueError, match=r"adam\.pt.*another kind of optimizer\?\); nothing was loaded"
    ):
        await learner.fit(2, resume=tmp_path / "adam.pt")
    assert_untouched(before, learner)
    # The other way round (torch's own load fails half way): a ValueError, nothing changed.
    sgd_state = learner.state_dict()
    adam_before = snapshot(adam)
    with pytest.raises(ValueError, match=r"does not fit this torch.optim.adam.Adam.*SGD"):
        adam.load_state_dict(sgd_state)
    assert_untouched(adam_before, adam)


@pytest.mark.parametrize("missing", ["model", "progress", "rng", "progress.pass_done"])
async def test_a_checkpoint_missing_an_entry_names_it_and_the_file(
    tmp_path: Path, missing: str
) -> None:
    learner = make_learner(callbacks=[EarlyStopping("val_loss")], n_batches=2)
    await learner.fit(1)
    checkpoint = learner.state_dict()
    key = missing.split(".")[-1]
    del (checkpoint["progress"] if missing.startswith("progress.") else checkpoint)[key]
    torch.save(checkpoint, tmp_path / "hurt.pt")
    before = snapshot(learner)
    what = rf"lacks the entry '{key}'.*nothing was loaded"
    with pytest.raises(ValueError, match=what):
        learner.load_state_dict(checkpoint)
    with pytest.raises(ValueError, match=rf"hurt\.pt.*{what}"):
        learner.load_checkpoint(tmp_path / "hurt.pt")
    with pytest.raises(ValueError, match=rf"hurt\.pt.*{what}"):
        await learner.fit(2, resume=tmp_path / "hurt.pt")
    assert_untouched(before, learner)


async def test_a_checkpoint_directory_the_system_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A directory the checks at construction cannot see will fail (a read-only mount, /proc).
    checkpoint = Checkpoint(tmp_path / "refused")

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    learner = make_learner(callbacks=[checkpoint], n_batches=2)
    with pytest.RaisesGroup(
        pytest.RaisesExc(ValueError, match=r"cannot create directory .*refused.*Read-only")
    ):
        await learner.fit(1)


def test_fit_sync_in_a_running_loop_is_documented() -> None:
    # The behaviour is tested in tests/test_sync.py; docs/reliability.md says what it does.
    page = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    assert "fit_sync" in page
    assert "tests/test_sync.py::test_fit_sync_and_validate_sync_inside_a_running_loop" in page


async def test_an_optimizer_state_that_does_not_fit_the_parameters_changes_nothing() -> None:
    learner = make_learner(callbacks=[EarlyStopping("val_loss")], n_batches=2)
    learner.optimizer.param_groups[0]["momentum"] = 0.9  # a momentum buffer per parameter
    await learner.fit(1)
    checkpoint = copy.deepcopy(learner.state_dict())
    checkpoint["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(7)
    before = snapshot(learner)
    with pytest.raises(
        ValueError, match=r"'momentum_buffer' of parameter 0.*shape \(7,\).*nothing"
    ):
        learner.load_state_dict(checkpoint)
    assert_untouched(before, learner)
