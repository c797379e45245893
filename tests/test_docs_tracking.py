"""docs/tracking-and-reproducibility.md runs: its Python blocks, in order, in a scratch folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "tracking-and-reproducibility.md"


def test_the_page_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path
) -> None:
    pytest.importorskip("wandb")
    import wandb

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    # The page's MLflow store, made ahead (its tables take seconds to make; same result).
    store = tmp_path / "runs" / "mlflow" / "mlflow.db"
    store.parent.mkdir(parents=True)
    shutil.copy(mlflow_template, store)

    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict[str, object] = {"__name__": "docs_tracking"}
    for i, block in enumerate(blocks):
        code = compile(block, f"{PAGE.name}[block {i}]", "exec")
        exec(code, namespace)
    wandb.teardown()
