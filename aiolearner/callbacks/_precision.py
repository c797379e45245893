"""Mixed precision: autocast for the forward pass, a gradient scaler for float16.

Autocast is thread-local and must wrap the forward pass itself, so it cannot be switched on from
a hook (hooks may run on another thread than the compute, and after it). It comes as stages:
:class:`MixedPrecision` is a callback (its scaler's state goes into checkpoints) that hands out
the ``gradient``, ``update`` and ``validate_loss`` stages to use with it.

* bfloat16 (``"bf16"``): has float32's range, needs no scaler; works on CPU and on recent GPUs.
* float16 (``"fp16"``): needs loss scaling against gradient underflow; the stages use a
  ``torch.amp.GradScaler``, which skips the optimizer step when it finds inf/NaN gradients and
  lowers the scale.

Several optimizers share the one scaler (as torch recommends: a ``GradScaler`` keeps what it
needs per optimizer): :meth:`MixedPrecision.update_stage` gives the update stage of a named
optimizer, and :meth:`MixedPrecision.backward` the scaled backward pass for stages of your own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch

from aiolearner import Callback, Gradient, Stage, State, Update, ValidateLoss, split_batch

from ._args import ArgumentTypeError, autocast_device_type, shown

__all__ = ["MixedPrecision"]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class MixedPrecision(Callback):
    """Mixed-precision training with autocast, and loss scaling for float16.

    Pass its stages to the learner and the object itself as a callback::

        amp = MixedPrecision("bf16")
        learner = Learner(..., callbacks=[amp], stages=amp.stages())

    The Gradient stage runs the forward pass and the loss under ``torch.autocast`` and the
    backward pass outside it (scaling the loss first under float16); the Update stage steps the
    optimizer through the scaler (and updates the scale); the ValidateLoss stage runs validation
    under autocast too. The stages put the scaler in the ``grad_scaler`` state field, where
    :class:`GradientClipping` finds it to unscale before clipping.

    Args:
        dtype: ``"bf16"`` or ``"fp16"`` (or the torch dtype).
        device_type: the autocast device type (default: the learner's device type, found when
            the stages first run).
        scaler: use a gradient scaler (default: for float16 only). Pass a
            ``torch.amp.GradScaler`` to configure it.
        validate: run validation under autocast as well.

    Raises:
        ValueError: an unknown dtype, or a ``device_type`` torch's autocast does not know
            (``"cpu"``, ``"cuda"``, ``"xpu"``, ``"mps"``, ...; the device need not be here).
        TypeError: a ``scaler`` that is not a bool, ``None`` or a ``torch.amp.GradScaler``.

    With several optimizers (a GAN), one ``MixedPrecision`` serves them all: write the gradient
    stages with :meth:`autocast` and :meth:`backward`, and step each optimizer with
    ``amp.update_stage("d")`` (the stage ``update_d``), which steps it through the shared scaler.

    The scaler's state is in :meth:`state_dict` (so in checkpoints). As a callback it declares
    no access: it only carries the state.

    Example:
        >>> amp = MixedPrecision("fp16")                      # on CUDA
        >>> learner = Learner(model, opt, loss_fn, train, val, device="cuda",
        ...                   callbacks=[amp, GradientClipping(1.0)], stages=amp.stages())
    """

    def __init__(
        self,
        dtype: Literal["bf16", "bfloat16", "fp16", "float16"] | torch.dtype = "bf16",
        *,
        device_type: str | None = None,
        scaler: bool | torch.amp.GradScaler | None = None,
        validate: bool = True,
    ) -> None:
        if isinstance(dtype, torch.dtype):
            if dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"MixedPrecision: dtype must be bfloat16 or float16, got {dtype}")
            self.dtype = dtype
        else:
            if dtype not in _DTYPES:
                raise ValueError(f"MixedPrecision: dtype must be 'bf16' or 'fp16', got {dtype!r}")
            self.dtype = _DTYPES[dtype]
        if device_type is not None:
            device_type = autocast_device_type("MixedPrecision", device_type)
        if scaler is not None and not isinstance(scaler, bool | torch.amp.GradScaler):
            raise ArgumentTypeError(
                "MixedPrecision: scaler must be None (for float16 only), True, False or a"
                f" torch.amp.GradScaler, got {shown(scaler)}"
            )
        self.device_type = device_type
        self.validate = validate
        self._scaler_option = scaler
        self.scaler: torch.amp.GradScaler | None = (
            scaler if isinstance(scaler, torch.amp.GradScaler) else None
        )
        self._pending: Mapping[str, Any] | None = None

    def _check_stages(self, stages: list[Stage]) -> str | None:
        """At build: the autocast and the scaler act only through stages."""
        if uses(stages, self):
            return None
        return (
            "acts through its stages only, and none of this learner's stages uses it, so "
            "training would run in full precision: pass stages=amp.stages() (or call "
            "amp.autocast()/amp.backward() in a stage of your own)"
        )

    def stages(self) -> dict[str, Stage]:
        """The stages to pass to the learner (``stages=amp.stages()``)."""
        out: dict[str, Stage] = {
            "gradient": AutocastGradient(self),
            "update": ScaledUpdate(self),
        }
        if self.validate:
            out["validate_loss"] = AutocastValidateLoss(self)
        return out

    def update_stage(self, optimizer: str | None = None, *, commit: bool = True) -> Update:
        """An update stage stepping ``optimizer`` (a name; default: the first) through the
        scaler: like ``Update(optimizer, commit=commit)``, named ``update_<optimizer>``."""
        return ScaledUpdate(self, optimizer, commit=commit)

    def backward(self, loss: torch.Tensor, state: State, **kwargs: Any) -> None:
        """The backward pass of ``loss`` for a gradient stage of your own: on the scaled loss
        when there is a scaler, which it also puts in ``state.grad_scaler`` (where
        :class:`GradientClipping` finds it). ``kwargs`` go to ``backward`` (``inputs=...``)."""
        _, scaler = self.resolve(state.device)
        state.grad_scaler = scaler
        if scaler is not None:
            scaler.scale(loss).backward(**kwargs)  # type: ignore[no-untyped-call]
        else:
            loss.backward(**kwargs)  # type: ignore[no-untyped-call]

    def resolve(self, device: torch.device) -> tuple[str, torch.amp.GradScaler | None]:
        """The autocast device type and the scaler (built on first use) for ``device``."""
        if self.device_type is None:
            self.device_type = device.type
        if self.scaler is None:
            wanted = self._scaler_option
            if wanted is None:
                wanted = self.dtype == torch.float16
            if wanted:
                self.scaler = torch.amp.GradScaler(self.device_type)
                if self._pending is not None:
                    self.scaler.load_state_dict(dict(self._pending))
                    self._pending = None
        return self.device_type, self.scaler

    def autocast(self, device: torch.device) -> torch.autocast:
        """The autocast context for ``device``."""
        device_type, _ = self.resolve(device)
        return torch.autocast(device_type, dtype=self.dtype)

    def state_dict(self) -> Mapping[str, Any]:
        if self.scaler is not None:
            return {"scaler": self.scaler.state_dict()}
        return {"scaler": self._pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("scaler")
        if not saved:
            return
        if self.scaler is not None:
            self.scaler.load_state_dict(dict(saved))
        else:
            self._pending = saved


def uses(stages: list[Stage], helper: object) -> bool:
    """Whether a stage of ``stages`` may act for ``helper`` (a callback whose work is done by
    stages): one holds it, or one is of the user's own, which may call it from its code."""
    return any(
        any(value is helper for value in vars(stage).values())
        or type(stage).__module__.partition(".")[0] != "aiolearner"
        for stage in stages
    )


