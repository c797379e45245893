"""The batch executor: the one place where batches run.

When the learner is built, every batch stage (the ``fit_batch`` of a :class:`~aiolearner.Fit`,
the ``validate_batch`` of a :class:`~aiolearner.Validate`) is compiled once into a
:class:`BatchProgram`. A batch stage whose whole subtree needs no event loop (``def`` hooks only,
stages that do not override ``run`` or declare ``fusable = True``) gets a *synchronous*
program: the whole batch, hooks included, is one call, made inline on the event loop or in the
compute worker thread as the compute policy says, holding the weights' write lock for the batch.
Any other batch stage is *awaited*: its hooks run on the loop and each compute stage goes through
``Runtime.compute`` on its own.

A synchronous program is always the stage's own definition, run without the event loop: its
coroutine (``Stage.__call__``) is driven to its end in one step (nothing in it suspends). Two
shortcuts give the same outcome with fewer calls, and are chosen only when they are exactly that
definition:

* **flat**: no hooks anywhere in the batch and sub-stages that are plain compute leaves: their
  ``compute`` methods in order;
* **default**: the default ``FitBatch(Gradient(), Update())`` with unchanged ``compute``
  methods and no hooks: the helpers ``Gradient.compute`` and ``Update.compute`` are written with
  (``forward``, ``optimizer_step``), minus the state round trips nobody can observe (the loss
  goes to the epoch's losses, the output is dropped once the loss is computed), called in the
  burst loop itself (:func:`run_batches`).

While the learner is observed (a trace, an event subscriber), synchronous programs run the full
definition. A fused or flat training batch reads torch's generators as it begins: a hook or a
stage stopping the batch puts its dropout back.

The training pass (:meth:`Executor.train_pass`) takes a batch, runs its program and finishes the
batch, until the pass ends. A synchronous program runs in *bursts* (:func:`run_batches`, one
body for both): in thread mode the compute worker goes on with the next batch while one is ready
without the event loop, so a pass of small batches costs a few hops, not one per batch; inline,
the batches up to the loop's next turn are one call; a burst takes batches from the pass's
iterator itself where it can (``Batches.direct``). A pass's first batch runs alone, timed by
itself, so that ``auto`` can move a slow one to the worker before a burst runs inline. A batch
that changed the state's set of fields has them checked (``_batch_checks.check_fields``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._batch_checks import carried_gradients, check_fields
from ._data import END, WAIT
from ._exceptions import ControlFlow, StageError
from ._program_kinds import (
    kind,
    raised_by_a_loop_library,
    signature,
    stepped_optimizers,
    suspended_in,
)
from ._rng import capture_torch_rng
from ._runtime import DRIVING, NOT_RUN
from ._stage import ComputeStage, Stage, owned
from ._stages import Epoch, Fit, FitBatch, Update, Validate, forward, optimizer_step
from ._train_stages import note_loss_problem, record_interrupted
from ._worker import SHARED_BURST_SECONDS

if TYPE_CHECKING:
    import torch

    from ._data import Batches
    from ._locks import ReadWriteLock
    from ._runtime import Runtime
    from ._state import State
    from ._worker import Turn

__all__ = ["BURST_SECONDS", "BatchProgram", "Executor"]

#: The longest a burst of batches keeps the compute worker before handing back to the loop.
BURST_SECONDS = 0.05


class BatchProgram:
    """A batch stage compiled for the executor, once, when the learner is built.

    Attributes:
        stage: the batch stage.
        kind: ``"default"``, ``"flat"``, ``"fused"`` (synchronous programs) or ``"async"``.
        fast: the whole batch as one call by the shortest route with the same outcome (``None``
            for an awaited program).
        full: what runs while observed: every stage's entry and exit seen (``drive``).
        default: the default program's one batch (``fast`` as compiled; else ``None``): while
            ``fast`` is that, a burst runs the default step written in :func:`run_batches`
            instead of calling it for each batch.
        locks: whether the batch holds the weights' write lock while it runs (a synchronous
            program with a compute stage that writes weights).
        shielded: an awaited batch that may write weights before its commit (an update with
            ``commit=False``, a stage of its own that writes them, several writers).
    """

    __slots__ = (
        "default",
        "fast",
        "full",
        "kind",
        "locks",
        "rt",
        "shielded",
        "signature",
        "stage",
        "steps",
    )

    def __init__(self, stage: Stage, rt: Runtime) -> None:
        self.stage = stage
        self.rt = rt
        #: What the program was compiled from (see ``_program_kinds.signature``).
        self.signature = signature(stage)
        self.kind = kind(stage)
        #: The default program's gradient and update stages' names (what its errors name).
        self.steps = tuple(child.name for child in stage.children) if self.kind == "default" else ()
        writers = [s for s in stage.walk() if isinstance(s, ComputeStage) and s.writes_weights]
        self.locks = self.kind != "async" and bool(writers)
        # Shielded where a cancellation could land between a write and the commit: any writer
        # but a lone committing Update (which writes and commits in one call), e.g. an update
        # with commit=False, or a stage that perturbs the weights and a later one restoring them.
        self.shielded = self.kind == "async" and (
            len(writers) > 1 or any(not (isinstance(s, Update) and s.commit) for s in writers)
        )
        self.fast: Callable[[State], None] | None
        self.default: Callable[[State], None] | None = None
        if self.kind == "default":
            self.fast = self.default = functools.partial(run_batches, self)  # (a burst of one)
        elif self.kind == "flat":
            self.fast = self._flat_batch()
        elif self.kind == "fused":
            self.fast = self._fused_training_batch() if isinstance(stage, FitBatch) else self.drive
        else:
            self.fast = None
        self.full = self.fast if self.kind == "fused" else self.drive

    def __repr__(self) -> str:
        return f"<BatchProgram {self.kind} of {self.stage.name!r}>"

    @property
    def synchronous(self) -> bool:
        """Whether the whole batch runs as one call (without the event loop)."""
        return self.fast is not None

    def now(self) -> Callable[[State], None]:
        """The call that runs one batch now: the full definition while observed."""
        return self.full if self.rt.observed else self.fast  # type: ignore[return-value]

    @staticmethod
    def driving() -> bool:
        """Whether the current batch runs as one synchronous call (see ``Stage.__call__``)."""
        return DRIVING.get()

    def drive(self, state: State) -> None:
        """Run the batch stage's own coroutine to its end in one step, without the event loop."""
        token = DRIVING.set(True)
        try:
            coro = self.stage(state)
            try:
                coro.send(None)
            except StopIteration:
                return
            except RuntimeError as exc:
                # An event loop library's call (anyio.sleep, say) in the compute worker thread.
                if self.rt.policy.off_loop_thread() and raised_by_a_loop_library(exc):
                    exc.add_note(
                        f"aiolearner: batch stage {self.stage.name!r} ran in the compute worker "
                        "thread, without the event loop (it is fusable): if one of its stages "
                        "awaits something other than its sub-stages and `context.compute`, set "
                        "`fusable = False` on it"
                    )
                raise
            awaiting = suspended_in(coro) or self.stage
            coro.close()
            raise StageError(
                "its batch runs without the event loop (the stage is fusable) but it awaited "
                "something that suspends; set `fusable = False` on it (or await only its "
                "sub-stages and `context.compute`)",
                stage=awaiting.name,
            )
        finally:
            DRIVING.reset(token)

    async def execute(self, state: State) -> None:
        """One batch from ``await stage(state)`` (a validation pass, a pass a user wrote)."""
        rt = self.rt
        fn = self.now()
        if rt.run_inline(fn, state, locks=self.locks) is NOT_RUN:
            await rt.compute(fn, state, writes_weights=self.locks)

    def _fused_training_batch(self) -> Callable[[State], None]:
        """``drive``, reading torch's generators first: a hook stopping the batch after its
        forward puts its dropout back (``Runtime.abandon_batch``)."""
        drive, rt = self.drive, self.rt

        def fused_batch(state: State) -> None:
            rt.batch_rng = (state.__dict__.get("batch"), capture_torch_rng())
            drive(state)

        return fused_batch

    def _flat_batch(self) -> Callable[[State], None]:
        stage = self.stage
        leaves = tuple((leaf.name, leaf.compute) for leaf in stage.children)  # type: ignore[attr-defined]

        first = stage.name
        rt = self.rt
        # A stage of its own may stop a training batch after one drew random numbers (noise,
        # dropout): the batch is then undone, and its draws put back (Runtime.abandon_batch).
        training = isinstance(stage, FitBatch)

        def flat_batch(state: State) -> None:
            if training:
                rt.batch_rng = (state.__dict__.get("batch"), capture_torch_rng())
            where = first
            try:
                for where, compute in leaves:  # noqa: B007 (the handler names the leaf)
                    compute(state)
            except BaseException as exc:
                if not owned(stage, state, exc, where):
                    raise

        return flat_batch


