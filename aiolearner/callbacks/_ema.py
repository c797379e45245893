"""An exponential moving average (EMA) of the weights, and validation of the averaged model.

The average is a copy of the model, updated after every optimizer step:
``ema = decay * ema + (1 - decay) * weights``, by torch's own EMA update
(``torch.optim.swa_utils.get_ema_multi_avg_fn``, one fused ``lerp`` over all floating-point
parameters). Validation can run on it instead of the model, or on both, through the stages
:meth:`EMA.stages` hands out.

Why not ``AveragedModel.update_parameters``: it keeps its update count in a CPU tensor that it
moves to the parameters' device on every update (on CUDA, a synchronizing copy per step), and its
first update copies the weights instead of averaging them. The update function it would call is
used here directly, so the arithmetic is the same.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from aiolearner import (
    ConfigurationError,
    Stage,
    State,
    StateView,
    ValidateBatch,
    ValidateLoss,
    split_batch,
)

from ._args import real, whole
from ._metrics import Metrics
from ._per_optimizer import OptimizerCallback
from ._precision import uses

__all__ = ["EMA"]


class EMA(OptimizerCallback):
    """Keeps an exponential moving average of the model's weights.

    The copy is made when training starts, under the read side of the weights lock, and updated
    in ``after_update`` (a ``def`` hook, so the batch stays fused). That hook runs in the batch's
    own flow, right after the Update stage, while nothing else can change the weights; in a
    fused batch it even runs under the write lock. Buffers (batch-norm statistics) are copied,
    not averaged.

    Validation of the average, through stages::

        ema = EMA(0.999, metrics=["accuracy"])
        Learner(..., callbacks=[ema], stages=ema.stages())              # both models
        Learner(..., callbacks=[ema], stages=ema.stages(validate="ema"))  # the average only

    * ``validate="both"`` (default): validation runs the model as usual and the average on the
      same batches; the callback adds ``state.validation["ema_loss"]`` (and ``ema_<metric>`` for
      each of ``metrics``) and ``state.metrics["val_ema_loss"]`` (``val_ema_<metric>``).
    * ``validate="ema"``: validation runs on the average alone, so ``val_loss`` and every
      validation metric (and early stopping, best checkpoints) follow the averaged model.

    With ``Learner(validate="concurrent")`` the pass validates a copy of the average taken when
    the pass starts (training goes on updating the average meanwhile), which may be a few steps
    newer than the model's snapshot.

    Args:
        decay: the weight of the old average per update (0.999 averages over ~1000 steps).
        every_n_steps: update the average every this many optimizer steps (under
            ``AccumulateGradients``, updates of the weights, not micro-batches).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average
            does not remember the random initial weights for long.
        metrics: metrics for the average in ``validate="both"`` mode, given as to
            :class:`Metrics` (names of built-ins, functions, torchmetrics metrics).
        optimizer: for a learner with several optimizers, the name of the one whose update
            completes a step (the last ``Update`` of the batch): the average follows its
            ``after_update_<name>`` hook and is named ``EMA[<name>]`` (default: the first
            optimizer's ``Update()``).

    Raises:
        ValueError: ``decay`` not a number in ``[0, 1)`` or ``every_n_steps`` not an int of at
            least 1 (one of the wrong type raises a ``TypeError`` that is also a ``ValueError``).

    The average is in :meth:`state_dict`, so in checkpoints. Reads ``model``,
    ``batch``, ``ema_output`` and ``ema_loss``; writes its own keys of ``metrics`` and
    ``validation`` (``val_ema_loss``, ``ema_loss``, ...), so it needs no order with
    :class:`Metrics`.

    Example:
        >>> ema = EMA(0.999)
        >>> learner = Learner(..., callbacks=[ema], stages=ema.stages())
        >>> await learner.fit(10)
        >>> learner.state.metrics["val_ema_loss"], ema.model    # the averaged nn.Module
    """

    reads = frozenset({"model", "batch", "ema_output", "ema_loss", "validation_set", "phase"})
    writes = frozenset({"metrics", "validation"})  # per instance: the keys it writes

    def __init__(
        self,
        decay: float = 0.999,
        *,
        every_n_steps: int = 1,
        warmup: bool = False,
        metrics: Mapping[str, Any] | list[str] | tuple[str, ...] = (),
        optimizer: str | None = None,
    ) -> None:
        self._target(optimizer)
        hint = "0.999 averages over about 1000 updates"
        self.decay = real(self.name, "decay", decay, low=0, high=1, high_open=True, hint=hint)
        self.every_n_steps = whole(self.name, "every_n_steps", every_n_steps, 1)
        self.warmup = warmup
        specs = dict(metrics) if isinstance(metrics, Mapping) else {m: m for m in metrics}
        spec = specs.get("loss", "loss")
        if not (isinstance(spec, str) and spec == "loss"):
            raise ValueError(
                f"{self.name}: a metric named 'loss' that is not the loss would take the place "
                "of the average's own loss (ema_loss, val_ema_loss): give it a name of its own"
            )
        self._metric_names = tuple(specs)
        # The average's validation results, kept by a Metrics of its own that reads the EMA
        # stages' fields and writes ema_<name> / val_ema_<name>; its hooks are called from ours.
        self._metrics = Metrics(
            {"loss": "loss", **specs},
            train=False,
            output_field="ema_output",
            loss_field="ema_loss",
            prefix="ema_",
        )
        # Its hooks write through our views: we declare the keys it writes.
        self.__dict__["writes"] = self._metrics.writes
        self._avg_fn: tuple[float, Any] | None = None
        #: The averaged model (``None`` until training starts or a checkpoint is loaded).
        self.model: torch.nn.Module | None = None
        #: How many times the average was updated.
        self.updates = 0
        #: How many optimizer steps it has seen (``every_n_steps`` counts these).
        self.steps = 0
        self._pending: Mapping[str, Any] | None = None
        # Guards the average against being read (copied for a concurrent validation, saved)
        # while after_update changes it, possibly on another thread (uncontended, it is cheap).
        self._lock = threading.Lock()
        self._live: torch.nn.Module | None = None
        self._validated: torch.nn.Module | None = None
        # Whether a learner ran this callback's before_validate: its stages without it would
        # validate a copy of the first weights that no update ever reaches.
        self._registered = False

    def _check_stages(self, stages: list[Stage]) -> str | None:
        """At build: metrics of the average are computed by its validation stages."""
        if not self._metric_names or uses(stages, self):
            return None
        return (
            "was given metrics=..., which the average's validation stages compute, and none of "
            "this learner's stages validates the average: pass stages=ema.stages() (or "
            "leave out metrics= to keep the average alone)"
        )

    def stages(self, validate: Literal["both", "ema"] = "both") -> dict[str, Stage]:
        """Validation stages for the average (pass them as ``Learner(stages=...)``)."""
        if validate == "both":
            return {"validate_batch": _BothValidateBatch(_BothValidateLoss(self))}
        if validate == "ema":
            return {"validate_loss": EMAValidateLoss(self)}
        raise ValueError(f"validate must be 'both' or 'ema', got {validate!r}")

    def ensure(self, model: torch.nn.Module) -> torch.nn.Module:
        """The averaged model, made as a copy of ``model`` on first use (hold a weights lock)."""
        if self.model is None:
            ema = copy.deepcopy(model)
            ema.requires_grad_(False)
            ema.eval()
            if self._pending is not None:
                ema.load_state_dict(dict(self._pending))
                self._pending = None
            self.model = ema
        return self.model

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    async def before_fit_run(self, state: StateView) -> None:
        """Make the copy (under the read side of the weights lock)."""
        self._live = state.model
        if self.model is None:
            async with state.weights_lock.read():
                self.ensure(state.model)

    def after_update(self, state: StateView) -> None:
        """Move the average towards the new weights (every ``every_n_steps`` updates)."""
        self.steps += 1
        if self.steps % self.every_n_steps != 0:
            return
        ema = self.ensure(state.model)
        decay = self.current_decay()
        if self._avg_fn is None or self._avg_fn[0] != decay:
            self._avg_fn = (decay, get_ema_multi_avg_fn(decay))  # type: ignore[no-untyped-call]
        update = self._avg_fn[1]
        with self._lock, torch.no_grad():
            averaged: list[torch.Tensor] = []
            current: list[torch.Tensor] = []
            for e, p in zip(ema.parameters(), state.model.parameters(), strict=True):
                if e.dtype.is_floating_point:
                    averaged.append(e)
                    current.append(p.detach())
                else:
                    e.copy_(p)
            if averaged:
                update(averaged, current, None)  # lerp_(current, 1 - decay), fused
            for eb, b in zip(ema.buffers(), state.model.buffers(), strict=True):
                eb.copy_(b)
        self.updates += 1

    # -- validation of the average in "both" mode ----------------------------------------------

    def for_validation(self, model: torch.nn.Module) -> torch.nn.Module:
        """The averaged model a validation pass of ``model`` should use (stage API)."""
        if not self._registered:
            raise ConfigurationError(
                "EMA.stages() are in the learner's stages but the EMA callback is not in its "
                "callbacks: nothing would update the average (the validation would use a copy "
                "of the starting weights); pass the same EMA to Learner(callbacks=[ema, ...])"
            )
        validated = self._validated
        return validated if validated is not None else self.ensure(model)

    def before_validate(self, state: StateView) -> None:
        """Pick the average to validate; start its validation results.

        A sequential validation uses the average itself: training waits. A concurrent
        validation (its ``model`` is a snapshot, not the trained model) gets a copy taken now,
        so training can go on updating the average; the copy is of the average at the start of
        the pass, which may be some steps after the model's snapshot was taken.
        """
        self._registered = True
        live = self._live
        if self.model is not None and live is not None and state.model is not live:
            with self._lock:
                self._validated = copy.deepcopy(self.model)
        else:
            self._validated = None
        self._metrics.before_validate(state)

    def after_validate_loss(self, state: StateView) -> None:
        """Accumulate the average's loss and metrics for the batch (device ops only)."""
        if state.is_valid("ema_output"):  # not in validate="ema" mode
            self._metrics.after_validate_loss(state)

    def after_validate(self, state: StateView) -> None:
        """Report the average's validation results (``ema_loss``, ``ema_<metric>``)."""
        self._validated = None
        self._metrics.after_validate(state)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> Mapping[str, Any]:
        if self.model is None:
            return {"model": self._pending, "updates": self.updates, "steps": self.steps}
        # A copy: a checkpoint may be written out while training goes on updating the average.
        with self._lock:
            weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return {"model": weights, "updates": self.updates, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        # (A checkpoint of before the count: exact for every_n_steps=1, the default.)
        self.steps = int(state.get("steps", self.updates * self.every_n_steps))
        weights = state.get("model")
        if weights is None:
            return
        if self.model is not None:
            self.model.load_state_dict(dict(weights))
        else:
            self._pending = weights


def _ema_forward(ema: EMA, state: State, stage: str) -> tuple[Any, torch.Tensor]:
    """Output and loss of the averaged model on the current batch, under inference mode."""
    inputs, targets = split_batch(state.batch, stage)
    model = ema.for_validation(state.model)
    with torch.inference_mode():
        output = model(inputs)
        return output, state.loss_fn(output, targets)


class EMAValidateLoss(ValidateLoss):
    """Validation forward and loss on the averaged model instead of the model."""

    # (The average is made on first use, outside inference mode: training updates it.)
    inference_mode = False

    def __init__(self, ema: EMA) -> None:
        super().__init__()
        self.ema = ema

    def compute(self, state: State) -> None:
        state.output, state.loss = _ema_forward(self.ema, state, self.name)


class _BothValidateLoss(ValidateLoss):
    """Validation on the model (``output``, ``loss``) and on the average (``ema_*``)."""

    # (The average is made on first use, outside inference mode: training updates it.)
    inference_mode = False

    fields: ClassVar[dict[str, str]] = {
        "output": "batch",
        "loss": "batch",
        "ema_output": "batch",
        "ema_loss": "batch",
    }

    def __init__(self, ema: EMA) -> None:
        super().__init__()
        self.ema = ema

    def compute(self, state: State) -> None:
        super().compute(state)
        state.ema_output, state.ema_loss = _ema_forward(self.ema, state, self.name)


class _BothValidateBatch(ValidateBatch):
    """A validation batch that also clears the ``ema_*`` fields when it ends."""

    async def __call__(self, state: State) -> None:
        try:
            await super().__call__(state)
        finally:
            state.invalidate("ema_output", "ema_loss")
