"""The shipped callbacks refuse bad arguments when they are built, naming the callback, the
argument and the value, and what can only be seen when a run starts then, before any batch.

A value of the wrong type raises a ``TypeError`` (that is also a ``ValueError``, what several
callbacks raised before); a value of the right type out of its range, a ``ValueError``.
"""

from __future__ import annotations

import io
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aiolearner import Callback, Learner, StateView
from aiolearner.callbacks import (
    EMA,
    SWA,
    AccumulateGradients,
    Checkpoint,
    CSVLogger,
    EarlyStopping,
    GradientClipping,
    JSONLinesLogger,
    LRSchedule,
    Metrics,
    MixedPrecision,
    NonFiniteGuard,
    OneCycle,
    ParamSchedule,
    Profiler,
    ProgressBar,
    TensorBoardLogger,
    Throughput,
    TimeLimit,
    WarmupCosine,
    accuracy,
    lr_find,
)
from aiolearner.testing import make_batches, make_learner, tiny_model

NAN = float("nan")
HERE = "./checked-dir"  # built only: nothing is written there


def step_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, 1)


# (what is built, the exception, a pattern naming the callback, the argument and the value)
Case = tuple[Callable[[], object], type[Exception], str]

CASES: dict[str, Case] = {
    # 1. whole numbers: an int (not a float, not a bool), with its lower bound
    "Checkpoint top_k=2.5": (
        lambda: Checkpoint(HERE, monitor="val_loss", top_k=2.5),  # type: ignore[arg-type]
        TypeError,
        r"^Checkpoint: top_k must be a whole number \(an int\) of at least 1, got 2\.5 \(float\)$",
    ),
    "Checkpoint top_k=5 without monitor (it would keep nothing by any score)": (
        lambda: Checkpoint(HERE, top_k=5),
        ValueError,
        r"Checkpoint\(top_k=5\) needs a monitor= metric",
    ),
    "Checkpoint keep_periodic=1.5": (
        lambda: Checkpoint(HERE, keep_periodic=1.5),  # type: ignore[arg-type]
        TypeError,
        r"Checkpoint: keep_periodic must be None or a non-negative int .*got 1\.5 \(float\)",
    ),
    "Checkpoint every_n_epochs=1.5": (
        lambda: Checkpoint(HERE, every_n_epochs=1.5),  # type: ignore[arg-type]
        TypeError,
        r"Checkpoint: every_n_epochs .*got 1\.5 \(float\)",
    ),
    "Checkpoint every_n_steps=True": (
        lambda: Checkpoint(HERE, every_n_steps=True),
        TypeError,
        r"Checkpoint: every_n_steps .*got True \(bool\)",
    ),
    "Checkpoint every_n_steps=0": (
        lambda: Checkpoint(HERE, every_n_steps=0),
        ValueError,
        r"Checkpoint: every_n_steps must be .* of at least 1, got 0$",
    ),
    "SWA start_epoch=1.5": (
        lambda: SWA(1.5),  # type: ignore[arg-type]
        TypeError,
        r"SWA: start_epoch must be a non-negative int .*got 1\.5 \(float\)",
    ),
    "SWA anneal_epochs=2.0": (
        lambda: SWA(0, anneal_epochs=2.0),  # type: ignore[arg-type]
        TypeError,
        r"SWA: anneal_epochs .*got 2\.0 \(float\); pass anneal_epochs=2",
    ),
    "SWA every_n_epochs=0": (
        lambda: SWA(0, every_n_epochs=0),
        ValueError,
        r"SWA: every_n_epochs .* at least 1, got 0",
    ),
    "AccumulateGradients every=1.5": (
        lambda: AccumulateGradients(1.5),  # type: ignore[arg-type]
        TypeError,
        r"AccumulateGradients: every must be a whole number \(an int\) .*got 1\.5 \(float\)",
    ),
    "EarlyStopping patience=1.5": (
        lambda: EarlyStopping(patience=1.5),  # type: ignore[arg-type]
        TypeError,
        r"EarlyStopping: patience must be a non-negative int.*got 1\.5 \(float\)",
    ),
    "NonFiniteGuard every_n_steps=2.0": (
        lambda: NonFiniteGuard(every_n_steps=2.0),  # type: ignore[arg-type]
        TypeError,
        r"NonFiniteGuard: every_n_steps .*got 2\.0 \(float\); pass every_n_steps=2",
    ),
    "EMA every_n_steps=1.5": (
        lambda: EMA(every_n_steps=1.5),  # type: ignore[arg-type]
        TypeError,
        r"EMA: every_n_steps .*got 1\.5 \(float\)",
    ),
    "LRSchedule frequency=1.5": (
        lambda: LRSchedule(step_lr, frequency=1.5),  # type: ignore[arg-type]
        TypeError,
        r"LRSchedule: frequency .*got 1\.5 \(float\)",
    ),
    "OneCycle total_steps=10.0": (
        lambda: OneCycle(0.1, total_steps=10.0),  # type: ignore[arg-type]
        TypeError,
        r"OneCycle: total_steps .*got 10\.0 \(float\)",
    ),
    "WarmupCosine warmup_steps=1.5": (
        lambda: WarmupCosine(1.5, 10),  # type: ignore[arg-type]
        TypeError,
        r"WarmupCosine: warmup_steps must be a whole number \(an int\), got 1\.5 \(float\)",
    ),
    "WarmupCosine total_steps='10'": (
        lambda: WarmupCosine(1, "10"),  # type: ignore[arg-type]
        TypeError,
        r"WarmupCosine: total_steps .*got '10' \(str\)",
    ),
    "CSVLogger every_n_steps=1.5": (
        lambda: CSVLogger(HERE + "/log.csv", every_n_steps=1.5),  # type: ignore[arg-type]
        TypeError,
        r"CSVLogger: every_n_steps must be None or .*got 1\.5 \(float\)",
    ),
    "JSONLinesLogger flush_rows=2.5": (
        lambda: JSONLinesLogger(HERE + "/log.jsonl", flush_rows=2.5),  # type: ignore[arg-type]
        TypeError,
        r"JSONLinesLogger: flush_rows .*got 2\.5 \(float\)",
    ),
    "Metrics log_every_n_steps=1.5": (
        lambda: Metrics(log_every_n_steps=1.5),  # type: ignore[arg-type]
        TypeError,
        r"Metrics: log_every_n_steps .*got 1\.5 \(float\)",
    ),
    "Profiler wait=1.5": (
        lambda: Profiler(HERE, wait=1.5),  # type: ignore[arg-type]
        TypeError,
        r"Profiler: wait must be a non-negative int .*got 1\.5 \(float\)",
    ),
    "Profiler warmup=True": (
        lambda: Profiler(HERE, warmup=True),
        TypeError,
        r"Profiler: warmup must be a non-negative int .*got True \(bool\)",
    ),
    "Profiler active=2.5": (
        lambda: Profiler(HERE, active=2.5),  # type: ignore[arg-type]
        TypeError,
        r"Profiler: active .*got 2\.5 \(float\)",
    ),
    "Profiler repeat=-1": (
        lambda: Profiler(HERE, repeat=-1),
        ValueError,
        r"Profiler: repeat must be a non-negative int .*got -1",
    ),
    "Profiler skip_first='1'": (
        lambda: Profiler(HERE, skip_first="1"),  # type: ignore[arg-type]
        TypeError,
        r"Profiler: skip_first .*got '1' \(str\)",
    ),
    # 2. real numbers: an int or a float (not a bool, not a str), finite, in range
    "EarlyStopping min_delta='0.1'": (
        lambda: EarlyStopping(min_delta="0.1"),  # type: ignore[arg-type]
        TypeError,
        r"EarlyStopping: min_delta must be a non-negative finite number .*got '0\.1' \(str\); pass"
        r" min_delta=0\.1",
    ),
    "EarlyStopping min_delta=nan": (
        lambda: EarlyStopping(min_delta=NAN),
        ValueError,
        r"EarlyStopping: min_delta must be a non-negative finite number, got nan",
    ),
    "GradientClipping max_norm='1'": (
        lambda: GradientClipping(max_norm="1"),  # type: ignore[arg-type]
        TypeError,
        r"GradientClipping: max_norm must be a positive finite number .*got '1' \(str\)",
    ),
    "GradientClipping max_value=inf": (
        lambda: GradientClipping(max_value=math.inf),
        ValueError,
        r"GradientClipping: max_value must be a positive finite number, got inf",
    ),
    "GradientClipping norm_type='l2'": (
        lambda: GradientClipping(1.0, norm_type="l2"),  # type: ignore[arg-type]
        TypeError,
        r"GradientClipping: norm_type .*got 'l2' \(str\); 2\.0 for the Euclidean norm, math\.inf"
        r" \(or 'inf'\)",
    ),
    "GradientClipping norm_type=nan": (
        lambda: GradientClipping(1.0, norm_type=NAN),
        ValueError,
        r"GradientClipping: norm_type must be a positive number, got nan",
    ),
    "GradientClipping[d] max_norm=True": (
        lambda: GradientClipping(True, optimizer="d"),
        TypeError,
        r"GradientClipping\[d\]: max_norm .*got True \(bool\)",
    ),
    "TimeLimit seconds='1h'": (
        lambda: TimeLimit("1h"),  # type: ignore[arg-type]
        TypeError,
        r"TimeLimit: seconds must be a positive finite number .*got '1h' \(str\); the budget in"
        r" seconds",
    ),
    "TimeLimit seconds=nan": (
        lambda: TimeLimit(NAN),
        ValueError,
        r"TimeLimit: seconds must be a positive finite number, got nan",
    ),
    "EMA decay='0.99'": (
        lambda: EMA("0.99"),  # type: ignore[arg-type]
        TypeError,
        r"EMA: decay must be a number in \[0, 1\) .*got '0\.99' \(str\)",
    ),
    "SWA swa_lr='0.05'": (
        lambda: SWA(0, swa_lr="0.05"),  # type: ignore[arg-type]
        TypeError,
        r"SWA: swa_lr .*got '0\.05' \(str\)",
    ),
    "WarmupCosine min_factor=1.5": (
        lambda: WarmupCosine(1, 10, min_factor=1.5),
        ValueError,
        r"WarmupCosine: min_factor must be a number in \[0, 1\], got 1\.5",
    ),
    "ProgressBar refresh_interval='0.1'": (
        lambda: ProgressBar(refresh_interval="0.1"),  # type: ignore[arg-type]
        TypeError,
        r"ProgressBar: refresh_interval .*got '0\.1' \(str\)",
    ),
    "ProgressBar log_interval=nan": (
        lambda: ProgressBar(log_interval=NAN),
        ValueError,
        r"ProgressBar: log_interval must be a positive finite number, got nan",
    ),
    # 3. learning rates
    "OneCycle max_lr=-1": (
        lambda: OneCycle(-1, total_steps=10),
        ValueError,
        r"OneCycle: max_lr must be a positive finite number, got -1",
    ),
    "OneCycle max_lr=[0.1, -0.1]": (
        lambda: OneCycle([0.1, -0.1], total_steps=10),
        ValueError,
        r"OneCycle: max_lr\[1\] must be a positive finite number, got -0\.1",
    ),
    "OneCycle max_lr=None": (
        lambda: OneCycle(None, total_steps=10),  # type: ignore[arg-type]
        TypeError,
        r"OneCycle: max_lr .*got None \(NoneType\)",
    ),
    "SWA swa_lr=-1": (
        lambda: SWA(1, swa_lr=-1),
        ValueError,
        r"SWA: swa_lr must be a positive finite number, got -1",
    ),
    # 4. names: non-empty strings
    "EarlyStopping monitor=None": (
        lambda: EarlyStopping(None),  # type: ignore[arg-type]
        TypeError,
        r"EarlyStopping: monitor must be a non-empty str .*got None \(NoneType\)",
    ),
    "EarlyStopping monitor=5": (
        lambda: EarlyStopping(5),  # type: ignore[arg-type]
        TypeError,
        r"EarlyStopping: monitor must be a non-empty str .*got 5 \(int\)",
    ),
    "EarlyStopping monitor=''": (
        lambda: EarlyStopping(""),
        ValueError,
        r"EarlyStopping: monitor must be a non-empty str .*got ''",
    ),
    "Checkpoint monitor=5": (
        lambda: Checkpoint(HERE, monitor=5),  # type: ignore[arg-type]
        TypeError,
        r"Checkpoint: monitor must be a non-empty str .*got 5 \(int\)",
    ),
    "LRSchedule monitor=None": (
        lambda: LRSchedule(step_lr, monitor=None),  # type: ignore[arg-type]
        TypeError,
        r"LRSchedule: monitor .*got None \(NoneType\)",
    ),
    "Metrics output_field=None": (
        lambda: Metrics(["accuracy"], output_field=None),  # type: ignore[arg-type]
        TypeError,
        r"Metrics: output_field must be a non-empty str .*got None \(NoneType\)",
    ),
    "Metrics loss_field=''": (
        lambda: Metrics(["loss"], loss_field=""),
        ValueError,
        r"Metrics: loss_field must be a non-empty str .*got ''",
    ),
    "Metrics name ''": (
        lambda: Metrics({"": accuracy}),
        ValueError,
        r"Metrics: each metric's name must be a non-empty str .*got ''",
    ),
    "Metrics name 1": (
        lambda: Metrics({1: accuracy}),  # type: ignore[dict-item]
        TypeError,
        r"Metrics: each metric's name must be a non-empty str .*got 1 \(int\)",
    ),
    "Metrics prefix=None": (
        lambda: Metrics(prefix=None),  # type: ignore[arg-type]
        TypeError,
        r"Metrics: prefix must be a str .*got None \(NoneType\)",
    ),
    "ParamSchedule name=5": (
        lambda: ParamSchedule(5, float),  # type: ignore[arg-type]
        TypeError,
        r"ParamSchedule: name must be a non-empty str .*got 5 \(int\)",
    ),
    "Profiler worker_name=''": (
        lambda: Profiler(HERE, worker_name=""),
        ValueError,
        r"Profiler: worker_name must be a non-empty str .*got ''",
    ),
    # 5. functions
    "ParamSchedule fn=0.1": (
        lambda: ParamSchedule("lr", 0.1),  # type: ignore[arg-type]
        TypeError,
        r"ParamSchedule: fn must be a function fn\(t\) -> value, got 0\.1 \(float\); for a"
        r" constant, pass lambda t: 0\.1",
    ),
    "Throughput clock=5": (
        lambda: Throughput(clock=5),
        TypeError,
        r"Throughput: clock must be a function .*got 5 \(int\)",
    ),
    "TimeLimit clock=5": (
        lambda: TimeLimit(10, clock=5),  # type: ignore[arg-type]
        TypeError,
        r"TimeLimit: clock must be a function .*got 5 \(int\)",
    ),
    "SWA bn_data=5": (
        lambda: SWA(0, bn_data=5),  # type: ignore[arg-type]
        TypeError,
        r"SWA: bn_data must be batches .*got 5 \(int\)",
    ),
    # 6. autocast device types torch knows
    "MixedPrecision device_type='tpu'": (
        lambda: MixedPrecision(device_type="tpu"),
        ValueError,
        r"MixedPrecision: device_type must be one of torch\.autocast's device types \(cpu, cuda,"
        r".*\), got 'tpu'",
    ),
    "MixedPrecision device_type='cuda:0'": (
        lambda: MixedPrecision(device_type="cuda:0"),
        ValueError,
        r"MixedPrecision: device_type .*got 'cuda:0': a device type, without the index",
    ),
    "MixedPrecision device_type=torch.device": (
        lambda: MixedPrecision(device_type=torch.device("cpu")),  # type: ignore[arg-type]
        TypeError,
        r"MixedPrecision: device_type .*got device\(type='cpu'\) \(device\)",
    ),
    "MixedPrecision scaler='yes'": (
        lambda: MixedPrecision(scaler="yes"),  # type: ignore[arg-type]
        TypeError,
        r"MixedPrecision: scaler must be None .*got 'yes' \(str\)",
    ),
    # 7. settings that would do nothing
    "Metrics train=False, validate=False": (
        lambda: Metrics(["accuracy"], train=False, validate=False),
        ValueError,
        r"Metrics\(train=False, validate=False\) would compute nothing",
    ),
    "Checkpoint save_last=False, every_n_epochs=None": (
        lambda: Checkpoint(HERE, save_last=False, every_n_epochs=None),
        ValueError,
        r"Checkpoint\(save_last=False\) with no monitor= would write no file \(every_n_epochs=None"
        r" and every_n_steps=None save at no point\)",
    ),
    "Checkpoint save_last=False, keep_periodic=0": (
        lambda: Checkpoint(HERE, save_last=False, keep_periodic=0),
        ValueError,
        r"Checkpoint\(save_last=False\) with no monitor= would write no file \(keep_periodic=0",
    ),
    # 9. a stream, not a path
    "ProgressBar file='out.txt'": (
        lambda: ProgressBar(file="out.txt"),  # type: ignore[arg-type]
        TypeError,
        r"ProgressBar: file must be a text stream with write\(\) \(such as sys\.stderr, or a file"
        r" opened with open\(path, 'w'\)\), got the path 'out\.txt'",
    ),
    "ProgressBar file=5": (
        lambda: ProgressBar(file=5),  # type: ignore[arg-type]
        TypeError,
        r"ProgressBar: file must be a text stream .*got 5 \(int\)",
    ),
    "ProgressBar file=BytesIO": (
        lambda: ProgressBar(file=io.BytesIO()),  # type: ignore[arg-type]
        TypeError,
        r"ProgressBar: file must be a text stream .*got a binary stream.*text mode",
    ),
}


