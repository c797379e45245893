"""``Learner(hparams=...)``: validated, kept, readable by callbacks, stored in checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from aiolearner import Callback, StateAccessError, StateView
from aiolearner.testing import make_learner


def test_hparams_are_kept_in_their_json_form() -> None:
    given = {"lr": 0.1, "layers": (16, 8), "optim": {"name": "sgd", "nesterov": False}, "x": None}
    learner = make_learner(hparams=given)
    assert learner.hparams == {
        "lr": 0.1,
        "layers": [16, 8],
        "optim": {"name": "sgd", "nesterov": False},
        "x": None,
    }
    # A copy: changing the caller's mapping later does not change the run's hyperparameters.
    given["optim"]["name"] = "adam"  # type: ignore[index]
    assert learner.hparams["optim"]["name"] == "sgd"
    assert make_learner().hparams == {}


def test_numpys_scalars_are_taken_as_numbers() -> None:
    """A value from a numpy sweep (np.float64 is a float, np.int64 is no int)."""
    import numpy as np

    given = {"width": np.int64(16), "p": np.float32(0.5), "on": [np.bool_(True)]}
    assert make_learner(hparams=given).hparams == {"width": 16, "p": 0.5, "on": [True]}
    with pytest.raises(ValueError, match=r"hparams\['lr'\] is nan"):
        make_learner(hparams={"lr": np.float32("nan")})
    with pytest.raises(TypeError, match=r"hparams\['w'\] is a ndarray"):
        make_learner(hparams={"w": np.zeros(2)})
    with pytest.raises(TypeError, match=r"hparams\['when'\] is a datetime64"):
        make_learner(hparams={"when": np.datetime64("2026-12-03")})


def test_a_namedtuple_is_kept_as_a_list() -> None:
    from typing import NamedTuple

    class Betas(NamedTuple):
        b1: float
        b2: float

    assert make_learner(hparams={"betas": Betas(0.9, 0.99)}).hparams == {"betas": [0.9, 0.99]}


@pytest.mark.parametrize(
    ("hparams", "error", "match"),
    [
        ([("lr", 0.1)], TypeError, "hparams must be a mapping"),
        ({"w": torch.ones(1)}, TypeError, r"hparams\['w'\] is a Tensor"),
        ({"o": {"betas": [0.9, object()]}}, TypeError, r"hparams\['o'\]\['betas'\]\[1\]"),
        ({"o": {1: "a"}}, TypeError, r"hparams\['o'\] has the key 1 of type int"),
        ({"lr": float("nan")}, ValueError, r"hparams\['lr'\] is nan"),
    ],
)
def test_hparams_that_json_cannot_hold_are_refused(
    hparams: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make_learner(hparams=hparams)


async def test_callbacks_read_hparams_from_the_state(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    class Reader(Callback):
        reads = frozenset({"hparams"})

        def before_fit_run(self, state: StateView) -> None:
            seen.append(dict(state.hparams))
            with pytest.raises(StateAccessError):
                state.hparams["lr"] = 1.0

    learner = make_learner(callbacks=[Reader()], hparams={"lr": 0.1}, n_batches=1)
    await learner.fit(1)
    assert seen == [{"lr": 0.1}]

    checkpoint = learner.state_dict()
    assert checkpoint["hparams"] == {"lr": 0.1}
    assert checkpoint["hparams"] is not learner.hparams
    path = tmp_path / "c.pt"
    torch.save(checkpoint, path)
    assert torch.load(path, weights_only=True)["hparams"] == {"lr": 0.1}
