"""Callbacks and stages for everyday training: metrics, schedules, stopping, checkpoints, ...

Everything here is built only on aiolearner's public API (:class:`~aiolearner.Callback`,
:class:`~aiolearner.StateView`, the stages and the learner's public methods), the same API your
own callbacks use. See ``docs/callbacks.md`` for a table of what each one reads and writes.
"""

from __future__ import annotations

from ._checkpoint import Checkpoint as Checkpoint
from ._distributed import is_rank_zero as is_rank_zero
from ._ema import EMA as EMA
from ._files import load_checkpoint_file as load_checkpoint_file
from ._files import load_weights as load_weights
from ._gradients import AccumulateGradients as AccumulateGradients
from ._gradients import GradientClipping as GradientClipping
from ._loggers import CSVLogger as CSVLogger
from ._loggers import ExperimentLogger as ExperimentLogger
from ._loggers import JSONLinesLogger as JSONLinesLogger
from ._loggers import OpenMode as OpenMode
from ._lr_finder import LRFinderResult as LRFinderResult
from ._lr_finder import lr_find as lr_find
from ._metrics import MetricFn as MetricFn
from ._metrics import Metrics as Metrics
from ._metrics import accuracy as accuracy
from ._precision import MixedPrecision as MixedPrecision
from ._profiler import Profiler as Profiler
from ._progress import ProgressBar as ProgressBar
from ._recorder import Recorder as Recorder
from ._recorder import plot_history as plot_history
from ._schedule import LRSchedule as LRSchedule
from ._schedule import OneCycle as OneCycle
from ._schedule import ParamSchedule as ParamSchedule
from ._schedule import WarmupCosine as WarmupCosine
from ._stopping import EarlyStopping as EarlyStopping
from ._stopping import NonFiniteGuard as NonFiniteGuard
from ._stopping import TimeLimit as TimeLimit
from ._summary import LayerSummary as LayerSummary
from ._summary import ModelSummary as ModelSummary
from ._summary import model_summary as model_summary
from ._swa import SWA as SWA
from ._tensorboard import TensorBoardLogger as TensorBoardLogger
from ._throughput import Throughput as Throughput
from ._throughput import stage_times as stage_times
from ._tracking import MLflowLogger as MLflowLogger
from ._tracking import WandbLogger as WandbLogger
from ._tracking import flatten_hparams as flatten_hparams

__all__ = [
    "AccumulateGradients",
    "Checkpoint",
    "EMA",
    "SWA",
    "GradientClipping",
    "LRSchedule",
    "MixedPrecision",
    "NonFiniteGuard",
    "OneCycle",
    "ParamSchedule",
    "WarmupCosine",
    "load_checkpoint_file",
    "load_weights",
    "CSVLogger",
    "ExperimentLogger",
    "JSONLinesLogger",
    "MLflowLogger",
    "OpenMode",
    "WandbLogger",
    "flatten_hparams",
    "is_rank_zero",
    "LRFinderResult",
    "Profiler",
    "ProgressBar",
    "Recorder",
    "TensorBoardLogger",
    "Throughput",
    "lr_find",
    "plot_history",
    "stage_times",
    "EarlyStopping",
    "MetricFn",
    "Metrics",
    "TimeLimit",
    "accuracy",
    "LayerSummary",
    "ModelSummary",
    "model_summary",
]

# Public objects report their public module (as trio and httpx do).
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("aiolearner.callbacks._"):
        try:
            _obj.__module__ = "aiolearner.callbacks"
        except (AttributeError, TypeError):  # pragma: no cover
            pass
del _name, _obj
