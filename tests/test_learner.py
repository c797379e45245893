"""Whole hook-order traces, the learner's lifecycle, and custom stages."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import (
    Callback,
    ComputeStage,
    FitBatch,
    Learner,
    LearnerBusyError,
    LearnerStatus,
    State,
    StateView,
)
from aiolearner.testing import (
    DEFAULT_HOOKS,
    RecordingCallback,
    make_batches,
    make_learner,
    tiny_model,
)

BATCH = (
    "before_fit_batch",
    "before_gradient",
    "after_gradient",
    "before_update",
    "after_update",
    "after_fit_batch",
)
VAL_BATCH = (
    "before_validate_batch",
    "before_validate_loss",
    "after_validate_loss",
    "after_validate_batch",
)


def expected_run(
    epochs: range, n_batches: int, n_val: int, *, step: int = 0, epoch_end: int | None = None
) -> list[str]:
    """The hook trace of one ``fit`` call, each entry ``hook@epoch:step``."""
    out = [f"before_fit_run@{epochs.start}:{step}"]
    for e in epochs:
        out += [f"before_epoch@{e}:{step}", f"before_fit@{e}:{step}"]
        for _ in range(n_batches):
            for hook in BATCH:
                # step advances when Update commits the batch
                s = step + 1 if hook in ("after_update", "after_fit_batch") else step
                out.append(f"{hook}@{e}:{s}")
            step += 1
        out.append(f"after_fit@{e}:{step}")
        if n_val:
            out.append(f"before_validate@{e}:{step}")
            out += [f"{h}@{e}:{step}" for _ in range(n_val) for h in VAL_BATCH]
            out.append(f"after_validate@{e}:{step}")
        out.append(f"after_epoch@{e}:{step}")
    out.append(f"after_fit_run@{epochs.stop if epoch_end is None else epoch_end}:{step}")
    return out


# -- hook order --------------------------------------------------------------------------------


async def test_two_epochs_with_validation_whole_trace() -> None:
    rec = RecordingCallback(with_counters=True)
    learner = make_learner(callbacks=[rec], n_batches=3)
    await learner.fit(2)
    assert rec.calls == expected_run(range(2), 3, 2)
    assert {c.split("@")[0] for c in rec.calls} == set(DEFAULT_HOOKS)
    assert (learner.state.epoch, learner.state.step, learner.state.batch_index) == (2, 6, 0)


async def test_without_validation_data_no_validate_hooks() -> None:
    rec = RecordingCallback(with_counters=True)
    learner = make_learner(callbacks=[rec], n_batches=2, with_validation=False)
    await learner.fit(2)
    assert rec.calls == expected_run(range(2), 2, 0)


async def test_fit_then_fit_more_continues_from_the_epoch_reached() -> None:
    rec = RecordingCallback(with_counters=True)
    learner = make_learner(callbacks=[rec], n_batches=2)
    await learner.fit(2)
    assert rec.calls == expected_run(range(2), 2, 2)
    rec.calls.clear()
    await learner.fit(3)
    assert rec.calls == expected_run(range(2, 3), 2, 2, step=4)
    rec.calls.clear()
    # Already there: only the run-level hooks run.
    await learner.fit(3)
    assert rec.calls == ["before_fit_run@3:6", "after_fit_run@3:6"]


class MixedRecorder(Callback):
    """Async hooks for the stage-level hooks, def hooks for the others, one shared log."""

    reads = frozenset({"epoch", "step"})

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _log(self, hook: str, state: StateView) -> None:
        self.calls.append(f"{hook}@{state.epoch}:{state.step}")

    async def before_fit_run(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("before_fit_run", state)

    def before_epoch(self, state: StateView) -> None:
        self._log("before_epoch", state)

    async def before_fit(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("before_fit", state)

    def before_fit_batch(self, state: StateView) -> None:
        self._log("before_fit_batch", state)

    async def before_gradient(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("before_gradient", state)

    def after_gradient(self, state: StateView) -> None:
        self._log("after_gradient", state)

    async def before_update(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("before_update", state)

    async def after_update(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("after_update", state)

    def after_fit_batch(self, state: StateView) -> None:
        self._log("after_fit_batch", state)

    def after_fit(self, state: StateView) -> None:
        self._log("after_fit", state)

    async def before_validate(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("before_validate", state)

    async def before_validate_batch(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("before_validate_batch", state)

    def before_validate_loss(self, state: StateView) -> None:
        self._log("before_validate_loss", state)

    async def after_validate_loss(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("after_validate_loss", state)

    def after_validate_batch(self, state: StateView) -> None:
        self._log("after_validate_batch", state)

    async def after_validate(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("after_validate", state)

    async def after_epoch(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("after_epoch", state)

    async def after_fit_run(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        self._log("after_fit_run", state)


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_async_and_def_hooks_run_in_the_same_order(compute: str) -> None:
    mixed = MixedRecorder()
    learner = make_learner(callbacks=[mixed], n_batches=2, compute=compute)
    await learner.fit(2)
    assert mixed.calls == expected_run(range(2), 2, 2)


# -- lifecycle ---------------------------------------------------------------------------------


class Blocker(Callback):
    """Signals when the run reached ``before_fit_batch``, then waits to be released."""

    def __init__(self) -> None:
        self.reached = anyio.Event()
        self.release = anyio.Event()

    async def before_fit_batch(self, state: StateView) -> None:
        self.reached.set()
        await self.release.wait()


async def test_fit_while_fitting_raises_learner_busy() -> None:
    blocker = Blocker()
    learner = make_learner(callbacks=[blocker], n_batches=1)
    assert learner.status is LearnerStatus.IDLE
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(learner.fit, 1)
            await blocker.reached.wait()
            assert learner.status.value == "fitting"
            with pytest.raises(LearnerBusyError, match="fit") as info:
                await learner.fit(2)
            assert info.value.status == "fitting"
            with pytest.raises(LearnerBusyError):
                await learner.validate()
            with pytest.raises(LearnerBusyError):
                await learner.predict(make_batches(1))
            with pytest.raises(LearnerBusyError):
                learner.replace_stage("fit_batch", FitBatch())
            blocker.release.set()
    assert learner.status is LearnerStatus.IDLE
    assert learner.state.epoch == 1


async def test_validate_returns_the_metrics() -> None:
    learner = make_learner(n_batches=2)
    model = learner.model
    val = make_batches(2, seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    results = await learner.validate()
    # The sample-weighted mean loss of the validation data, on the current weights.
    with torch.no_grad():
        expected = sum(
            float(torch.nn.functional.cross_entropy(model(x), y)) * len(x) for x, y in val
        ) / sum(len(x) for x, _ in val)
    assert results["loss"] == pytest.approx(expected, rel=1e-6)
    assert learner.state.metrics["val_loss"] == results["loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert learner.status is LearnerStatus.IDLE


async def test_validate_without_val_data_raises() -> None:
    learner = make_learner(with_validation=False)
    with pytest.raises(ValueError, match="val_data"):
        await learner.validate()


async def test_predict_with_pairs_and_with_inputs_alone() -> None:
    learner = make_learner()
    data = make_batches(3, batch_size=4)
    model = learner.model
    with torch.no_grad():
        expected = torch.cat([model(x) for x, _ in data])
    from_pairs = await learner.predict(data)
    from_inputs = await learner.predict([x for x, _ in data])
    assert isinstance(from_pairs, torch.Tensor)
    assert from_pairs.shape == (12, 3)
    assert torch.allclose(from_pairs, expected)
    assert torch.equal(from_pairs, from_inputs)
    assert model.training  # restored after predict
    assert learner.status is LearnerStatus.IDLE


async def test_predict_takes_one_tensor_and_single_input_batches() -> None:
    learner = make_learner()
    inputs = torch.cat([x for x, _ in make_batches(3, batch_size=4)])
    with torch.no_grad():
        expected = learner.model(inputs)
    one_tensor = await learner.predict(inputs)  # one batch, not a batch per row
    loader = DataLoader(TensorDataset(inputs), batch_size=5)  # batches of [inputs]
    from_loader = await learner.predict(loader)
    assert one_tensor.shape == from_loader.shape == (12, 3)
    assert torch.allclose(one_tensor, expected)
    assert torch.allclose(from_loader, expected)


async def test_predict_draws_anew_each_call_for_a_model_that_samples() -> None:
    """Monte Carlo dropout (dropout kept on in eval mode): every call draws from the global
    generators as torch code does, so repeated calls give the spread the method measures."""

    class MCDropout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.dropout(self.linear(x), 0.5, training=True)

    torch.manual_seed(0)
    model = MCDropout()
    learner: Learner[Any] = Learner(
        model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss, [()]
    )
    inputs = torch.cat([x for x, _ in make_batches(2, batch_size=4)])
    outputs = [await learner.predict(inputs) for _ in range(3)]
    assert not torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[1], outputs[2])


async def test_an_error_in_predict_names_the_batch() -> None:
    learner = make_learner()
    data = [x for x, _ in make_batches(3, batch_size=4)]
    data[2] = torch.randn(4, 7)  # the model takes 4 features
    with pytest.raises(RuntimeError) as caught:
        await learner.predict(data)
    assert "aiolearner: raised in predict on batch 2 of the data given" in caught.value.__notes__
    assert learner.status is LearnerStatus.IDLE


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_fit_sync_on_both_backends(backend: Any) -> None:
    rec = RecordingCallback(with_counters=True)
    learner = make_learner(callbacks=[rec], n_batches=2)
    learner.fit_sync(1, backend=backend)
    assert rec.calls == expected_run(range(1), 2, 2)
    assert learner.validate_sync(backend=backend)["loss"] > 0


def test_bad_arguments_raise_type_error_naming_the_argument() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy
    data = make_batches(1)
    with pytest.raises(TypeError, match="model"):
        Learner("not a model", opt, loss, data)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        Learner(model, "sgd", loss, data)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss_fn"):
        Learner(model, opt, 3, data)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="train_data"):
        Learner(model, opt, loss, 42)
    with pytest.raises(TypeError, match="val_data"):
        Learner(model, opt, loss, data, 42)
    with pytest.raises(TypeError, match="callbacks"):
        Learner(model, opt, loss, data, callbacks=[RecordingCallback])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="stages"):
        Learner(model, opt, loss, data, stages={"fit_batch": "x"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="compute"):
        Learner(model, opt, loss, data, compute="gpu")  # type: ignore[arg-type]


async def test_fit_rejects_a_bad_epoch_count() -> None:
    learner = make_learner()
    with pytest.raises(ValueError, match="epochs"):
        await learner.fit(-1)
    with pytest.raises(ValueError, match="epochs"):
        await learner.fit(1.5)  # type: ignore[arg-type]


async def test_batch_that_is_not_a_pair_raises_type_error_naming_the_stage() -> None:
    inputs_only = [x for x, _ in make_batches(2)]
    learner = make_learner(train_data=inputs_only, with_validation=False)
    with pytest.raises(TypeError, match="'gradient'") as info:
        await learner.fit(1)
    assert "(inputs, targets)" in str(info.value)
    assert learner.state.step == 0
    assert learner.status is LearnerStatus.IDLE


# -- custom stages -----------------------------------------------------------------------------


class AccumulatingFitBatch(FitBatch):
    """Gradient accumulation: the batch's halves are back-propagated one after the other."""

    async def run(self, state: State) -> None:
        inputs, targets = state.batch
        half = len(inputs) // 2
        for sl in (slice(0, half), slice(half, None)):
            state.batch = (inputs[sl], targets[sl])
            await self.gradient(state)
        state.batch = (inputs, targets)
        await self.update(state)


