"""The 2-process scenarios of tests/distributed, run by every rank of one launch.

``python -m torch.distributed.run --standalone --nproc-per-node=2 _scenarios.py all OUT`` (or a
comma-separated list of scenarios instead of ``all``; two processes started with torchrun's
environment and ``raise``, ``kill`` or ``alive`` for the failure launches) runs the scenarios
one after the other in one process group and writes what each rank saw
to ``OUT/rank<R>.json`` after every scenario; ``test_ddp.py`` starts the launches and asserts on
both ranks' results. A scenario that raises records its traceback and the launch goes on.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from aiolearner import (
    DDP,
    FSDP,
    Callback,
    CollectiveError,
    ConfigurationError,
    DistributedError,
    Learner,
    SkipBatch,
    StateView,
    StopEpoch,
    StopFit,
)
from aiolearner.callbacks import (
    AccumulateGradients,
    Checkpoint,
    EarlyStopping,
    LRSchedule,
    Metrics,
    Recorder,
    TimeLimit,
)

torch.set_num_threads(1)
RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
TIMEOUT = 30.0
Result = dict[str, Any]


# -- data, models, a raw DDP loop ------------------------------------------------------------------


def dataset(n: int = 96, *, seed: int = 0, tagged: bool = False) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    if tagged:
        x[:, 0] = torch.arange(n, dtype=torch.float32)  # the sample's index, readable in batches
    return TensorDataset(x, y)


def make_model(seed: int = 1, *, dropout: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(8, 32), torch.nn.ReLU()]
    if dropout:
        layers.append(torch.nn.Dropout(0.2))
    layers.append(torch.nn.Linear(32, 3))
    return torch.nn.Sequential(*layers)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def make_learner(
    *,
    model: torch.nn.Module | None = None,
    train: Any = None,
    val: Any = None,
    callbacks: tuple[Callback, ...] = (),
    strategy: Any = None,
    batch: int = 8,
    **options: Any,
) -> Learner[Any]:
    model = make_model() if model is None else model
    if train is None:
        train = DataLoader(dataset(), batch_size=batch, shuffle=True)
    return Learner(
        model,
        sgd(model),
        torch.nn.functional.cross_entropy,
        train,
        val,
        callbacks=list(callbacks),
        strategy=DDP(timeout=TIMEOUT) if strategy is None else strategy,
        **options,
    )


def raw_ddp(epochs: int, *, accumulate: int = 1) -> torch.nn.Module:
    """The hand-written DDP loop aiolearner must match bit for bit."""
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = sgd(model)
    data = dataset()
    sampler: DistributedSampler[Any] = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            last = (i + 1) % accumulate == 0
            with ddp.no_sync() if not last else _nothing():
                torch.nn.functional.cross_entropy(ddp(x), y).backward()  # type: ignore[no-untyped-call]
            if last:
                if accumulate > 1:
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    torch._foreach_mul_(grads, 1.0 / accumulate)
                opt.step()
                opt.zero_grad(set_to_none=True)
    return model


class _nothing:  # noqa: N801 - a context manager that does nothing
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def equal_across_ranks(model: torch.nn.Module) -> bool:
    mine = flat(model)
    out: list[Any] = [None] * WORLD
    dist.all_gather_object(out, mine)
    return all(torch.equal(mine, other) for other in out)


def run(fn: Callable[[], Awaitable[Any]], backend: str) -> Any:
    return anyio.run(fn, backend=backend)


class Steps(Callback):
    """Records the steps at which each training pass ended, and the indices it saw."""

    reads = frozenset({"step", "batch", "epoch"})

    def __init__(self) -> None:
        self.pass_ends: list[int] = []
        self.seen: dict[int, list[int]] = {}

    def after_fit_batch(self, state: StateView) -> None:
        x = state.batch[0]
        self.seen.setdefault(state.epoch, []).extend(int(v) for v in x[:, 0].tolist())

    def after_fit(self, state: StateView) -> None:
        self.pass_ends.append(state.step)


class RaiseAt(Callback):
    """Raises ``flow`` in ``hook`` at ``step`` on ``rank`` only."""

    reads = frozenset({"step"})

    def __init__(self, hook: str, step: int, rank: int, flow: Callable[[], BaseException]) -> None:
        self.hook = hook
        self.step = step
        self.rank = rank
        self.flow = flow
        self.fired = 0

    def hooks(self) -> Iterator[tuple[str, Any]]:
        yield self.hook, self._check

    def _check(self, state: StateView) -> None:
        if RANK == self.rank and state.step == self.step:
            self.fired += 1
            raise self.flow()


# -- scenarios -------------------------------------------------------------------------------------


CREATED: list[Any] = []


def ensure_group() -> None:
    if not dist.is_initialized():  # run alone (the launches start with "group")
        make_learner()


def s_group(backend: str) -> Result:
    """The first learner creates the group from torchrun's environment; the next reuses it."""
    assert not dist.is_initialized()
    first = make_learner()
    CREATED.append(first.strategy)
    second = make_learner()
    s1, s2 = first.strategy, second.strategy
    assert s1 is not None
    assert s2 is not None
    return {
        "created": s1.created_group,
        "reused": not s2.created_group,
        "rank": s1.rank,
        "world": s1.world_size,
        "describe": first.describe().splitlines()[-1],
    }


