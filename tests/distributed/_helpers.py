"""A learner on a small shuffled dataset: what the strategy tests of one process build on."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Learner
from aiolearner.testing import tiny_model


def data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))


def loader(n: int = 32, **kwargs: Any) -> DataLoader[Any]:
    return DataLoader(data(n), batch_size=4, **kwargs)


def make(strategy: Any = None, **options: Any) -> Learner[Any]:
    torch.manual_seed(0)
    model = tiny_model(4, 2)
    return Learner(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.nn.functional.cross_entropy,
        options.pop("train", None) or loader(shuffle=True),
        strategy=strategy,
        **options,
    )


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
