"""docs/inspection.md runs: its code blocks, in order, in one namespace, with top-level await."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import torch

PAGE = Path(__file__).resolve().parent.parent / "docs" / "inspection.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


async def test_the_inspection_page_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write under runs/
    torch._dynamo.reset()
    namespace: dict[str, Any] = {"__name__": "inspection_md"}
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    for number, source in enumerate(blocks("python"), 1):
        code = compile(source, f"docs/inspection.md, python block {number}", "exec", flags=flags)
        result = eval(code, namespace)
        if inspect.iscoroutine(result):
            await result
    torch._dynamo.reset()
    out = capsys.readouterr().out
    # The summary shown on the page is the one the code prints.
    assert blocks("text")[0] in out
