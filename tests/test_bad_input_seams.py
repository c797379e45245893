"""No silent bad input, a third round: what an outside check found accepted, found late, or
answered from inside torch: a hook returning what it meant to raise, a callback's state that
could not come back, a learning rate read from a config file as text, data that is not a source
of batches, weights that load half way, a validation loss that is not one number."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import (
    Callback,
    ConfigurationError,
    Gradient,
    Learner,
    SkipBatch,
    State,
    StateView,
    StopFit,
    ValidateLoss,
)
from aiolearner.callbacks import (
    EMA,
    Checkpoint,
    GradientClipping,
    load_checkpoint_file,
    load_weights,
)
from aiolearner.testing import make_batches, make_learner, tiny_model


def weights(learner: Learner[Any]) -> dict[str, torch.Tensor]:
    return copy.deepcopy(learner.model.state_dict())


def same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- hooks returning what they meant to raise or await -------------------------------------------


class ReturnsStop(Callback):
    def after_fit_batch(self, state: StateView) -> Any:
        return StopFit("enough")


class ReturnsSkipClass(Callback):
    async def before_fit_batch(self, state: StateView) -> Any:
        return SkipBatch


class ReturnsCoroutine(Callback):
    async def upload(self) -> None:
        pass

    def after_epoch(self, state: StateView) -> Any:
        return self.upload()


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (ReturnsStop, r"returned StopFit\('enough'\) instead of raising it.*raise StopFit"),
        (ReturnsSkipClass, r"returned SkipBatch instead of raising it.*`raise SkipBatch`"),
        (ReturnsCoroutine, r"returned coroutine .* without awaiting it.*async def"),
    ],
)
async def test_a_hook_returning_an_exception_or_a_coroutine_is_refused(
    callback: type[Callback], message: str
) -> None:
    learner = make_learner(callbacks=[callback()])
    with pytest.RaisesGroup(pytest.RaisesExc(TypeError, match=message)) as caught:
        await learner.fit(2)
    (error,) = caught.value.exceptions
    assert any(callback.__name__ in note for note in error.__notes__)


# -- a callback's state -------------------------------------------------------------------------


class SavesOnly(Callback):
    def __init__(self) -> None:
        self.seen = 0

    def after_fit_batch(self, state: StateView) -> None:
        self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}


class ListState(Callback):
    def after_epoch(self, state: StateView) -> None:
        pass

    def state_dict(self) -> Any:
        return [1, 2, 3]

    def load_state_dict(self, state: Any) -> None:
        pass


def test_a_callback_saving_a_state_it_cannot_load_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"'SavesOnly' defines state_dict\(\) but not"):
        make_learner(callbacks=[SavesOnly()])


async def test_a_callback_state_that_is_not_a_dict_is_refused_at_fit_start(
    tmp_path: Path,
) -> None:
    learner = make_learner(callbacks=[ListState(), Checkpoint(tmp_path)])
    with pytest.raises(ConfigurationError, match=r"ListState.state_dict\(\) returned a list"):
        await learner.fit(1)
    assert learner.state.step == 0
    assert not [f async for f in anyio.Path(tmp_path).iterdir()]


class Gate(Callback):
    """Holds its learner's first batch until released."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def before_fit_batch(self, state: StateView) -> None:
        self.entered.set()
        await self.release.wait()


async def test_one_callback_in_two_runs_at_once_is_refused() -> None:
    gate = Gate()
    first, second = make_learner(callbacks=[gate]), make_learner(callbacks=[gate])
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.fit, 1)
        await gate.entered.wait()
        with pytest.raises(ConfigurationError, match="in use by another learner's run"):
            await second.fit(1)
        gate.release.set()
    # One after the other, the instance serves both (its state goes on from one to the next).
    await second.fit(1)
    assert second.state.epoch == 1


# -- hyperparameters read as text ----------------------------------------------------------------


