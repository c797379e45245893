"""Every exception aiolearner raises on purpose.

Hierarchy::

    Exception
    ├── AiolearnerError                 base of the "you misused it" errors
    │   ├── ConfigurationError          bad callbacks/stages, found when the Learner is built
    │   ├── StateAccessError            undeclared or invalid state access, where it happens
    │   │   └── StateKeyError           a key of a dict field (``metrics``) that is not set now
    │   ├── LearnerBusyError            a call that the learner's lifecycle does not allow now
    │   ├── StageError                  a stage broke the stage protocol while running
    │   └── CollectiveError             a collective issued where its order is not guaranteed
    ├── DistributedError (RuntimeError) a rank failed, or ranks diverged, under a strategy
    └── ControlFlow                     raised on purpose to steer training, never an error
        ├── SkipBatch                   drop the current batch; owned by FitBatch / ValidateBatch
        ├── StopEpoch                   end the current pass (training or validation) early
        └── StopFit                     end the whole run; teardown hooks still run

"It broke" errors (a shape mismatch in the model, a failing callback) are never translated: they
keep their own type and get notes (``add_note``) naming the stage, hook, callback, epoch and step.
Errors of callbacks always arrive in an :class:`ExceptionGroup` (see ``docs/errors.md``).
"""

from __future__ import annotations

__all__ = [
    "AiolearnerError",
    "CollectiveError",
    "ConfigurationError",
    "ControlFlow",
    "DistributedError",
    "LearnerBusyError",
    "SkipBatch",
    "StageError",
    "StateAccessError",
    "StateKeyError",
    "StopEpoch",
    "StopFit",
]


class AiolearnerError(Exception):
    """Base class of the errors that say aiolearner was used in a way it does not allow."""


class ConfigurationError(AiolearnerError):
    """Raised when a Learner is built from callbacks or stages that cannot work together.

    Raised by ``Learner(...)`` (and by ``Learner.replace_stage``), never halfway through training:
    two writers of one field on one hook with no declared order, an ordering cycle, an unknown hook
    name, a hook with a wrong signature, a callback writing a stage-owned counter.

    Attributes:
        hook: the hook concerned, if any.
        callbacks: names of the callbacks concerned (possibly empty).
        field: the state field concerned, if any.
    """

    def __init__(
        self,
        problem: str,
        *,
        hook: str | None = None,
        callbacks: tuple[str, ...] = (),
        field: str | None = None,
    ) -> None:
        self.problem = problem
        self.hook = hook
        self.callbacks = callbacks
        self.field = field
        where = []
        if callbacks:
            where.append("callbacks " + ", ".join(repr(c) for c in callbacks))
        if field is not None:
            where.append(f"field {field!r}")
        if hook is not None:
            where.append(f"hook {hook!r}")
        suffix = f" ({'; '.join(where)})" if where else ""
        super().__init__(problem + suffix)


class StateAccessError(AiolearnerError, AttributeError):
    """Raised where a callback reads or writes state it may not touch, or reads an invalid field.

    It derives from :class:`AttributeError` too, so ``hasattr(state, "loss")`` answers ``False``
    for a field that is not valid yet.

    Attributes:
        field: the field.
        callback: name of the callback (``None`` for a stage).
        hook: the hook being run (``None`` outside hooks).
        reason: why the access was refused.
    """

    def __init__(
        self,
        field: str,
        *,
        reason: str,
        callback: str | None = None,
        hook: str | None = None,
    ) -> None:
        self.field = field
        self.callback = callback
        self.hook = hook
        self.reason = reason
        # Without a callback: a stage, or code reading learner.state (outside any hook).
        who = f"callback {callback!r}" if callback is not None else ""
        at = f" in hook {hook!r}" if hook is not None else ""
        text = f"{who}{at} cannot access state field {field!r}: {reason}".lstrip()
        super().__init__(text[0].upper() + text[1:] if callback is None else text)


class StateKeyError(StateAccessError, KeyError):
    """Raised where a callback reads a key of a dict field (``state.metrics["x"]``) that is not set.

    Its ``field`` names the key (``"metrics['x']"``) and its message says which callbacks
    declare writing that key, if any. It derives from :class:`KeyError` too, so
    ``state.metrics.get("x")`` and ``except KeyError`` keep working. A callback that declares the
    whole field in ``writes`` gets the dict itself, whose missing keys raise a plain ``KeyError``.
    """


class LearnerBusyError(AiolearnerError, RuntimeError):
    """Raised when a Learner method is called while the learner's lifecycle forbids it.

    For example ``fit`` while the same learner is already running ``fit``, or
    ``replace_stage`` during training.

    Attributes:
        action: what was attempted.
        status: the learner's status at that time.
    """

    def __init__(self, action: str, status: str) -> None:
        self.action = action
        self.status = status
        super().__init__(f"cannot {action}: the learner is {status}")


