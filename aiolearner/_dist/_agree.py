"""Every rank takes the same control flow: the control word and where it is agreed.

Under a strategy nothing that ends work early is acted on by one rank alone. A ``StopFit`` or
``StopEpoch`` raised on one rank, an outside cancellation of one rank, a signal, a data source
that ends early: each becomes a *request* of that rank, and all ranks act on it at the same
point, the next *agreement point*, where one small all-reduce (MAX over int64s, on a gloo group
of its own, the training lane) exchanges the **control word**:

=========================  ==============================================================
slots                      meaning
=========================  ==============================================================
stop_fit, stop_epoch,      a request of that kind: the requesting rank + 1 (MAX: the
cancel, signal, data_end   highest requesting rank)
unsized                    a rank's data has no length (then the word is agreed every batch)
step, -step                committed batches: MAX and -MIN in one MAX-reduction
updates, -updates          optimizer steps applied (a rank-local skip after the gradient
                           shows here)
interval                   the next agreement interval each rank proposes (the largest wins)
-remaining                 at a pass's start: the fewest batches any rank has
checksum (hi/lo, +/-)      at a pass's end: a sum of the weights, bit for bit
point, -point              which agreement point the rank is at (they must be the same)
=========================  ==============================================================

Agreement points, reached by every rank in the same order:

* **in the training pass**: when the pass starts (with its length: every rank takes the fewest
  batches any rank has), every ``interval`` committed steps, and when it ends. They are taken
  between batches, when the next batch is wanted (:class:`AgreedBatches` wraps the pass's
  batches: the executor's loop is unchanged, and a burst in the compute worker simply hands
  back to the loop there). Control flow raised by hooks inside a training batch is *deferred*:
  the batch completes on every rank (so DDP's gradient all-reduces stay paired) and the request
  is agreed at the next point. With data that has no length, the word is agreed before every
  batch (whether each rank still has one).
* **at the end of every other hook plan** of the training flow (``before_fit_run``,
  ``before_epoch``, ``before_fit``, ``after_fit``, sequential ``before_validate`` /
  ``after_validate``, ``after_epoch``): the plan's own control flow is agreed right there, so a
  stop takes effect where it would in one process. Hooks of validation batches and of a
  concurrent validation run on shards of different lengths, or at different times, on each rank:
  their ``StopFit`` is deferred to the next point of the training flow (their ``StopEpoch`` and
  ``SkipBatch`` only end or skip local work, which no collective depends on).
* **when ``fit`` ends** (a barrier: rank 0's last checkpoint is written before anyone returns).

The interval: ``agree_every=N`` fixed, or ``"auto"``: each rank measures the cost of an
agreement (the fastest of the last few) and the time of a step, and proposes the smallest
interval that keeps agreements under :data:`BUDGET` of the training time, capped so that a
request waits at most :data:`MAX_LAG` seconds of training.
"""

from __future__ import annotations

import math
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import torch
import torch.distributed as dist

from .._data import END, WAIT
from .._exceptions import ControlFlow, DistributedError, StopEpoch, StopFit
from .._plan import HookPlan

if TYPE_CHECKING:
    from .._data import Batches
    from .._state import State
    from ._strategy import Strategy

__all__ = ["AgreedBatches", "AgreedStop", "Agreement", "DistributedPlan"]

#: The share of training time agreements may take with ``agree_every="auto"``.
BUDGET = 0.005
#: The longest (seconds of training) a request waits for the next agreement with ``"auto"``.
MAX_LAG = 0.05
#: Agreements every step before ``"auto"`` has the measurements to choose an interval.
WARMUP = 4

# Request kinds, strongest first; the first three end the run.
KINDS = ("cancel", "signal", "stop_fit", "stop_epoch")
RUN_ENDING = frozenset({"cancel", "signal", "stop_fit"})

# Slots of the control word.
_SLOT = {kind: i for i, kind in enumerate(KINDS)}
DATA_END = 4
UNSIZED = 5
STEP, NEG_STEP = 6, 7
UPDATES, NEG_UPDATES = 8, 9
INTERVAL = 10
NEG_REMAINING = 11
CHECK = 12  # hi, -hi, lo, -lo
POINT, NEG_POINT = 16, 17
WORD = 18

