"""Which kind of program a batch stage compiles to (``_executor.BatchProgram``).

* ``"default"``: the default ``FitBatch(Gradient(), Update())``, no hooks, unchanged ``compute``
  methods: run by the helpers those methods are written with;
* ``"flat"``: no hooks and plain compute leaves: their ``compute`` methods in order;
* ``"fused"``: any other batch whose whole subtree needs no event loop (``def`` hooks, stages
  that do not override ``run`` or declare ``fusable = True``): its coroutine driven in one step;
* ``"async"``: the rest, awaited on the event loop.

A program is compiled again when its :func:`signature` changed (a method patched after the
learner was built), so a patch runs as written. What a synchronous program that awaited
something is told: :func:`suspended_in` (where), :func:`raised_by_a_loop_library` (an event
loop's call made off the loop).
"""

from __future__ import annotations

from typing import Any

from ._stage import ComputeStage, Stage
from ._stages import FitBatch, Gradient, Update

__all__ = [
    "flat",
    "kind",
    "raised_by_a_loop_library",
    "signature",
    "stepped_optimizers",
    "suspended_in",
    "synchronous",
]

# The default program's definitions at import: a subclass or a patch runs as written instead.
_GRADIENT_COMPUTE = Gradient.compute
_UPDATE_COMPUTE = Update.compute


def suspended_in(coro: Any) -> Stage | None:
    """The innermost stage whose coroutine ``coro``'s chain of awaits is suspended in."""
    found = None
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Stage):
                found = owner
        coro = getattr(coro, "cr_await", None)
    return found


def raised_by_a_loop_library(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside an event loop library (a call that needs the loop,
    made by a synchronous program in the compute worker thread)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = "" if tb is None else str(tb.tb_frame.f_globals.get("__name__", ""))
    return module.split(".")[0] in ("anyio", "asyncio", "trio", "sniffio")


def kind(stage: Stage) -> str:
    if not synchronous(stage):
        return "async"
    if flat(stage):
        children = stage.children
        if (
            type(stage) is FitBatch
            and len(children) == 2
            and type(children[0]) is Gradient
            and type(children[1]) is Update
            # The default step: the first optimizer, committing with it.
            and children[1].optimizer is None
            and children[1].commit
            and Gradient.compute is _GRADIENT_COMPUTE
            and Update.compute is _UPDATE_COMPUTE
            # (a compute set on the instance runs as written: the flat program calls it)
            and "compute" not in children[0].__dict__
            and "compute" not in children[1].__dict__
        ):
            return "default"
        return "flat"
    return "fused"


def signature(stage: Stage) -> tuple[Any, ...]:
    """The methods a batch stage's program is compiled from: every stage's ``run`` and
    ``compute`` (its class's, and one set on the instance) and ``fusable``. A program whose
    signature changed since it was compiled (a method patched after the learner was built) is
    compiled again when a pass starts, so a patch runs as written, fused or not."""
    return tuple(
        (
            type(s).run,
            getattr(type(s), "compute", None),
            s.__dict__.get("run"),
            s.__dict__.get("compute"),
            s.fusable,
        )
        for s in stage.walk()
    )


def synchronous(stage: Stage) -> bool:
    """Whether the stage's whole call can run without the event loop."""
    for plan in (stage._before, stage._after):
        if plan is not None and plan.has_async:
            return False
    if type(stage).__call__ is not Stage.__call__:
        return False
    fusable = stage.fusable
    if fusable is None:
        default_run = ComputeStage.run if isinstance(stage, ComputeStage) else Stage.run
        # A run set on the instance overrides the class's as a subclass's does.
        fusable = type(stage).run is default_run and "run" not in stage.__dict__
    return fusable and all(synchronous(child) for child in stage.children)


def flat(stage: Stage) -> bool:
    """Whether a batch is nothing but its compute leaves' ``compute`` in order: no hooks, the
    default ``run``, and leaves that own no control flow and have no sub-stages."""
    if (
        stage._before is not None
        or stage._after is not None
        or type(stage).run is not Stage.run
        or "run" in stage.__dict__  # (set on the instance: it runs as written)
    ):
        return False
    return all(
        isinstance(child, ComputeStage)
        and type(child).run is ComputeStage.run
        and "run" not in child.__dict__
        and not child.children
        and not child.catches
        and child._before is None
        and child._after is None
        for child in stage.children
    )


def stepped_optimizers(stage: Stage) -> frozenset[str] | None:
    """The names of the optimizers the batch stage's updates step (``""``: the first one,
    ``state.optimizer``); None where a stage of another kind writes the weights."""
    names: set[str] = set()
    for s in stage.walk():
        if isinstance(s, ComputeStage) and s.writes_weights:
            if not isinstance(s, Update):
                return None
            names.add(s.optimizer if s.optimizer is not None else "")
    return frozenset(names)
