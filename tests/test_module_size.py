"""Every module of the package stays small enough to read in one sitting.

A module that grows past the bound is split by concept (docs/design.md maps the modules), not
trimmed: the bound keeps the core a place a new maintainer can find their way in.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aiolearner"
MAX_LINES = 600


def test_every_module_is_under_600_lines() -> None:
    sizes = {
        str(path.relative_to(PACKAGE.parent)): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    assert len(sizes) > 30  # the package was found
    too_long = {name: n for name, n in sizes.items() if n >= MAX_LINES}
    assert too_long == {}, f"modules of {MAX_LINES} lines or more: {too_long}"
