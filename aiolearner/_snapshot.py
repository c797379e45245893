"""What a concurrent validation works with: snapshots, tails, and the validator's own lane.

* :class:`Slot`: a shadow model, allocated once (a deep copy of the model) and refreshed in
  place under the weights' read lock.
* :class:`Tail`: one piece of work for the validator's worker: the validation of a snapshot, an
  epoch's ``after_epoch``, or both in that order, with the *records* (the training state's
  fields at the snapshot, ``metrics`` copied) they run on and how far they got.
* :class:`Lane`: the validator's compute worker (and CUDA stream) for one run.
* their portable forms, for checkpoints (``torch.load(weights_only=True)`` reads them).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ._data import BatchSource
from ._device import DeviceMover
from ._exceptions import ControlFlow, SkipBatch, StopEpoch, StopFit
from ._rng import (
    capture_data_streams,
    capture_rng,
    restore_data_streams,
    restore_rng,
    rng_from_portable,
    rng_to_portable,
)
from ._weights import match_state_dict, plain_state_dict
from ._worker import ComputeWorker

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._plan import HookProgress

__all__ = [
    "Lane",
    "Sets",
    "Slot",
    "Tail",
    "open_all",
    "preopened",
    "progress_from_portable",
    "progress_to_portable",
]

#: Validation data sets by name (``None``: a single ``val_data``).
Sets = dict[str | None, BatchSource]


class _Preopened:
    """Data whose iterator was created already (when the snapshot was taken); errors name
    the data it stands for (``described``)."""

    def __init__(self, it: Iterator[Any], of: object) -> None:
        self._it = it
        self.described = type(of).__name__

    def __iter__(self) -> Iterator[Any]:
        return self._it


class _PreopenedAsync:
    def __init__(self, it: Any, of: object) -> None:
        self._it = it
        self.described = type(of).__name__

    def __aiter__(self) -> Any:
        return self._it


def _failing(exc: BaseException) -> Iterator[Any]:
    """An iterator whose first fetch raises ``exc``."""
    raise exc
    yield  # (a generator)


def _open(source: BatchSource) -> Any:
    """A pass's iterator over ``source``, its first batch fetched already when that is possible:
    a shuffling sampler draws its order on the first fetch, not when the iterator is created,
    and the draw must happen now, under the snapshot's random state, not during the pass."""
    if source.is_async:
        return aiter(source.data)
    try:
        it = iter(source.data)
        first = next(it)
    except StopIteration:
        return iter(())
    except Exception as exc:
        # Raised by the tail's pass when it takes its first batch, as the sequential pass
        # would raise it, with the notes of a failed fetch and of the snapshot (not from
        # the training loop that took the snapshot).
        return _failing(exc)
    return itertools.chain([first], it)


def open_all(sets: Sets, item: Tail) -> dict[str | None, Any]:
    """Each set's iterator for ``item``'s pass, opened under its snapshot's random state (the
    global one is put back afterwards). The sets' own streams (a loader's ``generator``) are
    kept as they were before the first opening, and put back there for a later one (a tail
    run again after an interruption, or from a checkpoint): the pass draws the same orders."""
    assert item.rng is not None
    now = capture_rng()
    restore_rng(item.rng)
    try:
        if item.streams is None:
            item.streams = {name: capture_data_streams(s.data) for name, s in sets.items()}
        else:
            for name, source in sets.items():
                if name in item.streams:
                    restore_data_streams(source.data, item.streams[name], what=source.name)
        return {name: _open(source) for name, source in sets.items()}
    finally:
        restore_rng(now)


def preopened(
    sets: Sets, iterators: Mapping[str | None, Any], mover: Callable[[DeviceMover], DeviceMover]
) -> Sets:
    """Sources for one pass over iterators :func:`open_all` made, with the sets' options."""
    sources: Sets = {}
    for name, source in sets.items():
        it = iterators[name]
        sources[name] = opened = BatchSource(
            _PreopenedAsync(it, source.data) if source.is_async else _Preopened(it, source.data),
            name=source.name,
            mover=mover(source.mover),
            prefetch=source.prefetch,
            fetch=source.fetch,
            fetch_budget=source.fetch_budget,
        )
        opened.slow = source.slow
        opened.kept_inline = source.kept_inline
    return sources


