"""A cancellation that arrives while a batch's weights are being written (a shielded hop of
``context.compute(..., writes_weights=True)``, an awaited batch with several weight writers)
lands as soon as the writes are whole: after that compute, after that batch; not at the next
turn of the loop, which in thread mode is never due (every hop gives the loop a turn)."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.from_thread
import pytest
import torch

from aiolearner import (
    Callback,
    Fit,
    FitBatch,
    Gradient,
    Learner,
    State,
    StateView,
    StopEpoch,
    Update,
)
from aiolearner.callbacks import AccumulateGradients, Metrics, ParamSchedule
from aiolearner.testing import make_batches, tiny_model

N = 40
COMPUTES = ["inline", "thread"]


class PlainFit(Fit):
    """A hand-written pass (docs/writing-stages.md), each step one ``context.compute`` call
    that writes the weights; its step 3 cancels the scope the test gives it, from the thread
    the step runs on."""

    def __init__(self, writes_weights: bool) -> None:
        super().__init__()
        self.writes_weights = writes_weights
        self.scope: anyio.CancelScope | None = None

    async def run(self, state: State) -> None:
        def step(batch: Any) -> None:
            inputs, targets = batch
            loss = state.loss_fn(state.train_model(inputs), targets)
            loss.backward()  # type: ignore[no-untyped-call]
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            self.context.commit(state)
            if state.step == 3 and self.scope is not None:
                cancel(self.scope)

        state.model.train()
        async with self.context.open_pass(state, "train") as batches:
            while (batch := await batches.next()) is not batches.END:
                await self.context.compute(step, batch, writes_weights=self.writes_weights)


def cancel(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` from the event loop's thread or from a worker thread of anyio's."""
    try:
        anyio.from_thread.run_sync(scope.cancel)
    except RuntimeError:  # (on the event loop's thread itself)
        scope.cancel()


@pytest.mark.parametrize("writes_weights", [True, False])
async def test_a_cancel_during_a_compute_in_the_worker_lands_after_it(writes_weights: bool) -> None:
    # (Inline, a compute is no await point: the cancellation lands at the loop's next turn, as
    # one from another task, which could only be made in that turn, does.)
    fit = PlainFit(writes_weights)
    model = tiny_model()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        torch.nn.functional.cross_entropy,
        make_batches(N),
        compute="thread",
        stages={"fit": fit},
    )
    with anyio.CancelScope() as scope:
        fit.scope = scope
        await learner.fit(1)
    assert scope.cancelled_caught
    # The step that asked for it is committed; nothing after it ran.
    assert learner.state.step == 3


class Gradient2(Gradient):
    name = "gradient2"


class CancelInBatch(Callback):
    """An ``async def`` hook (the batch is awaited) between the batch's two updates, which
    cancels the scope the test gives it in the fourth batch."""

    reads = frozenset({"step"})

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None

    async def after_update_a(self, state: StateView) -> None:
        if self.scope is not None and state.step == 3:
            self.scope.cancel()
            self.scope = None
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("compute", COMPUTES)
async def test_a_cancel_inside_a_shielded_batch_lands_once_it_is_committed(compute: str) -> None:
    model = tiny_model()
    hook = CancelInBatch()
    learner: Learner[Any] = Learner(
        model,
        {
            "a": torch.optim.SGD(model.parameters(), lr=0.01),
            "b": torch.optim.SGD(model.parameters(), lr=0.01),
        },
        torch.nn.functional.cross_entropy,
        make_batches(N),
        callbacks=[hook],
        compute=compute,  # type: ignore[arg-type]
        stages={
            "fit_batch": FitBatch(Gradient(), Update("a", commit=False), Gradient2(), Update("b"))
        },
    )
    with anyio.CancelScope() as scope:
        hook.scope = scope
        await learner.fit(1)
    assert scope.cancelled_caught
    # The fourth batch (its first update's writes) is whole and committed, and is the last.
    assert learner.state.step == 4


class CancelAfterBatch(Callback):
    """A ``def`` hook of the batch (it runs with the fused batch, in the compute worker in
    thread mode) that counts the batches it sees and cancels the test's scope in the fourth;
    and the epochs' training accuracy."""

    reads = frozenset({"step", "metrics", "epoch"})

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None
        self.accuracy: dict[int, float] = {}
        self.batches_seen = 0

    def after_fit_batch(self, state: StateView) -> None:
        self.batches_seen += 1
        if self.scope is not None and state.step == 4:
            cancel(self.scope)
            self.scope = None

    def after_epoch(self, state: StateView) -> None:
        self.accuracy[state.epoch] = state.metrics["train_accuracy"]


def learner_with(hook: CancelAfterBatch, compute: str, validate: str) -> Learner[Any]:
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        make_batches(6, seed=1),
        make_batches(2, seed=2),
        callbacks=[Metrics(["accuracy"]), hook],
        compute=compute,  # type: ignore[arg-type]
        validate=validate,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("validate", ["concurrent", "sequential"])
