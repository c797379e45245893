"""A live stream (``steps_per_epoch``): a batch taken and not trained on is served again, the end
of sized data starts it again instead of making an empty epoch, and a checkpoint written while
a rolled-back batch waits to be drawn again resumes exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Callback, Feed, Learner, StateView
from aiolearner.callbacks import Checkpoint
from aiolearner.testing import make_batches, make_learner, tiny_model


class Seen(Callback):
    """The first input value of every batch trained on (its identity, for comparisons)."""

    reads = frozenset({"batch"})

    def __init__(self) -> None:
        self.seen: list[float] = []

    def after_update(self, state: StateView) -> None:
        self.seen.append(round(float(state.batch[0].sum()), 4))


class CancelBeforeBatch(Callback):
    """Cancels ``scope`` from an awaited ``before_fit_batch`` at step ``step``, once."""

    reads = frozenset({"step"})

    def __init__(self, step: int) -> None:
        self.step = step
        self.scope: anyio.CancelScope | None = None
        self.done = False

    async def before_fit_batch(self, state: StateView) -> None:
        if state.step == self.step and not self.done and self.scope is not None:
            self.done = True
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()


def learner_on(data: Any, *callbacks: Callback, steps: int = 3) -> Learner[Any]:
    model = tiny_model(seed=0)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        data,
        callbacks=list(callbacks),
        steps_per_epoch=steps,
    )


def loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(7)
    dataset = TensorDataset(
        torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    )
    return DataLoader(
        dataset, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(3)
    )


def batches_generator() -> Any:
    yield from make_batches(12)


@pytest.mark.parametrize("kind", ["list", "generator", "loader"])
@pytest.mark.parametrize("step", [2, 5])
async def test_a_batch_undone_by_a_cancellation_is_trained_on_when_fit_goes_on(
    kind: str, step: int
) -> None:
    def data() -> Any:
        return {"list": lambda: make_batches(4), "generator": batches_generator, "loader": loader}[
            kind
        ]()

    reference = Seen()
    await learner_on(data(), reference).fit(3)
    seen, cancel = Seen(), CancelBeforeBatch(step)
    learner = learner_on(data(), seen, cancel)
    with anyio.CancelScope() as scope:
        cancel.scope = scope
        await learner.fit(3)
    assert learner.state.step == step
    await learner.fit(3)
    assert seen.seen == reference.seen


async def test_a_feed_loses_no_record_to_a_cancellation() -> None:
    records = [(torch.full((4,), float(i)), torch.tensor(i % 3)) for i in range(24)]

    async def run(*callbacks: Callback) -> Learner[Any]:
        feed = Feed[tuple[torch.Tensor, torch.Tensor]](batch_size=2, buffer=64)
        learner = learner_on(feed, *callbacks)
        async with feed:
            for record in records:
                await feed.send(record)
        for callback in callbacks:
            if isinstance(callback, CancelBeforeBatch):
                with anyio.CancelScope() as scope:
                    callback.scope = scope
                    await learner.fit(3)
        await learner.fit(3)
        return learner

    reference, seen = Seen(), Seen()
    await run(reference)
    await run(seen, CancelBeforeBatch(4))
    assert seen.seen == reference.seen


async def test_a_pass_as_long_as_the_data_leaves_no_empty_epoch() -> None:
    sizes: list[int] = []

    class Sizes(Callback):
        reads = frozenset({"batch_index"})

        def after_fit(self, state: StateView) -> None:
            sizes.append(state.batch_index)

    await learner_on(make_batches(4), Sizes(), steps=4).fit(4)
    assert sizes == [4, 4, 4, 4]


@pytest.mark.parametrize("step", [2, 5, 7])
async def test_a_checkpoint_with_a_rolled_back_batch_resumes_exactly(
    tmp_path: Path, step: int
) -> None:
    reference = Seen()
    await learner_on(loader(), reference).fit(4)
    first_seen, cancel = Seen(), CancelBeforeBatch(step)
    first = learner_on(loader(), first_seen, cancel, Checkpoint(tmp_path))
    with anyio.CancelScope() as scope:
        cancel.scope = scope
        await first.fit(4)
    resumed_seen = Seen()
    resumed = learner_on(loader(), resumed_seen, Checkpoint(tmp_path))
    await resumed.fit(4, resume="last")
    assert first_seen.seen + resumed_seen.seen == reference.seen


# -- a one-pass stream's error fetched ahead of an epoch's end ----------------------------------


def streaming(data: Any, steps: int, fetch: str, *callbacks: Callback) -> Learner[Any]:
    """make_learner's on the one-pass stream ``data``, ``steps`` batches an epoch."""
    return make_learner(
        train_data=data,
        with_validation=False,
        callbacks=callbacks,
        steps_per_epoch=steps,
        fetch=fetch,
    )


