"""A learner's optimizers: one, or several by name, and their part of checkpoints.

``Learner(model, optimizer, ...)`` takes one optimizer or a mapping ``{name: optimizer}``
(a GAN's ``{"g": opt_g, "d": opt_d}``). The state has both views of them, always valid:

* ``state.optimizers``: every optimizer by name (a single optimizer is named ``"main"``);
* ``state.optimizer``: the first of them (the only one, usually), as before there could be
  several, so that code written for one optimizer keeps working unchanged.

In a checkpoint a single optimizer is stored as it always was, under ``"optimizer"``; several
are stored under ``"optimizers"``, by name. Loading matches them by name (one against one needs
no names) and refuses any other mismatch before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["DEFAULT_NAME", "from_checkpoint", "load", "named_optimizers", "to_checkpoint"]

#: The name of an optimizer given alone (``Learner(model, opt, ...)``).
DEFAULT_NAME = "main"


def named_optimizers(
    optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
) -> dict[str, torch.optim.Optimizer]:
    """The learner's optimizers by name, checked: what ``state.optimizers`` holds.

    Raises:
        TypeError: not an optimizer nor a mapping of names to optimizers.
        ValueError: an empty mapping, a name that is not an identifier, one optimizer twice.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return {DEFAULT_NAME: optimizer}
    if not isinstance(optimizer, Mapping):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer or a mapping of names to optimizers, "
            f"got {type(optimizer).__name__}"
        )
    if not optimizer:
        raise ValueError("optimizer: the mapping of optimizers is empty")
    out: dict[str, torch.optim.Optimizer] = {}
    seen: dict[int, str] = {}
    for name, opt in optimizer.items():
        # Names make stage and hook names (Update(optimizer="d") is the stage 'update_d').
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"optimizer names must be identifiers, got {name!r}")
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer {name!r} must be a torch.optim.Optimizer, got {type(opt).__name__}"
            )
        if id(opt) in seen:
            raise ValueError(f"optimizers {seen[id(opt)]!r} and {name!r} are the same object")
        seen[id(opt)] = name
        out[name] = opt
    return out


def to_checkpoint(optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """The optimizers' entry of ``state_dict()``: ``{"optimizer": ...}`` for one (the format
    checkpoints always had), ``{"optimizers": {name: ...}}`` for several."""
    # Their kinds too, so that loading refuses another kind's state before anything loads.
    kinds = {"optimizer_types": {name: _kind(opt) for name, opt in optimizers.items()}}
    if len(optimizers) == 1:
        (only,) = optimizers.values()
        return {"optimizer": only.state_dict(), **kinds}
    return {"optimizers": {name: opt.state_dict() for name, opt in optimizers.items()}, **kinds}


def _kind(opt: torch.optim.Optimizer) -> str:
    return f"{type(opt).__module__}.{type(opt).__qualname__}"


def from_checkpoint(
    optimizers: Mapping[str, torch.optim.Optimizer], checkpoint: Mapping[str, Any]
) -> list[tuple[torch.optim.Optimizer, Any, str | None]]:
    """Each optimizer with the state the checkpoint holds for it (and the kind of optimizer
    that saved it, where the checkpoint says), matched before anything loads.

    Raises:
        ValueError: the checkpoint holds other optimizers (by number or by name).
    """
    mine = list(optimizers)
    pairs: list[tuple[str, str]]  # (my name, the checkpoint's)
    if "optimizers" in checkpoint:
        stored = checkpoint["optimizers"]
        if not isinstance(stored, Mapping):
            raise ValueError("the checkpoint's 'optimizers' entry is not a mapping")
        theirs = list(stored)
        if len(mine) == 1 and len(theirs) == 1:
            pairs = [(mine[0], theirs[0])]
        elif set(theirs) != set(mine):
            raise ValueError(
                f"the checkpoint holds optimizers {sorted(theirs)}, this learner has "
                f"{sorted(mine)}; nothing was loaded"
            )
        else:
            pairs = [(name, name) for name in mine]
    elif "optimizer" in checkpoint:
        if len(mine) != 1:
            raise ValueError(
                f"the checkpoint holds one optimizer, this learner has {len(mine)} "
                f"({sorted(mine)}); nothing was loaded"
            )
        # The kind of a single optimizer is kept under its name, whatever this learner's is.
        kinds = checkpoint.get("optimizer_types")
        one = next(iter(kinds)) if isinstance(kinds, Mapping) and len(kinds) == 1 else mine[0]
        stored = {one: checkpoint["optimizer"]}
        pairs = [(mine[0], one)]
    else:
        raise ValueError("the checkpoint holds no optimizer state; nothing was loaded")
    kinds = checkpoint.get("optimizer_types")
    if not isinstance(kinds, Mapping):
        kinds = {}
    return [(optimizers[name], stored[theirs], kinds.get(theirs)) for name, theirs in pairs]


def load(opt: torch.optim.Optimizer, state: Any, saved_by: str | None) -> None:
    """``opt.load_state_dict(state)``, then a check that every parameter group has each
    setting the optimizer steps with, as a state saved by another kind of optimizer has not
    (``saved_by``: the kind that saved it, where the checkpoint says).

    Raises:
        ValueError: the state does not fit (the caller puts back what was loaded).
    """
    by = "another kind of optimizer?" if saved_by is None else f"saved by a {saved_by}"
    try:
        opt.load_state_dict(state)
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(
            f"the checkpoint's optimizer state does not fit this {_kind(opt)} ({by}): "
            f"{type(exc).__name__}: {exc}; nothing was loaded"
        ) from exc
    for i, group in enumerate(opt.param_groups):
        missing = sorted(k for k in opt.defaults if k not in group)
        if missing:
            raise ValueError(
                f"the checkpoint's optimizer state does not fit this {_kind(opt)}: its "
                f"parameter group {i} lacks {missing} ({by}); nothing was loaded"
            )
        for j, param in enumerate(group["params"]):
            for key, value in opt.state.get(param, {}).items():
                if (
                    key in _PER_ELEMENT
                    and isinstance(value, torch.Tensor)
                    and value.shape != param.shape
                ):
                    raise ValueError(
                        f"the checkpoint's optimizer state does not fit this {_kind(opt)}: "
                        f"{key!r} of parameter {j} of group {i} has shape {tuple(value.shape)},"
                        f" the parameter {tuple(param.shape)} (parameters in another order?);"
                        " nothing was loaded"
                    )


#: Per-parameter optimizer buffers with the parameter's shape (torch.optim's optimizers);
#: others (a factored second moment, a step count) are not checked.
_PER_ELEMENT = frozenset(
    {
        "momentum_buffer",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "square_avg",
        "acc_delta",
        "sum",
        "ax",
        "prev",
        "step_size",
        "grad_avg",
        "exp_inf",
    }
)
