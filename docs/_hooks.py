"""MkDocs hooks for the site (mkdocs.yml `hooks:`); not a page.

The pages are also read on a repository browser, where links to the repository's own files
(`../examples/digits.py`, `../bench/`) work; tests/test_docs.py checks that they resolve. The
site holds only docs/, so such a link becomes a link into the repository when mkdocs.yml sets
`repo_url`, and plain text otherwise (never a broken link).
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

# [text](../path) -- a relative link that climbs out of docs/.
OUTSIDE = re.compile(r"(?<!!)\[([^\]]*)\]\((\.\./[^)\s#]*)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    repo = (config.get("repo_url") or "").rstrip("/")
    page_dir = posixpath.dirname(page.file.src_uri)

    def replace(match: re.Match[str]) -> str:
        text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        path = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if path.startswith("docs/") or path.startswith(".."):
            return match.group(0)  # stays inside docs/ (mkdocs checks it), or leaves the repo
        if not repo:
            return text
        kind = "tree" if target.endswith("/") else "blob"
        return f"[{text}]({repo}/{kind}/main/{path}{anchor})"

    # Only prose: fenced code blocks (between fence lines) stay as they are.
    parts = re.split(r"(^```.*?^```[ \t]*$)", markdown, flags=re.M | re.S)
    return "".join(part if part.startswith("```") else OUTSIDE.sub(replace, part) for part in parts)
