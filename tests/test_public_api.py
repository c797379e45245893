"""The public surface: what ``aiolearner`` and ``aiolearner.testing`` export, and how."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest

import aiolearner
import aiolearner.testing

PACKAGE = Path(aiolearner.__file__).parent


def public_names(module: types.ModuleType) -> set[str]:
    """Names a user sees in the module: not private, not a submodule, not a __future__ flag."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    }


def test_all_matches_the_exported_names() -> None:
    exported = aiolearner.__all__
    assert len(exported) == len(set(exported)), "duplicates in __all__"
    # The package module only re-exports: every public name in it is in __all__.
    assert set(exported) == public_names(aiolearner)


def test_testing_all_lists_everything_it_defines() -> None:
    module = aiolearner.testing
    exported = set(module.__all__)
    assert len(module.__all__) == len(exported)
    assert exported <= public_names(module)
    defined = {
        name
        for name in public_names(module)
        if getattr(getattr(module, name), "__module__", None) == module.__name__
    }
    assert defined - {"DEFAULT_HOOKS"} <= exported
    assert exported - {"DEFAULT_HOOKS"} <= defined


@pytest.mark.parametrize("module", [aiolearner, aiolearner.testing], ids=lambda m: m.__name__)
def test_public_objects_report_their_public_module(module: types.ModuleType) -> None:
    wrong = {
        name: getattr(module, name).__module__
        for name in module.__all__
        if hasattr(getattr(module, name), "__module__")
        and getattr(module, name).__module__ != module.__name__
    }
    assert wrong == {}


def test_reproducibility_helpers_are_exported() -> None:
    expected = {"SeedState", "dataloader_seeding", "seed_everything", "seed_worker"}
    assert expected <= set(aiolearner.__all__)


def test_version() -> None:
    assert isinstance(aiolearner.__version__, str)
    assert aiolearner.__version__.count(".") >= 2


def test_exception_hierarchy() -> None:
    for cls in (
        aiolearner.ConfigurationError,
        aiolearner.StateAccessError,
        aiolearner.LearnerBusyError,
    ):
        assert issubclass(cls, aiolearner.AiolearnerError)
    # hasattr(state, field) is False for a field that is not valid.
    assert issubclass(aiolearner.StateAccessError, AttributeError)
    assert issubclass(aiolearner.LearnerBusyError, RuntimeError)
    for flow in (aiolearner.SkipBatch, aiolearner.StopEpoch, aiolearner.StopFit):
        assert issubclass(flow, aiolearner.ControlFlow)
        assert not issubclass(flow, aiolearner.AiolearnerError)
        assert flow("why").reason == "why"


def test_library_imports_anyio_only() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("asyncio", "trio", "sniffio"):
                    offenders.append(f"{path.relative_to(PACKAGE)}: {name}")
    assert offenders == []


def test_package_is_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()


def test_private_modules_are_not_exported() -> None:
    assert not any(name.startswith("_") for name in aiolearner.__all__)
    assert not any(name.startswith("_") for name in aiolearner.testing.__all__)
