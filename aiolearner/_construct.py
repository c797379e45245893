"""Parts of ``Learner.__init__``: its checks of the arguments, the device, the initial state.

The constructor calls these in its own order (which decides which error a call with several
bad arguments gets, and what happens before a strategy joins its process group); the checks
of single values are in ``_checks.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import _checks, _optim
from ._callbacks import Callback
from ._executor import Executor
from ._policy import ComputeMode, ComputePolicy
from ._runtime import Runtime
from ._state import State, _ObservedState
from ._trace import Trace
from ._validation import SnapshotPolicy, ValidateEvery, ValidateMode, make_validator

if TYPE_CHECKING:
    from ._dist._strategy import Strategy
    from ._learner import Learner

__all__ = ["check_arguments", "check_callbacks", "initial_state", "resolve_device", "runtime"]


def check_arguments(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    train_data: Any,
    *,
    steps_per_epoch: int | None,
    teardown_timeout: float,
    yield_interval: float,
    fetch_budget: float,
) -> dict[str, torch.optim.Optimizer]:
    """The constructor's first checks, in order; returns the optimizers by name."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    optimizers = _optim.named_optimizers(optimizer)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(loss_fn, type) and issubclass(loss_fn, torch.nn.Module):
        raise TypeError(
            f"loss_fn is the class {loss_fn.__name__}, not a loss: pass an instance, "
            f"loss_fn={loss_fn.__name__}()"
        )
    on_meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if on_meta is not None:
        raise ValueError(
            f"the model's parameter {on_meta!r} is on the meta device (no values): materialize "
            "the model first (model.to_empty(device=...) and initialize it, or build it off "
            "the meta device)"
        )
    if steps_per_epoch is not None:
        _checks.check_count("steps_per_epoch", steps_per_epoch)
    # Bad input fails here, clearly, rather than silently or half way through training.
    for name, opt in optimizers.items():
        _checks.check_optimizer(model, opt, "optimizer" if len(optimizers) == 1 else name)
    _checks.check_data("train_data", train_data)
    _checks.check_positive("teardown_timeout", teardown_timeout)
    _checks.check_positive("yield_interval", yield_interval, zero=True)
    _checks.check_positive("fetch_budget", fetch_budget, zero=True)
    return optimizers


def check_callbacks(callbacks: Sequence[Callback]) -> tuple[Callback, ...]:
    """The callbacks as a tuple, each checked to be a :class:`Callback` instance."""
    if isinstance(callbacks, Callback) or callbacks is None or isinstance(callbacks, str | bytes):
        one = type(callbacks).__name__
        raise TypeError(
            f"callbacks must be a list of Callback instances, got {one}"
            + (f": callbacks=[{one}(...)]" if isinstance(callbacks, Callback) else "")
            + (" (for none, leave it out or pass [])" if callbacks is None else "")
        )
    checked = tuple(callbacks)
    for cb in checked:
        if not isinstance(cb, Callback):
            raise TypeError(
                f"callbacks must be Callback instances, got {type(cb).__name__}"
                + (" (a class: instantiate it)" if isinstance(cb, type) else "")
            )
    return checked


def resolve_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps'):"
                f" {exc}"
            ) from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r}, but CUDA is not available here (this torch build "
                f"{'has no CUDA' if torch.version.cuda is None else 'sees no GPU'}); use "
                "device='cpu', or leave device out to keep the model where it is"
            )
        if resolved.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(
                f"device={device!r}, but MPS (Apple's GPU) is not available here; use "
                "device='cpu', or leave device out to keep the model where it is"
            )
        return resolved
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def runtime(
    learner: Learner[Any],
    *,
    compute: ComputeMode,
    max_blocking: float,
    yield_interval: float,
    teardown_timeout: float,
    validate: ValidateMode,
    validate_every: ValidateEvery,
    max_snapshots: int,
    snapshot_policy: SnapshotPolicy,
) -> Runtime:
    """What the learner's stages share, with its batch executor and its validator (``None``
    for the default: sequential, once per epoch), over the learner's data, hub and trace."""
    rt = Runtime(
        policy=ComputePolicy(compute, max_blocking=max_blocking),
        train=learner._train,
        val=learner._val_sets,
        hub=learner._hub,
        trace=learner._trace,
        device=learner._device,
        yield_interval=yield_interval,
        teardown_timeout=teardown_timeout,
    )
    rt.executor = Executor(rt)
    rt.validator = make_validator(
        validate,
        validate_every,
        max_snapshots,
        snapshot_policy,
        has_val_data=bool(learner._val_sets),
    )
    return rt


def initial_state(
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    device: torch.device,
    hparams: dict[str, Any],
    strategy: Strategy | None,
    trace: Trace | None,
) -> State:
    """A new learner's training state (under a strategy, the model is wrapped here)."""
    state = State()
    state.model = model
    # What training batches go through: the model, or its wrapper under a strategy.
    state.train_model = (
        model if strategy is None else strategy.wrap(model, list(optimizers.values()), device)
    )
    state.optimizer = next(iter(optimizers.values()))
    state.optimizers = optimizers
    state.loss_fn = loss_fn
    state.device = device
    state.epoch = 0
    state.step = 0
    state.batch_index = 0
    state.metrics = {}
    state.hparams = hparams
    object.__setattr__(state, "_trace", trace)
    if trace is not None:
        state.__class__ = _ObservedState
    return state
