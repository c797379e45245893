"""Per-key writes of dict fields: ``writes={"metrics.best_val_loss"}``.

Two callbacks writing different keys of ``metrics`` on one hook need no order; two writing one
key, or one writing the whole field and one a key, are refused when the learner is built; a
reader of the whole field runs after the writers of its keys; views let a callback touch only
the keys it declares; a key that is not set reads as a StateKeyError saying who writes it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from aiolearner import (
    Callback,
    ConfigurationError,
    Learner,
    StateAccessError,
    StateKeyError,
    StateView,
)
from aiolearner.callbacks import EMA, EarlyStopping, Metrics
from aiolearner.testing import make_learner

ROOT = Path(__file__).resolve().parent.parent


class Put(Callback):
    """Writes ``metrics[key] = value`` in after_validate (declared per key unless told)."""

    def __init__(self, key: str, value: float = 1.0, *, whole: bool = False) -> None:
        self.key = key
        self.value = value
        self.__dict__["writes"] = frozenset({"metrics" if whole else f"metrics.{key}"})

    @property
    def name(self) -> str:
        return f"Put({self.key})"

    def after_validate(self, state: StateView) -> None:
        state.metrics[self.key] = self.value


class ReadAll(Callback):
    reads = frozenset({"metrics"})
    seen: dict[str, Any]

    def after_validate(self, state: StateView) -> None:
        self.seen = dict(state.metrics)


def layers(learner: Learner[Any], stage: str = "validate") -> list[list[str]]:
    plan = learner.stage(stage)._after
    assert plan is not None
    return [[e.name for e in (*layer.sync, *layer.concurrent)] for layer in plan.layers]


# -- ordering and conflicts, at build ---------------------------------------------------------


async def test_writers_of_different_keys_need_no_order() -> None:
    reader = ReadAll()
    learner = make_learner(callbacks=[Put("a", 1.0), Put("b", 2.0), reader])
    # Both writers in one layer; the reader of the whole field after both.
    assert layers(learner) == [["Put(a)", "Put(b)"], ["ReadAll"]]
    await learner.fit(1)
    assert reader.seen["a"] == 1.0
    assert reader.seen["b"] == 2.0


def test_two_writers_of_one_key_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="same key") as info:
        make_learner(callbacks=[Put("a"), Put("a")])
    assert info.value.field == "metrics.a"
    assert info.value.hook == "after_validate"


def test_a_writer_of_the_whole_field_conflicts_with_a_writer_of_a_key() -> None:
    with pytest.raises(ConfigurationError, match=r"whole field 'metrics'.*its key 'metrics\.b'"):
        make_learner(callbacks=[Put("a", whole=True), Put("b")])


def test_an_explicit_order_settles_a_whole_field_writer_and_a_key_writer() -> None:
    class Later(Put):
        after = (Put,)

    learner = make_learner(callbacks=[Put("a", whole=True), Later("b")])
    assert layers(learner) == [["Put(a)"], ["Put(b)"]]


class ReadKey(Callback):
    def __init__(self, key: str) -> None:
        self.key = key
        self.__dict__["reads"] = frozenset({f"metrics.{key}"})
        self.value: Any = None

    @property
    def name(self) -> str:
        return f"ReadKey({self.key})"

    def after_validate(self, state: StateView) -> None:
        self.value = state.metrics[self.key]


async def test_a_reader_of_a_key_runs_after_its_writer_only() -> None:
    reader = ReadKey("b")
    learner = make_learner(callbacks=[reader, Put("a"), Put("b", 5.0)])
    # ReadKey(b) waits for Put(b) only; Put(a) has no order with either.
    assert layers(learner) == [["Put(a)", "Put(b)"], ["ReadKey(b)"]]
    await learner.fit(1)
    assert reader.value == 5.0


def test_a_cycle_through_keys_is_refused() -> None:
    class A(Callback):
        reads = frozenset({"metrics.b"})
        writes = frozenset({"metrics.a"})

        def after_validate(self, state: StateView) -> None: ...

    class B(Callback):
        reads = frozenset({"metrics.a"})
        writes = frozenset({"metrics.b"})

        def after_validate(self, state: StateView) -> None: ...

    with pytest.raises(ConfigurationError, match="ordering cycle"):
        make_learner(callbacks=[A(), B()])


@pytest.mark.parametrize(
    ("writes", "match"),
    [
        ({"metrics."}, "not a field name"),
        ({".x"}, "not a field name"),
        ({"epoch.x"}, "written by stages only"),
        ({"hook.x"}, "name of the state view"),
    ],
)
def test_bad_key_declarations_are_refused(writes: set[str], match: str) -> None:
    class Bad(Callback):
        def after_validate(self, state: StateView) -> None: ...

    bad = Bad()
    bad.__dict__["writes"] = frozenset(writes)
    with pytest.raises(ConfigurationError, match=match):
        make_learner(callbacks=[bad])


def test_describe_lists_the_keys() -> None:
    text = make_learner(callbacks=[Put("a")]).describe()
    assert "Put(a): reads -, writes ['metrics'] (metrics keys: a)" in text


# -- the view, at run time --------------------------------------------------------------------


class Probe(Callback):
    """Tries what a per-key writer may and may not do, in after_validate."""

    reads = frozenset({"validation", "metrics.val_loss"})
    writes = frozenset({"metrics.mine"})

    def __init__(self) -> None:
        self.results: dict[str, str] = {}

    def _try(self, label: str, fn: Any) -> None:
        try:
            out = fn()
        except StateKeyError as exc:
            self.results[label] = f"StateKeyError: {exc}"
        except StateAccessError as exc:
            self.results[label] = f"StateAccessError: {exc}"
        else:
            self.results[label] = f"ok {out!r}"

    def after_validate(self, state: StateView) -> None:
        metrics = state.metrics
        self._try("get missing own", lambda: metrics.get("mine", "default"))
        self._try("read missing own", lambda: metrics["mine"])
        metrics["mine"] = 3.0
        self._try("read own", lambda: metrics["mine"])
        self._try("read declared", lambda: round(metrics["val_loss"], 0) >= 0)
        self._try("read other", lambda: metrics["train_loss"])
        self._try("get other", lambda: metrics.get("train_loss"))
        self._try("write other", lambda: metrics.__setitem__("val_loss", 0.0))
        self._try("assign field", lambda: setattr(state, "metrics", {}))
        self._try("keys", lambda: sorted(metrics))


async def test_a_per_key_writer_touches_only_its_keys() -> None:
    probe = Probe()
    learner = make_learner(callbacks=[probe])
    await learner.fit(1)
    r = probe.results
    assert r["get missing own"] == "ok 'default'"
    assert r["read missing own"].startswith("StateKeyError")
    assert "'Probe' (hooks: after_validate)" in r["read missing own"]  # who writes it
    assert r["read own"] == "ok 3.0"
    assert r["read declared"] == "ok True"
    for label in ("read other", "get other", "write other", "assign field"):
        assert r[label].startswith("StateAccessError"), label
    assert "add it to 'reads' or 'writes' (as 'metrics.train_loss'" in r["read other"]
    assert "add it to 'writes' (as 'metrics.val_loss'" in r["write other"]
    assert r["keys"] == "ok ['mine', 'val_loss']"
    assert learner.state.metrics["mine"] == 3.0


class Missing(Callback):
    reads = frozenset({"metrics"})
    error: StateKeyError | None = None

    def __init__(self, key: str) -> None:
        self.key = key

    def after_epoch(self, state: StateView) -> None:
        assert self.key not in state.metrics
        assert state.metrics.get(self.key) is None
        try:
            state.metrics[self.key]
        except KeyError as exc:  # a StateKeyError is a KeyError too
            type(self).error = exc if isinstance(exc, StateKeyError) else None


async def test_a_key_nobody_writes_is_a_clear_state_access_error() -> None:
    Missing.error = None
    await make_learner(callbacks=[Missing("val_nope")]).fit(1)
    error = Missing.error
    assert error is not None
    assert isinstance(error, StateAccessError)
    assert error.field == "metrics['val_nope']"
    assert error.callback == "Missing"
    assert error.hook == "after_epoch"
    assert "no callback declares writing it (writes={'metrics.val_nope'})" in str(error)


async def test_a_missing_key_names_the_callbacks_that_write_it() -> None:
    # Metrics writes val_accuracy after validation: there is none without validation data.
    Missing.error = None
    learner = make_learner(
        callbacks=[Metrics(["accuracy"]), Missing("val_accuracy")], with_validation=False
    )
    await learner.fit(1)
    assert "callbacks that declare writing it: 'Metrics' (hooks: after_fit" in str(Missing.error)
    # A key the default stages set says so.
    Missing.error = None
    await make_learner(callbacks=[Missing("val_loss")], with_validation=False).fit(1)
    assert "the Validate stage sets it" in str(Missing.error)


async def test_a_key_of_a_field_that_is_not_a_dict_is_refused() -> None:
    class Keys(Callback):
        writes = frozenset({"loss.x"})

        def after_gradient(self, state: StateView) -> None:
            state.loss["x"] = 1

    learner = make_learner(callbacks=[Keys()])
    with pytest.RaisesGroup(pytest.RaisesExc(StateAccessError, match="it is not a dict")):
        await learner.fit(1)


# -- the shipped callbacks and the README --------------------------------------------------


def test_metrics_and_ema_declare_their_keys() -> None:
    metrics = Metrics(["accuracy"], log_every_n_steps=2)
    assert metrics.writes == {
        "metrics.train_accuracy",
        "metrics.train_accuracy_step",
        "metrics.val_accuracy",
        "validation.accuracy",
    }
    ema = EMA(0.9, metrics=["accuracy"])
    assert ema.writes == {
        "metrics.val_ema_loss",
        "metrics.val_ema_accuracy",
        "validation.ema_loss",
        "validation.ema_accuracy",
    }
    assert EMA.after == ()


async def test_metrics_ema_and_early_stopping_need_no_order() -> None:
    ema = EMA(0.9, metrics=["accuracy"])
    stop = EarlyStopping("val_ema_accuracy", mode="max", patience=5)
    learner = make_learner(callbacks=[stop, Metrics(["accuracy"]), ema], stages=ema.stages())
    # The two writers side by side; early stopping, a reader of the whole field, after them.
    assert layers(learner) == [["Metrics", "EMA"], ["EarlyStopping"]]
    await learner.fit(2)
    assert {"val_accuracy", "val_ema_accuracy", "val_ema_loss"} <= learner.state.metrics.keys()


def readme_callback() -> type[Callback]:
    """The README quick start's BestValidationLoss class, taken from the README itself."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    code = code.replace("anyio.run(main)", "")
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(code, "README.md (quick start)", "exec"), namespace)
    cls: type[Callback] = namespace["BestValidationLoss"]
    return cls


