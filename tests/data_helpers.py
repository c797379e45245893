"""Data of kinds the tests share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class Sized:
    """Batches in a sized, re-iterable container that is not a list or a tuple: the general
    route of a fetch (timed by ``fetch="auto"``, its draws counted), where a list's is short."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)
