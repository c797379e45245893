"""The first example of docs/writing-callbacks.md runs and does what the page says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aiolearner.testing import make_learner

PAGE = Path(__file__).resolve().parents[2] / "docs" / "writing-callbacks.md"


def _first_example() -> dict[str, Any]:
    code = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)[0]
    namespace: dict[str, Any] = {"__name__": "writing_callbacks_doc"}
    exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace


async def test_grad_norm_example_reports_one_value_per_epoch() -> None:
    grad_norm = _first_example()["GradNorm"]()
    learner = make_learner(callbacks=[grad_norm], n_batches=3)
    await learner.fit(2)
    assert learner.state.metrics["train_grad_norm"] > 0
    assert grad_norm.norms == []  # reduced and cleared at the end of each pass
