"""Every ```python block of the documentation site runs.

How the blocks of a page run:

* In order, in one namespace per page, like the cells of a notebook: a block may use what an
  earlier block of the same page defined (a class, a learner), so fragments build on each other.
* Top-level ``await`` is allowed (as in a notebook cell or ``python -m asyncio``): such a block
  runs as one ``anyio.run`` of its own. Each page runs under asyncio and under trio.
* In a fresh temporary working directory, so files a block writes (checkpoints, logs) go there.

A block that cannot run here is marked, on the line right before its opening fence, with an HTML
comment (invisible on the site and on a repository browser) that says why:

    <!-- not-run: needs torchrun (several processes) -->
    ```python
    ...

Keep such blocks rare: every marker's reason is printed by ``test_not_run_blocks_say_why``, and
a marker without a reason fails it. Blocks in other languages (``bash``, output, pseudo-code in
plain fences) are not Python and are not run.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

NOT_RUN = re.compile(r"^<!--\s*not-run:(.*?)-->\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)(.*)$")


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason, when marked


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2)
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        marker = NOT_RUN.match(lines[start - 1].strip()) if start > 0 else None
        out.append(
            Block(
                page=page.name,
                line=start + 1,
                lang=lang,
                code="\n".join(body) + "\n",
                not_run=marker.group(1).strip() if marker else None,
            )
        )
    return out


def pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if any(b.lang == "python" for b in blocks(p)))


def run_block(block: Block, namespace: dict[str, Any], backend: str) -> None:
    # Blank lines above keep the line numbers of tracebacks those of the page.
    source = "\n" * block.line + block.code
    code = compile(source, str(DOCS / block.page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # exec, but hands back the coroutine of a top-level await
    if inspect.iscoroutine(result):

        async def cell() -> None:
            await result

        anyio.run(cell, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_page_code_runs(
    page: Path, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": f"docs.{page.stem}"}
    for block in blocks(page):
        if block.lang != "python" or block.not_run is not None:
            continue
        try:
            run_block(block, namespace, backend)
        except BaseException as exc:
            exc.add_note(f"in the python block at {block.page}:{block.line}")
            raise


def test_not_run_blocks_say_why(capsys: pytest.CaptureFixture[str]) -> None:
    marked = [b for p in sorted(DOCS.glob("*.md")) for b in blocks(p) if b.not_run is not None]
    assert all(b.not_run for b in marked), "a not-run marker needs a reason"
    assert all(b.lang == "python" for b in marked), "not-run marks python blocks only"
    with capsys.disabled():
        for b in marked:
            print(f"\n  not run: {b.page}:{b.line}: {b.not_run}", end="")


def test_the_extractor_sees_the_blocks() -> None:
    page = DOCS / "quickstart.md"
    found = blocks(page)
    assert any(b.lang == "python" and "Learner" in b.code for b in found)
    assert all(b.code.endswith("\n") for b in found)
