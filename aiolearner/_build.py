"""Building a learner: the stage tree, each hook's plan, field lifetimes, the batch programs.

Everything here runs when a :class:`~aiolearner.Learner` is made (and again after
``replace_stage``), never while it trains: misuse found here is a
:class:`~aiolearner.ConfigurationError` before the first batch, and the decisions taken here
(which callbacks run on each hook and in which order, which fields expire when, how each batch
stage runs) cost nothing per batch. ``describe()`` prints what was decided.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._callbacks import Callback, HookMethod
from ._exceptions import ConfigurationError
from ._plan import HookPlan, build_plan, describe_access
from ._stage import ComputeStage, Stage, not_a_stage
from ._stages import FitRun, Update
from ._state import FIELD_LIFETIMES, STAGE_OWNED, split_declaration
from ._validation import bind_states
from ._view import VIEW_ATTRIBUTES

if TYPE_CHECKING:
    from ._data import BatchSource
    from ._learner import Learner

__all__ = ["build", "build_tree", "describe", "replace_in_tree"]


def build(learner: Learner[Any]) -> None:
    """(Re)build a learner from its tree and callbacks: names, plans, lifetimes, programs."""
    rt = learner._rt
    stages = list(learner._root.walk())
    names: dict[str, Stage] = {}
    placed: set[int] = set()
    for stage in stages:
        if id(stage) in placed:
            raise ConfigurationError(
                f"stage {stage.name!r} ({type(stage).__name__}) is in the tree twice: a stage "
                "instance has one place; for a second step of the same kind use a second "
                f"instance of a subclass with its own name (class Second{type(stage).__name__}"
                f"({type(stage).__name__}): name = 'second_{stage.name}')"
            )
        placed.add(id(stage))
        if stage.name in names and names[stage.name] is not stage:
            raise ConfigurationError(
                f"two stages are named {stage.name!r} ({type(names[stage.name]).__name__} and"
                f" {type(stage).__name__}); stage names must be unique in the tree"
            )
        if stage._rt is not None and stage._rt is not rt:
            raise ConfigurationError(
                f"stage {stage.name!r} already belongs to another Learner; create a new one"
            )
        names[stage.name] = stage
    hook_owner = {}
    for stage in stages:
        before, after = stage.hook_names
        hook_owner[before] = stage
        hook_owner[after] = stage
    hooked: dict[str, list[tuple[Callback, HookMethod]]] = {h: [] for h in hook_owner}
    seen: dict[int, Callback] = {}
    for cb in learner._callbacks:
        if id(cb) in seen:
            raise ConfigurationError(
                "the same callback instance is given twice: every one of its hooks would run "
                "twice; pass it once (or two separate instances, if that is what you mean)",
                callbacks=(cb.name,),
            )
        seen[id(cb)] = cb
        _check_state_methods(cb)
        _check_declarations(cb)
        _check_hook_names(cb, hook_owner)
        for hook, method in cb.hooks():
            if hook not in hook_owner:
                known = ", ".join(sorted(hook_owner))
                named = sorted(s.name for s in stages if s.name.startswith("update_"))
                hint = (
                    f"; the updates here are named ({', '.join(named)}): give the callback "
                    "optimizer=<name> if it takes one"
                    if hook in ("before_update", "after_update") and named
                    else ""
                )
                if hook.startswith(("before_update_", "after_update_")) and not named:
                    wanted = hook.split("_update_", 1)[1]
                    hint = (
                        f"; a callback given optimizer={wanted!r} hooks the update of that "
                        "optimizer, but this learner has one optimizer, not a mapping of named"
                        " ones: leave optimizer= out"
                    )
                raise ConfigurationError(
                    f"unknown hook {hook!r}: no stage of this learner is named "
                    f"{hook.split('_', 1)[1]!r} (hooks: {known}){hint}",
                    hook=hook,
                    callbacks=(cb.name,),
                )
            _check_signature(cb, hook, method)
            hooked[hook].append((cb, method))
    _check_places(learner._callbacks)
    state = learner._state
    _check_optimizer_names(stages, state.optimizers)
    for cb in learner._callbacks:
        # A callback that acts through stages of its own (MixedPrecision, EMA's validation)
        # says so when none of this learner's stages serves it: it would do nothing, silently.
        check = getattr(cb, "_check_stages", None)
        problem = None if check is None else check(stages)
        if problem is not None:
            raise ConfigurationError(f"{cb.name} {problem}", callbacks=(cb.name,))
        # One given what belongs to an optimizer (a scheduler, a hyperparameter's name) says
        # when it does not fit the learner's, now rather than when fit starts.
        check = getattr(cb, "_check_optimizers", None)
        problem = None if check is None else check(state.optimizers)
        if problem is not None:
            raise ConfigurationError(f"{cb.name}: {problem}", callbacks=(cb.name,))
    for stage in stages:
        before, after = stage.hook_names
        stage._before = build_plan(before, stage.name, hooked[before], state, learner, rt.trace)
        stage._after = build_plan(after, stage.name, hooked[after], state, learner, rt.trace)
        stage._rt = rt
        stage._context = rt.context
    if learner._root._after is not None:
        learner._root._after.runs_all = True  # the teardown (see HookPlan.runs_all)
    lifetimes = _lifetimes(stages)
    # The built-in per-batch fields expire with every batch, whatever stage sets them.
    for name in ("batch", "output", "loss"):
        lifetimes.setdefault(name, ("fit_batch", "batch"))
    rt.expiring = {
        lifetime: tuple(name for name, (_, life) in lifetimes.items() if life == lifetime)
        for lifetime in ("batch", "epoch", "run")
    }
    rt.batch_fields = rt.expiring["batch"]
    # The built-in fields keep their own explanation (FIELD_LIFETIMES).
    object.__setattr__(
        state,
        "_lifetimes",
        {name: where for name, where in lifetimes.items() if name not in FIELD_LIFETIMES},
    )
    writes = {split_declaration(name)[0] for cb in learner._callbacks for name in cb.writes}
    rt.executor.compile(learner._root, frozenset(FIELD_LIFETIMES) | set(lifetimes) | writes)
    learner._stages = names
    bind_states(learner)

    if rt.strategy is not None:
        rt.strategy._adapt(learner)  # where each plan's control flow is agreed


def _check_state_methods(cb: Callback) -> None:
    """A callback whose state a checkpoint saves must be able to take it back."""
    kind = type(cb)
    if (
        kind.state_dict is not Callback.state_dict
        and kind.load_state_dict is Callback.load_state_dict
    ):
        raise ConfigurationError(
            f"callback {cb.name!r} defines state_dict() but not load_state_dict(): the state it "
            "gives a checkpoint would never be restored when one is loaded; define "
            "load_state_dict(self, state) to restore it",
            callbacks=(cb.name,),
        )


def _check_places(callbacks: Iterable[Callback]) -> None:
    """Two callbacks of one kind writing into one place (two Checkpoints in one directory, two
    CSV loggers on one file) would overwrite, and prune, each other's files."""
    seen: dict[tuple[type, Path], int] = {}
    for i, cb in enumerate(callbacks):
        place = getattr(cb, "_writes_into", None)
        if place is None:
            continue
        first = seen.setdefault((type(cb), Path(place).resolve()), i)
        if first != i:
            raise ConfigurationError(
                f"two {type(cb).__name__} callbacks (callbacks[{first}] and callbacks[{i}]) "
                f"write into {str(place)!r}: they would overwrite each other's files; give "
                "each its own place (or use one callback)",
                callbacks=(cb.name,),
            )


