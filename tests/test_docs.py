"""The documentation holds together: links resolve, the README's commands and code are real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

# [text](target) -- not images' alt text handling or reference links, which the docs do not use.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    # Code blocks and inline code are not links.
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        out.append(target.split("#", 1)[0])
    return out


def test_there_are_pages() -> None:
    names = {p.name for p in PAGES}
    assert {"README.md", "index.md", "concepts.md", "design.md", "errors.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page: Path) -> None:
    broken = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_every_docs_page_is_in_the_index() -> None:
    index = set(relative_links(ROOT / "docs" / "index.md"))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert not pages - index, f"docs/index.md does not list {sorted(pages - index)}"


def test_readme_names_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    demo = (
        "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[demo]'"
        " && .venv/bin/python examples/digits.py"
    )
    assert demo in readme
    assert "bash scripts/test.sh" in readme
    assert (ROOT / "examples" / "digits.py").is_file()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text(encoding="utf-8").split()


def test_readme_quick_start_runs(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    exec(compile(code, "README.md (quick start)", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "BestValidationLoss: reads ['epoch', 'validation'], writes ['metrics']" in out
    assert "epoch 5: val loss" in out  # the fifth epoch, numbered from 1
    assert "epoch 0:" not in out
    assert "'best_val_loss'" in out
