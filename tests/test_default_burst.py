"""The default program in a burst: its step written once in ``run_batches``, the batches taken
straight from the pass's iterator (``Batches.direct``) and counted when the burst ends.

An error raised by the model in the middle of a burst must leave the pass exactly where a batch
by batch run would: the batch undone, the ones before it done and counted, so that fitting
again ends with the weights of a run that was never interrupted; for every kind of data (a list,
a tuple, another iterable, a DataLoader in order or shuffling) and both compute policies.
The same for a cancellation from outside that lands in a burst, for an error raised by the
data's iterator, and for a source that turns slow in the middle of a burst (and only the fetch
is timed, not the end of the batch before it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import pytest
import torch
from data_helpers import Sized
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import ComputeStage, FitBatch, Gradient, Learner, StageError, State, Update
from aiolearner._batches import Batches
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
    kind: str,
    compute: Any,
    at: int | None,
    model: torch.nn.Module | None = None,
    n: int = BATCHES,
    **options: Any,
) -> Learner[Any]:
    model = CrashingModel(at) if model is None else model
    torch.manual_seed(1234)  # a shuffling DataLoader draws its orders from here on
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        data_of(kind, n),
        compute=compute,
        **options,
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


class FailsOnce(Sized):
    """``Sized`` whose iterator raises :class:`Crash` instead of serving item ``at`` (once)."""

    def __init__(self, items: list[Any], at: int) -> None:
        super().__init__(items)
        self.at: int | None = at

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.items):
            if i == self.at:
                self.at = None
                raise Crash(f"fetch {i}")
            yield item


class RecordFailsOnce(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, at: int) -> None:
        self.x, self.y, self.at = x, y, at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == self.at:
            self.at = -1
            raise Crash(f"record {i}")
        return self.x[i], self.y[i]


@pytest.mark.parametrize("compute", ["inline", "thread"])
@pytest.mark.parametrize("kind", ["iterable", "loader"])
async def test_a_fetch_failing_in_a_burst_names_its_batch_and_resumes_exactly(
    kind: str, compute: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = learner_of(kind, compute, at=None)
    await whole.fit(EPOCHS)

    # The first pass's sixth batch fails: inside the pass's one burst (which starts with its
    # second batch, inline up to the loop's next turn: not before the pass's end here).
    learner = learner_of(kind, compute, at=None, yield_interval=60.0)
    source = learner._rt.train
    batches = make_batches(BATCHES, seed=1)
    if kind == "iterable":
        source.data = FailsOnce(batches, at=5)
    else:
        size = len(batches[0][0])
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        source.data = DataLoader(RecordFailsOnce(x, y, at=5 * size), batch_size=size)
    failed: list[int] = []
    real_failed = Batches.failed

    def spy(self: Batches, exc: Exception, taken: int = 0) -> BaseException:
        failed.append(self.index + taken)
        return real_failed(self, exc, taken)

    monkeypatch.setattr(Batches, "failed", spy)
    with pytest.raises(Crash) as caught:
        await learner.fit(EPOCHS)
    assert failed == [5]  # raised by the burst's own fetch
    assert "while fetching batch 5 of this pass" in "\n".join(caught.value.__notes__)
    assert (learner.state.epoch, learner.state.step) == (0, 5)
    assert source.fetched == 5  # the failed fetch served nothing

    await learner.fit(EPOCHS)  # the pass is rebuilt at the batch that failed
    assert learner.state.step == whole.state.step == EPOCHS * BATCHES
    for a, b in zip(learner.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert learner.state.metrics == whole.state.metrics


class SlowsDown(Sized):
    """``Sized`` whose fetches from item ``at`` on each take ``seconds`` (busy, as a decode)."""

    def __init__(self, items: list[Any], at: int, seconds: float) -> None:
        super().__init__(items)
        self.at, self.seconds = at, seconds

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.items):
            if i >= self.at:
                end = time.perf_counter() + self.seconds
                while time.perf_counter() < end:
                    pass
            yield item


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_source_turning_slow_in_a_burst_moves_to_its_producer(
    compute: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, at = 7, 4  # (the pass's first batch runs alone; its second starts the burst)
    whole = learner_of("list", compute, at=None, n=n)
    await whole.fit(1)

    slow: list[int] = []
    real_slow = Batches.slow_fetch

    def spy(self: Batches) -> None:
        slow.append(self.index)
        real_slow(self)

    monkeypatch.setattr(Batches, "slow_fetch", spy)
    model = CrashingModel(at=None)
    torch.manual_seed(1234)
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        SlowsDown(make_batches(n, seed=1), at=at, seconds=0.06),
        compute=compute,
        fetch_budget=0.02,
        yield_interval=60.0,  # (inline: one burst for the whole pass)
    )
    await learner.fit(1)
    # Noted by the burst, the batches the loop took counted, the burst's not yet (inline the
    # pass's first batch runs alone, the burst starts with its second; in the worker, with its
    # first). The next fetch, the second slow one in a row, moved the source to its producer.
    assert slow == [2 if compute == "inline" else 1]
    assert "train_data: fetch=auto: a producer thread (found slow)" in learner.describe()
    assert learner.state.step == n
    assert learner._rt.train.fetched == n
    for a, b in zip(learner.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["iterable", "loader"])
async def test_a_burst_takes_batches_from_the_pass_iterator_itself(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inline, one burst a pass: the pass's first batch, the burst's first and the end are
    # taken with next_nowait; the others straight from the iterator.
    taken: list[int] = []
    real_next_nowait = Batches.next_nowait

    def spy(self: Batches, *, off_loop: bool = False) -> Any:
        taken.append(self.index)
        return real_next_nowait(self, off_loop=off_loop)

    monkeypatch.setattr(Batches, "next_nowait", spy)
    learner = learner_of(kind, "inline", at=None, n=32, yield_interval=60.0)
    await learner.fit(1)
    assert learner.state.step == 32
    assert len(taken) <= 4, taken


class SlowToFree:
    """Takes ``seconds`` (busy) to be freed: a field whose end is slow, as a large output's."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __del__(self) -> None:
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass


class Lingering(ComputeStage):
    fields: ClassVar[dict[str, str]] = {"lingering": "batch"}

    def compute(self, state: State) -> None:
        state.lingering = SlowToFree(0.05)


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_slow_end_of_a_batch_is_not_timed_as_the_next_fetch(
    compute: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each batch's end frees a field slowly (50 ms); the fetches themselves are a list's
    # iterator's (a sized iterable: timed by fetch="auto"), far under the 20 ms budget.
    slow: list[int] = []
    monkeypatch.setattr(Batches, "slow_fetch", lambda self: slow.append(self.index))
    model = tiny_model(seed=0)
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        Sized(make_batches(6, seed=1)),
        stages={"fit_batch": FitBatch(Gradient(), Update(), Lingering())},
        compute=compute,
        fetch_budget=0.02,
        yield_interval=60.0,  # (inline: one burst for the whole pass)
    )
    await learner.fit(1)
    assert learner.state.step == 6
    assert slow == []
    assert "train_data: fetch=auto: inline" in learner.describe()
