"""A learner's runs: its status, the scope each public coroutine runs in, background work, fit.

Every public coroutine of :class:`Learner` (``fit``, ``validate``, ``test``, ``predict``) runs
inside :func:`running`: the learner's status, its task group, the compute worker, the run's
event stream and the expiry of run-scoped fields are set up and torn down there, in one place.
:func:`fit` is ``Learner.fit``'s body (its checks, ``resume``, signals); the methods on the
class keep the documented API and delegate here.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from . import _checks, _persist
from ._exceptions import ConfigurationError, ControlFlow, LearnerBusyError, StageError
from ._signals import Interrupted, StoppableRun
from ._stage import split_batch
from ._stages import Fit, FitBatch, Gradient, Update, ValidateLoss
from ._state import FIELD_LIFETIMES, split_declaration

if TYPE_CHECKING:
    from ._learner import Learner

__all__ = ["LearnerStatus", "check_fit", "fit", "running", "start_background", "verb"]


class LearnerStatus(enum.Enum):
    """What a learner is doing; each public coroutine may only start from ``IDLE``."""

    IDLE = "idle"
    FITTING = "fitting"
    VALIDATING = "validating"
    TESTING = "testing"
    PREDICTING = "predicting"


def verb(status: LearnerStatus) -> str:
    return {
        LearnerStatus.FITTING: "fit",
        LearnerStatus.VALIDATING: "validate",
        LearnerStatus.TESTING: "test",
        LearnerStatus.PREDICTING: "predict",
        LearnerStatus.IDLE: "idle",
    }[status]


@asynccontextmanager
async def running(learner: Learner[Any], status: LearnerStatus) -> AsyncIterator[None]:
    """The scope of one run of ``learner`` with ``status`` (refused unless it is idle)."""
    learner._check_idle(verb(status))
    _take_callbacks(learner)
    learner._status = status
    learner._loop_thread = threading.get_ident()
    hub = learner._hub
    hub.bind_loop_thread()
    state = learner._state
    rt = learner._rt
    rt.teardown_timed_out = False
    rt.save_every = ()
    rt.pre_mark = None
    # run_start opens the run's event stream: publish it before the run's first state write.
    phase = verb(status)
    hub.publish("run_start", "learner", state.epoch, state.step, {"phase": phase})
    state.phase = phase
    outcome = "error"
    try:
        failure: BaseException | None = None
        async with anyio.create_task_group() as tg:
            rt.tg = tg
            rt.worker.open()
            rt.policy.enter_run(rt.yield_interval, turns=rt.executor.takes_turns)
            try:
                yield
            except BaseException as exc:
                # Keep the body's own exception unwrapped: stop the background work and
                # re-raise it after the task group has closed (errors of background tasks
                # still come out grouped).
                failure = exc
                tg.cancel_scope.cancel()
            finally:
                rt.train.stop_detached()  # (its generator ends: it cannot outlive the run)
                rt.policy.exit_run()
                # The compute worker thread (if a hop started it) goes back to the pool.
                rt.worker.stop()
        if failure is not None:
            outcome = (
                "cancelled" if isinstance(failure, anyio.get_cancelled_exc_class()) else "error"
            )
            raise failure
        # A fit that a StopFit ended returns normally: its teardown saw it as "stopped".
        stopped = status is LearnerStatus.FITTING and rt.last_outcome == "stopped"
        outcome = "stopped" if stopped else "completed"
    except anyio.get_cancelled_exc_class():
        # Also when closing the task group re-raises an enclosing scope's cancellation
        # (trio does) before the check above runs.
        outcome = "cancelled"
        raise
    finally:
        rt.tg = None
        learner._status = LearnerStatus.IDLE
        _give_callbacks(learner)
        # Every stage field ends with the call, an epoch's too when the run stopped inside it:
        # a continued run (fit again, or a fresh learner resumed) starts without them alike.
        state.invalidate("phase", *rt.expiring["run"], *rt.expiring["epoch"])
        hub.publish("run_end", "learner", state.epoch, state.step, {"outcome": outcome})
        hub.close_all()


def _take_callbacks(learner: Learner[Any]) -> None:
    """A callback instance serves one run at a time: two learners running with it at once
    would share its state (counts, best scores, a logger's rows and files). (Learners one
    after another may share one: its state then goes on from one run to the next.)"""
    for cb in learner._callbacks:
        ref = _IN_RUN.get(id(cb))
        other = None if ref is None else ref()
        if other is not None and other is not learner and other._status is not LearnerStatus.IDLE:
            raise ConfigurationError(
                f"callback {cb.name!r} is in use by another learner's run right now (it is "
                f"{other._status.value}): the two runs would share its state (counts, best "
                f"scores, files); give each learner its own instance ({type(cb).__name__}(...))",
                callbacks=(cb.name,),
            )
    mine = weakref.ref(learner)
    for cb in learner._callbacks:
        _IN_RUN[id(cb)] = mine


def _give_callbacks(learner: Learner[Any]) -> None:
    for cb in learner._callbacks:
        ref = _IN_RUN.get(id(cb))
        if ref is not None and ref() is learner:
            del _IN_RUN[id(cb)]


#: The learner whose run each callback serves now, by ``id`` (held only while that run is in
#: progress, so an id is never another object's): kept outside the callback, whose attributes
#: may be its state (``vars(self)``) and must stay picklable.
_IN_RUN: dict[int, weakref.ref[Learner[Any]]] = {}


def start_background(
    learner: Learner[Any], fn: Callable[..., Any], args: tuple[Any, ...], name: str
) -> None:
    """Start ``fn(*args)`` in the running learner's task group, from the loop or a thread."""
    if inspect.iscoroutine(fn) or not callable(fn):
        if inspect.iscoroutine(fn):
            fn.close()  # (never awaited: no warning about it on top of this error)
        raise TypeError(
            f"state.start_soon takes an async function and its arguments, got "
            f"{type(fn).__name__}: start_soon(upload, x) rather than start_soon(upload(x))"
        )
    tg = learner._rt.tg
    if tg is None:
        raise LearnerBusyError("start background work", "not running")
    state = learner._state
    fn = _noted(
        fn,
        name,
        f"aiolearner: raised by background task {name!r} (state.start_soon), "
        f"started at epoch {state.epoch + 1} (state.epoch {state.epoch}), step {state.step}",
    )
    if learner._strategy is not None:
        # Background work runs in an order of its own on each rank: no collectives there.
        from ._dist._strategy import mark_concurrent

        fn = mark_concurrent(fn, name)
    if threading.get_ident() == learner._loop_thread:
        tg.start_soon(fn, *args, name=f"aiolearner.bg.{name}")
    else:
        anyio.from_thread.run_sync(tg.start_soon, fn, *args)


