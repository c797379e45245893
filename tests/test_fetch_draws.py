"""fetch="auto" and the global generators: a slow source whose fetches draw from a generator
that compute draws from too stays inline (fetched ahead in a thread, the two would interleave in
another order every run); one whose fetches or compute draw nothing moves to a producer thread.

Every fetch is "slow" here (``fetch_budget=0.0``), so the decision falls at the second fetch.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
import torch
from torch import nn

from aiolearner import Callback, Learner, StateView, StopFit

Batch = tuple[torch.Tensor, torch.Tensor]
N_BATCHES = 16


class Augmented:
    """Batches drawing ``draw``'s generator as they are fetched (augmentation in
    ``__getitem__``), and noting whether a fetch ever ran while a forward was running."""

    def __init__(self, draw: str | None, model: Watched) -> None:
        self.draw = draw
        self.model = model
        self.overlapped = False
        self.threads: set[int] = set()
        g = torch.Generator().manual_seed(5)
        self.batches = [
            (torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g))
            for _ in range(N_BATCHES)
        ]

    def __iter__(self) -> Iterator[Batch]:
        for x, y in self.batches:
            self.threads.add(threading.get_ident())
            self.overlapped |= self.model.running
            if self.draw == "torch":
                x = x + 0.1 * torch.rand(x.shape)
            elif self.draw == "numpy":
                x = x + float(np.random.rand())
            elif self.draw == "python":
                x = x + random.random()
            yield x, y


class Watched(nn.Module):
    """A small model, with dropout or not, that says when its forward runs."""

    def __init__(self, dropout: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5) if dropout else nn.Identity())
        self.head = nn.Linear(8, 2)
        self.running = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.running = True
        try:
            return self.head(self.net(x))  # type: ignore[no-any-return]
        finally:
            self.running = False


class NumpyNoise(Callback):
    """Compute that draws from numpy's global generator (a hook mixing inputs, say)."""

    def before_fit_batch(self, state: StateView) -> None:
        np.random.rand()


def learner_for(
    draw: str | None,
    *,
    dropout: bool,
    fetch: str = "auto",
    compute: str = "inline",
    callbacks: list[Callback] | None = None,
) -> tuple[Learner[Any], Augmented]:
    model = Watched(dropout)
    data = Augmented(draw, model)
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.functional.cross_entropy,
        data,
        fetch=fetch,  # type: ignore[arg-type]
        fetch_budget=0.0,
        compute=compute,  # type: ignore[arg-type]
        callbacks=callbacks or [],
    )
    return learner, data


@pytest.mark.parametrize("compute", ["inline", "auto", "thread"])
@pytest.mark.parametrize(
    ("draw", "dropout", "callbacks", "shared"),
    [
        ("torch", True, False, "torch generator"),
        ("numpy", False, True, "numpy generator"),
    ],
)
async def test_a_slow_source_drawing_as_compute_does_stays_inline(
    draw: str, dropout: bool, callbacks: bool, shared: str, compute: str
) -> None:
    loop = threading.get_ident()
    learner, data = learner_for(
        draw, dropout=dropout, compute=compute, callbacks=[NumpyNoise()] if callbacks else None
    )
    await learner.fit(2)
    assert learner.state.step == 2 * N_BATCHES
    if compute == "inline":
        assert data.threads == {loop}  # every fetch on the loop, as every batch's compute
    assert not data.overlapped  # no fetch while a forward ran
    text = learner.describe()
    assert f"kept inline (its fetches draw from the global {shared} as compute does)" in text


