from __future__ import annotations

import io
from pathlib import Path

import torch

from examples import digits_resume


async def test_interrupted_and_resumed_run_learns_and_plots(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = io.StringIO()
    result = await digits_resume.run(tmp_path, epochs=3, interrupt_at=30, out=out)
    assert result["interrupted_at"] == (1, 30)  # cancelled inside the second epoch
    assert result["epochs"] == 3
    assert result["accuracy"] > 0.9
    # the history spans both runs: the resumed learner restored the recorder from the checkpoint
    history = result["history"]
    assert history["step"] == list(range(1, 3 * 23 + 1))
    assert [e["epoch"] for e in history["epochs"]] == [0.0, 1.0, 2.0]
    assert result["best"].is_file()
    assert result["plot"].read_bytes().startswith(b"\x89PNG")
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