def two_groups(lr: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = tiny_model()
    layers = list(model.children())
    first, second = layers[0], layers[-1]
    groups: list[dict[str, Any]] = [
        {"params": first.parameters()},
        {"params": second.parameters(), "lr": 0.1},
    ]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    optimizer.param_groups[1]["lr"] = lr
    return model, optimizer


@pytest.mark.parametrize(
    ("lr", "error", "message"),
    [
        ("1e-3", TypeError, r"lr='1e-3' in parameter group 1, a str: it must be a number"),
        (None, TypeError, r"lr=None in parameter group 1, a NoneType"),
        (-0.1, ValueError, r"lr=-0.1 in parameter group 1: a negative learning rate"),
    ],
)
def test_a_group_hyperparameter_that_is_not_a_number_is_refused_at_construction(
    lr: Any, error: type[Exception], message: str
) -> None:
    model, optimizer = two_groups(lr)
    with pytest.raises(error, match=message):
        Learner(model, optimizer, torch.nn.functional.cross_entropy, make_batches(2))


async def test_a_group_hyperparameter_changed_to_text_is_refused_before_any_update() -> None:
    model, optimizer = two_groups(0.1)
    learner: Learner[Any] = Learner(
        model, optimizer, torch.nn.functional.cross_entropy, make_batches(2)
    )
    optimizer.param_groups[1]["lr"] = "1e-3"
    before = weights(learner)
    with pytest.raises(TypeError, match="lr='1e-3' in parameter group 1"):
        await learner.fit(1)
    assert same(weights(learner), before)
    assert learner.state.step == 0


# -- data that is not a source of batches --------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("train.csv", r"train_data is a str \('train.csv'\), not data"),
        (torch.utils.data.DataLoader, r"train_data is the class DataLoader, not data"),
        ({"x": 1}, r"train_data is a dict, which would be iterated over its keys"),
        (
            (torch.zeros(8, 4), torch.zeros(8, dtype=torch.long)),
            r"a tuple of two tensors of 8 rows.*TensorDataset",
        ),
    ],
)
def test_train_data_that_is_not_a_source_of_batches(data: Any, message: str) -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=message):
        Learner(model, optimizer, torch.nn.functional.cross_entropy, data)


# -- weights and checkpoints that do not fit -----------------------------------------------------


def wider() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize("strict", [True, False])
def test_weights_of_another_shape_load_nothing(tmp_path: Path, strict: bool) -> None:
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    path = tmp_path / "w.pt"
    torch.save(small.state_dict(), path)
    model = wider()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'0.weight' is \(8, 4\) there and \(16, 4\) in the"):
        load_weights(model, path, strict=strict)
    assert same(model.state_dict(), before)


def test_weights_missing_a_key_load_nothing_when_strict(tmp_path: Path) -> None:
    model = wider()
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("2.")}
    partial = {k: torch.zeros_like(v) for k, v in partial.items()}
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\)") as caught:
        load_weights(model, partial)
    assert "the model's weights were put back" in caught.value.__notes__[-1]
    assert same(model.state_dict(), before)
    load_weights(model, partial, strict=False)  # the weights that fit
    assert torch.equal(model.state_dict()["0.weight"], torch.zeros(16, 4))


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not weights\n")
    for read in (load_checkpoint_file, lambda p: load_weights(wider(), p)):
        with pytest.raises(ValueError, match=r"cannot read checkpoint file '.*notes.txt'"):
            read(path)


class Counter(Callback):
    def __init__(self) -> None:
        self.n = 0

    def after_epoch(self, state: StateView) -> None:
        self.n += 1

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n = state["count"]  # the mistake under test: the key is "n"


async def test_a_callback_failing_to_load_its_state_is_named(tmp_path: Path) -> None:
    await make_learner(callbacks=[Counter(), Checkpoint(tmp_path)]).fit(1)
    counter = Counter()
    learner = make_learner(callbacks=[counter])
    with pytest.raises(ValueError, match=r"callback 'Counter' could not load its state.*'count'"):
        learner.load_checkpoint(tmp_path / "last.pt")
    assert (counter.n, learner.state.step) == (0, 0)


