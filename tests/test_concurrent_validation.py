"""Concurrent validation: equivalence with sequential, attribution, back-pressure, failures."""

from __future__ import annotations

import contextlib
import gc
import shutil
import weakref
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import trio
import trio.testing
from anyio import wait_all_tasks_blocked
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Callback, FitHandle, Learner, RunState, StateView, StopFit, ValidateLoss
from aiolearner._validation import Validator
from aiolearner.callbacks import Checkpoint as Checkpoints
from aiolearner.testing import RecordingCallback, make_batches, make_learner

# -- helpers -----------------------------------------------------------------------------------


class Results(Callback):
    """Records what after_validate sees: the tag, the counters of its state, the loss."""

    reads = frozenset({"validation", "validation_tag", "epoch", "step", "model"})

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[int, int], int, int, float]] = []
        self.training_flags: list[bool] = []

    def after_validate(self, state: StateView) -> None:
        tag = tuple(state.validation_tag)
        assert len(tag) == 2
        self.seen.append(((tag[0], tag[1]), state.epoch, state.step, state.validation["loss"]))
        self.training_flags.append(state.model.training)


class Gate(Callback):
    """Holds every concurrent validation in ``after_validate`` until ``gate`` is set."""

    reads = frozenset({"validation_tag"})

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.tags: list[tuple[int, int]] = []

    async def after_validate(self, state: StateView) -> None:
        await self.gate.wait()
        self.tags.append(tuple(state.validation_tag))


class Epochs(Callback):
    """Records which epochs started training."""

    reads = frozenset({"epoch"})

    def __init__(self) -> None:
        self.started: list[int] = []

    def before_epoch(self, state: StateView) -> None:
        self.started.append(state.epoch)


class Outcome(Callback):
    reads = frozenset({"outcome"})

    def __init__(self) -> None:
        self.outcome: str | None = None

    def after_fit_run(self, state: StateView) -> None:
        self.outcome = state.outcome


def validator(learner: Learner[Any]) -> Validator:
    v = learner._rt.validator
    assert v is not None
    return v


def aiolearner_tasks() -> list[str]:
    names = [t.name or "" for t in anyio.get_running_tasks()]
    return [n for n in names if n.startswith("aiolearner.")]


async def cancel_when(reached: anyio.Event, fn: Any, *args: Any) -> None:
    """Run ``fn(*args)`` and cancel it once ``reached`` is set.

    A function of its own so that its task group, which references ``fn``, is gone afterwards.
    """
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fn, *args)
            await reached.wait()
            scope.cancel()


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def bn_dropout_learner(
    mode: str, compute: str, every: Any = "epoch", **options: Any
) -> Learner[Any]:
    """Batch norm + dropout, shuffled training DataLoader, validation DataLoader (both draw RNG)."""
    torch.manual_seed(1234)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(8, 3),
    )
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 4, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    train = DataLoader(TensorDataset(x[:30], y[:30]), batch_size=5, shuffle=True)
    val = DataLoader(TensorDataset(x[30:], y[30:]), batch_size=5)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.nn.functional.cross_entropy,
        train,
        val,
        compute=compute,  # type: ignore[arg-type]
        validate=mode,  # type: ignore[arg-type]
        validate_every=every,
        **options,
    )


# -- equivalence with sequential validation -----------------------------------------------------


@pytest.mark.parametrize("compute", ["inline", "thread"])
@pytest.mark.parametrize("every", ["epoch", 4])
async def test_concurrent_training_ends_with_the_same_weights_and_results(
    compute: str, every: Any
) -> None:
    runs = {}
    for mode in ("sequential", "concurrent"):
        rec = Results()
        learner = bn_dropout_learner(mode, compute, every, callbacks=[rec])
        await learner.fit(3)
        runs[mode] = (params(learner.model), rec.seen, torch.get_rng_state())
        if mode == "concurrent":
            # after_validate sees the shadow model, which stays in eval mode.
            assert rec.training_flags
            assert not any(rec.training_flags)
        assert learner.model.training
    seq, conc = runs["sequential"], runs["concurrent"]
    assert len(seq[0]) == len(conc[0])
    for a, b in zip(seq[0], conc[0], strict=True):
        assert torch.equal(a, b)
    assert conc[1] == seq[1]  # same tags, same counters, bit-identical losses
    assert torch.equal(seq[2], conc[2])  # the global RNG stream went the same way
    assert len(seq[1]) == (3 if every == "epoch" else 4)


