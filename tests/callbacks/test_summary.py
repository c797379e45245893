"""model_summary: layers, output shapes, parameter counts; the model and the RNGs untouched."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from aiolearner import Callback, Learner, LearnerBusyError, StateView
from aiolearner.callbacks import LayerSummary, ModelSummary, model_summary
from aiolearner.testing import make_batches, make_learner


class TwoHeads(torch.nn.Module):
    """A shared block called twice, a frozen layer, batch norm, dropout, a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5)
        )
        self.block = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)
        self.aux = torch.nn.Linear(8, 1)
        self.aux.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h = self.block(self.block(self.stem(x)))
        return {"logits": self.head(h), "aux": (self.aux(h), h.mean())}


def by_name(summary: ModelSummary) -> dict[str, LayerSummary]:
    return {row.name: row for row in summary.rows}


def test_layers_shapes_and_counts() -> None:
    model = TwoHeads()
    summary = model_summary(model, torch.randn(5, 4))
    rows = by_name(summary)
    assert [r.name for r in summary.rows] == [
        "",
        "stem",
        "stem.0",
        "stem.1",
        "stem.2",
        "block",
        "head",
        "aux",
    ]
    assert [r.depth for r in summary.rows] == [0, 1, 2, 2, 2, 1, 1, 1]
    assert rows[""].type == "TwoHeads"
    assert rows["stem.1"].type == "BatchNorm1d"
    assert rows["stem"].output_shape == (5, 8)
    assert rows["head"].output_shape == (5, 3)
    assert rows[""].output_shape == {"logits": (5, 3), "aux": [(5, 1), ()]}
    assert (rows["block"].calls, rows["head"].calls) == (2, 1)
    assert rows["stem"].params == 4 * 8 + 8 + 2 * 8
    assert (rows["aux"].params, rows["aux"].trainable) == (9, 0)
    total = sum(p.numel() for p in model.parameters())
    assert (summary.total_params, summary.frozen_params) == (total, 9)
    assert summary.trainable_params == total - 9
    assert summary.param_bytes == total * 4
    assert summary.buffer_count == 8 + 8 + 1  # running mean, var, batches tracked
    assert summary.input_shape == (5, 4)
    text = str(summary)
    assert text.splitlines()[0].split() == [
        "Layer",
        "(type)",
        "Output",
        "shape",
        "Params",
        "Trainable",
    ]
    assert re.search(r"\n  block \(Linear\) x2 +\[5, 8\] +72 +72\n", text), text
    assert "{logits: [5, 3], aux: ([5, 1], [])}" in text
    assert f"Params: {total:,} ({total - 9:,} trainable, 9 frozen)" in text


def test_the_model_and_the_random_state_are_left_as_they_were() -> None:
    model = TwoHeads()
    model.train()
    model.stem[2].eval()  # a mix of modes must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    inputs = torch.randn(5, 4)
    rng = torch.get_rng_state()
    model_summary(model, inputs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # batch-norm statistics included
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_from_a_learner_with_a_training_batch() -> None:
    learner = make_learner()
    inputs, targets = make_batches(1, batch_size=7)[0]
    summary = model_summary(learner, (inputs, targets), max_depth=0)
    assert [(r.name, r.output_shape) for r in summary.rows] == [("", (7, 3))]
    assert summary.total_params == 67
    no_batch = model_summary(learner)
    assert no_batch.input_shape is None
    assert all(r.output_shape is None and r.calls == 0 for r in no_batch.rows)
    assert "Output shape" not in str(no_batch)


def test_a_compiled_model_is_summarized_through_the_module_it_wraps() -> None:
    model = TwoHeads()
    wrapped = torch.compile(model, backend="eager")
    summary = model_summary(wrapped, torch.randn(3, 4))  # type: ignore[arg-type]
    assert summary.rows[0].type == "TwoHeads"
    assert by_name(summary)["head"].output_shape == (3, 3)


class SummaryWhileTraining(Callback):
    def __init__(self) -> None:
        self.learner: Learner[Any] | None = None
        self.errors: list[BaseException] = []
        self.without_batch: ModelSummary | None = None

    def after_fit(self, state: StateView) -> None:
        assert self.learner is not None
        with pytest.raises(LearnerBusyError, match="learner is fitting") as info:
            model_summary(self.learner, make_batches(1)[0])
        self.errors.append(info.value)
        self.without_batch = model_summary(self.learner)  # counting needs no forward pass


async def test_no_forward_pass_while_the_learner_trains() -> None:
    cb = SummaryWhileTraining()
    learner = make_learner(callbacks=[cb])
    cb.learner = learner
    await learner.fit(1)
    assert len(cb.errors) == 1
    assert cb.without_batch is not None
    assert cb.without_batch.total_params == 67


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        model_summary(TwoHeads(), max_depth=-1)
    with pytest.raises(TypeError, match=r"Learner or a torch\.nn\.Module, got str"):
        model_summary("model")  # type: ignore[arg-type]
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] belong to lazy modules"):
        model_summary(lazy, torch.randn(2, 4))
    with pytest.raises(TypeError, match="expects each batch as"):
        model_summary(TwoHeads(), (torch.randn(2, 4),) * 3)