async def test_the_readme_callback_with_the_shipped_metrics_needs_no_after() -> None:
    best = readme_callback()
    assert best.after == ()
    learner = make_learner(callbacks=[best(), Metrics(["accuracy", "loss"])])
    # BestValidationLoss reads 'validation' (its whole), to which Metrics adds keys: after it.
    assert layers(learner) == [["Metrics"], ["BestValidationLoss"]]
    await learner.fit(3)
    metrics = learner.state.metrics
    assert metrics["best_val_loss"] <= metrics["val_loss"]
    assert "val_accuracy" in metrics


# -- keys of validation results in learner.test() and with named validation sets ------------------


def test_declared_key_maps_a_pass_s_keys_to_their_single_set_names() -> None:
    from aiolearner._state import declared_key

    assert declared_key("metrics", "val_acc", "fit", []) == "val_acc"
    assert declared_key("metrics", "test_acc", "test", []) == "val_acc"
    assert declared_key("metrics", "test_acc", "fit", []) == "test_acc"  # not a test pass
    assert declared_key("metrics", "val_clean_acc", "fit", ["clean", "noisy"]) == "val_acc"
    assert declared_key("metrics", "test_noisy_acc", "test", ["clean", "noisy"]) == "val_acc"
    assert declared_key("metrics", "train_loss", "fit", ["clean"]) == "train_loss"
    assert declared_key("validation", "clean_acc", "fit", ["clean"]) == "acc"
    assert declared_key("validation", "acc", "fit", []) == "acc"


class BestAccuracy(Callback):
    """Writes one key of its own from a validation metric, declared as for one set."""

    reads = frozenset({"metrics.val_accuracy"})
    writes = frozenset({"metrics.val_best_accuracy"})

    def after_validate(self, state: StateView) -> None:
        for key in [k for k in state.metrics if k.endswith("accuracy") and "best" not in k]:
            best = key.replace("accuracy", "best_accuracy")
            state.metrics[best] = max(state.metrics.get(best, 0.0), state.metrics[key])


async def test_per_key_declarations_cover_named_sets_and_test_keys() -> None:
    from aiolearner.testing import make_batches

    sets = {"clean": make_batches(2, seed=3), "noisy": make_batches(2, seed=4)}
    learner = make_learner(val_data=sets, callbacks=[Metrics(["accuracy"]), BestAccuracy()])
    await learner.fit(1)
    metrics = learner.state.metrics
    for name in sets:
        assert metrics[f"val_{name}_best_accuracy"] == metrics[f"val_{name}_accuracy"]
    results = await learner.test(make_batches(2, seed=5))
    assert "test_accuracy" in results
    assert learner.state.metrics["test_best_accuracy"] == results["test_accuracy"]