def _noted(fn: Callable[..., Any], name: str, note: str) -> Callable[..., Any]:
    """``fn`` whose errors say which background task raised them (not a cancellation); one
    that is not an async function, or that raises control flow, is told so."""

    async def task(*args: Any) -> None:
        try:
            work = fn(*args)
            if not inspect.isawaitable(work):
                raise TypeError(
                    f"state.start_soon: {fn!r} returned {type(work).__name__}, not an awaitable:"
                    " it takes an async function (for blocking work, call"
                    " anyio.to_thread.run_sync in one)"
                )
            await work
        except ControlFlow as exc:
            raise StageError(
                f"{type(exc).__name__}({exc.reason!r}) was raised by background task {name!r}"
                " (state.start_soon): background work runs beside the stages, so none of them"
                " can act on it; to stop from there, set a flag in the task and raise it from a"
                " hook that reads the flag",
                stage="fit_run",
            ) from exc
        except Exception as exc:
            exc.add_note(note)
            raise

    return task


async def fit(
    learner: Learner[Any], epochs: int, resume: str | os.PathLike[str] | None = None
) -> None:
    """The body of :meth:`Learner.fit` (see its docstring)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    learner._check_idle("fit")
    check_fit(learner, epochs)
    strategy = learner._strategy
    # A signal (under stop_on_signals) cancels this scope: a cancellation the run survives
    # by design (at the next await, never inside an update; shielded teardown).
    # Under a strategy, a stop every rank agrees on (ranks get a preemption's SIGTERM at
    # different steps).
    run = StoppableRun(None if strategy is None else strategy.request_stop)
    began = False
    with run:
        # A run called in a scope cancelled already (a signal that came while no run was in
        # progress, a caller cancelled meanwhile) does not begin: a first batch would otherwise
        # train before the cancellation is seen.
        await anyio.lowlevel.checkpoint_if_cancelled()
        began = True
        if resume is not None:
            if strategy is None:
                # Find and read the file in a worker thread: the loop may be serving other
                # work.
                path, checkpoint = await anyio.to_thread.run_sync(_resume_from, learner, resume)
            else:
                from ._dist._persist import resume as agreed_resume

                path, checkpoint = resume, await agreed_resume(strategy, learner, resume)
            try:
                learner.load_state_dict(checkpoint)  # checks again that nobody started meanwhile
            except ValueError as exc:  # (the learner is as it was)
                raise ValueError(f"checkpoint file {str(path)!r}: {exc}") from exc
        rt = learner._rt
        rt.target_epochs = epochs
        # The reason a previous call stopped for is not this call's, nor are the results of a
        # test before it (they would be in every record of this run, measured on old weights).
        learner._state.invalidate("stop_reason")
        forget_test_results(learner)
        rt.last_outcome = ""
        try:
            async with running(learner, LearnerStatus.FITTING):
                if strategy is None:
                    await learner._root(learner._state)
                else:
                    await strategy._run_fit(learner)
        except anyio.get_cancelled_exc_class():
            _stopped_unseen(learner)
            raise
    if run.stopped:
        assert run.signal is not None
        _stopped_unseen(learner)
        state = learner._state
        raise Interrupted(run.signal, epoch=state.epoch, step=state.step, began=began)


def _stopped_unseen(learner: Learner[Any]) -> None:
    """A cancellation or a signal that landed after the run had stopped (in its teardown):
    keep the stop for the next fit (``Runtime.unseen_stop``). Not under a strategy, where an
    outside cancellation of one rank is itself the stop every rank agrees on."""
    state = learner._state
    if learner._strategy is not None:
        return
    if learner._rt.last_outcome == "stopped" and state.is_valid("stop_reason"):
        learner._rt.unseen_stop = state.stop_reason


def check_fit(learner: Learner[Any], epochs: int) -> None:
    """At fit start. A generator given as data can serve one pass only: refuse a run that
    needs more. Without val_data no validation runs during fit: refuse a callback that
    would act only on one (``EarlyStopping("val_loss")`` would never check)."""
    if not learner._val_sets:
        for cb in learner._callbacks:
            needs = getattr(cb, "_needs_val_data", None)
            what = None if needs is None else needs()
            if what is not None:
                raise ConfigurationError(
                    f"{cb.name} {what}, but the learner has no val_data, so no validation"
                    " runs during fit and it would never act; pass val_data=..., or"
                    " monitor a metric of the training pass",
                    callbacks=(cb.name,),
                )
    optimizers = learner._state.optimizers
    for name, optimizer in optimizers.items():
        _checks.check_hyperparameters(optimizer, "optimizer" if len(optimizers) == 1 else name)
    _check_monitors(learner)
    _check_reads(learner)
    _check_declared_names(learner)
    _check_val_batches(learner)
    _check_saved_states(learner)
    _check_run_length(learner, epochs)
    state = learner._state
    remaining = max(0, epochs - state.epoch)
    train = learner._train
    if train.steps_per_epoch is None:
        _checks.check_passes("train_data", train.data, remaining)
    for source in learner._val_sets.values():
        _checks.check_passes(source.name, source.data, remaining)


def _check_monitors(learner: Learner[Any]) -> None:
    """A callback judging by a metric (EarlyStopping, Checkpoint's best files, a plateau
    schedule) whose key nothing in the learner writes would fail only after the first epoch
    trained: refuse the name now, when every writer of ``state.metrics`` is known."""
    known = known_metrics(learner)
    for cb in learner._callbacks:
        # A callback whose metric is known only once its run begins (a schedule's factory
        # making a plateau schedule) checks it then against what fit found here.
        tell = getattr(cb, "_metrics_known", None)
        if tell is not None:
            tell(known)
    if known is None:
        return
    for cb in learner._callbacks:
        monitored = getattr(cb, "_monitored", None)
        if monitored is None or monitored in known:
            continue
        close = difflib.get_close_matches(monitored, known, n=1)
        raise ConfigurationError(
            f"{cb.name} judges by the metric {monitored!r}, which nothing in this learner writes"
            f" into state.metrics (its metrics will be {sorted(known)})"
            + (f"; did you mean {close[0]!r}?" if close else ""),
            callbacks=(cb.name,),
        )


def _has_own_stages(learner: Learner[Any]) -> bool:
    """Whether a stage of the user's own is in the tree (it may set any field or metric)."""
    return any(type(s).__module__.partition(".")[0] != "aiolearner" for s in learner._root.walk())


