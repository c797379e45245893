"""The base classes of stages, :class:`Stage` and :class:`ComputeStage`, and what they share.

A stage's ``run`` awaits its sub-stages; calling a stage (``await stage(state)``) runs its
``before_`` hook, its ``run`` and its ``after_`` hook, and acts on the control-flow exceptions the
stage owns. That call (``Stage.__call__``) is the one definition of running a stage: the batch
executor (``_executor.py``) runs a batch either by awaiting it or, for a batch compiled to run
without the event loop, by driving that same coroutine to its end in one step. :func:`owned` is
the one place where an exception is judged: control flow a stage owns is acted on, any other error
gets a note naming the innermost stage it went through.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from ._exceptions import ConfigurationError, ControlFlow, StageError
from ._state import ReadOnlyList, State

if TYPE_CHECKING:
    from ._context import StageContext
    from ._executor import BatchProgram
    from ._plan import HookPlan
    from ._runtime import Runtime

__all__ = [
    "LIFETIMES",
    "ComputeStage",
    "Lifetime",
    "Stage",
    "batch_size",
    "epoch_words",
    "not_a_stage",
    "note_stage_error",
    "owned",
    "split_batch",
    "unowned",
    "validating",
]

#: How long a field a stage adds to the state stays valid (see :attr:`Stage.fields`).
Lifetime = Literal["batch", "epoch", "run"]
LIFETIMES: tuple[Lifetime, ...] = ("batch", "epoch", "run")


def _snake(name: str) -> str:
    """A class name in snake case, acronyms kept whole: ``GradNoise`` -> ``grad_noise``,
    ``SAMStep`` -> ``sam_step``, ``EMA`` -> ``ema``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


_NOTED = "_aiolearner_noted"

#: While a validation pass runs: ``[set name or None, index of its current batch]`` (set once a
#: set, the index moved on by the pass), for the notes of errors raised there (the state's
#: counters are training's).
validating: ContextVar[list[Any] | None] = ContextVar("validating", default=None)


def epoch_words(epoch: object) -> str:
    """An epoch for people (counted from 1) and for code (``state.epoch``, completed epochs)."""
    if isinstance(epoch, int):
        return f"epoch {epoch + 1} (state.epoch {epoch})"
    return f"epoch {epoch}"


def _epoch(d: dict[str, Any]) -> str:
    return epoch_words(d.get("epoch"))


def note_stage_error(exc: BaseException, stage: str, state: State) -> None:
    """Add one note naming where a stage-body error happened (the innermost stage only)."""
    if isinstance(exc, BaseExceptionGroup) or getattr(exc, _NOTED, False):
        return
    d = state.__dict__
    where = validating.get()
    if where is None:
        batch = f"batch {d.get('batch_index')} of the epoch"
    else:
        name, index = where
        data = "val_data" if name is None else f"validation set {name!r}"
        batch = f"validating: batch {index} of {data}"
    exc.add_note(
        f"aiolearner: raised in stage {stage!r} at {_epoch(d)}, step {d.get('step')}"
        f" ({batch}, phase {d.get('phase')!r})"
    )
    try:
        setattr(exc, _NOTED, True)
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        pass


def unowned(flow: ControlFlow, stage: str) -> StageError:
    """The error for control flow raised where no running stage owns it (a ``SkipBatch``
    outside a batch, a ``StopEpoch`` outside an epoch), raised by the outermost stage it
    reached (``stage``) ``from`` it."""
    where = ""
    if flow.raised_in is not None:
        callback, hook = flow.raised_in
        where = f" by callback {callback!r} in hook {hook!r}"
    elif flow._left_stage is not None and flow._left_stage != stage:
        where = f" in stage {flow._left_stage!r}"
    error = StageError(
        f"{type(flow).__name__} was raised{where} where no stage owns it (the stage that would "
        f"act on it is not running); reason: {flow.reason!r}",
        stage=stage,
    )
    error.__cause__ = flow
    return error