async def test_the_same_snapshot_gives_bit_identical_metrics() -> None:
    seq = make_learner(validate="sequential")
    conc = make_learner(validate="concurrent")
    await seq.fit(1)
    await conc.fit(1)
    for a, b in zip(seq.model.parameters(), conc.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert await conc.validate() == await seq.validate()
    assert conc.state.validation_tag == seq.state.validation_tag == (1, 4)


# -- attribution ---------------------------------------------------------------------------------


async def test_results_are_tagged_with_the_snapshot_and_callbacks_see_the_tag() -> None:
    rec = Results()
    gate = Gate()
    learner = make_learner(
        callbacks=[rec, gate], validate="concurrent", compute="inline", n_batches=3
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(learner.fit, 2)
        await wait_all_tasks_blocked()
        # Training went on into epoch 1 and now waits for the only slot (back-pressure).
        assert learner.state.epoch == 1
        assert learner.state.step == 6
        assert learner.state.is_valid("validation") is False
        gate.gate.set()
    # each after_validate saw its snapshot's counters, not the training loop's
    assert [s[:3] for s in rec.seen] == [((0, 3), 0, 3), ((1, 6), 1, 6)]
    assert gate.tags == [(0, 3), (1, 6)]
    assert learner.state.validation_tag == (1, 6)
    assert learner.state.validation["loss"] == rec.seen[-1][3]
    assert learner.state.metrics["val_loss"] == rec.seen[-1][3]
    assert aiolearner_tasks() == []


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
async def test_validate_every_n_steps(mode: str) -> None:
    rec = Results()
    learner = make_learner(callbacks=[rec], validate=mode, validate_every=3, n_batches=4)
    await learner.fit(2)
    assert [s[0] for s in rec.seen] == [(0, 3), (1, 6)]


def test_validate_every_timedelta_on_a_virtual_clock() -> None:
    clock = trio.testing.MockClock()

    class Tick(Callback):
        def after_fit_batch(self, state: StateView) -> None:
            clock.jump(4.0)

    rec = Results()
    learner = make_learner(
        callbacks=[rec, Tick()],
        validate="concurrent",
        validate_every=timedelta(seconds=10),
        n_batches=4,
    )

    async def main() -> None:
        await learner.fit(2)

    trio.run(main, clock=clock)
    # 4 s a batch, one validation once 10 s have passed: after batches 3 and 6 (steps)
    assert [s[0] for s in rec.seen] == [(0, 3), (1, 6)]


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_a_validation_longer_than_the_interval_does_not_validate_a_step_twice(mode: str) -> None:
    clock = trio.testing.MockClock()

    class Tick(Callback):
        def after_fit_batch(self, state: StateView) -> None:
            clock.jump(3.0)

        def after_validate(self, state: StateView) -> None:
            clock.jump(15.0)  # a validation longer than the interval

    rec = Results()
    learner = make_learner(
        callbacks=[rec, Tick()],
        validate=mode,
        validate_every=timedelta(seconds=10),
        n_batches=4,
    )

    async def main() -> None:
        await learner.fit(2)

    trio.run(main, clock=clock)
    steps = [s[0][1] for s in rec.seen]
    assert steps == sorted(set(steps))  # each step validated once
    assert steps[0] == 4  # 12 s after the start


# -- snapshots in flight -------------------------------------------------------------------------


async def test_at_most_max_snapshots_in_flight_then_training_waits() -> None:
    gate, epochs = Gate(), Epochs()
    learner = make_learner(
        callbacks=[gate, epochs],
        validate="concurrent",
        max_snapshots=2,
        compute="inline",
        n_batches=2,
    )
    v = validator(learner)
    async with anyio.create_task_group() as tg:
        tg.start_soon(learner.fit, 5)
        await wait_all_tasks_blocked()
        # Snapshots of epochs 0 and 1 are in flight; at the end of epoch 2 training waits.
        assert epochs.started == [0, 1, 2]
        assert v.in_flight == 2
        assert len(v.shadow_models) == 2
        assert learner.state.epoch == 2
        gate.gate.set()
    assert gate.tags == [(0, 2), (1, 4), (2, 6), (3, 8), (4, 10)]
    assert v.taken == 5
    assert v.skipped == 0
    assert len(v.shadow_models) == 2  # allocated once, refreshed in place


async def test_skip_policy_skips_validations_while_the_slot_is_busy() -> None:
    gate, epochs = Gate(), Epochs()
    learner = make_learner(
        callbacks=[gate, epochs],
        validate="concurrent",
        snapshot_policy="skip",
        compute="inline",
        n_batches=2,
    )
    v = validator(learner)
    async with anyio.create_task_group() as tg:
        tg.start_soon(learner.fit, 4)
        await wait_all_tasks_blocked()
        # Training never waited: it finished, and the run waits for the one validation left.
        assert epochs.started == [0, 1, 2, 3]
        assert learner.state.epoch == 4
        assert v.skipped == 3
        gate.gate.set()
    assert gate.tags == [(0, 2)]
    assert learner.state.validation_tag == (0, 2)


async def test_shadow_model_is_refreshed_in_place_with_buffers() -> None:
    learner = bn_dropout_learner("concurrent", "inline")
    await learner.fit(1)
    v = validator(learner)
    (shadow,) = v.shadow_models
    first = [t.data_ptr() for t in (*shadow.parameters(), *shadow.buffers())]
    await learner.fit(2)
    assert v.shadow_models == [shadow]
    assert [t.data_ptr() for t in (*shadow.parameters(), *shadow.buffers())] == first
    # The shadow holds the weights (and batch-norm statistics) of the last snapshot, which was
    # taken after the last update: here, the live model's.
    for a, b in zip(
        (*shadow.parameters(), *shadow.buffers()),
        (*learner.model.parameters(), *learner.model.buffers()),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert not shadow.training
    assert all(p.grad is None and not p.requires_grad for p in shadow.parameters())


# -- early stopping ------------------------------------------------------------------------------


class StopAt(Callback):
    reads = frozenset({"validation_tag"})

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_validate(self, state: StateView) -> None:
        if state.validation_tag[0] == self.epoch:
            raise StopFit("no improvement")


async def test_stop_fit_from_a_concurrent_validation_is_late_by_at_most_one_period() -> None:
    seq = make_learner(callbacks=[StopAt(1)], validate="sequential", n_batches=3)
    await seq.fit(10)
    assert seq.state.epoch == 2

    # The slowest case: validation of epoch 1 finishes only when training has ended epoch 2.
    release = anyio.Event()

    class Hold(Callback):
        reads = frozenset({"validation_tag", "epoch"})

        async def after_validate(self, state: StateView) -> None:
            if state.validation_tag[0] == 1:
                await release.wait()

        def after_fit(self, state: StateView) -> None:
            if state.epoch == 2:
                release.set()

    outcome = Outcome()
    conc = make_learner(
        callbacks=[StopAt(1), Hold(), outcome],
        validate="concurrent",
        compute="inline",
        n_batches=3,
    )
    await conc.fit(10)
    assert conc.state.epoch == 3  # one period late: the back-pressure wait at epoch 2's end
    assert outcome.outcome == "stopped"
    assert conc.state.stop_reason == "no improvement"
    assert conc.state.validation_tag == (1, 6)


async def test_stop_fit_from_a_fast_concurrent_validation() -> None:
    learner = make_learner(callbacks=[StopAt(1)], validate="concurrent", n_batches=3)
    await learner.fit(10)
    assert 2 <= learner.state.epoch <= 3
    assert aiolearner_tasks() == []


# -- cancellation and failure ---------------------------------------------------------------------


class BlockAt(Callback):
    """Blocks forever at one hook of the validation (or training) and says so."""

    reads = frozenset({"validation_tag", "epoch"})

    def __init__(self, hook: str, epoch: int) -> None:
        self.reached = anyio.Event()
        self.epoch = epoch
        self.hook = hook

    def hooks(self) -> Any:
        async def block(state: StateView) -> None:
            if state.epoch == self.epoch and not self.reached.is_set():
                self.reached.set()
                await anyio.Event().wait()

        block.__name__ = self.hook
        yield self.hook, block


POINTS = [
    ("before_validate", 1),
    ("before_validate_batch", 1),
    ("after_validate_loss", 1),
    ("after_validate", 1),
    ("before_fit_batch", 1),  # training side, while the validation of epoch 0 may be running
    ("after_fit", 2),  # training side, just before the last snapshot
    ("after_fit_run", 3),  # after the drain
]


@pytest.mark.parametrize(("hook", "epoch"), POINTS)
async def test_cancel_at_any_point_leaks_nothing_and_resumes_exactly(hook: str, epoch: int) -> None:
    # Inline compute: with worker threads, a thread drops the arguments of its last job a moment
    # after handing back the result, which would make the weakref check below racy.
    torch.manual_seed(0)
    reference = make_learner(validate="concurrent", compute="inline", n_batches=3)
    await reference.fit(3)
    reference_rng = torch.get_rng_state()
    torch.manual_seed(0)

    block = BlockAt(hook, epoch)
    # after_fit_run runs shielded, bounded by teardown_timeout: blocked there, the cancellation
    # takes effect when the bound is reached.
    learner = make_learner(
        callbacks=[block],
        validate="concurrent",
        compute="inline",
        n_batches=3,
        teardown_timeout=0.5 if hook == "after_fit_run" else 30.0,
    )
    v = validator(learner)
    with contextlib.ExitStack() as stack:
        if hook == "after_fit_run":
            stack.enter_context(pytest.warns(UserWarning, match="the hook of BlockAt was cut off"))
        await cancel_when(block.reached, learner.fit, 3)
    assert aiolearner_tasks() == []
    # A snapshot whose validation was cancelled stays queued (at most max_snapshots)...
    assert v.in_flight <= 1
    assert learner.status.value == "idle"
    assert not v.state.fields()  # the validation state holds nothing between passes
    if learner.state.is_valid("validation"):
        assert learner.state.validation_tag[0] <= learner.state.epoch
    await learner.fit(3)  # resumes where it stopped
    # ... and is validated first when fit resumes: the results are the uninterrupted run's.
    assert v.in_flight == 0
    for a, b in zip(learner.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert learner.state.validation_tag == reference.state.validation_tag == (2, 9)
    assert learner.state.validation == reference.state.validation
    assert torch.equal(torch.get_rng_state(), reference_rng)

    shadows = [weakref.ref(m) for m in v.shadow_models]
    assert shadows
    del learner, v, block
    gc.collect()
    assert all(ref() is None for ref in shadows)


class BadLoss(ValidateLoss):
    def compute(self, state: Any) -> None:
        if state.epoch == 1:
            raise ValueError("shape mismatch in validation")
        super().compute(state)


class Boom(Callback):
    reads = frozenset({"epoch"})

    def __init__(self, hook: str) -> None:
        self.hook = hook

    def hooks(self) -> Any:
        def boom(state: StateView) -> None:
            if state.epoch == 1:
                raise KeyError("callback failed")

        boom.__name__ = self.hook
        yield self.hook, boom


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_stage_error_in_validation_propagates_bare(compute: str) -> None:
    outcome = Outcome()
    learner = make_learner(
        callbacks=[outcome],
        validate="concurrent",
        compute=compute,
        stages={"validate_loss": BadLoss()},
        n_batches=3,
    )
    with pytest.raises(ValueError, match="shape mismatch") as info:
        await learner.fit(5)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "concurrent validation of the weights at epoch 2 (state.epoch 1), step 6" in notes
    assert outcome.outcome == "error"
    assert aiolearner_tasks() == []
    assert validator(learner).in_flight == 0
    # The run stopped while epoch 2 (at most) trained; the results of epoch 0 had landed.
    assert learner.state.epoch <= 3
    assert learner.state.validation_tag == (0, 3)
    if compute == "inline":  # see test_cancel_at_any_point... for why not with threads
        shadow = weakref.ref(validator(learner).shadow_models[0])
        del learner, info  # the traceback's frames reference the snapshot too
        gc.collect()
        assert shadow() is None


@pytest.mark.parametrize("hook", ["before_validate", "after_validate_batch", "after_validate"])
async def test_a_callback_error_in_validation_comes_out_grouped(hook: str) -> None:
    outcome = Outcome()
    learner = make_learner(callbacks=[Boom(hook), outcome], validate="concurrent", n_batches=3)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(5)
    assert info.group_contains(KeyError, match="callback failed")
    assert outcome.outcome == "error"
    assert aiolearner_tasks() == []
    assert validator(learner).in_flight == 0


async def test_an_error_in_training_cancels_the_running_validation() -> None:
    gate = Gate()
    outcome = Outcome()
    learner = make_learner(
        callbacks=[gate, Boom("after_fit_batch"), outcome],
        validate="concurrent",
        compute="inline",
        n_batches=3,
    )
    with pytest.raises(ExceptionGroup):
        await learner.fit(5)
    # the validation of epoch 0 was still held by the gate: cancelled, not completed
    assert gate.tags == []
    assert outcome.outcome == "error"
    assert aiolearner_tasks() == []
    assert validator(learner).in_flight == 0


async def test_fit_returns_after_the_last_validation_and_before_after_fit_run() -> None:
    order: list[str] = []

    class Order(Callback):
        reads = frozenset({"validation_tag"})

        async def after_validate(self, state: StateView) -> None:
            await anyio.lowlevel.checkpoint()
            order.append(f"after_validate{tuple(state.validation_tag)}")

        def after_fit_run(self, state: StateView) -> None:
            order.append("after_fit_run")

    learner = make_learner(callbacks=[Order()], validate="concurrent", n_batches=2)
    await learner.fit(2)
    assert order == ["after_validate(0, 2)", "after_validate(1, 4)", "after_fit_run"]


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"validate": "background"},
        {"validate_every": 0},
        {"validate_every": True},
        {"validate_every": "step"},
        {"validate_every": timedelta(0)},
        {"max_snapshots": 0},
        {"snapshot_policy": "drop"},
    ],
)
def test_bad_options_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        make_learner(**options)


def test_default_options_add_nothing_to_the_loop() -> None:
    assert make_learner()._rt.validator is None
    assert make_learner(validate="concurrent", with_validation=False)._rt.validator is None
    assert make_learner(validate="concurrent")._rt.validator is not None


async def test_concurrent_validation_with_thread_compute_overlaps_training() -> None:
    # Training's and validation's compute use separate worker lanes: a validation batch can
    # run while a training batch is in its thread. Each side waits for the other at a barrier,
    # whichever comes first: the first validation batch (of epoch 0's weights) and the first
    # training batch after that snapshot (epoch 1's first). Neither passes unless both compute
    # at once.
    import threading

    barrier = threading.Barrier(2, timeout=10)
    met: list[str] = []
    training_batches = 0

    class Meet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            nonlocal training_batches
            if torch.is_grad_enabled():
                training_batches += 1
                if training_batches == 5:  # 4 batches an epoch: epoch 1's first
                    met.append("training")
                    barrier.wait()
            elif torch.is_inference_mode_enabled() and "validation" not in met:
                met.append("validation")
                barrier.wait()
            return self.linear(x)  # type: ignore[no-any-return]

    model = Meet()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        make_batches(4),
        make_batches(2, seed=5),
        compute="thread",
        validate="concurrent",
    )
    await learner.fit(2)
    assert sorted(met) == ["training", "validation"]
    assert not barrier.broken


