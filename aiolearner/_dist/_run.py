"""A ``fit`` run under a strategy: shielded from outside cancellation, and what a failure raises.

While ``fit`` runs, the root stage runs in a shielded scope (:func:`run_fit`). An outside
cancellation of one rank is seen by a watcher task (:func:`watch_cancel`), which turns it into a
request that every rank agrees on at its next agreement point, so no rank leaves a collective
the others entered; the shield gets a deadline (the group's timeout) in case the ranks never
reach one.

A failure ends every rank with a clear error (:func:`on_error`): the rank whose own code failed
reports the error in the store and raises it unchanged; a rank whose collective failed under it
raises :class:`~aiolearner.DistributedError` quoting the report it finds
(:func:`distributed_error`). After either, no collective runs in this process.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio

from .._exceptions import DistributedError
from ._comm import FailureReports, is_comm_failure

if TYPE_CHECKING:
    from .._learner import Learner
    from ._strategy import Strategy

__all__ = ["describe_error", "distributed_error", "on_error", "run_fit", "watch_cancel"]


async def run_fit(strategy: Strategy, learner: Learner[Any]) -> None:
    """``learner``'s root stage, shielded: see the module docstring."""
    rt = learner._rt
    state = learner._state
    agreement = strategy._agreement
    assert agreement is not None
    assert rt.tg is not None
    if strategy._failed:
        raise DistributedError(
            "fit after distributed training failed in this process: start the job again "
            "(resume from the last checkpoint)",
            rank=strategy._rank,
        )
    agreement.begin_run()
    for registered in strategy._with_pass.values():
        registered.clear()
    strategy._runs += 1
    strategy._reports = FailureReports(
        strategy._rank, strategy._world_size, f"{strategy._prefix}/{strategy._runs}"
    )
    watch = anyio.CancelScope()
    # Named like the compute worker's task: it only waits, so the loop is not "shared".
    rt.tg.start_soon(watch_cancel, strategy, watch, name="aiolearner.compute.cancel-watch")
    try:
        with anyio.CancelScope(shield=True) as shield:
            strategy._shield = shield
            try:
                await learner._root(state)
                # A barrier: rank 0's last checkpoint is written before anyone returns.
                await agreement.agree(5)
            except BaseException as exc:
                translated = on_error(strategy, exc)
                if translated is exc:
                    raise
                raise translated from exc
    finally:
        strategy._shield = None
        watch.cancel()
        agreement.end_run()
    if agreement.cancelled_here:
        # This rank was cancelled from outside; every rank stopped at the same step. Now
        # the cancellation lands, as it would have, outside the shield.
        await anyio.lowlevel.checkpoint()


async def watch_cancel(strategy: Strategy, scope: anyio.CancelScope) -> None:
    """Until ``scope`` is cancelled: an outside cancellation becomes a request to stop."""
    with scope:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            if not scope.cancel_called and strategy._agreement is not None:
                strategy._agreement.request("cancel", "cancelled")
                shield = strategy._shield
                if shield is not None:
                    # Bounded: if the ranks never reach an agreement point, the run is
                    # cancelled here after all (and the others fail at their timeout).
                    bound = (strategy.timeout or timedelta(minutes=30)).total_seconds() + 1.0
                    shield.deadline = anyio.current_time() + bound
            raise


def on_error(strategy: Strategy, exc: BaseException) -> BaseException:
    """What ``fit`` raises for ``exc`` on this rank (the others must hear of it)."""
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        if strategy._reports is not None:
            strategy._reports.report("it was cancelled and could not agree a stop with the others")
        strategy._failed = True
        return exc
    if isinstance(exc, DistributedError):
        strategy._failed = True
        return exc
    if not isinstance(exc, Exception):
        return exc
    if is_comm_failure(exc):
        # A collective failed under this rank: another rank failed (or diverged, or left).
        return distributed_error(
            strategy, f"a collective failed ({type(exc).__name__}: {exc})", exc
        )
    # This rank's own error: it propagates unchanged; the others will quote it.
    strategy._failed = True
    if strategy._reports is not None:
        strategy._reports.report(describe_error(exc))
    return exc


def distributed_error(
    strategy: Strategy,
    problem: str,
    exc: BaseException | None,
    found: tuple[int, str] | None = None,
) -> DistributedError:
    """The error for a collective that failed (``exc``) or a failed rank's report (``found``);
    from now on no collective runs in this process."""
    strategy._failed = True
    if found is None and strategy._reports is not None:
        found = strategy._reports.find()
    learner = strategy._learner() if strategy._learner is not None else None
    d = {} if learner is None else learner._state.__dict__
    if found is None and exc is not None:
        problem += (
            "; no rank reported an error, so a rank was probably killed or its machine "
            "lost, or it stopped answering for the group's timeout, or it left this "
            "collective's run (every rank must call the same learner methods, with the same "
            "arguments, in the same order)"
        )
    return DistributedError(
        problem,
        rank=strategy._rank,
        peer=None if found is None else found[0],
        peer_error=None if found is None else found[1],
        epoch=d.get("epoch"),
        step=d.get("step"),
    )


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an error, with the errors grouped in it (callbacks' errors)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        inner = "; ".join(describe_error(e) for e in exc.exceptions)
        text += f" ({inner})"
    return text
