"""The documentation holds together: links resolve, the README's commands and code are real."""

from __future__ import annotations

import importlib
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


# -- the documentation site (mkdocs.yml; `mkdocs build --strict` runs in scripts/test.sh) -------


def nav_pages() -> list[str]:
    """The pages named in mkdocs.yml's nav, in order."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]  # up to the next top-level key
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M)


def test_every_docs_page_is_in_the_site_nav() -> None:
    nav = nav_pages()
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    missing = [p for p in pages if p not in nav]
    assert not missing, f"add these pages to the nav in mkdocs.yml: {missing}"
    assert not [p for p in nav if not (ROOT / "docs" / p).is_file()], "nav names a missing page"
    assert len(nav) == len(set(nav)), "a page appears twice in the nav"


def test_the_site_builds_offline() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s+font: false\s*$", config, flags=re.M), "no web fonts at build time"
    assert "social" not in config, "the social plugin downloads fonts and images"
    assert re.search(r"^strict: true\s*$", config, flags=re.M)
    script = (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    assert "mkdocs build --strict" in script


REFERENCE_PAGES = {
    "aiolearner": "reference.md",
    "aiolearner.callbacks": "reference-callbacks.md",
    "aiolearner.testing": "reference-testing.md",
}


@pytest.mark.parametrize("module", sorted(REFERENCE_PAGES))
def test_the_api_reference_names_every_public_name(module: str) -> None:
    exported = set(importlib.import_module(module).__all__)
    page = ROOT / "docs" / REFERENCE_PAGES[module]
    text = page.read_text(encoding="utf-8")
    documented = set(re.findall(rf"^::: {re.escape(module)}\.(\w+)\s*$", text, flags=re.M))
    missing = sorted(exported - documented)
    assert not missing, f"{page.name} lacks `::: {module}.NAME` for {missing}"
    extra = sorted(documented - exported)
    assert not extra, f"{page.name} documents names {module} does not export: {extra}"
    assert REFERENCE_PAGES[module] in nav_pages()


def test_links_out_of_docs_become_repository_links_or_text() -> None:
    hooks = importlib.import_module("docs._hooks")
    page = type("Page", (), {"file": type("File", (), {"src_uri": "concepts.md"})()})()
    text = "See [the demo](../examples/digits.py), [concepts](concepts.md).\n```\n[x](../a)\n```\n"
    plain = hooks.on_page_markdown(text, page, {"repo_url": None}, None)
    assert plain.startswith("See the demo, [concepts](concepts.md).")
    assert "[x](../a)" in plain  # code stays as it is
    linked = hooks.on_page_markdown(text, page, {"repo_url": "https://example.org/r/"}, None)
    assert "[the demo](https://example.org/r/blob/main/examples/digits.py)" in linked
