"""The base classes of stages: :class:`Stage` and :class:`ComputeStage`, and batch helpers.

A stage's ``run`` awaits its sub-stages; calling a stage (``await stage(state)``) runs its
``before_`` hook, its ``run``, and its ``after_`` hook, and acts on the control-flow exceptions the
stage owns. The default tree built from these is in ``_stages.py``; how fused batches are run
(flat paths, bursts in the compute worker) is in ``_fused.py``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import torch

from ._exceptions import ControlFlow
from ._state import ReadOnlyList, State

if TYPE_CHECKING:
    from ._plan import HookPlan
    from ._runtime import Runtime

__all__ = ["ComputeStage", "FlatProgram", "Stage", "batch_size", "note_stage_error", "split_batch"]


#: The compute leaves of a flat batch stage with their ``compute`` methods (see flat_program).
FlatProgram = tuple[tuple["ComputeStage", Any], ...]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


_NOTED = "_aiolearner_noted"


def note_stage_error(exc: BaseException, stage: str, state: State) -> None:
    """Add one note naming where a stage-body error happened (the innermost stage only)."""
    if isinstance(exc, BaseExceptionGroup) or getattr(exc, _NOTED, False):
        return
    d = state.__dict__
    exc.add_note(
        f"aiolearner: raised in stage {stage!r} at epoch {d.get('epoch')}, step {d.get('step')}"
        f" (batch {d.get('batch_index')} of the epoch, phase {d.get('phase')!r})"
    )
    try:
        setattr(exc, _NOTED, True)
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        pass


class Stage:
    """Base class of stages: one coroutine that transforms the state, awaiting its sub-stages.

    Subclasses override :meth:`run`; the default awaits the sub-stages passed to ``__init__`` in
    order. Each stage's ``name`` gives its hooks their names (``before_<name>``/``after_<name>``);
    it defaults to the snake-case class name and is inherited by subclasses of named stages, so a
    subclass of :class:`FitBatch` is still hooked as ``fit_batch``.

    Class attributes:
        name: the stage's name in the tree.
        catches: the control-flow exceptions this stage owns and acts on.

    Example:
        >>> class TwoPassFitBatch(FitBatch):
        ...     async def run(self, state):
        ...         await self.gradient(state)
        ...         await self.gradient(state)   # a stage may await a sub-stage twice
        ...         await self.update(state)
    """

    name: ClassVar[str] = "stage"
    _generic_base: ClassVar[bool] = True
    catches: ClassVar[tuple[type[ControlFlow], ...]] = ()
    #: Whether the stage's ``after_`` hook still runs once it caught one of its ``catches``.
    after_hook_when_caught: ClassVar[bool] = True

    _before: HookPlan | None
    _after: HookPlan | None
    _rt: Runtime | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Generic bases (Stage, ComputeStage) do not pass their name on: a direct subclass of
        # ComputeStage is a new stage, while a subclass of Gradient still is the gradient stage.
        if "name" not in cls.__dict__ and all(
            "name" not in base.__dict__
            for base in cls.__mro__[1:]
            if not base.__dict__.get("_generic_base", False)
        ):
            cls.name = _snake(cls.__name__)

    def __init__(self, *children: Stage) -> None:
        self.children: tuple[Stage, ...] = children
        self._before = None
        self._after = None
        self._rt = None
        self._fused = False
        self._fused_writes = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def walk(self) -> Iterator[Stage]:
        """This stage and every stage under it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    @property
    def hook_names(self) -> tuple[str, str]:
        """``("before_<name>", "after_<name>")``."""
        return f"before_{self.name}", f"after_{self.name}"

    @property
    def runtime(self) -> Runtime:
        """The learner's runtime (stage API): compute policy, data sources, progress."""
        rt = self._rt
        if rt is None:
            raise RuntimeError(f"stage {self.name!r} is not part of a built Learner")
        return rt

    async def run(self, state: State) -> None:
        """The stage's work. The default runs the sub-stages one after the other."""
        for child in self.children:
            await child(state)

    def run_sync(self, state: State) -> None:
        """The same as :meth:`run` without the event loop (used when the batch is fused)."""
        for child in self.children:
            child.call_sync(state)

    def acted(self, state: State, flow: ControlFlow) -> None:
        """Called when this stage caught one of its ``catches`` (records the reason)."""
        state.stop_reason = flow.reason or type(flow).__name__
        rt = self._rt
        if rt is not None and rt.observed:
            rt.observe_control(self, flow, state)

    async def __call__(self, state: State) -> None:
        rt = self._rt
        if rt is None:
            raise RuntimeError(f"stage {self.name!r} is not part of a built Learner")
        if self._fused:
            await rt.run_fused(self, state)
            return
        observed = rt.observed
        start = rt.enter(self, state) if observed else 0.0
        before, after = self._before, self._after
        in_after = False
        try:
            if before is not None:
                await before.run()
            await self.run(state)
            if after is not None:
                in_after = True
                await after.run()
        except ControlFlow as flow:
            if not isinstance(flow, self.catches):
                raise
            self.acted(state, flow)
            if after is not None and not in_after and self.after_hook_when_caught:
                try:
                    await after.run()
                except ControlFlow as again:
                    if not isinstance(again, self.catches):
                        raise
                    self.acted(state, again)
        except Exception as exc:
            note_stage_error(exc, self.name, state)
            raise
        finally:
            if observed:
                rt.exit(self, state, start)

    def call_sync(self, state: State) -> None:
        """:meth:`__call__` without the event loop; only for fused subtrees (def hooks only)."""
        rt = self._rt
        assert rt is not None
        observed = rt.observed
        start = rt.enter(self, state) if observed else 0.0
        before, after = self._before, self._after
        in_after = False
        try:
            if before is not None:
                before.run_sync()
            self.run_sync(state)
            if after is not None:
                in_after = True
                after.run_sync()
        except ControlFlow as flow:
            if not isinstance(flow, self.catches):
                raise
            self.acted(state, flow)
            if after is not None and not in_after and self.after_hook_when_caught:
                try:
                    after.run_sync()
                except ControlFlow as again:
                    if not isinstance(again, self.catches):
                        raise
                    self.acted(state, again)
        except Exception as exc:
            note_stage_error(exc, self.name, state)
            raise
        finally:
            if observed:
                rt.exit(self, state, start)