@pytest.mark.parametrize("fetch", ["auto", "inline", "thread"])
async def test_a_stream_s_error_fetched_ahead_of_the_epoch_s_end_is_raised(fetch: str) -> None:
    """Fetched ahead by the producer when the first epoch ended, the error waits with the
    batches fetched before it, and is raised when its batch is taken, not read as the end."""

    def batches() -> Any:
        for i, batch in enumerate(make_batches(8)):
            if i == 4:
                raise OSError("the source went away at batch 4")
            yield batch

    learner = streaming(batches(), 3, fetch)
    with pytest.raises(OSError, match="went away") as info:
        await learner.fit(2)
    assert any("train_data" in note for note in info.value.__notes__)
    assert learner.state.step == 4  # the second epoch's first batch; its second failed


class BatchesPerEpoch(Callback):
    reads = frozenset({"epoch"})

    def __init__(self) -> None:
        self.counts: list[int] = []

    def before_epoch(self, state: StateView) -> None:
        self.counts.append(0)

    def after_fit_batch(self, state: StateView) -> None:
        self.counts[-1] += 1


@pytest.mark.parametrize("fetch", ["auto", "inline", "thread"])
async def test_an_endless_async_generator_goes_on_across_epochs(fetch: str) -> None:
    """Its next batch awaited when an epoch ends, the generator is not cancelled there (that
    would end it): the fetch finishes and the next epoch takes that batch first."""
    served = make_batches(7)

    async def stream() -> Any:
        i = 0
        while True:
            await anyio.lowlevel.checkpoint()  # a fetch that awaits, as real ones do
            yield served[i % 7]
            i += 1

    counts = BatchesPerEpoch()
    learner = streaming(stream(), 5, fetch, counts)
    model = learner.model
    await learner.fit(3)
    assert counts.counts == [5, 5, 5]
    assert learner.state.step == 15
    reference = tiny_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for i in range(15):
        x, y = served[i % 7]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True)
    )


class ReleasesAfterEpoch(Callback):
    """Sets ``event`` in the first epoch's ``after_epoch``."""

    def __init__(self, event: anyio.Event) -> None:
        self.event = event

    def after_epoch(self, state: StateView) -> None:
        self.event.set()


@pytest.mark.parametrize("fetch", ["auto", "inline", "thread"])
async def test_an_idle_async_generator_does_not_hold_up_the_epoch_s_end(fetch: str) -> None:
    """The stream's next batch comes only once the first epoch has ended (waiting for it there
    would never end); it is then the second epoch's first batch."""
    served = make_batches(10)
    released = anyio.Event()

    async def stream() -> Any:
        for batch in served[:5]:
            await anyio.lowlevel.checkpoint()
            yield batch
        await released.wait()
        for batch in served[5:]:
            await anyio.lowlevel.checkpoint()
            yield batch

    learner = streaming(stream(), 5, fetch, ReleasesAfterEpoch(released))
    with anyio.fail_after(60):  # (a guard: without the fix the first epoch never ends)
        await learner.fit(2)
    assert learner.state.step == 10
    reference = streaming(iter(served), 5, fetch)
    await reference.fit(2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(learner.model.parameters(), reference.model.parameters(), strict=True)
    )


@pytest.mark.parametrize("fetch", ["auto", "inline", "thread"])
async def test_an_async_generator_the_run_s_end_cancelled_cannot_go_on(fetch: str) -> None:
    """The run ends while the generator waits for data: cancelled there, it has ended, and a
    fit that would go on with it says so instead of training on nothing."""

    async def stream() -> Any:
        for batch in make_batches(5):
            await anyio.lowlevel.checkpoint()
            yield batch
        await anyio.sleep_forever()  # no more data, for now

    learner = streaming(stream(), 5, fetch)
    await learner.fit(1)
    assert learner.state.step == 5
    with pytest.raises(RuntimeError, match="cannot go on"):
        await learner.fit(2)
