"""Optional dependencies (rich, tensorboard, matplotlib, mlflow, wandb): imported on demand, with a
clear error."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["require", "require_installed"]


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
        raise _missing(module, extra=extra, what=what) from exc


def require_installed(module: str, *, extra: str, what: str) -> None:
    """Raise :func:`require`'s error if ``module`` is not installed, without importing it.

    For packages slow to import (mlflow, wandb): the check costs a file look-up, and the import
    itself can then happen in a worker thread.
    """
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(module, extra=extra, what=what)


def _missing(module: str, *, extra: str, what: str) -> ImportError:
    top = module.split(".", 1)[0]
    return ImportError(
        f"{what} needs the optional package {top!r}, which is not installed; install it with"
        f" `pip install 'aiolearner[{extra}]'` (or `pip install {top}`)"
    )
