"""No silent bad input, continued: mistakes a user makes that were accepted, found late or
answered from inside torch, pathlib or anyio; each now refused where it is first seen, naming
the argument, the callback or the hook (docs/reliability.md, "Bad input")."""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from aiolearner import (
    Callback,
    ConfigurationError,
    Gradient,
    Learner,
    StageError,
    StateView,
    StopFit,
)
from aiolearner.callbacks import (
    EMA,
    AccumulateGradients,
    Checkpoint,
    CSVLogger,
    EarlyStopping,
    JSONLinesLogger,
    Metrics,
    OneCycle,
)
from aiolearner.testing import make_batches, make_learner, tiny_model

# -- hooks that would never run ------------------------------------------------------------------


class LightningStyle(Callback):
    def on_train_batch_end(self, state: StateView) -> None:
        pass


class Misspelt(Callback):
    def befor_epoch(self, state: StateView) -> None:
        pass


class CamelCase(Callback):
    def afterEpoch(self, state: StateView) -> None:  # noqa: N802 (the mistake under test)
        pass


class NotCallable(Callback):
    after_fit = 5


class SyncGenerator(Callback):
    def after_epoch(self, state: StateView) -> Iterator[None]:
        yield


class AsyncGenerator(Callback):
    async def after_epoch(self, state: StateView) -> AsyncIterator[None]:
        yield


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (LightningStyle, "'on_train_batch_end', which no stage calls.*here: after_fit_batch"),
        (Misspelt, "'befor_epoch', which no stage calls.*did you mean 'before_epoch'"),
        (CamelCase, "'afterEpoch', which no stage calls.*did you mean 'after_epoch'"),
        (NotCallable, "'after_fit' of NotCallable is named as a hook but is a int"),
        (SyncGenerator, "hook 'after_epoch' of SyncGenerator is a generator function"),
        (AsyncGenerator, "hook 'after_epoch' of AsyncGenerator is a generator function"),
    ],
)
def test_a_hook_that_would_never_run_is_refused(callback: type[Callback], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        make_learner(callbacks=[callback()])
    assert caught.value.callbacks == (callback.__name__,)


class Helpers(Callback):
    """Methods of a callback that are not hooks, and are not near one, stay allowed."""

    reads = frozenset({"epoch"})

    def on_message(self, text: str) -> None:  # an on_ name no other library uses as a hook
        pass

    def summary(self) -> str:
        return ""

    def _befor_epoch(self) -> None:  # private: not a hook, whatever its name
        pass

    @property
    def before_count(self) -> int:  # a property named like a hook
        return 0

    def after_epoch(self, state: StateView) -> None:
        pass


def test_helper_methods_of_a_callback_are_not_mistaken_for_hooks() -> None:
    learner = make_learner(callbacks=[Helpers()])
    assert "hooks after_epoch" in learner.describe()


@pytest.mark.parametrize(
    ("reads", "writes", "message"),
    [
        ({"validaton"}, set(), r"declares 'validaton' in 'reads'.*did you mean 'validation'\?"),
        ({"los"}, set(), r"declares 'los' in 'reads'.*no field 'los': did you mean 'loss'\?"),
        (set(), {"metric.best"}, r"declares 'metric.best' in 'writes'.*mean 'metrics'\?"),
    ],
)
def test_a_misspelled_declaration_is_refused_before_training(
    reads: set[str], writes: set[str], message: str
) -> None:
    """It would fail only where the field is read, with a message about the field."""

    class Typo(Callback):
        def after_epoch(self, state: StateView) -> None:
            pass

    typo = Typo()
    typo.reads, typo.writes = frozenset(reads), frozenset(writes)  # type: ignore[misc]
    learner = make_learner(callbacks=[typo])
    with pytest.raises(ConfigurationError, match=message):
        learner.fit_sync(1)
    assert learner.state.step == 0


def test_optional_fields_and_new_ones_are_not_taken_for_typos() -> None:
    """A field read where it is valid (another callback's, a stage's that is not in this
    learner) or written new is no typo."""

    class Optional(Callback):
        reads = frozenset({"grad_scaler", "ema_loss"})
        writes = frozenset({"note", "metrics.best"})

        def after_epoch(self, state: StateView) -> None:
            state.note = state.is_valid("grad_scaler")

    learner = make_learner(callbacks=[Optional()])
    learner.fit_sync(1)


# -- values that train nothing, or NaN -----------------------------------------------------------


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_an_optimizer_with_a_non_finite_hyperparameter(lr: float) -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with pytest.raises(ValueError, match=rf"has lr={lr} in parameter group 0"):
        Learner(model, optimizer, torch.nn.functional.cross_entropy, make_batches(2))


def test_an_optimizer_without_parameters_says_so() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.param_groups.clear()
    with pytest.raises(ValueError, match=r"has no parameters \(its param_groups are empty\)"):
        Learner(model, optimizer, torch.nn.functional.cross_entropy, make_batches(2))


@pytest.mark.parametrize("patience", [2.5, True, "3"])
def test_early_stopping_patience_must_be_an_int(patience: Any) -> None:
    with pytest.raises(ValueError, match="patience must be a non-negative int"):
        EarlyStopping("val_loss", patience=patience)


async def test_early_stopping_state_of_another_monitor_is_not_loaded(tmp_path: Path) -> None:
    first = EarlyStopping("val_loss", mode="min")
    learner = make_learner(callbacks=[Checkpoint(tmp_path), first])
    await learner.fit(2)
    assert first.best is not None
    changed = EarlyStopping("train_loss", mode="max")
    again = make_learner(callbacks=[Checkpoint(tmp_path), changed])
    with pytest.warns(UserWarning, match=r"state is of EarlyStopping\('val_loss', mode='min'\)"):
        again.load_checkpoint(tmp_path / "last.pt")
    assert (changed.best, changed.best_epoch, changed.wait) == (None, None, 0)
    same = EarlyStopping("val_loss", mode="min")
    make_learner(callbacks=[Checkpoint(tmp_path), same]).load_checkpoint(tmp_path / "last.pt")
    assert (same.best, same.wait) == (first.best, first.wait)


# -- arguments answered from inside torch, pathlib or anyio --------------------------------------


def test_callbacks_that_are_not_a_list() -> None:
    with pytest.raises(TypeError, match=r"callbacks must be a list of Callback instances, got "):
        make_learner(callbacks=EarlyStopping())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got NoneType \(for none, leave it out or pass \[\]\)"):
        make_learner(callbacks=None)  # type: ignore[arg-type]


def test_a_loss_class_instead_of_a_loss() -> None:
    with pytest.raises(TypeError, match=r"loss_fn=CrossEntropyLoss\(\)"):
        Learner(tiny_model(), _sgd(), torch.nn.CrossEntropyLoss, make_batches(2))  # type: ignore[arg-type]


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def test_a_model_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"parameter 'weight' is on the meta device"):
        Learner(model, optimizer, torch.nn.functional.cross_entropy, make_batches(2))