def s_raw_equal(backend: str) -> Result:
    ensure_group()
    raw = raw_ddp(2)
    out: Result = {}
    for compute, fetch in (("inline", "inline"), ("thread", "inline"), ("inline", "thread")):
        learner = make_learner(compute=compute, fetch=fetch)
        if fetch == "thread":
            compute = "producer"  # batches fetched ahead by a producer thread
        learner.fit_sync(2, backend=backend)  # type: ignore[arg-type]
        out[compute] = torch.equal(flat(raw), flat(learner.model))
        out[f"{compute}_hops"] = learner.compute_policy.hops
    # Within 1e-6 of one process on the combined batches (rank 0 computes it alone).
    if RANK == 0:
        single = make_model()
        opt = sgd(single)
        data = dataset()
        samplers: list[DistributedSampler[Any]] = [
            DistributedSampler(data, num_replicas=WORLD, rank=r, shuffle=True, seed=0)
            for r in range(WORLD)
        ]
        loaders = [DataLoader(data, batch_size=8, sampler=s) for s in samplers]
        for epoch in range(2):
            for s in samplers:
                s.set_epoch(epoch)
            for parts in zip(*loaders, strict=True):
                x = torch.cat([p[0] for p in parts])
                y = torch.cat([p[1] for p in parts])
                loss = torch.nn.functional.cross_entropy(single(x), y)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                opt.zero_grad(set_to_none=True)
        out["one_process_max_diff"] = float((flat(single) - flat(raw)).abs().max())
    return out


def s_shards(backend: str) -> Result:
    steps = Steps()
    learner = make_learner(
        train=DataLoader(dataset(tagged=True), batch_size=8, shuffle=True), callbacks=(steps,)
    )
    learner.fit_sync(2, backend=backend)  # type: ignore[arg-type]
    return {"seen": {str(k): v for k, v in steps.seen.items()}}


def s_stop_one_rank(backend: str) -> Result:
    steps = Steps()
    stop_epoch = RaiseAt("after_fit_batch", 2, 0, lambda: StopEpoch("rank-local end of epoch"))
    stop_fit = RaiseAt("after_fit_batch", 7, 1, lambda: StopFit("rank-local stop"))
    learner = make_learner(
        train=DataLoader(dataset(tagged=True), batch_size=8, shuffle=True),
        callbacks=(steps, stop_epoch, stop_fit),
        strategy=DDP(timeout=TIMEOUT, agree_every=4),
    )
    learner.fit_sync(3, backend=backend)  # type: ignore[arg-type]
    return {
        "step": learner.state.step,
        "epoch": learner.state.epoch,
        "pass_ends": steps.pass_ends,
        "reason": learner.state.stop_reason,
        "equal": equal_across_ranks(learner.model),
    }


def s_time_limit(backend: str) -> Result:
    ticks = [0.0]

    class Clock(Callback):
        reads = frozenset({"step"})

        def after_fit_batch(self, state: StateView) -> None:
            if RANK == 1 and state.step >= 3:
                ticks[0] = 1e6  # rank 1's clock runs out; rank 0's never does

    limit = TimeLimit(100.0, clock=lambda: ticks[0])
    learner = make_learner(callbacks=(Clock(), limit), strategy=DDP(timeout=TIMEOUT))
    learner.fit_sync(5, backend=backend)  # type: ignore[arg-type]
    return {"step": learner.state.step, "reason": learner.state.stop_reason}


