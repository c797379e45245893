"""Compute placement: inline, thread (one hop per fused batch), auto's decisions, no blocking."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import sniffio
import torch
from blockbuster import BlockingError, blockbuster_ctx

from aiolearner import Callback, Gradient, Learner, StateView, _executor
from aiolearner.testing import make_batches, make_learner


class ThreadOf(Gradient):
    """The default Gradient, recording which thread computes."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def compute(self, state: Any) -> None:
        self.threads.append(threading.get_ident())
        super().compute(state)


class DefHook(Callback):
    """A plain ``def`` hook (keeps the batch fused) recording its thread."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def after_update(self, state: StateView) -> None:
        self.threads.append(threading.get_ident())


class AsyncHook(Callback):
    """An ``async def`` hook: the batch is no longer fused (hooks need the event loop)."""

    async def after_fit_batch(self, state: StateView) -> None:
        await anyio.lowlevel.checkpoint()


async def test_thread_mode_runs_a_fused_batch_in_one_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_executor, "BURST_SECONDS", 0.0)  # one batch a hop (no bursts)
    loop = threading.get_ident()
    gradient, hook = ThreadOf(), DefHook()
    learner = make_learner(
        n_batches=5,
        with_validation=False,
        compute="thread",
        callbacks=[hook],
        stages={"gradient": gradient},
    )
    await learner.fit(1)
    assert learner.state.step == 5
    assert learner.compute_policy.hops == 5
    assert loop not in gradient.threads
    # The batch's def hooks ran in the worker too, with its compute, in the same hop.
    assert loop not in hook.threads
    assert len(gradient.threads) == len(hook.threads) == 5


async def test_thread_mode_hops_per_compute_stage_when_not_fused() -> None:
    loop = threading.get_ident()
    gradient = ThreadOf()
    learner = make_learner(
        n_batches=3,
        with_validation=False,
        compute="thread",
        callbacks=[AsyncHook()],
        stages={"gradient": gradient},
    )
    await learner.fit(1)
    assert learner.state.step == 3
    # Gradient and Update each hop (the async hook between batches runs on the loop).
    assert learner.compute_policy.hops == 6
    assert loop not in gradient.threads


async def test_inline_mode_never_hops() -> None:
    loop = threading.get_ident()
    gradient = ThreadOf()
    learner = make_learner(n_batches=3, compute="inline", stages={"gradient": gradient})
    await learner.fit(1)
    assert learner.compute_policy.hops == 0
    assert set(gradient.threads) == {loop}


async def _fit_auto(*, shared: bool, max_blocking: float, n_batches: int = 6) -> int:
    learner = make_learner(
        n_batches=n_batches, with_validation=False, compute="auto", max_blocking=max_blocking
    )
    # Decide after every batch (the default re-decides every half second).
    learner.compute_policy.recheck_interval = 0.0
    async with anyio.create_task_group() as tg:
        if shared:
            # Another task of the application on the same loop (a server, a ticker).
            other = anyio.Event()
            tg.start_soon(other.wait, name="app.other")
            await anyio.wait_all_tasks_blocked()
        await learner.fit(1)
        if shared:
            other.set()
    assert learner.state.step == n_batches
    return learner.compute_policy.hops


async def test_auto_hops_when_the_step_is_heavy_and_the_loop_is_shared() -> None:
    # max_blocking of a nanosecond: every measured batch is "heavy". The first batch runs
    # inline (nothing is measured yet); every later one hops.
    assert await _fit_auto(shared=True, max_blocking=1e-9) == 5


BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


@BACKENDS
def test_auto_stays_inline_when_the_loop_is_not_shared(backend: str) -> None:
    # A fresh loop with nothing but the learner (a script's fit_sync): the test runner's own
    # tasks would otherwise count as other work on the loop.
    async def main() -> int:
        return await _fit_auto(shared=False, max_blocking=1e-9)

    assert anyio.run(main, backend=backend) == 0


async def test_auto_stays_inline_when_the_step_is_light() -> None:
    assert await _fit_auto(shared=True, max_blocking=1e9) == 0


@BACKENDS
def test_auto_goes_back_inline_when_the_loop_is_alone_again(backend: str) -> None:
    learner = make_learner(n_batches=4, with_validation=False, max_blocking=1e-9)
    learner.compute_policy.recheck_interval = 0.0

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            other = anyio.Event()
            tg.start_soon(other.wait, name="app.other")
            await anyio.wait_all_tasks_blocked()
            await learner.fit(1)
            assert learner.compute_policy.hops == 3
            other.set()
        await learner.fit(2)

    anyio.run(main, backend=backend)
    # The first batch of the second epoch still hopped (decided while shared); it measured and
    # re-decided: alone now, so inline from then on.
    assert learner.compute_policy.hops == 4
    assert not learner.compute_policy.hopping


def test_compute_options_are_checked() -> None:
    with pytest.raises(ValueError, match="compute must be"):
        make_learner(compute="sometimes")
    with pytest.raises(ValueError, match="max_blocking must be positive"):
        make_learner(max_blocking=0)


# -- no blocking call on the event loop in thread mode ----------------------------------------


class Blocking:
    """Records the threads that called :meth:`block`, which blocks for real (``time.sleep``)."""

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def block(self) -> None:
        self.threads.add(threading.get_ident())
        time.sleep(0.0005)


class SlowModel(torch.nn.Module):
    def __init__(self, blocking: Blocking) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.blocking = blocking

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.blocking.block()
        return self.lin(x)  # type: ignore[no-any-return]


class SlowData:
    def __init__(self, blocking: Blocking, n: int) -> None:
        self.blocking = blocking
        self.batches = make_batches(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in self.batches:
            self.blocking.block()
            yield b


def _learner(blocking: Blocking, compute: str) -> Any:
    from aiolearner import Learner

    model = SlowModel(blocking)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        SlowData(blocking, 4),
        SlowData(blocking, 2),
        compute=compute,  # type: ignore[arg-type]
        fetch="thread",
    )


async def test_thread_mode_makes_no_blocking_call_on_the_event_loop() -> None:
    # blockbuster (as anyio's own tests use it) catches blocking calls made on an asyncio loop;
    # on trio it sees nothing, so the model and data also record the threads they block in.
    loop = threading.get_ident()
    blocking = Blocking()
    learner = _learner(blocking, "thread")
    with blockbuster_ctx():
        await learner.fit(2)
        await learner.validate()
        await learner.predict(make_batches(2))
    assert learner.state.step == 8
    assert blocking.threads
    assert loop not in blocking.threads


async def test_the_detectors_see_blocking_calls_in_inline_mode() -> None:
    # The control for the test above: inline compute does block the loop, and it is seen.
    loop = threading.get_ident()
    blocking = Blocking()
    learner = _learner(blocking, "inline")
    if sniffio.current_async_library() == "asyncio":
        with blockbuster_ctx(), pytest.raises(BlockingError):
            await learner.fit(1)
    else:
        await learner.fit(1)
    assert loop in blocking.threads


# -- the flat fast path of a hook-less default batch --------------------------------------------


def spy_on_program(learner: Learner[Any], kind: str, calls: list[int]) -> None:
    """Count the batches the fit_batch program runs by its shortcut of ``kind``."""
    program = learner._rt.executor.program(learner.stage("fit_batch"))
    if program.kind != kind:
        return
    fast = program.fast
    assert fast is not None

    def spy(state: Any) -> None:
        calls.append(1)
        fast(state)

    program.fast = spy


async def test_a_hookless_batch_runs_flat_with_the_same_errors_and_control_flow() -> None:
    from aiolearner import SkipBatch

    calls: list[int] = []

    class Fails(Gradient):
        def compute(self, state: Any) -> None:
            raise RuntimeError("shape mismatch")

    learner = make_learner(stages={"gradient": Fails()}, with_validation=False)
    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        await learner.fit(1)
    assert any("stage 'gradient'" in note for note in info.value.__notes__)
    assert learner.state.step == 0

    class SkipsSecond(Gradient):
        def compute(self, state: Any) -> None:
            if state.batch_index == 1:
                raise SkipBatch("second")
            super().compute(state)

    calls.clear()
    learner = make_learner(stages={"gradient": SkipsSecond()}, n_batches=3, with_validation=False)
    spy_on_program(learner, "flat", calls)
    await learner.fit(1)
    assert calls == [1, 1, 1]
    assert learner.state.step == 3
    assert learner.state.stop_reason == "second"


# -- the default batch in one frame ---------------------------------------------------------------


class Plain(Gradient):
    """The default Gradient under another type: the batch takes the general flat path."""


async def test_the_default_batch_matches_the_general_path_bit_for_bit() -> None:
    calls: list[int] = []
    fast = make_learner(n_batches=5, compute="inline")
    spy_on_program(fast, "default", calls)
    await fast.fit(2)
    assert calls == [1] * 10
    calls.clear()
    general = make_learner(n_batches=5, compute="inline", stages={"gradient": Plain()})
    spy_on_program(general, "default", calls)
    await general.fit(2)
    assert calls == []
    assert fast.state.step == general.state.step == 10
    assert fast.state.metrics == general.state.metrics
    for a, b in zip(fast.model.parameters(), general.model.parameters(), strict=True):
        assert torch.equal(a, b)


class Exploding(torch.optim.SGD):
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        raise RuntimeError("step failed")


async def test_the_default_batch_names_the_update_stage_and_commits_nothing() -> None:
    learner = make_learner(n_batches=2, with_validation=False, compute="inline")
    learner.optimizer.__class__ = Exploding
    with pytest.raises(RuntimeError, match="step failed") as info:
        await learner.fit(1)
    notes = [n for n in info.value.__notes__ if n.startswith("aiolearner:")]
    assert len(notes) == 1
    assert "stage 'update'" in notes[0]
    assert learner.state.step == 0
    assert all(p.grad is None for p in learner.model.parameters())


class SkipsOnEmpty(torch.nn.Module):
    """A model that raises SkipBatch for a batch of one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from aiolearner import SkipBatch

        if len(x) == 1:
            raise SkipBatch("one sample")
        return self.linear(x)  # type: ignore[no-any-return]


