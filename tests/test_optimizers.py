"""Several optimizers by name: the state fields, Update(optimizer=), checkpoints, and the
callbacks and stages that take the optimizer they apply to."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import ExponentialLR

from aiolearner import (
    Callback,
    ConfigurationError,
    FitBatch,
    Gradient,
    Learner,
    StageError,
    StateView,
    Update,
)
from aiolearner.callbacks import (
    AccumulateGradients,
    GradientClipping,
    LRSchedule,
    MixedPrecision,
    ParamSchedule,
)
from aiolearner.testing import make_batches, make_learner, tiny_model

LOSS = torch.nn.functional.cross_entropy


def mlp(seed: int = 0) -> torch.nn.Sequential:
    """tiny_model, typed as what it is: Linear, ReLU, Linear."""
    model = tiny_model(seed=seed)
    assert isinstance(model, torch.nn.Sequential)
    return model


def two_optimizers(
    *, callbacks: tuple[Callback, ...] = (), stages: dict[str, Any] | None = None, **options: Any
) -> Learner[Any]:
    """tiny_model with SGD "a" on its first layer and SGD "b" on its last: one gradient stage,
    then both updates (as one SGD over all the weights)."""
    model = mlp()
    optimizers = {
        "a": torch.optim.SGD(model[0].parameters(), lr=0.1),
        "b": torch.optim.SGD(model[2].parameters(), lr=0.1),
    }
    if stages is None:
        stages = {"fit_batch": FitBatch(Gradient(), Update("a", commit=False), Update("b"))}
    return Learner(
        model,
        optimizers,
        LOSS,
        make_batches(4, seed=1),
        make_batches(2, seed=2),
        callbacks=callbacks,
        stages=stages,
        **options,
    )


def two_adams() -> Learner[Any]:
    """Adam "a" on the first layer and Adam "b" (another learning rate) on the last: optimizer
    states that differ, to save and load."""
    model = mlp()
    optimizers = {
        "a": torch.optim.Adam(model[0].parameters(), lr=0.01),
        "b": torch.optim.Adam(model[2].parameters(), lr=0.02),
    }
    stages = {"fit_batch": FitBatch(Gradient(), Update("a", commit=False), Update("b"))}
    return Learner(model, optimizers, LOSS, make_batches(3), stages=stages)


def weights(learner: Learner[Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


# -- the learner and its state --------------------------------------------------------------


async def test_two_optimizers_train_as_one_over_all_weights() -> None:
    one = make_learner(n_batches=4, seed=0)
    await one.fit(2)
    two = two_optimizers()
    await two.fit(2)
    assert two.state.step == one.state.step == 8
    for a, b in zip(weights(one), weights(two), strict=True):
        assert torch.equal(a, b)
    assert two.state.metrics["train_loss"] == one.state.metrics["train_loss"]


def test_state_fields_and_properties() -> None:
    single = make_learner()
    assert dict(single.optimizers) == {"main": single.optimizer}
    assert single.state.optimizers == {"main": single.optimizer}
    two = two_optimizers()
    assert list(two.optimizers) == ["a", "b"]
    assert two.optimizer is two.optimizers["a"] is two.state.optimizer  # the first
    with pytest.raises(TypeError):
        two.optimizers["c"] = two.optimizer  # type: ignore[index]


class SeesOptimizers(Callback):
    reads = frozenset({"optimizer", "optimizers"})
    seen: list[str]

    def before_fit_run(self, state: StateView) -> None:
        type(self).seen = list(state.optimizers)
        assert state.optimizers["b"] is not state.optimizer


async def test_callbacks_read_the_optimizers_by_name() -> None:
    await two_optimizers(callbacks=(SeesOptimizers(),)).fit(1)
    assert SeesOptimizers.seen == ["a", "b"]


@pytest.mark.parametrize(
    ("optimizers", "error", "match"),
    [
        ({}, ValueError, "empty"),
        ({"a b": None}, ValueError, "identifiers"),
        ({"a": "sgd"}, TypeError, "'a' must be a torch.optim.Optimizer"),
        ([1], TypeError, "mapping of names"),
    ],
)
def test_bad_optimizer_arguments(optimizers: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Learner(tiny_model(), optimizers, LOSS, make_batches(1))


def test_the_same_optimizer_twice_is_refused() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="same object"):
        Learner(model, {"a": opt, "b": opt}, LOSS, make_batches(1))


# -- Update(optimizer=) ----------------------------------------------------------------------


def batch_program(learner: Learner[Any]) -> str:
    """How the training batch was compiled (see _executor.py)."""
    return learner._rt.executor.program(learner.stage("fit_batch")).kind


def test_a_named_update_is_its_own_stage_and_never_the_default_program() -> None:
    assert Update().name == "update"
    assert Update("d").name == "update_d"
    assert batch_program(two_optimizers()) == "flat"
    # Only Update() of the first optimizer, committing, is the compiled default step.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    named: Learner[Any] = Learner(
        model,
        opt,
        LOSS,
        make_batches(1),
        stages={"fit_batch": FitBatch(Gradient(), Update("main"))},
    )
    assert batch_program(named) == "flat"
    assert batch_program(make_learner()) == "default"


def test_an_update_of_an_unknown_optimizer_is_refused_when_built() -> None:
    with pytest.raises(ConfigurationError, match=r"steps optimizer 'c'.*\['a', 'b'\]"):
        two_optimizers(stages={"fit_batch": FitBatch(Gradient(), Update("c"))})


async def test_a_batch_whose_updates_do_not_commit_is_an_error() -> None:
    learner = two_optimizers(
        stages={"fit_batch": FitBatch(Gradient(), Update("a"), Update("b", commit=False))}
    )
    await learner.fit(1)  # the first update commits: fine
    learner = two_optimizers(
        stages={
            "fit_batch": FitBatch(Gradient(), Update("a", commit=False), Update("b", commit=False))
        }
    )
    with pytest.raises(StageError, match="without being committed"):
        await learner.fit(1)


# -- checkpoints -------------------------------------------------------------------------------


async def test_a_single_optimizer_is_saved_as_before() -> None:
    learner = make_learner()
    await learner.fit(1)
    checkpoint = learner.state_dict()
    assert "optimizers" not in checkpoint
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.1


async def test_every_optimizer_is_saved_and_loaded_by_name() -> None:
    learner = two_adams()
    await learner.fit(1)
    checkpoint = copy.deepcopy(learner.state_dict())
    assert set(checkpoint["optimizers"]) == {"a", "b"}
    assert checkpoint["optimizers"]["b"]["state"][0]["step"] == 3

    model2 = mlp(seed=5)
    fresh = {
        "b": torch.optim.Adam(model2[2].parameters(), lr=0.02),  # another order: by name
        "a": torch.optim.Adam(model2[0].parameters(), lr=0.01),
    }
    stages2 = {"fit_batch": FitBatch(Gradient(), Update("a", commit=False), Update("b"))}
    other: Learner[Any] = Learner(model2, fresh, LOSS, make_batches(3), stages=stages2)
    other.load_state_dict(checkpoint)
    for name in ("a", "b"):
        mine = other.optimizers[name].state_dict()["state"]
        theirs = checkpoint["optimizers"][name]["state"]
        for index, values in theirs.items():
            for key, value in values.items():
                assert torch.equal(mine[index][key], value), (name, index, key)


async def test_optimizers_that_do_not_match_are_refused_and_nothing_loads() -> None:
    two = two_optimizers()
    await two.fit(1)
    single = make_learner()
    before = weights(single)
    with pytest.raises(ValueError, match=r"holds optimizers \['a', 'b'\], this learner has"):
        single.load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match="holds one optimizer, this learner has 2"):
        two_optimizers().load_state_dict(single.state_dict())
    renamed = dict(two.state_dict())
    renamed["optimizers"] = {"a": renamed["optimizers"]["a"], "c": renamed["optimizers"]["b"]}
    with pytest.raises(ValueError, match=r"\['a', 'c'\]"):
        two_optimizers().load_state_dict(renamed)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(single), strict=True))


async def test_a_failure_loading_the_second_optimizer_puts_the_first_back() -> None:
    learner = two_adams()
    await learner.fit(1)
    good = copy.deepcopy(learner.state_dict())
    bad = copy.deepcopy(good)
    bad["optimizers"]["a"]["param_groups"][0]["lr"] = 123.0
    bad["optimizers"]["b"]["param_groups"][0]["params"] = [0]  # wrong size: torch refuses
    with pytest.raises(ValueError, match="size"):
        learner.load_state_dict(bad)
    assert learner.optimizers["a"].param_groups[0]["lr"] == 0.01
    assert learner.optimizers["a"].state_dict()["state"][0]["step"] == 3


# -- callbacks and stages that take the optimizer ---------------------------------------------


class Lrs(Callback):
    reads = frozenset({"optimizers"})

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def after_fit_batch(self, state: StateView) -> None:
        a, b = (state.optimizers[n].param_groups[0]["lr"] for n in ("a", "b"))
        self.seen.append((a, b))


async def test_a_schedule_drives_the_optimizer_it_names() -> None:
    lrs = Lrs()
    schedule = LRSchedule(lambda opt: ExponentialLR(opt, 0.5), optimizer="b")
    learner = two_optimizers(callbacks=(schedule, lrs))
    assert schedule.name == "LRSchedule[b]"
    assert "LRSchedule[b]" in learner.state_dict()["callbacks"]
    assert "after_update_b:" in learner.describe()
    await learner.fit(1)
    assert lrs.seen == [(0.1, 0.05), (0.1, 0.025), (0.1, 0.0125), (0.1, 0.00625)]


async def test_a_param_schedule_sets_the_optimizer_it_names() -> None:
    lrs = Lrs()
    schedule = ParamSchedule("lr", lambda t: 1.0 / (t + 1), optimizer="a")
    await two_optimizers(callbacks=(schedule, lrs)).fit(1)
    assert lrs.seen == [(1.0, 0.1), (0.5, 0.1), (1 / 3, 0.1), (0.25, 0.1)]
    assert schedule.count == 4


def test_a_callback_for_an_optimizer_without_its_update_stage_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="after_update_c"):
        two_optimizers(callbacks=(LRSchedule(lambda opt: ExponentialLR(opt, 0.5), optimizer="c"),))


async def test_an_epoch_schedule_of_an_unknown_optimizer_fails_at_the_start() -> None:
    schedule = LRSchedule(lambda opt: ExponentialLR(opt, 0.5), interval="epoch", optimizer="c")
    learner = two_optimizers(callbacks=(schedule,))
    with pytest.RaisesGroup(pytest.RaisesExc(KeyError, match=r"no optimizer named 'c'")):
        await learner.fit(1)


class Grads(Callback):
    """The gradient norms each update stage sees, after any clipping."""

    reads = frozenset({"model"})
    after = (GradientClipping,)

    def __init__(self) -> None:
        self.norms: dict[str, float] = {}

    def _norm(self, layer: torch.nn.Module) -> float:
        return float(
            torch.cat([p.grad.flatten() for p in layer.parameters() if p.grad is not None]).norm()
        )

    def before_update_a(self, state: StateView) -> None:
        self.norms["a"] = self._norm(state.model[0])

    def before_update_b(self, state: StateView) -> None:
        self.norms["b"] = self._norm(state.model[2])


async def test_clipping_clips_the_gradients_of_the_optimizer_it_names() -> None:
    grads = Grads()
    clip = GradientClipping(max_norm=1e-3, optimizer="b")
    assert clip.name == "GradientClipping[b]"
    learner = two_optimizers(callbacks=(clip, grads))
    assert "before_update_b:" in learner.describe()
    await learner.fit(1)
    assert grads.norms["a"] > 1e-2  # not clipped
    assert grads.norms["b"] == pytest.approx(1e-3, rel=1e-3)
    assert clip.last_norm is not None
    assert float(clip.last_norm) > 1e-2


async def test_accumulation_gates_the_update_of_the_optimizer_it_names() -> None:
    counts = {"a": 0}

    class Count(Callback):
        def after_update_a(self, state: StateView) -> None:
            counts["a"] += 1

    # Optimizer "a" alone is trained (there is no stage for "b"), one step per two micro-batches.
    model = mlp()
    optimizers = {
        "b": torch.optim.SGD(model[2].parameters(), lr=0.0),
        "a": torch.optim.SGD(model[0].parameters(), lr=0.1),
    }
    learner: Learner[Any] = Learner(
        model,
        optimizers,
        LOSS,
        make_batches(4, seed=1),
        callbacks=[Count()],
        stages={"fit": AccumulateGradients(2, optimizer="a")},
    )
    assert learner.stage("update_a") is not None
    await learner.fit(1)
    assert counts == {"a": 2}
    assert learner.state.step == 4

    # The same as whole batches of twice the size on the first layer.
    whole_model = mlp()
    whole_opt = torch.optim.SGD(whole_model[0].parameters(), lr=0.1)
    data = make_batches(4, seed=1)
    for i in (0, 2):
        x = torch.cat([data[i][0], data[i + 1][0]])
        y = torch.cat([data[i][1], data[i + 1][1]])
        LOSS(whole_model(x), y).backward()  # type: ignore[no-untyped-call]
        whole_opt.step()
        whole_model.zero_grad(set_to_none=True)
    for a, b in zip(model[0].parameters(), whole_model[0].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
async def test_mixed_precision_steps_each_optimizer_through_one_scaler(device: str) -> None:
    amp = MixedPrecision("fp16")  # with a GradScaler (on CPU too)
    stages = {
        "fit_batch": FitBatch(
            Gradient(), amp.update_stage("a", commit=False), amp.update_stage("b")
        ),
        "gradient": amp.stages()["gradient"],
    }
    clip = GradientClipping(10.0, optimizer="a")
    clip_b = GradientClipping(10.0, optimizer="b")  # each unscales its own optimizer's grads
    learner = two_optimizers(callbacks=(amp, clip, clip_b), stages=stages, device=device)
    assert [s.name for s in learner.stage("fit_batch").children] == [
        "gradient",
        "update_a",
        "update_b",
    ]
    await learner.fit(2)
    assert learner.state.step == 8
    scaler = amp.scaler
    assert scaler is not None
    assert amp.state_dict()["scaler"]["scale"] == scaler.get_scale()
    assert all(torch.isfinite(p).all() for p in learner.model.parameters())
    assert clip.last_norm is not None
    assert torch.isfinite(clip.last_norm)


# -- a batch of two updates, cancelled between them ---------------------------------------------


class CancelsBetweenUpdates(Callback):
    """Cancels ``scope`` from an ``async def after_update_a`` hook (the batch is awaited) in the
    third batch, and awaits, so that the cancellation is delivered there."""

    def __init__(self, scope: Any) -> None:
        self.scope, self.calls = scope, 0

    async def after_update_a(self, state: StateView) -> None:
        import anyio

        self.calls += 1
        if self.calls == 3 and self.scope is not None:
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()


async def test_an_awaited_batch_cancelled_between_its_updates_is_finished_first() -> None:
    """The first update's weights are written before the batch commits: the cancellation lands
    once the batch is whole, so the counters match the weights and fit again is exact."""
    import anyio

    reference = two_optimizers(callbacks=(CancelsBetweenUpdates(None),))
    await reference.fit(2)
    with anyio.CancelScope() as scope:
        learner = two_optimizers(callbacks=(CancelsBetweenUpdates(scope),))
        await learner.fit(2)
    assert scope.cancelled_caught
    assert learner.state.step >= 3  # the third batch whole, at least
    await learner.fit(2)
    for a, b in zip(weights(learner), weights(reference), strict=True):
        assert torch.equal(a, b)
