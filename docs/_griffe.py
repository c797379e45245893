"""A griffe extension for the API reference (mkdocs.yml); not a page.

The docstrings follow the Google style, whose guide titles the example section ``Example:``;
griffe knows it only as ``Examples:`` and would render the ``>>>`` lines as Markdown prose. They
also use Sphinx roles (``:class:`~aiolearner.FitRun```), which Markdown would show as they are:
they become inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
ROLE = re.compile(
    r":(?:class|meth|func|attr|data|exc|mod|obj):`"
    r"(?:(?P<title>[^`<]+?)\s*<[\w.]+>|(?P<tilde>~?)(?P<target>[\w.]+)(?P<call>\(\))?)`"
)


def _role(match: re.Match[str]) -> str:
    if match.group("title"):  # :meth:`shown text <target>`
        return f"`{match.group('title')}`"
    target, call = match.group("target"), match.group("call") or ""
    name = target.rsplit(".", 1)[-1] if match.group("tilde") else target
    return f"`{name}{call}`"


class ExampleSections(griffe.Extension):
    """Read an ``Example:`` section as ``Examples:`` (rendered as code); roles as inline code."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = ROLE.sub(_role, text)
