"""Shared test helpers for cancelling a run at a chosen hook and step."""

from __future__ import annotations

from typing import Any

import anyio

from aiolearner import Callback, StateView


class Hang(Callback):
    """At ``hook`` of step ``at_step`` (first time only): signals, then waits to be cancelled."""

    reads = frozenset({"step"})

    def __init__(self, hook: str, at_step: int) -> None:
        self.hook = hook
        self.at_step = at_step
        self.reached = anyio.Event()

    def hooks(self) -> Any:
        yield self.hook, self._hang

    async def _hang(self, state: StateView) -> None:
        if state.step == self.at_step and not self.reached.is_set():
            self.reached.set()
            await anyio.sleep_forever()
