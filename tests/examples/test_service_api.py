"""The training service's HTTP API through httpx's ASGI transport, on asyncio and trio."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
import torch
from service_helpers import AUTH, asgi_client, parse_sse, wait_epochs, wait_running

from aiolearner import RunState
from examples.service.app import JobSpec, build_learner


def file_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


SMALL = {"dataset": "synthetic", "hidden": 8, "batch_size": 256}


async def test_start_stream_and_checkpoint(tmp_path: Path) -> None:
    async with asgi_client(tmp_path, max_running=1) as (service, client):
        # Hold the only slot, so that the stream is open before the job starts.
        slots = service._slots
        assert slots is not None
        await slots.acquire()
        created = await client.post("/jobs", json={**SMALL, "epochs": 3}, headers=AUTH)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        bodies: list[str] = []

        async def stream() -> None:
            # ASGITransport hands the body over when the stream ends: when the run is over.
            bodies.append((await client.get(f"/jobs/{job_id}/events", headers=AUTH)).text)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            await anyio.wait_all_tasks_blocked()
            slots.release()
        events = parse_sse(bodies[0])
        status = (await client.get(f"/jobs/{job_id}", headers=AUTH)).json()
        listed = (await client.get("/jobs", headers=AUTH)).json()["jobs"]
        # A client connecting after the run ends gets the whole curve at once.
        late = parse_sse((await client.get(f"/jobs/{job_id}/events", headers=AUTH)).text)

    kinds = [kind for kind, _ in events]
    assert kinds[0] == "snapshot"
    assert kinds[-1] == "end"
    assert [data["epoch"] for kind, data in events if kind == "metrics"] == [0, 1, 2]
    assert [data["data"]["outcome"] for kind, data in events if kind == "run_end"] == ["completed"]
    assert events[-1][1]["state"] == "completed"
    assert (status["state"], status["epoch"], status["target_epochs"]) == ("completed", 3, 3)
    assert status["step"] > 0
    assert status["metrics"]["train_loss"] > 0
    assert [job["id"] for job in listed] == [job_id]
    assert [kind for kind, _ in late] == ["snapshot", "end"]
    history = late[0][1]["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["train_loss"] == status["metrics"]["train_loss"]
    assert [h["val_loss"] for h in history] == [
        data["data"]["val_loss"] for kind, data in events if kind == "metrics"
    ]
    # The final checkpoint is under the configured directory, named by the server-made id,
    # and continues the run in a fresh learner.
    assert status["checkpoint"] == f"{job_id}.pt"
    assert file_names(tmp_path) == [f"{job_id}.pt"]
    learner = build_learner(JobSpec.model_validate({**SMALL, "epochs": 3}))
    learner.load_checkpoint(tmp_path / f"{job_id}.pt")
    assert learner.state.epoch == 3
    assert learner.state.step == status["step"]


async def test_cancel_a_running_job_while_streaming(tmp_path: Path) -> None:
    async with asgi_client(tmp_path) as (service, client):
        job_id = (
            await client.post("/jobs", json={**SMALL, "epochs": 10_000}, headers=AUTH)
        ).json()["id"]
        handle = service.jobs[job_id].handle
        responses: list[httpx.Response] = []

        async def stream() -> None:
            responses.append(await client.get(f"/jobs/{job_id}/events", headers=AUTH))

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            await wait_running(handle)
            await wait_epochs(handle, 2)
            cancelled = await client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
            assert cancelled.status_code == 202
        again = await client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
        status = (await client.get(f"/jobs/{job_id}", headers=AUTH)).json()

    assert again.status_code == 409
    events = parse_sse(responses[0].text)
    assert [data["data"]["outcome"] for kind, data in events if kind == "run_end"] == ["cancelled"]
    assert events[-1][0] == "end"
    assert events[-1][1]["state"] == "cancelled"
    assert status["state"] == "cancelled"
    assert status["cancel_requested"]
    assert 2 <= status["epoch"] < 10_000
    saved = torch.load(tmp_path / f"{job_id}.pt", weights_only=True)
    # Saved after the run had stopped: counters and weights agree with the status.
    assert saved["progress"]["epoch"] == status["epoch"]
    assert saved["progress"]["step"] == status["step"]


async def test_queue_is_bounded_and_queued_jobs_cancel(tmp_path: Path) -> None:
    async with asgi_client(tmp_path, max_running=1, max_queued=1) as (service, client):
        spec = {**SMALL, "epochs": 10_000}
        first = (await client.post("/jobs", json=spec, headers=AUTH)).json()["id"]
        await wait_running(service.jobs[first].handle)
        second = await client.post("/jobs", json=spec, headers=AUTH)
        assert second.status_code == 201
        assert second.json()["state"] == "pending"
        third = await client.post("/jobs", json=spec, headers=AUTH)
        assert third.status_code == 429
        health = (await client.get("/health")).json()
        assert (health["running"], health["queued"]) == (1, 1)

        queued = service.jobs[second.json()["id"]].handle
        assert (
            await client.post(f"/jobs/{second.json()['id']}/cancel", headers=AUTH)
        ).status_code == 202
        assert await queued.wait_done() is RunState.CANCELLED
        assert queued.learner.state.step == 0
        # A queue slot is free again.
        assert (await client.post("/jobs", json=spec, headers=AUTH)).status_code == 201
        for job_id in list(service.jobs):
            await client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
        for job in service.jobs.values():
            await job.handle.wait_done()
    # Never-started jobs write no checkpoint; only the one that trained does.
    assert file_names(tmp_path) == [f"{first}.pt"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 5.5}, "epochs"),
        ({"hidden": 100_000}, "hidden"),
        ({"dataset": "../../etc/passwd"}, "dataset"),
        ({"checkpoint": "/tmp/x.pt"}, "checkpoint"),
        ([1, 2], "body"),
    ],
)
async def test_bad_spec_is_422_naming_the_field(tmp_path: Path, body: object, field: str) -> None:
    async with asgi_client(tmp_path) as (service, client):
        response = await client.post("/jobs", json=body, headers=AUTH)
    assert response.status_code == 422
    assert field in [e["field"] for e in response.json()["detail"]]
    assert service.jobs == {}


async def test_invalid_json_is_422(tmp_path: Path) -> None:
    async with asgi_client(tmp_path) as (_, client):
        response = await client.post("/jobs", content=b"{not json", headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "body"


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-token"}]
)
async def test_token_is_required(tmp_path: Path, headers: dict[str, str]) -> None:
    async with asgi_client(tmp_path) as (service, client):
        calls = [
            client.post("/jobs", json=SMALL, headers=headers),
            client.get("/jobs", headers=headers),
            client.get("/jobs/abc", headers=headers),
            client.get("/jobs/abc/events", headers=headers),
            client.post("/jobs/abc/cancel", headers=headers),
        ]
        for call in calls:
            response = await call
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/health")).status_code == 200
        page = await client.get("/")
        assert page.status_code == 200
        assert "<svg" in page.text
        assert (await client.get("/jobs/..%2F..%2Fx", headers=AUTH)).status_code == 404
    assert service.jobs == {}


def test_a_token_is_required_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOLEARNER_SERVICE_TOKEN", raising=False)
    from examples.service.app import TrainingService

    with pytest.raises(ValueError, match="token"):
        TrainingService()