async def test_after_validate_sees_the_validated_weights_not_the_live_ones() -> None:
    live: dict[int, list[torch.Tensor]] = {}
    validated: dict[int, list[torch.Tensor]] = {}
    release = anyio.Event()

    class Checkpoint(Callback):
        reads = frozenset({"model", "epoch", "validation_tag"})

        def after_fit(self, state: StateView) -> None:  # training side: the weights at epoch end
            live[state.epoch] = params(state.model)
            if state.epoch == 1:
                release.set()

        async def after_validate(self, state: StateView) -> None:
            if state.validation_tag[0] == 0:
                await release.wait()  # training has finished epoch 1 meanwhile
            validated[state.validation_tag[0]] = params(state.model)

    learner = make_learner(
        callbacks=[Checkpoint()], validate="concurrent", compute="inline", n_batches=3
    )
    await learner.fit(2)
    assert sorted(validated) == [0, 1]
    for epoch in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(validated[epoch], live[epoch], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(live[0], live[1], strict=True))


def test_one_learner_fits_under_asyncio_then_trio() -> None:
    # Worker lanes and events belong to one event loop: they are created per run.
    rec = Results()
    learner = make_learner(callbacks=[rec], validate="concurrent", compute="thread", n_batches=3)
    learner.fit_sync(1, backend="asyncio")
    learner.fit_sync(2, backend="trio")
    learner.fit_sync(3, backend="asyncio")
    assert [s[0] for s in rec.seen] == [(0, 3), (1, 6), (2, 9)]
    assert learner.validate_sync(backend="trio") == learner.state.validation


