"""Running fused batches: in one frame on the event loop, or in bursts in the compute worker.

A batch stage whose whole subtree is plain (default ``run``, compute leaves, ``def`` hooks only)
is *fused*: it runs as one synchronous call. ``Fit`` runs it here by the shortest path that gives
the same outcome (:func:`run_fused`): the exact default batch with no hooks as one function, a
hook-less flat batch as its compute leaves in order, anything else through ``call_sync``. In
thread mode :func:`burst_sync` runs fused batches back to back in the compute worker, one hop for
many batches (see ``Fit._burst``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ._data import END, WAIT
from ._exceptions import ControlFlow
from ._stage import ComputeStage, FlatProgram, Stage, note_stage_error, split_batch
from ._state import State

if TYPE_CHECKING:
    from ._data import Batches
    from ._locks import ReadWriteLock
    from ._runtime import Runtime

__all__ = [
    "BURST_SECONDS",
    "burst_sync",
    "flat_program",
    "run_default_batch",
    "run_fused",
    "run_flat",
]


#: The longest a burst of batches keeps the compute worker before handing back to the loop.
BURST_SECONDS = 0.05


def burst_sync(
    fit_batch: Stage,
    rt: Runtime,
    state: State,
    batches: Batches,
    losses: list[torch.Tensor],
    plain: bool,
    flat: FlatProgram | None,
    lock: ReadWriteLock | None,
    stop: list[bool],
) -> Any:
    """The body of :meth:`Fit._burst`, in the compute worker thread."""
    policy = rt.policy
    clock = time.perf_counter
    until = clock() + BURST_SECONDS
    while True:
        start = clock()
        try:
            run_fused(fit_batch, rt, state, losses, plain, flat)
        finally:
            now = clock()
            policy.record(now - start)
        # Errors and StopEpoch leave the batch to the loop (Fit.run), as for a single batch.
        rt.finish_batch(state, losses)
        if (
            stop
            or now >= until
            or policy.reconsider_due(now)
            or (lock is not None and lock.waiting)
            or batches.wants_producer
        ):
            return None
        batch = batches.next_nowait(off_loop=True)
        if batch is WAIT or batch is END:
            return batch
        state.batch = batch
        rt.committed = False


def run_fused(
    fit_batch: Stage,
    rt: Runtime,
    state: State,
    losses: list[torch.Tensor],
    plain: bool,
    flat: FlatProgram | None,
) -> None:
    """One fused batch, by the shortest path that gives the same outcome."""
    if plain and not rt.observed:
        run_default_batch(fit_batch, rt, state, losses)
    elif flat is not None and not rt.observed:
        run_flat(fit_batch, flat, state)
    else:
        fit_batch.call_sync(state)


def flat_program(stage: Stage) -> FlatProgram | None:
    """The compute leaves of a batch stage, when a batch is nothing but calling them in order.

    That is: no hooks on the stage or its children, default ``call_sync``/``run_sync``, and
    children that are plain compute leaves owning no control flow (the default FitBatch with
    no callbacks on its hooks). Otherwise ``None``.
    """
    if stage._before is not None or stage._after is not None:
        return None
    if type(stage).call_sync is not Stage.call_sync or type(stage).run_sync is not Stage.run_sync:
        return None
    leaves = []
    for child in stage.children:
        if (
            not isinstance(child, ComputeStage)
            or child.children
            or child.catches
            or child._before is not None
            or child._after is not None
            or type(child).call_sync is not Stage.call_sync
            or type(child).run_sync is not ComputeStage.run_sync
        ):
            return None
        leaves.append((child, child.compute))
    return tuple(leaves)


def run_flat(stage: Stage, leaves: FlatProgram, state: State) -> None:
    """``stage.call_sync(state)`` for a stage :func:`flat_program` accepted, in one frame.

    The same outcome as the nested calls (~4 us a batch fewer on the development machine): a
    control-flow exception the stage owns is acted on; an error is noted with the leaf's name.
    """
    leaf: Stage = stage
    try:
        for leaf, compute in leaves:  # noqa: B007 (the except clauses name the leaf)
            compute(state)
    except ControlFlow as flow:
        if not isinstance(flow, stage.catches):
            raise
        stage.acted(state, flow)
    except Exception as exc:
        note_stage_error(exc, leaf.name, state)
        raise


def run_default_batch(stage: Stage, rt: Runtime, state: State, losses: list[torch.Tensor]) -> None:
    """:func:`run_flat` for the default FitBatch with no hooks anywhere, in one frame.

    The same work as ``Gradient.compute`` then ``Update.compute``, with the same outcome, minus
    the state round trips nobody can observe: with no hook on the batch, ``output`` and ``loss``
    would only be written to the state to be cleared by ``finish_batch``, so the loss goes
    straight into the pass's ``losses`` and ``output`` is freed as soon as the loss is computed,
    as in a hand-written loop. On a tiny model that is ~5 us a batch fewer (docs/performance.md):
    keeping tensors alive longer and touching more Python objects between torch calls slows the
    torch calls themselves, not only the Python around them.
    """
    d = state.__dict__
    name = "gradient"
    try:
        inputs, targets = split_batch(d["batch"], name)
        loss = d["loss_fn"](d["model"](inputs), targets)
        loss.backward()
        name = "update"
        optimizer = d["optimizer"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rt.commit(state)
    except ControlFlow as flow:
        if not isinstance(flow, stage.catches):
            raise
        stage.acted(state, flow)
        return
    except Exception as exc:
        note_stage_error(exc, name, state)
        raise
    losses.append(loss.detach())