class ComputeStage(Stage):
    """A leaf stage whose work is blocking torch code, written as a plain ``def compute``.

    The learner's compute policy runs ``compute`` on the event loop (inline) or in the compute
    worker thread. Set ``writes_weights = True`` when ``compute`` changes the model's weights or
    the optimizer: it then runs under the write side of the weights lock, and in thread mode it is
    shielded from cancellation so an update is applied entirely or not at all.
    """

    writes_weights: ClassVar[bool] = False
    _generic_base: ClassVar[bool] = True

    def compute(self, state: State) -> None:
        """The blocking work of the stage."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute(state)")

    async def run(self, state: State) -> None:
        rt = self.runtime
        if self.writes_weights:
            lock = rt.weights_lock
            if not lock.acquire_write_nowait():
                await lock.acquire_write()
            try:
                if rt.hop_leaves:
                    # Shielded: the thread cannot be interrupted, and the counters written with
                    # the update must land with it.
                    with anyio.CancelScope(shield=True):
                        await rt.hop(self.compute, state)
                elif rt.policy.mode == "auto":
                    start = time.perf_counter()
                    try:
                        self.compute(state)
                    finally:
                        rt.policy.observe(time.perf_counter() - start)
                else:
                    self.compute(state)
            finally:
                lock.release_write()
        elif rt.hop_leaves:
            await rt.hop(self.compute, state)
        elif rt.policy.mode == "auto":
            start = time.perf_counter()
            try:
                self.compute(state)
            finally:
                rt.policy.observe(time.perf_counter() - start)
        else:
            self.compute(state)

    def run_sync(self, state: State) -> None:
        self.compute(state)


def split_batch(batch: Any, stage: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch given as a pair (tuple or list).

    A list batch (what a DataLoader yields) seen through a callback's read-only view is a
    :class:`ReadOnlyList`; it is accepted too.
    """
    if isinstance(batch, tuple | list | ReadOnlyList) and len(batch) == 2:
        return batch[0], batch[1]
    got = type(batch).__name__
    if isinstance(batch, tuple | list | ReadOnlyList):
        got += f" of {len(batch)}"
    raise TypeError(
        f"stage {stage!r} expects each batch as (inputs, targets), got {got}; give the data in"
        " that form or replace the stage with one that unpacks your batches"
    )


def batch_size(batch: Any) -> int:
    """The number of samples in a batch (its first tensor's first dimension; 1 if unknown)."""
    item = batch
    # Sequence and Mapping, not just list and dict: callbacks see batches through read-only views.
    while isinstance(item, Sequence) and not isinstance(item, str | bytes) and len(item):
        item = item[0]
    if isinstance(item, Mapping) and item:
        item = next(iter(item.values()))
    if isinstance(item, torch.Tensor) and item.dim() > 0:
        return int(item.shape[0])
    return 1