@pytest.mark.parametrize(("make", "error", "message"), CASES.values(), ids=CASES.keys())
def test_a_bad_argument_is_refused_at_construction(
    make: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make()


def test_a_wrong_type_is_a_type_error_and_a_value_error() -> None:
    """Callbacks that raised ``ValueError`` for a wrong type still do."""
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="patience"):
        EarlyStopping(patience="3")  # type: ignore[arg-type]


VALID: dict[str, Callable[[], object]] = {
    "Checkpoint every_n_epochs=0": lambda: Checkpoint(HERE, every_n_epochs=0),
    "Checkpoint every_n_epochs=None": lambda: Checkpoint(HERE, every_n_epochs=None),
    "Checkpoint numpy top_k": lambda: Checkpoint(
        HERE,
        monitor="val_loss",
        top_k=np.int64(2),  # type: ignore[arg-type]
    ),
    "Checkpoint save_last=False, monitor": lambda: Checkpoint(
        HERE, save_last=False, every_n_epochs=None, monitor="val_loss"
    ),
    "EarlyStopping patience=0, min_delta=0": lambda: EarlyStopping(patience=0, min_delta=0),
    "GradientClipping norm_type='inf'": lambda: GradientClipping(1, norm_type="inf"),
    "GradientClipping norm_type=math.inf": lambda: GradientClipping(1, norm_type=math.inf),
    "EMA decay=0": lambda: EMA(0),
    "WarmupCosine(0, 1, min_factor=1)": lambda: WarmupCosine(0, 1, min_factor=1),
    "OneCycle max_lr list": lambda: OneCycle([0.1, 0.2], total_steps=5),
    "Profiler warmup=0": lambda: Profiler(HERE, warmup=0),
    "MixedPrecision device_type='cuda'": lambda: MixedPrecision(device_type="cuda"),
    "MixedPrecision device_type='mps'": lambda: MixedPrecision(device_type="mps"),
    "ProgressBar file=StringIO": lambda: ProgressBar(file=io.StringIO()),
    "Metrics validate=False": lambda: Metrics(validate=False),
    "SWA swa_lr=0.05": lambda: SWA(0, swa_lr=0.05),
    "SWA swa_lr per group": lambda: SWA(0, swa_lr=[0.05, 0.005]),
    "TimeLimit(1)": lambda: TimeLimit(1),
}


