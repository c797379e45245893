"""``print(learner.compute_policy)`` says what the policy is and what it decided."""

from __future__ import annotations

import re

import pytest

from aiolearner.testing import make_learner


def test_repr_of_a_fresh_policy() -> None:
    learner = make_learner(compute="auto")
    assert repr(learner.compute_policy) == (
        "ComputePolicy(mode='auto', decision='inline', batch_time=unmeasured,"
        " max_blocking=2 ms, hops=0)"
    )
    assert str(learner.compute_policy) == repr(learner.compute_policy)


async def test_repr_after_training_shows_the_measurements() -> None:
    learner = make_learner(compute="thread", max_blocking=0.005)
    await learner.fit(1)
    policy = learner.compute_policy
    assert policy.hops > 0
    text = repr(policy)
    match = re.fullmatch(
        r"ComputePolicy\(mode='thread', decision='thread', batch_time=([0-9.e+-]+) ms,"
        r" max_blocking=5 ms, hops=(\d+)\)",
        text,
    )
    assert match is not None, text
    assert policy.typical_seconds is not None
    assert float(match[1]) == pytest.approx(policy.typical_seconds * 1e3, rel=1e-2)
    assert int(match[2]) == policy.hops