def _check_reads(learner: Learner[Any]) -> None:
    """A callback told to read a field by name (``Metrics(output_field=...)``) reads it on
    every batch: one that no stage or callback of the learner writes would fail there, after
    training ran, so it is refused now. (Fields a callback's class declares in ``reads`` may
    be read only where they are valid, ``state.is_valid``: those are not judged here.) Not
    with a stage of the user's own, which may set fields outside its batches."""
    if _has_own_stages(learner):
        return
    known = learner._rt.executor.known_fields | {
        k for k in learner._state.__dict__ if not k.startswith("_")
    }
    for cb in learner._callbacks:
        required = getattr(cb, "_required_reads", None)
        for argument, field in required.items() if isinstance(required, dict) else ():
            if field in known:
                continue
            close = difflib.get_close_matches(field, sorted(known), n=1)
            raise ConfigurationError(
                f"{cb.name}({argument}={field!r}): no stage or callback of this learner writes "
                f"the state field {field!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                callbacks=(cb.name,),
                field=field,
            )


def _check_declared_names(learner: Learner[Any]) -> None:
    """A field a callback declares in ``reads`` that nothing of the learner writes may be
    optional (read where ``state.is_valid``), but one a letter or two from a field the learner
    has (``"validaton"``, ``"los"``; ``"metric.best"`` in ``writes``) is a typo that would fail
    only where it is read, with a message about the field, not the declaration: refused now.
    Not with a stage of the user's own, which may set any field."""
    if _has_own_stages(learner):
        return
    callbacks = learner._callbacks
    # The built-in fields, those the stages declare, those there are now and the fields
    # callbacks write whole (not a field only keys are declared of: that may be the typo).
    d = learner._state.__dict__
    known = sorted(
        set(FIELD_LIFETIMES)
        | set(d.get("_lifetimes") or ())
        | {k for k in d if not k.startswith("_")}
        | {split_declaration(n)[0] for cb in callbacks for n in cb.writes if "." not in n}
    )
    for cb in callbacks:
        declared = [("reads", n) for n in cb.reads] + [
            ("writes", n)
            for n in cb.writes
            if "." in n  # keys of a dict something makes
        ]
        for where, name in sorted(declared):
            field = split_declaration(name)[0]
            if field in known:
                continue
            close = difflib.get_close_matches(field, known, n=1, cutoff=0.85)
            if close:
                raise ConfigurationError(
                    f"{cb.name} declares {name!r} in {where!r}, but this learner has no field "
                    f"{field!r}: did you mean {close[0]!r}?",
                    callbacks=(cb.name,),
                    field=field,
                )