def _check_optimizer_names(stages: Iterable[Stage], optimizers: Mapping[str, Any]) -> None:
    """An ``Update(optimizer=name)`` must name one of the learner's optimizers."""
    for stage in stages:
        if isinstance(stage, Update) and stage.optimizer is not None:
            if stage.optimizer not in optimizers:
                raise ConfigurationError(
                    f"stage {stage.name!r} steps optimizer {stage.optimizer!r}, but the "
                    f"learner's optimizers are {sorted(optimizers)} (Learner(model, "
                    "{name: optimizer, ...}, ...) names them)"
                )


def _lifetimes(stages: Iterable[Stage]) -> dict[str, tuple[str, str]]:
    """Every field the stages declare: name -> (declaring stage, lifetime)."""
    out: dict[str, tuple[str, str]] = {}
    for stage in stages:
        for field, lifetime in stage.fields.items():
            if field in STAGE_OWNED or field in VIEW_ATTRIBUTES or field.startswith("_"):
                raise ConfigurationError(
                    f"stage {stage.name!r} declares field {field!r}, a name it cannot add",
                    field=field,
                )
            earlier = out.get(field)
            if earlier is not None and earlier[1] != lifetime:
                raise ConfigurationError(
                    f"stages {earlier[0]!r} and {stage.name!r} declare field {field!r} with "
                    f"different lifetimes ({earlier[1]!r} and {lifetime!r})",
                    field=field,
                )
            if earlier is None:
                out[field] = (stage.name, lifetime)
    return out


