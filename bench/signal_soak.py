"""Real SIGINT and SIGTERM sent to training processes: the state they leave must never be torn.

Run::

    .venv/bin/python -m bench.signal_soak --trials 20        # 20 per signal per backend
    .venv/bin/python -m bench.signal_soak --trials 4 --jobs 2

Each trial starts a child process that trains a small model (dropout, Adam) with a checkpoint
every epoch and every 5 steps, in one of three ways: ``fit_sync`` (signals handled by default),
``await learner.fit`` inside ``stop_on_signals()`` around ``anyio.run``, or ``fit_sync`` in a
worker thread while the main thread, inside ``stop_on_signals()``, waits for it. Once the child
has trained a random number of steps, the parent sends it SIGINT or SIGTERM, at whatever point
of a batch it happens to be (inside ``loss.backward()``, half way through an optimizer step).
A trial is **torn** unless:

* the child exits with the status a scheduler expects: killed by SIGINT (what Python does for
  an uncaught ``KeyboardInterrupt``) or 143 for SIGTERM;
* its ``last.pt`` was written by the run's final save, at the step where the run stopped
  (``step == epoch * batches + batch_index``), with exactly the weights an uninterrupted run
  has after that many steps;
* resuming from it in a fresh learner and training one more epoch gives exactly the
  uninterrupted run's weights, optimizer state and generator state.

Target (issue 12): 0 torn states in >= 20 SIGINT and >= 20 SIGTERM trials per backend.
``tests/test_signals.py`` runs one trial of each kind.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch

from aiolearner import Callback, Learner, StateView, stop_on_signals
from aiolearner.callbacks import Checkpoint

BATCHES = 6
MODES = ("sync", "async", "thread")
ROOT = Path(__file__).resolve().parent.parent
#: Seconds a signalled child may take to end (it takes about one here).
CHILD_TIMEOUT = 60
#: Where the directories of torn trials are copied (--keep).
KEEP: Path | None = None


def build(directory: Path | None = None, *extra: Callback) -> Learner[Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 8, 10, generator=gen)
    y = torch.randint(0, 4, (BATCHES * 8,), generator=gen)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 4)
    )
    callbacks: list[Callback] = list(extra)
    if directory is not None:
        callbacks.append(Checkpoint(directory, every_n_epochs=1, every_n_steps=5))
    return Learner(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        torch.nn.functional.cross_entropy,
        loader,
        callbacks=callbacks,
    )


class Progress(Callback):
    """Prints each committed step, for the parent to pick its moment."""

    reads = frozenset({"step"})

    def after_fit_batch(self, state: StateView) -> None:
        print(f"step {state.step}", flush=True)


# -- the child process ----------------------------------------------------------------------------


def child(mode: str, backend: str, directory: str) -> None:
    # Every thread's stack on SIGUSR2 (for a child that does not end).
    faulthandler.register(signal.SIGUSR2)
    torch.set_num_threads(1)
    learner = build(Path(directory), Progress())
    epochs = 100_000  # until a signal comes
    if mode == "sync":
        learner.fit_sync(epochs, backend=backend)  # type: ignore[arg-type]
    elif mode == "async":

        async def main() -> None:
            await learner.fit(epochs)

        with stop_on_signals():
            anyio.run(main, backend=backend)
    elif mode == "thread":
        # fit_sync in a worker thread relies on the main thread's stop_on_signals().
        def work() -> None:
            learner.fit_sync(epochs, backend=backend)  # type: ignore[arg-type]

        with stop_on_signals():
            worker = threading.Thread(target=work)
            worker.start()
            worker.join()
    else:
        raise ValueError(mode)


# -- the parent -----------------------------------------------------------------------------------


@dataclass
class Result:
    mode: str
    backend: str
    signal: str
    returncode: int
    stopped_at: tuple[int, int, int] | None  # epoch, step, batch_index of last.pt
    problem: str  # "" when the state is intact


def expected_returncode(signum: int) -> int:
    return -signal.SIGINT if signum == signal.SIGINT else 128 + signum


def run_child(
    mode: str, backend: str, signum: int, after_steps: int, directory: Path
) -> tuple[int, str]:
    """Start a child, signal it once it has committed ``after_steps`` steps; its return code."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.signal_soak", "--child", mode, backend, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    sent = False
    try:
        for line in proc.stdout:
            if not sent and line.startswith("step ") and int(line.split()[1]) >= after_steps:
                proc.send_signal(signum)
                sent = True
                break
        try:
            _, err = proc.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Hung: its threads' stacks (faulthandler, SIGUSR2) say where, for the report.
            proc.send_signal(signal.SIGUSR2)
            time.sleep(2)
            proc.kill()
            _, err = proc.communicate()
            return proc.returncode, (
                f"the child did not end within {CHILD_TIMEOUT} s of the signal; its threads:"
                f"\n{err[-8000:]}"
            )
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if not sent:
        return proc.returncode, f"the child ended before it was signalled: {err[-2000:]}"
    return proc.returncode, err


class WeightLog(Callback):
    """The weights after each committed step (index = step)."""

    reads = frozenset({"model", "step"})

    def __init__(self) -> None:
        self.by_step: dict[int, list[torch.Tensor]] = {}

    def after_update(self, state: StateView) -> None:
        self.by_step[state.step] = [p.detach().clone() for p in state.model.parameters()]


