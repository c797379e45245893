"""Optional dependencies (rich, tensorboard, matplotlib): imported on demand, with a clear error."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, *, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that says which extra installs it.

    Args:
        module: the module to import (``"rich.progress"``).
        extra: the aiolearner extra that installs it (``"rich"``).
        what: the feature that needs it, for the message (``"ProgressBar"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".", 1)[0]
        raise ImportError(
            f"{what} needs the optional package {top!r}, which is not installed; install it with"
            f" `pip install 'aiolearner[{extra}]'` (or `pip install {top}`)"
        ) from exc