class StopOnceIn(Callback):
    """A StopFit from ``hook`` in epoch 1's concurrent validation, once."""

    reads = frozenset({"epoch"})

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.fired = False

    def hooks(self) -> Iterator[tuple[str, Any]]:
        yield self.hook, self._check

    def _check(self, state: StateView) -> None:
        if state.epoch == 1 and not self.fired:
            self.fired = True
            raise StopFit(f"stop in {self.hook}")


@pytest.mark.parametrize("hook", ["before_validate", "after_validate_batch"])
async def test_a_tail_stopped_inside_its_pass_runs_again_in_the_next_fit(
    hook: str, tmp_path: Path
) -> None:
    """Fit again does what a fresh learner resumed from the stop's checkpoint does: the stopped
    tail's validation and after_epoch, once, then the rest; every epoch is recorded once."""
    rec = RecordingCallback(hooks=("after_validate", "after_epoch"), with_counters=True)
    learner = make_learner(
        callbacks=[StopOnceIn(hook), rec, Checkpoints(tmp_path / "a")], validate="concurrent"
    )
    await learner.fit(4)
    assert learner.state.stop_reason == f"stop in {hook}"
    stopped = list(rec.calls)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    await learner.fit(4)
    again = rec.calls[len(stopped) :]
    fresh_rec = RecordingCallback(hooks=("after_validate", "after_epoch"), with_counters=True)
    fresh = make_learner(
        callbacks=[StopOnceIn(hook), fresh_rec, Checkpoints(tmp_path / "b")],
        validate="concurrent",
    )
    fresh.callbacks[0].fired = True  # type: ignore[attr-defined]
    await fresh.fit(4, resume="last")
    assert again == fresh_rec.calls
    epochs = [call for call in rec.calls if call.startswith("after_epoch")]
    assert epochs == ["after_epoch@0:4", "after_epoch@1:8", "after_epoch@2:12", "after_epoch@3:16"]