def _on_stream(stream: Any, fn: Callable[..., Any], *args: Any) -> Any:
    with torch.cuda.stream(stream):
        return fn(*args)


class _StreamMover(DeviceMover):
    """Moves validation batches for the validation stream (CUDA only)."""

    def __init__(self, device: torch.device, stream: Any) -> None:
        super().__init__(device)
        self.consumer = stream

    def move_inline(self, batch: Any) -> Any:
        with torch.cuda.stream(self.consumer):
            return super().move_inline(batch)

    def ready(self, batch: Any, event: Any) -> Any:
        with torch.cuda.stream(self.consumer):
            return super().ready(batch, event)


class Lane:
    """The validator's own compute worker (and, on CUDA, its own stream), for one run.

    A validation pass's hops go here instead of to the training's worker, so each side's
    compute proceeds while the other's does (see ``Runtime._hop``).
    """

    def __init__(self, device: torch.device) -> None:
        # Outside the loop's pool: see ComputeWorker(pooled=False).
        self.worker = ComputeWorker(pooled=False)
        self.worker.open()
        self.device = device
        self.stream: Any = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self._movers: dict[int, DeviceMover] = {}

    async def run(
        self,
        tg: TaskGroup,
        fn: Callable[..., Any],
        *args: Any,
        on_cancel: Callable[[], object] | None = None,
    ) -> Any:
        if self.stream is None:
            return await self.worker.run(tg, fn, *args, on_cancel=on_cancel)
        return await self.worker.run(tg, _on_stream, self.stream, fn, *args, on_cancel=on_cancel)

    def begin(self, copied_on: Any) -> None:
        """A pass starts: its stream waits for the snapshot's copy."""
        if self.stream is not None and copied_on is not None:
            self.stream.wait_stream(copied_on)

    def join(self) -> None:
        """The current stream waits for the pass's work (before its results are read)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def mover(self, base: DeviceMover) -> DeviceMover:
        """``base``, moving to the pass's stream."""
        if self.stream is None:
            return base
        mover = self._movers.get(id(base))
        if mover is None:
            mover = self._movers[id(base)] = _StreamMover(base.device, self.stream)
        return mover

    def close(self) -> None:
        self.worker.stop()


