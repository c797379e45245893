"""Turning callbacks' declarations into a run plan per hook, and running it.

Decided once, when the learner is built:

* which callbacks sit on each hook (a hook nobody uses gets no plan at all: ``None``);
* their order, from ``after`` declarations and from reads-after-writes: a callback that reads a
  field another callback on the hook writes runs after it;
* which orders are impossible (two unordered writers of one field, cycles) -> ConfigurationError;
* keys of dict fields: a declaration ``"metrics.best"`` names one key of ``metrics``. Two writers
  of different keys need no order; two writers of one key, or a writer of the whole field and a
  writer of any of its keys, are two writers of one thing. A reader of the whole field runs after
  the writers of its keys; a reader of one key, after the writers of that key (or of the whole);
* the *layers*: callbacks with no order between them share a layer. In a layer, ``def`` hooks are
  called inline, one ``async def`` hook is simply awaited, and only two or more ``async def``
  hooks open a task group. So a task group, which costs more than a small model's whole step
  (docs/performance.md), is paid for only where concurrency is.

The rules for exceptions, decided once (docs/errors.md):

* a control-flow exception (SkipBatch, StopEpoch, StopFit) does not cancel anything: the whole
  hook finishes, then the strongest one is raised for the owning stage;
* any other exception of a callback cancels the hook's other callbacks and always comes out as an
  ``ExceptionGroup``, even when one callback failed alone. Whether a hook's callbacks ran
  concurrently is a detail of the plan, so it must not change what the caller has to catch.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ._callbacks import Callback, HookMethod, is_async_hook
from ._dist._comm import CONCURRENT
from ._exceptions import ConfigurationError, ControlFlow, SkipBatch, StopEpoch, StopFit
from ._stage import epoch_words
from ._state import State, declared_key, split_declaration
from ._sync import event_loop_running
from ._view import StateView

if TYPE_CHECKING:
    from ._trace import Trace

__all__ = ["HookPlan", "HookProgress", "build_plan", "describe_access", "stronger"]

_RANK = {SkipBatch: 1, StopEpoch: 2, StopFit: 3}


def stronger(a: ControlFlow | None, b: ControlFlow) -> ControlFlow:
    """Of two control-flow exceptions, the one that ends more (StopFit > StopEpoch > SkipBatch)."""
    if a is None:
        return b
    rank_a = max((r for t, r in _RANK.items() if isinstance(a, t)), default=0)
    rank_b = max((r for t, r in _RANK.items() if isinstance(b, t)), default=0)
    return b if rank_b > rank_a else a


@dataclass(slots=True)
class Entry:
    """One callback's hook method in a plan."""

    callback: Callback
    name: str
    fn: HookMethod
    is_async: bool
    view: StateView
    #: The callback's position in the learner's callbacks (stable across processes).
    index: int


@dataclass(slots=True)
class Layer:
    """Callbacks with no order between them."""

    sync: list[Entry]
    concurrent: list[Entry]


def _note(exc: BaseException, entry: Entry, hook: str, stage: str) -> None:
    d = entry.view._state.__dict__
    exc.add_note(
        f"aiolearner: raised by callback {entry.name!r} in hook {hook!r} (stage {stage!r}) "
        f"at {epoch_words(d.get('epoch'))}, step {d.get('step')}"
    )
    if _loop_refused(exc) and not event_loop_running():
        # Trio's cancel scopes, for one, refuse to be used from another thread.
        exc.add_note(
            "aiolearner: this def hook ran in the compute worker thread, off the event loop, "
            "whose objects (a cancel scope, an event, a task group) it must not use: hand such "
            "work to the loop with state.start_soon(...), stop the run with StopFit, or make "
            "the hook async def (docs/writing-callbacks.md)"
        )


def _returned(result: object) -> None:
    """A hook returned something (its value is otherwise ignored): an exception it meant to
    raise, or a coroutine a ``def`` hook made and did not await, would silently do nothing.
    (The error is noted with the callback and hook like any other.)"""
    if isinstance(result, BaseException) or (
        isinstance(result, type) and issubclass(result, BaseException)
    ):
        shown = result.__name__ if isinstance(result, type) else repr(result)
        raise TypeError(
            f"the hook returned {shown} instead of raising it, which would do nothing: write "
            f"`raise {shown}`"
        )
    if inspect.iscoroutine(result):  # (a Task or a Future returned runs all the same)
        result.close()  # (no "never awaited" warning on top of this error)
        raise TypeError(
            f"the hook returned {type(result).__name__} {result!r} without awaiting it, so it "
            "would never run: make the hook `async def` and `await` it"
        )


