from __future__ import annotations

from aiolearner.testing import DEFAULT_HOOKS, RecordingCallback, make_learner


async def test_one_epoch_runs_every_default_hook_in_order() -> None:
    rec = RecordingCallback()
    learner = make_learner(callbacks=[rec], n_batches=1)
    await learner.fit(1)
    expected = [
        "before_fit_run",
        "before_epoch",
        "before_fit",
        "before_fit_batch",
        "before_gradient",
        "after_gradient",
        "before_update",
        "after_update",
        "after_fit_batch",
        "after_fit",
        "before_validate",
        *[
            "before_validate_batch",
            "before_validate_loss",
            "after_validate_loss",
            "after_validate_batch",
        ]
        * 2,
        "after_validate",
        "after_epoch",
        "after_fit_run",
    ]
    assert rec.calls == expected
    assert set(rec.calls) == set(DEFAULT_HOOKS)
    assert learner.state.epoch == 1
    assert learner.state.step == 1
