"""examples/trials: cancelling some trials never disturbs the others."""

from __future__ import annotations

from pathlib import Path

import torch

from aiolearner import Callback, Learner, RunState, StateView, StopFit
from examples.trials.search import Batch, TrialConfig, make_data, make_learner, successive_halving

CONFIGS = [TrialConfig(lr=lr, seed=i) for i, lr in enumerate([0.02, 0.1, 0.3, 0.6])]


class StopAtStep(Callback):
    reads = frozenset({"step"})

    def __init__(self, step: int) -> None:
        self.step = step

    def after_fit_batch(self, state: StateView) -> None:
        if state.step >= self.step:
            raise StopFit(f"step {self.step}")


async def alone(
    config: TrialConfig, epochs: int, *, until_step: int | None = None
) -> Learner[Batch]:
    """The same trial trained by itself (up to ``until_step`` steps when given)."""
    learner = make_learner(config, *make_data())
    if until_step is not None:
        train, val = make_data()
        learner = Learner(
            learner.model,
            learner.optimizer,
            torch.nn.functional.cross_entropy,
            train,
            val,
            callbacks=[StopAtStep(until_step)],
        )
    await learner.fit(epochs)
    return learner


def same_weights(a: Learner[Batch], b: Learner[Batch]) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


async def test_halving_cancels_the_worst_and_leaves_the_rest_undisturbed(tmp_path: Path) -> None:
    result = await successive_halving(CONFIGS, max_epochs=4, eta=2, directory=tmp_path)
    states = [t.handle.state for t in result.trials]
    assert states.count(RunState.COMPLETED) == 1
    assert states.count(RunState.CANCELLED) == 3
    assert sorted(t.pruned_at for t in result.trials if t.pruned_at) == [1, 1, 2]
    # At each rung the pruned trials scored worse than every trial kept.
    for rung in (1, 2):
        kept = [t.scores[rung] for t in result.trials if t.pruned_at is None or t.pruned_at > rung]
        pruned = [t.scores[rung] for t in result.trials if t.pruned_at == rung]
        assert max(kept) < min(pruned)

    for trial in result.trials:
        if trial.handle.state is RunState.COMPLETED:
            reference = await alone(trial.config, 4)
        else:
            # Cancelled wherever it was: its weights are those after its last committed step.
            assert trial.learner.state.epoch >= trial.pruned_at  # type: ignore[operator]
            reference = await alone(trial.config, 4, until_step=trial.learner.state.step)
            assert reference.state.step == trial.learner.state.step
        assert same_weights(trial.learner, reference), trial.config

    best = result.best
    assert best.handle.state is RunState.COMPLETED
    restored = make_learner(best.config, *make_data())
    restored.load_checkpoint(result.checkpoint)
    assert restored.state.epoch == 4
    assert same_weights(restored, best.learner)
