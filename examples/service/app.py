"""A training service: an ASGI app that trains models in its own lifespan task group.

Jobs run concurrently with the requests the app keeps serving; at most ``max_running`` train at
once, up to ``max_queued`` more wait for a slot. Each job is an :class:`aiolearner.FitHandle`, so
``POST /jobs/{id}/cancel`` cancels exactly that job's fit through its cancel scope; the job then
writes a final checkpoint (shielded, time-bounded) under the configured directory.

Routes (all ``/jobs`` routes need ``Authorization: Bearer <token>``)::

    GET  /                     the dashboard (static page; asks for the token)
    GET  /health               liveness and job counts (no token)
    POST /jobs                 start a job: {"dataset", "hidden", "epochs", "lr", "batch_size",
                               "seed"}; 422 naming the field when the spec is invalid
    GET  /jobs                 all jobs
    GET  /jobs/{id}            one job: state, epoch, step, latest metrics
    GET  /jobs/{id}/events     server-sent events from the job's learner, until the run is over
                               (sse-starlette: numbered events, keep-alive pings)
    POST /jobs/{id}/cancel     cancel the job (queued or running)

Run it with uvicorn (asyncio) or hypercorn (trio); see README.md beside this file.
"""

from __future__ import annotations

import functools
import hmac
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import torch
from anyio.abc import TaskGroup
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from torch.utils.data import DataLoader, TensorDataset

from aiolearner import Callback, Event, FitHandle, Learner, RunState, StateView

ComputeMode = Literal["auto", "thread", "inline"]

DASHBOARD = Path(__file__).with_name("dashboard.html")

#: Line ends of the event stream (the dashboard splits messages on blank lines).
SSE_SEP = "\n"

#: The event kinds streamed to clients (per-batch stage events would flood a browser).
STREAMED_KINDS = frozenset({"run_start", "run_end", "metrics", "validation", "control"})


class JobSpec(BaseModel):
    """What a client may ask for. Nothing here names a file: data sets come from an allow-list."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: Literal["digits", "synthetic"] = "digits"
    hidden: int = Field(default=32, ge=1, le=512, description="width of the hidden layer")
    epochs: int = Field(default=20, ge=1, le=10_000)
    lr: float = Field(default=0.1, gt=0.0, le=10.0, allow_inf_nan=False)
    batch_size: int = Field(default=64, ge=1, le=1024)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class History(Callback):
    """Each finished epoch's metrics, so that a client connecting late still gets the whole curve
    (a ``def`` hook on the learner: cheaper than one more event subscriber per job)."""

    reads = frozenset({"epoch", "metrics"})

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def after_epoch(self, state: StateView) -> None:
        # ``epoch`` is still the index of the epoch that just finished (as in "metrics" events).
        self.epochs.append({"epoch": state.epoch, **jsonable(dict(state.metrics))})


@dataclass
class Job:
    """A submitted job: its spec, its fit handle, where its checkpoint went."""

    id: str
    spec: JobSpec
    handle: FitHandle
    created: float = field(default_factory=time.time)
    checkpoint: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spec": self.spec.model_dump(),
            "created": self.created,
            "checkpoint": None if self.checkpoint is None else self.checkpoint.name,
            **self.handle.snapshot().as_dict(),
        }


class QueueFullError(Exception):
    """More jobs are waiting than the service accepts."""


@functools.cache
def load_dataset(name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Inputs, class targets and the number of classes of an allow-listed data set."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        return x, torch.tensor(digits.target, dtype=torch.long), 10
    if name == "synthetic":
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(2048, 16, generator=gen)
        w = torch.randn(16, 4, generator=gen)
        return x, (x @ w).argmax(dim=1), 4
    raise ValueError(f"unknown data set {name!r}")


def build_learner(spec: JobSpec, *, compute: ComputeMode = "auto") -> Learner[Any]:
    """A small MLP for the job's data set; 80 % of the samples train, 20 % validate."""
    x, y, n_classes = load_dataset(spec.dataset)
    n_train = len(x) * 4 // 5
    gen = torch.Generator().manual_seed(spec.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], spec.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(spec.hidden, n_classes),
    )
    with torch.no_grad():  # seeded from the spec without touching the global RNG
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    train = DataLoader(
        TensorDataset(x[:n_train], y[:n_train]),
        batch_size=spec.batch_size,
        shuffle=True,
        generator=gen,
    )
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=256)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy
    return Learner(model, optimizer, loss_fn, train, val, [History()], compute=compute)