def owned(stage: Stage, state: State, exc: BaseException, where: str | None = None) -> bool:
    """Judge an exception that ends (part of) ``stage``; every stage's ``except`` calls this.

    Control flow that ``stage`` owns (its ``catches``) is acted on (:meth:`Stage.acted`) and
    ``True`` is returned: the caller swallows it. Anything else returns ``False`` and the caller
    re-raises it; an error (not control flow, not a cancellation) first gets a note naming
    ``where`` it happened (default: the stage), unless an inner stage noted it already.

    A function rather than a context manager: it costs nothing until something is raised, which
    matters on the path every batch takes. Sync and async callers use it alike::

        try:
            ...
        except BaseException as exc:
            if not owned(stage, state, exc):
                raise
    """
    if isinstance(exc, ControlFlow):
        if isinstance(exc, stage.catches):
            stage.acted(state, exc)
            return True
        if exc._left_stage is None:
            exc._left_stage = stage.name
        return False
    if isinstance(exc, Exception):
        note_stage_error(exc, where if where is not None else stage.name, state)
    return False


def _check_methods(cls: type[Stage]) -> None:
    """``run`` is a coroutine function and a compute stage's ``compute`` a plain one: the other
    way round, nothing would run (a coroutine never awaited) or the error would come at the
    first batch, far from the class."""
    run = cls.__dict__.get("run")
    if isinstance(run, staticmethod | classmethod):
        run = run.__func__
    # Plain functions only (a decorated run may return a coroutine from a plain wrapper).
    if inspect.isfunction(run) and not inspect.iscoroutinefunction(inspect.unwrap(run)):
        raise TypeError(
            f"{cls.__name__}.run must be an `async def` (it awaits the sub-stages); put blocking "
            "work in a ComputeStage's plain `def compute(self, state)`"
        )
    compute = cls.__dict__.get("compute")
    if (
        compute is not None
        and any(base.__name__ == "ComputeStage" for base in cls.__mro__)
        and (inspect.iscoroutinefunction(compute) or inspect.isasyncgenfunction(compute))
    ):
        raise TypeError(
            f"{cls.__name__}.compute must be a plain `def` (it is blocking work, run where the "
            "compute policy says); a stage that awaits overrides `async def run(self, state)` "
            "instead"
        )


def not_a_stage(value: object) -> str:
    """What was given where a stage object is needed, for the ``TypeError`` saying so: a stage
    class itself (``Gradient`` for ``Gradient()``) gets the call it is missing."""
    if isinstance(value, type) and issubclass(value, Stage):
        return f"the class {value.__name__} itself (pass a stage object: {value.__name__}())"
    return type(value).__name__