def test_a_device_that_is_not_one() -> None:
    with pytest.raises(ValueError, match=r"device='gpu' is not a torch device"):
        make_learner(device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_cuda_device_without_cuda() -> None:
    with pytest.raises(ValueError, match=r"device='cuda', but CUDA is not available here"):
        make_learner(device="cuda")


def test_fit_sync_with_an_unknown_backend() -> None:
    learner = make_learner()
    with pytest.raises(ValueError, match=r"backend must be 'asyncio' or 'trio', got 'uvloop'"):
        learner.fit_sync(1, backend="uvloop")  # type: ignore[arg-type]
    assert learner.state.step == 0


async def test_resume_that_is_not_a_path_or_a_near_miss(tmp_path: Path) -> None:
    learner = make_learner(callbacks=[Checkpoint(tmp_path)])
    with pytest.raises(TypeError, match=r"resume must be 'last', 'best' or a path.*got int 123"):
        await learner.fit(1, resume=123)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"did you mean resume='last'\?"):
        await learner.fit(1, resume="lats")
    with pytest.raises(FileNotFoundError, match=r"is a directory: pass a file in it"):
        await learner.fit(1, resume=tmp_path)
    assert learner.state.step == 0


async def test_loading_a_directory_as_a_checkpoint(tmp_path: Path) -> None:
    learner = make_learner()
    with pytest.raises(IsADirectoryError, match=r"it is a directory; pass a checkpoint file in it"):
        learner.load_checkpoint(tmp_path)


