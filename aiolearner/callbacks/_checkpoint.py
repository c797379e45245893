"""Checkpointing: the last state, the best by a metric (top-k), and every N steps or epochs.

Where checkpoints are taken, and why there. A checkpoint must let ``fit(resume=...)`` continue
exactly, so it is only taken where the learner's state is *between* units of work:

* at the start of an epoch (``before_epoch``, when no batch of it has run yet): the previous
  epoch, its validation and every ``after_epoch`` callback are done. Epoch-periodic and best
  checkpoints are taken here. Taking them in ``after_epoch`` instead would make a resumed run
  validate again and run ``after_epoch`` twice (an early-stopping counter would count twice).
  The best is *judged* in ``after_epoch``, on the epoch's record (its validation results
  included), and written at that boundary. With concurrent validation an epoch's
  ``after_epoch`` runs on a snapshot while the next epoch trains: the best file is then written
  at once, with the snapshot's weights (the ones validated) and counters;
* before a training batch (``before_fit_batch``), for step-periodic checkpoints: the previous
  batch is finished and counted, the next one has not touched weights or the RNG;
* when the run ends (``after_fit_run``): completed, stopped, failed or cancelled. The core runs
  this hook shielded, with the learner's ``teardown_timeout``, after an error or a cancellation.

Writes never block the event loop: the state is copied (tensors cloned to the CPU) while the
weights cannot change, and the copy is serialized and written in a worker thread, in the
learner's background task group (joined before ``fit`` returns). The final checkpoint is
awaited by ``after_fit_run`` itself. Each file is written atomically: a temporary file in the same
directory, ``fsync``, ``os.replace``, then ``fsync`` of the directory, so a crash leaves the old
file or the new one, never a torn one.

Weights-only files (``save_weights_only=True``, and every ``format="safetensors"`` file) hold the
model's ``state_dict`` alone, with the keys of the uncompiled model (``torch.compile``'s
``_orig_mod.`` segments dropped), so that plain PyTorch code loads them; they cannot resume a run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import anyio
import torch

from aiolearner import Callback, StateView, plain_state_dict

from ._args import optional_named, optional_whole, refuse_silent_checkpoint, usable_directory, whole
from ._distributed import is_rank_zero
from ._files import (
    SAFETENSORS_USER,
    SUFFIXES,
    NamedPlan,
    atomic_write_file,
    best_from_state,
    check_directory,
    check_name,
    copy_into,
    load_weights,
    plan_from_portable,
    plan_to_portable,
    read_weights,
    remove_stray_temporaries,
    save_safetensors,
    snapshot,
)
from ._files import atomic_write as atomic_write  # re-exported: a test watches the writes here
from ._loggers import ExperimentLogger
from ._optional import require

__all__ = ["Checkpoint", "snapshot"]


class Checkpoint(Callback):
    """Save checkpoints: the last one, the best by a metric (top-k), and every N steps/epochs.

    Each file holds :meth:`Learner.state_dict() <aiolearner.Learner.state_dict>`: weights,
    optimizer, epoch/step counters and position in the epoch, the RNG states of torch, numpy and
    ``random``, and every callback's ``state_dict()`` (schedulers, scalers, EMA weights, early
    stopping, this callback's own list of best files). ``fit(epochs, resume="last")`` continues
    from ``last.pt`` in this or a fresh process; ``fit(epochs, resume=path)`` from any file.
    Files are read back with ``torch.load(weights_only=True)`` only.

    Files in ``directory`` (the counters are those at save time: ``epoch`` is the number of
    completed epochs, so ``epoch-0003.pt`` is saved after the third epoch):

    * ``last.pt``: rewritten at every save and when the run ends (also after an error or a
      cancellation);
    * ``epoch-EEEE.pt`` every ``every_n_epochs`` epochs and ``step-SSSSSSSS.pt`` every
      ``every_n_steps`` steps (the newest ``keep_periodic`` of them, or all; with
      ``keep_periodic=0`` none: those save points then only refresh ``last.pt``);
    * ``best-epoch-EEEE-step-SSSSSSSS.pt``: the ``top_k`` best by ``state.metrics[monitor]``,
      judged once per epoch, in ``after_epoch`` (see :attr:`best`). With
      ``validate="concurrent"`` such a file holds the validated snapshot's weights, counters
      and metrics, while its optimizer, random and callback states are those of when it was
      written (training has gone on): load its weights (``load_best``, ``load_weights``);
      continue a run exactly from ``last.pt`` or a periodic file.

    Each file is written to a temporary file next to it first (``.last.pt.<hex>.tmp``), then
    renamed; temporary files a crashed or killed writer left are removed when the next run
    starts (``before_fit_run``).

    With ``format="safetensors"`` the files end in ``.safetensors`` instead of ``.pt``.

    Args:
        directory: where the files go (created when needed; ``~`` is expanded).
        every_n_steps: also save before every N-th training step (``None``: never).
        every_n_epochs: save at the end of every N-th epoch (``None`` or 0: never).
        monitor: a key of ``state.metrics`` to keep the best checkpoints by (``None``: no best).
        mode: ``"min"`` when lower is better, ``"max"`` when higher is.
        top_k: how many best checkpoints to keep (above 1, it needs ``monitor``).
        save_last: keep ``last.pt`` up to date.
        keep_periodic: how many epoch/step-periodic files to keep (``None``: all; 0: none).
        save_weights_only: write the model's weights alone (keys of the uncompiled model): files
            for inference or export, which ``fit(resume=...)`` cannot continue from.
        format: ``"torch"`` (``torch.save``) or ``"safetensors"`` (the ``safetensors`` package;
            weights only, so it needs ``save_weights_only=True``).
        load_best: when the run ends normally (completed, or stopped by ``StopFit`` such as
            early stopping), load the best checkpoint's weights into the model. Only the
            weights: the optimizer state, the counters, ``state.metrics`` and the callbacks'
            states stay those of the end of the run, and ``last.pt`` keeps the final weights.
            Not after an error or a cancellation, so that calling ``fit`` again continues
            exactly where the run stopped.

    Raises:
        ValueError: bad arguments (one of the wrong type raises a ``TypeError`` that is also a
            ``ValueError``), settings that would write no file, or a ``directory`` that is a
            file or where no file can be written.

    Reads ``model``, ``epoch``, ``step``, ``batch_index``, ``metrics`` and ``outcome``; writes
    nothing (``load_best`` changes the model's weights under the weights lock's write side).

    Example:
        >>> ckpt = Checkpoint("runs/ckpt", every_n_epochs=1, monitor="val_loss", top_k=3)
        >>> learner = Learner(model, opt, loss_fn, train, val, callbacks=[ckpt])
        >>> await learner.fit(10)
        >>> # later, in a new process, with the learner built the same way:
        >>> await learner.fit(20, resume="last")     # continues where the run stopped
        >>> ckpt.best_path                            # the best file by val_loss
    """

    reads = frozenset({"model", "epoch", "step", "batch_index", "metrics", "outcome"})
    _writes_into = property(lambda self: self.directory)  # one Checkpoint a directory
    _monitored = property(lambda self: self.monitor)  # a name nothing writes: refused at start
    # The loggers first, on the hooks both have: in after_fit_run their final flush opens the
    # backend's run and writes the buffered rows, so the final file holds the run's id and no
    # rows still to write (a resumed run continues that run instead of writing them again).
    after = (ExperimentLogger,)
    # Under a distributed strategy a save point gathers every rank's state (a collective).
    collectives = True

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        top_k: int = 1,
        save_last: bool = True,
        keep_periodic: int | None = None,
        save_weights_only: bool = False,
        format: Literal["torch", "safetensors"] = "torch",
        load_best: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"Checkpoint: mode must be 'min' or 'max', got {mode!r}")
        every_n_steps = optional_whole("Checkpoint", "every_n_steps", every_n_steps, 1)
        every_n_epochs = optional_whole("Checkpoint", "every_n_epochs", every_n_epochs, 0)
        top_k = whole("Checkpoint", "top_k", top_k, 1)
        keep_periodic = optional_whole("Checkpoint", "keep_periodic", keep_periodic, 0)
        monitor = optional_named("Checkpoint", "monitor", monitor, "'val_loss'")
        refuse_silent_checkpoint(save_last, monitor, every_n_steps, every_n_epochs, keep_periodic)
        if format not in SUFFIXES:
            raise ValueError(f"format must be 'torch' or 'safetensors', got {format!r}")
        if format == "safetensors" and not save_weights_only:
            raise ValueError(
                "Checkpoint(format='safetensors') writes weights only (safetensors files hold"
                " tensors, not optimizer states, counters or RNG states): pass"
                " save_weights_only=True, or use format='torch' for resumable checkpoints"
            )
        if monitor is None and (load_best or top_k > 1):
            what = "load_best=True" if load_best else f"top_k={top_k}"
            raise ValueError(f"Checkpoint({what}) needs a monitor= metric to judge by")
        if format == "safetensors":
            # Fail at construction, not at the first save halfway through training.
            require("safetensors.torch", extra="safetensors", what=SAFETENSORS_USER)
        # Here rather than at the first save, halfway through training ('~' expanded).
        self.directory = usable_directory(directory, "Checkpoint", probe=False)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs or None
        self.monitor = monitor
        self.mode = mode
        self.top_k = top_k
        self.save_last = save_last
        self.keep_periodic = keep_periodic
        self.save_weights_only = save_weights_only
        self.format = format
        self.load_best = load_best
        self.suffix = SUFFIXES[format]
        self._last_name = "last" + self.suffix
        #: The path whose weights ``load_best`` loaded at the end of the last run, or ``None``.
        self.loaded_best: Path | None = None
        #: The best checkpoints so far, best first: ``{"name", "score", "epoch", "step"}``.
        self.best: list[dict[str, Any]] = []
        self._periodic: list[str] = []
        self._boundary: tuple[int, int] | None = None
        # The last epoch judged (completed epochs, step), and a best file judged in the training
        # loop's after_epoch that the next boundary writes: ((epoch, step), name, dropped).
        self._judged: tuple[int, int] | None = None
        self._planned: tuple[tuple[int, int], str | None, list[str]] | None = None
        # A best file judged on a concurrent validation's snapshot and not yet queued for
        # writing: the after_epoch a cancellation cut short writes it when it runs again.
        self._unqueued: NamedPlan | None = None
        #: Names dropped from the lists (top-k, keep_periodic) whose files are not removed yet.
        self._removing: list[str] = []
        self._live: torch.nn.Module | None = None
        self._last_step_saved: int | None = None
        self._last_saved: tuple[int, int] | None = None
        self._lock: anyio.Lock | None = None
        # Whether this run's before_fit_run prepared the directory.
        self._ready = False
        # A boundary save point that was planned but never snapshotted (cancelled while taking
        # the snapshot), with its (epoch, step): after_fit_run saves it, so it is not lost.
        self._unsaved: tuple[tuple[int, int], tuple[list[str], list[str]]] | None = None
        # Snapshots waiting to be written, oldest first. A write task may be cancelled before it
        # runs (the run is cancelled right after a save point): the snapshot then stays here and
        # after_fit_run, which runs shielded, writes it before the final one.
        self._queue: deque[tuple[dict[str, Any], list[str], list[str], dict[str, str]]] = deque()
        # Whether this process writes the files: rank 0 under a distributed strategy.
        self._writer = True

    # -- where files are -----------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The path of checkpoint file ``name`` (a plain file name inside :attr:`directory`)."""
        return self.directory / check_name(name)

    @property
    def last_path(self) -> Path:
        """``directory / "last.pt"`` (``last.safetensors`` with that format)."""
        return self.path(self._last_name)

    @property
    def best_path(self) -> Path | None:
        """The best checkpoint by ``monitor`` so far, or ``None``."""
        return self.path(self.best[0]["name"]) if self.best else None

    def find_checkpoint(self, which: str) -> Path | None:
        """The file for ``fit(resume=which)``: ``"last"`` or ``"best"``; ``None`` if none.

        Always ``None`` with ``save_weights_only``: weights alone cannot resume a run (another
        ``Checkpoint`` of the learner may have a resumable file)."""
        if which not in ("last", "best"):
            raise ValueError(f"which must be 'last' or 'best', got {which!r}")
        if self.save_weights_only:
            return None
        if which == "last":
            path = self.last_path
        elif which == "best":
            found = self.best_path
            if found is None:
                return None
            path = found
        return path if path.is_file() else None

    # -- hooks ---------------------------------------------------------------------------------

    def _needs_val_data(self) -> str | None:
        # Asked by fit on a learner without val_data: a validation metric would never come.
        if self.monitor is None or not self.monitor.startswith(("val_", "test_")):
            return None
        return f"keeps the best checkpoints by {self.monitor!r}, a validation metric"

    def hooks(self) -> Iterator[tuple[str, Callable[[StateView], Any]]]:
        # Without every_n_steps, no per-batch hook at all: a hook nobody uses costs nothing;
        # without a monitor, no after_epoch.
        for hook, method in super().hooks():
            if hook == "before_fit_batch" and self.every_n_steps is None:
                continue
            if hook == "after_epoch" and self.monitor is None:
                continue
            yield hook, method

    async def before_fit_run(self, state: StateView) -> None:
        """Get ready to write (one write at a time, in order): create the directory, and remove
        the temporary files of a writer that crashed (a process killed while it saved)."""
        # A fresh lock per run: fit may run under another event loop next time.
        self._lock = anyio.Lock()
        self._writer = is_rank_zero()
        self._live = state.model
        self._ready = False
        if self.every_n_steps is not None:  # the random state before those steps' draws
            state.save_points(self.every_n_steps)
        if self._writer:  # (another rank's cleaning could remove a file rank 0 is writing)
            await anyio.to_thread.run_sync(self._prepare_directory)
        self._ready = True

    def _prepare_directory(self) -> None:
        self._make_directory()
        remove_stray_temporaries(self.directory)
        # Files a write had dropped from its lists when the process was killed before it
        # removed them (the checkpoint it wrote names them).
        kept = {e["name"] for e in self.best} | set(self._periodic) | {self._last_name}
        for name in self._removing:
            if name not in kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(name))
        self._removing = []

    def _make_directory(self) -> None:
        check_directory(self.directory, "Checkpoint")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # What the checks at construction cannot foresee (a file system that refuses it).
            raise ValueError(
                f"Checkpoint: cannot create directory {str(self.directory)!r}: {exc.strerror}"
            ) from exc

    async def after_epoch(self, state: StateView) -> None:
        """Judge the epoch by ``monitor``, with its record (validation results included).

        In the training loop the best file is written at the boundary that follows; on a
        concurrent validation's snapshot (another model than the trained one), at once.
        """
        epoch, step = state.epoch + 1, state.step  # the epoch counts as complete in the file
        on_snapshot = not (self._live is None or state.model is self._live)
        if self._judged is not None and self._judged >= (epoch, step):
            # Judged already (the run was resumed from before this point); a best file judged
            # on this snapshot whose copy a cancellation interrupted is written now.
            unqueued = self._unqueued
            if on_snapshot and unqueued is not None and unqueued[0] == (epoch, step):
                names = [] if unqueued[1] is None else [unqueued[1]]
                await self._save(state, (names, unqueued[2]), wait=False)
                self._unqueued = None
            return
        self._judged = (epoch, step)
        best_name, dropped = self._judge(state, epoch, step)
        if not on_snapshot:
            if best_name is not None or dropped:
                if self._planned is not None and self._planned[0] == (epoch, step):
                    dropped = [*self._planned[2], *dropped]
                self._planned = ((epoch, step), best_name, dropped)
            return
        if best_name is not None:  # (files are dropped only for a new best)
            self._unqueued = ((epoch, step), best_name, dropped)
            await self._save(state, ([best_name], dropped), wait=False)
            self._unqueued = None

    async def before_epoch(self, state: StateView) -> None:
        """At an epoch boundary: save epoch-periodic and best checkpoints, and ``last.pt``."""
        if state.batch_index != 0 or state.epoch == 0:
            return  # the start of training, or resuming inside an epoch
        plan = self._plan_boundary(state)
        if plan is not None:
            await self._save(state, plan, wait=False)

    def before_fit_batch(self, state: StateView) -> None:
        """Every ``every_n_steps`` steps: save (a ``def`` hook: it keeps the batch fused)."""
        n = self.every_n_steps
        step = state.step
        if n is None or step == 0 or step % n or step == self._last_step_saved:
            return
        self._last_step_saved = step
        targets: list[str] = []
        removes = self._add_periodic(f"step-{step:08d}{self.suffix}", targets)
        if self.save_last:
            targets.append(self._last_name)
            self._last_saved = (state.epoch, step)
        if not targets:
            return
        # A def hook of the batch: no weight update can run while it does (the batch holds the
        # weights in thread mode; the update comes after this hook otherwise), so the copy is
        # consistent without taking the read lock, which a def hook could not await.
        if not self._writer:
            self._content(state)  # this rank's part of the gather; rank 0 writes
            return
        self._removing.extend(removes)  # before the copy: the file written says so
        self._queue.append((self._copy(state), targets, removes, self._meta(state)))
        state.start_soon(self._drain, name="Checkpoint.write")

    async def after_fit_run(self, state: StateView) -> None:
        """Save the final state (also after an error or a cancellation) and wait for it.

        Snapshots of earlier save points that are still waiting are written first."""
        if not self._ready:
            return  # the directory could not be prepared (that error ends the run)
        strategy = state.strategy
        if strategy is not None and state.outcome in ("error", "cancelled"):
            # Distributed training failed: no gather (a rank may be gone); the files of the
            # last save point stay as they are.
            if self._queue and self._writer:
                await self._drain()
            return
        targets: list[str] = []
        removes: list[str] = []
        point = (state.epoch, state.step)
        unsaved, self._unsaved = self._unsaved, None
        if unsaved is not None and unsaved[0] == point:
            targets, removes = list(unsaved[1][0]), list(unsaved[1][1])
        elif state.batch_index == 0 and state.epoch > 0:
            plan = self._plan_boundary(state)
            if plan is not None:
                targets, removes = plan
        if self.save_last and self._last_name not in targets and point != self._last_saved:
            targets.append(self._last_name)
            self._last_saved = point
        if targets:
            await self._save(state, (targets, removes), wait=True)
        elif self._queue:
            await self._drain()
        self.loaded_best = None
        if self.load_best and state.outcome in ("completed", "stopped"):
            if strategy is not None:
                strategy.barrier()  # rank 0 has written the best file before anyone reads it
            await self._load_best(state)

    async def _load_best(self, state: StateView) -> None:
        path = self.best_path
        if path is None:
            return  # nothing was judged (no epoch completed, or every score was NaN)
        weights = await anyio.to_thread.run_sync(read_weights, path)
        model = state.model
        # The write side: nobody copies or validates half-loaded weights.
        async with state.weights_lock.write():
            await anyio.to_thread.run_sync(load_weights, model, weights)
        self.loaded_best = path

    # -- deciding ------------------------------------------------------------------------------

    def _plan_boundary(self, state: StateView) -> tuple[list[str], list[str]] | None:
        epoch, step = state.epoch, state.step
        if self._boundary == (epoch, step):
            return None  # already judged (a second fit call starting where the last ended)
        self._boundary = (epoch, step)
        targets: list[str] = []
        removes: list[str] = []
        periodic = self.every_n_epochs is not None and epoch % self.every_n_epochs == 0
        if periodic:
            removes += self._add_periodic(f"epoch-{epoch:04d}{self.suffix}", targets)
        planned, self._planned = self._planned, None
        if planned is not None and planned[0] == (epoch, step):
            if planned[1] is not None:
                targets.append(planned[1])
            removes += planned[2]
        if self.save_last and (targets or periodic):
            targets.append(self._last_name)
            self._last_saved = (epoch, step)
        if not targets:
            return None
        return targets, removes

    def _judge(self, state: StateView, epoch: int, step: int) -> tuple[str | None, list[str]]:
        assert self.monitor is not None
        metrics = state.metrics
        if self.monitor not in metrics:
            raise KeyError(
                f"Checkpoint: metric {self.monitor!r} is not in state.metrics at the end of epoch"
                f" {epoch} (it has {sorted(metrics)})"
            )
        score = float(metrics[self.monitor])
        if math.isnan(score):
            return None, []
        sign = 1.0 if self.mode == "min" else -1.0
        if len(self.best) >= self.top_k and sign * score >= sign * self.best[-1]["score"]:
            return None, []
        name = f"best-epoch-{epoch:04d}-step-{step:08d}{self.suffix}"
        self.best.append({"name": name, "score": score, "epoch": epoch, "step": step})
        # Stable: an equal score later does not displace an earlier one.
        self.best.sort(key=lambda e: sign * e["score"])
        dropped = [e["name"] for e in self.best[self.top_k :]]
        del self.best[self.top_k :]
        return name, dropped

    def _add_periodic(self, name: str, targets: list[str]) -> list[str]:
        """Plan periodic file ``name`` (unless none are kept); returns the files to drop."""
        if self.keep_periodic == 0:
            return []
        targets.append(name)
        self._periodic.append(name)
        if self.keep_periodic is None or len(self._periodic) <= self.keep_periodic:
            return []
        dropped = self._periodic[: -self.keep_periodic]
        del self._periodic[: -self.keep_periodic]
        return dropped

    # -- writing -------------------------------------------------------------------------------

    async def _save(
        self, state: StateView, plan: tuple[list[str], list[str]], *, wait: bool
    ) -> None:
        targets, removes = plan
        # Until the snapshot is queued, the plan is kept for after_fit_run (a cancellation
        # landing in the copy below must not lose the save point it was planned for).
        self._unsaved = ((state.epoch, state.step), plan)
        self._removing.extend(name for name in removes if name not in self._removing)
        # The state dict is cheap (references); the copy is a memcpy of every tensor, done in a
        # worker thread while the read side of the weights lock keeps updates out.
        async with state.weights_lock.read():
            live = self._content(state)
            if not self._writer:
                self._unsaved = None
                return  # this rank gave its state to the gather; rank 0 writes
            snap = await anyio.to_thread.run_sync(snapshot, live)
        self._queue.append((snap, targets, removes, self._meta(state)))
        self._unsaved = None
        if wait:
            await self._drain()
        else:
            state.start_soon(self._drain, name="Checkpoint.write")

    async def _drain(self) -> None:
        """Write the queued snapshots in order, one at a time."""
        if self._lock is None:  # pragma: no cover - before_fit_run always runs first
            self._lock = anyio.Lock()
        async with self._lock:
            queue = self._queue
            while queue:
                # Taken off the queue once written or failed (the error goes out of fit; the
                # old files are intact): a task cancelled before the write leaves it queued.
                try:
                    await anyio.to_thread.run_sync(self._write_sync, *queue[0])
                except Exception:
                    queue.popleft()
                    raise
                queue.popleft()

    def _content(self, state: StateView) -> dict[str, Any]:
        """What a file holds (live tensors): the learner's state dict, or the weights alone."""
        live = state.state_dict()
        return plain_state_dict(live["model"]) if self.save_weights_only else live

    def _copy(self, state: StateView) -> dict[str, Any]:
        copy: dict[str, Any] = snapshot(self._content(state))
        return copy

    def _meta(self, state: StateView) -> dict[str, str]:
        # The safetensors header's metadata (torch files carry the counters in the state dict).
        return {"format": "pt", "epoch": str(state.epoch), "step": str(state.step)}

    def _write_sync(
        self, snap: dict[str, Any], targets: list[str], removes: list[str], meta: dict[str, str]
    ) -> None:
        self._make_directory()
        # Serialized once, straight into the first file; the others are copies of it. (Not
        # through a bytes buffer: copying hundreds of MB in memory holds the GIL, which the
        # event loop thread needs.)
        first = self.path(targets[0])
        if self.format == "safetensors":
            atomic_write_file(first, lambda tmp: save_safetensors(snap, meta, tmp))
        else:
            atomic_write(first, lambda f: torch.save(snap, f))
        for name in targets[1:]:
            atomic_write(self.path(name), lambda f: copy_into(first, f))
        # Dropped names are never reused (each names its own epoch/step), so no target is lost.
        for name in removes:
            if name not in targets:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(name))
            with contextlib.suppress(ValueError):
                self._removing.remove(name)

    # -- resuming ------------------------------------------------------------------------------

    def state_dict(self) -> Mapping[str, Any]:
        return {
            "best": [dict(e) for e in self.best],
            "periodic": list(self._periodic),
            "boundary": None if self._boundary is None else list(self._boundary),
            "judged": None if self._judged is None else list(self._judged),
            "planned": plan_to_portable(self._planned),
            "last_step_saved": self._last_step_saved,
            "last_saved": None if self._last_saved is None else list(self._last_saved),
            "unqueued": plan_to_portable(self._unqueued),
            "removing": list(self._removing),
            "monitor": self.monitor,
            "mode": self.mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best = best_from_state(state, self.monitor, self.mode)
        periodic = [check_name(n) for n in state.get("periodic", [])]
        self.best = best
        self._periodic = periodic
        boundary = state.get("boundary")
        self._boundary = None if boundary is None else (int(boundary[0]), int(boundary[1]))
        judged = state.get("judged")
        self._judged = None if judged is None else (int(judged[0]), int(judged[1]))
        self._planned = plan_from_portable(state.get("planned"))
        last_step = state.get("last_step_saved")
        self._last_step_saved = None if last_step is None else int(last_step)
        last = state.get("last_saved")
        self._last_saved = None if last is None else (int(last[0]), int(last[1]))
        self._unqueued = plan_from_portable(state.get("unqueued"))
        self._removing = [check_name(n) for n in state.get("removing", [])]
