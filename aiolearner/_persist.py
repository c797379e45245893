"""A learner's persistent state: ``state_dict``, loading it back, checkpoint files.

What a checkpoint holds is everything needed to continue a run exactly: weights, optimizer,
counters and position in the epoch, every random generator's state (in a portable form that
``torch.load(weights_only=True)`` accepts), metrics and the callbacks' own states. Loading is
all or nothing: whatever is wrong with a checkpoint is found before anything changes, and a
failure half way puts everything back, so a failed load leaves the learner as it was.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import difflib
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import _optim
from ._callbacks import Callback
from ._exceptions import StopFit
from ._hparams import check_hparams
from ._rng import (
    capture_data_streams,
    capture_rng,
    restore_data_streams,
    restore_rng,
    rng_from_portable,
    rng_to_portable,
)
from ._snapshot import portable_dict, progress_from_portable, progress_to_portable
from ._validation import pending_in
from ._weights import match_state_dict, plain_state_dict

if TYPE_CHECKING:
    from ._learner import Learner
    from ._state import State

__all__ = ["find_checkpoint", "load_state_dict", "read_checkpoint", "state_dict"]

FORMAT = 1


def state_dict(learner: Learner[Any], snapshot: State | None = None) -> dict[str, Any]:
    """See :meth:`Learner.state_dict`.

    ``snapshot``: the state a concurrent validation's tail runs on. The result then holds the
    snapshot's weights, its epoch counted as complete and its metrics: the validated weights,
    as a run that stops there would continue from them; the optimizer, random and callback
    states are the live ones (nothing else was copied with the snapshot).
    """
    state = learner._state
    rt = learner._rt
    train = learner._train
    with train.draw_lock:
        # A producer thread may be drawing a batch ahead: the random states and the count of
        # batches drawn are read between two of its draws (see BatchSource.drawn).
        rng = capture_rng()
        data_streams = capture_data_streams(train.data)
        drawn = train.drawn
    pre = rt.pre_mark
    if (
        snapshot is None
        and pre is not None
        and pre[:2] == (state.epoch, state.step)
        and not rt.pass_done
    ):
        # Taken before this step's batch is computed (a save point before the step): the
        # random state from before the batch was drawn, which a resumed run draws it from
        # again (augmentation drawn while fetching gets the same numbers, dropout after it).
        # (Not once the pass has ended: that draw found no batch.)
        rng, drawn = pre[2]
        undone = None
    else:
        # A batch undone without a mark, kept to be served again (BatchSource.keep_undone):
        # the file holds it, so that a resumed run trains on the same numbers.
        undone = (
            train.undone if train.undone is not None and _batch_portable(train.undone[0]) else None
        )
    callbacks: dict[str, Any] = {}
    for key, cb in callback_keys(learner._callbacks):
        callbacks[key] = dict(cb.state_dict())
    if snapshot is not None:
        model = snapshot.model
        progress: dict[str, Any] = {
            "epoch": snapshot.epoch + 1,
            "step": snapshot.step,
            "batch_index": 0,
            "pass_done": False,
            "val_done": False,
            "val_after": False,
            "hooks": {},
            "validation": None,
            "train_losses": [],
            "stream": None,
            "drawn": 0,
        }
        metrics = snapshot.metrics
        validation = None
        tested = rt.tested_keys(metrics)
    else:
        model = learner.model
        progress = {
            "epoch": state.epoch,
            "step": state.step,
            "batch_index": state.batch_index,
            "pass_done": rt.pass_done,
            "val_done": rt.val_done,
            "val_after": rt.val_after,
            "stop_after_epoch": (
                None if rt.stop_after_epoch is None else rt.stop_after_epoch.reason
            ),
            "unseen_stop": rt.unseen_stop,
            "hooks": progress_to_portable(rt.hook_progress),
            # Read again when the run resumes in an interrupted after_validate.
            "validation": _validation_to_portable(state),
            "train_losses": [x.detach().float().cpu().reshape(()) for x in rt.train_losses],
            "stream": _stream_to_portable(train.stream_state(state.batch_index)),
            "drawn": drawn,
        }
        if undone is not None:
            progress["undone"] = undone[0]
        metrics = state.metrics
        # Concurrent validation: the epochs' tails still to run, with their snapshots.
        validation = None if rt.validator is None else rt.validator.state_dict()
        tested = rt.tested_keys(metrics)
        if validation is not None and tested:
            validation["overlay"] = {
                k: v for k, v in validation["overlay"].items() if k not in tested
            }
    epoch_rng = None if snapshot is not None else rt.epoch_rng
    return {
        "format": FORMAT,
        # Keys as the uncompiled model has them: the file loads into either form.
        "model": plain_state_dict(model.state_dict()),
        # "optimizer" for one optimizer (as always), "optimizers" by name for several.
        **_optim.to_checkpoint(state.optimizers),
        "progress": progress,
        # (Not a test's results: they belong to the weights tested, and end when fit starts.)
        "metrics": {k: v for k, v in metrics.items() if _portable(v) and k not in tested},
        "rng": rng_to_portable(rng),
        # The training data's own generators and epoch samplers now (an epoch that starts
        # after this point draws from them), and the whole random state the current epoch's
        # pass began from (to rebuild it; none for a snapshot, whose epoch is complete).
        "data_streams": data_streams,
        "epoch_rng": None if epoch_rng is None else rng_to_portable(epoch_rng["rng"]),
        "epoch_streams": None if epoch_rng is None else _own_streams(epoch_rng),
        "callbacks": callbacks,
        "hparams": check_hparams(learner.hparams),
        "validation": validation,
        "val_streams": _val_streams(learner, snapshot),
    }


def _val_streams(learner: Learner[Any], snapshot: State | None) -> list[Any]:
    """Each validation set's own random streams (a loader's ``generator``): where the next
    validation draws its order from, or, for one a run left unfinished, where it began (see
    ``Runtime.val_begun``). A concurrent tail's snapshot holds the streams its own pass left."""
    rt = learner._rt
    left = None if snapshot is None else snapshot.__dict__.get("_val_streams")
    kept = []
    for name, source in rt.val_sets.items():
        streams = (left or {}).get(name) or rt.val_begun.get(name)
        if streams is None:
            streams = capture_data_streams(source.data)
        if streams["generators"] or streams["epochs"]:  # (a list has none)
            kept.append([name, streams])
    return kept


