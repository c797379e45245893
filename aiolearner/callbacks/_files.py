"""Checkpoint files: reading them back, and writing them so that a crash never tears one.

* **Reading**: :func:`load_checkpoint_file` (``torch.load(weights_only=True)``, never arbitrary
  pickles, or the ``safetensors`` package) and :func:`load_weights`, which loads the weights of
  any checkpoint into a model, compiled or not. :func:`check_crcs` first compares every record of
  a ``torch.save`` file with the checksum written beside it, which ``torch.load`` does not.
* **Writing atomically**: :func:`atomic_write` and :func:`atomic_write_file` write a temporary file
  in the same directory, ``fsync`` it, ``os.replace`` it onto the target, then ``fsync`` the
  directory, so a crash leaves the old file or the new one. The loggers and the profiler write
  their files with them too.
* **Temporaries a crash left**: :func:`remove_stray_temporaries` removes them at a run's start,
  leaving alone the ones this process is writing now.
* **Where files go**: :func:`check_directory` refuses a directory that cannot hold them,
  :func:`check_name` a file name that is not a plain name in it.

``_checkpoint.py`` decides what is written, and when.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.nn.parameter import is_lazy

from aiolearner import match_state_dict

from ._optional import require

__all__ = [
    "SAFETENSORS_USER",
    "SUFFIXES",
    "atomic_write",
    "atomic_write_file",
    "as_path",
    "best_from_state",
    "check_directory",
    "check_file",
    "check_name",
    "copy_into",
    "is_full_checkpoint",
    "load_checkpoint_file",
    "load_weights",
    "read_torch_file",
    "read_weights",
    "remove_stray_temporaries",
    "snapshot",
    "save_safetensors",
]


# Indirections so tests can simulate a crash at each point of a write.
_replace = os.replace
_fsync = os.fsync

#: File suffix of each ``format``.
SUFFIXES = {"torch": ".pt", "safetensors": ".safetensors"}
SAFETENSORS_USER = "Checkpoint(format='safetensors')"


def is_full_checkpoint(data: Mapping[str, Any]) -> bool:
    """Whether ``data`` is a learner checkpoint (``Learner.state_dict()``), not bare weights."""
    return "format" in data and isinstance(data.get("model"), Mapping)


def check_crcs(path: str | os.PathLike[str]) -> None:
    """Refuse a ``torch.save`` file whose data no longer matches its checksums.

    ``torch.save`` writes a zip archive with a CRC-32 for each record, but ``torch.load`` never
    compares them: a flipped bit inside a tensor's data loads as a wrong weight. Reading every
    record once costs a pass over the file, small beside what loading it costs. A file that is
    not a zip archive (truncated, another format) is left to ``torch.load``, which reports it.

    Raises:
        ValueError: naming the file and the first damaged record.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError):
        return
    if damaged is not None:
        raise ValueError(
            f"checkpoint file {str(path)!r} is damaged: its record {damaged!r} does not match "
            "the checksum written with it (a disk or copy error); nothing was loaded"
        )


def read_torch_file(path: Path, device: torch.device | str) -> Any:
    """A ``torch.save`` file's contents (``weights_only=True``, its checksums compared first),
    or a clear error naming it."""
    check_crcs(path)
    return _read(path, lambda: torch.load(path, map_location=device, weights_only=True))