def build_tree(stages: Mapping[str, Stage] | FitRun | None) -> Stage:
    """The stage tree for ``Learner(stages=...)``: the default tree with replacements."""
    if isinstance(stages, FitRun):
        return stages
    root: Stage = FitRun()
    if stages is None:
        return root
    if not isinstance(stages, Mapping):
        raise TypeError("stages must be a mapping of stage name to Stage, or a FitRun")
    known = {s.name: s for s in root.walk()}
    for name, stage in stages.items():
        if not isinstance(stage, Stage):
            raise TypeError(f"stages[{name!r}] must be a Stage, got {not_a_stage(stage)}")
        _check_initialized(stage)
        if name not in known:
            raise ConfigurationError(
                f"stages: no stage named {name!r} in the default tree ({sorted(known)})"
            )
        if name == "fit_run":
            if not isinstance(stage, FitRun):
                raise TypeError("stages['fit_run'] must be a FitRun")
            root = stage
            known = {s.name: s for s in root.walk()}
            continue
        replace_in_tree(root, known[name], stage)
        known = {s.name: s for s in root.walk()}
    return root


def _check_initialized(stage: Stage) -> None:
    """Walk the stage's tree now: one whose ``__init__`` skipped Stage's is refused with a
    message saying so (``Stage.walk``), before the tree is changed."""
    for _ in stage.walk():
        pass


def replace_stage(learner: Learner[Any], name: str, stage: Stage) -> None:
    """The body of :meth:`Learner.replace_stage`: all or nothing (a refused tree leaves the
    learner as it was)."""
    if not isinstance(stage, Stage):
        raise TypeError(f"stage must be a Stage, got {not_a_stage(stage)}: {stage!r}")
    _check_initialized(stage)
    if name not in learner._stages:
        raise KeyError(f"no stage named {name!r}; stages: {sorted(learner._stages)}")
    old_root, old = learner._root, learner._stages[name]
    if name == old_root.name:
        if not isinstance(stage, FitRun):
            raise TypeError("the root stage must be a FitRun")
        learner._root = stage
    else:
        replace_in_tree(learner._root, old, stage)
    try:
        build(learner)
    except BaseException:
        # The old tree back, built again.
        if learner._root is stage:
            learner._root = old_root
        else:
            replace_in_tree(learner._root, stage, old)
        kept = {id(s) for s in learner._root.walk()}
        for s in stage.walk():
            if id(s) not in kept:
                s._rt = None  # free to go into another learner
        build(learner)
        raise


def replace_in_tree(root: Stage, old: Stage, new: Stage) -> None:
    """Put ``new`` in the place of ``old`` under ``root`` (children and named attributes)."""
    for parent in root.walk():
        for attr, value in list(vars(parent).items()):
            if value is old:
                setattr(parent, attr, new)
        parent.children = tuple(new if c is old else c for c in parent.children)