#: In-process training (the reference, the resumed runs) draws from this process's global
#: generators: one at a time, whatever the number of children watched at once.
TRAINING = threading.Lock()


class Reference:
    """The uninterrupted run, trained as far as needed (weights at every step, and the whole
    outcome at the end of each epoch). Use with ``TRAINING`` held."""

    def __init__(self) -> None:
        self.log = WeightLog()
        self.learner = build(None, self.log)
        self.at_epoch: dict[int, dict[str, Any]] = {}
        # The global generators where the reference run is (other runs happen in between).
        self.rng = torch.get_rng_state()

    def upto(self, epochs: int) -> None:
        while self.learner.state.epoch < epochs:
            torch.set_rng_state(self.rng)
            self.learner.fit_sync(self.learner.state.epoch + 1, handle_signals=False)
            self.rng = torch.get_rng_state()
            self.at_epoch[self.learner.state.epoch] = outcome(self.learner)

    def weights(self, step: int) -> list[torch.Tensor]:
        self.upto(step // BATCHES + 1)
        return self.log.by_step[step]  # in the order of model.parameters()


def outcome(learner: Learner[Any]) -> dict[str, Any]:
    return {
        "weights": [p.detach().clone() for p in learner.model.parameters()],
        # A copy: the live state's tensors change with later steps.
        "optimizer": copy.deepcopy(learner.optimizer.state_dict()),
        "rng": torch.get_rng_state(),
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def trial(
    mode: str, backend: str, signum: int, after_steps: int, reference: Reference, tmp: Path
) -> Result:
    """One child, one signal; what it left behind, checked."""
    directory = tmp / f"{mode}-{backend}-{signum}-{after_steps}-{time.monotonic_ns()}"
    code, err = run_child(mode, backend, signum, after_steps, directory)
    name = signal.Signals(signum).name
    result = Result(mode, backend, name, code, None, "")
    if code != expected_returncode(signum):
        result.problem = (
            f"exit status {code}, expected {expected_returncode(signum)}: {err[-9000:]}"
        )
        return result
    last = directory / "last.pt"
    try:
        checkpoint = torch.load(last, weights_only=True)
    except Exception as exc:
        result.problem = f"last.pt unreadable: {exc!r}"
        return result
    with TRAINING:
        check(result, checkpoint, last, after_steps, reference)
    if result.problem and KEEP is not None:
        shutil.copytree(directory, KEEP / directory.name)
    return result


def check(
    result: Result,
    checkpoint: dict[str, Any],
    last: Path,
    after_steps: int,
    reference: Reference,
) -> None:
    progress = checkpoint["progress"]
    epoch, step, index = int(progress["epoch"]), int(progress["step"]), int(progress["batch_index"])
    result.stopped_at = (epoch, step, index)
    if step != epoch * BATCHES + index or step < after_steps:
        result.problem = f"last.pt is not the stop point: {result.stopped_at}"
        return
    keys = list(checkpoint["model"])
    if step and not same([checkpoint["model"][k] for k in keys], reference.weights(step)):
        result.problem = f"last.pt's weights are not those of step {step}: torn"
        return
    target = epoch + 2
    reference.upto(target)
    resumed = build(None)
    with warnings.catch_warnings():
        # Resumed without a Checkpoint (nothing to write here): its state is dropped, as said.
        warnings.filterwarnings("ignore", "the checkpoint was written by a learner with other")
        resumed.fit_sync(target, resume=last, handle_signals=False)
    if not same(outcome(resumed), reference.at_epoch[target]):
        result.problem = f"resumed from {result.stopped_at}, the run differs from uninterrupted"


def soak(trials: int, backends: list[str], jobs: int, seed: int) -> list[Result]:
    rng = random.Random(seed)
    plan = [
        (MODES[i % len(MODES)], backend, signum, rng.randint(3, 40))
        for backend in backends
        for signum in (signal.SIGINT, signal.SIGTERM)
        for i in range(trials)
    ]
    with TRAINING:
        reference = Reference()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(trial, *p, reference, Path(tmp)) for p in plan]
        return [f.result() for f in futures]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=3, metavar=("MODE", "BACKEND", "DIR"))
    parser.add_argument("--trials", type=int, default=20, help="per signal per backend")
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--jobs", type=int, default=2, help="children at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="copy the directories of torn trials here")
    args = parser.parse_args()
    global KEEP
    KEEP = args.keep
    if args.child:
        child(*args.child)
        return 0
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = soak(args.trials, args.backends.split(","), args.jobs, args.seed)
    torn = [r for r in results if r.problem]
    for r in torn:
        print(f"TORN: {r}")
    for backend in args.backends.split(","):
        for name in ("SIGINT", "SIGTERM"):
            mine = [r for r in results if r.backend == backend and r.signal == name]
            bad = sum(1 for r in mine if r.problem)
            modes = ", ".join(f"{m} {sum(r.mode == m for r in mine)}" for m in MODES)
            print(f"{backend} {name}: {len(mine)} trials ({modes}), {bad} torn")
    print(f"{len(results)} trials in {time.perf_counter() - start:.0f} s")
    return 1 if torn else 0


if __name__ == "__main__":
    raise SystemExit(main())
