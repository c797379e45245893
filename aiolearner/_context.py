"""What a stage may use of its learner: :class:`StageContext` (``stage.context``).

Stages are the trusted core: they read and write the state directly. What they need beyond the
state goes through this small surface, the same for the shipped stages and for users' own:
committing a training batch, running blocking work where the compute policy says, the weights'
lock, opening a pass over data, publishing events. Everything else about the running learner
is private, so that it can change without breaking anybody's stages.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ._batches import END, WAIT
from ._exceptions import StopEpoch
from ._train_stages import record_train_loss

if TYPE_CHECKING:
    from ._data import Batches
    from ._dist._strategy import Strategy
    from ._locks import ReadWriteLock
    from ._runtime import Runtime
    from ._state import State

__all__ = ["StageContext"]

T = TypeVar("T")


class StageContext:
    """The learner as its stages see it (``self.context`` inside a stage).

    Example:
        A leaf stage that adds noise to the gradients, between Gradient and Update::

            class GradNoise(ComputeStage):
                def __init__(self, std: float) -> None:
                    super().__init__()
                    self.std = std

                def compute(self, state: State) -> None:
                    for p in state.model.parameters():
                        if p.grad is not None:
                            p.grad.add_(torch.randn_like(p.grad), alpha=self.std)

            learner = Learner(..., stages={"fit_batch": FitBatch(Gradient(), GradNoise(1e-3),
                                                                 Update())})
    """

    # The commit state lives here, not in the runtime: commit() runs once a batch, and a method
    # that only forwarded to the runtime would add a call to every batch.
    __slots__ = ("_committed", "_rt")

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._committed = False

    def __repr__(self) -> str:
        return f"<StageContext committed={self._committed}>"

    # -- the training batch ---------------------------------------------------------------------

    def commit(self, state: State) -> None:
        """The current training batch is final: ``step`` and ``batch_index`` advance.

        Call it from the stage that applies the batch's update, with the update (``Update``
        does, inside its ``compute``), so the counters always match the weights: a batch
        interrupted before its commit is repeated when the run continues, one interrupted after
        it is not. Committing twice in one batch is one commit. Every training batch must be
        committed: one that ends without it raises :class:`~aiolearner.StageError` naming the
        batch stage (a skipped or stopped batch is committed for you).
        """
        if self._committed:
            return
        state.step += 1
        state.batch_index += 1
        self._committed = True

    @property
    def committed(self) -> bool:
        """Whether the current (or, between batches, the last) training batch is committed."""
        return self._committed

    # -- compute and the weights ------------------------------------------------------------------

    @property
    def weights_lock(self) -> ReadWriteLock:
        """The reader/writer lock on the model's weights and the optimizer."""
        return self._rt.weights_lock

    @property
    def device(self) -> torch.device:
        """Where the model and the batches live."""
        return self._rt.device

    async def compute(self, fn: Callable[..., T], *args: Any, writes_weights: bool = False) -> T:
        """``fn(*args)``, blocking torch work, run where the compute policy says; its result.

        Inline on the event loop or in the learner's compute worker thread, timed for the
        ``auto`` policy. With ``writes_weights=True`` it holds the write side of the weights
        lock, and once started in the worker it finishes even if the caller is cancelled (the
        cancellation is raised after it), so an update is applied entirely or not at all.
        Inside a batch that runs without the event loop (a fused batch) it simply calls ``fn``:
        the batch already holds the lock and runs where the policy says.
        """
        result: T = await self._rt.compute(
            fn, *args, writes_weights=writes_weights, raise_cancel=True
        )
        return result

    @property
    def strategy(self) -> Strategy | None:
        """The learner's distributed strategy, or ``None`` (one process)."""
        return self._rt.strategy

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Gradients computed inside are not synchronized across ranks (a no-op in one process).

        For gradient accumulation under a distributed strategy: every micro-batch of a group but
        the last runs its backward inside, the last one outside, so the summed gradients are
        all-reduced once, with the last backward (``DistributedDataParallel.no_sync``, FSDP2's
        ``set_requires_gradient_sync``).
        """
        strategy = self._rt.strategy
        return contextlib.nullcontext() if strategy is None else strategy.no_sync()

    # -- data and events --------------------------------------------------------------------------

    @asynccontextmanager
    async def open_pass(self, state: State, data: Any = "train") -> AsyncIterator[Batches]:
        """One pass over data: ``async with context.open_pass(state, data) as batches:``.

        ``data`` is ``"train"`` (the epoch's training pass, for a stage in ``Fit``'s place:
        the training data, resuming an interrupted epoch where it stopped; once the epoch's
        pass has finished, a ``ValueError``), ``"validation"`` (the validation data, or the
        snapshot of it a concurrent validation took, or the data
        ``learner.validate(data)``/``test(data)`` was given; with several validation sets, the
        one Validate is going over), or any iterable or async iterable of batches. Take
        batches with
        ``await batches.next()`` until it returns ``batches.END``; they arrive on the device,
        fetched ahead of use as the learner's ``fetch`` and ``prefetch`` options say.
        """
        rt = self._rt
        if data != "train":
            async with rt.open_pass(state, data) as batches:
                yield batches
            return
        stop: StopEpoch | None = None
        async with rt.open_pass(state, data) as batches:
            stage_pass = TrainingPass(batches, rt, state)
            try:
                yield stage_pass  # type: ignore[misc]
            except StopEpoch as exc:
                stage_pass.abandon(exc)
                stop = exc  # the pass ends as Fit's does: with the mean loss of its batches
            except BaseException as exc:
                stage_pass.abandon(exc)
                raise
            else:
                stage_pass.finish()
        await record_train_loss(rt, state)
        if stop is not None:
            raise stop

    def publish(self, kind: str, source: str, state: State, data: dict[str, Any]) -> None:
        """Publish an event on the learner's stream (a no-op while nobody listens)."""
        rt = self._rt
        if rt.observed:
            rt.publish(kind, source, state, data)