async def test_a_cancel_during_a_whole_batch_s_hop_counts_the_batch_once(
    compute: str, validate: str
) -> None:
    # In thread mode, with a concurrent validation each fused batch is one shielded hop, and
    # without one the batches run in bursts: either way the cancellation lands once the batch
    # is finished; its after_fit_batch is not run again.
    plain = learner_with(CancelAfterBatch(), compute, validate)
    await plain.fit(2)
    hook = CancelAfterBatch()
    learner = learner_with(hook, compute, validate)
    with anyio.CancelScope() as scope:
        hook.scope = scope
        await learner.fit(2)
    assert scope.cancelled_caught
    if compute == "thread" and validate == "concurrent":
        # (inline, at the loop's next turn, see the first test; a burst ends at the batch the
        # cancellation reaches it in)
        assert learner.state.step == 4
    await learner.fit(2)
    assert hook.batches_seen == 12  # every batch once, the one interrupted included
    assert hook.accuracy == plain.callbacks[1].accuracy  # type: ignore[attr-defined]
    for a, b in zip(learner.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)


class AfterUpdates(Callback):
    """The steps ``after_update`` saw; an ``async def`` hook makes the batch awaited."""

    reads = frozenset({"step"})

    def __init__(self) -> None:
        self.steps: list[int] = []

    def after_update(self, state: StateView) -> None:
        self.steps.append(state.step)

    async def before_fit_batch(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()


def learner_counting(
    seen: AfterUpdates, compute: str, accumulate: bool
) -> tuple[Learner[Any], torch.optim.Optimizer, ParamSchedule]:
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = ParamSchedule("lr", lambda t: 0.1 / (1 + t))  # (counts its after_update calls)
    learner: Learner[Any] = Learner(
        model,
        optimizer,
        torch.nn.functional.cross_entropy,
        make_batches(6, seed=1),
        callbacks=[schedule, seen],
        compute=compute,  # type: ignore[arg-type]
        stages={"fit": AccumulateGradients(4)} if accumulate else None,
    )
    return learner, optimizer, schedule


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("accumulate", [False, True])
async def test_a_cancel_during_an_update_s_hop_leaves_its_after_update_to_run(
    compute: str, accumulate: bool
) -> None:
    # The update (an awaited batch's, or AccumulateGradients' flush of the pass's short last
    # group) commits inside its hop; a cancellation arriving meanwhile is raised once the
    # update stage is over, after its after_update hooks: every committed step is seen by them.
    plain_seen = AfterUpdates()
    plain, _, plain_schedule = learner_counting(plain_seen, compute, accumulate)
    await plain.fit(2)
    seen = AfterUpdates()
    learner, optimizer, schedule = learner_counting(seen, compute, accumulate)
    steps = [0]
    with anyio.CancelScope() as scope:

        def cancel_in_the_second_step(*args: Any) -> None:
            steps[0] += 1
            if steps[0] == 2:
                cancel(scope)

        hook = optimizer.register_step_post_hook(cancel_in_the_second_step)
        await learner.fit(2)
    hook.remove()
    assert scope.cancelled_caught
    await learner.fit(2)
    assert seen.steps == plain_seen.steps
    assert schedule.count == plain_schedule.count
    for a, b in zip(learner.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)


class FreeingGradient(Gradient):
    """Frees ``state.batch`` once its backward is done (``state.invalidate``), and cancels the
    test's scope in the fourth batch, before that batch's commit."""

    def __init__(self) -> None:
        super().__init__()
        self.scope: anyio.CancelScope | None = None

    def compute(self, state: State) -> None:
        super().compute(state)
        state.invalidate("batch")
        if self.scope is not None and state.step == 3:
            cancel(self.scope)
            self.scope = None


class StopAndCancel(Callback):
    """In the fourth batch, raises StopEpoch, and cancels the test's scope from the same hook."""

    reads = frozenset({"step"})

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None
        self.seen: list[int] = []
        self.stopped = False

    def after_fit_batch(self, state: StateView) -> None:
        self.seen.append(state.step)
        if state.step == 4 and not self.stopped:  # (once: the plain run stops there too)
            self.stopped = True
            if self.scope is not None:
                cancel(self.scope)
            raise StopEpoch("enough")


def learner_of(kind: str, compute: str) -> tuple[Learner[Any], Any]:
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    part: Any
    if kind == "freeing":
        part = FreeingGradient()
        callbacks: list[Callback] = [AfterUpdates()]  # (an async hook: the batch is awaited)
        stages: Any = {"fit_batch": FitBatch(part, Update())}
    else:
        part = StopAndCancel()
        callbacks, stages = [part], None
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.nn.functional.cross_entropy,
        make_batches(8, seed=1),
        make_batches(2, seed=2),
        callbacks=callbacks,
        compute=compute,  # type: ignore[arg-type]
        stages=stages,
    )
    return learner, part


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("kind", ["freeing", "stop"])
async def test_a_cancel_with_the_batch_field_freed_or_a_stop_epoch_continues_exactly(
    compute: str, kind: str
) -> None:
    # A batch whose stage freed state.batch is still unfinished when a cancellation lands in
    # it (it is undone); a StopEpoch raised in the batch a cancellation lands after is acted on
    # (the batch's hooks are not run again).
    plain, plain_part = learner_of(kind, compute)
    await plain.fit(2)
    learner, part = learner_of(kind, compute)
    with anyio.CancelScope() as scope:
        part.scope = scope
        await learner.fit(2)
    assert scope.cancelled_caught
    assert all(p.grad is None for p in learner.model.parameters())
    await learner.fit(2)
    assert learner.state.step == plain.state.step
    if kind == "stop":
        assert part.seen == plain_part.seen
    for a, b in zip(learner.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)