class AutocastGradient(Gradient):
    """Forward and loss under autocast; backward outside it, on the scaled loss if scaling."""

    fields: ClassVar[dict[str, str]] = {
        "output": "batch",
        "loss": "batch",
        "grad_scaler": "batch",
    }

    def __init__(self, precision: MixedPrecision) -> None:
        super().__init__()
        self.precision = precision

    def compute(self, state: State) -> None:
        inputs, targets = split_batch(state.batch, self.name)
        precision = self.precision
        with precision.autocast(state.device):
            output = state.train_model(inputs)  # DDP's wrapper under a strategy
            loss = state.loss_fn(output, targets)
        scaler = precision.scaler
        state.grad_scaler = scaler
        if scaler is not None:
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        else:
            loss.backward()  # type: ignore[no-untyped-call]
        state.output = output
        state.loss = loss


class ScaledUpdate(Update):
    """The optimizer step through the gradient scaler (when there is one), then the commit.

    ``optimizer`` and ``commit`` as for :class:`~aiolearner.Update`.
    """

    # Set by the gradient stage; declared here too, for gradient stages of users' own that
    # call MixedPrecision.backward.
    fields: ClassVar[dict[str, str]] = {"grad_scaler": "batch"}

    def __init__(
        self, precision: MixedPrecision, optimizer: str | None = None, *, commit: bool = True
    ) -> None:
        super().__init__(optimizer, commit=commit)
        self.precision = precision

    def compute(self, state: State) -> None:
        name = self.optimizer
        optimizer = state.optimizer if name is None else state.optimizers[name]
        _, scaler = self.precision.resolve(state.device)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.commit:
            self.context.commit(state)


class AutocastValidateLoss(ValidateLoss):
    """Validation forward and loss under ``inference_mode`` and autocast."""

    inference_mode = False  # (entered by compute itself, with autocast)

    def __init__(self, precision: MixedPrecision) -> None:
        super().__init__()
        self.precision = precision

    def compute(self, state: State) -> None:
        inputs, targets = split_batch(state.batch, self.name)
        with torch.inference_mode(), self.precision.autocast(state.device):
            output = state.model(inputs)
            loss = state.loss_fn(output, targets)
        state.output = output
        state.loss = loss
