"""Distributed training on torch.distributed (private; the public names are in ``aiolearner``).

* ``_strategy.py``: :class:`Strategy`: where this rank stands, its set-up, the collectives
  offered to callbacks and the lane they use, the passes' reductions;
* ``_group.py``: joining (or creating) the process group, and the lanes;
* ``_run.py``: the shielded run of ``fit``, and what a failure raises;
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