def reference_accumulation(epochs: int, n_batches: int) -> list[torch.Tensor]:
    model = tiny_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_batches(n_batches, seed=1)
    for _ in range(epochs):
        for x, y in data:
            for sl in (slice(0, 2), slice(2, None)):
                torch.nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()  # type: ignore[no-untyped-call]
            opt.step()
            opt.zero_grad(set_to_none=True)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("compute", ["inline", "thread"])
@pytest.mark.parametrize("how", ["constructor", "replace_stage"])
async def test_custom_fit_batch_gradient_accumulation(compute: str, how: str) -> None:
    rec = RecordingCallback(with_counters=True)
    if how == "constructor":
        learner = make_learner(
            callbacks=[rec],
            n_batches=3,
            compute=compute,
            stages={"fit_batch": AccumulatingFitBatch()},
        )
    else:
        learner = make_learner(callbacks=[rec], n_batches=3, compute=compute)
        learner.replace_stage("fit_batch", AccumulatingFitBatch())
    assert isinstance(learner.stage("fit_batch"), AccumulatingFitBatch)
    await learner.fit(2)
    expected = reference_accumulation(2, 3)
    for got, want in zip(learner.model.parameters(), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert learner.state.step == 6
    # Two gradient passes per batch, each with its hooks.
    first_batch = rec.calls[3:12]
    assert first_batch == [
        "before_fit_batch@0:0",
        "before_gradient@0:0",
        "after_gradient@0:0",
        "before_gradient@0:0",
        "after_gradient@0:0",
        "before_update@0:0",
        "after_update@0:1",
        "after_fit_batch@0:1",
        "before_fit_batch@0:1",
    ]


class Clip(ComputeStage):
    """A user stage: clip gradients between Gradient and Update."""

    name = "clip"

    def compute(self, state: State) -> None:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1e-3)