async def test_the_default_batch_acts_on_a_skip_from_the_model() -> None:
    from aiolearner import Learner

    batches = make_batches(3)
    batches[1] = (batches[1][0][:1], batches[1][1][:1])
    model = SkipsOnEmpty()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        batches,
        compute="inline",
    )
    await learner.fit(1)
    assert learner.state.step == 3  # a skipped batch is passed over: it still counts as a step
    assert learner.state.stop_reason == "one sample"
    assert all(p.grad is None for p in model.parameters())


# -- turns of the event loop ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_training_loop_alone_on_the_event_loop_gives_turns_less_often(backend: str) -> None:
    # Its own event loop (the test runner keeps a task of its own on the asyncio one).
    learner = make_learner(n_batches=4, compute="inline", yield_interval=1e-9)
    learner.fit_sync(1, backend=backend)  # type: ignore[arg-type]
    assert learner._rt.yield_every == pytest.approx(1e-8)


async def test_a_shared_event_loop_gets_a_turn_every_yield_interval() -> None:
    learner = make_learner(n_batches=4, compute="inline", yield_interval=1e-9)
    done = anyio.Event()

    async def train() -> None:
        await learner.fit(1)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(train)
        await done.wait()  # this task shares the loop (it could as well serve requests)
    assert learner._rt.yield_every == pytest.approx(1e-9)