@pytest.mark.parametrize("make", VALID.values(), ids=VALID.keys())
def test_valid_values_are_still_accepted(make: Callable[[], object]) -> None:
    make()


async def test_lr_find_arguments() -> None:
    learner = make_learner(n_batches=2)
    with pytest.raises(TypeError, match=r"lr_find: num_steps .*got 10\.5 \(float\)"):
        await lr_find(learner, num_steps=10.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"lr_find: start_lr .*got '1e-5' \(str\)"):
        await lr_find(learner, start_lr="1e-5")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"lr_find: end_lr must be a positive finite number, got nan"
    ):
        await lr_find(learner, end_lr=NAN)


# -- 8. '~' in paths ------------------------------------------------------------------------


def test_a_leading_tilde_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert Checkpoint("~/ckpt").directory == home / "ckpt"
    assert Profiler("~/profile").directory == home / "profile"
    assert TensorBoardLogger("~/tb").log_dir == home / "tb"
    csv_log = CSVLogger("~/logs/log.csv", artifacts_dir="~/kept")
    assert (csv_log.path, csv_log.artifacts_dir) == (home / "logs/log.csv", home / "kept")
    assert JSONLinesLogger("~/log.jsonl").artifacts_dir == home / "artifacts"
    assert list(cwd.iterdir()) == []  # no literal '~' directory