def s_cancel(backend: str) -> Result:
    async def main() -> Result:
        scope = anyio.CancelScope()

        class CancelAt(Callback):
            reads = frozenset({"step"})

            def after_fit_batch(self, state: StateView) -> None:
                if RANK == 0 and state.step == 5:
                    scope.cancel()  # an outside cancellation, of rank 0 only

        learner = make_learner(
            callbacks=(CancelAt(),), strategy=DDP(timeout=TIMEOUT, agree_every=2)
        )
        with scope:
            await learner.fit(2)
        out: Result = {
            "cancelled": scope.cancelled_caught,
            "step": learner.state.step,
            "reason": learner.state.stop_reason if learner.state.is_valid("stop_reason") else None,
        }
        await learner.fit(2)  # continues exactly where every rank stopped
        whole = make_learner(strategy=DDP(timeout=TIMEOUT, agree_every=2))
        await whole.fit(2)
        out["continued_equal"] = torch.equal(flat(learner.model), flat(whole.model))

        # Rank 1 cancelled as a concurrent validation's pass begins (its reductions ahead):
        # the pass goes on on every rank, then the agreed stop; fit again finishes exactly.
        inside = anyio.CancelScope()

        class CancelInValidation(Callback):
            reads = frozenset({"epoch"})

            async def before_validate(self, state: StateView) -> None:
                if RANK == 1 and state.epoch == 0:
                    inside.cancel()
                await anyio.lowlevel.checkpoint()

        val = DataLoader(dataset(40, seed=5), batch_size=5)
        options: dict[str, Any] = {"val": val, "validate": "concurrent"}
        strategy = DDP(timeout=TIMEOUT, agree_every=2)
        cut = make_learner(callbacks=(CancelInValidation(),), strategy=strategy, **options)
        with inside:
            await cut.fit(3)
        out["in_validation_cancelled"] = inside.cancelled_caught
        await cut.fit(3)
        straight = make_learner(strategy=DDP(timeout=TIMEOUT, agree_every=2), **options)
        await straight.fit(3)
        out["in_validation_equal"] = torch.equal(flat(cut.model), flat(straight.model))
        out["in_validation_val_loss"] = [
            learner.state.metrics["val_loss"] for learner in (cut, straight)
        ]
        return out

    result: Result = run(main, backend)
    return result


def s_checkpoint(backend: str, directory: Path) -> Result:
    calls = {"writes": 0}
    original = Checkpoint._write_sync

    def counting(self: Checkpoint, *args: Any) -> None:
        calls["writes"] += 1
        original(self, *args)

    Checkpoint._write_sync = counting  # type: ignore[method-assign,assignment]

    def build(ckpt_dir: Path | None) -> Learner[Any]:
        model = make_model(dropout=True)
        torch.manual_seed(100 + RANK)  # every rank's random stream differs (dropout)
        callbacks: tuple[Callback, ...] = ()
        if ckpt_dir is not None:
            callbacks = (Checkpoint(ckpt_dir, every_n_steps=4, keep_periodic=None),)
        return make_learner(
            model=model,
            callbacks=callbacks,
            strategy=DDP(timeout=TIMEOUT, agree_every=3),
        )

    try:
        whole = build(None)
        whole.fit_sync(4, backend=backend)  # type: ignore[arg-type]
        first = build(directory)
        first.fit_sync(2, backend=backend)  # type: ignore[arg-type]
        out: Result = {"writes": calls["writes"]}
        dist.barrier()
        if RANK == 0:
            ckpt = torch.load(directory / "last.pt", weights_only=True)
            entries = ckpt["ranks"]["entries"]
            out["ranks_in_file"] = len(entries)
            out["rngs_differ"] = not torch.equal(
                entries[0]["rng"]["torch"], entries[1]["rng"]["torch"]
            )
        resumed = build(directory)
        resumed.fit_sync(4, resume="last", backend=backend)  # type: ignore[arg-type]
        out["resume_equal"] = torch.equal(flat(resumed.model), flat(whole.model))
        # Mid-epoch: step 16 is batch 4 of epoch 3 (6 batches an epoch), written by `resumed`.
        mid = build(None)
        mid.fit_sync(4, resume=directory / "step-00000016.pt", backend=backend)  # type: ignore[arg-type]
        out["mid_epoch_equal"] = torch.equal(flat(mid.model), flat(whole.model))
        return out
    finally:
        Checkpoint._write_sync = original  # type: ignore[method-assign]


