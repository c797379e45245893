"""Stochastic weight averaging (SWA) on ``torch.optim.swa_utils``.

The average is an ``AveragedModel`` of the model, updated with the equal-weight running mean
(``torch.optim.swa_utils``' default) at the end of every ``every_n_epochs``-th epoch from
``start_epoch`` on. Optionally ``SWALR`` anneals the learning rate to ``swa_lr`` from
``start_epoch``. When training ends, ``update_bn`` recomputes the batch-norm statistics of the
averaged weights with a pass over the training data: statistics averaged over epochs do not
belong to averaged weights.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import anyio
import torch
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from aiolearner import Callback, StateView

from ._args import ArgumentTypeError, optional_real, real, shown, whole

__all__ = ["SWA"]

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

# The public batch-norm classes (what update_bn resets); their lazy forms become them once built.
_BATCH_NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.LazyBatchNorm1d,
    torch.nn.LazyBatchNorm2d,
    torch.nn.LazyBatchNorm3d,
)


def has_batch_norm(model: torch.nn.Module) -> bool:
    """Whether ``model`` has batch-norm layers (whose statistics SWA must recompute)."""
    return any(isinstance(m, _BATCH_NORMS) for m in model.modules())


class SWA(Callback):
    """Stochastic weight averaging: the mean of the weights at the end of later epochs.

    From epoch ``start_epoch`` (0-based) on, at the end of every ``every_n_epochs``-th epoch the
    weights are added to an equal-weight running mean (``torch.optim.swa_utils.AveragedModel``;
    buffers are copied from the model, not averaged). With ``swa_lr``, ``SWALR`` anneals the
    learning rate of every parameter group of the first optimizer (``state.optimizer``; for
    another one, add an ``LRSchedule(..., optimizer=name)``) to ``swa_lr`` over
    ``anneal_epochs`` epochs from
    the start of epoch ``start_epoch`` (stepped once per epoch; do not combine it with another
    learning-rate schedule in those epochs). When ``fit`` ends (completed or stopped, not after
    an error or a cancellation), ``torch.optim.swa_utils.update_bn`` recomputes the batch-norm
    statistics of the average with one pass over ``bn_data``, in a worker thread, with the
    global random generators put back afterwards (so a later ``fit`` continues as if it had
    not run).

    Args:
        start_epoch: the first epoch whose end is averaged.
        every_n_epochs: average every this many epochs from ``start_epoch``.
        swa_lr: anneal the learning rate to this value, or to one value per parameter group (a
            list; ``None``: leave it alone).
        anneal_epochs: over how many epochs to anneal.
        anneal_strategy: ``"cos"`` or ``"linear"``.
        bn_data: batches for the batch-norm update (usually the training data: an iterable of
            ``(inputs, targets)`` or of inputs, on any device: they are moved to the model's).
            Needed when the model has batch-norm layers.
        update_bn: recompute batch-norm statistics at the end of ``fit``.

    Raises:
        ValueError: bad arguments (counts that are not ints, a ``swa_lr`` that is not a
            positive number: one of the wrong type raises a ``TypeError`` that is also a
            ``ValueError``); when training starts, a model with batch-norm layers and
            ``update_bn`` but no ``bn_data``.

    The average, its count and the scheduler are in :meth:`state_dict`, so a run resumed from a
    checkpoint ends with the same average, to the bit. Reads ``model``, ``optimizer``,
    ``epoch`` and ``outcome``; writes nothing.

    Example:
        >>> swa = SWA(start_epoch=15, swa_lr=0.05, bn_data=train_loader)
        >>> learner = Learner(model, opt, loss_fn, train_loader, callbacks=[swa])
        >>> await learner.fit(20)
        >>> swa.model          # the averaged nn.Module, batch-norm statistics recomputed
    """

    reads = frozenset({"model", "optimizer", "epoch", "outcome"})

    def __init__(
        self,
        start_epoch: int,
        *,
        every_n_epochs: int = 1,
        swa_lr: float | list[float] | None = None,
        anneal_epochs: int = 5,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        bn_data: Iterable[Any] | None = None,
        update_bn: bool = True,
    ) -> None:
        self.start_epoch = whole("SWA", "start_epoch", start_epoch, 0, hint="0 is the first")
        self.every_n_epochs = whole("SWA", "every_n_epochs", every_n_epochs, 1)
        # One rate, or one per parameter group (as torch's SWALR takes them).
        self.swa_lr: float | list[float] | None = (
            [real("SWA", f"swa_lr[{i}]", lr, low=0, low_open=True) for i, lr in enumerate(swa_lr)]
            if isinstance(swa_lr, list | tuple)
            else optional_real("SWA", "swa_lr", swa_lr, low=0, low_open=True)
        )
        self.anneal_epochs = whole("SWA", "anneal_epochs", anneal_epochs, 1)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"SWA: anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}"
            )
        if bn_data is not None and not isinstance(bn_data, Iterable):
            raise ArgumentTypeError(
                f"SWA: bn_data must be batches to iterate over (the training data), got"
                f" {shown(bn_data)}"
            )
        self.anneal_strategy = anneal_strategy
        self.bn_data = bn_data
        self.update_bn = update_bn
        #: The ``AveragedModel`` (``None`` until training starts).
        self.averaged: AveragedModel | None = None
        #: The ``SWALR`` scheduler (``None`` without ``swa_lr`` or before ``start_epoch``).
        self.scheduler: SWALR | None = None
        self._pending: Mapping[str, Any] | None = None
        self._bn_done_at = -1  # the count of averages the batch-norm statistics belong to

    @property
    def model(self) -> torch.nn.Module | None:
        """The averaged model (``None`` until training starts)."""
        return None if self.averaged is None else self.averaged.module

    @property
    def n_averaged(self) -> int:
        """How many snapshots of the weights are in the average."""
        return 0 if self.averaged is None else int(self.averaged.n_averaged)

    def _swa_epoch(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.every_n_epochs == 0

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> SWALR:
        assert self.swa_lr is not None
        # SWALR sets the learning rates of its first step when it is made; a scheduler made to
        # be restored must not change them (they come from the checkpoint's optimizer).
        return SWALR(
            optimizer,
            swa_lr=self.swa_lr,  # type: ignore[arg-type]  # (torch takes a list too)
            anneal_epochs=self.anneal_epochs,
            anneal_strategy=self.anneal_strategy,
        )

    # -- hooks ---------------------------------------------------------------------------------

    async def before_fit_run(self, state: StateView) -> None:
        """Make the average (a copy of the model, under the read side of the weights lock)."""
        model = state.model
        if self.update_bn and self.bn_data is None and has_batch_norm(model):
            raise ValueError(
                "SWA: the model has batch-norm layers, whose statistics must be recomputed for"
                " the averaged weights: pass bn_data=<the training data>, or update_bn=False"
            )
        if self.averaged is None:
            async with state.weights_lock.read():
                averaged = AveragedModel(model, use_buffers=False)
            averaged.requires_grad_(False)
            pending, self._pending = self._pending, None
            if pending is not None:
                averaged.load_state_dict(dict(pending["averaged"]))
                self._bn_done_at = int(pending.get("bn_done_at", -1))
                scheduler = pending.get("scheduler")
                if scheduler is not None:
                    self._restore_scheduler(state.optimizer, scheduler)
            self.averaged = averaged

    def _restore_scheduler(
        self, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
    ) -> None:
        lrs = [group["lr"] for group in optimizer.param_groups]
        self.scheduler = self._make_scheduler(optimizer)
        self.scheduler.load_state_dict(dict(saved))
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def before_epoch(self, state: StateView) -> None:
        """From ``start_epoch`` on, anneal the learning rate (when ``swa_lr`` is given)."""
        if self.swa_lr is not None and self.scheduler is None and state.epoch >= self.start_epoch:
            self.scheduler = self._make_scheduler(state.optimizer)

    def after_fit(self, state: StateView) -> None:
        """Step the annealing when the epoch's training pass ends (in the training loop's
        order, also when after_epoch runs concurrently with the next epoch)."""
        if state.epoch >= self.start_epoch and self.scheduler is not None:
            self.scheduler.step()

    def after_epoch(self, state: StateView) -> None:
        """Add the epoch's weights to the average (with concurrent validation, the snapshot of
        the epoch's end)."""
        epoch = state.epoch
        if self._swa_epoch(epoch):
            assert self.averaged is not None
            self.averaged.update_parameters(state.model)

    async def after_fit_run(self, state: StateView) -> None:
        """Recompute the average's batch-norm statistics (after a completed or stopped run)."""
        outcome = state.outcome if state.is_valid("outcome") else "completed"
        if not self.update_bn or outcome not in ("completed", "stopped"):
            return
        if self.n_averaged == 0 or self._bn_done_at == self.n_averaged:
            return
        await anyio.to_thread.run_sync(self.recompute_bn)

    def recompute_bn(self) -> None:
        """Recompute the batch-norm statistics of the average now (blocking: one data pass).

        The global random generators (torch's, numpy's, Python's), which a shuffling loader
        draws from, are put back afterwards.
        """
        averaged, data = self.averaged, self.bn_data
        if averaged is None or data is None:
            return
        py_state = random.getstate()
        np_state = _np.random.get_state() if _np is not None else None
        device = next(iter(averaged.module.parameters()), torch.empty(0)).device
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                update_bn(data, averaged.module, device=device)
        finally:
            random.setstate(py_state)
            if _np is not None and np_state is not None:
                _np.random.set_state(np_state)
        self._bn_done_at = self.n_averaged

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> Mapping[str, Any]:
        if self.averaged is None:
            return {} if self._pending is None else dict(self._pending)
        return {
            "averaged": {k: v.detach().clone() for k, v in self.averaged.state_dict().items()},
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "bn_done_at": self._bn_done_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "averaged" not in state:
            return
        self.averaged = None
        self.scheduler = None
        self._pending = state
