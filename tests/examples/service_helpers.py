"""Shared by the service tests: an in-process app, a real uvicorn server, SSE parsing.

(No ``__init__.py`` here: this folder would then shadow the top-level ``examples`` package.)
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from aiolearner import FitHandle, RunState
from examples.service.app import TrainingService, create_app

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """``(event name, decoded data)`` for each message of a text/event-stream body."""
    out = []
    for message in text.split("\n\n"):
        kind, data = "message", ""
        for line in message.splitlines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                data += line[len("data: ") :]
        if data:
            out.append((kind, json.loads(data)))
    return out


@asynccontextmanager
async def asgi_client(
    checkpoint_dir: Path, **options: Any
) -> AsyncIterator[tuple[TrainingService, httpx.AsyncClient]]:
    """The app with its lifespan entered (ASGITransport does not run it) and a client."""
    app = create_app(token=TOKEN, checkpoint_dir=checkpoint_dir, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield app.state.service, client


async def wait_running(handle: FitHandle) -> None:
    """Until the handle's fit has started (it may be queued first)."""
    if handle.state is RunState.PENDING:
        async with handle.events(kinds={"run_start"}) as stream:
            async for _ in stream:
                break


async def wait_epochs(handle: FitHandle, n: int) -> None:
    """Until ``n`` more epochs of the handle's run have finished."""
    async with handle.events(kinds={"metrics"}) as stream:
        seen = 0
        async for _ in stream:
            seen += 1
            if seen >= n:
                break


@contextmanager
def live_server(checkpoint_dir: Path, **options: Any) -> Iterator[tuple[str, TrainingService]]:
    """The app under a real uvicorn server on 127.0.0.1 (a free port), in a thread."""
    app = create_app(token=TOKEN, checkpoint_dir=checkpoint_dir, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:  # a real server in another thread: poll its readiness
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", app.state.service
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("uvicorn did not stop within 30 s")
