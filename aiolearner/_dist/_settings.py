"""The ranks' settings, compared once as the learner is made.

Every rank must make its learner alike: the same strategy settings, a model of the same
parameters, optimizers of the same kind, the same callbacks and stages in the same order, and a
training DataLoader of the same batch size, sampler and ``drop_last``. A difference found later
is a hang or an obscure error: ranks with different ``agree_every`` meet at different agreement
points and wait for the group's timeout; a model of other shapes fails inside DDP's construction
on one rank, with a bare transport error on the others. So the first thing a strategy does once
it has joined the group (:func:`compare_settings`) is to gather each rank's settings (one
``all_gather_object`` on the training lane) and, where they differ, raise on every rank the same
:class:`~aiolearner.ConfigurationError`, naming each difference with every rank's value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .._exceptions import ConfigurationError
from .._stage import Stage

if TYPE_CHECKING:
    from ._strategy import Strategy

__all__ = ["compare_settings", "settings_of"]

#: The learner's callbacks, stages and training data, as given to ``Learner``.
Parts = tuple[Any, Any, Any]

#: At most this many differences are listed in the error.
SHOWN = 5

#: Optimizer options that choose an implementation, not the update: they may differ per rank.
IMPLEMENTATION = frozenset({"foreach", "fused", "capturable", "differentiable"})


def _plain(value: Any) -> Any:
    """``value`` where comparing it across ranks is meaningful, otherwise its type's name."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return tuple(_plain(v) for v in value)
    return type(value).__name__


def _shape(tensor: torch.Tensor) -> str:
    """``"(6, 4) float32"``; ``"uninitialized"`` for a lazy module's (DDP says what to do)."""
    if isinstance(
        tensor, torch.nn.parameter.UninitializedParameter | torch.nn.parameter.UninitializedBuffer
    ):
        return "uninitialized"
    return f"{tuple(tensor.shape)} {tensor.dtype}".replace("torch.", "")


def settings_of(
    strategy: Strategy,
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    parts: Parts = (None, None, None),
) -> dict[str, Any]:
    """What must be the same on every rank, as plain values (name: value). ``parts``: the
    learner's callbacks, stages and training data, as given to ``Learner``."""
    found: dict[str, Any] = {
        "strategy": type(strategy).__name__,
        "agree_every": strategy.agree_every,
        "shard_data": strategy.shard_data,
        "sampler_seed": strategy.sampler_seed,
    }
    for key, value in sorted(strategy._settings().items()):
        found[key] = _plain(value)
    parameters = list(model.named_parameters())
    found["the model's number of parameters"] = len(parameters)
    for name, p in parameters:
        found[f"model parameter {name!r}"] = _shape(p)
    # Buffers the strategy broadcasts (their values may differ: rank 0's are sent to all).
    broadcast = getattr(strategy, "ddp_kwargs", {}).get("broadcast_buffers", True)
    for name, b in model.named_buffers() if broadcast else ():
        found[f"model buffer {name!r}"] = _shape(b)
    found["the optimizers"] = tuple(optimizers)
    for key, optimizer in optimizers.items():
        where = "the optimizer" if len(optimizers) == 1 else f"optimizer {key!r}"
        found[f"{where}'s type"] = type(optimizer).__name__
        found[f"{where}'s parameter groups"] = tuple(
            len(group["params"]) for group in optimizer.param_groups
        )
        for i, group in enumerate(optimizer.param_groups):
            for option, value in sorted(group.items()):
                if option != "params" and option not in IMPLEMENTATION:
                    found[f"{where}'s {option} (group {i})"] = _plain(value)
    callbacks, stages, train_data = parts
    # Hooks run, and agree, in the callbacks' order: the same callbacks in the same order.
    found["the callbacks"] = tuple(type(c).__qualname__ for c in callbacks or ())
    if stages is not None:
        given = stages.items() if isinstance(stages, Mapping) else [("fit_run", stages)]
        found["the stages"] = tuple(
            (name, tuple((s.name, type(s).__qualname__) for s in stage.walk()))
            if isinstance(stage, Stage)
            else (name, type(stage).__qualname__)
            for name, stage in given
        )
    if isinstance(train_data, torch.utils.data.DataLoader):
        # Each rank takes the fewest batches any rank has: a rank of larger batches (or of
        # another order) would train on part of its shard.
        found["train_data's batch_size"] = train_data.batch_size
        found["train_data's drop_last"] = train_data.drop_last
        found["train_data's sampler"] = type(train_data.sampler).__qualname__
        found["train_data's batch_sampler"] = type(train_data.batch_sampler).__qualname__
    return found


def differences(gathered: list[dict[str, Any]]) -> list[str]:
    """One line for each setting whose value is not the same on every rank."""
    keys = list(gathered[0])
    for other in gathered[1:]:
        keys += [key for key in other if key not in gathered[0]]
    missing = object()
    lines = []
    for key in dict.fromkeys(keys):
        values = [found.get(key, missing) for found in gathered]
        if all(_same(v, values[0]) for v in values[1:]):
            continue
        per_rank = ", ".join(
            f"rank {rank}: {'(none)' if v is missing else repr(v)}" for rank, v in enumerate(values)
        )
        lines.append(f"{key} ({per_rank})")
    return lines


def _same(a: Any, b: Any) -> bool:
    """Equal, a NaN counting as equal to a NaN (a NaN hyperparameter on every rank is alike)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def compare_settings(
    strategy: Strategy,
    model: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    parts: Parts = (None, None, None),
) -> None:
    """Gather every rank's settings; raise on every rank alike where they differ."""
    mine = settings_of(strategy, model, optimizers, parts)
    gathered: list[Any] = [None] * strategy._world_size
    dist.all_gather_object(gathered, mine, group=strategy.train_group)
    found = differences(gathered)
    if not found:
        return
    shown = "; ".join(found[:SHOWN])
    more = f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    raise ConfigurationError(
        f"the ranks made their learners differently: {shown}{more}. Every rank must make its "
        f"Learner with the same model, optimizers, callbacks, stages, training DataLoader "
        f"settings and {type(strategy).__name__}(...) settings "
        f"(this is rank {strategy._rank} of {strategy._world_size})"
    )
