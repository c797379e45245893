from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch

from aiolearner import Callback, StateView
from aiolearner.callbacks import Metrics, accuracy
from aiolearner.testing import make_batches, make_learner


def _reference(learner: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model = learner.model
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def test_accuracy_of_class_scores_and_binary_logits() -> None:
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0]])
    assert accuracy(scores, torch.tensor([0, 2, 1])).item() == pytest.approx(2 / 3)
    logits = torch.tensor([1.0, -1.0, 2.0, -3.0])
    assert accuracy(logits, torch.tensor([1.0, 1.0, 1.0, 0.0])).item() == 0.75
    assert accuracy(logits[:, None], torch.tensor([0, 1, 1, 1])).item() == 0.25
    with pytest.raises(ValueError, match="cannot compare"):
        accuracy(torch.zeros(4, 3, 2, 1), torch.zeros(4))


async def test_validation_accuracy_matches_a_direct_computation() -> None:
    val = make_batches(3, batch_size=7, seed=5)
    metrics = Metrics(["accuracy", "loss"])
    learner = make_learner(callbacks=[metrics], val_data=val, n_batches=3)
    await learner.fit(2)
    expected = _reference(learner, val)
    assert learner.state.validation["accuracy"] == pytest.approx(expected)
    assert learner.state.metrics["val_accuracy"] == pytest.approx(expected)
    # The sample-weighted loss equals the Validate stage's own.
    assert learner.state.metrics["val_loss"] == pytest.approx(learner.state.validation["loss"])
    assert 0.0 <= learner.state.metrics["train_accuracy"] <= 1.0


class Spy(Callback):
    """Records the outputs of the training batches (before the update changes the model)."""

    reads = frozenset({"output", "batch"})

    def __init__(self) -> None:
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []

    def after_gradient(self, state: StateView) -> None:
        self.rows.append((state.output.detach().clone(), state.batch[1].clone()))


async def test_training_metrics_per_epoch_and_per_step_window() -> None:
    spy = Spy()
    metrics = Metrics({"acc": "accuracy", "loss": "loss"}, log_every_n_steps=2, validate=False)
    batches = make_batches(4, batch_size=5, seed=3)
    learner = make_learner(callbacks=[metrics, spy], train_data=batches, with_validation=False)
    await learner.fit(1)
    outs = spy.rows
    whole = sum(float(accuracy(o, y)) * len(y) for o, y in outs) / sum(len(y) for _, y in outs)
    window = sum(float(accuracy(o, y)) for o, y in outs[2:]) / 2  # last window: batches 3, 4
    assert learner.state.metrics["train_acc"] == pytest.approx(whole)
    assert learner.state.metrics["train_acc_step"] == pytest.approx(window)
    loss = sum(float(torch.nn.functional.cross_entropy(o, y)) for o, y in outs) / len(outs)
    assert learner.state.metrics["train_loss"] == pytest.approx(loss)
    last = sum(float(torch.nn.functional.cross_entropy(o, y)) for o, y in outs[2:]) / 2
    assert learner.state.metrics["train_loss_step"] == pytest.approx(last)
    assert "val_acc" not in learner.state.metrics


async def test_function_and_torchmetrics_metrics() -> None:
    torchmetrics = pytest.importorskip("torchmetrics")
    val = make_batches(2, batch_size=6, seed=9)

    def top2(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        top = output.topk(2, dim=1).indices
        return (top == targets[:, None]).any(dim=1).float().mean()

    metrics = Metrics(
        {
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=3, validate_args=False),
            "plain": "accuracy",
            "top2": top2,
        }
    )
    learner = make_learner(callbacks=[metrics], val_data=val, n_batches=2)
    await learner.fit(1)
    v = learner.state.validation
    assert v["acc"] == pytest.approx(v["plain"])
    assert v["acc"] == pytest.approx(_reference(learner, val))
    assert v["plain"] <= v["top2"] <= 1.0
    assert learner.state.metrics["train_acc"] == pytest.approx(learner.state.metrics["train_plain"])


