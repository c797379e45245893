"""Distributed strategies: ``Learner(..., strategy=DDP())`` (or ``FSDP()``), on torch.distributed.

A strategy does, once, when the learner is made (every rank makes it):

* **the process group**: reused when one is initialized, otherwise created from torchrun's
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL
  on CUDA, gloo on CPU. It is destroyed only if the strategy created it (:meth:`Strategy.close`,
  or when the interpreter exits), and never after a failure (a collective could hang there).
  Two small gloo groups of its own carry the control traffic, the *lanes* (``_group.py``): the
  training lane (the control word, end-of-pass reductions, checkpoint gathers) and the
  validation lane (the reductions of a concurrent validation, whose order is its own).
* **the data**: the training loader gets a ``DistributedSampler`` that follows the learner's
  epochs, validation a shard without padding (``_data.py``);
* **the model**: wrapped for training (``state.train_model``: DDP's wrapper, or the FSDP module;
  ``_models.py``), while ``state.model`` stays the module (checkpoint keys, snapshots, EMA
  copies);
* **the plans**: every hook plan learns where its control flow is agreed (``_agree.py``).

While ``fit`` runs, the run is shielded: an outside cancellation of one rank becomes a request
that all ranks agree on (at most one agreement interval later, bounded by the group's timeout),
so no rank leaves a collective the others entered. A failure ends every rank with a clear
error: the failed rank reports it in the store, the others raise :class:`DistributedError`
quoting it, and no collective runs after it (``_run.py``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import anyio
import torch
import torch.distributed as dist

from .._exceptions import CollectiveError, ConfigurationError, DistributedError, StopEpoch
from .._runtime import on_snapshot
from ._agree import AgreedBatches, Agreement, DistributedPlan
from ._comm import CONCURRENT, FailureReports, guard, wait_work
from ._data import EpochSampler, shard_train, shard_val
from ._group import connect
from ._run import distributed_error, run_fit
from ._settings import Parts, compare_settings

if TYPE_CHECKING:
    from .._learner import Learner
    from .._stage import Stage
    from .._state import State

__all__ = ["Strategy", "mark_concurrent"]

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


def _seconds(timeout: timedelta | float | None) -> timedelta | None:
    if timeout is None or isinstance(timeout, timedelta):
        return timeout
    return timedelta(seconds=float(timeout))


class Strategy:
    """Base class of the distributed strategies (:class:`DDP`, :class:`FSDP`).

    After the learner is made, a strategy tells where this process stands (:attr:`rank`,
    :attr:`world_size`, :attr:`is_main`, ...) and offers *collectives* for callbacks that
    need one (``state.strategy`` in a hook): :meth:`all_reduce`, :meth:`broadcast_object`,
    :meth:`gather_object`, :meth:`all_gather_object`, :meth:`barrier`. Every rank must issue
    the same collectives in the same order, so a callback calling them declares
    ``collectives = True`` (its hooks then run alone, in plan order, on every rank); one called
    from concurrent callbacks or a background task raises :class:`~aiolearner.CollectiveError`
    naming the callback. They block the calling thread until every rank has joined.

    Args:
        backend: ``"nccl"`` or ``"gloo"`` for a process group the strategy creates (default:
            NCCL when CUDA is available, gloo otherwise). Ignored when a group exists.
        timeout: how long a collective may wait for the other ranks before failing, for the
            groups the strategy creates (seconds or a ``timedelta``; default: torch's, 10
            minutes for NCCL, 30 for gloo). A rank that fails while its process lives on is
            noticed by the others at the latest after this.
        agree_every: committed steps between two agreements of the control word inside a
            training pass (an ``int``), or ``"auto"`` (keep agreements under 0.5 % of the
            training time, a stop landing at most 50 ms of training later).
        shard_data: shard ``train_data`` and ``val_data`` across ranks (``True``), or use them
            as given because each rank already has its own shard (``False``).
        sampler_seed: the seed of the training data's shuffle (with the epoch), shared by all
            ranks, as ``DistributedSampler``'s ``seed``.
    """

    kind: ClassVar[str] = "strategy"

    def __init__(
        self,
        *,
        backend: Literal["nccl", "gloo"] | None = None,
        timeout: timedelta | float | None = None,
        agree_every: int | Literal["auto"] = "auto",
        shard_data: bool = True,
        sampler_seed: int = 0,
    ) -> None:
        if agree_every != "auto" and (
            isinstance(agree_every, bool) or not isinstance(agree_every, int) or agree_every < 1
        ):
            raise ValueError(
                f"agree_every must be 'auto' or an int of at least 1, got {agree_every!r}"
            )
        if backend not in (None, "nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
        self.backend = backend
        self.timeout = _seconds(timeout)
        self.agree_every = agree_every
        self.shard_data = shard_data
        self.sampler_seed = sampler_seed
        #: Whether this strategy created the default process group (and so may destroy it).
        self.created_group = False
        self._rank = 0
        self._world_size = 1
        self._local_rank = 0
        self._local_world_size = 1
        self._backend_in_use = ""
        self._connected = False
        self.train_group: Any = None
        self.val_group: Any = None
        self._learner: weakref.ReferenceType[Learner[Any]] | None = None
        self._agreement: Agreement | None = None
        self._sampler: EpochSampler | None = None
        self._failed = False
        self._closed = False
        self._reports: FailureReports | None = None
        self._prefix = ""
        self._runs = 0
        self._shield: anyio.CancelScope | None = None
        #: With a stream that outlives epochs: the sampler epoch a loaded checkpoint's stream
        #: was drawn for (its iterator is rebuilt with it), else ``None``.
        self._pinned_epoch: int | None = None
        # The tensors of the last async collectives, still referenced from Python: gloo's
        # worker thread drops its reference to a collective's tensors a moment after the
        # collective completes, and were it the last one, that thread would free the Python
        # tensor object, taking the GIL, which at interpreter exit aborts the process
        # ("terminate called without an active exception"). Kept here, they are freed by
        # Python; each lane waits for its collective before it issues the next.
        self._held: deque[torch.Tensor] = deque(maxlen=8)
        #: Collectives this rank stopped waiting for because another rank reported a failure:
        #: pending in gloo's worker threads until that rank's connections close (the exit
        #: waits for them, see ``_group._close_at_exit``).
        self._abandoned: list[Any] = []
        #: Sums callbacks hand to the passes' own reductions: kind -> {read: write}.
        self._with_pass: dict[str, dict[Any, Any]] = {"fit": {}, "validate": {}}

    # -- where this process stands -----------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's rank in the group (0 before the learner is made)."""
        return self._rank

    @property
    def world_size(self) -> int:
        """How many ranks train together."""
        return self._world_size

    @property
    def local_rank(self) -> int:
        """This process's rank on its machine (torchrun's ``LOCAL_RANK``)."""
        return self._local_rank

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes files and logs)."""
        return self._rank == 0

    @property
    def failed(self) -> bool:
        """Whether distributed training failed in this process (no collective runs after)."""
        return self._failed

    def __repr__(self) -> str:
        if not self._connected:
            return f"<{type(self).__name__} (not connected)>"
        return (
            f"<{type(self).__name__} rank {self._rank} of {self._world_size}, "
            f"backend {self._backend_in_use}>"
        )

    # -- set-up (Learner.__init__) -----------------------------------------------------------------

    def _connect(
        self,
        device: torch.device | str | None,
        model: torch.nn.Module,
        optimizers: Mapping[str, torch.optim.Optimizer],
        parts: Parts = (None, None, None),
    ) -> torch.device | str | None:
        """Join (or create) the process group and make the lanes (``_group.py``); check that
        every rank makes its learner alike (``_settings.py``; ``parts``: the learner's
        callbacks, stages and training data); the device to train on."""
        device = connect(self, device)
        compare_settings(self, model, optimizers, parts)
        return device

    def _settings(self) -> dict[str, Any]:
        """This strategy's own options that must be the same on every rank (name: value)."""
        return {}

    def _shard(self, train_data: Any, val_data: Any) -> tuple[Any, Any]:
        """The data of this rank (see ``_data.py``)."""
        if not self.shard_data:
            return train_data, val_data
        if self._world_size == 1 and type(train_data) is not torch.utils.data.DataLoader:
            return train_data, val_data  # one rank: nothing to split
        train, sampler = shard_train(
            train_data,
            rank=self._rank,
            world_size=self._world_size,
            seed=self.sampler_seed,
            epoch_of=self._sampler_epoch,
        )
        self._sampler = sampler
        val = (
            None
            if val_data is None
            else shard_val(val_data, rank=self._rank, world_size=self._world_size)
        )
        return train, val

    def _sampler_epoch(self) -> int:
        pinned, self._pinned_epoch = self._pinned_epoch, None
        if pinned is not None:
            return pinned
        learner = self._learner() if self._learner is not None else None
        return 0 if learner is None else int(learner._state.epoch)

    def wrap(
        self,
        model: torch.nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        device: torch.device,
    ) -> torch.nn.Module:
        """The module training batches go through (``state.train_model``); ``optimizers``: the
        learner's (a strategy that replaces parameters points them at the new ones)."""
        raise NotImplementedError

    def _attach(self, learner: Learner[Any]) -> None:
        """Bind to the learner being made: check what cannot work, count updates."""
        self._learner = weakref.ref(learner)
        learner._rt.strategy = self
        validator = learner._rt.validator
        if validator is not None:
            if validator.seconds is not None:
                raise ConfigurationError(
                    "validate_every as a duration is not supported under a distributed "
                    "strategy: each rank's clock would call for validation at a different step; "
                    "validate every N steps or every epoch"
                )
            if validator.concurrent and validator.policy == "skip":
                raise ConfigurationError(
                    "snapshot_policy='skip' is not supported under a distributed strategy: "
                    "whether a snapshot is skipped depends on each rank's timing, and the "
                    "validation passes' reductions would pair up wrongly; use 'wait'"
                )
        every = None if self.agree_every == "auto" else int(self.agree_every)
        self._agreement = Agreement(self, learner._state, every)
        learner.optimizer.register_step_post_hook(self._agreement.count_update)

    def _adapt(self, learner: Learner[Any]) -> None:
        """Tell every hook plan where its control flow is agreed (end of every build)."""
        from .._stages import Fit, FitRun, Validate

        agreement = self._agreement
        assert agreement is not None
        validator = learner._rt.validator
        concurrent = validator is not None and validator.concurrent
        modes: dict[int, str] = {}

        def mark(stage: Stage, mode: str) -> None:
            for s in stage.walk():
                modes.setdefault(id(s), mode)

        root = learner._root
        for stage in root.walk():
            if isinstance(stage, Fit):
                mark(stage.fit_batch, "train")
            elif isinstance(stage, Validate):
                mark(stage.validate_batch, "val")
                if concurrent:
                    modes.setdefault(id(stage), "val")
        hooks = sorted({h for s in root.walk() for h in s.hook_names})
        agreement.points = {hook: 100 + i for i, hook in enumerate(hooks)}
        for stage in root.walk():
            mode = modes.get(id(stage), "agree")
            for plan in (stage._before, stage._after):
                if plan is None:
                    continue
                if isinstance(stage, FitRun) and plan is stage._after:
                    continue  # the teardown: its control flow is ignored anyway
                plan.__class__ = DistributedPlan
                assert isinstance(plan, DistributedPlan)
                plan.mode = mode
                plan.agreement = agreement
                plan.point = agreement.points[plan.hook]

    def _agreed_batches(self, batches: Any, state: State) -> AgreedBatches:
        """A training pass's batches with the agreement points between them."""
        agreement = self._agreement
        assert agreement is not None
        learner = self._learner() if self._learner is not None else None
        fit = None if learner is None else learner._stages.get("fit")

        def stop_pass(flow: StopEpoch) -> None:
            if fit is not None:
                fit.acted(state, flow)  # as Fit does for a batch's StopEpoch: the reason, an event
            else:
                state.stop_reason = flow.reason

        return AgreedBatches(batches, agreement, state, stop_pass)

    # -- collectives -------------------------------------------------------------------------------

    def _lane(self) -> Any:
        # A concurrent validation's reductions go on a lane of their own: their order is that
        # of the snapshots, which is the same on every rank, but unrelated to training's.
        return self.val_group if on_snapshot.get() else self.train_group

    @property
    def group(self) -> Any:
        """The (gloo) process group this context's collectives use: the validation lane inside a
        concurrent validation, the training lane elsewhere (e.g. for torchmetrics' sync)."""
        return self._lane()

    @property
    def in_concurrent_validation(self) -> bool:
        """Whether the calling code runs in a concurrent validation (its hooks run on the event
        loop next to training: no blocking collective there, see :meth:`sum_at_end_of`)."""
        return on_snapshot.get()

    def sum_at_end_of(
        self,
        kind: Literal["fit", "validate"],
        read: Callable[[], Sequence[float | torch.Tensor]],
        write: Callable[[list[float]], None],
    ) -> None:
        """Add values of this rank to every ``kind`` pass's own reduction across ranks.

        When a training (``"fit"``) or validation (``"validate"``) pass ends, its stage sums
        its loss over every rank in one all-reduce, awaited without blocking the event loop;
        ``read()`` gives values of this rank to sum in the same all-reduce, and ``write(sums)``
        receives their sums over every rank, before the pass's ``after_`` hook runs. So a
        callback's per-pass sums cost no collective of their own, and are safe in a concurrent
        validation too (where a blocking collective could wait for a rank whose event loop is
        busy training). Registering the same ``read`` again replaces it; the registrations last
        until the learner's next ``fit``.
        """
        if kind not in self._with_pass:
            raise ValueError(f"kind must be 'fit' or 'validate', got {kind!r}")
        self._with_pass[kind][read] = write

    def _usable(self, what: str) -> None:
        guard(what)
        if self.in_concurrent_validation:
            raise CollectiveError(
                what,
                callback=None,
                why=(
                    "in a concurrent validation, whose hooks run on the event loop next to "
                    "training: a blocking collective there could wait for a rank whose event "
                    "loop is busy in a training step that waits for this rank; hand per-pass "
                    "sums to the pass's own reduction with strategy.sum_at_end_of()"
                ),
            )
        if self._failed:
            raise DistributedError(
                f"{what} after distributed training failed in this process: no collective "
                "runs after a failure (it could wait for a rank that is gone)",
                rank=self._rank,
            )
        if not self._connected:
            raise DistributedError(f"{what} before the strategy joined its group", rank=self._rank)

    def all_reduce(
        self, tensor: torch.Tensor, op: Literal["sum", "max", "min", "product"] = "sum"
    ) -> torch.Tensor:
        """Reduce ``tensor`` over all ranks, in place (any device); returns it."""
        self._usable("all_reduce")
        host = tensor if tensor.device.type == "cpu" else tensor.detach().cpu()
        dist.all_reduce(host, op=_OPS[op], group=self._lane())
        if host is not tensor:
            tensor.copy_(host)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable), on every rank."""
        self._usable("broadcast_object")
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self._lane())
        return box[0]

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank ``dst`` (``None`` elsewhere)."""
        self._usable("gather_object")
        out: list[Any] | None = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self._lane())
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        self._usable("all_gather_object")
        out: list[Any] = [None] * self._world_size
        dist.all_gather_object(out, obj, group=self._lane())
        return out

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        self._usable("barrier")
        dist.barrier(group=self._lane())

    async def _reduce_sums(
        self, values: list[float | torch.Tensor], kind: str | None = None
    ) -> list[float]:
        """Sums over all ranks of ``values``, and of what callbacks handed to ``kind`` passes
        (:meth:`sum_at_end_of`): one all-reduce, awaited (for stages)."""
        if self._failed:
            raise DistributedError("a reduction after a failure", rank=self._rank)
        extra = list(self._with_pass.get(kind, {}).items()) if kind is not None else []
        parts = [[float(v) for v in read()] for read, _ in extra]
        flat = torch.tensor(
            [float(v) for v in values] + [v for part in parts for v in part], dtype=torch.float64
        )
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._lane(), async_op=True)
        await self._wait(work, "a pass's reduction", flat)
        result: list[float] = flat.tolist()
        offset = len(values)
        for (_, write), part in zip(extra, parts, strict=True):
            write(result[offset : offset + len(part)])
            offset += len(part)
        return result[: len(values)]

    async def _wait(self, work: Any, what: str, tensor: torch.Tensor) -> None:
        """Await a collective on ``tensor``; a failure becomes a :class:`DistributedError`
        quoting the rank that failed (when it reported), also while waiting."""
        self._held.append(tensor)
        try:
            await wait_work(work, self._poll)
        except DistributedError:
            if not work.is_completed():
                self._abandoned.append(work)
            raise
        except Exception as exc:
            raise distributed_error(self, f"{what} failed ({exc})", exc) from exc

    def _poll(self) -> None:
        reports = self._reports
        found = None if reports is None else reports.find()
        if found is not None:
            raise distributed_error(self, "another rank failed", None, found)

    # -- requests ----------------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask every rank to stop the run at the next agreement point (safe from a signal
        handler or another thread): ``fit`` returns on every rank, ``stop_reason`` says which
        rank asked and why. Asked while no run is in progress, it stops the next run at its
        first agreement point (a signal as ``fit`` starts is not lost); a run's end drops it."""
        if self._agreement is not None:
            self._agreement.request("signal", reason)

    # -- training ----------------------------------------------------------------------------------

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Gradients computed inside are not synchronized (accumulate micro-batches; the last
        one of a group runs outside, and synchronizes the sum)."""
        return contextlib.nullcontext()

    def _skipped_batch(self, fit_batch: Stage, state: State) -> None:
        """A ``SkipBatch`` ended this rank's batch before it was committed.

        Before the gradient stage ran, the other ranks are about to all-reduce their gradients
        and wait for this rank's: it takes part with zeros (the batch's loss, backpropagated
        with a zero gradient), then applies the update every rank applies (its update stage's
        ``compute``), so the weights stay equal. After the gradient stage (its all-reduce done)
        nothing can be paired any more: skipping the update on this rank alone makes the ranks
        diverge, which the next agreement reports as a :class:`DistributedError`.
        """
        d = state.__dict__
        if "loss" in d or "batch" not in d:
            return
        from .._stage import ComputeStage
        from .._stages import forward

        loss = forward(d["train_model"], d["loss_fn"], d["batch"], "gradient")[1]
        loss.backward(torch.zeros_like(loss))  # type: ignore[no-untyped-call]
        for child in fit_batch.children:
            if child.name == "update" and isinstance(child, ComputeStage):
                child.compute(state)  # commits the batch, with the update
                return

    async def _reduce_train_loss(self, state: State, losses: list[torch.Tensor]) -> None:
        """``train_loss``: the mean over every rank's batches of the pass (Fit, every rank)."""
        local = 0.0
        if losses:
            with torch.no_grad():
                local = float(torch.stack([x.detach().reshape(()).double() for x in losses]).sum())
        total, count = await self._reduce_sums([local, len(losses)], "fit")
        if count:
            state.metrics["train_loss"] = total / count

    async def _reduce_validation(
        self, total: list[torch.Tensor], count: int, results: dict[str, Any]
    ) -> int:
        """The validation loss over every rank's shard (Validate, every rank); the count."""
        local = 0.0
        if total:
            with torch.no_grad():
                local = float(torch.stack(total).double().sum())
        summed, n = await self._reduce_sums([local, count], "validate")
        if n:
            results["loss"] = summed / n
        return int(n)

    def _begin_validation(self, model: torch.nn.Module) -> None:
        """A validation pass starts on ``model`` (every rank, in the training flow)."""

    def _end_validation(self, model: torch.nn.Module) -> None:
        """The validation pass on ``model`` ended."""

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average the gradients across ranks by hand (micro-batches run under :meth:`no_sync`
        and no synchronizing backward followed: a gradient-accumulation group cut short)."""
        raise DistributedError(
            f"{type(self).__name__} cannot average gradients accumulated without "
            "synchronization; make the number of batches per pass a multiple of the "
            "accumulation group",
            rank=self._rank,
        )

    def _checksum(self) -> float | None:
        """A sum of the weights, identical on every rank unless they diverged (or ``None``)."""
        learner = self._learner() if self._learner is not None else None
        if learner is None:
            return None
        with torch.no_grad():
            sums = [p.detach().double().sum() for p in learner.model.parameters()]
            return float(torch.stack(sums).sum()) if sums else 0.0

    async def _run_fit(self, learner: Learner[Any]) -> None:
        """``learner``'s root stage, shielded: see the module docstring (``_run.py``)."""
        await run_fit(self, learner)

    # -- the end -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the process group if this strategy created it (never after a failure)."""
        if self._closed:
            return
        self._closed = True
        if self.created_group and not self._failed and dist.is_initialized():
            dist.destroy_process_group()

    def describe(self) -> str:
        """One line for ``Learner.describe()``."""
        every = "auto" if self.agree_every == "auto" else f"{self.agree_every}"
        return (
            f"strategy: {type(self).__name__}, rank {self._rank} of {self._world_size} "
            f"({self._backend_in_use}), agree_every={every!r} (now every {self._interval()} "
            f"steps), data {'sharded' if self.shard_data else 'as given'}"
        )

    def _interval(self) -> int:
        return 1 if self._agreement is None else self._agreement.interval


def mark_concurrent(fn: Any, name: str) -> Any:
    """``fn`` (a coroutine function) as a background task: collectives refused inside."""

    async def marked(*args: Any) -> None:
        token = CONCURRENT.set(name)
        try:
            await fn(*args)
        finally:
            CONCURRENT.reset(token)

    return marked
