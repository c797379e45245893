"""The evaluation API's bodies: ``Learner.validate``, ``test`` and ``predict``.

The methods on :class:`Learner` keep the documented API (signatures and docstrings, from which
the reference is generated) and delegate here. :func:`sets_for` turns validation data (one
set, or a mapping of named sets) into batch sources; the constructor uses it for ``val_data``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import torch

from . import _checks
from ._data import BatchSource
from ._device import DeviceMover
from ._exceptions import ConfigurationError, ControlFlow
from ._lifecycle import LearnerStatus, running
from ._plan import check_sets
from ._runtime import validation_sources
from ._stage import split_batch, unowned
from ._stages import Epoch

if TYPE_CHECKING:
    from ._learner import Learner
    from ._stage import Stage

__all__ = ["evaluate", "predict", "sets_for", "test", "validate"]


def sets_for(learner: Learner[Any], data: Any, what: str) -> dict[str | None, BatchSource]:
    """Validation data as sets by name: ``{None: data}`` for one, the mapping for several."""
    train = learner._train
    if isinstance(data, Mapping):
        if not data:
            raise ValueError(f"{what}: a mapping of validation sets needs at least one set")
        if learner._strategy is not None:
            raise ConfigurationError(
                f"{what}: several named validation sets are not supported under a "
                "distributed strategy (each set would need a reduction of its own, agreed "
                "by every rank); validate the sets one at a time with "
                "learner.validate(data)"
            )
        for name in data:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(
                    f"{what}: the names of validation sets go into metric names"
                    f" (val_<name>_loss), so each must be an identifier; got {name!r}"
                )
        items: list[tuple[str | None, Any]] = list(data.items())
    else:
        items = [(None, data)]
    sources = {
        name: BatchSource(
            value,
            name=what if name is None else f"{what}[{name!r}]",
            mover=learner._mover,
            prefetch=train.prefetch,
            fetch=train.fetch,
            fetch_budget=train.fetch_budget,
        )
        for name, value in items
    }
    for source in sources.values():
        _checks.check_data(source.name, source.data)
        source.must_yield = True
    return sources


async def validate(
    learner: Learner[Any], data: Iterable[Any] | Mapping[str, Any] | None
) -> dict[str, Any]:
    """The body of :meth:`Learner.validate`."""
    learner._check_idle("validate")
    sets = learner._val_sets if data is None else sets_for(learner, data, "data")
    if not sets:
        raise ValueError("this learner has no val_data to validate on; pass data=")
    check_sets(learner, validation_stage(learner).walk(), sets)
    d = learner._state.__dict__
    before = d.get("validation")
    async with running(learner, LearnerStatus.VALIDATING):
        await evaluate(learner, None if data is None else sets)
    return results_of(d, before)


def results_of(d: dict[str, Any], before: Any) -> dict[str, Any]:
    """The results the pass just set (``state.validation``); ``{}`` from a stage of one's own in
    the validation slot that sets none (never the results of an earlier pass)."""
    validation = d.get("validation")
    return {} if validation is None or validation is before else dict(validation)


async def test(learner: Learner[Any], data: Iterable[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """The body of :meth:`Learner.test`."""
    learner._check_idle("test")
    sets = sets_for(learner, data, "data")
    check_sets(learner, validation_stage(learner).walk(), sets)
    state = learner._state
    d = state.__dict__
    kept: dict[str, Any] = {k: d[k] for k in ("validation", "validation_tag") if k in d}
    validator = learner._rt.validator
    latest = None if validator is None else validator.latest
    rt = learner._rt
    rt.testing = dict(state.metrics)
    async with running(learner, LearnerStatus.TESTING):
        try:
            await evaluate(learner, sets)
            results = results_of(d, kept.get("validation"))
        finally:
            rt.tested = rt.tested_keys(state.metrics)
            rt.testing = None
            # A test is not a validation: the latest validation stays what it was.
            state.invalidate("validation", "validation_tag")
            d.update(kept)
            if validator is not None:
                validator.latest = latest
    return {f"test_{key}": value for key, value in results.items()}


def validation_stage(learner: Learner[Any]) -> Stage:
    """The stage in the epoch's validation slot (``Validate``, or what replaced it, whatever
    its name)."""
    for stage in learner._root.walk():
        if isinstance(stage, Epoch):
            return stage.validate
    named = learner._stages.get("validate")
    if named is None:
        raise ConfigurationError(
            "this learner's stage tree has no validation stage (no Epoch with a validate slot, "
            "no stage named 'validate'), so it cannot validate or test"
        )
    return named


async def evaluate(learner: Learner[Any], sets: dict[str | None, BatchSource] | None) -> None:
    """The validation stage once, over ``sets`` (``None``: ``val_data``)."""
    stage = validation_stage(learner)
    validator = learner._rt.validator
    token = None if sets is None else validation_sources.set(sets)
    try:
        if validator is None:
            await stage(learner._state)
        else:
            await validator.validate_now(stage, learner._state, sets)
    except ControlFlow as flow:
        # Validate owns StopEpoch and ValidateBatch SkipBatch; a StopFit (no fit is running)
        # or control flow raised outside the pass has no owner here.
        raise unowned(flow, stage.name) from flow
    finally:
        if token is not None:
            validation_sources.reset(token)


async def predict(learner: Learner[Any], data: Iterable[Any] | Any) -> Any:
    """The body of :meth:`Learner.predict`."""
    learner._check_idle("predict")
    train = learner._train
    if isinstance(data, torch.Tensor):
        # A tensor is one batch of inputs: iterated, its rows would each be taken for a batch.
        data = [data]
    source = BatchSource(
        data,
        name="predict data",
        mover=DeviceMover(learner._device),
        prefetch=train.prefetch,
        fetch=train.fetch,
        fetch_budget=train.fetch_budget,
    )
    outputs: list[Any] = []
    model = learner.model
    rt = learner._rt

    def forward(batch: Any) -> Any:
        if isinstance(batch, tuple | list):
            # (inputs, targets), or (inputs,) as a DataLoader over TensorDataset(inputs) gives.
            inputs = batch[0] if len(batch) == 1 else split_batch(batch, "predict")[0]
        else:
            inputs = batch
        with torch.inference_mode():
            return model(inputs)

    async with running(learner, LearnerStatus.PREDICTING):
        assert rt.tg is not None
        was_training = model.training
        async with rt.weights_lock.read():
            model.eval()
            try:
                async with source.open(rt.tg) as batches:
                    while True:
                        batch = await batches.next()
                        if batch is batches.END:
                            break
                        try:
                            outputs.append(await rt.compute(forward, batch))
                        except Exception as exc:
                            exc.add_note(
                                f"aiolearner: raised in predict on batch {len(outputs)} of the "
                                "data given"
                            )
                            raise
                        await anyio.lowlevel.checkpoint()
            finally:
                model.train(was_training)
    if outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return torch.cat(outputs)
    return outputs