def save_atomically(checkpoint: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(checkpoint), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """Event data as JSON: scalar tensors become numbers, non-finite floats ``null``."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 and value.device.type == "cpu" else None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class TrainingService:
    """The jobs, their queue and their task group; :meth:`app` is the ASGI application.

    Args:
        token: the bearer token control requests must carry (default: the
            ``AIOLEARNER_SERVICE_TOKEN`` environment variable; one of them is required).
        checkpoint_dir: where final checkpoints go (``<job id>.pt``; ids are made here).
        max_running: jobs training at once.
        max_queued: jobs waiting for a slot before ``POST /jobs`` answers 429.
        compute: the learners' compute policy (``"thread"`` keeps all torch work off the
            event loop; see ``bench/service_latency.py`` for what each costs).
        sse_ping: seconds between keep-alive pings (SSE comment lines) on an event stream that
            has nothing else to send, so that proxies do not close a quiet connection.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        checkpoint_dir: str | os.PathLike[str] = "checkpoints",
        max_running: int = 2,
        max_queued: int = 8,
        compute: ComputeMode = "auto",
        sse_ping: float = 15.0,
    ) -> None:
        if not sse_ping > 0:
            raise ValueError(f"sse_ping must be a positive number of seconds, got {sse_ping!r}")
        token = token if token is not None else os.environ.get("AIOLEARNER_SERVICE_TOKEN")
        if not token:
            raise ValueError(
                "a bearer token is required: pass token= or set AIOLEARNER_SERVICE_TOKEN"
            )
        self._token = token.encode()
        self.checkpoint_dir = Path(checkpoint_dir).resolve()
        self.max_running = max_running
        self.max_queued = max_queued
        self.compute: ComputeMode = compute
        self.sse_ping = sse_ping
        self.jobs: dict[str, Job] = {}
        self._slots: anyio.CapacityLimiter | None = None
        self._tg: TaskGroup | None = None

    # -- jobs -------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> Job:
        """Queue a job (it starts when a slot is free)."""
        if self._tg is None or self._slots is None:
            raise RuntimeError("the service is not running (its lifespan has not started)")
        waiting = sum(1 for j in self.jobs.values() if j.handle.state is RunState.PENDING)
        if waiting >= self.max_queued:
            raise QueueFullError(f"{waiting} jobs are waiting already")
        job_id = uuid.uuid4().hex  # the only name a checkpoint file gets
        finalize = functools.partial(self._finalize, job_id)
        job = Job(
            job_id,
            spec,
            FitHandle(build_learner(spec, compute=self.compute), spec.epochs, finalize=finalize),
        )
        self.jobs[job_id] = job
        self._tg.start_soon(self.train, job, name=f"job {job_id}")
        return job

    async def train(self, job: Job) -> None:
        """Run one job in its queue slot; a failing job is recorded, not fatal to the service."""
        assert self._slots is not None
        try:
            await job.handle.run(limiter=self._slots)
        except Exception:  # recorded in job.handle.error, shown by GET /jobs/{id}
            pass

    async def _finalize(self, job_id: str, handle: FitHandle) -> None:
        # Runs shielded after the run, also when it was cancelled; the learner is idle now.
        if handle.state is RunState.FAILED:
            return
        path = self.checkpoint_dir / f"{job_id}.pt"
        await anyio.to_thread.run_sync(save_atomically, handle.learner.state_dict(), path)
        self.jobs[job_id].checkpoint = path

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Owns the task group every job runs in: shutting down cancels them (they still save)."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._slots = anyio.CapacityLimiter(self.max_running)
        # Off the event loop: load the default data set, and pay once what building a learner
        # imports the first time (torch's optimizers import torch._dynamo: seconds).
        await anyio.to_thread.run_sync(build_learner, JobSpec())
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                yield
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    # -- HTTP -------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        """The ASGI application."""
        return Starlette(
            routes=[
                Route("/", self.dashboard),
                Route("/health", self.health),
                Route("/jobs", self.list_jobs, methods=["GET"]),
                Route("/jobs", self.create_job, methods=["POST"]),
                Route("/jobs/{job_id}", self.get_job),
                Route("/jobs/{job_id}/events", self.job_events),
                Route("/jobs/{job_id}/cancel", self.cancel_job, methods=["POST"]),
            ],
            lifespan=self.lifespan,
        )

    def _authorized(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.encode(), self._token)

    def _job(self, request: Request) -> Job | Response:
        if not self._authorized(request):
            return _unauthorized()
        job = self.jobs.get(request.path_params.get("job_id", ""))
        if job is None:
            return JSONResponse({"detail": "no such job"}, status_code=404)
        return job

    async def dashboard(self, request: Request) -> Response:
        return FileResponse(DASHBOARD, media_type="text/html")

    async def health(self, request: Request) -> Response:
        states = [j.handle.state for j in self.jobs.values()]
        return JSONResponse(
            {
                "status": "ok",
                "running": states.count(RunState.RUNNING),
                "queued": states.count(RunState.PENDING),
            }
        )

    async def list_jobs(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        return JSONResponse({"jobs": [jsonable(j.as_dict()) for j in self.jobs.values()]})

    async def create_job(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse(
                {"detail": [{"field": "body", "message": "not valid JSON"}]}, status_code=422
            )
        try:
            spec = JobSpec.model_validate(body)
        except ValidationError as exc:
            errors = [
                {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                for e in exc.errors()
            ]
            return JSONResponse({"detail": errors}, status_code=422)
        try:
            job = self.submit(spec)
        except QueueFullError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=429)
        return JSONResponse(jsonable(job.as_dict()), status_code=201)

    async def get_job(self, request: Request) -> Response:
        job = self._job(request)
        return job if isinstance(job, Response) else JSONResponse(jsonable(job.as_dict()))

    async def cancel_job(self, request: Request) -> Response:
        job = self._job(request)
        if isinstance(job, Response):
            return job
        if job.handle.done:
            return JSONResponse({"detail": f"job is {job.handle.state.value}"}, status_code=409)
        job.handle.cancel()
        return JSONResponse({"id": job.id, "cancel_requested": True}, status_code=202)

    async def job_events(self, request: Request) -> Response:
        job = self._job(request)
        if isinstance(job, Response):
            return job
        return EventSourceResponse(
            job_events(job),
            ping=self.sse_ping,
            sep=SSE_SEP,
            headers={"Cache-Control": "no-cache"},
        )


def _unauthorized() -> Response:
    return JSONResponse(
        {"detail": "missing or invalid bearer token"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _sse(kind: str, data: Any, number: int) -> ServerSentEvent:
    text = json.dumps(jsonable(data), allow_nan=False)
    return ServerSentEvent(text, event=kind, id=str(number), sep=SSE_SEP)


def _event_dict(event: Event) -> dict[str, Any]:
    return {
        "kind": event.kind,
        "source": event.source,
        "epoch": event.epoch,
        "step": event.step,
        "time": event.time,
        "data": dict(event.data),
        "dropped": event.dropped,
    }


async def job_events(job: Job) -> AsyncIterator[ServerSentEvent]:
    """One job's server-sent events: a ``snapshot``, the learner's events, then ``end``.

    Each event's ``id`` is its position in this stream (0 for the snapshot). A client that
    reconnects gets a new stream whose snapshot holds every finished epoch, so it has no
    ``Last-Event-ID`` to resume from. sse-starlette runs this generator in one task and, when the
    client goes away, cancels that task: the event subscription is closed by the task that
    opened it.
    """
    async with job.handle.events(kinds=STREAMED_KINDS, buffer=256) as stream:
        history = next(c for c in job.handle.learner.callbacks if isinstance(c, History))
        yield _sse("snapshot", {**job.as_dict(), "history": history.epochs}, 0)
        number = 0
        async for event in stream:
            number += 1
            yield _sse(event.kind, _event_dict(event), number)
    await job.handle.wait_done()  # the final checkpoint is written
    yield _sse("end", job.as_dict(), number + 1)


def create_app(**options: Any) -> Starlette:
    """The app, configured from ``options`` or the environment (``AIOLEARNER_SERVICE_TOKEN``,
    ``AIOLEARNER_SERVICE_CHECKPOINTS``, ``AIOLEARNER_SERVICE_MAX_RUNNING``,
    ``AIOLEARNER_SERVICE_MAX_QUEUED``). The service is ``app.state.service``."""
    env = os.environ
    options.setdefault("checkpoint_dir", env.get("AIOLEARNER_SERVICE_CHECKPOINTS", "checkpoints"))
    options.setdefault("max_running", int(env.get("AIOLEARNER_SERVICE_MAX_RUNNING", "2")))
    options.setdefault("max_queued", int(env.get("AIOLEARNER_SERVICE_MAX_QUEUED", "8")))
    service = TrainingService(**options)
    app = service.app()
    app.state.service = service
    return app