def test_metrics_given_one_name_as_a_string() -> None:
    with pytest.raises(TypeError, match=r"Metrics\(\['accuracy'\]\)"):
        Metrics("accuracy")


def test_a_place_for_files_that_is_not_a_path_or_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"Checkpoint: the directory must be a path.*got None"):
        Checkpoint(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"CSVLogger: .* is a directory, not a file.*log\.csv"):
        CSVLogger(tmp_path)
    with pytest.raises(ValueError, match=r"JSONLinesLogger: .* is a directory, not a file"):
        JSONLinesLogger(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"CSVLogger: cannot create directory"):
        CSVLogger(blocker / "sub" / "log.csv")
    CSVLogger(tmp_path / "new" / "log.csv")  # a directory still to be made is fine


# -- a loss that cannot be trained on: a note saying why -----------------------------------------


class FrozenGradient(Gradient):
    """The default step as a stage of its own (not the compiled default batch)."""


def _float_loss(output: torch.Tensor, target: torch.Tensor) -> Any:
    return torch.nn.functional.cross_entropy(output, target).item()


def _per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(output, target, reduction="none")


def _detached(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(output.detach(), target)


@pytest.mark.parametrize("stage", ["default", "Gradient subclass", "with a hook"])
@pytest.mark.parametrize(
    ("loss_fn", "frozen", "note"),
    [
        (_float_loss, False, "loss_fn returned a float, not a tensor"),
        (_per_sample, False, r"loss_fn returned a tensor of shape \(4,\), not a scalar"),
        (_detached, False, "cut off from the model's output"),
        (torch.nn.functional.cross_entropy, True, "none of the model's parameters requires grad"),
    ],
)
async def test_a_loss_that_cannot_be_trained_on_is_explained(
    loss_fn: Any, frozen: bool, note: str, stage: str
) -> None:
    model = tiny_model()
    extra = torch.zeros(1, requires_grad=True)  # the optimizer needs a parameter
    optimizer = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    if frozen:
        model.requires_grad_(False)

    class Hook(Callback):
        def after_gradient(self, state: StateView) -> None:
            pass

    learner: Learner[Any] = Learner(
        model,
        optimizer,
        loss_fn,
        make_batches(2, batch_size=4),
        stages={"gradient": FrozenGradient()} if stage == "Gradient subclass" else None,
        callbacks=[Hook()] if stage == "with a hook" else [],
    )
    with pytest.raises((AttributeError, RuntimeError)) as caught:
        await learner.fit(1)
    notes = "\n".join(caught.value.__notes__)
    assert re.search(f"aiolearner: .*{note}", notes), notes
    assert "raised in stage 'gradient'" in notes


# -- found when fit starts rather than after an epoch trained ------------------------------------


async def test_metrics_reading_a_field_nothing_writes() -> None:
    learner = make_learner(callbacks=[Metrics(["accuracy"], output_field="logits")])
    with pytest.raises(ConfigurationError, match=r"Metrics\(output_field='logits'\): no stage"):
        await learner.fit(1)
    assert learner.state.step == 0
    renamed = make_learner(callbacks=[Metrics(["loss"], loss_field="los")])
    with pytest.raises(ConfigurationError, match=r"loss_field='los'.*did you mean 'loss'\?"):
        await renamed.fit(1)


async def test_metrics_reading_a_field_a_stage_of_ones_own_sets() -> None:
    class Logits(Gradient):
        fields: ClassVar[dict[str, str]] = {"output": "batch", "loss": "batch", "logits": "batch"}

        def compute(self, state: Any) -> None:
            super().compute(state)
            state.logits = state.output

    learner = make_learner(
        stages={"gradient": Logits()},
        callbacks=[Metrics(["accuracy"], output_field="logits", validate=False)],
    )
    await learner.fit(1)
    assert "train_accuracy" in learner.state.metrics


@pytest.mark.parametrize(
    "val",
    [
        [(torch.zeros(2, 4), torch.zeros(2).long(), torch.zeros(2))],  # 3-tuples
        [torch.zeros(2, 4)],  # bare tensors
    ],
)
async def test_validation_batches_in_memory_that_cannot_be_unpacked(val: Any) -> None:
    learner = make_learner(val_data=val)
    with pytest.raises(TypeError, match=r"val_data\[0\]: stage 'validate_loss' expects each"):
        await learner.fit(1)
    assert learner.state.step == 0


# -- background work given the wrong thing -------------------------------------------------------


async def _upload() -> None:
    pass


async def _stop() -> None:
    raise StopFit("from a background task")


class StartsSoon(Callback):
    def __init__(self, how: str) -> None:
        self.how = how

    def after_epoch(self, state: StateView) -> None:
        if self.how == "coroutine":
            state.start_soon(_upload())  # type: ignore[arg-type]
        elif self.how == "plain function":
            state.start_soon(print, "")
        else:
            state.start_soon(_stop)


@pytest.mark.parametrize(
    ("how", "error", "message"),
    [
        ("coroutine", TypeError, r"start_soon\(upload, x\) rather than start_soon\(upload\(x\)\)"),
        ("plain function", TypeError, r"returned NoneType, not an awaitable"),
        ("control flow", StageError, r"StopFit\('from a background task'\) was raised by "),
    ],
)
async def test_background_work_given_the_wrong_thing(
    how: str, error: type[Exception], message: str
) -> None:
    learner = make_learner(callbacks=[StartsSoon(how)])
    with pytest.RaisesGroup(pytest.RaisesExc(error, match=message), flatten_subgroups=True):
        await learner.fit(1)


async def test_a_metric_function_returning_one_value_per_sample() -> None:
    def hits(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (output.argmax(1) == targets).float()  # not reduced

    learner = make_learner(callbacks=[Metrics({"hits": hits})])
    message = r"metric 'hits' returned a tensor of shape \(5,\), not one number for the batch"
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match=message)):
        await learner.fit(1)
    assert learner.state.step == 1  # after the first batch, not after the epoch