def _restore_val_streams(learner: Learner[Any], saved: Any) -> None:
    """Undo :func:`_val_streams`. Validation data built differently (another set, a loader
    without its generator; none at all, to predict) does not keep the checkpoint from loading:
    only the orders its passes draw can differ, and a warning says so."""
    rt = learner._rt
    rt.val_begun.clear()
    for name, streams in saved or ():
        source = rt.val_sets.get(name)
        if source is None:
            continue
        try:
            restore_data_streams(source.data, streams, what=source.name)
        except ValueError as exc:
            warnings.warn(
                f"{exc}; its passes will draw other orders than the run that saved the checkpoint",
                stacklevel=5,
            )


def load_state_dict(learner: Learner[Any], checkpoint: Mapping[str, Any]) -> None:
    """See :meth:`Learner.load_state_dict`: all or nothing."""
    try:
        _load_state_dict(learner, checkpoint)
    except KeyError as exc:  # (what was loaded was put back, as for any failure)
        raise ValueError(
            f"the checkpoint lacks the entry {exc.args[0]!r} (damaged, or not written by "
            "Learner.state_dict()); nothing was loaded"
        ) from exc


def _load_state_dict(learner: Learner[Any], checkpoint: Mapping[str, Any]) -> None:
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != FORMAT:
        what = (
            f"a mapping with keys {sorted(map(str, checkpoint))[:6]}"
            if isinstance(checkpoint, Mapping)
            else type(checkpoint).__name__
        )
        if isinstance(checkpoint, Mapping) and "format" in checkpoint and "model" in checkpoint:
            what = (
                f"a checkpoint of format {checkpoint['format']!r}, written by another version "
                "of aiolearner"
            )
        elif (
            isinstance(checkpoint, Mapping)
            and checkpoint
            and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        ):
            what += (
                ", only weights (a weights-only file, or a model's state_dict()): load them "
                "with aiolearner.callbacks.load_weights(model, path)"
            )
        raise ValueError(
            f"not an aiolearner checkpoint (Learner.state_dict() of this version, format "
            f"{FORMAT}): got {what}"
        )
    weights = match_state_dict(learner.model, checkpoint["model"])
    _check_model(learner.model, weights)
    state = learner._state
    rt = learner._rt
    validator = rt.validator
    if pending_in(checkpoint) and (validator is None or not validator.concurrent):
        raise ValueError(
            "the checkpoint was taken while concurrent validations were in flight; continue it"
            " with a learner built with validate='concurrent'; nothing was loaded"
        )
    optimizers = _optim.from_checkpoint(state.optimizers, checkpoint)
    live = learner._train.goes_on_at(
        (state.epoch, state.step, state.batch_index),
        tuple(_count(checkpoint["progress"], k) for k in ("epoch", "step", "batch_index")),
    )
    # What a failure half way must put back (the optimizer states are copied: load_state_dict
    # replaces them, but the tensors of the old ones may be shared with nobody else).
    saved: dict[str, Any] = {
        "model": {k: v.detach().clone() for k, v in learner.model.state_dict().items()},
        "optimizers": [copy.deepcopy(opt.state_dict()) for opt, _, _ in optimizers],
        "counters": (state.epoch, state.step, state.batch_index),
        "metrics": state.metrics,
        "progress": rt.export_progress(),
        "validation": {
            k: state.__dict__[k] for k in ("validation", "validation_tag") if k in state.__dict__
        },
        "hooks": dict(rt.hook_progress),
        "validator": None if validator is None else validator.export(),
        "rng": capture_rng(),
        "data_streams": capture_data_streams(learner._train.data),
        "val_streams": (
            dict(rt.val_begun),
            [(source, capture_data_streams(source.data)) for source in rt.val_sets.values()],
        ),
        "callbacks": [(cb, dict(cb.state_dict())) for cb in learner._callbacks],
    }
    try:
        learner.model.load_state_dict(weights)
        for opt, opt_state, saved_by in optimizers:
            _optim.load(opt, opt_state, saved_by)
        progress = checkpoint["progress"]
        epoch_rng = checkpoint.get("epoch_rng")
        new_epoch_rng = (
            None
            if epoch_rng is None
            else {"rng": rng_from_portable(epoch_rng), **(checkpoint.get("epoch_streams") or {})}
        )
        rng = rng_from_portable(checkpoint["rng"])
        state.epoch, state.step, state.batch_index = (
            _count(progress, key) for key in ("epoch", "step", "batch_index")
        )
        rt.pass_done = bool(progress["pass_done"])
        # Every batch the counters count was committed: the last one too (a stage finishing
        # the pass after it, such as an accumulation's short last group, relies on that).
        rt.context._committed = True
        rt.val_done = bool(progress.get("val_done", False))
        rt.val_after = bool(progress.get("val_after", False))
        stop = progress.get("stop_after_epoch")
        rt.stop_after_epoch = None if stop is None else StopFit(str(stop))
        unseen = progress.get("unseen_stop")
        rt.unseen_stop = None if unseen is None else str(unseen)
        validation = progress.get("validation")
        if validation is not None:
            state.validation = dict(validation["results"])
            state.validation_tag = (int(validation["tag"][0]), int(validation["tag"][1]))
        hooks = progress_from_portable(progress.get("hooks"))
        rt.hook_progress.clear()
        rt.hook_progress.update(hooks)
        rt.train_losses = [x.to(learner.device) for x in progress["train_losses"]]
        state.metrics = dict(checkpoint.get("metrics", {}))
        restore_rng(rng)
        data_streams = checkpoint.get("data_streams")
        if data_streams is not None:  # checkpoints from before they were captured have none
            restore_data_streams(learner._train.data, data_streams, what="train_data")
        rt.epoch_rng = new_epoch_rng
        _restore_val_streams(learner, checkpoint.get("val_streams"))
        stored = checkpoint.get("callbacks", {})
        keys = callback_keys(learner._callbacks)
        for key, cb in keys:
            if key in stored:
                try:
                    cb.load_state_dict(stored[key])
                except Exception as exc:
                    raise ValueError(
                        f"callback {cb.name!r} could not load its state from the checkpoint "
                        f"({type(exc).__name__}: {exc}; the state saved for it has the keys "
                        f"{sorted(map(str, stored[key]))[:8]}); nothing was loaded"
                    ) from exc
        _warn_other_callbacks(stored, keys)
        stream = _stream_from_portable(progress.get("stream"))
        if validator is not None:
            validator.load_state_dict(checkpoint.get("validation"), state)
    except BaseException:
        learner.model.load_state_dict(saved["model"])
        for (opt, _, _), opt_state in zip(optimizers, saved["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        state.epoch, state.step, state.batch_index = saved["counters"]
        state.metrics = saved["metrics"]
        rt.restore_progress(saved["progress"])
        state.invalidate("validation", "validation_tag")
        state.__dict__.update(saved["validation"])
        rt.hook_progress.clear()
        rt.hook_progress.update(saved["hooks"])
        if validator is not None:
            validator.restore(saved["validator"])
        restore_rng(saved["rng"])
        restore_data_streams(learner._train.data, saved["data_streams"], what="train_data")
        begun, val_streams = saved["val_streams"]
        rt.val_begun = begun
        for source, streams in val_streams:
            restore_data_streams(source.data, streams, what=source.name)
        for cb, cb_state in saved["callbacks"]:
            # (One whose loading is what failed may fail again: the first error is the one.)
            with contextlib.suppress(Exception):
                cb.load_state_dict(cb_state)
        raise
    if live:
        return  # the generator goes on where it is, which is where the checkpoint was taken
    # Iterators of an earlier run cannot continue a restored one; a stream that outlives
    # epochs (steps_per_epoch) restarts where the checkpoint's stream was.
    learner._train.restart(stream, int(checkpoint["progress"].get("drawn", 0)))
    if "undone" in checkpoint["progress"]:
        learner._train.keep_undone(checkpoint["progress"]["undone"])


def _count(progress: Mapping[str, Any], key: str) -> int:
    """A counter of the checkpoint's progress: a whole number, not negative."""
    value = progress[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"the checkpoint's progress has {key}={value!r}, not a count (damaged, or not "
            "written by Learner.state_dict()); nothing was loaded"
        )
    return value


def _check_model(model: torch.nn.Module, weights: Any) -> None:
    """Refuse weights that do not fit the model before any of them is copied in."""
    if not isinstance(weights, Mapping):
        raise ValueError("the checkpoint's 'model' entry is not a state dict")
    mine = model.state_dict()
    missing = sorted(set(mine) - set(weights))
    unexpected = sorted(set(weights) - set(mine))
    wrong = sorted(
        k
        for k in set(mine) & set(weights)
        if isinstance(weights[k], torch.Tensor) and weights[k].shape != mine[k].shape
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"shape mismatch for {k!r}: checkpoint {tuple(weights[k].shape)}, model "
                f"{tuple(mine[k].shape)}"
                + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")
            )
        raise ValueError(
            "the checkpoint's weights do not fit this model (another architecture?): "
            + "; ".join(parts)
            + "; nothing was loaded"
        )


def read_checkpoint(path: Path, device: torch.device) -> Any:
    """The contents of a checkpoint file (``weights_only=True``, its checksums compared first),
    or a clear error naming it."""
    from .callbacks._files import read_torch_file  # the file helpers live with the Checkpoint

    if path.is_dir():
        raise IsADirectoryError(
            f"cannot read checkpoint {str(path)!r}: it is a directory; pass a checkpoint file "
            f"in it (such as {str(path / 'last.pt')!r})"
        )
    return read_torch_file(path, device)


def find_checkpoint(callbacks: Sequence[Callback], resume: str | os.PathLike[str]) -> Path:
    """The file ``fit(resume=...)`` means: ``"last"`` or ``"best"`` (asks the callbacks), or a
    path."""
    if resume in ("last", "best"):
        for cb in callbacks:
            finder = getattr(cb, "find_checkpoint", None)
            if finder is not None:
                found = finder(resume)
                if found is not None:
                    return Path(found)
        if resume == "best":
            # A fresh learner's callbacks know no best file yet: their state in the last
            # checkpoint does (asked of a copy, the callback itself stays as it is).
            for key, cb in callback_keys(callbacks):
                found = _best_by_last(key, cb)
                if found is not None:
                    return found
        weights_only = any(getattr(cb, "save_weights_only", False) for cb in callbacks)
        raise FileNotFoundError(
            f"resume={resume!r} found no checkpoint: no callback (such as "
            "aiolearner.callbacks.Checkpoint"
            + (" with a monitor" if resume == "best" else "")
            + ") has written one yet"
            + (
                " (a Checkpoint with save_weights_only=True writes weights alone, which cannot "
                "resume a run: load them with aiolearner.callbacks.load_weights)"
                if weights_only
                else ""
            )
        )
    if not isinstance(resume, str | os.PathLike):
        raise TypeError(
            f"resume must be 'last', 'best' or a path to a checkpoint file, got "
            f"{type(resume).__name__} {resume!r}"
        )
    path = Path(resume)
    if not path.is_file():
        hint = ""
        if path.is_dir():
            hint = f" ({str(path)!r} is a directory: pass a file in it, such as its last.pt)"
        elif isinstance(resume, str):
            close = difflib.get_close_matches(resume, ["last", "best"], n=1, cutoff=0.6)
            hint = f" (did you mean resume={close[0]!r}?)" if close else ""
        raise FileNotFoundError(f"resume: no checkpoint file at {path}{hint}")
    return path


def _warn_other_callbacks(stored: Mapping[str, Any], keys: list[tuple[str, Callback]]) -> None:
    """Warn when the checkpoint's callbacks with a state and the learner's differ: a state
    that no callback takes (an EMA average) is dropped, and a callback the checkpoint has no
    state for starts afresh (as a Lightning user is warned)."""
    mine = {key for key, _ in keys}
    dropped = sorted(key for key, value in stored.items() if value and key not in mine)
    fresh = sorted(key for key, cb in keys if key not in stored and cb.state_dict())
    if dropped or fresh:
        parts = []
        if dropped:
            parts.append(
                f"the state of callbacks {dropped}, which this learner does not have, was not "
                "loaded"
            )
        if fresh:
            parts.append(f"callbacks {fresh} have no state in it and start afresh")
        warnings.warn(
            "the checkpoint was written by a learner with other callbacks: "
            + "; ".join(parts)
            + " (build the learner with the same callbacks to resume exactly)",
            UserWarning,
            stacklevel=4,
        )


def _best_by_last(key: str, cb: Callback) -> Path | None:
    """The best file ``cb`` names in its state in its own last checkpoint, if any."""
    finder = getattr(cb, "find_checkpoint", None)
    last = None if finder is None else finder("last")
    if last is None:
        return None
    stored = read_checkpoint(Path(last), torch.device("cpu")).get("callbacks", {}).get(key)
    if stored is None:
        return None
    probe = copy.copy(cb)
    probe.load_state_dict(stored)
    found = probe.find_checkpoint("best")  # type: ignore[attr-defined]
    return None if found is None else Path(found)


def _validation_to_portable(state: State) -> dict[str, Any] | None:
    d = state.__dict__
    results, tag = d.get("validation"), d.get("validation_tag")
    if results is None or tag is None:
        return None
    return {"results": portable_dict(results), "tag": [int(tag[0]), int(tag[1])]}


def _own_streams(begun: dict[str, Any]) -> dict[str, Any] | None:
    """The data source's own part of a pass's start state (``None`` in one restored from a
    checkpoint written before it was captured)."""
    if "generators" not in begun:
        return None
    return {"generators": list(begun["generators"]), "epochs": list(begun["epochs"])}


def _stream_to_portable(stream: tuple[int, dict[str, Any] | None] | None) -> Any:
    if stream is None:
        return None
    origin, begun = stream
    if begun is None:
        return {"origin": origin, "rng": None}
    return {"origin": origin, "rng": rng_to_portable(begun["rng"]), "own": _own_streams(begun)}


def _stream_from_portable(stream: Any) -> tuple[int, dict[str, Any] | None] | None:
    if stream is None:
        return None
    rng = stream["rng"]
    if rng is None:
        return int(stream["origin"]), None
    return int(stream["origin"]), {"rng": rng_from_portable(rng), **(stream.get("own") or {})}


def _batch_portable(batch: object) -> bool:
    """Whether a batch goes into a checkpoint as it is: tensors, numbers and strings, in lists,
    tuples and dicts with string keys (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(batch, torch.Tensor | int | float | str | bool | None):
        return True
    if type(batch) in (list, tuple):
        return all(_batch_portable(item) for item in batch)  # type: ignore[attr-defined]
    if type(batch) is dict:
        items: dict[Any, Any] = batch
        return all(isinstance(k, str) and _batch_portable(v) for k, v in items.items())
    return False


#: What ``torch.load(weights_only=True)`` reads back, besides containers of it: these types
#: exactly (a subclass, numpy's float64 or an IntEnum, is refused by the loader), and tensors.
_LOADABLE = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray})
_LOADABLE_KINDS = (torch.Tensor, torch.Size, torch.dtype, torch.device)
_CONTAINERS = frozenset({list, tuple, set})
_MAPPINGS = frozenset({dict, collections.OrderedDict, collections.Counter})


def unloadable(value: object, where: str) -> str | None:
    """Where in ``value`` (a callback's state) is something a checkpoint could not be loaded
    back with (``torch.load(weights_only=True)``), and what: ``None`` if nothing is."""
    kind = type(value)
    if kind in _LOADABLE or isinstance(value, _LOADABLE_KINDS):
        return None
    if kind in _CONTAINERS:
        items: Any = value
        for i, item in enumerate(items):
            found = unloadable(item, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if kind in _MAPPINGS:
        mapping: Any = value
        for key, item in mapping.items():
            found = unloadable(key, f"{where} (a key)") or unloadable(item, f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    if kind in torch.serialization.get_safe_globals():
        return None  # registered by the user (torch.serialization.add_safe_globals)
    return (
        f"{where}: a {kind.__module__}.{kind.__qualname__}"
        if kind.__module__ != "builtins"
        else f"{where}: a {kind.__qualname__}"
    )


def _portable(value: object) -> bool:
    return isinstance(value, int | float | str | bool) or (
        isinstance(value, torch.Tensor) and value.numel() == 1
    )


def callback_keys(callbacks: Sequence[Callback]) -> list[tuple[str, Callback]]:
    """Each callback with the key its state has in a checkpoint (its name, numbered if shared)."""
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        n = seen.get(cb.name, 0)
        seen[cb.name] = n + 1
        out.append((cb.name if n == 0 else f"{cb.name}#{n}", cb))
    return out
