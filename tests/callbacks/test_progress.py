from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import TextIO

import anyio
import anyio.from_thread
import pytest
import torch

from aiolearner import Callback, StateView
from aiolearner.callbacks import Metrics, ProgressBar, accuracy
from aiolearner.testing import make_learner


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = ProgressBar(file=out)
    assert bar.plain
    learner = make_learner(callbacks=[Metrics({"accuracy": accuracy}), bar], n_batches=3)
    await learner.fit(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1: ")
    assert lines[1].startswith("epoch 2: ")
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        assert f"{key} {learner.state.metrics[key]:.4g}" in lines[1]
    assert "(3 batches," in lines[1]
    assert re.search(r"\d+ samples/s\)$", lines[1])


async def test_rich_bar_on_a_terminal() -> None:
    from rich.console import Console

    out = FakeTerminal()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    bar = ProgressBar(console=console)
    assert not bar.plain
    learner = make_learner(callbacks=[bar], n_batches=4)
    await learner.fit(2)
    text = out.getvalue()
    assert "epoch 1: train_loss" in text
    assert "epoch 2: train_loss" in text
    # the final render shows the last epoch complete, with its loss and throughput
    assert "4/4" in text
    assert re.search(r"loss \d\.\d+", text)
    assert "samples/s" in text


def test_terminal_detection_picks_the_bar() -> None:
    assert not ProgressBar(file=FakeTerminal()).plain
    assert ProgressBar(file=io.StringIO()).plain
    assert ProgressBar(file=FakeTerminal(), plain=True).plain


def test_rich_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(ImportError, match=r"aiolearner\[rich\]"):
        ProgressBar(file=FakeTerminal())
    # plain lines need no rich
    assert ProgressBar(file=io.StringIO()).plain


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        ProgressBar(refresh_interval=0)


def _open_for_writing(path: Path) -> TextIO:
    return open(path, "w", encoding="utf-8")


@pytest.mark.parametrize("plain", [True, False])
async def test_never_writes_on_the_event_loop(tmp_path: Path, plain: bool) -> None:
    """blockbuster (asyncio) sees no write to the real file on the loop thread."""
    from blockbuster import blockbuster_ctx
    from rich.console import Console

    f = _open_for_writing(tmp_path / "out.txt")
    try:
        if plain:
            bar = ProgressBar(file=f, plain=True, log_interval=1e-9)
        else:
            console = Console(file=f, force_terminal=True, width=100, color_system=None)
            bar = ProgressBar(console=console)
        learner = make_learner(callbacks=[bar], n_batches=3)
        with blockbuster_ctx():
            await learner.fit(2)
    finally:
        f.close()
    text = (tmp_path / "out.txt").read_text()
    assert "epoch 2: train_loss" in text


def test_plain_progress_line_inside_an_epoch() -> None:
    """The renderer's plain line (drawn every log_interval seconds inside an epoch)."""
    out = io.StringIO()
    bar = ProgressBar(file=out, log_interval=1e-9)
    bar._epoch, bar._batches, bar._total, bar._samples = 1, 7, 10, 35
    bar._loss = torch.tensor(0.25)
    bar._render()
    assert re.fullmatch(r"epoch 2 batch 7/10  loss 0\.25  \d+ samples/s\n", out.getvalue())


class FakeHandle:
    def __init__(self, shown: list[dict[str, str]]) -> None:
        self.shown = shown

    def update(self, bundle: dict[str, str], *, raw: bool) -> None:
        assert raw
        self.shown.append(bundle)


class FakeShell:
    kernel = object()


def test_a_jupyter_kernel_picks_the_notebook_display(monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython

    assert ProgressBar(file=io.StringIO()).display == "plain"
    monkeypatch.setattr(IPython, "get_ipython", lambda: FakeShell())
    assert ProgressBar().display == "notebook"
    assert not ProgressBar().plain
    # an explicit file or console still decides, and so does an explicit choice
    assert ProgressBar(file=io.StringIO()).display == "plain"
    assert ProgressBar(display="plain").display == "plain"
    assert ProgressBar(plain=True).display == "plain"
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)  # IPython, but no kernel
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert ProgressBar().display == "plain"


def test_display_must_be_known() -> None:
    with pytest.raises(ValueError, match="display must be"):
        ProgressBar(display="fancy")  # type: ignore[arg-type]


async def test_notebook_display_updates_one_handle_in_place(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import IPython.display

    shown: list[dict[str, str]] = []
    handles: list[FakeHandle] = []

    def display(bundle: dict[str, str], *, raw: bool, display_id: bool) -> FakeHandle:
        assert raw
        assert display_id
        shown.append(bundle)
        handles.append(FakeHandle(shown))
        return handles[-1]

    monkeypatch.setattr(IPython.display, "display", display)
    bar = ProgressBar(display="notebook", refresh_interval=0.01)
    learner = make_learner(callbacks=[bar], n_batches=4)
    await learner.fit(2)
    assert len(handles) == 1  # one display, updated in place
    final = shown[-1]
    assert final["text/plain"].startswith("epoch 2  4/4  ")
    assert '<progress value="4" max="4"' in final["text/html"]
    assert "samples/s" in final["text/plain"]
    out = capsys.readouterr().out.splitlines()  # the epoch lines, printed under the display
    assert [line.split(":")[0] for line in out] == ["epoch 1", "epoch 2"]


class Lines(io.StringIO):
    """An output that hands each complete line to the event loop as it is written."""

    def __init__(self) -> None:
        super().__init__()
        self.send, self.receive = anyio.create_memory_object_stream[str](100)
        self._partial = ""

    def write(self, text: str) -> int:
        n = super().write(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            anyio.from_thread.run_sync(self.send.send_nowait, line)  # written in a worker
        return n


class ExpectEpochLine(Callback):
    """Before each epoch, waits for the previous epoch's line (a timeout: it never came)."""

    reads = frozenset({"epoch"})

    def __init__(self, out: Lines) -> None:
        self.out = out
        self.seen: list[str] = []

    async def before_epoch(self, state: StateView) -> None:
        if state.epoch > 0:
            with anyio.fail_after(30):
                line = await self.out.receive.receive()
            self.seen.append(line)
            assert line.startswith(f"epoch {state.epoch}: ")


async def test_an_epochs_line_is_printed_when_the_epoch_ends() -> None:
    # A refresh interval longer than the run: only the end of an epoch can trigger the render.
    out = Lines()
    bar = ProgressBar(file=out, plain=True, refresh_interval=3600)
    expect = ExpectEpochLine(out)
    learner = make_learner(callbacks=[bar, expect], n_batches=2)
    with out.send, out.receive:
        await learner.fit(3)
    assert [line.split(":")[0] for line in expect.seen] == ["epoch 1", "epoch 2"]
