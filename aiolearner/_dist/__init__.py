"""Distributed training on torch.distributed (private; the public names are in ``aiolearner``).

* ``_strategy.py``: :class:`Strategy`: the process group, the lanes, the collectives offered to
  callbacks, the passes' reductions, the shielded run and what a failure raises;
* ``_models.py``: :class:`DDP` and :class:`FSDP`, which wrap the model;
* ``_agree.py``: the control word and where every rank agrees on it;
* ``_data.py``: sharding the training and validation data;
* ``_persist.py``: every rank's state in checkpoints, resuming on rank 0's decision;
* ``_comm.py``: awaiting collectives on the event loop, the guard on their order, failure
  reports through the store.

See ``docs/distributed.md``.

The package imports nothing itself: the core imports the submodule it needs (``_plan`` imports
``_comm``, which must not pull in the rest).
"""
