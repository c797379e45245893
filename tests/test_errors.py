"""Configuration errors at build time; how stage and callback errors come out of ``fit``."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch

from aiolearner import Callback, ConfigurationError, LearnerStatus, StateView
from aiolearner.testing import make_batches, make_learner

# -- ConfigurationError when the Learner is built ---------------------------------------------


class ScaleA(Callback):
    writes = frozenset({"lr_scale"})

    def after_fit_batch(self, state: StateView) -> None:
        state.lr_scale = 1.0


class ScaleB(Callback):
    writes = frozenset({"lr_scale"})

    async def after_fit_batch(self, state: StateView) -> None:
        state.lr_scale = 2.0


class OrderedScaleB(ScaleB):
    after = (ScaleA,)


class ScaleElsewhere(Callback):
    writes = frozenset({"lr_scale"})

    def before_fit_batch(self, state: StateView) -> None:
        state.lr_scale = 3.0


def test_two_unordered_writers_of_one_field_on_one_hook() -> None:
    with pytest.raises(ConfigurationError) as info:
        make_learner(callbacks=[ScaleA(), ScaleB()])
    err = info.value
    assert err.hook == "after_fit_batch"
    assert err.field == "lr_scale"
    assert set(err.callbacks) == {"ScaleA", "ScaleB"}
    message = str(err)
    for word in ("ScaleA", "ScaleB", "lr_scale", "after_fit_batch"):
        assert word in message


def test_writers_with_a_declared_order_or_on_other_hooks_are_fine() -> None:
    make_learner(callbacks=[OrderedScaleB(), ScaleA()])
    make_learner(callbacks=[ScaleA(), ScaleElsewhere()])


class CycleA(Callback):
    def before_epoch(self, state: StateView) -> None:
        pass


class CycleB(Callback):
    after = (CycleA,)

    def before_epoch(self, state: StateView) -> None:
        pass


class CycleC(Callback):
    after = (CycleB,)

    def before_epoch(self, state: StateView) -> None:
        pass


class CycleA2(CycleA):
    after = (CycleC,)


def test_cycle_of_after_declarations() -> None:
    with pytest.raises(ConfigurationError, match="cycle") as info:
        make_learner(callbacks=[CycleA2(), CycleB(), CycleC()])
    assert info.value.hook == "before_epoch"
    assert set(info.value.callbacks) == {"CycleA2", "CycleB", "CycleC"}


class MutualA(Callback):
    pass


class MutualB(Callback):
    after = (MutualA,)

    def after_epoch(self, state: StateView) -> None:
        pass


class MutualA2(MutualA):
    after = (MutualB,)

    def after_epoch(self, state: StateView) -> None:
        pass


def test_two_callbacks_each_after_the_other() -> None:
    with pytest.raises(ConfigurationError, match="cycle") as info:
        make_learner(callbacks=[MutualA2(), MutualB()])
    assert info.value.hook == "after_epoch"
    assert set(info.value.callbacks) == {"MutualA2", "MutualB"}


class ReadsXWritesY(Callback):
    reads = frozenset({"x"})
    writes = frozenset({"y"})

    def after_fit(self, state: StateView) -> None:
        pass


class ReadsYWritesX(Callback):
    reads = frozenset({"y"})
    writes = frozenset({"x"})

    def after_fit(self, state: StateView) -> None:
        pass


def test_cycle_of_reads_and_writes() -> None:
    with pytest.raises(ConfigurationError, match="cycle") as info:
        make_learner(callbacks=[ReadsXWritesY(), ReadsYWritesX()])
    assert info.value.hook == "after_fit"
    assert set(info.value.callbacks) == {"ReadsXWritesY", "ReadsYWritesX"}
    assert info.value.field in {"x", "y"}


class WritesXReadsZ(Callback):
    reads = frozenset({"z"})
    writes = frozenset({"x"})

    def after_fit(self, state: StateView) -> None:
        pass


class WritesYReadsX(Callback):
    reads = frozenset({"x"})
    writes = frozenset({"y"})

    def after_fit(self, state: StateView) -> None:
        pass


class WritesZReadsY(Callback):
    reads = frozenset({"y"})
    writes = frozenset({"z"})

    def after_fit(self, state: StateView) -> None:
        pass


def test_cycle_of_reads_and_writes_through_three_callbacks() -> None:
    with pytest.raises(ConfigurationError, match="cycle") as info:
        make_learner(callbacks=[WritesXReadsZ(), WritesYReadsX(), WritesZReadsY()])
    assert info.value.hook == "after_fit"
    assert set(info.value.callbacks) == {"WritesXReadsZ", "WritesYReadsX", "WritesZReadsY"}


def test_after_resolves_a_mutual_read_write_dependency() -> None:
    class Second(ReadsYWritesX):
        after = (ReadsXWritesY,)

    learner = make_learner(callbacks=[Second(), ReadsXWritesY()])
    text = learner.describe()
    hook = text[text.index("after_fit:") :]
    assert hook.index("ReadsXWritesY") < hook.index("Second")


class Typo(Callback):
    def after_batchh(self, state: StateView) -> None:
        pass


def test_unknown_hook_name() -> None:
    with pytest.raises(ConfigurationError) as info:
        make_learner(callbacks=[Typo()])
    assert info.value.hook == "after_batchh"
    assert info.value.callbacks == ("Typo",)
    assert "after_batchh" in str(info.value)
    assert "Typo" in str(info.value)


class NoArgument(Callback):
    def after_fit(self) -> None:
        pass


class TwoArguments(Callback):
    async def before_update(self, state: StateView, extra: int) -> None:
        pass


@pytest.mark.parametrize(
    ("callback", "hook"), [(NoArgument(), "after_fit"), (TwoArguments(), "before_update")]
)
def test_wrong_hook_signature(callback: Callback, hook: str) -> None:
    with pytest.raises(ConfigurationError, match="one argument") as info:
        make_learner(callbacks=[callback])
    assert info.value.hook == hook
    assert info.value.callbacks == (type(callback).__name__,)


@pytest.mark.parametrize("field", ["epoch", "step", "batch_index", "outcome"])
def test_callbacks_cannot_declare_writes_of_stage_owned_fields(field: str) -> None:
    class Cheat(Callback):
        writes = frozenset({field})

    with pytest.raises(ConfigurationError, match="stages only") as info:
        make_learner(callbacks=[Cheat()])
    assert info.value.field == field
    assert info.value.callbacks == ("Cheat",)


def test_reads_given_as_a_string_is_rejected() -> None:
    class Sloppy(Callback):
        reads = "loss"  # type: ignore[assignment]

    with pytest.raises(ConfigurationError, match="reads"):
        make_learner(callbacks=[Sloppy()])


# -- errors of stage bodies: bare, with a note --------------------------------------------------


def aiolearner_notes(exc: BaseException) -> list[str]:
    return [n for n in getattr(exc, "__notes__", []) if n.startswith("aiolearner:")]


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_stage_body_error_surfaces_bare_with_a_note(compute: str) -> None:
    bad = (torch.randn(5, 7), torch.zeros(5, dtype=torch.long))  # 7 features, model wants 4
    data = [*make_batches(2), bad]
    learner = make_learner(train_data=data, compute=compute)
    with pytest.raises(RuntimeError, match="shapes") as info:
        await learner.fit(1)
    assert type(info.value) is RuntimeError
    notes = aiolearner_notes(info.value)
    assert len(notes) == 1
    assert "stage 'gradient'" in notes[0]
    assert "epoch 0" in notes[0]
    assert "step 2" in notes[0]
    # The failed batch was not committed; the weights hold two updates.
    assert learner.state.step == 2
    assert learner.status is LearnerStatus.IDLE


async def test_validation_body_error_names_its_stage() -> None:
    bad = [(torch.randn(5, 7), torch.zeros(5, dtype=torch.long))]
    learner = make_learner(val_data=bad, n_batches=1)
    with pytest.raises(RuntimeError) as info:
        await learner.fit(1)
    notes = aiolearner_notes(info.value)
    assert len(notes) == 1
    assert "stage 'validate_loss'" in notes[0]
    assert "step 1" in notes[0]


@pytest.mark.parametrize("compute", ["inline", "thread", "auto"])
async def test_a_validation_error_names_the_validation_batch_and_set(compute: str) -> None:
    bad = make_batches(3)
    bad[2] = (torch.randn(5, 7), bad[2][1])
    learner = make_learner(val_data=bad, n_batches=3, compute=compute)
    with pytest.raises(RuntimeError) as info:
        await learner.fit(1)
    # Not training's "batch 3 of the epoch": the failing batch of the validation data.
    assert (
        "step 3 (validating: batch 2 of val_data, phase 'fit')" in aiolearner_notes(info.value)[0]
    )
    with pytest.raises(RuntimeError) as info:
        await learner.validate({"clean": make_batches(2), "bad": bad})
    assert "(validating: batch 2 of validation set 'bad'" in aiolearner_notes(info.value)[0]


async def test_a_failed_validation_fetch_names_the_validation_batch_and_set() -> None:
    class Records(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            if i == 8:
                raise ValueError("bad record 8")
            return torch.randn(4), 1

    loader = torch.utils.data.DataLoader(Records(), batch_size=8)
    learner = make_learner(val_data={"clean": make_batches(1), "bad": loader}, n_batches=3)
    with pytest.raises(ValueError, match="bad record 8") as info:
        await learner.fit(1)
    notes = aiolearner_notes(info.value)
    assert "val_data['bad'] (DataLoader) while fetching batch 1 of this pass" in notes[0]
    # Not training's "batch 3 of the epoch".
    assert "(validating: batch 1 of validation set 'bad', phase 'fit')" in notes[1]


# -- errors of callbacks: always in an ExceptionGroup -------------------------------------------


class BoomError(ValueError):
    pass


class FailAtStep(Callback):
    reads = frozenset({"step"})

    def __init__(self, step: int) -> None:
        self.fail_step = step

    def after_update(self, state: StateView) -> None:
        if state.step == self.fail_step:
            raise BoomError(f"failed at {state.step}")


class AsyncFail(Callback):
    async def before_validate(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()
        raise BoomError("async failure")


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_lone_def_callback_error_comes_out_in_a_group(compute: str) -> None:
    learner = make_learner(callbacks=[FailAtStep(2)], n_batches=3, compute=compute)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    group = info.value
    assert "after_update" in str(group)
    assert len(group.exceptions) == 1
    leaf = group.exceptions[0]
    assert type(leaf) is BoomError
    notes = aiolearner_notes(leaf)
    assert len(notes) == 1
    for word in ("'FailAtStep'", "'after_update'", "stage 'update'", "epoch 0", "step 2"):
        assert word in notes[0]
    # Update had committed before after_update ran: step 2 is in the weights.
    assert learner.state.step == 2


async def test_lone_async_callback_error_comes_out_in_a_group() -> None:
    learner = make_learner(callbacks=[AsyncFail()], n_batches=2)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    (leaf,) = info.value.exceptions
    assert type(leaf) is BoomError
    notes = aiolearner_notes(leaf)
    assert len(notes) == 1
    for word in ("'AsyncFail'", "'before_validate'", "stage 'validate'", "epoch 0", "step 2"):
        assert word in notes[0]


class Rendezvous:
    def __init__(self) -> None:
        self.arrived = 0
        self.all_here = anyio.Event()


class FailTogether(Callback):
    """Fails once both partners are inside the hook (so both fail, neither is cancelled)."""

    def __init__(self, meeting: Rendezvous) -> None:
        self.meeting = meeting

    async def after_fit(self, state: StateView) -> None:
        self.meeting.arrived += 1
        if self.meeting.arrived == 2:
            self.meeting.all_here.set()
        else:
            await self.meeting.all_here.wait()
        raise BoomError(self.name)


class FailTogether2(FailTogether):
    pass


async def test_two_concurrent_failing_callbacks_both_in_the_group() -> None:
    meeting = Rendezvous()
    learner = make_learner(callbacks=[FailTogether(meeting), FailTogether2(meeting)])
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    leaves = info.value.exceptions
    assert sorted(str(e) for e in leaves) == ["FailTogether", "FailTogether2"]
    assert all(type(e) is BoomError for e in leaves)
    for leaf in leaves:
        (note,) = aiolearner_notes(leaf)
        assert f"callback '{leaf}'" in note
        assert "'after_fit'" in note


class Sibling(Callback):
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cancelled = False

    async def after_fit(self, state: StateView) -> None:
        self.started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise


class FailWhenSiblingWaits(Callback):
    def __init__(self, sibling: Sibling) -> None:
        self.sibling = sibling

    async def after_fit(self, state: StateView) -> None:
        await self.sibling.started.wait()
        raise BoomError("sibling must be cancelled")


async def test_failing_async_callback_cancels_its_sibling() -> None:
    sibling = Sibling()
    learner = make_learner(callbacks=[sibling, FailWhenSiblingWaits(sibling)])
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    (leaf,) = info.value.exceptions
    assert isinstance(leaf, BoomError)
    assert sibling.cancelled
    assert learner.status is LearnerStatus.IDLE


async def test_data_error_surfaces_bare_with_a_note() -> None:
    def batches() -> object:
        yield from make_batches(1)
        raise OSError("disk gone")

    learner = make_learner(train_data=batches(), with_validation=False)
    with pytest.raises(OSError, match="disk gone") as info:
        await learner.fit(1)
    assert any("train_data" in n for n in aiolearner_notes(info.value))
    assert learner.state.step == 1


async def test_a_background_task_error_names_the_task_and_where_it_started() -> None:
    async def upload(step: int) -> None:
        raise ConnectionError(f"upload of step {step} failed")

    class Uploads(Callback):
        reads = frozenset({"step"})

        def after_fit_batch(self, state: StateView) -> None:
            if state.step == 3:
                state.start_soon(upload, state.step)

    learner = make_learner(callbacks=[Uploads()], n_batches=4)
    with pytest.RaisesGroup(ConnectionError, allow_unwrapped=True, flatten_subgroups=True) as info:
        await learner.fit(2)
    (error,) = (
        info.value.exceptions if isinstance(info.value, BaseExceptionGroup) else (info.value,)
    )
    notes = "\n".join(aiolearner_notes(error))
    assert "background task 'Uploads.after_fit_batch'" in notes
    assert "step 3" in notes


class BreaksOnce(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """16 samples that draw augmentation from torch's global generator; the ``at``-th call of
    ``__getitem__`` (counting from 1) raises once."""

    def __init__(self, at: int | None) -> None:
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        self.at, self.calls = at, 0

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.calls == self.at:
            raise ValueError(f"record {i} unreadable")
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


def _shuffled_learner(at: int | None, compute: str) -> Any:
    torch.manual_seed(7)
    loader = torch.utils.data.DataLoader(BreaksOnce(at), batch_size=4, shuffle=True)
    return make_learner(train_data=loader, compute=compute)


@pytest.mark.parametrize("compute", ["inline", "thread"])
@pytest.mark.parametrize("at", [1, 17])  # the first sample of the first and the second pass
async def test_a_pass_whose_first_batch_cannot_be_fetched_is_named_and_puts_its_draws_back(
    at: int, compute: str
) -> None:
    whole = _shuffled_learner(None, compute)
    await whole.fit(2)

    learner = _shuffled_learner(at, compute)
    with pytest.raises(ValueError, match="unreadable") as info:
        await learner.fit(2)
    assert aiolearner_notes(info.value)[0] == (
        "aiolearner: raised by train_data (DataLoader) while fetching batch 0 of this pass"
    )
    assert learner.state.step == (at - 1) // 4
    # The pass was made again from the random state it was first made from: the same order,
    # the same augmentation, as a run that never failed.
    await learner.fit(2)
    for a, b in zip(learner.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