def s_validation(backend: str) -> Result:
    val = dataset(101, seed=5)  # 101 samples: shards of 51 and 50, batches 6 and 5

    def build(mode: str) -> Learner[Any]:
        return make_learner(
            val=DataLoader(val, batch_size=10),
            callbacks=(Metrics(["accuracy"]),),
            validate=mode,
        )

    seq = build("sequential")
    seq.fit_sync(2, backend=backend)  # type: ignore[arg-type]
    conc = build("concurrent")
    conc.fit_sync(2, backend=backend)  # type: ignore[arg-type]
    out: Result = {
        "val_loss": seq.state.metrics["val_loss"],
        "val_accuracy": seq.state.metrics["val_accuracy"],
        "concurrent_val_loss": conc.state.metrics["val_loss"],
        "concurrent_val_accuracy": conc.state.metrics["val_accuracy"],
        "train_loss": seq.state.metrics["train_loss"],
    }
    if RANK == 0:  # one process over the whole set, with the same weights
        model = seq.model.eval()
        x, y = val.tensors
        with torch.no_grad():
            out_all = model(x)
        out["one_process_loss"] = float(torch.nn.functional.cross_entropy(out_all, y))
        out["one_process_accuracy"] = float((out_all.argmax(1) == y).float().mean())
    return out


def s_early_stop_concurrent(backend: str) -> Result:
    stop = EarlyStopping("val_loss", patience=1, min_delta=100.0)
    learner = make_learner(
        val=DataLoader(dataset(40, seed=3), batch_size=10),
        callbacks=(stop,),
        validate="concurrent",
        validate_every=3,
        compute="thread",
    )
    learner.fit_sync(6, backend=backend)  # type: ignore[arg-type]
    return {"step": learner.state.step, "reason": learner.state.stop_reason}


