"""Latency of a training service's health check while four jobs train.

Starts ``examples/service`` under uvicorn in a subprocess, submits four digits jobs (all four
train at once), waits until they train, then times ``GET /health`` from this process (one request
every ``--gap`` seconds, ``--probes`` of them) and reports p50/p99/max and the training steps done
meanwhile. Two servers, the same jobs:

* ``aiolearner``: the example as it is (each job is ``await learner.fit(...)`` in the lifespan's
  task group, compute policy ``auto``);
* ``thread``: the same with ``compute="thread"`` (all torch work in the learners' worker threads);
* ``blocking``: the same service whose jobs run a plain PyTorch loop (the same model, optimizer,
  batches and validation pass) inside the async task, giving the event loop a turn once per
  epoch, which is what calling a synchronous training loop from an async app amounts to.

The figures depend on what else the machine runs: compare rows of one run, not runs. The first
row (the service with no job) is the floor that the machine and the client set.

Run::

    python -m bench.service_latency            # both servers, default sizes
    python -m bench.service_latency --probes 200 --gap 0.01
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
import httpx
import torch
from starlette.applications import Starlette
from torch.utils.data import DataLoader, TensorDataset

from examples.service.app import Job, TrainingService, load_dataset

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = {"dataset": "digits", "hidden": 64, "epochs": 10_000, "batch_size": 64}


class BlockingService(TrainingService):
    """The same service, jobs trained by a plain loop that blocks the event loop per epoch."""

    async def train(self, job: Job) -> None:
        learner = job.handle.learner
        model, optimizer, state = learner.model, learner.optimizer, learner.state
        x, y, _ = load_dataset(job.spec.dataset)
        n_train = len(x) * 4 // 5
        gen = torch.Generator().manual_seed(job.spec.seed)
        loader = DataLoader(
            TensorDataset(x[:n_train], y[:n_train]),
            batch_size=job.spec.batch_size,
            shuffle=True,
            generator=gen,
        )
        val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=256)
        for _ in range(job.spec.epochs):
            model.train()
            for inputs, targets in loader:
                loss = torch.nn.functional.cross_entropy(model(inputs), targets)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1  # so that GET /jobs shows progress like the other server
            model.eval()
            with torch.inference_mode():  # the same validation pass as the learner's
                for inputs, targets in val:
                    torch.nn.functional.cross_entropy(model(inputs), targets)
            state.epoch += 1
            await anyio.lowlevel.checkpoint()


def _app(service_class: type[TrainingService], **options: Any) -> Starlette:
    service = service_class(
        **options,
        token=TOKEN,
        checkpoint_dir=os.environ.get("BENCH_CHECKPOINTS", "/tmp/aiolearner-bench"),
        max_running=4,
        max_queued=4,
    )
    app = service.app()
    app.state.service = service
    return app


def aiolearner_app() -> Starlette:
    """uvicorn factory: the example service."""
    return _app(TrainingService)


def thread_app() -> Starlette:
    """uvicorn factory: the example service with ``compute="thread"``."""
    return _app(TrainingService, compute="thread")


def blocking_app() -> Starlette:
    """uvicorn factory: the blocking-loop variant."""
    return _app(BlockingService)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _total_steps(client: httpx.Client) -> int:
    return sum(int(j["step"]) for j in client.get("/jobs", headers=AUTH).json()["jobs"])


def measure(
    factory: str, *, probes: int, gap: float, warmup: float, max_seconds: float, jobs: int = 4
) -> dict[str, Any]:
    """Start a server, train four jobs, time the health checks; returns the figures."""
    port = _free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--factory", f"bench.service_latency:{factory}"),
            *("--port", str(port), "--log-level", "warning"),
        ],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError(f"{factory}: server did not start") from None
                    time.sleep(0.1)
            for _ in range(jobs):
                client.post("/jobs", json=SPEC, headers=AUTH).raise_for_status()
            time.sleep(warmup)  # let all four jobs get going
            steps_before, start = _total_steps(client), time.perf_counter()
            latencies: list[float] = []
            while len(latencies) < probes and time.perf_counter() - start < max_seconds:
                t0 = time.perf_counter()
                client.get("/health").raise_for_status()
                latencies.append(time.perf_counter() - t0)
                time.sleep(gap)
            elapsed = time.perf_counter() - start
            steps = _total_steps(client) - steps_before
    finally:
        server.terminate()
        server.wait(timeout=60)
    latencies.sort()
    return {
        "server": factory.removesuffix("_app") if jobs else "idle (no job)",
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))],
        "max_ms": 1000 * latencies[-1],
        "probes": len(latencies),
        "steps_per_s": steps / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=400)
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between probes")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="per server")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(
        "| server | /health p50 (ms) | p99 (ms) | max (ms) | probes | training steps/s (4 jobs) |"
    )
    print("|---|---|---|---|---|---|")
    for factory, jobs in [
        ("aiolearner_app", 0),
        ("aiolearner_app", 4),
        ("thread_app", 4),
        ("blocking_app", 4),
    ]:
        r = measure(
            factory,
            jobs=jobs,
            probes=args.probes,
            gap=args.gap,
            warmup=args.warmup,
            max_seconds=args.max_seconds,
        )
        print(
            f"| {r['server']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} "
            f"| {r['probes']} | {r['steps_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
