"""Where a framework's overhead on a real near-null step goes: its own work between the steps, and
the torch calls of the step itself running slower.

Run::

    .venv/bin/python -m bench.step_phases             # needs the `bench` extra for Ignite
    .venv/bin/python -m bench.step_phases --reps 41

The step of ``bench/overhead.py``'s null row (one Linear 4->2, batch 2, SGD) with its model, loss
function and optimizer instrumented the same way in every variant: a clock read as the model's
``forward`` starts, as the loss function returns, as the optimizer's ``step`` starts and as its
``zero_grad`` returns. That splits every step into four phases:

- **forward**: the model and the loss;
- **backward**: from the loss to the optimizer's step (``loss.backward()``, and what the loop
  runs between the two);
- **optimizer**: ``step`` and ``zero_grad``;
- **between**: from the end of one step to the next step's forward: the loop itself (taking the
  batch, its events or bookkeeping) and the call into the step.

Variants: the raw loop; the raw loop keeping every step's detached loss for the epoch's mean (as
aiolearner does for ``train_loss``); aiolearner with default settings on asyncio and on trio;
Ignite's bare ``Engine(process_function)``. For each phase, the median over the timed steps of a
run, then the median over repetitions of its difference with the raw loop's run of the same
repetition (the variants run interleaved, in a rotated order). Every variant's final model must
give bit for bit the raw loop's loss; the script exits with status 1 otherwise.

A framework whose own work took ``w`` microseconds between the steps and left torch's calls alone
would show ``+w`` in "between" and zeros elsewhere; the "forward", "backward" and "optimizer"
columns are what the Python run between the steps costs the torch calls around it.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

from aiolearner import Learner
from bench._common import Batch, machine, make_data, make_mlp, median, raw_step, table

PHASES = ("forward", "backward", "optimizer", "between")
#: The marks of one step, in order (see ``Marks``).
MARKS = ("forward", "loss", "step", "zero_grad")


class Marks:
    """``perf_counter_ns()`` readings of the four marks of every step, in order."""

    def __init__(self) -> None:
        self.times: list[int] = []

    def phases(self, skip: int) -> dict[str, float]:
        """The median of each phase in nanoseconds over the steps, ``skip`` left out at each end."""
        t = self.times
        k = len(MARKS)
        if len(t) % k:
            raise RuntimeError(f"{len(t)} marks is not a whole number of steps")
        steps = len(t) // k
        out: dict[str, list[int]] = {phase: [] for phase in PHASES}
        for i in range(skip, steps - skip):
            forward, loss, step, zero_grad = t[i * k : i * k + k]
            out["forward"].append(loss - forward)
            out["backward"].append(step - loss)
            out["optimizer"].append(zero_grad - step)
            out["between"].append(t[i * k + k] - zero_grad)
        return {phase: median(values) for phase, values in out.items()}


class Marked(torch.nn.Module):
    """The model, marking the start of its forward."""

    def __init__(self, inner: torch.nn.Module, marks: Marks) -> None:
        super().__init__()
        self.inner = inner
        self._mark = marks.times.append
        self._clock = time.perf_counter_ns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._mark(self._clock())
        return self.inner(x)  # type: ignore[no-any-return]


class MarkedSGD(torch.optim.SGD):
    """SGD marking the start of ``step`` and the end of ``zero_grad``."""

    def __init__(self, params: Any, marks: Marks) -> None:
        super().__init__(params, lr=0.01)
        self._mark = marks.times.append
        self._clock = time.perf_counter_ns

    def step(self, closure: Any = None) -> Any:
        self._mark(self._clock())
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._mark(self._clock())


def marked_loss(marks: Marks) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    mark = marks.times.append
    clock = time.perf_counter_ns
    cross_entropy = torch.nn.functional.cross_entropy

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(output, target)
        mark(clock())
        return loss

    return loss_fn


Parts = tuple[Marked, MarkedSGD, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
Runner = Callable[[Parts, list[Batch]], None]


def run_raw(parts: Parts, data: list[Batch]) -> None:
    model, optimizer, loss_fn = parts
    model.train()
    for x, y in data:
        raw_step(model, optimizer, loss_fn, x, y)


def run_raw_keeping_losses(parts: Parts, data: list[Batch]) -> None:
    model, optimizer, loss_fn = parts
    model.train()
    losses = []
    for x, y in data:
        losses.append(raw_step(model, optimizer, loss_fn, x, y).detach())
    with torch.no_grad():
        torch.stack(losses).mean()


def aiolearner_runner(backend: Literal["asyncio", "trio"]) -> Runner:
    def run(parts: Parts, data: list[Batch]) -> None:
        model, optimizer, loss_fn = parts
        learner: Learner[Batch] = Learner(model, optimizer, loss_fn, data)
        learner.fit_sync(1, backend=backend)

    return run


def run_ignite_bare(parts: Parts, data: list[Batch]) -> None:
    from ignite.engine import Engine

    model, optimizer, loss_fn = parts
    model.train()

    def process(engine: Any, batch: Batch) -> float:
        raw_step(model, optimizer, loss_fn, batch[0], batch[1])
        return 0.0

    Engine(process).run(data, max_epochs=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=25)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    variants: dict[str, Runner] = {
        "raw loop": run_raw,
        "raw loop keeping the losses": run_raw_keeping_losses,
        "aiolearner auto (default)": aiolearner_runner("asyncio"),
        "aiolearner auto, trio": aiolearner_runner("trio"),
        "Ignite bare Engine": run_ignite_bare,
    }
    data = make_data(args.steps, 2, 4, 2, seed=1)
    probe = make_data(1, 2, 4, 2, seed=2)[0]
    skip = max(2, args.steps // 10)
    phases: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    losses: dict[str, torch.Tensor] = {}
    order = list(variants.items())
    for rep in range(args.reps):
        for name, run in order[rep % len(order) :] + order[: rep % len(order)]:
            marks = Marks()
            inner = make_mlp([4, 2], seed=0)
            model = Marked(inner, marks)
            run((model, MarkedSGD(model.parameters(), marks), marked_loss(marks)), data)
            phases[name].append(marks.phases(skip))
            with torch.no_grad():
                losses[name] = torch.nn.functional.cross_entropy(inner(probe[0]), probe[1])

    raw = phases["raw loop"]
    rows = [["raw loop", *(f"{median([r[p] for r in raw]) / 1e3:.2f}" for p in PHASES), ""]]
    failed = False
    for name, runs in phases.items():
        if name == "raw loop":
            continue
        diffs = [
            median([run[p] - base[p] for run, base in zip(runs, raw, strict=True)]) / 1e3
            for p in PHASES
        ]
        same = torch.equal(losses[name], losses["raw loop"])
        failed |= not same
        label = name if same else f"{name} (final loss DIFFERS)"
        rows.append([label, *(f"{d:+.2f}" for d in diffs), f"{sum(diffs):+.2f}"])
    print(f"machine: {machine()}")
    print(
        f"null step (Linear 4->2, batch 2): {args.steps} steps (phases of {args.steps - 2 * skip} "
        f"timed), {args.reps} interleaved repetitions; the raw loop's phases in us, the others' "
        "as the median difference with it"
    )
    print(table(["variant", *PHASES, "sum"], rows))
    if failed:
        print("\nFAILED: a final loss differs from the raw loop's")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