async def test_checkpoints_of_another_kind_say_what_they_are(tmp_path: Path) -> None:
    learner = make_learner(callbacks=[Checkpoint(tmp_path)])
    await learner.fit(1)
    checkpoint = learner.state_dict()
    fresh = make_learner()
    with pytest.raises(ValueError, match=r"format 99, written by another version"):
        fresh.load_state_dict({**checkpoint, "format": 99})
    with pytest.raises(ValueError, match=r"only weights.*aiolearner.callbacks.load_weights"):
        fresh.load_state_dict(learner.model.state_dict())
    damaged = {**checkpoint, "progress": {**checkpoint["progress"], "epoch": -5}}
    with pytest.raises(ValueError, match=r"progress has epoch=-5, not a count"):
        fresh.load_state_dict(damaged)
    assert fresh.state.epoch == 0
    with pytest.raises(TypeError, match="load_checkpoint takes a checkpoint file's path"):
        fresh.load_checkpoint(None)  # type: ignore[arg-type]


# -- validation, stages, declarations ------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (
            lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none"),
            r"loss is a tensor of shape \(5,\), not a scalar tensor",
        ),
        (
            lambda out, y: float(torch.nn.functional.cross_entropy(out, y)),
            r"loss is a float, not a scalar tensor",
        ),
    ],
)
async def test_a_validation_loss_that_is_not_one_number_is_refused(
    loss_fn: Any, message: str
) -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    learner: Learner[Any] = Learner(model, optimizer, loss_fn, make_batches(2))
    with pytest.raises(ValueError, match=message):
        await learner.validate(make_batches(2))


class Uninitialized(Gradient):
    def __init__(self, scale: float) -> None:
        self.scale = scale  # the mistake under test: no super().__init__()


def test_a_stage_that_skipped_stage_init_is_named() -> None:
    with pytest.raises(TypeError, match=r"stage Uninitialized was not initialized as a Stage"):
        make_learner(stages={"gradient": Uninitialized(2.0)})
    learner = make_learner()
    with pytest.raises(TypeError, match=r"must call super\(\).__init__\(\)"):
        learner.replace_stage("gradient", Uninitialized(2.0))


class AfterByName(Callback):
    after = "Metrics"  # type: ignore[assignment]

    def after_epoch(self, state: StateView) -> None:
        pass


def test_after_given_a_string_says_so() -> None:
    with pytest.raises(ConfigurationError, match=r"got 'Metrics' \(a string: .*after = \(Metrics"):
        make_learner(callbacks=[AfterByName()])


def test_an_optimizer_name_on_a_learner_of_one_optimizer_says_to_leave_it_out() -> None:
    with pytest.raises(ConfigurationError, match=r"optimizer='g'.*leave optimizer= out"):
        make_learner(callbacks=[GradientClipping(1.0, optimizer="g")])


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_a_device_that_is_not_here() -> None:
    with pytest.raises(ValueError, match=r"MPS \(Apple's GPU\) is not available here"):
        make_learner(device="mps")


async def test_resume_last_with_weights_only_files_says_why(tmp_path: Path) -> None:
    await make_learner(callbacks=[Checkpoint(tmp_path, save_weights_only=True)]).fit(1)
    again = make_learner(callbacks=[Checkpoint(tmp_path, save_weights_only=True)])
    with pytest.raises(FileNotFoundError, match=r"save_weights_only=True writes weights alone"):
        await again.fit(2, resume="last")


# -- legitimate uses the checks let through ------------------------------------------------------


class Scheduled:
    """An awaitable that is not a coroutine (a Task or a Future a hook started runs anyway)."""

    def __await__(self) -> Any:
        return iter(())


class ReturnsAwaitable(Callback):
    def after_fit_batch(self, state: StateView) -> Any:
        return Scheduled()


class StateIsAttributes(Callback):
    """State kept as the callback's own attributes, saved and restored whole."""

    def __init__(self) -> None:
        self.batches = 0

    def after_fit_batch(self, state: StateView) -> None:
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vars(self).update(state)