def test_a_leading_tilde_in_the_trackers_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from aiolearner.callbacks import MLflowLogger, WandbLogger

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert MLflowLogger(save_dir="~/mlflow").save_dir == tmp_path / "mlflow"
    assert WandbLogger(dir="~/wandb").dir == tmp_path / "wandb"
    with pytest.raises(TypeError, match=r"MLflowLogger: experiment .*got None \(NoneType\)"):
        MLflowLogger(None)  # type: ignore[arg-type]


# -- 9. paths that cannot be written ---------------------------------------------------------

PSEUDO = pytest.mark.skipif(
    not Path("/proc/self").is_dir() or not Path("/sys/kernel").is_dir(),
    reason="needs Linux's /proc and /sys",
)

UNWRITABLE: dict[str, Case] = {
    "CSVLogger('/proc/log.csv')": (
        lambda: CSVLogger("/proc/log.csv"),
        ValueError,
        r"^CSVLogger: cannot write '/proc/log\.csv': no file can be created in '/proc'",
    ),
    "JSONLinesLogger('/sys/log.jsonl')": (
        lambda: JSONLinesLogger("/sys/log.jsonl"),
        ValueError,
        r"^JSONLinesLogger: cannot write '/sys/log\.jsonl': no file can be created in '/sys'",
    ),
    "JSONLinesLogger(artifacts_dir='/proc')": (
        lambda: JSONLinesLogger(HERE + "/log.jsonl", artifacts_dir="/proc"),
        ValueError,
        r"^JSONLinesLogger: cannot write files: no file can be created in '/proc'",
    ),
    "TensorBoardLogger('/proc')": (
        lambda: TensorBoardLogger("/proc"),
        ValueError,
        r"^TensorBoardLogger: cannot write files: no file can be created in '/proc'",
    ),
    "Profiler('/sys')": (
        lambda: Profiler("/sys"),
        ValueError,
        r"^Profiler: cannot write files: no file can be created in '/sys'",
    ),
}