def s_best_concurrent(backend: str, directory: Path) -> Result:
    """Concurrent validation with a best file, an agreement every step (training's lane busy
    all the time): the best file is written from the validation's tail, on the epochs the
    tail judges best, without a collective; then a fresh learner resumes from it."""

    def learner() -> Learner[Any]:
        return make_learner(
            val=DataLoader(dataset(40, seed=3), batch_size=10),
            callbacks=(Checkpoint(directory, monitor="val_loss"),),
            validate="concurrent",
            strategy=DDP(timeout=TIMEOUT, agree_every=1),
        )

    first = learner()
    first.fit_sync(4, backend=backend)  # type: ignore[arg-type]
    out: Result = {"step": first.state.step, "best": len(list(directory.glob("best-*.pt")))}
    again = learner()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.fit_sync(5, resume="best", backend=backend)  # type: ignore[arg-type]
    out["resumed_step"] = again.state.step
    out["equal"] = equal_across_ranks(again.model)
    out["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    return out


def s_skips(backend: str) -> Result:
    skip = RaiseAt("before_gradient", 3, 1, lambda: SkipBatch("rank-local skip"))
    before = make_learner(callbacks=(skip,))
    before.fit_sync(1, backend=backend)  # type: ignore[arg-type]
    out: Result = {"before_equal": equal_across_ranks(before.model), "before_fired": skip.fired}
    late = RaiseAt("after_gradient", 3, 1, lambda: SkipBatch("rank-local skip after the gradient"))
    after = make_learner(callbacks=(late,), strategy=DDP(timeout=TIMEOUT, agree_every=2))
    try:
        after.fit_sync(1, backend=backend)  # type: ignore[arg-type]
        out["after"] = None
    except DistributedError as exc:
        out["after"] = {"message": str(exc), "peer": exc.peer, "step": exc.step}
    return out


def s_guard(backend: str) -> Result:
    class Reduces(Callback):
        def __init__(self, name: str) -> None:
            self._name = name

        @property
        def name(self) -> str:
            return self._name

        async def after_epoch(self, state: StateView) -> None:
            state.strategy.all_reduce(torch.ones(1))

    learner = make_learner(callbacks=(Reduces("A"), Reduces("B")))
    errors: list[CollectiveError] = []
    try:
        learner.fit_sync(1, backend=backend)  # type: ignore[arg-type]
    except* CollectiveError as group:
        errors = [e for e in group.exceptions if isinstance(e, CollectiveError)]
    return {
        "raised": [str(e) for e in errors],
        "callbacks": sorted(str(e.callback) for e in errors),
    }


def s_settings(backend: str) -> Result:
    """Ranks that make their learners differently: refused alike on every rank, at once."""
    seen: Result = {}
    cases: dict[str, Callable[[], Learner[Any]]] = {
        "agree_every": lambda: make_learner(strategy=DDP(timeout=TIMEOUT, agree_every=2 + RANK)),
        "model": lambda: make_learner(
            model=torch.nn.Sequential(
                torch.nn.Linear(8, 6 + 2 * RANK), torch.nn.Linear(6 + 2 * RANK, 3)
            )
        ),
        # A callback on one rank only; the same callbacks in another order.
        "callbacks": lambda: make_learner(
            callbacks=(Metrics(["accuracy"]),) + ((EarlyStopping("train_loss"),) if RANK else ())
        ),
        "order": lambda: make_learner(
            callbacks=(Metrics(["accuracy"]), Recorder())[:: 1 if RANK == 0 else -1]
        ),
        "batch size": lambda: make_learner(batch=8 if RANK == 0 else 4),
        "shuffle": lambda: make_learner(
            train=DataLoader(dataset(), batch_size=8, shuffle=RANK == 0)
        ),
    }
    for name, make in cases.items():
        start = time.perf_counter()
        try:
            make()
            seen[name] = None
        except ConfigurationError as exc:
            seen[name] = str(exc)
        seen[f"{name} seconds"] = time.perf_counter() - start
    learner = make_learner()  # the group is still good for the next learner
    learner.fit_sync(1, backend=backend)  # type: ignore[arg-type]
    seen["step after"] = learner.state.step
    model = make_model()
    given: Learner[Any] = Learner(  # callbacks as any iterable, as without a strategy
        model,
        sgd(model),
        torch.nn.functional.cross_entropy,
        DataLoader(dataset(), batch_size=8),
        callbacks=(c for c in [Metrics(["accuracy"])]),  # type: ignore[arg-type]
        strategy=DDP(timeout=TIMEOUT),
    )
    seen["callbacks from a generator"] = [type(c).__name__ for c in given.callbacks]
    return seen


def s_sigterm(backend: str) -> Result:
    class Kill(Callback):
        reads = frozenset({"step"})

        def after_fit_batch(self, state: StateView) -> None:
            # As torchrun forwards a preemption: to every rank, each at a different step.
            if state.step == (3 if RANK == 1 else 5):
                os.kill(os.getpid(), signal.SIGTERM)

    learner = make_learner(callbacks=(Kill(),), strategy=DDP(timeout=TIMEOUT, agree_every=2))
    # fit_sync handles SIGTERM itself: under a strategy, as a stop every rank agrees on.
    code = None
    try:
        learner.fit_sync(3, backend=backend)  # type: ignore[arg-type]
    except SystemExit as exc:
        code = exc.code
    return {"step": learner.state.step, "reason": learner.state.stop_reason, "code": code}


def s_uneven_data(backend: str) -> Result:
    data = dataset()
    x, y = data.tensors
    mine = 10 if RANK == 0 else 7
    batches = [(x[i * 8 : i * 8 + 8], y[i * 8 : i * 8 + 8]) for i in range(mine)]
    sized = make_learner(train=batches, strategy=DDP(timeout=TIMEOUT, shard_data=False))
    sized.fit_sync(2, backend=backend)  # type: ignore[arg-type]

    class Stream:
        """Batches without a length: 5 on rank 0, 3 on rank 1."""

        def __iter__(self) -> Iterator[Any]:
            yield from batches[: 5 if RANK == 0 else 3]

    unsized = make_learner(train=Stream(), strategy=DDP(timeout=TIMEOUT, shard_data=False))
    unsized.fit_sync(2, backend=backend)  # type: ignore[arg-type]
    return {
        "sized_step": sized.state.step,
        "sized_equal": equal_across_ranks(sized.model),
        "unsized_step": unsized.state.step,
        "unsized_equal": equal_across_ranks(unsized.model),
    }


def s_accumulate(backend: str) -> Result:
    raw = raw_ddp(2, accumulate=2)
    learner = make_learner(stages={"fit": AccumulateGradients(2)})
    learner.fit_sync(2, backend=backend)  # type: ignore[arg-type]
    return {"equal": torch.equal(flat(raw), flat(learner.model))}


def s_accumulate_skips(backend: str) -> Result:
    """A one-rank SkipBatch before the gradient inside an accumulation group, at its first and
    at its last micro-batch: the ranks stay paired (DDP's collectives) and equal."""
    out: Result = {}
    for where, step in (("first", 2), ("last", 3)):
        skip = RaiseAt("before_fit_batch", step, 1, lambda: SkipBatch("rank-local skip"))
        learner = make_learner(callbacks=(skip,), stages={"fit": AccumulateGradients(2)})
        learner.fit_sync(1, backend=backend)  # type: ignore[arg-type]
        out[where] = {"equal": equal_across_ranks(learner.model), "step": learner.state.step}
    return out


def s_fsdp(backend: str, directory: Path) -> Result:
    val = DataLoader(dataset(101, seed=5), batch_size=10)
    ddp = make_learner(val=val)
    ddp.fit_sync(2, backend=backend)  # type: ignore[arg-type]
    full = flat(ddp.model)

    def build(ckpt: bool) -> Learner[Any]:
        model = make_model()
        return make_learner(
            model=model,
            val=val,
            callbacks=(Checkpoint(directory),) if ckpt else (),
            strategy=FSDP(timeout=TIMEOUT, wrap=(torch.nn.Linear,)),
        )

    fsdp = build(True)
    fsdp.fit_sync(1, backend=backend)  # type: ignore[arg-type]
    fsdp.fit_sync(2, backend=backend)  # type: ignore[arg-type]
    gathered = torch.cat([p.full_tensor().reshape(-1) for p in fsdp.model.parameters()])  # type: ignore[attr-defined]
    resumed = build(False)
    resumed.fit_sync(2, resume=directory / "epoch-0001.pt", backend=backend)  # type: ignore[arg-type]
    again = torch.cat([p.full_tensor().reshape(-1) for p in resumed.model.parameters()])  # type: ignore[attr-defined]
    # Accumulation under FSDP, stopped inside a group: FSDP holds the group's gradients in its
    # own buffers, so a checkpoint taken there cannot hold them, and says so.
    acc = AccumulateGradients(3)
    grouped = make_learner(
        model=make_model(),
        val=val,
        callbacks=(acc.checkpoint_callback(), RaiseAt("after_fit_batch", 2, 1, StopFit)),
        stages={"fit": acc},
        strategy=FSDP(timeout=TIMEOUT, wrap=(torch.nn.Linear,)),
    )
    grouped.fit_sync(1, backend=backend)  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grouped.state_dict()

    # Plain SGD (no optimizer state at all) and a schedule made at fit start (it adds
    # `initial_lr` to the groups a fresh optimizer lacks): resumed exactly all the same.
    def plain(ckpt: bool) -> Learner[Any]:
        model = make_model()
        schedule = LRSchedule(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
        return Learner(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.nn.functional.cross_entropy,
            DataLoader(dataset(), batch_size=8, shuffle=True),
            callbacks=[schedule, *([Checkpoint(directory / "plain")] if ckpt else [])],
            strategy=FSDP(timeout=TIMEOUT, wrap=(torch.nn.Linear,)),
        )

    # A checkpoint without optimizer state (taken before the first step) loaded into a learner
    # whose optimizer has some: the state is dropped, as Optimizer.load_state_dict does.
    model = make_model()
    adam: Learner[Any] = Learner(
        model,
        torch.optim.Adam(model.parameters(), lr=0.01),
        torch.nn.functional.cross_entropy,
        DataLoader(dataset(), batch_size=8, shuffle=True),
        strategy=FSDP(timeout=TIMEOUT, wrap=(torch.nn.Linear,)),
    )
    start = adam.state_dict()  # (a collective: the full state on rank 0)
    if RANK == 0:
        torch.save(start, directory / "adam-start.pt")
    dist.barrier()
    adam.fit_sync(1, backend=backend)  # type: ignore[arg-type]
    adam.load_checkpoint(directory / "adam-start.pt")
    stale = len(adam.optimizer.state)

    straight = plain(True)
    straight.fit_sync(2, backend=backend)  # type: ignore[arg-type]
    plain_resumed = plain(False)
    plain_resumed.fit_sync(2, resume=directory / "plain" / "epoch-0001.pt", backend=backend)  # type: ignore[arg-type]
    # Into an optimizer of other parameter groups: refused, as Optimizer.load_state_dict does.
    model = make_model()
    layers = list(model.children())
    groups = [{"params": layers[0].parameters()}, {"params": layers[-1].parameters()}]
    split: Learner[Any] = Learner(
        model,
        torch.optim.SGD(groups, lr=0.1),
        torch.nn.functional.cross_entropy,
        DataLoader(dataset(), batch_size=8),
        strategy=FSDP(timeout=TIMEOUT, wrap=(torch.nn.Linear,)),
    )
    try:
        split.load_checkpoint(directory / "plain" / "epoch-0001.pt")
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    plain_diff = max(
        float((a.full_tensor() - b.full_tensor()).abs().max())  # type: ignore[attr-defined]
        for a, b in zip(straight.model.parameters(), plain_resumed.model.parameters(), strict=True)
    )
    return {
        "plain_resume_max_diff": plain_diff,
        "stale_optimizer_state": stale,
        "other_groups_refused": refused,
        "plain_lr": (
            straight.optimizer.param_groups[0]["lr"],
            plain_resumed.optimizer.param_groups[0]["lr"],
        ),
        "max_diff_vs_ddp": float((gathered - full).abs().max()),
        "val_loss_diff": abs(fsdp.state.metrics["val_loss"] - ddp.state.metrics["val_loss"]),
        "resume_max_diff": float((again - gathered).abs().max()),
        "mid_group_step": grouped.state.step,
        "mid_group_warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
    }


def s_docs(backend: str, directory: Path) -> Result:
    """Every python block of docs/distributed.md, in order, on both ranks (the page's blocks
    that need torchrun are marked not-run for tests/test_docs_code.py and run here)."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("docs_code", root / "tests" / "test_docs_code.py")
    assert spec is not None
    assert spec.loader is not None
    docs_code = importlib.util.module_from_spec(spec)
    sys.modules["docs_code"] = docs_code  # dataclasses look their module up there
    spec.loader.exec_module(docs_code)
    namespace: dict[str, Any] = {"__name__": "docs.distributed"}
    previous = signal.getsignal(signal.SIGTERM)
    cwd = Path.cwd()
    os.chdir(directory)
    ran = 0
    try:
        for block in docs_code.blocks(root / "docs" / "distributed.md"):
            if block.lang == "python":
                docs_code.run_block(block, namespace, backend)
                ran += 1
    finally:
        os.chdir(cwd)
        signal.signal(signal.SIGTERM, previous)
    learner = namespace["learner"]
    samples = namespace.get("GlobalSamples")
    return {"blocks": ran, "epoch": learner.state.epoch, "has_callback": samples is not None}


def s_example(backend: str, directory: Path) -> Result:
    """examples/distributed/digits_ddp.py, two epochs, then resumed for a third."""
    from examples.distributed import digits_ddp

    first = digits_ddp.train(2, directory=directory, backend=backend)
    again = digits_ddp.train(3, directory=directory, resume=True, backend=backend)
    return {"accuracy": float(first["accuracy"]), "resumed_accuracy": float(again["accuracy"])}


# -- failures (each its own launch: the group does not survive them) -------------------------------


class _FailInTeardown(Callback):
    """Calls ``fail`` in ``after_fit_run`` on rank 1: the other rank is then waiting in the
    run's last agreement, a collective it gives up on when rank 1 reports."""

    def __init__(self, fail: Callable[[], None]) -> None:
        self.fail = fail

    def after_fit_run(self, state: Any) -> None:
        if RANK == 1:
            self.fail()


def _failing_learner(fail: Callable[[], None], *, teardown: bool = False) -> Learner[Any]:
    calls = [0]

    def loss_fn(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if RANK == 1 and calls[0] == 6 and not teardown:
            fail()  # an error in a stage body (the loss), on rank 1 only, at step 5
        return torch.nn.functional.cross_entropy(output, targets)

    model = make_model()
    return Learner(
        model,
        sgd(model),
        loss_fn,
        DataLoader(dataset(), batch_size=8, shuffle=True),
        callbacks=[_FailInTeardown(fail)] if teardown else [],
        strategy=DDP(timeout=FAIL_TIMEOUT),
    )


FAIL_TIMEOUT = 4.0


def failure(kind: str, out: Path) -> int:
    record: Result = {"rank": RANK, "kind": kind}

    def save() -> None:
        (out / f"rank{RANK}.json").write_text(json.dumps(record))

    def fail() -> None:
        record["failed_at"] = time.time()
        save()
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("boom on rank 1")

    # The group first, with a store that waits long for the other process to start (on a busy
    # machine that can take longer than the short collective timeout these scenarios test).
    store = dist.TCPStore(  # type: ignore[attr-defined]
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        WORLD,
        RANK == 0,
        timeout=timedelta(seconds=60),
    )
    dist.init_process_group(
        "gloo", store=store, rank=RANK, world_size=WORLD, timeout=timedelta(seconds=FAIL_TIMEOUT)
    )
    learner = _failing_learner(fail, teardown=kind == "teardown")
    try:
        learner.fit_sync(2 if kind == "teardown" else 50)
        record["error"] = None
    except BaseException as exc:
        record["raised_at"] = time.time()
        record["error"] = type(exc).__name__
        record["message"] = str(exc)
        record["peer"] = getattr(exc, "peer", None)
        save()
        if kind == "alive" and RANK == 1:
            time.sleep(60)  # the process lives on (the test ends it once rank 0 has reported)
        if kind == "teardown" and RANK == 1:
            time.sleep(0.5)  # exits after the other rank has begun its own exit
        return 1
    save()
    return 0


# -- the launches ----------------------------------------------------------------------------------


#: The scenarios of the main launch, in order; ``name@trio`` runs one under trio (the others run
#: under asyncio). One launch: starting processes costs seconds, a scenario a fraction of one.
SCENARIOS = [
    "group",
    "raw_equal",
    "raw_equal@trio",
    "shards",
    "stop_one_rank",
    "stop_one_rank@trio",
    "time_limit",
    "cancel",
    "cancel@trio",
    "checkpoint",
    "validation",
    "early_stop_concurrent",
    "early_stop_concurrent@trio",
    "best_concurrent",
    "skips",
    "guard",
    "settings",
    "sigterm",
    "uneven_data",
    "accumulate",
    "accumulate_skips",
    "fsdp",
    "docs",
    "example",
]


def main() -> int:
    launch, out = sys.argv[1], Path(sys.argv[2])
    if launch in ("raise", "kill", "alive", "teardown"):
        return failure(launch, out)
    names = SCENARIOS if launch == "all" else launch.split(",")
    results: Result = {}
    path = out / f"rank{RANK}.json"
    for index, entry in enumerate(names):
        name, _, backend = entry.partition("@")
        backend = backend or "asyncio"
        fn = globals()[f"s_{name}"]
        key = entry if entry not in results else f"{entry}#{index}"  # hunting a flake: twice
        start = time.perf_counter()
        try:
            if fn in (s_checkpoint, s_fsdp, s_docs, s_example, s_best_concurrent):
                directory = out / key
                directory.mkdir(exist_ok=True)
                results[key] = fn(backend, directory)
            else:
                results[key] = fn(backend)
        except BaseException:
            results[key] = {"traceback": traceback.format_exc()}
        results[key]["seconds"] = round(time.perf_counter() - start, 2)
        path.write_text(json.dumps(results, default=str))
    for strategy in CREATED:
        strategy.close()  # the strategy that created the group destroys it
    results["closed"] = {"created": bool(CREATED), "initialized": dist.is_initialized()}
    path.write_text(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