class TrainingPass:
    """The epoch's training pass as a stage in ``Fit``'s place takes it
    (``context.open_pass(state, "train")``): each batch handed out is a training batch as
    ``Fit``'s are. It becomes ``state.batch``, uncommitted; when the next one is taken (or the pass
    closes) it is finished as ``Fit`` finishes one: its ``loss``, if the stage set one, kept for
    ``train_loss``, its batch fields ended, its commit checked. A batch interrupted before its
    commit is repeated when the run continues."""

    END = END
    WAIT = WAIT

    def __init__(self, batches: Any, rt: Runtime, state: State) -> None:
        self._batches = batches
        self._rt = rt
        self._state = state
        self._current = False
        self._mark: tuple[dict[str, Any], int] | None = None
        executor = rt.executor
        executor.fields_before = frozenset(state.__dict__)
        executor.fields_seen = len(state.__dict__)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batches, name)

    async def next(self) -> Any:
        """The next batch (now ``state.batch``), on the device, or ``END``."""
        self.finish()
        source = getattr(self._batches, "source", None)
        self._mark = None if source is None else source.mark()
        batch = await self._batches.next()
        if batch is not END:
            self._state.batch = batch
            self._rt.context._committed = False
            self._current = True
        return batch

    def finish(self) -> None:
        """The current batch is over (see the class docstring)."""
        if self._current:
            self._current = False
            rt = self._rt
            rt.executor.finish_batch(rt.executor.fit_slot, self._state, rt.train_losses)

    def abandon(self, exc: BaseException) -> None:
        """The pass ended by ``exc``: a ``StopEpoch`` ends the current batch as consumed (as
        ``Fit`` does); anything else undoes an uncommitted one (repeated when the run goes on)."""
        if not self._current:
            return
        self._current = False
        rt = self._rt
        if isinstance(exc, StopEpoch):
            rt.executor.consume_batch(rt.executor.fit_slot, self._state)
        else:
            rt.abandon_batch(self._state, self._mark)
