"""Checks of a learner's arguments at construction, so that bad input fails there, clearly.

Each check names the argument, what is wrong with it and how to fix it. What can only be seen
while running (an unsized iterable that yields nothing) is checked where it is seen, in
``_data.py``; the checks here cost nothing per batch.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import AsyncIterator, Iterator, Mapping
from types import AsyncGeneratorType, GeneratorType
from typing import Any

import torch

__all__ = [
    "check_data",
    "check_hyperparameters",
    "check_optimizer",
    "check_passes",
    "check_positive",
    "check_source",
]


def check_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, name: str = "optimizer"
) -> None:
    """The optimizer must update some of the model's trainable parameters.

    Each of several optimizers (``name``: its key) likewise. An optimizer built over another
    model's parameters (a copy, a model built twice) trains
    nothing: the loss goes down on the other model, never on this one. Extra parameters (a
    learnable temperature in the loss) and frozen parts of the model are fine.
    """
    what = "the optimizer" if name == "optimizer" else f"optimizer {name!r}"
    try:
        step = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # pragma: no cover - a step torch cannot describe
        step = None
    if step is not None and step.default is step.empty:
        raise ValueError(
            f"{what} ({type(optimizer).__name__}) needs a closure in step(closure) (it evaluates"
            " the loss again), which the Update stage does not give; write a stage that calls"
            " optimizer.step(closure) (docs/writing-stages.md)"
        )
    check_hyperparameters(optimizer, name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return  # nothing to update anyway (a frozen model whose loss has parameters, say)
    mine = {id(p) for p in trainable}
    if any(id(p) in mine for group in optimizer.param_groups for p in group["params"]):
        return
    if not any(group["params"] for group in optimizer.param_groups):
        raise ValueError(
            f"{what} ({type(optimizer).__name__}) has no parameters (its param_groups are "
            "empty), so training would never change the model; build it from this model's "
            f"parameters, e.g. {type(optimizer).__name__}(model.parameters(), ...)"
        )
    raise ValueError(
        f"{what} ({type(optimizer).__name__}) updates none of the model's parameters:"
        " it was built over other tensors (another model, or a copy of this one), so training"
        " would never change the model; build it from this model's parameters, e.g."
        f" {type(optimizer).__name__}(model.parameters(), ...)"
    )


def check_hyperparameters(optimizer: torch.optim.Optimizer, name: str = "optimizer") -> None:
    """Every parameter group's numeric hyperparameters (the optimizer's own, ``lr`` first)
    must be finite numbers, and ``lr`` not negative. Checked at construction and again when
    fit starts (a group changed since): found by the update instead, a bad value of one group
    fails its step after the groups before it were updated, and the weights are left half
    updated."""
    what = "the optimizer" if name == "optimizer" else f"optimizer {name!r}"
    kind = type(optimizer).__name__
    defaults = optimizer.defaults
    for i, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            # The optimizer's own numeric hyperparameters (a key of the user's own may mean
            # anything; a flag such as foreach may be None).
            default = defaults.get(key)
            if key not in defaults or isinstance(default, bool) or isinstance(value, bool):
                continue
            if not (key == "lr" or isinstance(default, int | float | torch.Tensor)):
                continue
            if value is None and default is None:
                continue  # (unset by the optimizer's own default: Adafactor's relative steps)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = float(value)
            elif isinstance(value, numbers.Real):
                value = float(value)  # (a numpy number)
            where = f"{what} ({kind}) has {key}={value!r} in parameter group {i}"
            if not isinstance(value, int | float):
                raise TypeError(
                    f"{where}, a {type(value).__name__}: it must be a number (a value read "
                    "from a configuration file as text? convert it with float())"
                )
            if math.isnan(value) or (math.isinf(value) and key == "lr"):
                raise ValueError(
                    f"{where}: every step would make the weights NaN or infinite; give a "
                    "finite value"
                )
            if key == "lr" and value < 0:
                raise ValueError(
                    f"{where}: a negative learning rate climbs the loss instead of descending "
                    "it; give a non-negative value"
                )


def check_source(name: str, data: Any) -> None:
    """Iterable things that are not a source of batches: iterated, they would give characters,
    keys, or the rows of two tensors, and fail at the first batch with a message about the
    batch instead of the argument."""
    if isinstance(data, str | bytes):
        raise TypeError(
            f"{name} is a {type(data).__name__} ({data!r:.60}), not data: load the file into a "
            "Dataset and pass a DataLoader over it (or a list of (inputs, targets) batches)"
        )
    if isinstance(data, type):
        raise TypeError(
            f"{name} is the class {data.__name__}, not data: pass an instance "
            f"({data.__name__}(...))"
        )
    if name != "train_data":
        return  # (other data: batches of inputs alone may come as a tuple; sets as a mapping)
    if isinstance(data, Mapping):
        raise TypeError(
            f"{name} is a {type(data).__name__}, which would be iterated over its keys: training"
            " takes one source of batches (a DataLoader, a list of (inputs, targets) batches);"
            " named sets are for val_data"
        )
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in data)
        and len(data[0]) == len(data[1])
    ):
        raise TypeError(
            f"{name} is a tuple of two tensors of {len(data[0])} rows (inputs, targets?), which "
            "would be iterated as two batches: pass DataLoader(TensorDataset(x, y), "
            "batch_size=...) for batches of rows, [(x, y)] for one batch, or a list if these "
            "are two batches"
        )


def check_data(name: str, data: Any) -> None:
    """Training or validation data must not be empty: a sized source of length 0 trains (or
    validates) on nothing. (An unsized one that yields nothing is caught by the pass that
    finds it empty, see ``Batches._empty``.)"""
    try:
        size = len(data)
    except Exception:  # unsized (an IterableDataset's loader raises TypeError): seen when run
        return
    if size == 0:
        what = "train on nothing" if name == "train_data" else "have nothing to validate"
        fix = "; pass val_data=None for no validation" if name.startswith("val_data") else ""
        raise ValueError(
            f"{name} is empty ({type(data).__name__} of length 0): a pass over it would {what}{fix}"
        )


def check_passes(name: str, data: Any, passes: int) -> None:
    """At fit start: a generator (sync or async) can be iterated only once, so a run that needs
    more than one more pass over it would get nothing from the second on."""
    # A Feed is a stream by design: a pass runs to the end of what it is fed, and the run stops
    # with it (not refused here).
    if passes > 1 and one_pass(data) and not getattr(data, "_is_feed", False):
        fix = (
            "pass something that makes a new iterator for each epoch (a list, a DataLoader, an"
            " object whose __iter__ is a generator function)"
            + (
                ", or set steps_per_epoch= to consume it as one stream"
                if name == "train_data"
                else ""
            )
        )
        kind = (
            "a generator"
            if isinstance(data, GeneratorType | AsyncGeneratorType)
            else (f"an iterator ({type(data).__name__})")
        )
        raise ValueError(
            f"{name} is {kind}: it can be iterated only once, and this fit needs {passes}"
            f" more passes over it (every pass after the first would get no batch); {fix}"
        )


def one_pass(data: Any) -> bool:
    """Whether iterating ``data`` again goes on where the last pass stopped instead of starting
    over (a generator, any iterator, a :class:`~aiolearner.Feed`: ``iter(data) is data``)."""
    return isinstance(data, GeneratorType | AsyncGeneratorType | Iterator | AsyncIterator)


def check_count(name: str, value: Any, *, least: int = 1) -> None:
    """A whole number of at least ``least`` (a count of steps, batches, records)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}")


def check_positive(name: str, value: float, *, zero: bool = False) -> None:
    """A number of seconds (or a count) that must be positive (or non-negative, ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        bound = "non-negative" if zero else "positive"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
