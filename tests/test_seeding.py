"""seed_everything and DataLoader worker seeding: same seed, same run, to the bit."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from aiolearner import (
    Callback,
    Learner,
    StateView,
    dataloader_seeding,
    seed_everything,
    seed_worker,
)
from aiolearner.testing import tiny_model


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random augmentation from every kind of generator a dataset uses in its workers."""

    def __init__(self, n: int = 32) -> None:
        self.x = torch.linspace(-1, 1, n * 4).reshape(n, 4)
        self.y = torch.arange(n) % 3
        # Its own generators, made without a seed (as datasets often do): only seed_worker
        # makes them reproducible.
        self.rng = np.random.default_rng()
        self.py = random.Random()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = (
            torch.randn(4) * 0.1
            + float(np.random.uniform())
            + random.random()
            + float(self.rng.normal())
            + self.py.random()
        )
        return self.x[i] + noise, self.y[i]


class Batches(Callback):
    reads = frozenset({"batch"})

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def after_fit_batch(self, state: StateView) -> None:
        self.inputs.append(state.batch[0].clone())


async def _run(seed: int, **loader: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    seed_everything(seed)
    data = DataLoader(Augmented(), batch_size=8, shuffle=True, num_workers=2, **loader)
    model = tiny_model(seed=seed)
    seen = Batches()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        data,
        callbacks=[seen],
    )
    await learner.fit(2)
    return seen.inputs, [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


async def test_same_seed_same_run_with_two_workers() -> None:
    batches, weights = await _run(7, **dataloader_seeding())
    again, again_weights = await _run(7, **dataloader_seeding())
    assert len(batches) == 8
    assert _same(batches, again)
    assert _same(weights, again_weights)
    other, other_weights = await _run(8, **dataloader_seeding())
    assert not _same(batches, other)
    assert not _same(weights, other_weights)
    # Workers and epochs get their own streams: no two batches share their noise.
    noise = [b - b.mean() for b in batches]
    assert len({tuple(n.flatten().tolist()) for n in noise}) == len(noise)


async def test_without_seed_worker_the_datasets_own_generators_differ() -> None:
    # The control for the test above: torch seeds the workers' global generators, not the
    # generators a dataset holds.
    batches, _ = await _run(7)
    again, _ = await _run(7)
    assert not _same(batches, again)


async def test_a_loader_generator_makes_the_order_independent_of_the_global_one() -> None:
    kwargs = dataloader_seeding(3)
    assert kwargs["worker_init_fn"] is seed_worker
    assert isinstance(kwargs["generator"], torch.Generator)
    batches, _ = await _run(7, **dataloader_seeding(3))
    other_global, _ = await _run(8, **dataloader_seeding(3))
    # Model initialization differs with the global seed, the batches do not.
    assert _same(batches, other_global)


@pytest.fixture
def restore_determinism(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Set then removed through monkeypatch, so that it is removed again afterwards.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


@pytest.mark.usefixtures("restore_determinism")
def test_seed_everything_seeds_and_records() -> None:
    seeded = seed_everything(123)
    draws = (random.random(), float(np.random.uniform()), float(torch.rand(())))
    assert seed_everything(123) == seeded
    assert (random.random(), float(np.random.uniform()), float(torch.rand(()))) == draws
    assert seeded.as_dict() == {
        "seed": 123,
        "numpy": True,
        "cuda": torch.cuda.is_available(),
        "deterministic": False,
        "env": {},
    }
    assert not torch.are_deterministic_algorithms_enabled()

    strict = seed_everything(5, deterministic=True)
    assert strict.deterministic
    assert strict.env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark


def test_bad_seeds() -> None:
    with pytest.raises(ValueError, match="seed must be in"):
        seed_everything(-1)
    with pytest.raises(ValueError, match="seed must be in"):
        seed_everything(2**32)
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_everything(1.5)  # type: ignore[arg-type]


def test_seed_worker_outside_a_worker_does_nothing() -> None:
    seed_worker(0)