# Agreement points (hook plans get 100 + the hook's index among the tree's hooks).
PASS_START, PERIODIC, PASS_END, EACH_BATCH, END_OF_FIT = 1, 2, 3, 4, 5
_POINT_NAMES = {
    PASS_START: "the start of a training pass",
    PERIODIC: "a periodic agreement in the training pass",
    PASS_END: "the end of a training pass",
    EACH_BATCH: "a batch of data without a length",
    END_OF_FIT: "the end of fit",
}


class AgreedStop(StopFit):
    """A run-ending stop all ranks agreed on (a ``StopFit``, so ``FitRun`` owns it)."""

    def __init__(self, reason: str, kind: str, requester: int) -> None:
        super().__init__(reason)
        self.kind = kind
        self.requester = requester


class Agreed:
    """A reduced control word, decoded."""

    __slots__ = ("data_end", "interval", "reason", "remaining", "requester", "stop", "unsized")

    def __init__(self) -> None:
        self.stop: str | None = None
        self.requester = -1
        self.reason = ""
        self.data_end = False
        self.unsized = False
        self.remaining = 0
        self.interval = 1


def _halves(x: float) -> tuple[int, int]:
    bits = struct.unpack("<Q", struct.pack("<d", x))[0]
    return bits >> 32, bits & 0xFFFFFFFF


