from __future__ import annotations

import inspect

import aiolearner.callbacks


def test_exports_exist_and_report_the_public_module() -> None:
    for name in aiolearner.callbacks.__all__:
        obj = getattr(aiolearner.callbacks, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "aiolearner.callbacks", name


def test_core_practices_are_exported() -> None:
    expected = {
        "AccumulateGradients",
        "EMA",
        "EarlyStopping",
        "GradientClipping",
        "LRSchedule",
        "Metrics",
        "MixedPrecision",
        "NonFiniteGuard",
        "OneCycle",
        "TimeLimit",
        "WarmupCosine",
        "accuracy",
    }
    assert expected <= set(aiolearner.callbacks.__all__)
