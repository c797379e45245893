"""Declared access to the state, and validity of fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from aiolearner import Callback, StateAccessError, StateView
from aiolearner.testing import make_learner


class Probe(Callback):
    """Runs ``action(state)`` in one hook and keeps what it returned or raised."""

    def __init__(
        self,
        hook: str,
        action: Callable[[StateView], Any],
        *,
        reads: frozenset[str] = frozenset(),
        writes: frozenset[str] = frozenset(),
    ) -> None:
        self.reads = reads  # type: ignore[misc]
        self.writes = writes  # type: ignore[misc]
        self.hook = hook
        self.action = action
        self.results: list[Any] = []
        self.errors: list[StateAccessError] = []

    def hooks(self) -> Any:
        yield self.hook, self._run

    def _run(self, state: StateView) -> None:
        try:
            self.results.append(self.action(state))
        except StateAccessError as exc:
            self.errors.append(exc)


async def run_probe(probe: Probe, *, n_batches: int = 2, epochs: int = 1) -> Probe:
    learner = make_learner(callbacks=[probe], n_batches=n_batches)
    await learner.fit(epochs)
    return probe


def assert_refused(exc: StateAccessError, field: str, hook: str, *words: str) -> None:
    assert exc.field == field
    assert exc.callback == "Probe"
    assert exc.hook == hook
    message = str(exc)
    for word in (field, "Probe", hook, *words):
        assert word in message, (word, message)


async def test_reading_an_undeclared_field() -> None:
    probe = await run_probe(Probe("after_gradient", lambda s: s.loss, reads=frozenset({"step"})))
    assert probe.results == []
    assert len(probe.errors) == 2
    assert_refused(probe.errors[0], "loss", "after_gradient", "not declared", "reads")


async def test_writing_an_undeclared_field() -> None:
    def write(state: StateView) -> None:
        state.lr_scale = 0.5

    probe = await run_probe(Probe("after_update", write))
    assert len(probe.errors) == 2
    assert_refused(probe.errors[0], "lr_scale", "after_update", "writes")


async def test_undeclared_access_fails_fit_when_not_caught() -> None:
    class Nosy(Callback):
        def after_fit(self, state: StateView) -> None:
            state.metrics  # noqa: B018 - the read is the point

    learner = make_learner(callbacks=[Nosy()])
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    (leaf,) = info.value.exceptions
    assert isinstance(leaf, StateAccessError)
    assert (leaf.field, leaf.callback, leaf.hook) == ("metrics", "Nosy", "after_fit")


async def test_assigning_a_read_only_field() -> None:
    def assign(state: StateView) -> None:
        state.metrics = {}

    probe = await run_probe(Probe("after_fit", assign, reads=frozenset({"metrics"})))
    (exc,) = probe.errors
    assert_refused(exc, "metrics", "after_fit", "cannot be assigned", "writes")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.__setitem__("x", 1),
        lambda m: m.update(x=1),
        lambda m: m.pop("train_loss"),
        lambda m: m.__delitem__("train_loss"),
        lambda m: m.clear(),
        lambda m: m.setdefault("x", 1),
    ],
)
async def test_in_place_mutation_of_a_read_only_dict(mutate: Callable[[Any], Any]) -> None:
    def action(state: StateView) -> None:
        mutate(state.metrics)

    probe = Probe("after_fit", action, reads=frozenset({"metrics"}))
    learner = make_learner(callbacks=[probe])
    await learner.fit(1)
    (exc,) = probe.errors
    assert_refused(exc, "metrics", "after_fit", "read-only")
    assert set(learner.state.metrics) == {"train_loss", "val_loss"}


async def test_item_assignment_with_metrics_only_in_reads() -> None:
    class Sneaky(Callback):
        reads = frozenset({"metrics"})

        def after_epoch(self, state: StateView) -> None:
            state.metrics["x"] = 1

    learner = make_learner(callbacks=[Sneaky()])
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    (leaf,) = info.value.exceptions
    assert isinstance(leaf, StateAccessError)
    assert (leaf.field, leaf.callback, leaf.hook) == ("metrics", "Sneaky", "after_epoch")
    assert "x" not in learner.state.metrics


async def test_declared_writer_mutates_metrics_in_place() -> None:
    def add(state: StateView) -> None:
        state.metrics["lr"] = 0.1

    learner = make_learner(callbacks=[Probe("after_fit", add, writes=frozenset({"metrics"}))])
    await learner.fit(1)
    assert learner.state.metrics["lr"] == 0.1


async def test_read_only_reads_see_values_and_nested_containers_stay_read_only() -> None:
    def nested(state: StateView) -> None:
        state.metrics["history"] = [1.0]
        state.metrics["per_class"] = {"a": 1.0}

    def read(state: StateView) -> tuple[float, float]:
        history, per_class = state.metrics["history"], state.metrics["per_class"]
        with pytest.raises(StateAccessError, match=r"metrics\['history'\]"):
            history.append(2.0)
        per_class["b"] = 2.0  # raises: recorded by the probe
        return history[0], per_class["a"]

    class Writer(Callback):
        writes = frozenset({"metrics"})

        def after_fit(self, state: StateView) -> None:
            nested(state)

    probe = Probe("after_epoch", read, reads=frozenset({"metrics"}))
    learner = make_learner(callbacks=[Writer(), probe])
    await learner.fit(1)
    (exc,) = probe.errors
    assert exc.field == "metrics['per_class']"
    assert learner.state.metrics["history"] == [1.0]
    assert learner.state.metrics["per_class"] == {"a": 1.0}


@pytest.mark.parametrize("field", ["step", "epoch"])
async def test_counters_cannot_be_assigned_by_callbacks(field: str) -> None:
    def assign(state: StateView) -> None:
        setattr(state, field, 100)

    probe = await run_probe(Probe("after_fit", assign, reads=frozenset({field})))
    (exc,) = probe.errors
    assert exc.field == field


async def test_deleting_a_field_is_refused() -> None:
    def delete(state: StateView) -> None:
        del state.note

    probe = await run_probe(Probe("after_fit", delete, writes=frozenset({"note"})))
    (exc,) = probe.errors
    assert exc.field == "note"


# -- validity ----------------------------------------------------------------------------------


async def test_loss_in_before_fit_batch_is_invalid_never_stale() -> None:
    probe = await run_probe(
        Probe("before_fit_batch", lambda s: s.loss, reads=frozenset({"loss"})), n_batches=3
    )
    # Every batch, including those after the first loss was computed.
    assert probe.results == []
    assert len(probe.errors) == 3
    for exc in probe.errors:
        assert_refused(exc, "loss", "before_fit_batch", "not valid", "Gradient")


async def test_loss_is_valid_after_gradient_and_is_this_batchs() -> None:
    probe = await run_probe(
        Probe("after_gradient", lambda s: s.loss, reads=frozenset({"loss"})), n_batches=3
    )
    assert probe.errors == []
    assert len(probe.results) == 3
    assert len({id(x) for x in probe.results}) == 3


async def test_batch_after_the_epoch_is_invalid() -> None:
    probe = await run_probe(Probe("after_epoch", lambda s: s.batch, reads=frozenset({"batch"})))
    (exc,) = probe.errors
    assert_refused(exc, "batch", "after_epoch", "not valid", "not valid outside a batch")


async def test_outcome_only_in_after_fit_run() -> None:
    early = Probe("before_fit_run", lambda s: s.outcome, reads=frozenset({"outcome"}))
    learner = make_learner(callbacks=[early])
    await learner.fit(1)
    (exc,) = early.errors
    assert "after_fit_run" in exc.reason
    late = Probe("after_fit_run", lambda s: s.outcome, reads=frozenset({"outcome"}))
    await run_probe(late)
    assert late.results == ["completed"]


async def test_hasattr_is_false_for_invalid_and_undeclared_fields() -> None:
    def check(state: StateView) -> tuple[bool, bool, bool, bool]:
        return (
            hasattr(state, "loss"),
            hasattr(state, "batch"),
            hasattr(state, "optimizer"),  # valid, but not declared
            state.is_valid("loss"),
        )

    before = await run_probe(
        Probe("before_fit_batch", check, reads=frozenset({"loss", "batch"})), n_batches=1
    )
    after = await run_probe(
        Probe("after_gradient", check, reads=frozenset({"loss", "batch"})), n_batches=1
    )
    assert before.results == [(False, True, False, False)]
    assert after.results == [(True, True, False, True)]


async def test_stage_code_sees_invalid_fields_as_errors_too() -> None:
    learner = make_learner(n_batches=1)
    await learner.fit(1)
    state = learner.state
    assert not hasattr(state, "loss")
    with pytest.raises(StateAccessError, match="not valid") as info:
        state.batch  # noqa: B018
    assert info.value.field == "batch"
    assert info.value.callback is None
    assert state.validation["loss"] > 0
    assert state.validation_tag == (0, 1)


async def test_clearing_a_dict_field_declared_by_key() -> None:
    # Clearing removes every key: refused (StateAccessError, not AttributeError) unless the
    # callback writes each key present.
    def clear(state: StateView) -> None:
        state.metrics.clear()

    probe = Probe("after_fit", clear, writes=frozenset({"metrics.mine"}))
    learner = make_learner(callbacks=[probe])
    await learner.fit(1)
    (exc,) = probe.errors
    assert isinstance(exc, StateAccessError)
    assert "train_loss" in str(exc)
    assert "train_loss" in learner.state.metrics