class Stage:
    """Base class of stages: one coroutine that transforms the state, awaiting its sub-stages.

    Subclasses override :meth:`run`; the default awaits the sub-stages passed to ``__init__`` in
    order. Each stage's ``name`` gives its hooks their names (``before_<name>``/``after_<name>``);
    it defaults to the snake-case class name and is inherited by subclasses of named stages, so a
    subclass of :class:`FitBatch` is still hooked as ``fit_batch``.

    Class attributes:
        name: the stage's name in the tree.
        catches: the control-flow exceptions this stage owns and acts on.
        after_hook_when_caught: whether the ``after_`` hook still runs once the stage caught one
            of its ``catches``.
        fields: the state fields this stage adds, with how long each stays valid: ``"batch"``
            (cleared when the batch ends), ``"epoch"`` or ``"run"``. Reading one outside its
            lifetime raises :class:`~aiolearner.StateAccessError` naming the stage.
        fusable: ``None`` (default): a stage that does not override ``run`` can run inside a
            batch compiled to run without the event loop (a *fused* batch); one that overrides
            it cannot. ``True`` declares that an overridden ``run`` awaits nothing but its
            sub-stages, so its batch stays fused; ``False`` keeps the batch on the event loop.

    Example:
        >>> class TwoPassFitBatch(FitBatch):
        ...     fusable = True                     # run awaits only sub-stages
        ...     async def run(self, state):
        ...         await self.children[0](state)  # a stage may await a sub-stage twice
        ...         await self.children[0](state)
        ...         await self.children[1](state)
    """

    name: ClassVar[str] = "stage"
    _generic_base: ClassVar[bool] = True
    catches: ClassVar[tuple[type[ControlFlow], ...]] = ()
    after_hook_when_caught: ClassVar[bool] = True
    fields: ClassVar[Mapping[str, str]] = {}
    fusable: ClassVar[bool | None] = None

    _before: HookPlan | None
    _after: HookPlan | None
    _rt: Runtime | None
    #: Set on a batch stage compiled to run without the event loop (see _executor.py).
    _program: BatchProgram | None

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
        _check_methods(cls)
        for field, lifetime in cls.__dict__.get("fields", {}).items():
            if lifetime not in LIFETIMES:
                raise ConfigurationError(
                    f"stage class {cls.__name__} declares field {field!r} with lifetime "
                    f"{lifetime!r}; a lifetime is one of {', '.join(map(repr, LIFETIMES))}",
                    field=field,
                )

    def __init__(self, *children: Stage) -> None:
        for child in children:
            if not isinstance(child, Stage):
                raise TypeError(
                    f"{type(self).__name__} takes stages as children, got {not_a_stage(child)}"
                )
        self.children: tuple[Stage, ...] = children
        self._before = None
        self._after = None
        self._rt = None
        self._context: StageContext | None = None
        self._program = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def walk(self) -> Iterator[Stage]:
        """This stage and every stage under it, depth first."""
        yield self
        try:
            children = self.children
        except AttributeError:
            raise TypeError(
                f"stage {type(self).__name__} was not initialized as a Stage: its __init__ must "
                "call super().__init__() (with its sub-stages, if it has any)"
            ) from None
        for child in children:
            yield from child.walk()

    @property
    def hook_names(self) -> tuple[str, str]:
        """``("before_<name>", "after_<name>")``."""
        return f"before_{self.name}", f"after_{self.name}"

    @property
    def context(self) -> StageContext:
        """What this stage may use of its learner: commit, compute, the weights lock, data."""
        context = self._context
        if context is None:
            raise StageError("it is not part of a built Learner", stage=self.name)
        return context

    @property
    def runtime(self) -> StageContext:
        """The same as :attr:`context` (its earlier name)."""
        return self.context

    def _built(self) -> Runtime:
        """The learner's runtime (the core's own stages use it directly)."""
        rt = self._rt
        if rt is None:
            raise StageError("it is not part of a built Learner", stage=self.name)
        return rt

    async def run(self, state: State) -> None:
        """The stage's work. The default runs the sub-stages one after the other."""
        for child in self.children:
            await child(state)

    def acted(self, state: State, flow: ControlFlow) -> None:
        """Called when this stage caught one of its ``catches`` (records the reason)."""
        state.stop_reason = flow.reason or type(flow).__name__
        rt = self._rt
        if rt is not None and rt.observed:
            rt.observe_control(self, flow, state)

    async def __call__(self, state: State) -> None:
        """Run the stage: ``before_`` hook, :meth:`run`, ``after_`` hook, owned control flow.

        A batch stage compiled to run without the event loop hands itself to the batch
        executor, which runs this same coroutine there (inline, or in the compute worker).
        """
        rt = self._built()
        program = self._program
        if program is not None and not program.driving():
            await program.execute(state)
            return
        observed = rt.observed
        start = rt.enter(self, state) if observed else 0.0
        before, after = self._before, self._after
        try:
            try:
                if before is not None:
                    await before.run()
                await self.run(state)
            except BaseException as exc:
                if not owned(self, state, exc):
                    raise
                if not self.after_hook_when_caught:
                    after = None
            if after is not None:
                try:
                    await after.run()
                except BaseException as exc:
                    if not owned(self, state, exc):
                        raise
        finally:
            if observed:
                rt.exit(self, state, start)


class ComputeStage(Stage):
    """A leaf stage whose work is blocking torch code, written as a plain ``def compute``.

    The learner's compute policy runs ``compute`` on the event loop (inline) or in the compute
    worker thread (``context.compute``). Set ``writes_weights = True`` when ``compute`` changes
    the model's weights or the optimizer: it then runs under the write side of the weights lock,
    and in thread mode it is shielded from cancellation so an update is applied entirely or not
    at all.
    """

    writes_weights: ClassVar[bool] = False
    _generic_base: ClassVar[bool] = True

    def compute(self, state: State) -> None:
        """The blocking work of the stage."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute(state)")

    async def run(self, state: State) -> None:
        # What context.compute does, without its extra await.
        await self._built().compute(self.compute, state, writes_weights=self.writes_weights)


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
