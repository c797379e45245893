"""examples/notebook.ipynb runs top to bottom through a real Jupyter kernel (nbclient + ipykernel).

The cell tagged ``interrupt`` starts a practically endless ``fit_sync``; the test waits until
the kernel sends that cell's progress display (so the run is going), then interrupts the kernel
through the kernel manager, as the ■ button does. The cells after it check that the learner is
idle with matching counters and that ``fit_sync`` continues the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"

# Waiting for the kernel (starting, running a cell) is bounded by these; nothing waits for a
# fixed time.
CELL_TIMEOUT = 90
WAIT_TIMEOUT = 60


@pytest.fixture
def anyio_backend() -> Any:
    # nbclient and jupyter_client are built on asyncio (zmq.asyncio): this test drives them on
    # asyncio only. The kernel's side runs both backends (the notebook calls fit_sync with each).
    return "asyncio"


def shows_progress(cell: Any) -> bool:
    return any(
        out.get("output_type") in ("display_data", "update_display_data")
        and "<progress" in out.get("data", {}).get("text/html", "")
        for out in cell.outputs
    )


def text_of(cell: Any) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


class Client(NotebookClient):
    """Sets ``progress_shown`` when the cell being watched receives its progress display."""

    def __init__(self, nb: Any, **kwargs: Any) -> None:
        super().__init__(nb, **kwargs)
        self.watched: int | None = None
        self.progress_shown = anyio.Event()

    def output(
        self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int
    ) -> Any:
        out = super().output(outs, msg, display_id, cell_index)
        if cell_index == self.watched and "<progress" in str(msg["content"].get("data", {})):
            self.progress_shown.set()
        return out


async def test_the_notebook_runs_through_a_real_kernel(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]
    client = Client(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    interrupted = False
    async with client.async_setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if "interrupt" not in cell.metadata.get("tags", []):
                await client.async_execute_cell(cell, index)  # raises on an error output
                continue
            client.watched = index
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.async_execute_cell, cell, index)
                with anyio.fail_after(WAIT_TIMEOUT):
                    await client.progress_shown.wait()  # the run is going
                assert isinstance(client.km, AsyncKernelManager)
                await client.km.interrupt_kernel()
            interrupted = True
            errors = [out for out in cell.outputs if out.output_type == "error"]
            assert [e.ename for e in errors] == ["KeyboardInterrupt"]
    assert interrupted, "the notebook has no cell tagged 'interrupt'"

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    # await learner.fit(2) in a cell: trained on the kernel's loop, with the live display
    assert "epoch 2 step 32" in text_of(code[1])
    assert shows_progress(code[1])
    # fit_sync and validate_sync in a cell
    assert "epoch 4 val {'loss':" in text_of(code[2])
    assert shows_progress(code[2])
    # after the interrupt: idle, consistent, and the run continued (the cell asserts it too)
    after = text_of(code[4])
    assert after.startswith("LearnerStatus.IDLE epoch ")
    epochs = int(after.split("epoch ")[1].split()[0])
    assert epochs >= 4
    assert f"epoch {epochs + 2} step {(epochs + 2) * 16}" in after
