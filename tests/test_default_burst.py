"""The default program in a burst: its step written once in ``run_batches``, a list's batches
taken straight from the list's iterator and counted when the burst ends.

An error raised by the model in the middle of a burst must leave the pass exactly where a batch
by batch run would: the batch undone, the ones before it done and counted, so that fitting
again ends with the weights of a run that was never interrupted; for every kind of data (a list
and a tuple take the short route; another iterable and a DataLoader, in order or shuffling, the
general one) and both compute policies.
The same for a cancellation from outside that lands in a burst.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import pytest
import torch
from data_helpers import Sized
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Learner, StageError
from aiolearner._device import DeviceMover
from aiolearner._policy import ComputePolicy
from aiolearner.testing import make_batches, tiny_model

BATCHES = 8
EPOCHS = 2


class Crash(Exception):  # noqa: N818 (what the test raises)
    pass


class CrashingModel(torch.nn.Module):
    """``tiny_model``, raising :class:`Crash` on its ``at``-th training forward (once)."""

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.inner = tiny_model(seed=0)
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise Crash(f"forward {self.calls}")
        return self.inner(x)  # type: ignore[no-any-return]


def data_of(kind: str, n: int = BATCHES) -> Any:
    batches = make_batches(n, seed=1)
    if kind == "list":
        return batches
    if kind == "tuple":
        return tuple(batches)
    if kind == "iterable":
        return Sized(batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    size = len(batches[0][0])
    return DataLoader(TensorDataset(x, y), batch_size=size, shuffle=kind == "shuffled")


def learner_of(
    kind: str, compute: Any, at: int | None, model: torch.nn.Module | None = None, n: int = BATCHES
) -> Learner[Any]:
    model = CrashingModel(at) if model is None else model
    torch.manual_seed(1234)  # a shuffling DataLoader draws its orders from here on
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        data_of(kind, n),
        compute=compute,
    )


@pytest.mark.parametrize("compute", ["inline", "thread"])
@pytest.mark.parametrize("kind", ["list", "tuple", "iterable", "loader", "shuffled"])
async def test_an_error_in_a_burst_leaves_the_pass_where_it_was(kind: str, compute: Any) -> None:
    whole = learner_of(kind, compute, at=None)
    await whole.fit(EPOCHS)

    at = BATCHES + 5  # the second epoch's fifth batch: well inside a burst
    learner = learner_of(kind, compute, at=at)
    with pytest.raises(Crash, match=f"forward {at}") as caught:
        await learner.fit(EPOCHS)
    notes = "\n".join(caught.value.__notes__)
    assert "batch 4 of the epoch" in notes
    assert (learner.state.epoch, learner.state.step) == (1, at - 1)
    source = learner._rt.train
    assert source.fetched == BATCHES + 5  # counted, the batch that failed included

    await learner.fit(EPOCHS)  # goes on from the batch that failed
    assert learner.state.step == whole.state.step == EPOCHS * BATCHES
    assert source.fetched == EPOCHS * BATCHES + 1  # the failed batch was taken twice
    for a, b in zip(learner.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert learner.state.metrics == whole.state.metrics


class CancellingModel(torch.nn.Module):
    """``tiny_model``, calling ``cancel`` on its ``at``-th training forward (once): a model is
    not a hook, so the batch keeps the default program."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.inner = tiny_model(seed=0)
        self.at = at
        self.calls = 0
        self.cancel: Callable[[], None] = lambda: None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                self.cancel()
        return self.inner(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("compute", ["inline", "thread"])
@pytest.mark.parametrize("kind", ["list", "loader", "shuffled"])
async def test_a_cancellation_in_a_burst_resumes_exactly(kind: str, compute: Any) -> None:
    # Inline, a cancellation asked for inside a batch lands at the loop's next turn or the
    # epoch's end (docs/reliability.md): epochs long enough for it to land inside one, mostly.
    n = 400
    whole = learner_of(kind, compute, at=None, n=n)
    await whole.fit(EPOCHS)

    model = CancellingModel(at=n + 3)
    learner = learner_of(kind, compute, at=None, model=model, n=n)
    loop_thread = threading.get_ident()
    with anyio.CancelScope() as scope:

        def cancel() -> None:
            if threading.get_ident() == loop_thread:
                scope.cancel()
            else:  # (the model runs in the compute worker)
                anyio.from_thread.run_sync(scope.cancel)

        model.cancel = cancel
        await learner.fit(EPOCHS)
    assert scope.cancelled_caught
    assert learner._rt.executor.program(learner.stage("fit_batch")).kind == "default"
    assert n + 3 <= learner.state.step <= EPOCHS * n  # after the batch that asked for it
    source = learner._rt.train
    # Every batch run was counted as taken (one fetched ahead and put back, at most).
    assert learner.state.step <= source.fetched <= learner.state.step + 1, source.fetched

    await learner.fit(EPOCHS)  # goes on from where the cancellation landed
    assert learner.state.step == whole.state.step == EPOCHS * n
    assert EPOCHS * n <= source.fetched <= EPOCHS * n + 1
    for a, b in zip(learner.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert learner.state.metrics == whole.state.metrics


class Smuggles(torch.nn.Module):
    """A model setting a state field no stage declares, on its fourth forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_model(seed=0)
        self.calls = 0
        self.state: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 4:
            self.state.smuggled = 1
        return self.inner(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_field_set_in_a_burst_that_no_stage_declares_is_refused(compute: Any) -> None:
    model = Smuggles()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        make_batches(BATCHES, seed=1),
        compute=compute,
    )
    model.state = learner._state
    with pytest.raises(StageError, match=r"'smuggled'.*no stage declares it"):
        await learner.fit(1)
    assert learner.state.step == 4  # at the end of the batch that set it
    assert learner._rt.executor.program(learner.stage("fit_batch")).kind == "default"


def test_a_cpu_mover_is_the_identity_only_where_nothing_else_can_hold_a_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiolearner import _device

    assert DeviceMover(torch.device("cpu")).identity == (not _device._accelerator_available())
    monkeypatch.setattr(_device, "_accelerator_available", lambda: True)
    assert not DeviceMover(torch.device("cpu")).identity

    monkeypatch.setattr(_device, "_accelerator_available", lambda: False)
    assert DeviceMover(torch.device("cpu")).identity
    moved: list[Any] = []
    monkeypatch.setattr(DeviceMover, "move_inline", lambda self, batch: moved.append(batch))
    # A replaced move runs as written (a test's stand-in for a device copy).
    assert not DeviceMover(torch.device("cpu")).identity


def test_a_burst_records_its_mean_as_that_many_batches() -> None:
    one = ComputePolicy("auto", max_blocking=0.002)
    many = ComputePolicy("auto", max_blocking=0.002)
    for policy in (one, many):
        policy.record(0.010)
    for _ in range(5):
        one.record(0.002)
    many.record(0.002, 5)
    assert one._typical == pytest.approx(many._typical)
