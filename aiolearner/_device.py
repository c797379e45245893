"""Moving batches to the training device ahead of use.

On CUDA the copy is issued from pinned memory with ``non_blocking=True`` on a side stream; the
consumer's stream waits on an event recorded after the copy and ``record_stream`` tells the
caching allocator that the consumer's stream uses the memory, so it is not reused too early.
On CPU nothing is copied unless a tensor lives elsewhere.

Host reads of CUDA results (the epoch's mean loss) wait on a polled CUDA event
(:func:`wait_ready`) rather than blocking the event loop in a synchronizing ``.item()``.
These CUDA paths are exercised only on a CUDA machine; the tests here run on CPU.
"""

from __future__ import annotations

from typing import Any

import anyio
import torch

__all__ = ["DeviceMover", "wait_ready"]


class DeviceMover:
    """Moves (nested) batches of tensors to one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        #: Training on the CPU where no other device is available: every batch is on the CPU
        #: already, so a move is the batch itself, with nothing to look at (unless
        #: ``move_inline`` was replaced, which then runs as written).
        self.identity = (
            device.type == "cpu"
            and type(self).move_inline is _MOVE_INLINE
            and not _accelerator_available()
        )
        self._stream: Any = None
        if self.cuda:
            self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]

    def move_inline(self, batch: Any) -> Any:
        """Move on the current stream (used on the event loop / the consumer's side)."""
        if self.identity:
            return batch
        if self.cuda:
            return _map(batch, lambda t: t.to(self.device, non_blocking=t.is_pinned()))
        # The common case (CPU training on CPU tensors) returns the batch itself: rebuilding
        # the containers costs a tenth of a tiny model's framework budget (docs/performance.md).
        # An (inputs, targets) pair of tensors is checked here, without a call (once a batch).
        kind = type(batch)
        if (kind is tuple or kind is list) and len(batch) == 2:
            first, second = batch
            if (
                type(first) is torch.Tensor
                and type(second) is torch.Tensor
                and first.is_cpu
                and second.is_cpu
            ):
                return batch
        if _on_cpu(batch):
            return batch
        return _map(batch, _to_cpu)

    def move_ahead(self, batch: Any) -> tuple[Any, Any]:
        """Move from a producer thread: pinned memory, side stream; returns (batch, event)."""
        if not self.cuda:
            return _map(batch, _to_cpu), None
        stream = self._stream
        with torch.cuda.stream(stream):
            moved = _map(
                batch,
                lambda t: (t if t.is_pinned() or not t.is_cpu else t.pin_memory()).to(
                    self.device, non_blocking=True
                ),
            )
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return moved, event

    def ready(self, batch: Any, event: Any) -> Any:
        """Make the consumer's stream wait for a batch moved by :meth:`move_ahead`."""
        if event is None:
            return batch
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        _map(batch, lambda t: (t.record_stream(current), t)[1] if t.is_cuda else t)
        return batch


async def wait_ready(tensor: torch.Tensor, *, poll: float = 0.0005) -> None:
    """Wait, without blocking the event loop, until a CUDA tensor's pending work is done.

    Reading a CUDA value on the host (``float(t)``, ``.item()``) blocks the calling thread until
    the GPU has caught up, which can be many queued batches: a CUDA event recorded now is polled
    instead, so the loop keeps running meanwhile. CPU tensors are ready at once.
    """
    if not tensor.is_cuda:
        return
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(tensor.device))
    # Polling on purpose: a CUDA event cannot wake the event loop, and a thread hop per read
    # would cost more than a few sleeps.
    while not event.query():  # type: ignore[no-untyped-call]  # noqa: ASYNC110
        await anyio.sleep(poll)


_MOVE_INLINE = DeviceMover.move_inline


def _accelerator_available() -> bool:
    """Whether this process may hold tensors on a device other than the CPU (a meta
    tensor aside, which no training step takes)."""
    accelerator = getattr(torch, "accelerator", None)  # (torch 2.6 and later)
    if accelerator is not None and accelerator.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or (xpu is not None and xpu.is_available())
    )


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_cpu else t.cpu()


def _on_cpu(batch: Any) -> bool:
    """Whether every tensor in a (nested) batch is on the CPU already."""
    t = type(batch)
    if t is torch.Tensor:
        return batch.is_cpu  # type: ignore[no-any-return]
    if t is tuple or t is list:
        for item in batch:
            if type(item) is torch.Tensor:
                if not item.is_cpu:
                    return False
            elif not _on_cpu(item):
                return False
        return True
    if t is dict:
        return all(_on_cpu(v) for v in batch.values())
    if isinstance(batch, torch.Tensor):
        return batch.is_cpu
    if isinstance(batch, tuple | list):
        return all(_on_cpu(b) for b in batch)
    return True


def _map(batch: Any, fn: Any) -> Any:
    t = type(batch)
    if t is torch.Tensor or isinstance(batch, torch.Tensor):
        return fn(batch)
    if t is tuple or t is list:
        return t(_map(b, fn) for b in batch)
    if t is dict:
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return t(*(_map(b, fn) for b in batch))
    return batch
