"""Reading an offline W&B run back from its ``.wandb`` file, with wandb's own record types.

wandb has no public reader for offline runs that works without a server: the file is a log of
``wandb_internal_pb2.Record`` protobuf messages (wandb's own schema) in LevelDB's log framing (a
7-byte file header, then 32 KiB blocks of chunks, each with a 4-byte checksum, a 2-byte
little-endian length and a 1-byte type: full, first, middle or last). The framing is unpacked
here; every message is decoded by wandb's protobuf classes.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7  # b":W&B", a 2-byte magic number and a 1-byte version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a .wandb file")
    pos = _HEADER
    pending = b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # too little room for a chunk header: padding
            pos += left_in_block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_records(path: Path) -> list[Any]:
    """Every record of a ``.wandb`` file, as ``wandb.proto.wandb_internal_pb2.Record``."""
    # Generated protobuf code: its classes are not visible to type checkers.
    pb: Any = importlib.import_module("wandb.proto.wandb_internal_pb2")
    records = []
    for payload in _payloads(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item: Any) -> str:
    # Newer wandb versions fill the repeated ``nested_key`` instead of ``key``.
    return str(item.key) or "/".join(item.nested_key)


def summarize(path: Path) -> dict[str, Any]:
    """What a test wants from a run: its id, config, history rows, artifacts and exit code."""
    run_id = None
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    artifacts: list[str] = []
    exit_code = None
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            for item in record.run.config.update:
                config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            history.append(row)
        elif kind == "artifact":
            artifacts.append(record.artifact.name)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {
        "id": run_id,
        "config": config,
        "history": history,
        "artifacts": artifacts,
        "exit_code": exit_code,
    }
