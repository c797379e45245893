"""Model weights across ``torch.compile``: the ``_orig_mod.`` segment in compiled modules' keys.

``torch.compile(model)`` returns a wrapper module (an ``OptimizedModule``) that holds the model as
its submodule ``_orig_mod``, so the wrapper's ``state_dict()`` names every weight
``_orig_mod.<name>``; compiling a submodule (``model.encoder = torch.compile(model.encoder)``)
puts the segment in the middle (``encoder._orig_mod.<name>``). The tensors are the same: only
the keys differ. These helpers let weights saved from either form load into either form.

Nothing here imports ``torch._dynamo`` (importing it costs seconds): a compiled wrapper is
recognised by its ``_orig_mod`` submodule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch

__all__ = ["COMPILED_SEGMENT", "match_state_dict", "plain_state_dict", "unwrap_model"]

#: The name under which a ``torch.compile`` wrapper holds the module it compiles.
COMPILED_SEGMENT = "_orig_mod"

V = TypeVar("V")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile`` wrapper compiles (unwrapped repeatedly), or ``model``.

    Example:
        >>> compiled = torch.compile(model)
        >>> unwrap_model(compiled) is model
        True
    """
    while True:
        inner = getattr(model, COMPILED_SEGMENT, None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _plain_key(key: str) -> str:
    if COMPILED_SEGMENT not in key:
        return key
    return ".".join(part for part in key.split(".") if part != COMPILED_SEGMENT)


def plain_state_dict(weights: Mapping[str, V]) -> dict[str, V]:
    """``weights`` with the keys an uncompiled model has (every ``_orig_mod.`` segment dropped).

    Files written this way load into a plain model with ``model.load_state_dict`` alone, and into
    a compiled one through :func:`match_state_dict`.
    """
    out: dict[str, V] = {}
    for key, value in weights.items():
        plain = _plain_key(key)
        if plain in out:
            raise ValueError(
                f"weights have two keys for {plain!r} once compiled wrappers' "
                f"{COMPILED_SEGMENT!r} segments are dropped"
            )
        out[plain] = value
    return out


def match_state_dict(model: torch.nn.Module, weights: Mapping[str, V]) -> dict[str, V]:
    """``weights`` re-keyed for ``model.load_state_dict``, compiled or not on either side.

    Each key that ``model`` lacks is renamed to the model's key that is the same once the
    ``_orig_mod.`` segments are dropped on both sides. Keys that match nothing either way are
    kept as they are, so ``load_state_dict`` still names them in its usual error.

    Example:
        >>> compiled = torch.compile(model)
        >>> model.load_state_dict(match_state_dict(model, compiled.state_dict()))
        <All keys matched successfully>
    """
    expected = set(model.state_dict(keep_vars=True))
    if all(key in expected for key in weights):
        return dict(weights)
    by_plain = {_plain_key(key): key for key in expected}
    return {
        (key if key in expected else by_plain.get(_plain_key(key), key)): value
        for key, value in weights.items()
    }
