"""Joining the process group, and the lanes: what a strategy does first, in ``Learner()``.

The default group is reused when one is initialized, otherwise created from torchrun's
environment (NCCL on CUDA, gloo on CPU) and then destroyed by the strategy that created it
(``Strategy.close``, or when the interpreter exits). Two small gloo groups of the strategy's own,
the *lanes*, carry its control traffic: the training lane and the validation lane (a concurrent
validation's reductions, whose order is its own).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import time
import warnings
import weakref
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .._exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._strategy import Strategy

__all__ = ["connect"]

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Numbers the strategies of this process: each one's keys in the store get a prefix of its own.
_SERIAL = itertools.count(1)


def connect(strategy: Strategy, device: torch.device | str | None) -> torch.device | str | None:
    """Join (or create) the process group and make the lanes; the device to train on."""
    if strategy._connected:
        raise ConfigurationError(
            f"this {type(strategy).__name__} already serves a Learner: give each Learner a "
            "strategy of its own"
        )
    if not dist.is_available():
        raise ConfigurationError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        missing = [name for name in _ENV if name not in os.environ]
        if missing:
            raise ConfigurationError(
                f"{type(strategy).__name__}() needs a process group: none is initialized and "
                f"torchrun's environment is missing ({', '.join(missing)}); launch the "
                "script with `torchrun --nproc-per-node=N script.py`, or call "
                "torch.distributed.init_process_group before making the Learner"
            )
        backend = strategy.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device_id = None
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device_id = torch.device("cuda", local)
        dist.init_process_group(backend, timeout=strategy.timeout, device_id=device_id)
        strategy.created_group = True
    # Also for a group the script made: the grace at exit (see _close_at_exit) is for the lanes.
    atexit.register(_close_at_exit, weakref.ref(strategy))
    strategy._rank = dist.get_rank()
    strategy._world_size = dist.get_world_size()
    strategy._local_rank = int(os.environ.get("LOCAL_RANK", strategy._rank))
    strategy._local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", strategy._world_size))
    strategy._backend_in_use = str(dist.get_backend())
    # new_group is collective: every rank makes its learner, so every rank gets here.
    strategy.train_group = dist.new_group(backend="gloo", timeout=strategy.timeout)
    strategy.val_group = dist.new_group(backend="gloo", timeout=strategy.timeout)
    strategy._connected = True
    strategy._prefix = f"aiolearner/{next(_SERIAL)}"
    threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    if strategy._local_world_size * threads > cores:
        warnings.warn(
            f"{strategy._local_world_size} ranks on this machine x {threads} torch threads each "
            f"exceed its {cores} cores: the ranks will slow each other down (often several "
            "times); set OMP_NUM_THREADS (torchrun sets 1) or torch.set_num_threads",
            RuntimeWarning,
            # Points at the code making the Learner (through Strategy._connect, Learner()).
            stacklevel=4,
        )
    if device is not None:
        return device
    if strategy._backend_in_use == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


#: How long the interpreter's exit waits, the GIL released, for gloo's worker threads to let
#: go of their last collectives (seconds).
EXIT_GRACE = 0.25

#: How long the exit waits for collectives given up on after another rank failed (seconds).
ABANDONED_GRACE = 10.0


def _close_at_exit(ref: weakref.ReferenceType[Strategy]) -> None:
    """At the interpreter's exit: close the strategy (destroying the group it created), then
    give gloo's worker threads a moment. Such a thread lets go of a collective a moment after
    it completed; if that frees a tensor Python made (the small control tensors, those of
    ``gather_object``) once the interpreter is finalizing, the thread cannot take the GIL and
    the process aborts ("terminate called without an active exception") after a run that
    succeeded. Atexit handlers run before that point: sleeping here lets them finish.

    A collective this rank gave up on because another rank reported a failure is still pending:
    it ends when that rank exits and closes its connections. Ended then, during the
    interpreter's finalization, it aborts the process the same way (an exit status that blames
    this rank, not the one that failed), so the exit waits for it first, bounded."""
    strategy = ref()
    if strategy is not None:
        with contextlib.suppress(Exception):
            strategy.close()
        until = time.monotonic() + ABANDONED_GRACE
        while time.monotonic() < until and any(
            not work.is_completed() for work in strategy._abandoned
        ):
            time.sleep(0.02)
        time.sleep(EXIT_GRACE)
