"""Checkpoints under a strategy: every rank's own state, rank 0's file, rank 0's decision.

What differs from rank to rank (the random generators, the epoch's random state and losses, a
stream's position, the callbacks' states, the sampler's epoch) is gathered to rank 0 at the save
point, by every rank, and kept under ``"ranks"`` in rank 0's checkpoint; callbacks' states equal
to rank 0's are not repeated. On load each rank takes its own entry back, so a run resumed on
the same number of ranks continues bit for bit, mid-epoch included (every rank restoring rank 0's
random state instead is a classic: dropout and augmentation would repeat across ranks).

``fit(resume="last")`` is decided on rank 0 (which file, or that there is none) and broadcast, so
ranks never diverge on a file system's answer; every rank then reads the file (shared storage).

Under FSDP the weights and the optimizer state are gathered in full (a collective) for the file
and sharded again when loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import torch

from .. import _persist

if TYPE_CHECKING:
    from .._learner import Learner
    from .._state import State
    from ._strategy import Strategy

__all__ = ["load_state_dict", "resume", "state_dict"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:
        return False


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _full_states(strategy: Strategy, learner: Learner[Any]) -> tuple[Any, Any] | None:
    from ._models import FSDP

    if not isinstance(strategy, FSDP):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, optimizer = learner.model, learner.optimizer
    if optimizer.state:
        optim = get_optimizer_state_dict(model, optimizer, options=options)
    else:
        # No state (plain SGD, or before the first step): torch's reader would make some with
        # a step of zero gradients, whose step hooks a schedule or an average would count.
        names = {id(p): name for name, p in model.named_parameters()}
        optim = {
            "state": {},
            "param_groups": [
                {**group, "params": [names[id(p)] for p in group["params"]]}
                for group in optimizer.param_groups
            ],
        }
    return get_model_state_dict(model, options=options), optim


def state_dict(
    strategy: Strategy, learner: Learner[Any], snapshot: State | None = None
) -> dict[str, Any]:
    """``Learner.state_dict()`` under a strategy: a collective (every rank calls it).

    ``snapshot``: as for the single-process ``state_dict`` (a concurrent validation's tail):
    then no collective runs and the result holds this rank's random and data states only. The
    tails run next to training, each rank's at its own step: a blocking gather there would wait
    for a rank whose event loop is busy in a training step that waits for this one. (Those
    states are the live ones anyway, not the snapshot's: such a file resumes from its weights,
    not exactly.)"""
    out = _persist.state_dict(learner, snapshot=snapshot)
    if snapshot is not None:
        out["ranks"] = {"world_size": strategy.world_size, "entries": None}
        return out
    full = _full_states(strategy, learner)
    if full is not None:
        out["model"], out["optimizer"] = full
    progress = out["progress"]
    sampler = strategy._sampler
    mine = {
        "rng": out["rng"],
        "epoch_rng": out["epoch_rng"],
        "data_streams": out["data_streams"],
        "epoch_streams": out["epoch_streams"],
        "train_losses": progress["train_losses"],
        "stream": progress["stream"],
        "drawn": progress["drawn"],
        "callbacks": out["callbacks"],
        "sampler_epoch": None if sampler is None else sampler.epoch,
    }
    # On the CPU: the gather runs on a gloo lane, and rank 0 must be able to unpickle every
    # rank's tensors (a CUDA tensor would come back on the sender's device index).
    gathered = strategy.gather_object(_on_cpu(mine))
    if gathered is None:
        out["ranks"] = None  # rank 0's checkpoint holds every rank's state
        return out
    base = out["callbacks"]
    entries = []
    for rank, entry in enumerate(gathered):
        callbacks = {
            key: value
            for key, value in entry["callbacks"].items()
            if rank and not _same(value, base.get(key))
        }
        entries.append(dict(entry, callbacks=callbacks))
    out["ranks"] = {"world_size": strategy.world_size, "entries": entries}
    return out


def load_state_dict(
    strategy: Strategy, learner: Learner[Any], checkpoint: Mapping[str, Any]
) -> None:
    """``Learner.load_state_dict()`` under a strategy: this rank's own entry, then the rest."""
    ckpt = dict(checkpoint)
    ranks = ckpt.get("ranks")
    pinned = None
    if (
        isinstance(ranks, Mapping)
        and ranks.get("world_size") == strategy.world_size
        and ranks.get("entries") is None
    ):
        pass  # written on a concurrent validation's snapshot: rank 0's states for every rank
    elif isinstance(ranks, Mapping) and ranks.get("world_size") == strategy.world_size:
        entry = ranks["entries"][strategy.rank]
        ckpt["rng"] = entry["rng"]
        ckpt["epoch_rng"] = entry["epoch_rng"]
        ckpt["data_streams"] = entry.get("data_streams")
        ckpt["epoch_streams"] = entry.get("epoch_streams")
        ckpt["progress"] = dict(
            ckpt["progress"],
            train_losses=entry["train_losses"],
            stream=entry["stream"],
            drawn=entry.get("drawn", 0),
        )
        ckpt["callbacks"] = {**ckpt.get("callbacks", {}), **entry["callbacks"]}
        if entry["stream"] is not None:
            pinned = entry.get("sampler_epoch")
    else:
        ckpt = on_another_world_size(ckpt, strategy.world_size)
    from ._models import FSDP

    if isinstance(strategy, FSDP) and "model" in ckpt:
        _load_fsdp(learner, ckpt)
        return
    _persist.load_state_dict(learner, ckpt)
    strategy._pinned_epoch = pinned


def on_another_world_size(ckpt: dict[str, Any], world_size: int) -> dict[str, Any]:
    """A checkpoint saved by another number of ranks than ``world_size`` (one process without
    a strategy is one rank), as this world resumes it, with a warning: every rank takes rank 0's
    random state, and an epoch interrupted half way goes on from the same share of its batches
    (batch 9 of 16 on one rank is batch 4 of 8 on two), as each rank's share of the data has
    another length now."""
    if "format" not in ckpt:
        return ckpt
    ranks = ckpt.get("ranks")
    saved = ranks.get("world_size") if isinstance(ranks, Mapping) else 1
    if not isinstance(saved, int) or saved < 1 or saved == world_size:
        return ckpt
    progress = ckpt.get("progress")
    moved = ""
    # (A live stream, steps_per_epoch, goes on from where it was: its position is its own.)
    if (
        isinstance(progress, Mapping)
        and not progress.get("pass_done")
        and not progress.get("stream")
    ):
        index = progress.get("batch_index")
        if isinstance(index, int) and index > 0:
            now = index * saved // world_size
            ckpt = dict(ckpt)
            ckpt["progress"] = {k: v for k, v in progress.items() if k != "undone"} | {
                "batch_index": now,
                "drawn": now,
            }
            moved = f"; the interrupted epoch goes on from batch {now} (batch {index} of theirs)"
    warnings.warn(
        f"this checkpoint was saved by {saved} rank(s) and is resumed by {world_size}: every "
        "rank takes rank 0's random state, and the data is split differently, so the run does "
        f"not continue exactly as it would have{moved}",
        RuntimeWarning,
        stacklevel=4,
    )
    return ckpt


def _load_fsdp(learner: Learner[Any], ckpt: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, optimizer = learner.model, learner.optimizer
    weights, optim = ckpt["model"], ckpt["optimizer"]
    saved_groups = optim.get("param_groups", [])
    sizes = [len(group["params"]) for group in saved_groups]
    if sizes != [len(group["params"]) for group in optimizer.param_groups]:
        # Refused before anything is loaded, as Optimizer.load_state_dict refuses it.
        raise ValueError(
            f"the checkpoint's optimizer has parameter groups of {sizes} parameters, this "
            f"learner's of {[len(group['params']) for group in optimizer.param_groups]}: "
            "build the optimizer as the run that saved it did"
        )
    # The rest (counters, random states, callbacks) through the all-or-nothing load, with this
    # rank's own shards standing in for the weights; then the full weights are sharded in.
    ckpt["model"] = model.state_dict()
    ckpt["optimizer"] = optimizer.state_dict()
    _persist.load_state_dict(learner, ckpt)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    # The groups' hyperparameters first, as Optimizer.load_state_dict takes them: torch's loader
    # wants the same keys in the live groups (a schedule made at fit start adds `initial_lr`)
    # and a tensor in the state (plain SGD has none: then there is nothing more to load).
    for live, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        live.update({k: v for k, v in saved.items() if k != "params"})
    states = optim.get("state", {})
    if any(isinstance(v, torch.Tensor) for s in states.values() for v in s.values()):
        set_optimizer_state_dict(model, optimizer, optim, options=options)
        return
    # No tensor to shard (none at all, or plain values such as a counter): by name, whole.
    parameters = dict(model.named_parameters())
    optimizer.state.clear()
    for name, values in states.items():
        optimizer.state[parameters[name]] = dict(values)


async def resume(strategy: Strategy, learner: Learner[Any], which: Any) -> Any:
    """The checkpoint ``fit(resume=which)`` means: rank 0 decides, every rank reads it."""
    decision: Any = None
    if strategy.is_main:
        try:
            path = await anyio.to_thread.run_sync(
                _persist.find_checkpoint, learner._callbacks, which
            )
            decision = ("ok", str(path))
        except Exception as exc:  # every rank raises the same, rather than rank 0 alone
            decision = ("error", type(exc).__name__, str(exc))
    decision = strategy.broadcast_object(decision)
    if decision[0] == "error":
        kind = FileNotFoundError if decision[1] == "FileNotFoundError" else ValueError
        raise kind(f"{decision[2]} (decided on rank 0)")
    return await anyio.to_thread.run_sync(
        _persist.read_checkpoint, Path(decision[1]), learner.device
    )