class Agreement:
    """The requests of this rank and the agreements of its training lane (one per strategy)."""

    def __init__(self, strategy: Strategy, state: State, every: int | None) -> None:
        self.strategy = strategy
        self.state = state
        #: This rank's requests not yet agreed on: kind -> reason.
        self.requests: dict[str, str] = {}
        #: Optimizer steps applied on this rank (counted by an optimizer hook).
        self.updates = 0
        self.fixed = every
        #: The agreed interval (committed steps between two agreements in a pass).
        self.interval = 1 if every is None else every
        #: The interval this rank proposes at the next agreement (``"auto"``).
        self.proposal = self.interval
        self._costs: deque[float] = deque(maxlen=8)
        self._agreements = 0
        self._last: tuple[float, int] | None = None
        #: Whether this rank's own cancellation is (part of) what stopped the run.
        self.cancelled_here = False
        #: Hook name -> point code (identical on every rank: same tree, same callbacks).
        self.points: dict[str, int] = {}
        #: How many agreements this run made (for tests and describe()).
        self.count = 0
        #: The step of the last agreement that found the ranks in step.
        self.last_step = 0

    # -- requests ---------------------------------------------------------------------------------

    def request(self, kind: str, reason: str) -> None:
        """Record a request (from any thread, or a signal handler: a dict store)."""
        self.requests.setdefault(kind, reason)

    def defer(self, flow: ControlFlow) -> None:
        """A hook's StopFit/StopEpoch, to be agreed at the next point."""
        kind = "stop_fit" if isinstance(flow, StopFit) else "stop_epoch"
        self.request(kind, flow.reason or type(flow).__name__)

    def begin_run(self) -> None:
        # A signal's request may come just before the run begins (fit has started: see
        # StoppableRun); it is dropped when the run ends (end_run), not here.
        signal = self.requests.get("signal")
        self.requests.clear()
        if signal is not None:
            self.requests["signal"] = signal
        self.cancelled_here = False
        self.count = 0
        self._last = None

    def end_run(self) -> None:
        self.requests.pop("signal", None)

    def count_update(self, *_: Any) -> None:
        """An optimizer step was applied (``Optimizer.register_step_post_hook``)."""
        self.updates += 1

    # -- agreeing ---------------------------------------------------------------------------------

    async def agree(
        self,
        point: int,
        *,
        remaining: int | None = None,
        has_batch: bool = True,
        checksum: float | None = None,
    ) -> Agreed:
        """Exchange the control word at ``point``; check the ranks agree; decode it."""
        # Turns for the loop first: a cancellation of this rank reaches its watcher (and so the
        # requests) now, even while the training loop has not yielded for a while. Two: trio
        # runs the tasks of one scheduling batch in a random order, so after one turn the
        # watcher may still be waiting for its own; after two it has had it.
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        s = self.strategy
        rank = s.rank
        mark = rank + 1
        state = self.state
        step = state.step
        updates = self.updates
        requests = self.requests
        word = [0] * WORD
        for kind in requests:
            word[_SLOT[kind]] = mark
        if not has_batch:
            word[DATA_END] = mark
        if point == PASS_START and remaining is None:
            word[UNSIZED] = 1
        word[STEP], word[NEG_STEP] = step, -step
        word[UPDATES], word[NEG_UPDATES] = updates, -updates
        word[INTERVAL] = self.proposal
        if remaining is not None:
            word[NEG_REMAINING] = -remaining
        if checksum is not None:
            hi, lo = _halves(checksum)
            word[CHECK : CHECK + 4] = [hi, -hi, lo, -lo]
        word[POINT], word[NEG_POINT] = point, -point
        tensor = torch.tensor(word, dtype=torch.int64)
        start = time.perf_counter()
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=s.train_group, async_op=True)
        await s._wait(work, "the control word", tensor)
        now = time.perf_counter()
        self.count += 1
        w = tensor.tolist()
        self._check(w, point, step, updates)
        agreed = Agreed()
        agreed.data_end = w[DATA_END] > 0
        agreed.unsized = w[UNSIZED] > 0
        agreed.remaining = -w[NEG_REMAINING]
        agreed.interval = max(1, w[INTERVAL])
        if point in (PASS_START, PERIODIC):
            self._measure(point, now, now - start, step)
        self.interval = agreed.interval if self.fixed is None else self.fixed
        for kind in KINDS:
            if w[_SLOT[kind]]:
                agreed.stop = kind
                agreed.requester = w[_SLOT[kind]] - 1
                break
        if agreed.stop is not None:
            agreed.reason = self._reason(agreed.stop, agreed.requester)
            if agreed.stop in RUN_ENDING:
                self.cancelled_here = "cancel" in requests
                requests.clear()
            else:
                requests.pop("stop_epoch", None)
        return agreed

    def _reason(self, kind: str, requester: int) -> str:
        s = self.strategy
        if kind == "cancel":
            return f"rank {requester} was cancelled: every rank stopped at the same step"
        mine = self.requests.get(kind) if s.rank == requester else None
        box: list[Any] = [mine]
        # Rare (a stop was agreed) and every rank knows it is needed: one broadcast.
        dist.broadcast_object_list(box, src=requester, group=s.train_group)
        reason = box[0] if isinstance(box[0], str) else kind
        return f"rank {requester}: {reason}"

    def _measure(self, point: int, now: float, cost: float, step: int) -> None:
        """Propose the next interval from this rank's measurements (``"auto"``)."""
        self._agreements += 1
        self._costs.append(cost)
        last, self._last = self._last, (now, step)
        if self.fixed is not None or point != PERIODIC or last is None or step <= last[1]:
            return
        if self._agreements < WARMUP:
            return
        per_step = max((now - last[0]) / (step - last[1]), 1e-6)
        cheapest = min(self._costs)
        wanted = math.ceil(cheapest / (BUDGET * per_step))
        cap = max(1, math.floor(MAX_LAG / per_step))
        self.proposal = max(1, min(wanted, cap))

    def _check(self, w: list[int], point: int, step: int, updates: int) -> None:
        s = self.strategy
        if w[POINT] != -w[NEG_POINT]:
            here = self._point_name(point)
            raise DistributedError(
                f"the ranks reached different agreement points (this rank: {here}): every "
                "rank must call fit with the same arguments (epochs, resume) and have the same "
                "callbacks and stages, and stage code must not stop one rank alone",
                rank=s.rank,
                epoch=self.state.epoch,
                step=step,
            )
        diverged = None
        if w[STEP] != -w[NEG_STEP]:
            diverged = "committed steps"
        elif w[UPDATES] != -w[NEG_UPDATES]:
            diverged = "optimizer updates"
        elif w[CHECK] != -w[CHECK + 1] or w[CHECK + 2] != -w[CHECK + 3]:
            diverged = "weights"
        if diverged is None:
            self.last_step = step
            return
        # Every rank sees the same word, so all of them take this path: one gather is paired.
        counts: list[Any] = [None] * s.world_size
        dist.all_gather_object(counts, (step, updates), group=s.train_group)
        if diverged == "weights":
            detail = (
                "the weights differ between ranks although every rank applied the same number "
                "of updates: a stage forwarded training batches through state.model instead of "
                "state.train_model (bypassing the gradient all-reduce), or changed the weights "
                "on one rank only"
            )
            peer = None
        else:
            index = 0 if diverged == "committed steps" else 1
            values = [c[index] for c in counts]
            # The most common value is the norm (on a tie, the largest: the rank behind is the
            # one that skipped); the first rank that differs from it is named.
            common = max(values, key=lambda v: (values.count(v), v))
            peer = next((r for r, v in enumerate(values) if v != common), None)
            listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            detail = (
                f"the ranks diverged between step {self.last_step} and step {step}: their "
                f"{diverged} differ ({listing}), rank {peer} differs from the others. A "
                "callback skipped a batch on one rank after the gradient all-reduce (decide "
                "on values every rank shares, such as the reduced gradients), or a stage "
                "stepped the optimizer on one rank only"
            )
        raise DistributedError(detail, rank=s.rank, peer=peer, epoch=self.state.epoch, step=step)

    def _point_name(self, point: int) -> str:
        if point in _POINT_NAMES:
            return _POINT_NAMES[point]
        for hook, code in self.points.items():
            if code == point:
                return f"the end of hook {hook!r}"
        return f"point {point}"

    # -- at the end of a hook plan ----------------------------------------------------------------

    async def at_hook(self, point: int, flow: ControlFlow | None) -> None:
        """A hook plan of the training flow ended (with ``flow``, or none): agree, then act."""
        local = None
        if isinstance(flow, StopFit | StopEpoch):
            self.defer(flow)
        else:
            local = flow  # a SkipBatch where no batch runs: the owner's problem, as in one process
        agreed = await self.agree(point)
        if agreed.stop in RUN_ENDING:
            raise AgreedStop(agreed.reason, agreed.stop, agreed.requester)
        if agreed.stop == "stop_epoch":
            raise StopEpoch(agreed.reason)
        if local is not None:
            raise local


