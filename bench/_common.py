"""Shared pieces of the benchmarks: models, data, timing, and result tables.

Every benchmark builds its model and data from fixed seeds, runs its variants interleaved (one
repetition of every variant, then the next repetition), and reports medians. Timing uses
:class:`StampedData`, which records the time at which each batch is *requested*, or
:class:`StampedModel`, which records the time at which each step's forward starts (so the data
can stay a plain list): the time between the stamps of batch ``k`` and batch ``n - k`` covers
``n - 2k`` whole steps and leaves out each framework's setup and teardown (Lightning's Trainer
spends ~100 ms there), so per-step figures are comparable across frameworks.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio
import torch

__all__ = [
    "Batch",
    "StampedData",
    "StampedModel",
    "machine",
    "make_data",
    "make_mlp",
    "median",
    "raw_step",
    "table",
]

Batch = tuple[torch.Tensor, torch.Tensor]


def make_mlp(sizes: Sequence[int], *, seed: int = 0) -> torch.nn.Sequential:
    """An MLP with ReLU between the linear layers, initialised from ``seed``."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(a, b))
    return torch.nn.Sequential(*layers)


def make_data(n: int, batch: int, n_in: int, n_out: int, *, seed: int = 1) -> list[Batch]:
    """``n`` batches of ``(inputs, class targets)``, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, n_in, generator=gen), torch.randint(0, n_out, (batch,), generator=gen))
        for _ in range(n)
    ]


def raw_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """The hand-written training step every framework is compared against."""
    loss = loss_fn(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


class StampedData:
    """A list of batches that records ``time.perf_counter()`` whenever a batch is requested."""

    def __init__(self, batches: Sequence[Any], clock: Callable[[], float]) -> None:
        self.batches = batches
        self.clock = clock
        self.stamps: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        self.stamps = []
        stamps = self.stamps
        clock = self.clock
        for b in self.batches:
            stamps.append(clock())
            yield b
        stamps.append(clock())

    def per_step(self, skip: int) -> float:
        """Seconds per step between the request of batch ``skip`` and of batch ``n - skip``."""
        n = len(self.batches)
        # Some frameworks stop after batch n - 1 without asking for more (Ignite), or fetch one
        # batch ahead (Lightning); leaving ``skip`` batches out at each end covers both.
        if len(self.stamps) < n - skip + 1:
            raise RuntimeError(f"expected at least {n - skip + 1} stamps, got {len(self.stamps)}")
        return (self.stamps[n - skip] - self.stamps[skip]) / (n - 2 * skip)


class StampedModel(torch.nn.Module):
    """The model, recording ``time.perf_counter()`` as each forward starts (one a step)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.stamps: list[float] = []
        self._stamp = self.stamps.append
        self._clock = time.perf_counter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._stamp(self._clock())
        return self.inner(x)  # type: ignore[no-any-return]

    def per_step(self, skip: int) -> float:
        """Seconds per step between the forwards of step ``skip`` and of step ``n - 1 - skip``
        (``n`` forwards in all)."""
        n = len(self.stamps)
        if n < 2 * skip + 2:
            raise RuntimeError(f"expected more than {2 * skip + 1} forwards, got {n}")
        return (self.stamps[n - 1 - skip] - self.stamps[skip]) / (n - 1 - 2 * skip)


#: The ticker's period: a task that stands for a web handler sharing the training's event loop.
TICK = 0.001


async def tick(lags: list[float], done: anyio.Event) -> None:
    """Sleep ``TICK`` in a loop until ``done``, appending how late each wake-up came (seconds)."""
    clock = time.perf_counter
    while not done.is_set():
        start = clock()
        await anyio.sleep(TICK)
        lags.append(clock() - start - TICK)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """A one-line description of where the benchmark ran."""
    import os

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, load average at start "
        f"{os.getloadavg()[0]:.1f} (other work on the machine inflates and spreads timings)"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, sep, *body])
