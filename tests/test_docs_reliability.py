"""docs/reliability.md names the tests that prove each guarantee: every one it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reliability.md"


def test_every_test_the_page_names_exists() -> None:
    text = PAGE.read_text(encoding="utf-8")
    named = re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", text)
    # The bad-input table names the module once, in its header.
    named += [("tests/test_bad_input.py", name) for name in re.findall(r"`(test_\w+)`", text)]
    assert len(named) > 30
    missing = []
    for path, name in named:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        functions = {
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        if name not in functions:
            missing.append(f"{path}::{name}")
    assert missing == []


def test_the_soak_scripts_it_names_exist() -> None:
    text = PAGE.read_text(encoding="utf-8")
    for script in set(re.findall(r"bench/(\w+)\.py", text)):
        assert (ROOT / "bench" / f"{script}.py").is_file(), script
