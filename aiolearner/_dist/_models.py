"""The model wrappers: :class:`DDP` (``DistributedDataParallel``) and :class:`FSDP` (FSDP2's
``fully_shard``), each a :class:`~aiolearner.Strategy` (``_strategy.py``) that wraps the model
for training, synchronizes gradients (or not: ``no_sync``) and, for FSDP, gathers the sharded
weights where the whole model is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from .._exceptions import ConfigurationError
from ._strategy import Strategy

if TYPE_CHECKING:
    from .._learner import Learner

__all__ = ["DDP", "FSDP"]


class DDP(Strategy):
    """Data-parallel training with ``torch.nn.parallel.DistributedDataParallel``.

    Every rank holds the whole model; each trains on its shard of every batch of data and the
    gradients are averaged across ranks during ``backward()``, so all ranks apply the same
    update. Launch the script with ``torchrun``; see ``docs/distributed.md``.

    Args:
        find_unused_parameters, static_graph: passed to ``DistributedDataParallel``.
        **ddp_kwargs: anything else for ``DistributedDataParallel`` (``bucket_cap_mb``, ...).
        (the other arguments: see :class:`Strategy`)

    Example:
        >>> learner = Learner(model, opt, loss_fn, train_loader, val_loader, strategy=DDP())
        >>> learner.fit_sync(10)       # on every rank: torchrun --nproc-per-node=4 train.py
    """

    kind = "ddp"

    def __init__(
        self,
        *,
        backend: Literal["nccl", "gloo"] | None = None,
        timeout: timedelta | float | None = None,
        agree_every: int | Literal["auto"] = "auto",
        shard_data: bool = True,
        sampler_seed: int = 0,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(
            backend=backend,
            timeout=timeout,
            agree_every=agree_every,
            shard_data=shard_data,
            sampler_seed=sampler_seed,
        )
        self.ddp_kwargs = dict(
            ddp_kwargs, find_unused_parameters=find_unused_parameters, static_graph=static_graph
        )
        self.module: torch.nn.parallel.DistributedDataParallel | None = None

    def _settings(self) -> dict[str, Any]:
        # Not the devices: each rank has its own (output_device=local_rank, device_ids).
        return {
            f"DDP's {key}": value
            for key, value in self.ddp_kwargs.items()
            if key not in ("output_device", "device_ids")
        }

    def wrap(
        self,
        model: torch.nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        device: torch.device,
    ) -> torch.nn.Module:
        ids = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None
        )
        # Construction broadcasts rank 0's weights and buffers to every rank (a collective).
        self.module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, **self.ddp_kwargs
        )
        return self.module

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        module = self.module
        if module is None:
            return contextlib.nullcontext()
        return module.no_sync()

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not grads:
            return
        # On DDP's own group, in the training flow: every rank gets here at the same point.
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self._world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


class FSDP(Strategy):
    """Fully sharded data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Each rank holds a shard of every parameter, gradient and optimizer state; the parameters
    are gathered for each forward and backward. The model is sharded in place when the learner
    is made (its parameters become DTensors), and the optimizer is pointed at the sharded
    parameters. Checkpoints hold the full weights and optimizer state (gathered at save points
    by every rank, written by rank 0).

    Limits: validation runs sequentially (``validate="concurrent"`` is refused: a snapshot
    would need every weight on every rank); the weights are gathered for the validation pass
    (memory for one full copy).

    Args:
        wrap: which submodules to shard as units of their own (each gathers its weights on its
            own, for less peak memory): a callable ``module -> bool`` or a tuple of module
            types; the root is always sharded.
        reshard_after_forward: free the gathered weights after each forward (less memory, one
            more gather in the backward).
        mixed_precision: a ``torch.distributed.fsdp.MixedPrecisionPolicy``, or ``None``.
        (the other arguments: see :class:`Strategy`)
    """

    kind = "fsdp"

    def __init__(
        self,
        *,
        wrap: Any = None,
        reshard_after_forward: bool = True,
        mixed_precision: Any = None,
        backend: Literal["nccl", "gloo"] | None = None,
        timeout: timedelta | float | None = None,
        agree_every: int | Literal["auto"] = "auto",
        shard_data: bool = True,
        sampler_seed: int = 0,
    ) -> None:
        super().__init__(
            backend=backend,
            timeout=timeout,
            agree_every=agree_every,
            shard_data=shard_data,
            sampler_seed=sampler_seed,
        )
        self.wrap_policy = wrap
        self.reshard_after_forward = reshard_after_forward
        self.mixed_precision = mixed_precision
        self.module: torch.nn.Module | None = None

    def _settings(self) -> dict[str, Any]:
        return {
            "FSDP's reshard_after_forward": self.reshard_after_forward,
            "FSDP's mixed_precision": self.mixed_precision,
        }

    def _units(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        policy = self.wrap_policy
        if policy is None:
            return []
        if isinstance(policy, tuple | type):
            return [m for m in model.modules() if m is not model and isinstance(m, policy)]
        return [m for m in model.modules() if m is not model and policy(m)]

    def wrap(
        self,
        model: torch.nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        device: torch.device,
    ) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        names = {id(p): n for n, p in model.named_parameters()}
        mesh = init_device_mesh(device.type, (self._world_size,))
        options: dict[str, Any] = {
            "mesh": mesh,
            "reshard_after_forward": self.reshard_after_forward,
        }
        if self.mixed_precision is not None:
            options["mp_policy"] = self.mixed_precision
        for unit in self._units(model):
            fully_shard(unit, **options)
        fully_shard(model, **options)
        # fully_shard puts new (sharded) parameters in place: point the optimizers at them.
        new = dict(model.named_parameters())
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["params"] = [new[names[id(p)]] for p in group["params"]]
        if any(optimizer.state for optimizer in optimizers):
            raise ConfigurationError(
                "FSDP shards the model when the learner is made: create the optimizer before "
                "training starts (its state is empty until the first step)"
            )
        self.module = model
        return model

    def _attach(self, learner: Learner[Any]) -> None:
        validator = learner._rt.validator
        if validator is not None and validator.concurrent:
            raise ConfigurationError(
                "FSDP cannot validate concurrently: a concurrent validation works on a snapshot "
                "of the whole model, and under FSDP each rank holds only a shard of it (and "
                "gathering it runs collectives on the training group); use "
                "validate='sequential'"
            )
        super()._attach(learner)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return _fsdp_no_sync(self.module)

    def _sharded(self, model: torch.nn.Module) -> list[Any]:
        from torch.distributed.fsdp import FSDPModule

        if model is not self.module:
            return []
        return [m for m in model.modules() if isinstance(m, FSDPModule)]

    def _begin_validation(self, model: torch.nn.Module) -> None:
        # Gather the weights once for the pass and keep them: the ranks' shards of validation
        # data differ in length, so a gather per forward would pair up wrongly. (unshard is not
        # recursive: every sharded unit, in the same order on every rank.)
        for unit in self._sharded(model):
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()

    def _end_validation(self, model: torch.nn.Module) -> None:
        for unit in self._sharded(model):
            unit.reshard()
            unit.set_reshard_after_forward(self.reshard_after_forward, recurse=False)

    def _checksum(self) -> float | None:
        return None  # each rank holds different shards


@contextlib.contextmanager
def _fsdp_no_sync(module: Any) -> Iterator[None]:
    if module is None:
        yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