def _loop_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is an event loop refusing a call from outside it (trio's "must be called
    from async context", anyio's and asyncio's "no event loop")."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("async context" in text or "event loop" in text)


class HookPlan:
    """The precomputed run order of one hook."""

    def __init__(
        self, hook: str, stage: str, layers: list[Layer], trace: Trace | None = None
    ) -> None:
        self.hook = hook
        self.stage = stage
        self.layers = layers
        self.trace = trace
        self.has_async = any(e.is_async for layer in layers for e in layer.concurrent)
        #: Set on the hooks of an epoch's tail (``after_fit``, ``after_validate``,
        #: ``after_epoch``) by their owner: see :meth:`run`.
        self.progress: HookProgress | None = None
        #: Set on the run's teardown hook (``after_fit_run``) by the build: every callback runs
        #: whatever another one raised (a failing logger must not keep the final checkpoint
        #: from being written), and the errors come out together at the end.
        self.runs_all = False

    @property
    def entries(self) -> list[Entry]:
        return [e for layer in self.layers for e in (*layer.sync, *layer.concurrent)]

    def _group(self, excs: Sequence[Exception]) -> ExceptionGroup[Exception]:
        return ExceptionGroup(
            f"callback error in hook {self.hook!r} (stage {self.stage!r})", list(excs)
        )

    def _enter(self, entry: Entry) -> float:
        assert self.trace is not None
        d = entry.view._state.__dict__
        return self.trace.enter(entry.name, self.hook, d.get("epoch"), d.get("step"))

    def _exit(self, entry: Entry, start: float) -> None:
        assert self.trace is not None
        d = entry.view._state.__dict__
        self.trace.exit(entry.name, self.hook, d.get("epoch"), d.get("step"), start)

    def _call(self, entry: Entry, errors: list[Exception] | None = None) -> ControlFlow | None:
        """One ``def`` hook; its control flow is returned, to be raised when the hook is done.
        ``errors``: where its error goes instead of out (see :attr:`runs_all`)."""
        trace = self.trace
        start = self._enter(entry) if trace is not None else 0.0
        try:
            result = entry.fn(entry.view)
            if result is not None:
                _returned(result)
        except ControlFlow as flow:
            flow.raised_in = (entry.name, self.hook)
            return flow
        except Exception as exc:
            _note(exc, entry, self.hook, self.stage)
            if errors is not None:
                errors.append(exc)
                return None
            raise self._group([exc]) from None
        finally:
            if trace is not None:
                self._exit(entry, start)
        return None

    async def _acall(
        self,
        entry: Entry,
        flows: list[ControlFlow] | None = None,
        done: dict[int, ControlFlow | None] | None = None,
        errors: list[Exception] | None = None,
    ) -> ControlFlow | None:
        """One ``async def`` hook, awaited (alone in its layer: ``flows`` is None, an error comes
        out grouped) or as a task of the layer's group (errors go to the group, flows to
        ``flows``). ``done``: a tracked hook's finished callbacks (see :meth:`run`)."""
        trace = self.trace
        start = self._enter(entry) if trace is not None else 0.0
        # Run as a task next to others (flows given): its order differs between ranks, so a
        # distributed strategy refuses collectives here (a task's context is its own copy).
        marked = CONCURRENT.set(entry.name) if flows is not None else None
        try:
            result = await entry.fn(entry.view)  # type: ignore[misc]
            if result is not None:
                _returned(result)
            if done is not None:
                done[entry.index] = None
        except ControlFlow as flow:
            flow.raised_in = (entry.name, self.hook)
            if done is not None:
                done[entry.index] = flow
            if flows is None:
                return flow
            flows.append(flow)
        except Exception as exc:
            _note(exc, entry, self.hook, self.stage)
            if errors is not None:
                errors.append(exc)
                return None
            if flows is None:
                raise self._group([exc]) from None
            raise
        finally:
            if marked is not None:
                CONCURRENT.reset(marked)
            if trace is not None:
                self._exit(entry, start)
        return None

    async def run(self) -> None:
        """Run the plan. A plan of ``def`` hooks only never suspends, so a batch compiled to run
        without the event loop can run it too (see _executor.py).

        A hook of an epoch's tail (``after_fit``, ``after_validate``, ``after_epoch``) is
        *tracked*: its owner sets :attr:`progress`, where the run remembers which callbacks have
        finished the hook for the record the state holds (its epoch, step and phase), until the
        hook is over. An interrupted run of the hook (an error, a cancellation) leaves that list
        behind, and checkpoints keep it: when the resumed run gets to the hook again for the
        same record, the callbacks that had finished are not called a second time (an
        early-stopping counter counts the epoch once), and the control flow they raised then
        is raised when the hook is done (the early stop is not lost).
        """
        progress = self.progress
        done: dict[int, ControlFlow | None] | None = None
        pending: ControlFlow | None = None
        errors: list[Exception] | None = [] if self.runs_all else None
        if progress is not None:
            d = self.entries[0].view._state.__dict__
            at = (d.get("epoch"), d.get("step"), d.get("phase"))
            known = progress.get(self.hook)
            done = dict(known[1]) if known is not None and known[0] == at else {}
            progress[self.hook] = (at, done)
            for flow in done.values():
                if flow is not None:
                    pending = stronger(pending, flow)
        for layer in self.layers:
            for entry in layer.sync:
                if done is not None and entry.index in done:
                    continue
                flow = self._call(entry, errors)
                if done is not None:
                    done[entry.index] = flow  # it returned or raised control flow: it is done
                if flow is not None:
                    pending = stronger(pending, flow)
            concurrent = layer.concurrent
            if done is not None:
                concurrent = [e for e in concurrent if e.index not in done]
            if len(concurrent) == 1:
                flow = await self._acall(concurrent[0], done=done, errors=errors)
                if flow is not None:
                    pending = stronger(pending, flow)
            elif concurrent:
                flows: list[ControlFlow] = []
                try:
                    async with anyio.create_task_group() as tg:
                        for entry in concurrent:
                            tg.start_soon(self._acall, entry, flows, done, errors, name=entry.name)
                except ExceptionGroup as group:
                    # anyio already grouped them; re-label so the hook is named.
                    raise self._group(group.exceptions) from None
                for caught in flows:
                    pending = stronger(pending, caught)
        if errors:
            raise self._group(errors)
        if progress is not None:
            del progress[self.hook]
        if pending is not None:
            raise pending

    async def run_within(self, seconds: float) -> list[str]:
        """Run the plan shielded from cancellation and cut off after ``seconds``; the names of
        the callbacks whose hook had not finished when it was cut off (none: it finished)."""
        outer = self.progress
        progress: HookProgress = {} if outer is None else outer
        self.progress = progress  # (tracked for this run: which callbacks are done)
        try:
            with anyio.move_on_after(seconds, shield=True) as scope:
                await self.run()
        finally:
            self.progress = outer
        if not scope.cancelled_caught:
            return []
        done = progress.get(self.hook, (None, {}))[1]
        return [entry.name for entry in self.entries if entry.index not in done]


#: What the tracked hooks of a record have done: hook -> ((epoch, step, phase), callbacks done,
#: by their index in the learner's callbacks, with the control flow each raised, if any).
HookProgress = dict[str, tuple[tuple[Any, Any, Any], dict[int, ControlFlow | None]]]


def _declared(cb: Callback, attr: str) -> frozenset[str]:
    value = getattr(cb, attr)
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(
            f"{attr!r} must be a set of field names, got {value!r}", callbacks=(cb.name,)
        )
    return frozenset(value)


def _overlaps(
    first: frozenset[str], second: frozenset[str], sets: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """Pairs of declarations, one from each set, that name the same thing: one field, or a
    field and one of its keys, or keys of one field that some pass lets both touch (sorted, for
    stable messages). ``sets`` names the validation sets, whose keys a declaration covers (see
    :func:`~aiolearner._state.declared_key`)."""
    out = []
    for a in sorted(first):
        field_a, key_a = split_declaration(a)
        for b in sorted(second):
            field_b, key_b = split_declaration(b)
            if field_a == field_b and (
                key_a is None or key_b is None or _same_key(field_a, key_a, key_b, sets)
            ):
                out.append((a, b))
    return out


def _same_key(field: str, a: str, b: str, sets: Sequence[str]) -> bool:
    """Whether a pass lets declarations of keys ``a`` and ``b`` of ``field`` touch one key.

    A declared key covers itself and every key it stands for in some pass (``val_acc`` covers
    ``test_acc`` and ``val_<set>_acc``), so two declarations meet when they are equal or one
    stands for the other in the training's validation or in a test.
    """
    if a == b:
        return True
    return any(
        declared_key(field, x, phase, sets) == y
        for x, y in ((a, b), (b, a))
        for phase in ("validate", "test")
    )


def _write_conflict(hook: str, a: Callback, b: Callback, pair: tuple[str, str]) -> None:
    mine, theirs = pair
    # ``after`` takes types: two instances of one class cannot be ordered by it.
    order = (
        "give them different keys (two instances of one class cannot be ordered by 'after')"
        if type(a) is type(b)
        else "add one to the other's 'after'"
    )
    if mine == theirs:
        what = "the same key of a field" if "." in mine else "the same field"
        problem = f"two callbacks write {what} with no declared order between them; {order}"
    elif "." in mine and "." in theirs:
        problem = (
            f"two callbacks write {mine!r} and {theirs!r}, which name the same key in some pass "
            "(a key declared as for a single validation set covers its 'test_' and "
            f"'val_<set>_' forms), with no declared order between them; {order}"
        )
    else:
        whole, keyed = (mine, theirs) if "." in theirs else (theirs, mine)
        problem = (
            f"one callback writes the whole field {whole!r} and the other writes its key "
            f"{keyed!r}, with no declared order between them; declare the keys each one writes "
            f"(writes={{'{whole}.<key>'}}) or {order}"
        )
    raise ConfigurationError(problem, hook=hook, callbacks=(a.name, b.name), field=mine)


def describe_access(names: frozenset[str] | set[str]) -> str:
    """Declared names for ``describe()``: the fields, then the keys of fields declared by key:
    ``['metrics', 'validation'] (metrics keys: best_val_loss)``."""
    whole: set[str] = set()
    keys: dict[str, list[str]] = {}
    for name in names:
        field, key = split_declaration(name)
        if key is None:
            whole.add(field)
        else:
            keys.setdefault(field, []).append(key)
    fields = sorted(whole | keys.keys())
    if not fields:
        return "-"
    parts = [
        f"{field} keys: {', '.join(sorted(ks))}"
        for field, ks in sorted(keys.items())
        if field not in whole
    ]
    return f"{fields}" + (f" ({'; '.join(parts)})" if parts else "")


def _must_follow(later: Callback, earlier: Callback) -> bool:
    return any(isinstance(earlier, t) for t in later.after)


def _issues_collectives(cb: Callback) -> bool:
    return bool(getattr(cb, "collectives", False))


def _order(
    hook: str, cbs: list[Callback], distributed: bool = False, sets: Sequence[str] = ()
) -> list[list[int]]:
    """Topological layers of the callbacks on one hook (indices into ``cbs``); ``sets``: the
    names of the validation sets (see :func:`_overlaps`)."""
    n = len(cbs)
    reads = [_declared(cb, "reads") for cb in cbs]
    writes = [_declared(cb, "writes") for cb in cbs]
    succ: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = cbs[i], cbs[j]
            a_then_b, b_then_a = _must_follow(b, a), _must_follow(a, b)
            if a_then_b and b_then_a:
                raise ConfigurationError(
                    "ordering cycle: each callback declares it runs 'after' the other",
                    hook=hook,
                    callbacks=(a.name, b.name),
                )
            if not (a_then_b or b_then_a):
                both = _overlaps(writes[i], writes[j], sets)
                if both:
                    _write_conflict(hook, a, b, both[0])
                b_reads_a = [read for _, read in _overlaps(writes[i], reads[j], sets)]
                a_reads_b = [read for _, read in _overlaps(writes[j], reads[i], sets)]
                if b_reads_a and a_reads_b:
                    raise ConfigurationError(
                        f"ordering cycle: {b.name!r} reads {b_reads_a[0]!r} written by "
                        f"{a.name!r}, which reads {a_reads_b[0]!r} written by {b.name!r}",
                        hook=hook,
                        callbacks=(a.name, b.name),
                        field=b_reads_a[0],
                    )
                a_then_b, b_then_a = bool(b_reads_a), bool(a_reads_b)
            if (
                distributed
                and not (a_then_b or b_then_a)
                and (_issues_collectives(a) or _issues_collectives(b))
            ):
                # A callback issuing collectives runs alone, in the callbacks' order: the same
                # order on every rank.
                a_then_b = True
            if a_then_b:
                succ[i].add(j)
            if b_then_a:
                succ[j].add(i)
    indegree = [0] * n
    for s in succ:
        for j in s:
            indegree[j] += 1
    layers: list[list[int]] = []
    ready = [i for i in range(n) if indegree[i] == 0]
    placed = 0
    while ready:
        layers.append(ready)
        placed += len(ready)
        nxt = []
        for i in ready:
            for j in sorted(succ[i]):
                indegree[j] -= 1
                if indegree[j] == 0:
                    nxt.append(j)
        ready = sorted(nxt)
    if placed != n:
        stuck = tuple(cbs[i].name for i in range(n) if indegree[i] > 0)
        raise ConfigurationError("ordering cycle among callbacks", hook=hook, callbacks=stuck)
    return layers


def set_names(learner: Any, sets: Any = None) -> list[str]:
    """The names of the learner's validation sets (or of ``sets``), for :func:`_order`."""
    return [name for name in (getattr(learner, "_val_sets", {}) if sets is None else sets) if name]


def check_sets(learner: Any, stages: Iterable[Any], sets: Any) -> None:
    """Refuse a pass over validation sets of other names than the learner's when its callbacks'
    declarations would meet on their keys otherwise than the hooks' plans allow for: plans are
    built (and checked) for the learner's own sets."""
    built, now = set_names(learner), set_names(learner, sets)
    if sorted(built) == sorted(now):
        return
    distributed = getattr(learner, "_strategy", None) is not None
    for stage in stages:
        for plan in (stage._before, stage._after):
            if plan is None:
                continue
            cbs = [e.callback for layer in plan.layers for e in layer.sync + layer.concurrent]
            if len(cbs) < 2:
                continue
            names = [
                [cbs[i].name for i in layer] for layer in _order(plan.hook, cbs, distributed, now)
            ]
            if names != [
                [cbs[i].name for i in layer] for layer in _order(plan.hook, cbs, distributed, built)
            ]:
                raise ConfigurationError(
                    f"with validation sets named {sorted(now)}, the callbacks' declared keys "
                    "would need another order than the one worked out for the learner's own "
                    f"sets ({sorted(built) or 'one unnamed set'}); declare keys as for a single "
                    "set ('metrics.val_acc' covers every set) or give the learner these sets "
                    "as val_data",
                    hook=plan.hook,
                    callbacks=tuple(cb.name for cb in cbs),
                )


def build_plan(
    hook: str,
    stage: str,
    hooked: list[tuple[Callback, HookMethod]],
    state: State,
    learner: Any,
    trace: Trace | None,
) -> HookPlan | None:
    """The plan of one hook, or ``None`` when no callback uses it (so it costs nothing)."""
    if not hooked:
        return None
    cbs = [cb for cb, _ in hooked]
    layers = []
    everyone = list(getattr(learner, "_callbacks", ()))
    distributed = getattr(learner, "_strategy", None) is not None
    for indices in _order(hook, cbs, distributed, set_names(learner)):
        layer = Layer([], [])
        for i in indices:
            cb, fn = hooked[i]
            view = StateView(
                state,
                learner,
                callback=cb.name,
                hook=hook,
                reads=_declared(cb, "reads"),
                writes=_declared(cb, "writes"),
            )
            is_async = is_async_hook(fn)
            index = next((k for k, c in enumerate(everyone) if c is cb), i)
            (layer.concurrent if is_async else layer.sync).append(
                Entry(cb, cb.name, fn, is_async, view, index)
            )
        layers.append(layer)
    return HookPlan(hook, stage, layers, trace)
