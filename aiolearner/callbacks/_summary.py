"""A model summary: the module tree, output shapes for a sample batch, parameter counts.

The shapes come from one forward pass of the sample batch with a forward hook on every module,
under ``torch.inference_mode`` with the model in eval mode: no autograd graph, no batch-norm
statistics updated, dropout off. Afterwards the model is exactly as it was (each module's
train/eval mode restored, hooks removed) and so are the random number generators (the pass runs
inside ``torch.random.fork_rng``), so taking a summary never changes what training does next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aiolearner import Learner, LearnerBusyError, LearnerStatus, split_batch, unwrap_model

__all__ = ["LayerSummary", "ModelSummary", "model_summary"]


@dataclass(frozen=True, slots=True)
class LayerSummary:
    """One module of the tree.

    Attributes:
        name: its qualified name in the model (``"encoder.0"``; ``""`` for the model itself).
        type: its class name.
        depth: 0 for the model, 1 for its children, ...
        output_shape: the shape of its output for the sample batch: a tuple of ints for a
            tensor, a list or dict of those for a tuple, list or dict output; ``None`` without a
            sample batch, or when the module was not called.
        calls: how many times the forward pass called it (a shared module: more than once; its
            ``output_shape`` is that of the first call).
        params: parameters of the module and its submodules (each counted once).
        trainable: those of them with ``requires_grad``.
    """

    name: str
    type: str
    depth: int
    output_shape: Any
    calls: int
    params: int
    trainable: int


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """What :func:`model_summary` returns; ``str()`` of it is a table.

    Attributes:
        rows: the modules, in ``named_modules()`` order (parents before children).
        total_params: parameters of the model (shared ones counted once).
        trainable_params: those with ``requires_grad``.
        frozen_params: those without.
        param_bytes: the memory the parameters take.
        buffer_count: elements of the model's buffers (batch-norm statistics, ...).
        input_shape: the shape of the sample inputs, like ``output_shape``; ``None`` without.
    """

    rows: tuple[LayerSummary, ...]
    total_params: int
    trainable_params: int
    frozen_params: int
    param_bytes: int
    buffer_count: int
    input_shape: Any = None

    def __str__(self) -> str:
        shapes = self.input_shape is not None
        header = ["Layer (type)", *(["Output shape"] if shapes else []), "Params", "Trainable"]
        table = [header]
        for row in self.rows:
            label = f"{row.name} ({row.type})" if row.name else row.type
            if row.calls > 1:
                label += f" x{row.calls}"
            cells = ["  " * row.depth + label]
            if shapes:
                cells.append(format_shape(row.output_shape))
            cells += [f"{row.params:,}", f"{row.trainable:,}"]
            table.append(cells)
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines = []
        for cells in table:
            # Names and shapes read left to right; numbers line up on the right.
            parts = [
                cell.ljust(width) if j == 0 or (shapes and j == 1) else cell.rjust(width)
                for j, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ]
            lines.append("  ".join(parts).rstrip())
        rule = "-" * max(len(line) for line in lines)
        lines.insert(1, rule)
        lines.append(rule)
        if shapes:
            lines.append(f"Input shape: {format_shape(self.input_shape)}")
        lines.append(
            f"Params: {self.total_params:,} ({self.trainable_params:,} trainable,"
            f" {self.frozen_params:,} frozen), {format_bytes(self.param_bytes)}"
        )
        if self.buffer_count:
            lines.append(f"Buffers: {self.buffer_count:,} elements")
        return "\n".join(lines)


def format_shape(shape: Any) -> str:
    """``[5, 3]`` for a tensor's shape; nested lists and dicts of those as such; ``-`` if none."""
    if shape is None:
        return "-"
    if isinstance(shape, tuple):
        return "[" + ", ".join(str(n) for n in shape) + "]"
    if isinstance(shape, list):
        return "(" + ", ".join(format_shape(s) for s in shape) + ")"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k}: {format_shape(v)}" for k, v in shape.items()) + "}"
    return "?"


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(int(n) for n in value.shape)
    if isinstance(value, Mapping):
        return {str(k): _shape_of(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_shape_of(v) for v in value]
    return None


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    return value


def _count(module: torch.nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for p in module.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def model_summary(
    source: Learner[Any] | torch.nn.Module,
    batch: Any = None,
    *,
    max_depth: int | None = None,
) -> ModelSummary:
    """The layers, output shapes and parameter counts of a learner's model (or any module).

    Args:
        source: a :class:`~aiolearner.Learner` (its model, on its device) or a module. A model
            wrapped by ``torch.compile`` is summarized through the module it wraps (the pass
            runs uncompiled: no compilation for a summary).
        batch: a sample batch, as the training data gives it (``(inputs, targets)``) or inputs
            alone; it is moved to the model's device. Without it there are no output shapes.
        max_depth: leave out modules deeper than this (their parameters still count in their
            parents' rows and in the totals); ``None``: every module.

    Raises:
        LearnerBusyError: a sample batch is given while the learner trains (the pass would run
            against weights that training is changing).
        ValueError: ``max_depth`` is negative, or the model has lazy modules not initialized yet.
        Exception: what the model's forward pass raises for the sample batch.

    The forward pass blocks: from async code, ``await anyio.to_thread.run_sync(model_summary,
    learner, batch)``.

    Example:
        >>> print(model_summary(learner, next(iter(train_loader)), max_depth=1))
        Layer (type)        Output shape  Params  Trainable
        ---------------------------------------------------
        Sequential          [64, 10]      34,826     34,826
          0 (Conv2d)        [64, 16, 8, 8]   160        160
        ...
    """
    if max_depth is not None and max_depth < 0:
        raise ValueError(f"max_depth must be None or non-negative, got {max_depth}")
    if isinstance(source, Learner):
        if batch is not None and source.status is not LearnerStatus.IDLE:
            raise LearnerBusyError("run a summary's forward pass", source.status.value)
        model = source.model
        device: torch.device | None = source.device
    elif isinstance(source, torch.nn.Module):
        model = source
        device = None
    else:
        raise TypeError(
            f"model_summary takes a Learner or a torch.nn.Module, got {type(source).__name__}"
        )
    model = unwrap_model(model)
    lazy = [
        name
        for name, p in model.named_parameters()
        if isinstance(p, torch.nn.parameter.UninitializedParameter)
    ]
    if lazy:
        raise ValueError(
            f"model_summary: parameters {lazy} belong to lazy modules not initialized yet; run"
            " one batch through the model (or train one step) first"
        )
    modules = list(model.named_modules())
    shapes: dict[int, Any] = {}
    calls: dict[int, int] = {}
    input_shape = None
    if batch is not None:
        inputs = batch
        if isinstance(batch, tuple | list):
            inputs = split_batch(batch, "model_summary")[0]
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        inputs = _to(inputs, device)
        input_shape = _shape_of(inputs)
        _forward(model, modules, inputs, device, shapes, calls)
    rows = []
    for name, module in modules:
        depth = 0 if not name else name.count(".") + 1
        if max_depth is not None and depth > max_depth:
            continue
        total, trainable = _count(module)
        rows.append(
            LayerSummary(
                name=name,
                type=type(module).__name__,
                depth=depth,
                output_shape=shapes.get(id(module)),
                calls=calls.get(id(module), 0),
                params=total,
                trainable=trainable,
            )
        )
    total, trainable = _count(model)
    return ModelSummary(
        rows=tuple(rows),
        total_params=total,
        trainable_params=trainable,
        frozen_params=total - trainable,
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        buffer_count=sum(b.numel() for b in model.buffers()),
        input_shape=input_shape,
    )


def _rng_unchanged(device: torch.device) -> Any:
    """A context that puts back the CPU's and ``device``'s random states on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index
    if index is None:
        index = getattr(torch, device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _forward(
    model: torch.nn.Module,
    modules: list[tuple[str, torch.nn.Module]],
    inputs: Any,
    device: torch.device,
    shapes: dict[int, Any],
    calls: dict[int, int],
) -> None:
    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        key = id(module)
        calls[key] = calls.get(key, 0) + 1
        if key not in shapes:
            shapes[key] = _shape_of(output)

    modes = [(module, module.training) for _, module in modules]
    handles = [module.register_forward_hook(record) for _, module in modules]
    try:
        with _rng_unchanged(device), torch.inference_mode():
            model.eval()
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