class ClippingFitBatch(FitBatch):
    def __init__(self) -> None:
        super().__init__()
        self.clip = Clip()
        self.children = (self.gradient, self.clip, self.update)


class GradNormProbe(Callback):
    reads = frozenset({"model"})

    def __init__(self) -> None:
        self.norms: list[float] = []

    def after_clip(self, state: StateView) -> None:
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_hooks_of_a_user_added_stage(compute: str) -> None:
    hooks = [*DEFAULT_HOOKS, "before_clip", "after_clip"]
    rec = RecordingCallback(hooks=hooks)
    probe = GradNormProbe()
    learner = make_learner(
        callbacks=[rec, probe],
        n_batches=2,
        with_validation=False,
        compute=compute,
        stages={"fit_batch": ClippingFitBatch()},
    )
    await learner.fit(1)
    batch = [
        "before_fit_batch",
        "before_gradient",
        "after_gradient",
        "before_clip",
        "after_clip",
        "before_update",
        "after_update",
        "after_fit_batch",
    ]
    assert rec.calls == [
        "before_fit_run",
        "before_epoch",
        "before_fit",
        *batch,
        *batch,
        "after_fit",
        "after_epoch",
        "after_fit_run",
    ]
    assert len(probe.norms) == 2
    assert all(n <= 1e-3 * 1.001 for n in probe.norms)
    assert "Clip (clip) compute" in learner.describe()


async def test_replace_stage_rejects_unknown_names() -> None:
    learner = make_learner()
    with pytest.raises(KeyError, match="no_such"):
        learner.replace_stage("no_such", FitBatch())