def _check_declarations(cb: Callback) -> None:
    for attr in ("reads", "writes"):
        value = getattr(cb, attr)
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigurationError(
                f"{attr!r} must be a set of field names, got {value!r}", callbacks=(cb.name,)
            )
    for name in (*cb.reads, *cb.writes):
        field, key = split_declaration(name)
        if key == "" or not field:
            raise ConfigurationError(
                f"{name!r} is not a field name nor 'field.key' (a key of a dict field)",
                callbacks=(cb.name,),
                field=name,
            )
    owned = sorted({split_declaration(n)[0] for n in cb.writes} & STAGE_OWNED)
    if owned:
        raise ConfigurationError(
            "counters and the run phase are written by stages only; a callback cannot declare"
            " them in 'writes'",
            callbacks=(cb.name,),
            field=owned[0],
        )
    clash = sorted({split_declaration(n)[0] for n in (*cb.reads, *cb.writes)} & VIEW_ATTRIBUTES)
    if clash:
        raise ConfigurationError(
            f"{clash[0]!r} is a name of the state view itself, not a field",
            callbacks=(cb.name,),
            field=clash[0],
        )
    if isinstance(cb.after, str | type):
        hint = (
            " (a string: name the class itself, in a tuple: after = (Metrics,))"
            if isinstance(cb.after, str)
            else f" (write after = ({cb.after.__name__},))"
        )
        raise ConfigurationError(
            f"'after' must be a tuple or list of Callback classes, got {cb.after!r}{hint}",
            callbacks=(cb.name,),
        )
    for t in cb.after:
        if not (isinstance(t, type) and issubclass(t, Callback)):
            raise ConfigurationError(
                f"'after' must list Callback classes, got {t!r}", callbacks=(cb.name,)
            )


#: Hook methods of other libraries' callbacks (Lightning's, Keras'), with where the same code
#: goes here (docs/coming-from.md): a ported callback keeping one would never be called.
FOREIGN_HOOKS = {
    "on_fit_start": "before_fit_run",
    "on_fit_end": "after_fit_run",
    "on_train_start": "before_fit_run",
    "on_train_end": "after_fit_run",
    "on_train_begin": "before_fit_run",
    "on_train_epoch_start": "before_fit (the training pass) or before_epoch",
    "on_train_epoch_end": "after_fit (the training pass) or after_epoch",
    "on_epoch_begin": "before_epoch",
    "on_epoch_end": "after_epoch",
    "on_train_batch_start": "before_fit_batch",
    "on_train_batch_begin": "before_fit_batch",
    "on_train_batch_end": "after_fit_batch",
    "on_batch_begin": "before_fit_batch",
    "on_batch_end": "after_fit_batch",
    "on_before_backward": "before_gradient",
    "on_after_backward": "after_gradient",
    "on_before_optimizer_step": "before_update",
    "on_before_zero_grad": "before_update",
    "on_validation_start": "before_validate",
    "on_validation_end": "after_validate",
    "on_validation_epoch_start": "before_validate",
    "on_validation_epoch_end": "after_validate",
    "on_validation_batch_start": "before_validate_batch",
    "on_validation_batch_end": "after_validate_batch",
    "on_test_begin": "before_validate",
    "on_test_end": "after_validate",
    "on_exception": "after_fit_run (state.outcome says how the run ended)",
    "on_save_checkpoint": "the callback's state_dict()",
    "on_load_checkpoint": "the callback's load_state_dict()",
}


def _normalized(name: str) -> str:
    return name.replace("_", "").lower()


def _check_hook_names(cb: Callback, hooks: Mapping[str, Stage]) -> None:
    """A method meant as a hook that would never be called: one of another library's hook
    names, a near miss of a hook's name (``befor_epoch``, ``afterEpoch``), or a hook name
    bound to something that cannot be called."""
    base = set(dir(Callback))
    known = {_normalized(h): h for h in hooks}
    for attr in dir(type(cb)):
        if attr in base or attr.startswith("_"):
            continue
        value = getattr(type(cb), attr, None)
        if attr.startswith(("before_", "after_")):
            if attr in hooks and not callable(value) and not isinstance(value, property):
                raise ConfigurationError(
                    f"{attr!r} of {cb.name} is named as a hook but is a "
                    f"{type(value).__name__}, not a method: it would never be called",
                    hook=attr,
                    callbacks=(cb.name,),
                )
            continue
        if not callable(value):
            continue
        if attr in FOREIGN_HOOKS:
            hint = f"here: {FOREIGN_HOOKS[attr]}"
        elif _normalized(attr) in known:
            hint = f"did you mean {known[_normalized(attr)]!r}?"
        else:
            close = difflib.get_close_matches(attr, list(hooks), n=1, cutoff=0.85)
            if not close:
                continue
            hint = f"did you mean {close[0]!r}?"
        raise ConfigurationError(
            f"{cb.name} has a method {attr!r}, which no stage calls: hooks are named "
            f"before_<stage> / after_<stage>; {hint} (docs/coming-from.md lists the hooks of "
            "other libraries' callbacks and where they go; rename a helper method with a "
            "leading underscore)",
            hook=attr,
            callbacks=(cb.name,),
        )


