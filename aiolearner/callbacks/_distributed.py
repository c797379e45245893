"""Which process logs under torch.distributed (rank 0 only)."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_rank_zero"]


def is_rank_zero() -> bool:
    """Whether this process should log: rank 0 of an initialized process group, or no group.

    Asked when a run starts (not at construction): the process group is often set up after the
    callbacks are built.
    """
    if not dist.is_available() or not dist.is_initialized():
        return True
    return dist.get_rank() == 0