class Executor:
    """Runs the batches of one learner (``runtime.executor``)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.programs: dict[int, BatchProgram] = {}
        #: Fields anything may set during a batch (built-ins, declared by stages or callbacks).
        self.known_fields: frozenset[str] = frozenset()
        #: The state's fields when the pass started, and how many after the last batch.
        self.fields_before: frozenset[str] = frozenset()
        self.fields_seen = 0
        #: How many more batches of the pass are looked at for gradients left to the next, and
        #: the optimizers its updates step (None: any, a stage of its own writes weights).
        self.grad_checks = 0
        self.stepped: frozenset[str] | None = None
        #: The stage in Fit's place (the epoch's first): what a pass it opens names in errors.
        self.fit_slot: Stage = Fit()
        self.cancelled_between = False  # (a burst cancelled between batches, see _burst)

    def compile(self, root: Stage, known_fields: frozenset[str]) -> None:
        """Compile every batch stage of the tree (called at the end of every build)."""
        self.programs = {}
        self.known_fields = known_fields
        for stage in root.walk():
            stage._program = None
        for stage in root.walk():
            batch_stage = None
            if isinstance(stage, Epoch):
                self.fit_slot = stage.fit
            if isinstance(stage, Fit):
                batch_stage = stage.fit_batch
            elif isinstance(stage, Validate):
                batch_stage = stage.validate_batch
            if batch_stage is None or id(batch_stage) in self.programs:
                continue
            program = BatchProgram(batch_stage, self.rt)
            self.programs[id(batch_stage)] = program
            if program.synchronous:
                batch_stage._program = program

    def program(self, stage: Stage) -> BatchProgram:
        """The program of a batch stage, looked up when a pass starts: compiled now if the
        build did not see the stage, or again if a method it was compiled from has changed
        since (a class patched after the learner was built)."""
        program = self.programs.get(id(stage))
        if program is None or program.signature != signature(stage):
            program = self.programs[id(stage)] = BatchProgram(stage, self.rt)
            stage._program = program if program.synchronous else None
        return program

    async def train_pass(self, fit: Stage, state: State, batches: Batches) -> None:
        """Take a batch, run its program, finish it; until the pass ends. A StopEpoch from a
        batch ends the pass: the batch is finished (consumed) and ``fit`` acts on it."""
        rt = self.rt
        program = self.program(fit.fit_batch)  # type: ignore[attr-defined]
        stage, fast, drive = program.stage, program.fast, program.full
        losses, validator, policy = rt.train_losses, rt.validator, rt.policy
        synchronous = fast is not None
        late = not synchronous and batches.source.marks_after_fetch
        bursts = synchronous and validator is None  # (no validation due between batches)
        locks = program.locks
        shielded, hopped = program.shielded, False  # (hopped: in one shielded hop)
        run_inline, context, finish = rt.run_inline, rt.context, self.finish_batch
        clock, take, save_every, first = time.perf_counter, batches.next_nowait, rt.save_every, True
        rt.batch_rng = None  # (a fused batch of this pass's program sets it)
        # A batch stage of its own may leave gradients in .grad for the next batch: looked for
        # after the pass's first two batches (see _batch_checks.carried_gradients).
        self.grad_checks = 0 if program.kind == "default" or rt.warned_carried else 2
        self.stepped = stepped_optimizers(stage)
        self.fields_before = frozenset(state.__dict__)
        self.fields_seen = len(state.__dict__)
        pending: Any = None
        # Learners computing inline on a shared loop take its thread in turns (see _worker.py):
        # the turn is held while batches run inline and let go before anything is awaited.
        no_stop: list[bool] = []  # an inline burst cannot be cancelled half way
        turn = rt.worker.turn() if synchronous else None
        taking = self.taking_turns(turn)
        if validator is not None:
            # A validation due at the step the pass starts from and not done yet (a run
            # interrupted in it) comes first; a concurrent stop request or error surfaces here.
            await validator.between_batches(state)
        try:
            while True:
                # An awaited batch can be cancelled half way, and is then repeated drawing the
                # same random numbers: the mark is taken before an inline fetch that draws
                # (after it where the stream serves the batch again: marks_after_fetch).
                mark = None if synchronous or late else batches.source.mark()
                if pending is None:
                    if save_every:
                        self.mark_save_point(state, batches, mark)
                    batch = take()
                else:
                    batch, pending = pending, None
                if batch is WAIT:
                    if turn is not None:
                        turn.give()
                    batch = await batches.next()
                if batch is END:
                    break
                if late:
                    mark = batches.source.mark()
                state.batch = batch
                context._committed = False
                try:
                    if synchronous:
                        if taking and not turn.held:  # type: ignore[union-attr]
                            await rt.take_turn(turn)  # type: ignore[arg-type]
                        # While observed, the full definition: every stage's entry and exit is seen.
                        fn = drive if rt.observed else fast
                        if bursts and not first:
                            # Inline, the batches up to the loop's next turn in one call (the
                            # same burst as in the worker; see run_batches).
                            pending = run_inline(
                                run_batches,
                                program,
                                state,
                                batches,
                                None,
                                no_stop,
                                rt.last_yield + rt.yield_every - clock(),
                                False,
                                locks=locks,
                                timed=False,
                            )
                            ran = pending is not NOT_RUN
                            if not ran:
                                pending = None
                        else:
                            ran = run_inline(fn, state, locks=locks) is not NOT_RUN  # type: ignore[arg-type]
                        if not ran:
                            if turn is not None:
                                turn.give()
                            if bursts and policy.hopping:
                                pending = await self._burst(program, state, batches)
                            else:
                                hopped = True  # (a cancellation lands once it is finished)
                                await rt.compute(fn, state, writes_weights=locks)  # type: ignore[arg-type]
                    else:  # (shielded: a cancellation lands once the weights are whole)
                        with anyio.CancelScope(shield=shielded):
                            await stage(state)
                except BaseException as caught:
                    if self.cancelled_between:  # (after a burst's batches, all finished)
                        self.cancelled_between = False
                        raise
                    exc = await record_interrupted(stage, state, caught, context.committed)
                    if isinstance(exc, ControlFlow) and isinstance(exc, fit.catches):
                        self.consume_batch(stage, state)
                        owned(fit, state, exc)
                        break
                    rt.abandon_batch(state, mark)
                    raise exc  # noqa: B904 (the one caught, or a stronger flow in its place)
                finish(stage, state, losses)
                first = False
                if shielded or hopped:  # (not at the next turn: a hop resets the turn's clock)
                    hopped = False
                    await anyio.lowlevel.checkpoint_if_cancelled()
                if validator is not None:
                    if turn is not None:
                        turn.give()
                    # A validation due by steps or time; a concurrent one's StopFit or error.
                    await validator.between_batches(state)
                now = clock()
                if now - rt.last_yield >= rt.yield_every:
                    await rt.give_turn(now, turn)
                    taking = self.taking_turns(turn)
        finally:
            if turn is not None:
                turn.give()

    @property
    def takes_turns(self) -> bool:
        """Whether this learner's batches take the loop's turn when they compute inline while
        other learners share the loop: its batch programs are all synchronous."""
        programs = self.programs.values()
        return bool(programs) and all(program.synchronous for program in programs)

    def taking_turns(self, turn: Turn | None) -> bool:
        """Whether the training loop's inline batches wait for the loop's turn now (it computes
        inline while other learners share the loop); looked at again at every turn."""
        return turn is not None and self.rt.worker.shared and not self.rt.policy.hopping

    def mark_save_point(
        self, state: State, batches: Batches, mark: tuple[dict[str, Any], int] | None
    ) -> None:
        """Just before a batch is drawn: if a callback takes the learner's state before this
        step (``StateView.save_points``), keep the random state from before the draw."""
        step = state.step
        if any(step % n == 0 for n in self.rt.save_every):
            self.rt.pre_mark = (state.epoch, step, batches.source.mark() if mark is None else mark)

    def consume_batch(self, stage: Stage, state: State) -> None:
        """A batch cut short by a StopEpoch ends as consumed: uncommitted, its gradients are
        dropped (as a skipped batch's: they must not leak into the next epoch's first update)
        and it is committed all the same; then it is finished."""
        rt = self.rt
        if not rt.committed:
            state.model.zero_grad(set_to_none=True)
            rt.commit(state)
        self.finish_batch(stage, state, rt.train_losses)

    def finish_batch(self, stage: Stage, state: State, losses: list[torch.Tensor]) -> None:
        """The batch is over: keep its loss for ``train_loss``, end its fields, check the commit."""
        d = state.__dict__
        loss = d.get("loss")
        rt = self.rt
        for name in rt.batch_fields:
            d.pop(name, None)
        if loss is not None:
            # Detached: the loss with its graph alive until the epoch's end slows every later
            # step (after the fields end: a snapshot from another thread counts it once).
            losses.append(loss.detach())
        if len(d) != self.fields_seen:
            check_fields(self, stage, state)
        if self.grad_checks:
            self.grad_checks -= 1
            carried_gradients(self, stage, state)
        if not rt.committed:
            raise StageError(
                "the training batch ended without being committed: the stage that applies the "
                "batch's update must call `self.context.commit(state)` with it (Update does), "
                "so that the counters match the weights",
                stage=stage.name,
            )

    async def _burst(self, program: BatchProgram, state: State, batches: Batches) -> Any:
        """``state.batch`` and the batches after it, in one hop to the compute worker.

        A hop costs two wake-ups of a sleeping thread (docs/performance.md). A burst goes on
        in the worker with the next batch while one is ready without the event loop, and hands
        back when the loop is needed: a batch to await, the end of the pass, a cancellation
        (after the batch in progress), a task waiting for the weights lock, auto's next
        decision, or ``BURST_SECONDS`` (less while the loop's compute pool is shared, see
        ``_worker.py``). Each batch is finished exactly as on the loop. Returns what the loop
        takes next: ``None`` (take a batch), ``WAIT`` or ``END``."""
        rt = self.rt
        lock = rt.weights_lock if program.locks else None
        stop: list[bool] = []
        # Learners sharing the loop's compute pool take turns (see _worker.py).
        seconds = min(BURST_SECONDS, SHARED_BURST_SECONDS) if rt.worker.shared else BURST_SECONDS
        try:
            return await rt.compute(
                run_batches,
                *(program, state, batches, lock, stop, seconds),
                writes_weights=program.locks,
                timed=False,
                on_cancel=lambda: stop.append(True),
            )
        except anyio.get_cancelled_exc_class():  # (once the burst's batches are all finished:
            self.cancelled_between = True  # a batch's error is raised in its place)
            raise
        finally:
            batches.start_producer_if_slow()


def run_batches(
    program: BatchProgram,
    state: State,
    batches: Batches | None = None,
    lock: ReadWriteLock | None = None,
    stop: list[bool] | None = None,
    seconds: float = 0.0,
    off_loop: bool = True,
) -> Any:
    """``state.batch`` by ``program``; with ``batches``, a burst: the batches after it too.

    The one body of a burst in the compute worker (:meth:`Executor._burst`) and inline up to the
    loop's next turn (``off_loop=False``, :meth:`Executor.train_pass`): each batch finished as
    the loop finishes one, an error or a StopEpoch left to the loop with its batch; it returns
    what the loop takes next (``None``: take a batch; ``WAIT``, ``END``) and records the
    batches' mean time, fetches included (what they held the loop or the worker for). Without
    ``batches``: the default program's one batch, which its caller times and finishes.

    The default program's step is written here, once, with the helpers of ``Gradient.compute``
    and ``Update.compute``, minus the state round trips nobody can observe: the output dropped
    once the loss is computed, the loss kept for the epoch's mean before the commit (a snapshot
    counting the batch finds it). Written out in the loop, not called: on a tiny model every
    call between two steps costs about twice its own time in the torch calls around it."""
    rt, stage, fn = program.rt, program.stage, program.now()
    # One batch is the default program's own (``program.default``); a burst runs the default
    # step while that is the program's ``fast`` call (not while observed, nor once replaced).
    default, d = batches is None or fn is program.default, state.__dict__
    if default:
        gradient, update = program.steps
        model, loss_fn, optimizer = d["train_model"], d["loss_fn"], d["optimizer"]
        keep, commit = rt.train_losses.append, rt.commit
    taken = 0  # (batches taken from the pass's iterator, counted when the burst ends)
    if batches is not None:
        executor, policy, context, clock = rt.executor, rt.policy, rt.context, time.perf_counter
        finish, losses = executor.finish_batch, rt.train_losses
        take, save_every = batches.next_nowait, rt.save_every
        direct, move = batches.direct(), batches.move  # (see Batches.direct)
        items, budget = (None, None) if direct is None else direct
        watched = lock is not None or off_loop  # (a waiter on the lock, a slow source)
        start, done = clock(), 0
        until = min(start + seconds, policy.decision_due())  # (auto's decision: on the loop)
    try:
        while True:
            stepped = default
            if default:
                where = gradient
                try:
                    loss = forward(model, loss_fn, d["batch"], gradient)[1]
                    try:
                        loss.backward()  # type: ignore[no-untyped-call]
                    except BaseException as exc:
                        note_loss_problem(exc, loss, d["model"])
                        raise
                    where = update
                    optimizer_step(optimizer)
                    keep(loss.detach())
                    commit(state)
                except BaseException as exc:
                    if not owned(stage, state, exc, where):
                        raise
                    stepped = False  # (acted on: the batch ends as any other)
            else:
                fn(state)
            if batches is None:
                return None
            now = clock()
            done += 1
            if stepped:
                del d["batch"]  # (the default step sets no other field)
                if len(d) != executor.fields_seen:
                    check_fields(executor, stage, state)
            else:
                finish(stage, state, losses)
            if (
                stop
                or now >= until
                or (
                    watched
                    and (
                        (lock is not None and lock.waiting)
                        # Inline, a slow source's producer is started by the fetch itself.
                        or (off_loop and batches.wants_producer)
                    )
                )
            ):
                batch = None
            else:
                if save_every:
                    executor.mark_save_point(state, batches, None)
                if items is not None:
                    try:  # (the fetch alone is timed: a batch's end may free much, slowly)
                        fetched = clock() if budget is not None else 0.0
                        batch = next(items, END)
                    except Exception as exc:  # (the batches taken are counted by the finally)
                        raise batches.failed(exc, taken) from None
                    if batch is not END:
                        taken += 1
                        if budget is not None and clock() - fetched > budget:
                            batches.slow_fetch()
                            items = None  # (the next fetches are watched: see direct())
                        state.batch = batch if move is None else move(batch)  # (a write)
                        context._committed = False
                        continue
                if taken:  # (counted before a batch is taken with its bookkeeping)
                    batches.count_taken(taken)
                    taken = 0
                batch = take(off_loop=off_loop) if items is None else batches.end()
                if batch is not WAIT and batch is not END:
                    state.batch = batch
                    context._committed = False
                    continue
            # The batches' mean time, fetches included, as that many records (a call a burst).
            policy.record((now - start) / done, done)
            return batch
    finally:
        if taken:
            batches.count_taken(taken)  # type: ignore[union-attr]