async def test_no_host_sync_per_batch() -> None:
    # A metric function that records whether its result ever left the device lazily: the
    # callback must only combine tensors per batch; float() happens once, at the end.
    conversions = 0

    class Counting(torch.Tensor):
        def __float__(self) -> float:
            nonlocal conversions
            conversions += 1
            return super().__float__()

    def metric(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return accuracy(output, targets).as_subclass(Counting)

    learner = make_learner(
        callbacks=[Metrics({"m": metric}, validate=False)], n_batches=4, with_validation=False
    )
    await learner.fit(1)
    assert conversions == 1  # the epoch reduction; none per batch
    assert "train_m" in learner.state.metrics


async def test_resuming_mid_epoch_keeps_the_accumulators() -> None:
    metrics = Metrics(["accuracy"], validate=False)
    learner = make_learner(callbacks=[metrics], n_batches=4, with_validation=False)
    await learner.fit(1)
    expected = learner.state.metrics["train_accuracy"]

    class StopAfterTwo(Callback):
        reads = frozenset({"step"})

        def after_fit_batch(self, state: StateView) -> None:
            if state.step == 2:
                from aiolearner import StopFit

                raise StopFit("pause")

    first = Metrics(["accuracy"], validate=False)
    learner = make_learner(callbacks=[first, StopAfterTwo()], n_batches=4, with_validation=False)
    await learner.fit(1)
    assert learner.state.step == 2
    checkpoint = learner.state_dict()
    second = Metrics(["accuracy"], validate=False)
    fresh = make_learner(callbacks=[second], n_batches=4, with_validation=False)
    fresh.load_state_dict(checkpoint)
    await fresh.fit(1)
    assert fresh.state.metrics["train_accuracy"] == pytest.approx(expected)


def test_bad_metrics_are_rejected() -> None:
    with pytest.raises(TypeError, match="unknown built-in"):
        Metrics(["f1"])
    with pytest.raises(TypeError, match="expected 'loss'"):
        Metrics({"x": 3})
    with pytest.raises(ValueError, match="at least one"):
        Metrics([])
    with pytest.raises(ValueError, match="log_every_n_steps"):
        Metrics(log_every_n_steps=0)
    # A metric named 'loss' that is not the loss would replace train_loss and val_loss.
    with pytest.raises(ValueError, match=r"named 'loss' .* train_loss, val_loss"):
        Metrics({"loss": lambda output, targets: (output - 1).abs().mean()})
    with pytest.raises(ValueError, match="named 'loss'"):
        Metrics({"loss": "accuracy"})
    Metrics({"loss": "loss"})  # the size-weighted loss itself
    Metrics({"loss": lambda output, targets: (output - 1).abs().mean()}, prefix="ema_")


def test_torchmetrics_stays_optional() -> None:
    code = "import sys, aiolearner.callbacks; sys.exit('torchmetrics' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


async def test_skipped_batches_are_left_out() -> None:
    from aiolearner import SkipBatch

    class SkipSecond(Callback):
        reads = frozenset({"batch_index"})

        def after_gradient(self, state: StateView) -> None:
            if state.batch_index == 1:
                raise SkipBatch("test")

    spy = Spy()
    metrics = Metrics(["accuracy"], validate=False)
    learner = make_learner(
        callbacks=[spy, SkipSecond(), metrics], n_batches=3, with_validation=False, seed=1
    )
    await learner.fit(1)
    kept = [spy.rows[0], spy.rows[2]]
    everything = sum(float(accuracy(o, y)) for o, y in spy.rows) / 3
    assert everything != pytest.approx(sum(float(accuracy(o, y)) for o, y in kept) / 2)
    expected = sum(float(accuracy(o, y)) * len(y) for o, y in kept) / sum(len(y) for _, y in kept)
    assert learner.state.metrics["train_accuracy"] == pytest.approx(expected)


async def test_concurrent_validation_gives_the_same_metrics() -> None:
    results = []
    for validate in ("sequential", "concurrent"):
        learner = make_learner(
            callbacks=[Metrics(["accuracy", "loss"])], n_batches=3, validate=validate
        )
        await learner.fit(2)
        results.append(dict(learner.state.metrics))
    assert results[0] == results[1]
    assert "val_accuracy" in results[0]
