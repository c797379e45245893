"""A griffe extension for the API reference (mkdocs.yml); not a page.

The docstrings follow the Google style, whose guide titles the example section ``Example:``;
griffe knows it only as ``Examples:`` and would render the ``>>>`` lines as Markdown prose.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)


class ExampleSections(griffe.Extension):
    """Read an ``Example:`` section as ``Examples:`` (rendered as code)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
