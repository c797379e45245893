"""Training from data that arrives while training runs.

A producer task (here a simulated sensor; in practice a socket, a message queue, a database
cursor) sends records into an :class:`aiolearner.Feed`, a bounded memory stream the learner reads
as batches. An epoch is ``steps_per_epoch`` batches of the stream. The feed's bound is the
back-pressure: when the learner falls behind, ``feed.send`` waits, so memory stays bounded however
fast records arrive.

When the producer ends, ``fit`` trains on what is left and returns (the run is "stopped"); when
the producer fails, ``fit`` raises the producer's exception (with a note naming the data source)
after training on the records that arrived before the failure. Run it with::

    python -m examples.online.train               # asyncio
    python -m examples.online.train --backend trio --records 3000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import anyio
import torch

from aiolearner import Feed, FitHandle, Learner, RunState

Record = tuple[torch.Tensor, torch.Tensor]

N_FEATURES = 8
N_CLASSES = 3


@dataclass
class Sensor:
    """Simulated readings: 8 features, labelled by a fixed linear rule (learnable).

    Args:
        records: how many to send before closing the feed (``None``: endless).
        fail_after: raise ``ConnectionError`` after sending this many.
        interval: seconds between readings (0: as fast as the learner takes them).
        seed: the stream's random seed.
    """

    records: int | None = None
    fail_after: int | None = None
    interval: float = 0.0
    seed: int = 0
    sent: int = 0

    async def run(self, feed: Feed[Record]) -> None:
        """Send readings into ``feed``; its end or failure is handed to the learner."""
        gen = torch.Generator().manual_seed(self.seed)
        rule = torch.randn(N_FEATURES, N_CLASSES, generator=gen)
        async with feed:  # closes the feed at the end; an exception goes to fit
            while self.records is None or self.sent < self.records:
                if self.fail_after is not None and self.sent >= self.fail_after:
                    raise ConnectionError(f"sensor lost after {self.sent} readings")
                x = torch.randn(N_FEATURES, generator=gen)
                await feed.send((x, (x @ rule).argmax()))
                self.sent += 1
                if self.interval:
                    await anyio.sleep(self.interval)


def make_learner(feed: Feed[Record], *, steps_per_epoch: int, seed: int = 0) -> Learner[Record]:
    """A small classifier reading ``feed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, N_CLASSES)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Learner(
        model,
        optimizer,
        torch.nn.functional.cross_entropy,
        feed,
        steps_per_epoch=steps_per_epoch,
    )


async def train_online(
    epochs: int,
    sensor: Sensor,
    *,
    steps_per_epoch: int = 20,
    batch_size: int = 32,
    buffer: int = 64,
) -> tuple[Learner[Record], Feed[Record], RunState]:
    """Train for ``epochs`` epochs on the sensor's stream; returns the learner, its feed and how
    the run ended (``COMPLETED``, or ``STOPPED`` when the sensor ended first).

    Raises:
        ConnectionError: the sensor failed (after the learner trained on what it sent before).
    """
    feed = Feed[Record](batch_size=batch_size, buffer=buffer)
    learner = make_learner(feed, steps_per_epoch=steps_per_epoch)
    handle = FitHandle(learner, epochs)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sensor.run, feed)
        try:
            await handle.run()
        except Exception:
            pass  # kept in handle.error: raised below as itself, not inside the group's wrapper
        finally:
            tg.cancel_scope.cancel()  # an endless sensor would wait on a full feed forever
    await feed.aclose()
    if handle.error is not None:
        raise handle.error
    return learner, feed, handle.state


async def main(epochs: int, records: int | None, fail_after: int | None) -> None:
    sensor = Sensor(records=records, fail_after=fail_after)
    try:
        learner, feed, state = await train_online(epochs, sensor)
    except ConnectionError as exc:
        print(f"fit raised {exc!r}; notes: {getattr(exc, '__notes__', [])}")
        return
    snap = learner.snapshot()
    print(
        f"{state.value}: {snap.epoch} epochs, {snap.step} steps, train_loss "
        f"{snap.metrics.get('train_loss', float('nan')):.4f}; sensor sent {sensor.sent}, "
        f"learner received {feed.received}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--records", type=int, default=None, help="end the stream after N")
    parser.add_argument("--fail-after", type=int, default=None, help="fail the sensor after N")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.epochs, args.records, args.fail_after, backend=args.backend)
