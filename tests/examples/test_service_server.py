"""The training service under real servers on 127.0.0.1 (uvicorn in a thread, hypercorn on trio
in a subprocess): SSE over a socket, cancel."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from service_helpers import AUTH, TOKEN, live_server

ROOT = Path(__file__).resolve().parents[2]


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


def test_the_readme_hypercorn_command_serves_on_trio(tmp_path: Path) -> None:
    # The README's command, with the listening socket handed over (no port race).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    env = {
        **os.environ,
        "AIOLEARNER_SERVICE_TOKEN": TOKEN,
        "AIOLEARNER_SERVICE_CHECKPOINTS": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "hypercorn", "--worker-class", "trio"),
            *("--bind", f"fd://{sock.fileno()}", "examples.service.app:create_app()"),
        ],
        cwd=ROOT,
        env=env,
        pass_fds=[sock.fileno()],
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            # Connections queue on the listening socket until the server has started.
            assert client.get("/health").json()["status"] == "ok"
            spec = {"dataset": "synthetic", "hidden": 8, "epochs": 10_000}
            job_id = client.post("/jobs", json=spec, headers=AUTH).json()["id"]
            kinds = []
            with client.stream("GET", f"/jobs/{job_id}/events", headers=AUTH) as response:
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        kinds.append(line.removeprefix("event: "))
                        if kinds.count("metrics") == 1 and kinds[-1] == "metrics":
                            client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
            status = client.get(f"/jobs/{job_id}", headers=AUTH).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
        sock.close()
    assert kinds[-2:] == ["run_end", "end"]
    assert status["state"] == "cancelled"
    assert (tmp_path / f"{job_id}.pt").is_file()
