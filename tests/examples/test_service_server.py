"""The training service under a real uvicorn server on 127.0.0.1: SSE over a socket, cancel."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from service_helpers import AUTH, live_server


def test_stream_and_cancel_over_a_real_socket(tmp_path: Path) -> None:
    with live_server(tmp_path) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json()["status"] == "ok"
        spec = {"dataset": "digits", "hidden": 16, "epochs": 10_000}
        job_id = client.post("/jobs", json=spec, headers=AUTH).json()["id"]
        kinds: list[str] = []
        last: dict[str, object] = {}
        with client.stream("GET", f"/jobs/{job_id}/events", headers=AUTH) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                    kinds.append(kind)
                elif line.startswith("data: "):
                    last = json.loads(line.removeprefix("data: "))
                    if kind == "metrics" and kinds.count("metrics") == 2:
                        # Two epochs arrived while the job trains: cancel it mid-stream.
                        cancel = client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
                        assert cancel.status_code == 202
        status = client.get(f"/jobs/{job_id}", headers=AUTH).json()
    assert kinds[0] == "snapshot"
    assert kinds[-2:] == ["run_end", "end"]
    assert last["state"] == "cancelled"
    assert status["state"] == "cancelled"
    assert 2 <= int(status["epoch"]) < 10_000
    assert (tmp_path / f"{job_id}.pt").is_file()