async def test_two_runs_of_a_source_kept_inline_are_the_same() -> None:
    weights = []
    for _ in range(2):
        torch.manual_seed(11)
        learner, _ = learner_for("torch", dropout=True)
        await learner.fit(2)
        weights.append([p.detach().clone() for p in learner.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


@pytest.mark.parametrize(
    ("draw", "dropout"),
    [
        ("torch", False),  # the fetches draw, compute does not
        (None, True),  # compute draws, the fetches do not
        ("python", True),  # they draw from different generators
    ],
)
async def test_a_slow_source_drawing_apart_from_compute_moves_to_a_thread(
    draw: str | None, dropout: bool
) -> None:
    loop = threading.get_ident()
    learner, data = learner_for(draw, dropout=dropout)
    await learner.fit(1)
    assert learner.state.step == N_BATCHES
    assert loop in data.threads
    assert len(data.threads) == 2  # the first fetches inline, then the producer thread's
    assert "train_data: fetch=auto: a producer thread (found slow)" in learner.describe()


async def test_fetch_thread_is_honoured_whatever_draws() -> None:
    learner, data = learner_for("torch", dropout=True, fetch="thread")
    await learner.fit(1)
    assert learner.state.step == N_BATCHES
    assert threading.get_ident() not in data.threads
    assert "train_data: fetch=thread" in learner.describe()


def test_describe_names_how_a_source_is_fetched_before_any_fetch() -> None:
    learner, _ = learner_for("torch", dropout=True)
    assert "data: train_data: fetch=auto: inline" in learner.describe()


class NowAndThen:
    """Batches that draw from torch's generator as they are fetched one time in four (an
    augmentation applied at random, say), ``n`` batches."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(5)
        self.batches = [
            (torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g))
            for _ in range(n)
        ]

    def __iter__(self) -> Iterator[Batch]:
        for i, (x, y) in enumerate(self.batches):
            yield (x + torch.rand(x.shape) if i % 4 == 3 else x), y


async def test_a_source_drawing_now_and_then_is_watched_before_it_moves() -> None:
    # The first look (fetches 1 and 2) sees no draw; the fetch of batch 3 draws, as dropout
    # does: the source stays inline. Without dropout nothing else draws: the move comes at the
    # second slow fetch.
    for dropout, decided in [
        (True, "kept inline (its fetches draw from the global torch generator"),
        (False, "a producer thread (found slow)"),
    ]:
        model = Watched(dropout)
        learner: Learner[Any] = Learner(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            nn.functional.cross_entropy,
            NowAndThen(12),
            fetch_budget=0.0,
        )
        await learner.fit(1)
        assert decided in learner.describe()


def augmented_stream() -> Iterator[Batch]:
    """A one-pass stream whose batches draw augmentation from torch's generator."""
    g = torch.Generator().manual_seed(3)
    while True:
        x, y = torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)
        yield x + 0.1 * torch.rand(x.shape), y


class AugmentedSamples(torch.utils.data.Dataset[Batch]):
    """Samples that draw augmentation from torch's generator as they are fetched."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(64, 3, generator=g), torch.randint(0, 2, (64,), generator=g)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> Batch:
        return self.x[i] + 0.1 * torch.rand(3), self.y[i]


def augmented_loader() -> torch.utils.data.DataLoader[Batch]:
    """A DataLoader shuffling from the global generator over augmenting samples."""
    return torch.utils.data.DataLoader(AugmentedSamples(), batch_size=4, shuffle=True)


def interrupting(hook: str, how: str, step: int | None) -> Callback:
    """A callback that, at ``step`` and once, interrupts the batch from ``hook`` before its
    commit: ``"cancel"`` cancels the run from an ``async def`` hook (the batch is awaited),
    ``"stop"`` raises StopFit from a ``def`` hook (the batch stays fused)."""

    class Interrupt(Callback):
        reads = frozenset({"step"})

        def __init__(self) -> None:
            self.step = step
            self.scope: anyio.CancelScope | None = None

        def due(self, state: StateView) -> bool:
            if state.step != self.step:
                return False
            self.step = None
            return True

        async def cancel(self, state: StateView) -> None:
            if self.due(state) and self.scope is not None:
                self.scope.cancel()
            await anyio.lowlevel.checkpoint()

        def stop(self, state: StateView) -> None:
            if self.due(state):
                raise StopFit("interrupted")

    setattr(Interrupt, hook, Interrupt.cancel if how == "cancel" else Interrupt.stop)
    return Interrupt()


@pytest.mark.parametrize(
    ("hook", "how"),
    [
        ("before_fit_batch", "cancel"),
        ("after_gradient", "cancel"),
        ("before_update", "cancel"),
        ("before_fit_batch", "stop"),
        ("after_gradient", "stop"),
        ("before_update", "stop"),
    ],
)
@pytest.mark.parametrize("budget", [0.0005, 0.0])  # 0: every fetch slow (a producer thread
@pytest.mark.parametrize("dropout", [True, False])  # where compute draws nothing)
@pytest.mark.parametrize("data", ["stream", "shuffling DataLoader"])
async def test_augmentation_goes_on_exactly_after_an_undone_batch(
    data: str, dropout: bool, budget: float, hook: str, how: str
) -> None:
    weights = []
    for step in (None, 3):
        torch.manual_seed(0)
        model = Watched(dropout)
        interrupt: Any = interrupting(hook, how, step)
        source: Any = augmented_stream() if data == "stream" else augmented_loader()
        learner: Learner[Any] = Learner(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            nn.functional.cross_entropy,
            source,
            steps_per_epoch=5 if data == "stream" else None,
            fetch_budget=budget,
            callbacks=[interrupt],
        )
        while learner.state.epoch < 2:
            with anyio.CancelScope() as interrupt.scope:
                await learner.fit(2)
        assert interrupt.step is None or step is None
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_describe_says_a_concurrent_validation_set_draws_beside_training() -> None:
    model = Watched(dropout=True)
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.functional.cross_entropy,
        Augmented("torch", model),
        Augmented("torch", model),
        validate="concurrent",
    )
    text = learner.describe()
    assert "data: val_data: fetch=auto: inline; validated concurrently, so what it draws" in text
    assert "data: train_data: fetch=auto: inline\n" in text