class Keeps(Callback):
    """A callback whose state a checkpoint could not be loaded back with."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def after_epoch(self, state: StateView) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)


class Opaque:
    pass


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"fn": lambda: 1}, r"Keeps.state_dict\(\)\['fn'\]: a function"),
        ({"seen": [1, Opaque()]}, r"Keeps.state_dict\(\)\['seen'\]\[1\]: a .*Opaque"),
        ({"seen": frozenset({1})}, r"Keeps.state_dict\(\)\['seen'\]: a frozenset"),
    ],
)
async def test_a_callback_state_a_checkpoint_could_not_load(
    tmp_path: Path, state: dict[str, Any], where: str
) -> None:
    learner = make_learner(callbacks=[Keeps(state), Checkpoint(tmp_path)])
    with pytest.raises(ConfigurationError, match=where):
        await learner.fit(1)
    assert learner.state.step == 0
    # Plain data (tensors, numbers, strings, and containers of them) is fine, and so is any
    # state without a callback writing checkpoints.
    plain = {"n": 1, "t": torch.zeros(2), "s": {1, 2}, "d": {"k": (1.0, "x", None)}}
    await make_learner(callbacks=[Keeps(plain), Checkpoint(tmp_path / "plain")]).fit(1)
    await make_learner(callbacks=[Keeps(state)]).fit(1)


# -- what the checks above must let through ------------------------------------------------------


@dataclasses.dataclass
class Warmup(Callback):
    after_warmup: bool = False  # a flag named like a hook of no stage

    def after_epoch(self, state: StateView) -> None:
        pass


class Configured(Callback):
    """Options read through __getattr__, a missing one as None."""

    def __init__(self, **options: Any) -> None:
        self._options = options

    def __getattr__(self, name: str) -> Any:
        return self.__dict__["_options"].get(name)

    def after_epoch(self, state: StateView) -> None:
        pass


class FromDict(Callback):
    """Validation data of dict batches, unpacked by a callback."""

    writes = frozenset({"batch"})

    def before_validate_batch(self, state: StateView) -> None:
        batch = state.batch
        state.batch = (batch["x"], batch["y"])


class LateState(Callback):
    """A state that exists once training starts (its scheduler is built then)."""

    reads = frozenset({"optimizer"})

    def __init__(self) -> None:
        self.scheduler: Any = None

    def before_fit_run(self, state: StateView) -> None:
        self.scheduler = torch.optim.lr_scheduler.StepLR(state.optimizer, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


class MeanF1(Callback):
    """One value over all the validation sets, written as it is."""

    writes = frozenset({"metrics.val_f1"})

    def after_validate(self, state: StateView) -> None:
        state.metrics["val_f1"] = 0.5


async def test_valid_set_ups_the_checks_let_through(tmp_path: Path) -> None:
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    await make_learner(callbacks=[Warmup(), Configured(every=2)]).fit(1)
    await make_learner(val_data=[{"x": x, "y": y}] * 2, callbacks=[FromDict()]).fit(1)
    await make_learner(callbacks=[LateState(), Checkpoint(tmp_path)]).fit(1)
    states = [collections.Counter(a=1), bytearray(b"ab"), collections.OrderedDict(a=1)]
    await make_learner(callbacks=[Keeps({"v": states}), Checkpoint(tmp_path / "b")]).fit(1)
    sets = {"a": make_batches(2, seed=2), "b": make_batches(2, seed=3)}
    await make_learner(val_data=sets, callbacks=[MeanF1(), EarlyStopping("val_f1")]).fit(1)
    # A key of the user's own in a parameter group may be infinite (no clipping, say).
    model = tiny_model()
    groups = [{"params": model.parameters(), "max_grad_norm": math.inf}]
    Learner(model, torch.optim.SGD(groups, lr=0.1), torch.nn.functional.cross_entropy, [(x, y)])


async def test_metrics_of_the_average_with_its_stages() -> None:
    ema = EMA(0.9)
    metrics = Metrics(["accuracy"], output_field="ema_output", prefix="ema_", train=False)
    learner = make_learner(callbacks=[ema, metrics], stages=ema.stages())
    await learner.fit(1)
    assert "val_ema_accuracy" in learner.state.metrics


class Level(enum.IntEnum):
    LOW = 1


@pytest.mark.parametrize("value", [np.float64(1.0), np.int64(1), Level.LOW])
async def test_a_subclass_of_a_number_the_loader_refuses(tmp_path: Path, value: Any) -> None:
    learner = make_learner(callbacks=[Keeps({"v": value}), Checkpoint(tmp_path)])
    with pytest.raises(ConfigurationError, match=r"Keeps.state_dict\(\)\['v'\]: a "):
        await learner.fit(1)


def test_an_optimizer_that_needs_a_closure() -> None:
    model = tiny_model()
    optimizer = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match=r"LBFGS\) needs a closure in step\(closure\)"):
        Learner(model, optimizer, torch.nn.functional.cross_entropy, make_batches(2))


async def test_a_one_cycle_schedule_shorter_than_the_run() -> None:
    learner = make_learner(callbacks=[OneCycle(0.1, total_steps=3)], n_batches=4)
    message = r"total_steps=3, but the run takes 8 optimizer steps \(fit\(2\): 2 epochs of 4"
    with pytest.raises(ConfigurationError, match=message):
        await learner.fit(2)
    assert learner.state.step == 0
    await make_learner(callbacks=[OneCycle(0.1, total_steps=8)], n_batches=4).fit(2)
    # Accumulated gradients (fewer optimizer steps than batches): not judged.
    accumulate: dict[str, Any] = {"fit": AccumulateGradients(2)}
    await make_learner(callbacks=[OneCycle(0.1, total_steps=4)], stages=accumulate).fit(2)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_best_files_judged_by_another_metric_are_not_taken_as_best(tmp_path: Path) -> None:
    first = Checkpoint(tmp_path, monitor="val_loss", top_k=2)
    await make_learner(callbacks=[first]).fit(2)
    kept = _names(tmp_path)
    assert first.best
    changed = Checkpoint(tmp_path, monitor="train_loss", mode="max", top_k=2)
    learner = make_learner(callbacks=[changed])
    with pytest.warns(UserWarning, match=r"best files were judged by 'val_loss' \(mode 'min'\)"):
        learner.load_checkpoint(tmp_path / "last.pt")
    assert changed.best == []
    assert _names(tmp_path) == kept  # nothing removed
    same = Checkpoint(tmp_path, monitor="val_loss", top_k=2)
    make_learner(callbacks=[same]).load_checkpoint(tmp_path / "last.pt")
    assert same.best == first.best