class StageError(AiolearnerError, RuntimeError):
    """Raised where a stage breaks the rules every stage follows, found while it runs.

    A training batch that ended without being committed (``context.commit(state)``), a
    control-flow exception raised where no running stage owns it, two branches of a
    :class:`~aiolearner.Parallel` changing the same state field (or key of ``metrics``), a stage
    that sets during a training batch a state field no stage declares in ``fields`` (a field a
    pass-level stage sets outside batches stays until something changes it), a batch compiled
    to run without the event loop whose stage awaited something that suspends.

    It derives from :class:`RuntimeError` too (what these cases raised before it existed).

    Attributes:
        stage: the name of the stage concerned.
    """

    def __init__(self, problem: str, *, stage: str) -> None:
        self.problem = problem
        self.stage = stage
        super().__init__(f"stage {stage!r}: {problem}")


class CollectiveError(AiolearnerError, RuntimeError):
    """Raised where a collective (``strategy.all_reduce``, ``gather_object``, ...) is issued from
    a place whose order is not the same on every rank.

    Under a distributed strategy every rank must issue the same collectives in the same order.
    Callbacks that run concurrently (two or more ``async def`` hooks in one layer) and
    background tasks (``state.start_soon``) run in an order that differs from rank to rank, so
    a collective there could pair with a different one on another rank and hang. A callback
    that needs collectives declares ``collectives = True``: its hooks then run alone, in plan
    order, on every rank.

    A concurrent validation's hooks may not issue blocking collectives either (they run on the
    event loop next to training); they hand per-pass sums to the pass's own reduction instead
    (``strategy.sum_at_end_of``).

    Attributes:
        callback: the callback (or background task) that issued it, if known.
        what: the collective.
    """

    def __init__(self, what: str, *, callback: str | None, why: str | None = None) -> None:
        self.what = what
        self.callback = callback
        if why is not None:
            who = f"callback {callback!r}" if callback is not None else "code"
            super().__init__(f"{who} issued the collective {what} {why}")
            return
        who = f"callback {callback!r}" if callback is not None else "a concurrent task"
        super().__init__(
            f"{who} issued the collective {what} where its order is not the same on every rank "
            "(a hook running concurrently with other async hooks, or a background task); "
            "declare `collectives = True` on the callback so its hooks run alone, in plan "
            "order, on every rank"
        )


class DistributedError(RuntimeError):
    """Raised on every rank when distributed training cannot go on: a rank failed (raised an
    error, was killed, or stopped answering), or the ranks diverged.

    On the failed rank itself its own error propagates unchanged; the other ranks raise this,
    quoting that error (read from the process group's store) when the failed rank could report
    it. After it no collective is issued any more (teardown hooks run without them).

    Attributes:
        rank: the rank raising it.
        problem: what went wrong.
        peer: the rank that failed or diverged, if known.
        peer_error: that rank's own error, as text, if it reported one.
        epoch: ``state.epoch`` when it was raised (``None`` if unknown).
        step: ``state.step`` when it was raised (``None`` if unknown).
    """

    def __init__(
        self,
        problem: str,
        *,
        rank: int,
        peer: int | None = None,
        peer_error: str | None = None,
        epoch: int | None = None,
        step: int | None = None,
    ) -> None:
        self.problem = problem
        self.rank = rank
        self.peer = peer
        self.peer_error = peer_error
        self.epoch = epoch
        self.step = step
        where = ""
        if step is not None:
            at_epoch = "" if epoch is None else f"epoch {epoch + 1} (state.epoch {epoch}), "
            where = f" at {at_epoch}step {step}"
        quoted = "" if peer_error is None else f"; rank {peer} failed with: {peer_error}"
        super().__init__(f"rank {rank}{where}: {problem}{quoted}")


class ControlFlow(Exception):  # noqa: N818 - these are signals, not errors
    """Base of the exceptions callbacks and stages raise to steer training on purpose.

    A control-flow exception raised by one callback never cancels the other callbacks of the same
    hook: the hook finishes, then the stage that owns the exception acts on it.

    Args:
        reason: a human-readable reason, kept as ``.reason`` and shown in traces and events.
    """

    #: ``(callback, hook)`` when a callback raised it (set by the hook's plan), for messages.
    raised_in: tuple[str, str] | None = None
    #: The innermost stage it left, when stage code raised it (for messages).
    _left_stage: str | None = None

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(reason or type(self).__name__)


class SkipBatch(ControlFlow):
    """Drop the current batch: the rest of its stages and ``after_fit_batch`` do not run.

    Owned by ``FitBatch`` (and ``ValidateBatch`` during validation). The batch still counts as
    consumed, so a resumed run does not repeat it.
    """


class StopEpoch(ControlFlow):
    """End the current pass (the training pass or the validation pass) early.

    Owned by ``Fit`` and ``Validate``: the pass closes normally (its ``after_`` hook runs) and the
    epoch goes on (a stopped training pass is followed by validation and ``after_epoch``).
    Raised from ``before_epoch`` or ``after_epoch`` it ends the epoch.
    """


class StopFit(ControlFlow):
    """End the whole run: every stage stops, then ``after_fit_run`` (teardown) runs.

    Owned by ``FitRun``; ``fit`` returns normally. Calling ``fit`` again continues from where
    the run stopped.
    """
