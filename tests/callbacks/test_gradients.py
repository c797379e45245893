from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from aiolearner import Callback, Learner, SkipBatch, StateView, StopFit
from aiolearner.callbacks import AccumulateGradients, Checkpoint, GradientClipping, LRSchedule
from aiolearner.testing import make_batches, make_learner, tiny_model


def _concat(
    batches: list[tuple[torch.Tensor, torch.Tensor]], sizes: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    i = 0
    for n in sizes:
        group = batches[i : i + n]
        out.append((torch.cat([x for x, _ in group]), torch.cat([y for _, y in group])))
        i += n
    return out


class CountSteps(Callback):
    reads = frozenset({"step", "batch_index"})

    def __init__(self) -> None:
        self.updates: list[int] = []

    def after_update(self, state: StateView) -> None:
        self.updates.append(state.step)


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_accumulation_equals_the_big_batch(compute: str) -> None:
    micro = make_batches(6, batch_size=5, seed=4)
    counter = CountSteps()
    accumulated = make_learner(
        train_data=micro,
        with_validation=False,
        stages={"fit": AccumulateGradients(4)},
        callbacks=[counter],
        compute=compute,
    )
    await accumulated.fit(2)
    # Groups of 4 and 2 micro-batches (the epoch's leftover is applied at its end).
    big = make_learner(train_data=_concat(micro, [4, 2]), with_validation=False, compute=compute)
    await big.fit(2)
    for a, b in zip(accumulated.model.parameters(), big.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert accumulated.state.step == 12  # step counts micro-batches
    assert counter.updates == [4, 6, 10, 12]
    # And it really differs from stepping on every micro-batch.
    plain = make_learner(train_data=micro, with_validation=False)
    await plain.fit(2)
    assert not torch.allclose(
        next(iter(plain.model.parameters())), next(iter(big.model.parameters()))
    )


async def test_accumulation_resumes_mid_epoch_on_group_boundaries() -> None:
    from aiolearner import StopFit

    micro = make_batches(8, batch_size=5, seed=4)

    class Pause(Callback):
        reads = frozenset({"step"})

        def __init__(self, at: int) -> None:
            self.at = at

        def after_fit_batch(self, state: StateView) -> None:
            if state.step == self.at:
                raise StopFit("pause")

    whole = make_learner(
        train_data=micro, with_validation=False, stages={"fit": AccumulateGradients(2)}
    )
    await whole.fit(1)
    # Paused once on a group boundary and once inside a group (after micro-batch 6 of 8).
    parts = make_learner(
        train_data=micro,
        with_validation=False,
        stages={"fit": AccumulateGradients(2)},
        callbacks=[Pause(4), Pause(5)],
    )
    await parts.fit(1)
    assert parts.state.step == 4
    await parts.fit(1)
    assert parts.state.step == 5
    await parts.fit(1)
    assert parts.state.step == 8
    for a, b in zip(whole.model.parameters(), parts.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("at", [1, 2])
async def test_a_stop_epoch_in_a_group_applies_or_drops_it_as_the_pass_ends(at: int) -> None:
    """A StopEpoch before micro-batch ``at`` of a group of 3 consumes that batch. Before its
    middle one: the group is the pass's short last one, applied (scaled by 1/2, the consumed
    batch counting as a zero). Before its last one: as a skipped last micro-batch, the group's
    update is skipped. Either way nothing is carried into the next epoch's first group."""
    from aiolearner import Callback, StopEpoch

    class StopAt(Callback):
        reads = frozenset({"batch_index", "epoch"})

        def before_fit_batch(self, state: StateView) -> None:
            if state.epoch == 0 and state.batch_index == at:
                raise StopEpoch("enough of this epoch")

    acc = AccumulateGradients(3)
    learner = make_learner(
        callbacks=[StopAt()], stages={"fit": acc}, n_batches=5, with_validation=False
    )
    updates: list[int] = []
    learner.optimizer.register_step_post_hook(lambda *_: updates.append(1))
    await learner.fit(1)
    assert getattr(acc.fit_batch, "window", "missing") is None  # nothing carried over
    assert len(updates) == (1 if at == 1 else 0)
    await learner.fit(2)
    assert len(updates) == (1 if at == 1 else 0) + 2  # epoch 1: a group of 3, a short one of 2
    # No group in progress once the short one is applied (a checkpoint under FSDP would warn).
    assert getattr(acc.fit_batch, "in_group", "missing") is False


def test_accumulation_rejects_bad_every() -> None:
    with pytest.raises(ValueError, match="every"):
        AccumulateGradients(0)


class GradProbe(Callback):
    """Records gradients as the optimizer will see them (after the clipping callback)."""

    reads = frozenset({"optimizer"})
    after = (GradientClipping,)

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def before_update(self, state: StateView) -> None:
        grads = [p.grad.flatten() for g in state.optimizer.param_groups for p in g["params"]]
        self.grads.append(torch.cat(grads).clone())


async def test_clipping_by_norm_and_by_value() -> None:
    probe = GradProbe()
    clip = GradientClipping(max_norm=0.05)
    learner = make_learner(callbacks=[clip, probe], n_batches=3, lr=1.0, with_validation=False)
    await learner.fit(1)
    for g in probe.grads:
        assert float(g.norm()) == pytest.approx(0.05, rel=1e-4)
    assert clip.last_norm is not None
    assert float(clip.last_norm) > 0.05

    probe = GradProbe()
    learner = make_learner(
        callbacks=[GradientClipping(max_value=0.01, norm_type="inf"), probe],
        n_batches=2,
        with_validation=False,
    )
    await learner.fit(1)
    for g in probe.grads:
        assert float(g.abs().max()) <= 0.01 + 1e-7
        assert float(g.abs().max()) == pytest.approx(0.01)

    unclipped = GradProbe()
    learner = make_learner(
        callbacks=[GradientClipping(max_norm=1e6), unclipped], n_batches=1, with_validation=False
    )
    await learner.fit(1)
    assert float(unclipped.grads[0].norm()) < 1e6


def test_clipping_needs_a_limit() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping()
    with pytest.raises(ValueError, match="positive"):
        GradientClipping(max_norm=-1.0)
    assert GradientClipping(1.0, norm_type="inf").norm_type == math.inf


class SkipAfterGradient(Callback):
    """Skips micro-batch ``index`` of the epoch once its gradient is computed."""

    reads = frozenset({"batch_index"})

    def __init__(self, index: int) -> None:
        self.index = index

    def after_gradient(self, state: StateView) -> None:
        if state.batch_index == self.index:
            raise SkipBatch("a bad micro-batch")


def _hand_accumulation(skip: int) -> torch.nn.Module:
    """Groups of 4, micro-batch ``skip`` left out (a zero part), each group divided by 4; a
    group whose last micro-batch is skipped makes no update and drops its gradients."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, (x, y) in enumerate(make_batches(8)):
        if i != skip:
            torch.nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        if i % 4 == 3:
            if i == skip:
                opt.zero_grad(set_to_none=True)
                continue
            for p in model.parameters():
                assert p.grad is not None
                p.grad.mul_(1 / 4)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("skip", [4, 5, 7])
@pytest.mark.parametrize("compute", ["auto", "thread"])
async def test_a_skipped_micro_batch_drops_its_own_part_only(skip: int, compute: Any) -> None:
    model = tiny_model()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        make_batches(8),
        callbacks=[SkipAfterGradient(skip)],
        stages={"fit": AccumulateGradients(4)},
        compute=compute,
    )
    await learner.fit(1)
    expected = _hand_accumulation(skip)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), expected.parameters(), strict=True)
    )


class CancelInGradient(Callback):
    """Cancels ``scope`` from inside micro-batch ``index``'s gradient hooks, once."""

    reads = frozenset({"batch_index"})

    def __init__(self, index: int, scope: anyio.CancelScope) -> None:
        self.index, self.scope = index, scope

    async def after_gradient(self, state: StateView) -> None:
        if state.batch_index == self.index and not self.scope.cancel_called:
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()


async def test_a_cancellation_inside_a_micro_batch_then_fit_again_is_exact() -> None:
    reference = make_learner(n_batches=10, stages={"fit": AccumulateGradients(4)})
    await reference.fit(2)
    with anyio.CancelScope() as scope:
        learner = make_learner(
            n_batches=10,
            stages={"fit": AccumulateGradients(4)},
            callbacks=[CancelInGradient(5, scope)],
        )
        await learner.fit(2)
    assert learner.state.step == 5
    await learner.fit(2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(learner.model.parameters(), reference.model.parameters(), strict=True)
    )


def checkpointed(directory: Path, *extra: Callback) -> Learner[Any]:
    """Groups of 4 in 10 micro-batches, checkpointed with the group's gradients to ``directory``."""
    acc = AccumulateGradients(4)
    return make_learner(
        n_batches=10,
        stages={"fit": acc},
        callbacks=[acc.checkpoint_callback(), Checkpoint(directory), *extra],
    )


class CancelAtStep(Callback):
    reads = frozenset({"step"})

    def __init__(self, step: int, scope: anyio.CancelScope) -> None:
        self.step, self.scope = step, scope

    async def after_fit_batch(self, state: StateView) -> None:
        if state.step == self.step:
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()


async def test_resumed_between_the_last_micro_batch_and_the_short_group_s_update(
    tmp_path: Path,
) -> None:
    """Cancelled after the epoch's last micro-batch, before its short last group is applied: a
    fresh learner resumed from that point applies it and goes on exactly."""

    reference = make_learner(n_batches=10, stages={"fit": AccumulateGradients(4)})
    await reference.fit(2)
    with anyio.CancelScope() as scope:
        await checkpointed(tmp_path, CancelAtStep(10, scope)).fit(2)
    resumed = checkpointed(tmp_path)
    await resumed.fit(2, resume="last")
    assert all(
        torch.equal(a, b)
        for a, b in zip(resumed.model.parameters(), reference.model.parameters(), strict=True)
    )


class InterruptUpdate(Callback):
    """Interrupts the ``nth`` update (counting from 1) in ``hook`` (``before_update`` or
    ``after_update``), once: by cancelling ``scope`` from an ``async def`` hook, or (``scope``
    None) by raising ``StopFit`` from a ``def`` one."""

    def __init__(self, nth: int, scope: anyio.CancelScope | None, hook: str) -> None:
        self.nth, self.scope, self.hook, self.calls = nth, scope, hook, 0

    def _due(self) -> bool:
        self.calls += 1
        return self.calls == self.nth

    def hooks(self) -> Any:
        scope = self.scope
        if scope is None:

            def stop(state: StateView) -> None:
                if self._due():
                    raise StopFit("interrupted at the update")

            yield self.hook, stop
        else:

            async def cancel(state: StateView) -> None:
                if self._due():
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()

            yield self.hook, cancel


# Updates of 10 micro-batches in groups of 4: 1 and 4 end a full group, 3 is the epoch's short
# group applied when the pass ends.
@pytest.mark.parametrize("nth", [1, 3, 4])
@pytest.mark.parametrize("how", ["cancel", "stop"])
@pytest.mark.parametrize("hook", ["before_update", "after_update"])
async def test_an_update_interrupted_in_its_hooks_then_fit_again_or_resume_is_exact(
    tmp_path: Path, nth: int, how: str, hook: str
) -> None:
    """The group's gradients are out of the stage's keeping from ``before_update`` on: an
    interruption there must give them back, not leave them in ``.grad`` to be cleared; one in
    ``after_update`` of the pass's short last group must not apply that group again (a second
    optimizer step: the schedule would count it)."""

    def schedule() -> LRSchedule:
        return LRSchedule(lambda opt: LambdaLR(opt, lambda t: 0.9**t))

    reference = make_learner(
        n_batches=10, stages={"fit": AccumulateGradients(4)}, callbacks=[schedule()]
    )
    await reference.fit(2)
    with anyio.CancelScope() as scope:
        interrupt = InterruptUpdate(nth, scope if how == "cancel" else None, hook)
        learner = checkpointed(tmp_path, interrupt, schedule())
        await learner.fit(2)
    resumed = checkpointed(tmp_path, schedule())
    await resumed.fit(2, resume="last")
    await learner.fit(2)
    for trained in (learner, resumed):
        assert all(
            torch.equal(a, b)
            for a, b in zip(trained.model.parameters(), reference.model.parameters(), strict=True)
        )