class Slot:
    """A shadow model, allocated once and refreshed in place."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self._tensors: list[torch.Tensor] = []
        #: The CUDA stream the last refresh copied on (``None`` on the CPU).
        self.stream: Any = None

    def refresh(self, model: torch.nn.Module) -> None:
        """Make the shadow model equal to ``model`` (call under the weights' read lock)."""
        sources = [*model.parameters(), *model.buffers()]
        shadow = self.model
        if shadow is None or not _same_layout(self._tensors, sources):
            self._allocate(model)
            return
        with torch.no_grad():
            device = sources[0].device if sources else torch.device("cpu")
            if device.type == "cuda":
                # Copy on a side stream after the work already queued, and make the training
                # stream wait for the copy before its next (weight-changing) kernels.
                if self.stream is None:
                    self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                current = torch.cuda.current_stream(device)
                self.stream.wait_stream(current)
                with torch.cuda.stream(self.stream):
                    torch._foreach_copy_(self._tensors, sources)
                current.wait_stream(self.stream)
            else:
                for dst, src in zip(self._tensors, sources, strict=True):
                    dst.copy_(src)

    def load(self, model: torch.nn.Module, weights: Mapping[str, Any]) -> None:
        """Make the shadow model hold ``weights`` (a snapshot read back from a checkpoint)."""
        if self.model is None:
            self._allocate(model)
        assert self.model is not None
        self.model.load_state_dict(match_state_dict(self.model, weights))

    def _allocate(self, model: torch.nn.Module) -> None:
        self.model = None
        self._tensors = []
        shadow = copy.deepcopy(model)
        for p in shadow.parameters():
            p.grad = None
            p.requires_grad_(False)
        shadow.eval()
        self.model = shadow
        self._tensors = [*shadow.parameters(), *shadow.buffers()]


def _same_layout(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> bool:
    if len(dsts) != len(srcs):
        return False
    for d, s in zip(dsts, srcs, strict=True):
        if d.shape != s.shape or d.dtype != s.dtype or d.device != s.device:
            return False
    return True


class Tail:
    """Work of the validator's worker: a validation of a snapshot, an ``after_epoch``, or both.

    ``fields`` is the record the validation runs on and ``epoch_fields`` the one ``after_epoch``
    runs on (the same dict when the snapshot is the epoch's end). How far it got, so that an
    interrupted tail goes on where it stopped:

    * ``validate``: the validation is still to run (or to finish);
    * ``results``: its pass has finished with these results and ``after_validate`` has not (a
      resumed tail runs that hook only, with them);
    * ``before``/``epoch_before``: the record's metrics when the phase first started (what it
      writes lands in the training state's metrics when it ends);
    * ``epoch_fields``: ``after_epoch`` is still to run;
    * ``hooks``: which callbacks finished the interrupted hook (see ``HookPlan.run``);
    * ``stop``: a StopFit its ``after_validate`` raised, to raise once ``after_epoch`` has run.
    """

    __slots__ = (
        "before",
        "data",
        "epoch_before",
        "epoch_fields",
        "fields",
        "hooks",
        "results",
        "rng",
        "slot",
        "stop",
        "streams",
        "validate",
    )

    def __init__(
        self,
        slot: Slot | None,
        fields: dict[str, Any],
        *,
        validate: bool,
        epoch_fields: dict[str, Any] | None,
        rng: dict[str, Any] | None,
    ) -> None:
        self.slot = slot
        self.fields = fields
        self.validate = validate
        self.epoch_fields = epoch_fields
        self.rng = rng
        self.data: dict[str | None, Any] | None = None
        self.results: tuple[dict[str, Any], tuple[int, int]] | None = None
        self.before: dict[str, Any] | None = None
        self.epoch_before: dict[str, Any] | None = None
        self.hooks: HookProgress = {}
        self.stop: StopFit | None = None
        #: The validation sets' own random streams before the pass's iterators were first
        #: opened, by set (see :func:`open_all`).
        self.streams: dict[str | None, dict[str, Any]] | None = None

    @property
    def tag(self) -> tuple[int, int]:
        return int(self.fields["epoch"]), int(self.fields["step"])

    def to_portable(self) -> dict[str, Any]:
        """The tail in a checkpoint (the shadow's tensors are not copied: nothing changes them
        while the tail is pending)."""
        fields, epoch_fields, slot, results = (
            self.fields,
            self.epoch_fields,
            self.slot,
            self.results,
        )
        return {
            "record": _record_to_portable(fields),
            "validate": self.validate,
            "results": None
            if results is None
            else {"validation": portable_dict(results[0]), "tag": list(results[1])},
            "before": None if self.before is None else portable_dict(self.before),
            "epoch_end": None
            if epoch_fields is None
            else (True if epoch_fields is fields else _record_to_portable(epoch_fields)),
            "epoch_before": None if self.epoch_before is None else portable_dict(self.epoch_before),
            "model": None
            if slot is None or slot.model is None
            else plain_state_dict(slot.model.state_dict()),
            "rng": None if self.rng is None else rng_to_portable(self.rng),
            "hooks": progress_to_portable(self.hooks),
            "stop": None if self.stop is None else self.stop.reason,
            "streams": None if self.streams is None else list(self.streams.items()),
        }

    @classmethod
    def from_portable(
        cls, saved: Mapping[str, Any], base: Mapping[str, Any], slot: Slot | None
    ) -> Tail:
        """Undo :meth:`to_portable`; ``base``: the training state's fields (optimizer, ...);
        ``slot``: holds the snapshot's weights already (``None`` when it had none)."""
        fields = _record_from_portable(saved["record"], base)
        epoch_end = saved.get("epoch_end")
        epoch_fields = (
            None
            if epoch_end is None
            else fields
            if epoch_end is True
            else _record_from_portable(epoch_end, base)
        )
        rng = saved.get("rng")
        tail = cls(
            slot,
            fields,
            validate=bool(saved["validate"]),
            epoch_fields=epoch_fields,
            rng=None if rng is None else rng_from_portable(rng),
        )
        results = saved.get("results")
        if results is not None:
            tag = results["tag"]
            tail.results = (dict(results["validation"]), (int(tag[0]), int(tag[1])))
        before, epoch_before = saved.get("before"), saved.get("epoch_before")
        tail.before = None if before is None else dict(before)
        tail.epoch_before = None if epoch_before is None else dict(epoch_before)
        tail.hooks = progress_from_portable(saved.get("hooks"))
        stop = saved.get("stop")
        tail.stop = None if stop is None else StopFit(str(stop))
        streams = saved.get("streams")
        tail.streams = None if streams is None else {name: s for name, s in streams}
        return tail


def portable(value: object) -> bool:
    """Whether a metric value goes into a checkpoint (numbers, strings, one-element tensors)."""
    return isinstance(value, int | float | str | bool) or (
        isinstance(value, torch.Tensor) and value.numel() == 1
    )


def portable_dict(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if isinstance(k, str) and portable(v)}


def _record_to_portable(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "epoch": int(fields["epoch"]),
        "step": int(fields["step"]),
        "batch_index": int(fields.get("batch_index", 0)),
        "metrics": portable_dict(fields["metrics"]),
    }


def _record_from_portable(saved: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in base.items() if k not in ("validation", "validation_tag")}
    fields["epoch"] = int(saved["epoch"])
    fields["step"] = int(saved["step"])
    fields["batch_index"] = int(saved.get("batch_index", 0))
    fields["metrics"] = dict(saved["metrics"])
    return fields


#: The control flow a finished callback of a tracked hook may have raised, by name.
_FLOWS: dict[str, type[ControlFlow]] = {t.__name__: t for t in (SkipBatch, StopEpoch, StopFit)}


def progress_to_portable(progress: HookProgress) -> dict[str, Any]:
    """Hook progress (see ``HookPlan.run``) in a form ``torch.load(weights_only=True)`` reads:
    the callbacks done, and the control flow they raised (its kind and reason)."""
    return {
        hook: {
            "at": list(at),
            "done": sorted(done),
            "flows": {
                str(i): [kind, flow.reason]
                for i, flow in done.items()
                if flow is not None and (kind := _flow_kind(flow)) is not None
            },
        }
        for hook, (at, done) in progress.items()
    }


def _flow_kind(flow: ControlFlow) -> str | None:
    """The name of the kind ``flow`` is (a subclass: the kind it derives from, whose owner is
    the same); ``None`` for a control flow of no kind (nobody would act on it)."""
    for name, kind in reversed(_FLOWS.items()):
        if isinstance(flow, kind):
            return name
    return None


def progress_from_portable(saved: Any) -> HookProgress:
    """Undo :func:`progress_to_portable` (checkpoints written before the flows were kept have
    none)."""
    if not isinstance(saved, Mapping):
        return {}
    out: HookProgress = {}
    for hook, entry in saved.items():
        flows = entry.get("flows") or {}
        done: dict[int, ControlFlow | None] = {int(i): None for i in entry["done"]}
        for i, (kind, reason) in flows.items():
            done[int(i)] = _FLOWS[kind](reason)
        out[str(hook)] = ((entry["at"][0], entry["at"][1], entry["at"][2]), done)
    return out