def _check_val_batches(learner: Learner[Any]) -> None:
    """Validation data kept in memory (a list or tuple of batches) whose first batch the
    default validation stage cannot unpack would fail only after the first epoch trained:
    its first batch is looked at now (nothing is drawn: the data is in memory)."""
    stage = learner._stages.get("validate_loss")
    if stage is None or getattr(type(stage), "compute", None) is not ValidateLoss.compute:
        return  # a stage of the user's own unpacks batches its own way
    if any(split_declaration(n)[0] == "batch" for cb in learner._callbacks for n in cb.writes):
        return  # a callback rewrites the batches before the stage sees them
    for source in learner._val_sets.values():
        data = source.data
        if type(data) in (list, tuple) and data:
            try:
                split_batch(data[0], "validate_loss")
            except TypeError as exc:
                raise TypeError(f"{source.name}[0]: {exc}") from None


def _check_saved_states(learner: Learner[Any]) -> None:
    """With a callback that writes checkpoints: each callback's state must be something a
    checkpoint can be loaded back with, or the first save fails (a lambda), or a resume does
    (an object of a class of its own), after training ran."""
    if not any(callable(getattr(type(cb), "find_checkpoint", None)) for cb in learner._callbacks):
        return
    for cb in learner._callbacks:
        if type(cb).__module__.startswith("aiolearner."):
            continue  # the package's own (tested; some copy weights to give their state)
        try:
            given = cb.state_dict()
        except Exception:  # a state built when training starts (see writing-callbacks.md)
            continue
        if not isinstance(given, Mapping):
            raise ConfigurationError(
                f"{cb.name}.state_dict() returned a {type(given).__name__}, not a dict: a "
                "checkpoint keeps each callback's state as a dict (of tensors, numbers, "
                "strings, and lists and dicts of them); return {'name': value, ...}",
                callbacks=(cb.name,),
            )
        state = dict(given)
        found = _persist.unloadable(state, f"{cb.name}.state_dict()")
        if found is not None:
            raise ConfigurationError(
                f"{found}, which a checkpoint could not be loaded back with "
                "(torch.load(weights_only=True) reads tensors, numbers, strings, bytes, and "
                "lists, tuples, sets and dicts of them): keep plain data in the callback's "
                "state, or register the type with torch.serialization.add_safe_globals",
                callbacks=(cb.name,),
            )