def _read(path: Path, reader: Callable[[], Any]) -> Any:
    try:
        return reader()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:
        raise ValueError(
            f"cannot read checkpoint file {str(path)!r}: it is damaged (truncated?) or not a "
            f"checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def load_checkpoint_file(
    path: str | os.PathLike[str], *, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Read a checkpoint file, onto the CPU.

    A ``.safetensors`` file is read with the ``safetensors`` package; any other file with
    ``torch.load(weights_only=True)`` (never arbitrary pickles). The result is the learner's
    ``state_dict()`` for a full checkpoint, the weights for a weights-only file.

    Args:
        path: the file.
        model: when given, the weights (``result["model"]`` of a full checkpoint, the result
            itself for a weights-only file) come back keyed for this model: files saved from a
            compiled model (``torch.compile``) load into a plain one and the other way round (see
            :func:`aiolearner.match_state_dict`).

    Raises:
        ValueError: the file holds no dict of a checkpoint or of weights, or its data does not
            match the checksums ``torch.save`` wrote with it (see :func:`check_crcs`).
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a checkpoint file's path, got {type(path).__name__}")
    path = Path(path)
    if path.suffix == SUFFIXES["safetensors"]:
        st = require("safetensors.torch", extra="safetensors", what="reading .safetensors files")
        data = _read(path, lambda: st.load_file(str(path), device="cpu"))
    else:
        data = read_torch_file(path, "cpu")
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint or weights dict")
    out: dict[str, Any] = data
    if model is not None:
        if is_full_checkpoint(out):
            out["model"] = match_state_dict(model, out["model"])
        else:
            out = match_state_dict(model, out)
    return out


def load_weights(
    model: torch.nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
) -> Any:
    """Load model weights from a checkpoint into ``model``, compiled or not.

    ``source`` is a checkpoint file (full, weights-only or ``.safetensors``) or what
    :func:`load_checkpoint_file` returned; only the weights are loaded (the optimizer, counters
    and the rest of a full checkpoint are left alone). Reading a file blocks: from async code,
    ``await anyio.to_thread.run_sync(load_weights, model, path)``.

    Returns:
        What ``model.load_state_dict`` returns (the missing and unexpected keys).

    Raises:
        ValueError: the file cannot be read, or a weight's shape differs from the model's;
            nothing is loaded.
        RuntimeError: torch's, for weights missing or extra with ``strict``; the weights loaded
            before it are put back.

    Example:
        >>> model = make_model()                        # or torch.compile(make_model())
        >>> load_weights(model, "runs/ckpt/best-epoch-0007-step-00000700.pt")
        <All keys matched successfully>
    """
    named = isinstance(source, str | os.PathLike)
    data = load_checkpoint_file(source) if isinstance(source, str | os.PathLike) else dict(source)
    weights = match_state_dict(model, data["model"] if is_full_checkpoint(data) else data)
    where = f"checkpoint file {str(source)!r}" if named else "the weights given"
    current = model.state_dict()
    for key, value in weights.items():
        mine = current.get(key)
        if (
            isinstance(value, torch.Tensor)
            and isinstance(mine, torch.Tensor)
            and not is_lazy(mine)  # (a lazy module takes its shape from the weights)
            and value.shape != mine.shape
        ):
            raise ValueError(
                f"{where} does not fit the model: {key!r} is {tuple(value.shape)} there and"
                f" {tuple(mine.shape)} in the model (another architecture?); nothing was loaded"
            )
    # All or nothing: what torch refuses half way (a missing weight with ``strict``, a module's
    # own loading rules) puts back the weights copied in before it (kept on the CPU).
    kept = {
        k: v.detach().to("cpu", copy=True)
        for k, v in current.items()
        if isinstance(v, torch.Tensor) and not is_lazy(v)
    }
    try:
        return model.load_state_dict(weights, strict=strict)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            model.load_state_dict(kept, strict=False)
        exc.add_note(f"aiolearner: loading {where} failed; the model's weights were put back")
        raise


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not every platform can open a directory (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform dependent
        return
    try:
        _fsync(fd)
    finally:
        os.close(fd)


#: The temporary files of :func:`atomic_write`: ``.<target name>.<32 hex digits>.tmp``.
_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")
# The temporary files being written in this process now (another learner's Checkpoint may write
# to the same directory): the clean-up at a run's start leaves them alone.
_WRITING: set[Path] = set()
_WRITING_LOCK = threading.Lock()


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A fresh temporary path next to ``path``, known as being written while in use."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with _WRITING_LOCK:
        _WRITING.add(tmp)
    try:
        yield tmp
    finally:
        with _WRITING_LOCK:
            _WRITING.discard(tmp)


def remove_stray_temporaries(directory: Path, targets: Iterable[str] | None = None) -> list[str]:
    """Remove the temporary files a writer that crashed (or was killed) left in ``directory``
    (only those of the files named ``targets``, when given); the names removed. A write in
    progress in this process keeps its file."""
    prefixes = None if targets is None else tuple(f".{name}." for name in targets)
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    with _WRITING_LOCK:
        writing = set(_WRITING)
    for entry in entries:
        if not _TMP_NAME.match(entry.name) or directory / entry.name in writing:
            continue
        if prefixes is not None and not entry.name.startswith(prefixes):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def as_path(value: object, who: str, what: str) -> Path:
    """``value`` as a path, or a TypeError naming the argument (``None``, a number)."""
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{who}: {what} must be a path (a str or a Path), got {value!r}")
    return Path(value)


def check_directory(directory: object, who: str) -> Path:
    """Refuse a directory that is a file, or that cannot be created (a file on its path, or a
    parent this process may not write to); returns it as a path."""
    directory = as_path(directory, who, "the directory")
    if directory.exists():
        if not directory.is_dir():
            raise ValueError(f"{who}: {str(directory)!r} is a file, not a directory")
        return directory
    parent = directory.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"{who}: cannot create directory {str(directory)!r}: {str(parent)!r} is a file"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"{who}: cannot create directory {str(directory)!r}: no permission to write in"
            f" {str(parent)!r}"
        )
    return directory


def check_file(path: object, who: str, example: str) -> Path:
    """Refuse a file path that is a directory, or whose directory cannot be created."""
    path = as_path(path, who, "the path")
    if path.is_dir():
        raise ValueError(
            f"{who}: {str(path)!r} is a directory, not a file: give a file's path, such as "
            f"{str(path / example)!r}"
        )
    check_directory(path.parent, who)
    return path


def best_from_state(state: Mapping[str, Any], monitor: str | None, mode: str) -> list[Any]:
    """The best files a Checkpoint's saved state lists (name, score, epoch, step), if they
    were judged as this one judges; none (with a warning) if by another metric or direction:
    their scores would be compared with this one's, and the wrong files kept and pruned. Their
    files stay on disk, untouched."""
    entries = state.get("best", [])
    saved = (state.get("monitor", monitor), state.get("mode", mode))
    if entries and saved != (monitor, mode):
        warnings.warn(
            f"Checkpoint(monitor={monitor!r}, mode={mode!r}): the checkpoint's best files were "
            f"judged by {saved[0]!r} (mode {saved[1]!r}); they are not taken as this one's best"
            " (their files stay where they are)",
            stacklevel=3,
        )
        return []
    return [
        {
            "name": check_name(e["name"]),
            "score": float(e["score"]),
            "epoch": int(e["epoch"]),
            "step": int(e["step"]),
        }
        for e in entries
    ]


def check_name(name: object) -> str:
    """A checkpoint file name must be a plain name in the directory, never a path."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or Path(name).name != name
    ):
        raise ValueError(f"invalid checkpoint file name {name!r}: it must be a plain file name")
    return name


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    ``data`` is the bytes, or a function that writes them to the open file.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            _fsync(f.fileno())

    with _temporary(path) as tmp:
        _install(path, tmp, write)


def atomic_write_file(path: Path, write: Callable[[Path], object]) -> None:
    """Like :func:`atomic_write`, for writers that take a file name (``write(temporary path)``)."""

    def write_synced(tmp: Path) -> None:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            _fsync(fd)
        finally:
            os.close(fd)

    with _temporary(path) as tmp:
        _install(path, tmp, write_synced)


def _install(path: Path, tmp: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` (which syncs it), then ``tmp`` replaces ``path`` and the directory entry is
    synced; a failure removes ``tmp``."""
    try:
        write(tmp)
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_safetensors(weights: Mapping[str, Any], meta: Mapping[str, str], path: Path) -> None:
    st = require("safetensors.torch", extra="safetensors", what=SAFETENSORS_USER)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"Checkpoint(format='safetensors'): the model's state_dict entry {key!r} is a"
                f" {type(value).__name__}; safetensors files hold tensors only (use"
                " format='torch')"
            )
        tensors[key] = value.contiguous()
    st.save_file(tensors, str(path), metadata=dict(meta))