class StopWhenTrainingWaits(Callback):
    """In epoch 1's tail: waits until every other task is blocked (training, at the end of its
    run or waiting for the snapshot slot), then stops the run."""

    reads = frozenset({"epoch"})

    def __init__(self) -> None:
        self.fired = False

    async def before_validate(self, state: StateView) -> None:
        if state.epoch == 1 and not self.fired:
            self.fired = True
            await wait_all_tasks_blocked()
            raise StopFit("stop in the tail")


@pytest.mark.parametrize("compute", ["inline", "thread", "auto"])
async def test_a_tail_stopped_while_training_waits_stops_the_run_and_runs_next_fit(
    compute: str,
) -> None:
    """The stop lands in the slot wait or the final drain: the run stops (no other tail runs
    the stopped one in the meantime), and the next fit runs that tail once."""
    rec = RecordingCallback(hooks=("after_epoch", "after_fit_run"), with_counters=True)
    handle_learner = make_learner(
        callbacks=[StopWhenTrainingWaits(), rec], validate="concurrent", compute=compute
    )
    handle = FitHandle(handle_learner, 3)
    assert await handle.run() is RunState.STOPPED
    assert handle_learner.state.stop_reason == "stop in the tail"
    await handle_learner.fit(3)
    epochs = [call for call in rec.calls if call.startswith("after_epoch")]
    assert epochs == ["after_epoch@0:4", "after_epoch@1:8", "after_epoch@2:12"]