def _check_run_length(learner: Learner[Any], epochs: int) -> None:
    """A callback that fails past a number of optimizer steps (``OneCycle``'s total) says so
    now, when the run's number of steps is known: a batch is one optimizer step (the default
    batch) and every epoch has the same number of batches (sized data, or a stream cut by
    ``steps_per_epoch``)."""
    checks: list[tuple[Any, Callable[[int, str], str | None]]] = [
        (cb, cb._check_run_steps)  # type: ignore[attr-defined]
        for cb in learner._callbacks
        if callable(getattr(type(cb), "_check_run_steps", None))
    ]
    stages = learner._stages
    batch, fit = stages.get("fit_batch"), stages.get("fit")
    if not checks or type(fit) is not Fit or type(batch) is not FitBatch or batch is None:
        return  # (accumulated gradients: steps are not batches)
    if [type(c) for c in batch.children] != [Gradient, Update]:
        return  # (several updates, a step of its own)
    train = learner._train
    if train.steps_per_epoch is not None:
        if train.is_async or not _checks.one_pass(train.data):
            return  # finite data cut in passes: the epochs' lengths vary
        per_epoch = train.steps_per_epoch
    else:
        try:
            per_epoch = len(train.data)
        except TypeError:
            return
    steps = epochs * per_epoch
    for cb, check in checks:
        problem = check(steps, f"fit({epochs}): {epochs} epochs of {per_epoch} batches")
        if problem is not None:
            raise ConfigurationError(f"{cb.name}: {problem}", callbacks=(cb.name,))


def known_metrics(learner: Learner[Any]) -> set[str] | None:
    """The keys ``state.metrics`` gets during fit: the losses of the training and validation
    passes, and the keys callbacks declare they write. ``None`` when that cannot be known: a
    callback declaring all of ``metrics``, or a stage of the user's own (a stage may publish
    any key)."""
    if _has_own_stages(learner):
        return None
    sets = [name for name in learner._val_sets if name is not None]
    known = {"train_loss"}
    if learner._val_sets:
        # The validation loss: val_loss, or with named sets val_<set>_loss alone.
        known.update([f"val_{name}_loss" for name in sets] if sets else ["val_loss"])
    validation: set[str] = set()
    for cb in learner._callbacks:
        for declared in cb.writes:
            field, key = split_declaration(declared)
            if field == "metrics" and key is None:
                return None
            if field == "metrics" and key is not None:
                (validation if key.startswith("val_") else known).add(key)
    for key in validation:
        # Named validation sets: val_<set>_<name> in place of val_<name> (see declared_key),
        # or the key as it is (one value over all the sets).
        known.update([key, *(f"val_{name}_{key[4:]}" for name in sets)])
    return known


def _resume_from(learner: Learner[Any], resume: str | os.PathLike[str]) -> tuple[Any, Any]:
    path = _persist.find_checkpoint(learner._callbacks, resume)
    return path, _persist.read_checkpoint(path, learner._device)


def forget_test_results(learner: Learner[Any]) -> None:
    """Drop the keys tests wrote into ``state.metrics`` since the last fit started (and from
    what concurrent validation lands into later records): a test's results belong to the
    weights it was run on. (``test_`` keys only callbacks write in training are theirs.)"""
    rt = learner._rt
    tested, rt.tested = rt.tested, set()
    metrics = learner._state.__dict__.get("metrics")
    validator = rt.validator
    for held in (metrics, None if validator is None else validator.overlay):
        if held:
            for key in tested:
                held.pop(key, None)