def copy_into(source: Path, f: BinaryIO) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, f, 4 << 20)


def read_weights(path: Path) -> dict[str, Any]:
    data = load_checkpoint_file(path)
    weights: dict[str, Any] = data["model"] if is_full_checkpoint(data) else data
    return weights


#: A planned write of a best file: ((epoch, step) it was judged at, its name, files it drops).
NamedPlan = tuple[tuple[int, int], str | None, list[str]]


def plan_to_portable(plan: NamedPlan | None) -> dict[str, Any] | None:
    """A planned best-file write in a checkpoint (plain lists, strings and ints)."""
    if plan is None:
        return None
    return {"at": list(plan[0]), "name": plan[1], "dropped": list(plan[2])}


def plan_from_portable(saved: Any) -> NamedPlan | None:
    """Undo :func:`plan_to_portable`, checking every name is a plain file name."""
    if saved is None:
        return None
    name = saved["name"]
    return (
        (int(saved["at"][0]), int(saved["at"][1])),
        None if name is None else check_name(name),
        [check_name(n) for n in saved["dropped"]],
    )


def snapshot(value: Any) -> Any:
    """A deep copy of a state dict whose tensors are detached CPU clones.

    Later training steps cannot change the copy; containers are rebuilt so that callbacks' own
    lists and dicts are not shared with it either.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach()
        return t.clone() if t.device.type == "cpu" else t.to("cpu")
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snapshot(v) for v in value]
    if isinstance(value, tuple):
        return tuple(snapshot(v) for v in value)
    return value