async def test_auto_counts_the_other_learners_training_inline_on_the_loop() -> None:
    from aiolearner._policy import ComputePolicy

    # Three learners on this loop, each with 0.1 ms batches and a turn every 0.8 ms: alone,
    # each would stay inline (0.8 ms < max_blocking); together inline they hold the loop
    # 2.4 ms a round, so auto hops until what is left inline fits the bound.
    policies = [ComputePolicy("auto", max_blocking=0.002) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        other = anyio.Event()
        tg.start_soon(other.wait, name="app.other")  # the loop is shared with the application
        await anyio.wait_all_tasks_blocked()
        policies[0].enter_run(0.0008)
        policies[0].record(0.0001)
        policies[0].reconsider()
        assert not policies[0].hopping  # alone: 0.8 ms a round
        for policy in policies[1:]:
            policy.enter_run(0.0008)
            policy.record(0.0001)
        policies[0].reconsider()
        assert policies[0].hopping  # 3 x 0.8 ms inline would be over 2 ms
        policies[1].reconsider()
        assert not policies[1].hopping  # with the first one hopping: 2 x 0.8 ms fits
        for policy in policies:
            policy.exit_run()
        policies[0].reconsider()
        assert not policies[0].hopping  # the others are gone (and its run is over)
        other.set()


async def test_a_run_registers_its_policy_only_while_it_runs() -> None:
    from aiolearner import _policy

    seen: list[bool] = []

    class Probe(Callback):
        def before_fit(self, state: StateView) -> None:
            seen.append(learner.compute_policy in _policy._RUNNING)

    learner = make_learner(n_batches=2, with_validation=False, callbacks=[Probe()])
    await learner.fit(1)
    assert seen == [True]
    assert learner.compute_policy not in _policy._RUNNING
    bad = make_learner(train_data=[(torch.randn(5, 7), torch.zeros(5, dtype=torch.long))])
    with pytest.raises(RuntimeError):
        await bad.fit(1)
    assert bad.compute_policy not in _policy._RUNNING  # also after an error