def _check_signature(cb: Callback, hook: str, method: Any) -> None:
    fn = method
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigurationError(
            f"hook {hook!r} of {cb.name} is a generator function (it contains 'yield'): calling "
            "it would only make a generator, and its body would never run; remove the 'yield'",
            hook=hook,
            callbacks=(cb.name,),
        )
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    params = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    extra_required = [
        p for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    if extra_required or not (len(params) == 1 or (not params and takes_varargs)):
        raise ConfigurationError(
            f"hook {hook!r} of {cb.name} must take exactly one argument (the state view), "
            f"its signature is {sig}",
            hook=hook,
            callbacks=(cb.name,),
        )


def _fetching(source: BatchSource) -> str:
    """How a source is fetched: its ``fetch`` option and, for ``"auto"``, what was decided."""
    if source.is_async:
        return "async iterable (a producer task)"
    if source.fetch != "auto":
        return f"fetch={source.fetch}"
    if source.kept_inline is not None:
        return f"fetch=auto: inline, found slow but kept inline ({source.kept_inline})"
    return f"fetch=auto: {'a producer thread (found slow)' if source.slow else 'inline'}"


def describe(learner: Learner[Any]) -> str:
    """A readable tree: stages, each hook's callbacks in run order, declared access."""
    lines = []
    programs = learner._rt.executor.programs

    def plan_lines(plan: HookPlan | None, indent: str) -> None:
        if plan is None:
            return
        lines.append(f"{indent}{plan.hook}:")
        for i, layer in enumerate(plan.layers):
            together = [*layer.sync, *layer.concurrent]
            kind = "concurrently" if len(layer.concurrent) > 1 else "in order"
            lines.append(f"{indent}  [{i + 1}] {kind}:")
            for entry in together:
                mode = "async" if entry.is_async else "def"
                lines.append(f"{indent}    - {entry.name} ({mode})")

    def walk(stage: Stage, depth: int) -> None:
        indent = "  " * depth
        program = programs.get(id(stage))
        # A fused batch runs as one call without the event loop; the others are awaited.
        extra = " [fused batch]" if program is not None and program.synchronous else ""
        kind = " compute" if isinstance(stage, ComputeStage) else ""
        lines.append(f"{indent}{type(stage).__name__} ({stage.name}){kind}{extra}")
        own = {k: v for k, v in stage.fields.items() if k not in FIELD_LIFETIMES}
        if own:
            fields = ", ".join(f"{k} (for one {v})" for k, v in own.items())
            lines.append(f"{indent}  adds fields: {fields}")
        plan_lines(stage._before, indent + "  ")
        for child in stage.children:
            walk(child, depth + 1)
        plan_lines(stage._after, indent + "  ")

    walk(learner._root, 0)
    policy = learner._rt.policy
    lines.append(f"compute: {policy.mode} (max_blocking={policy.max_blocking}s)")
    rt = learner._rt
    beside = rt.validator is not None and rt.validator.concurrent
    for source in (rt.train, *rt.val_sets.values()):
        line = f"data: {source.name}: {_fetching(source)}"
        if beside and source is not rt.train:
            # Inline or not, its fetches run while training computes (concurrent-validation.md).
            line += "; validated concurrently, so what it draws is drawn beside training"
        lines.append(line)
    if learner._rt.strategy is not None:
        lines.append(learner._rt.strategy.describe())
    if learner._callbacks:
        lines.append("callbacks:")
        for cb in learner._callbacks:
            hooks = ", ".join(h for h, _ in cb.hooks()) or "-"
            after = ", ".join(t.__name__ for t in cb.after) or "-"
            lines.append(
                f"  {cb.name}: reads {describe_access(cb.reads)}, writes "
                f"{describe_access(cb.writes)}, after {after}; hooks {hooks}"
            )
    return "\n".join(lines)
