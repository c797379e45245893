"""aiolearner: an async, coroutine-based training framework for PyTorch, on anyio.

The public API is what this module exports; everything else lives in private modules.
"""

from __future__ import annotations

from ._callbacks import Callback as Callback
from ._context import StageContext as Runtime  # its earlier name
from ._context import StageContext as StageContext
from ._data import Batches as Batches
from ._dist._models import DDP as DDP
from ._dist._models import FSDP as FSDP
from ._dist._strategy import Strategy as Strategy
from ._events import Event as Event
from ._events import EventStream as EventStream
from ._exceptions import AiolearnerError as AiolearnerError
from ._exceptions import CollectiveError as CollectiveError
from ._exceptions import ConfigurationError as ConfigurationError
from ._exceptions import ControlFlow as ControlFlow
from ._exceptions import DistributedError as DistributedError
from ._exceptions import LearnerBusyError as LearnerBusyError
from ._exceptions import SkipBatch as SkipBatch
from ._exceptions import StageError as StageError
from ._exceptions import StateAccessError as StateAccessError
from ._exceptions import StateKeyError as StateKeyError
from ._exceptions import StopEpoch as StopEpoch
from ._exceptions import StopFit as StopFit
from ._feed import Feed as Feed
from ._handle import FitHandle as FitHandle
from ._handle import FitSnapshot as FitSnapshot
from ._handle import LearnerSnapshot as LearnerSnapshot
from ._handle import RunState as RunState
from ._learner import Learner as Learner
from ._learner import LearnerStatus as LearnerStatus
from ._locks import ReadWriteLock as ReadWriteLock
from ._parallel import Parallel as Parallel
from ._policy import ComputePolicy as ComputePolicy
from ._rng import capture_rng as capture_rng
from ._rng import restore_rng as restore_rng
from ._seeding import SeedState as SeedState
from ._seeding import dataloader_seeding as dataloader_seeding
from ._seeding import seed_everything as seed_everything
from ._seeding import seed_worker as seed_worker
from ._signals import Interrupted as Interrupted
from ._signals import stop_on_signals as stop_on_signals
from ._stage import ComputeStage as ComputeStage
from ._stage import Stage as Stage
from ._stage import batch_size as batch_size
from ._stage import split_batch as split_batch
from ._stages import Epoch as Epoch
from ._stages import Fit as Fit
from ._stages import FitBatch as FitBatch
from ._stages import FitRun as FitRun
from ._stages import Gradient as Gradient
from ._stages import Update as Update
from ._stages import Validate as Validate
from ._stages import ValidateBatch as ValidateBatch
from ._stages import ValidateLoss as ValidateLoss
from ._state import ReadOnlyDict as ReadOnlyDict
from ._state import ReadOnlyList as ReadOnlyList
from ._state import State as State
from ._trace import Trace as Trace
from ._trace import TraceRecord as TraceRecord
from ._view import StateView as StateView
from ._weights import match_state_dict as match_state_dict
from ._weights import plain_state_dict as plain_state_dict
from ._weights import unwrap_model as unwrap_model

__version__ = "0.1.0"

__all__ = [
    "AiolearnerError",
    "Batches",
    "Callback",
    "CollectiveError",
    "ComputePolicy",
    "ComputeStage",
    "ConfigurationError",
    "ControlFlow",
    "DDP",
    "DistributedError",
    "Epoch",
    "Event",
    "EventStream",
    "FSDP",
    "Feed",
    "Fit",
    "FitBatch",
    "FitHandle",
    "FitRun",
    "FitSnapshot",
    "Gradient",
    "Interrupted",
    "Learner",
    "LearnerBusyError",
    "LearnerSnapshot",
    "LearnerStatus",
    "Parallel",
    "ReadOnlyDict",
    "ReadOnlyList",
    "ReadWriteLock",
    "RunState",
    "Runtime",
    "SeedState",
    "SkipBatch",
    "Stage",
    "StageContext",
    "StageError",
    "State",
    "StateAccessError",
    "StateKeyError",
    "StateView",
    "StopEpoch",
    "StopFit",
    "Strategy",
    "Trace",
    "TraceRecord",
    "Update",
    "Validate",
    "ValidateBatch",
    "ValidateLoss",
    "batch_size",
    "capture_rng",
    "restore_rng",
    "dataloader_seeding",
    "seed_everything",
    "seed_worker",
    "match_state_dict",
    "plain_state_dict",
    "split_batch",
    "stop_on_signals",
    "unwrap_model",
]

# Public objects report their public module (as trio and httpx do).
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("aiolearner._"):
        try:
            _obj.__module__ = "aiolearner"
        except (AttributeError, TypeError):  # pragma: no cover
            pass
del _name, _obj
