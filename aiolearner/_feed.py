"""Training data that arrives while training runs: a bounded feed from producer tasks.

A :class:`Feed` is a bounded buffer of *records* with a batching consumer side that a
:class:`Learner` takes as ``train_data`` (it is an async iterable of batches). A producer task
(reading a socket, a message queue, a sensor) sends records; ``send`` waits while ``buffer`` records
are waiting, so a fast producer is slowed down to the learner's pace instead of filling memory.

How the producer's end reaches ``fit``:

* it closes the feed (``async with feed:`` or :meth:`Feed.close`): the learner trains on what is
  left, the last batch possibly short, then ``fit`` returns with ``StopFit`` ("stopped"; the
  outcome that ``after_fit_run`` sees and a :class:`FitHandle` reports);
* it fails inside ``async with feed:`` (or calls :meth:`Feed.fail`): the learner trains on the
  records sent before the failure, then ``fit`` raises the producer's exception, as its own type
  with a note naming the data source. The producer task itself ends quietly: its error belongs
  to the training run that was consuming it.

With ``steps_per_epoch`` on the learner an epoch is that many batches of the stream; without it one
epoch runs until the feed ends.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
from torch.utils.data import default_collate

from ._checks import check_count
from ._exceptions import StopFit
from ._prefetch import LoopFeed

__all__ = ["Feed"]

T = TypeVar("T")


class Feed(Generic[T]):
    """A bounded stream of records from producer tasks, read by a learner as batches.

    Args:
        batch_size: records per batch.
        buffer: how many records may wait before :meth:`send` blocks (back-pressure).
        collate: turns a list of records into a batch; default
            ``torch.utils.data.default_collate`` (a list of ``(x, y)`` pairs becomes
            ``(stacked x, stacked y)``).

    Example:
        >>> feed = Feed[tuple[torch.Tensor, torch.Tensor]](batch_size=32, buffer=256)
        >>> async def produce():
        ...     async with feed:                       # closes the feed; errors go to fit
        ...         async for record in read_socket():
        ...             await feed.send(record)        # waits while the buffer is full
        >>> learner = Learner(model, opt, loss_fn, feed, steps_per_epoch=100)
        >>> async with anyio.create_task_group() as tg:
        ...     tg.start_soon(produce)
        ...     await learner.fit(10)
        ...     tg.cancel_scope.cancel()  # a producer with more to send would wait forever
    """

    #: A stream by design (see ``_checks.check_passes``): no refusal for several passes.
    _is_feed = True

    def __init__(
        self,
        *,
        batch_size: int,
        buffer: int = 256,
        collate: Callable[[list[T]], Any] = default_collate,
    ) -> None:
        check_count("batch_size", batch_size)
        check_count("buffer", buffer)
        # Hand-overs that survive cancellation (see LoopFeed): the learner cancels its
        # prefetching at the end of every pass, producers may be cancelled at any time.
        self._records: LoopFeed[T] = LoopFeed(buffer)
        self.batch_size = batch_size
        self.buffer = buffer
        self._collate = collate
        # Records of a batch being assembled survive a cancelled __anext__ (the learner cancels
        # its prefetching task at the end of every pass): none is lost or repeated.
        self._partial: list[T] = []
        self._error: BaseException | None = None
        self._closed = False
        #: Records received by the learner so far.
        self.received = 0

    # -- producer side ---------------------------------------------------------------------------

    async def send(self, record: T) -> None:
        """Send one record, waiting while ``buffer`` records are waiting.

        Raises:
            anyio.ClosedResourceError: the feed was closed.
        """
        await self._records.put(record)

    def close(self) -> None:
        """No more records: the learner finishes what is buffered, then stops."""
        self._closed = True
        self._records.finish()

    def fail(self, exc: BaseException) -> None:
        """Close the feed with an error that ``fit`` raises after the buffered records."""
        if self._error is None:
            self._error = exc
        self.close()

    async def __aenter__(self) -> Feed[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if isinstance(exc, Exception):
            # Handed to the consumer: fit raises it. Cancellation and other BaseExceptions
            # propagate in the producer as usual (and just end the feed).
            self.fail(exc)
            return True
        self.close()
        return False

    async def aclose(self) -> None:
        """Close both sides, dropping records still buffered (the learner sees the end)."""
        self.close()
        self._records.close()
        await anyio.lowlevel.checkpoint()

    @property
    def closed(self) -> bool:
        """Whether the producer side is closed."""
        return self._closed

    # -- consumer side (the learner) -----------------------------------------------------------

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> Any:
        partial = self._partial
        while len(partial) < self.batch_size:
            try:
                # A cancellation here takes no record (LoopFeed): none is lost.
                partial.append(await self._records.receive())
            except anyio.EndOfStream:
                break
            self.received += 1
        if partial:
            records, self._partial = partial, []
            return self._collate(records)
        if self._error is not None:
            raise self._error
        raise StopFit("the feed was closed: no more training data")