async def test_hooks_and_states_the_checks_let_through(tmp_path: Path) -> None:
    kept = StateIsAttributes()
    learner = make_learner(callbacks=[ReturnsAwaitable(), kept, Checkpoint(tmp_path)])
    await learner.fit(2)
    assert kept.batches == 8
    again = StateIsAttributes()
    same_kinds = [ReturnsAwaitable(), again, Checkpoint(tmp_path / "other")]
    make_learner(callbacks=same_kinds).load_checkpoint(tmp_path / "last.pt")
    assert vars(again) == {"batches": 8}


class AdversarialLoss(ValidateLoss):
    """Validation on inputs moved along the loss's gradient: it needs autograd."""

    inference_mode = False

    def compute(self, state: State) -> None:
        inputs, targets = state.batch
        with torch.enable_grad():
            moved = inputs.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(state.loss_fn(state.model(moved), targets), moved)
        with torch.inference_mode():
            state.output = state.model(inputs + 0.1 * grad.sign())
            state.loss = state.loss_fn(state.output, targets)


async def test_a_validate_loss_needing_gradients_opts_out_of_inference_mode() -> None:
    learner = make_learner(stages={"validate_loss": AdversarialLoss()})
    results = await learner.validate()
    assert math.isfinite(results["loss"])


async def test_ema_validated_before_training() -> None:
    ema = EMA(0.9, metrics=["loss"])
    learner = make_learner(callbacks=[ema], stages=ema.stages())
    await learner.validate()
    await learner.fit(1)
    assert learner.state.step == 4


def test_weights_torch_loads_load_weights_loads(tmp_path: Path) -> None:
    source = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.ReLU(), torch.nn.LazyLinear(3))
    load_weights(lazy, source.state_dict())
    assert torch.equal(lazy.state_dict()["0.weight"], source.state_dict()["0.weight"])
    norm = torch.nn.BatchNorm1d(4)
    old = {k: v for k, v in norm.state_dict().items() if k != "num_batches_tracked"}
    load_weights(torch.nn.BatchNorm1d(4), old)  # (torch fills the counter in)


@pytest.mark.parametrize("thing", [[1, 2], (1, 2), torch.zeros(3)], ids=["list", "tuple", "tensor"])
def test_loading_what_is_not_a_mapping_says_so(thing: Any) -> None:
    with pytest.raises(ValueError, match="not an aiolearner checkpoint"):
        make_learner().load_state_dict(thing)


def test_hyperparameters_the_checks_let_through() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=np.float32(0.01))  # type: ignore[arg-type]
    Learner(model, optimizer, torch.nn.functional.cross_entropy, make_batches(2))


async def test_predict_over_a_tuple_of_input_batches() -> None:
    inputs = tuple(x for x, _ in make_batches(2))
    outputs = await make_learner().predict(inputs)
    assert outputs.shape[0] == sum(len(x) for x in inputs)


async def test_a_checkpoint_loads_into_a_learner_with_other_validation_data(
    tmp_path: Path,
) -> None:
    shuffled = DataLoader(
        TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,))),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    await make_learner(val_data=shuffled, callbacks=[Checkpoint(tmp_path)]).fit(1)
    other = tmp_path / "other"
    make_learner(with_validation=False, callbacks=[Checkpoint(other)]).load_checkpoint(
        tmp_path / "last.pt"
    )
    plain = make_learner(
        val_data=DataLoader(shuffled.dataset, batch_size=4), callbacks=[Checkpoint(other)]
    )
    with pytest.warns(UserWarning, match="passes will draw other orders"):
        plain.load_checkpoint(tmp_path / "last.pt")
    assert plain.state.epoch == 1


class AfterAClass(Callback):
    after = Checkpoint  # type: ignore[assignment]

    def after_epoch(self, state: StateView) -> None:
        pass


def test_after_given_a_class_says_to_write_a_tuple() -> None:
    with pytest.raises(
        ConfigurationError, match=r"'after' must be a tuple .* \(write after = \(Checkpoint,\)\)"
    ):
        make_learner(callbacks=[AfterAClass()])
