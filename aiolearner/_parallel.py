"""Running independent sub-stages at the same time: :class:`Parallel`.

Each branch runs on a *branch state* of its own, a shallow copy of the state ``Parallel`` was
called with, so the fields a stage sets for the current batch (``batch``, ``output``, ``loss``)
cannot collide; the hooks of every stage in a branch see that branch's state. When all branches
have finished, the fields each branch set or cleared are applied to the parent state; two
branches changing the same field is an error (``stop_reason`` excepted: the last branch in order
wins), because which value should win depends on the stages, not on timing. ``metrics`` is
handled key by key: each branch writes into a copy of the dict, the keys each branch set or
removed are applied to the parent's dict, and two branches changing one key is an error. Other
objects the fields point to (``model``, ``optimizer``) are shared, not copied.

Errors and cancellation follow the rules of concurrent callbacks on one hook (``_plan.py``):

* a control-flow exception a branch does not own (StopFit, StopEpoch, ...) cancels nothing: every
  branch finishes, the changes are applied, then the strongest one is raised;
* any other exception cancels the other branches and always comes out in an
  :class:`ExceptionGroup` (also when one branch failed alone), since whether the failing code ran
  next to another is the reason for the group, not a detail;
* cancelling the stage (or the run around it) cancels every branch; nothing is applied.

In compute ``"thread"`` mode, each branch hops to worker threads through a lane of its own, so
two branches' compute overlaps (each branch's own stages still run one at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from ._exceptions import ControlFlow, StageError
from ._plan import build_plan, stronger
from ._runtime import compute_lane
from ._stage import Stage
from ._state import State

if TYPE_CHECKING:
    from ._callbacks import Callback, HookMethod
    from ._learner import Learner

__all__ = ["Parallel", "rebind"]

_MISSING: Any = object()
#: Fields holding a dict that branches write key by key (each branch gets a copy).
_KEYED = ("metrics",)


class Parallel(Stage):
    """Runs its sub-stages at the same time, each on its own copy of the state.

    Args:
        *stages: the branches; independent stages (they must not read what another one sets).
        name: the stage's name in the tree (and of its hooks, ``before_<name>``/``after_<name>``);
            needed when a learner has more than one Parallel.

    Raises:
        ExceptionGroup: a branch failed (the others were cancelled).
        StageError: two branches changed the same field of the state (a ``RuntimeError``).

    Example:
        Validate the raw model and its EMA copy at once, each writing its own result field::

            >>> both = Parallel(ValidateRaw(), ValidateEMA(), name="validate")
            >>> learner = Learner(model, opt, loss_fn, train, val, stages={"validate": both})
    """

    name = "parallel"

    def __init__(self, *stages: Stage, name: str | None = None) -> None:
        if not stages:
            raise ValueError("Parallel needs at least one stage")
        for stage in stages:
            if not isinstance(stage, Stage):
                raise TypeError(f"Parallel takes stages, got {type(stage).__name__}")
        super().__init__(*stages)
        if name is not None:
            self.__dict__["name"] = name
        #: The state each branch runs on (hooks of the branch's stages are bound to it).
        self.branch_states: tuple[State, ...] = tuple(State() for _ in stages)

    async def run(self, state: State) -> None:
        children = self.children
        branches = self.branch_states
        # Per run: a limiter belongs to the event loop it was first used in.
        lanes = [anyio.CapacityLimiter(1) for _ in children]
        starts: list[dict[str, Any]] = []
        for branch in branches:
            d = branch.__dict__
            d.clear()
            d.update(state.__dict__)
            for key in _KEYED:
                if type(d.get(key)) is dict:
                    d[key] = dict(d[key])
            branch.__class__ = type(state)
            starts.append(dict(d))
        flows: list[ControlFlow | None] = [None] * len(children)
        try:
            try:
                async with anyio.create_task_group() as tg:
                    for i, child in enumerate(children):
                        tg.start_soon(
                            self._branch,
                            i,
                            child,
                            branches[i],
                            lanes[i],
                            flows,
                            name=f"aiolearner.parallel.{self.name}.{child.name}",
                        )
            except ExceptionGroup as group:
                raise ExceptionGroup(
                    f"error in a branch of parallel stage {self.name!r}", list(group.exceptions)
                ) from None
            self._apply(state, starts)
        finally:
            for branch in branches:
                # Drop what the branches referenced (batches, outputs) until the next run.
                branch.__class__ = State
                d = branch.__dict__
                for key in [k for k in d if not k.startswith("_")]:
                    del d[key]
        pending: ControlFlow | None = None
        for flow in flows:
            if flow is not None:
                pending = stronger(pending, flow)
        if pending is not None:
            raise pending

    @staticmethod
    async def _branch(
        i: int,
        child: Stage,
        branch: State,
        lane: anyio.CapacityLimiter,
        flows: list[ControlFlow | None],
    ) -> None:
        compute_lane.set(lane)  # this task's context only
        try:
            await child(branch)
        except ControlFlow as flow:
            flows[i] = flow

    def _apply(self, state: State, starts: list[dict[str, Any]]) -> None:
        changes: dict[str, tuple[int, Any]] = {}
        # (field, key) -> (branch, value): the keys branches changed in their copy of a dict.
        keyed: dict[tuple[str, str], tuple[int, Any]] = {}
        parent = state.__dict__
        for i, (branch, before) in enumerate(zip(self.branch_states, starts, strict=True)):
            after = branch.__dict__
            for key in before.keys() | after.keys():
                if key.startswith("_"):
                    continue
                new = after.get(key, _MISSING)
                if before.get(key, _MISSING) is new:
                    old = parent.get(key)
                    if key in _KEYED and type(new) is dict and type(old) is dict and new is not old:
                        self._changed_keys(i, key, old, new, keyed)
                    continue
                if key in changes and key != "stop_reason":
                    self._conflict(changes[key][0], i, f"state field {key!r}")
                changes[key] = (i, new)
        for (field, _), (i, _) in keyed.items():
            if field in changes:
                self._conflict(changes[field][0], i, f"state field {field!r}")
        for key, (_, value) in changes.items():
            if value is _MISSING:
                state.invalidate(key)
            else:
                setattr(state, key, value)
        for (field, key), (_, value) in keyed.items():
            if value is _MISSING:
                del parent[field][key]
            else:
                parent[field][key] = value

    def _changed_keys(
        self,
        i: int,
        field: str,
        original: dict[str, Any],
        copy: dict[str, Any],
        keyed: dict[tuple[str, str], tuple[int, Any]],
    ) -> None:
        """Record the keys branch ``i`` set or removed in its copy of ``original``."""
        for key in original.keys() | copy.keys():
            new = copy.get(key, _MISSING)
            if original.get(key, _MISSING) is new:
                continue
            if (field, key) in keyed:
                self._conflict(keyed[field, key][0], i, f"key {key!r} of state.{field}")
            keyed[field, key] = (i, new)

    def _conflict(self, first: int, second: int, what: str) -> None:
        raise StageError(
            f"branches {self.children[first].name!r} and {self.children[second].name!r} both "
            f"changed {what}; let each branch write a field (or key) of its own",
            stage=self.name,
        )


def rebind(learner: Learner[Any], overrides: dict[int, State]) -> None:
    """Rebuild the hook plans of the subtrees in ``overrides`` (by stage id) on their states.

    A subtree inherits its parent's state unless it has an override of its own (a Parallel inside
    a concurrently validated stage binds its branches to their branch states).
    """
    hooked: dict[str, list[tuple[Callback, HookMethod]]] = {}
    for cb in learner._callbacks:
        for hook, method in cb.hooks():
            hooked.setdefault(hook, []).append((cb, method))
    trace = learner._trace

    def walk(stage: Stage, state: State | None) -> None:
        state = overrides.get(id(stage), state)
        if state is not None:
            for hook in stage.hook_names:
                plan = build_plan(hook, stage.name, hooked.get(hook, []), state, learner, trace)
                if hook.startswith("before_"):
                    stage._before = plan
                else:
                    stage._after = plan
        for child in stage.children:
            walk(child, state)

    walk(learner._root, None)
