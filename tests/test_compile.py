"""``torch.compile``: a compiled model trains through a learner, and its weights load either way.

The tests compile with ``backend="eager"`` (TorchDynamo captures the graph and runs it as is):
no compiler toolchain, seconds not minutes, and the numbers equal the uncompiled model's to the
bit, so compiled and plain runs can be compared exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aiolearner import Learner, match_state_dict, plain_state_dict, unwrap_model
from aiolearner.callbacks import Checkpoint, load_checkpoint_file, load_weights
from aiolearner.testing import make_batches, tiny_model


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch (no recompile limit reached across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    out: torch.nn.Module = torch.compile(model, backend="eager")  # type: ignore[assignment]
    return out


def build(*, compile_model: bool, **options: Any) -> Learner[Any]:
    model = tiny_model()
    learner: Learner[Any] = Learner(
        compiled(model) if compile_model else model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        torch.nn.functional.cross_entropy,
        make_batches(4, seed=1),
        make_batches(2, seed=2),
        **options,
    )
    return learner


def plain_weights(learner: Learner[Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap_model(learner.model).state_dict().items()}


def assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("compute", ["inline", "thread"])
async def test_a_compiled_model_trains_like_the_plain_one(compute: str) -> None:
    plain = build(compile_model=False, compute=compute)
    await plain.fit(2)
    fast = build(compile_model=True, compute=compute)
    assert unwrap_model(fast.model) is not fast.model  # really the compiled wrapper
    await fast.fit(2)
    assert_weights_equal(plain_weights(fast), plain_weights(plain))
    assert fast.state.metrics["val_loss"] == plain.state.metrics["val_loss"]
    predictions = await fast.predict(make_batches(1, seed=3))
    assert torch.equal(predictions, await plain.predict(make_batches(1, seed=3)))


async def test_checkpoints_load_into_compiled_and_plain_models(tmp_path: Path) -> None:
    fast = build(compile_model=True, callbacks=[Checkpoint(tmp_path / "fast")])
    await fast.fit(1)
    slow = build(compile_model=False, callbacks=[Checkpoint(tmp_path / "slow")])
    await slow.fit(1)
    from_compiled = tmp_path / "fast" / "last.pt"
    from_plain = tmp_path / "slow" / "last.pt"
    expected = plain_weights(fast)
    for source in (from_compiled, from_plain):
        for target in (tiny_model(seed=7), compiled(tiny_model(seed=7))):
            result = load_weights(target, source)
            assert (result.missing_keys, result.unexpected_keys) == ([], [])
            assert_weights_equal(plain_weights_of(target), expected)
            keyed = load_checkpoint_file(source, model=target)["model"]
            assert sorted(keyed) == sorted(target.state_dict())


def plain_weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(unwrap_model(model).state_dict())


async def test_weights_only_export_of_a_compiled_model_has_plain_keys(tmp_path: Path) -> None:
    fast = build(
        compile_model=True,
        callbacks=[Checkpoint(tmp_path, save_weights_only=True, format="safetensors")],
    )
    await fast.fit(1)
    weights = load_checkpoint_file(tmp_path / "last.safetensors")
    model = tiny_model(seed=9)
    model.load_state_dict(weights)  # plain torch, no key juggling
    assert_weights_equal(dict(model.state_dict()), plain_weights(fast))


async def test_fit_resumes_across_compiled_and_plain_models(tmp_path: Path) -> None:
    first = build(compile_model=True, callbacks=[Checkpoint(tmp_path)])
    await first.fit(1)
    plain = build(compile_model=False, callbacks=[Checkpoint(tmp_path)])
    await plain.fit(2, resume="last")
    again = build(compile_model=True, callbacks=[Checkpoint(tmp_path / "again")])
    await again.fit(3, resume=tmp_path / "last.pt")
    reference = build(compile_model=False)
    await reference.fit(3)
    assert_weights_equal(plain_weights(again), plain_weights(reference))


def test_match_state_dict_adds_and_drops_the_compiled_segment() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.append(compiled(torch.nn.Linear(2, 1)))  # a compiled submodule: "1._orig_mod.weight"
    plain = {"0.weight": 1, "0.bias": 2, "1.weight": 3, "1.bias": 4}
    assert match_state_dict(model, plain) == {
        "0.weight": 1,
        "0.bias": 2,
        "1._orig_mod.weight": 3,
        "1._orig_mod.bias": 4,
    }
    wrapped = compiled(model)
    assert sorted(match_state_dict(wrapped, plain)) == [
        "_orig_mod.0.bias",
        "_orig_mod.0.weight",
        "_orig_mod.1._orig_mod.bias",
        "_orig_mod.1._orig_mod.weight",
    ]
    assert plain_state_dict(match_state_dict(wrapped, plain)) == plain
    # Keys that match nothing stay as they are, so load_state_dict names them.
    assert match_state_dict(model, {"nope": 0}) == {"nope": 0}
    with pytest.raises(ValueError, match="two keys for 'w'"):
        plain_state_dict({"w": 0, "_orig_mod.w": 1})
    assert unwrap_model(wrapped) is model
    assert unwrap_model(model) is model
