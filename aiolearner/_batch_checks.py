"""Checks on what a training batch leaves behind, made by the executor as it finishes a batch
(``_executor.Executor.finish_batch``): state fields that no stage declares (they would go stale),
and gradients left in ``.grad`` for the next batch (a batch undone drops them, so the run would
not be exact). Off the per-batch path: the first runs only when the state's set of fields
changed, the second only for a pass's first batches under a batch stage of its own.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from ._exceptions import StageError

if TYPE_CHECKING:
    from ._executor import Executor
    from ._stage import Stage
    from ._state import State

__all__ = ["carried_gradients", "check_fields"]


def carried_gradients(executor: Executor, stage: Stage, state: State) -> None:
    """Warn (once a learner) where a committed batch leaves gradients in ``.grad`` of a
    parameter its updates step, for the next batch: the learner drops all of ``.grad``
    when a batch is skipped, stopped or undone, the earlier batches' part included."""
    rt = executor.rt
    d = state.__dict__
    optimizers = d.get("optimizers") or {"": d.get("optimizer")}
    if executor.stepped is not None:  # (None: any optimizer, a stage of its own writes)
        first = d.get("optimizer")
        optimizers = {
            k: v
            for k, v in optimizers.items()
            if k in executor.stepped or ("" in executor.stepped and v is first)
        }
    if rt.committed and any(
        p.grad is not None
        for optimizer in optimizers.values()
        if optimizer is not None
        for group in optimizer.param_groups
        for p in group["params"]
    ):
        rt.warned_carried = True
        executor.grad_checks = 0
        warnings.warn(
            f"batch stage {stage.name!r} leaves gradients in `.grad` after a committed batch, "
            "for the next batch to add to: a batch that is skipped, stopped or interrupted "
            "drops all of `.grad`, the earlier batches' part included, so the run is not "
            "exact then; accumulate over batches with `AccumulateGradients`, or keep the "
            "running sum out of `.grad` between batches (docs/writing-stages.md)",
            UserWarning,
            stacklevel=2,
        )


def check_fields(executor: Executor, stage: Stage, state: State) -> None:
    """After a batch that changed the state's fields: a field set by stage code must be
    declared somewhere (a stale value would be read otherwise)."""
    before = executor.fields_before
    known = executor.known_fields
    unknown = sorted(
        k for k in state.__dict__ if k not in before and k[0] != "_" and k not in known
    )
    executor.fields_seen = len(state.__dict__)
    if unknown:
        raise StageError(
            f"state field {unknown[0]!r} was set during a batch but no stage declares it; "
            f"add it to the `fields` of the stage that sets it (one of "
            f"{[s.name for s in stage.walk()]}), with its lifetime "
            f"(e.g. fields = {{{unknown[0]!r}: 'batch'}}), so it expires instead of "
            "going stale",
            stage=stage.name,
        )