class DistributedPlan(HookPlan):
    """A hook plan under a strategy (the class of a built plan is switched to this one).

    ``mode``: ``"agree"`` (training-flow hooks: agree at the end), ``"train"`` (hooks inside a
    training batch: StopFit and StopEpoch deferred), ``"val"`` (validation batches and a
    concurrent validation: StopFit deferred).
    """

    mode: str
    agreement: Agreement
    point: int

    async def run(self) -> None:
        if self.mode == "agree":
            flow = None
            try:
                await HookPlan.run(self)
            except ControlFlow as caught:
                flow = caught
            await self.agreement.at_hook(self.point, flow)
            return
        try:
            await HookPlan.run(self)
        except StopFit as flow:
            self.agreement.defer(flow)
        except StopEpoch as flow:
            if self.mode != "train":
                raise
            self.agreement.defer(flow)


class AgreedBatches:
    """The batches of a training pass under a strategy: agreement points between batches.

    It offers what the executor uses of :class:`~aiolearner.Batches`. ``next_nowait`` answers
    ``WAIT`` when an agreement is due (one comparison per batch), so the executor awaits
    :meth:`next`, which agrees, acts, and hands out the next batch, or ``END``.
    """

    END = END
    WAIT = WAIT

    def __init__(self, inner: Batches, agreement: Agreement, state: State, fit_stop: Any) -> None:
        self._inner = inner
        self._agreement = agreement
        self._state = state
        self._fit_stop = fit_stop
        self._due = -1  # agree before the first batch (the pass's start)
        self._started = False
        self._ended = False
        self._limit: int | None = None  # the step at which the pass ends (agreed length)
        self._each_batch = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def wants_producer(self) -> bool:
        return self._inner.wants_producer

    def start_producer_if_slow(self) -> None:
        self._inner.start_producer_if_slow()

    def direct(self) -> None:
        """Never the iterator itself (see ``Batches.direct``): each batch is taken by
        :meth:`next_nowait`, which is where an agreement falls due."""
        return None

    def next_nowait(self, *, off_loop: bool = False) -> Any:
        if self._state.step >= self._due:
            return WAIT
        return self._inner.next_nowait(off_loop=off_loop)

    async def next(self) -> Any:
        state = self._state
        if state.step < self._due:
            return self._checked(await self._take())
        if self._ended:
            return END
        agreement = self._agreement
        if not self._started:
            self._started = True
            agreed = await agreement.agree(PASS_START, remaining=self._remaining())
            self._each_batch = agreed.unsized
            if not agreed.unsized:
                self._limit = state.step + agreed.remaining
            if self._act(agreed):
                return END
        elif self._limit is not None and state.step >= self._limit:
            return await self._end()
        elif not self._each_batch:
            if self._act(await agreement.agree(PERIODIC)):
                return END
        if self._each_batch:
            batch = await self._take()
            agreed = await agreement.agree(EACH_BATCH, has_batch=batch is not END)
            if agreed.stop is not None or agreed.data_end:
                self._put_back(batch)
                self._act(agreed)
                self._ended = True
                return END
            self._due = state.step  # again before the next batch
            return batch
        assert self._limit is not None
        if state.step >= self._limit:
            return await self._end()
        self._due = min(state.step + agreement.interval, self._limit)
        return self._checked(await self._take())

    async def _take(self) -> Any:
        # As the executor takes batches: without waiting first. (When that first fetch hands
        # the source over to a producer thread, the batch it fetched waits in the source's
        # leftover queue, which only next_nowait reads; awaiting next() at once could hand out
        # the producer's next batch before it.)
        batch = self._inner.next_nowait()
        if batch is WAIT:
            batch = await self._inner.next()
        return batch

    async def _end(self) -> Any:
        strategy = self._agreement.strategy
        agreed = await self._agreement.agree(PASS_END, checksum=strategy._checksum())
        self._act(agreed)
        self._ended = True
        return END

    def _act(self, agreed: Agreed) -> bool:
        """Raise an agreed run-ending stop; ``True`` when the pass ends (agreed StopEpoch)."""
        if agreed.stop is None:
            return False
        if agreed.stop in RUN_ENDING:
            raise AgreedStop(agreed.reason, agreed.stop, agreed.requester)
        # StopEpoch: the pass ends here, as after a batch's StopEpoch in one process (``Fit``
        # records the reason and goes on with its after_fit hook and the train_loss).
        self._fit_stop(StopEpoch(agreed.reason))
        self._ended = True
        return True

    def _remaining(self) -> int | None:
        inner = self._inner
        try:
            total = len(inner.source)
        except TypeError:
            return None
        return max(0, total - inner.index)

    def _checked(self, batch: Any) -> Any:
        if batch is END:
            strategy = self._agreement.strategy
            raise DistributedError(
                f"train_data ended after {self._inner.index} batches on this rank, before the "
                "length its len() announced and the ranks agreed on; every rank must be able to "
                "give as many batches as its len() says",
                rank=strategy.rank,
                epoch=self._state.epoch,
                step=self._state.step,
            )
        return batch

    def _put_back(self, batch: Any) -> None:
        """A batch taken but not run (the pass ended on another rank): keep it for the next pass
        of a stream that outlives epochs (``steps_per_epoch``), as an interrupted pass does."""
        if batch is END:
            return
        inner = self._inner
        source = inner.source
        if source.steps_per_epoch is None:
            return  # a new iterator starts the next epoch: nothing carries over
        source._leftover.appendleft(batch)
        inner._taken -= 1
        inner.index -= 1
        source.position -= 1
