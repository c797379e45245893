"""What a resumed run finds on disk: a logger's rows that were still in its buffer when the
process died, a periodic file a killed write had dropped from its list, the loggers' temporary
files, ``resume="best"``, and a checkpoint written by a learner with other callbacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from aiolearner import Callback
from aiolearner.callbacks import (
    EMA,
    Checkpoint,
    CSVLogger,
    JSONLinesLogger,
    Metrics,
)
from aiolearner.testing import make_learner


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
async def test_rows_still_buffered_at_a_save_point_are_not_lost_with_the_process(
    tmp_path: Path, kind: str
) -> None:
    def logger(path: Path) -> CSVLogger | JSONLinesLogger:
        # Rows stay in memory until the epoch's row (flush_rows is large).
        cls = CSVLogger if kind == "csv" else JSONLinesLogger
        return cls(path, every_n_steps=1)

    reference = tmp_path / f"reference.{kind}"
    await make_learner(callbacks=[logger(reference)], n_batches=8).fit(2)

    log, ckpt = tmp_path / f"log.{kind}", tmp_path / "ckpt"
    first = make_learner(
        callbacks=[logger(log), Checkpoint(ckpt, every_n_steps=3, keep_periodic=None)],
        n_batches=8,
    )
    await first.fit(2)
    # A process killed at step 6 had written none of its rows (the first flush is at the end
    # of the epoch, step 8): what step-00000006.pt holds is all there is.
    log.unlink()
    resumed = make_learner(callbacks=[logger(log), Checkpoint(ckpt)], n_batches=8)
    await resumed.fit(2, resume=ckpt / "step-00000006.pt")
    assert log.read_text() == reference.read_text()


async def test_a_periodic_file_a_killed_write_had_dropped_is_removed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "ckpt"
    unlink = os.unlink

    def killed(path: str | os.PathLike[str]) -> None:
        # The process dies once the new files are written, before the dropped one is removed.
        raise OSError(f"killed before removing {path}")

    monkeypatch.setattr(os, "unlink", killed)
    first = make_learner(
        callbacks=[Checkpoint(ckpt, every_n_steps=2, keep_periodic=1)], n_batches=6
    )
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="killed"), flatten_subgroups=True):
        await first.fit(1)
    monkeypatch.setattr(os, "unlink", unlink)
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002.pt", "step-00000004.pt"]

    resumed = make_learner(
        callbacks=[Checkpoint(ckpt, every_n_steps=2, keep_periodic=1)], n_batches=6
    )
    await resumed.fit(1, resume="last")
    # What an uninterrupted run leaves: the newest periodic file (the epoch's) and last.pt.
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0001.pt", "last.pt"]


async def test_a_logger_removes_the_temporary_files_of_a_killed_rewrite(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    stray = tmp_path / f".log.csv.{'a' * 32}.tmp"
    stray.write_text("half a rewrite")
    unrelated = tmp_path / f".other.csv.{'b' * 32}.tmp"
    unrelated.write_text("not the logger's")
    await make_learner(callbacks=[CSVLogger(log)], n_batches=2).fit(1)
    assert not stray.exists()
    assert unrelated.exists()


async def test_resume_best_continues_from_the_best_file_in_a_new_learner(tmp_path: Path) -> None:
    def build() -> tuple[Checkpoint, object]:
        ckpt = Checkpoint(tmp_path, monitor="val_loss")
        return ckpt, make_learner(callbacks=[Metrics(), ckpt])

    ckpt, learner = build()
    await learner.fit(3)  # type: ignore[attr-defined]
    best = ckpt.best_path
    assert best is not None
    expected = torch.load(best, weights_only=True)["progress"]["step"]

    fresh_ckpt, fresh = build()
    assert fresh_ckpt.find_checkpoint("best") is None  # knows no best file before loading
    loaded: list[int] = []

    class Starts(Callback):
        reads = frozenset({"step"})

        def before_fit_run(self, state: object) -> None:
            loaded.append(state.step)  # type: ignore[attr-defined]

    fresh = make_learner(callbacks=[Metrics(), Checkpoint(tmp_path, monitor="val_loss"), Starts()])
    await fresh.fit(4, resume="best")  # (Starts keeps no state: no warning)
    assert loaded == [expected]


async def test_resume_best_without_a_best_file_says_so(tmp_path: Path) -> None:
    learner = make_learner(callbacks=[Checkpoint(tmp_path)])
    await learner.fit(1)
    with pytest.raises(FileNotFoundError, match="resume='best' found no checkpoint"):
        await make_learner(callbacks=[Checkpoint(tmp_path)]).fit(2, resume="best")


async def test_a_checkpoint_of_a_learner_with_other_callbacks_warns_naming_them(
    tmp_path: Path,
) -> None:
    writer = make_learner(callbacks=[EMA(), Checkpoint(tmp_path)])
    await writer.fit(1)
    reader = make_learner(callbacks=[Checkpoint(tmp_path)])
    with pytest.warns(UserWarning, match=r"callbacks \['EMA'\], which this learner does not have"):
        reader.load_checkpoint(tmp_path / "last.pt")
    same = make_learner(callbacks=[EMA(), Checkpoint(tmp_path)])
    same.load_checkpoint(tmp_path / "last.pt")  # no warning (warnings are errors here)
