"""The service's event stream (sse-starlette): every event has an id, quiet streams get pings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import AUTH, asgi_client, live_server

from examples.service.app import TrainingService

SMALL = {"dataset": "synthetic", "hidden": 8, "batch_size": 256}


def messages(text: str) -> list[dict[str, Any]]:
    """Each message of a text/event-stream body: its id, event, decoded data and comment."""
    out = []
    for block in text.split("\n\n"):
        message: dict[str, Any] = {}
        for line in block.splitlines():
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "":
                message["comment"] = value
            elif field == "data":
                message["data"] = json.loads(value)
            elif field in ("id", "event"):
                message[field] = value
        if message:
            out.append(message)
    return out


async def test_every_event_has_an_id_in_stream_order(tmp_path: Path) -> None:
    async with asgi_client(tmp_path) as (_, client):
        created = await client.post("/jobs", json={**SMALL, "epochs": 2}, headers=AUTH)
        job_id = created.json()["id"]
        response = await client.get(f"/jobs/{job_id}/events", headers=AUTH)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = [m for m in messages(response.text) if "event" in m]
    assert events[0]["event"] == "snapshot"
    assert events[-1]["event"] == "end"
    assert "metrics" in [m["event"] for m in events]
    assert [m["id"] for m in events] == [str(n) for n in range(len(events))]


def test_a_quiet_stream_gets_keep_alive_pings(tmp_path: Path) -> None:
    with (
        live_server(tmp_path, max_running=1, sse_ping=0.05) as (url, _),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        busy = client.post("/jobs", json={**SMALL, "epochs": 10_000}, headers=AUTH).json()["id"]
        # Queued behind the busy job, this one sends nothing after its snapshot but pings.
        quiet = client.post("/jobs", json={**SMALL, "epochs": 3}, headers=AUTH).json()["id"]
        body = []
        pings = 0
        with client.stream("GET", f"/jobs/{quiet}/events", headers=AUTH) as response:
            # (Without pings nothing would come: the client's 30 s read timeout fails the test.)
            for line in response.iter_lines():
                body.append(line)
                if line.startswith(": ping"):
                    pings += 1
                    if pings == 2:  # end the stream: a queued job is cancelled at once
                        client.post(f"/jobs/{quiet}/cancel", headers=AUTH)
        client.post(f"/jobs/{busy}/cancel", headers=AUTH)
    received = messages("\n".join(body))
    kinds = [m.get("event", "ping" if "comment" in m else "?") for m in received]
    assert kinds[0] == "snapshot"
    assert kinds[-1] == "end"
    assert kinds.count("ping") >= 2
    assert all(m["comment"].startswith("ping") for m in received if "comment" in m)
    # Pings carry no id; the events keep theirs, in order.
    assert [m["id"] for m in received if "event" in m] == ["0", "1"]
    assert received[-1]["data"]["state"] == "cancelled"


def test_the_ping_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="sse_ping"):
        TrainingService(token="t", sse_ping=0)