@PSEUDO
@pytest.mark.parametrize(("make", "error", "message"), UNWRITABLE.values(), ids=UNWRITABLE.keys())
def test_a_path_no_file_can_be_written_in_is_refused_at_construction(
    make: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make()


def test_the_check_leaves_no_file_behind(tmp_path: Path) -> None:
    CSVLogger(tmp_path / "log.csv")
    Checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


RUN_START: dict[str, tuple[Callable[[Path], Callback], str]] = {
    "CSVLogger": (lambda d: CSVLogger(d / "log.csv"), r"CSVLogger: '.*/out' is a file"),
    "JSONLinesLogger": (
        lambda d: JSONLinesLogger(d / "log.jsonl"),
        r"JSONLinesLogger: '.*/out' is a file",
    ),
    "TensorBoardLogger": (lambda d: TensorBoardLogger(d), r"TensorBoardLogger: '.*/out' is a file"),
    "Profiler": (lambda d: Profiler(d), r"Profiler: '.*/out' is a file"),
}


@pytest.mark.parametrize(("make", "message"), RUN_START.values(), ids=RUN_START.keys())
async def test_an_output_directory_replaced_since_fails_at_run_start(
    tmp_path: Path, make: Callable[[Path], Callback], message: str
) -> None:
    directory = tmp_path / "out"
    directory.mkdir()
    callback = make(directory)
    directory.rmdir()
    directory.write_text("")  # a file where the directory was
    learner = make_learner(callbacks=[callback], n_batches=2)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    assert info.group_contains(ValueError, match=message)
    assert info.group_contains(ValueError, match=r"in hook 'before_fit_run'")
    assert not info.group_contains(OSError)  # no second error from writing the log at the end
    assert learner.state.step == 0


async def test_a_log_directory_removed_since_is_made_again(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    log = CSVLogger(directory / "log.csv")
    shutil.rmtree(directory)
    await make_learner(callbacks=[log], n_batches=2).fit(1)
    assert (directory / "log.csv").is_file()


async def test_a_closed_progress_file_fails_at_run_start(tmp_path: Path) -> None:
    stream = (tmp_path / "out.txt").open("w")
    bar = ProgressBar(file=stream, plain=True)
    stream.close()
    learner = make_learner(callbacks=[bar], n_batches=2)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    assert info.group_contains(
        ValueError, match=r"ProgressBar: its file .*out\.txt.* is closed: give an open text stream"
    )
    assert learner.state.step == 0


# -- 10. a schedule's bad value is refused before any group is set ----------------------------


class Weights(Callback):
    """Keeps a copy of the weights after every update."""

    reads = frozenset({"model"})

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def after_update(self, state: StateView) -> None:
        self.seen.append([p.detach().clone() for p in state.model.parameters()])


def two_group_learner(*callbacks: Callback) -> Learner[Any]:
    """A learner whose optimizer has two parameter groups (the first layer, the second)."""
    model = tiny_model()
    first, _, second = (list(layer.parameters()) for layer in model.children())
    optimizer = torch.optim.SGD([{"params": first}, {"params": second}], lr=0.1)
    return Learner(
        model,
        optimizer,
        torch.nn.functional.cross_entropy,
        make_batches(3),
        callbacks=list(callbacks),
    )


BAD_VALUES: dict[str, tuple[object, type[Exception], str]] = {
    "str": ("0.1", TypeError, r"returned '0\.1' \(str\) for 'lr' .*must be a number"),
    "None": (None, TypeError, r"returned None \(NoneType\) for 'lr' .*must be a number"),
    "nan": (NAN, ValueError, r"returned nan \(float\) for 'lr' .*must be a finite number"),
    "inf": (math.inf, ValueError, r"returned inf \(float\) for 'lr' .*must be a finite number"),
    "negative": (-0.1, ValueError, r"returned -0\.1 \(float\) for 'lr' .*must be at least 0"),
}


@pytest.mark.parametrize(("bad", "error", "message"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
async def test_a_bad_scheduled_value_stops_before_the_update(
    bad: object, error: type[Exception], message: str
) -> None:
    weights = Weights()
    schedule = ParamSchedule("lr", lambda t: 0.05 if t < 2 else bad)
    learner = two_group_learner(schedule, weights)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    assert info.group_contains(error, match=rf"^ParamSchedule: fn\(2\) {message}")
    assert info.group_contains(error, match=r"\(for optimizer step 2\).*Nothing was set")
    assert learner.state.step == 2  # the third batch's update never ran
    assert len(weights.seen) == 2
    for now, before in zip(learner.model.parameters(), weights.seen[-1], strict=True):
        assert torch.equal(now, before)  # neither group changed
    assert [g["lr"] for g in learner.optimizer.param_groups] == [0.05, 0.05]


async def test_a_bad_scheduled_value_per_epoch_names_the_epoch() -> None:
    schedule = ParamSchedule("momentum", lambda t: 0.9 if t < 1 else NAN, interval="epoch")
    learner = make_learner(callbacks=[schedule], n_batches=2, with_validation=False)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(2)
    assert info.group_contains(
        ValueError,
        match=r"ParamSchedule: fn\(1\) returned nan \(float\) for 'momentum' \(for epoch 2\)",
    )
    assert (learner.state.epoch, learner.state.step) == (1, 2)
    assert learner.optimizer.param_groups[0]["momentum"] == 0.9


async def test_scheduled_betas_are_checked() -> None:
    model = tiny_model()
    learner: Learner[Any] = Learner(
        model,
        torch.optim.Adam(model.parameters(), lr=0.01),
        torch.nn.functional.cross_entropy,
        make_batches(2),
        callbacks=[ParamSchedule("betas", lambda t: (0.9, 1.5))],
    )
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    assert info.group_contains(
        ValueError, match=r"ParamSchedule: fn\(0\) returned \(0\.9, 1\.5\) .*'betas'.*in \[0, 1\)"
    )
    assert learner.state.step == 0


# -- 11. a metric function's error names the metric ------------------------------------------


def mean_correct(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (output.argmax(1) == targets).float().mean()


def returns(value: object) -> Callable[[Any, Any], Any]:
    return lambda output, targets: value


def raises(output: Any, targets: Any) -> Any:
    return 1 / 0


METRIC_ERRORS: dict[str, tuple[Callable[[Any, Any], Any], type[Exception], str]] = {
    "str": (returns("good"), TypeError, r"metric 'grade' returned 'good' \(str\), not one number"),
    "None": (returns(None), TypeError, r"metric 'grade' returned None \(NoneType\), not one"),
    "raises": (raises, ZeroDivisionError, r"raised by metric 'grade'"),
}


@pytest.mark.parametrize(
    ("fn", "error", "message"), METRIC_ERRORS.values(), ids=METRIC_ERRORS.keys()
)
async def test_a_failing_metric_function_is_named(
    fn: Callable[[Any, Any], Any], error: type[Exception], message: str
) -> None:
    metrics = Metrics({"ok": mean_correct, "grade": fn})
    learner = make_learner(callbacks=[metrics], n_batches=2)
    with pytest.raises(ExceptionGroup) as info:
        await learner.fit(1)
    assert info.group_contains(error, match=message)
    assert info.group_contains(error, match=r"callback 'Metrics'")


async def test_metric_functions_returning_floats_still_work() -> None:
    metrics = Metrics({"half": returns(0.5), "ok": mean_correct})
    learner = make_learner(callbacks=[metrics], n_batches=2)
    await learner.fit(1)
    assert learner.state.metrics["train_half"] == pytest.approx(0.5)
