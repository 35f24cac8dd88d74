"""Every name in metaopt.__all__ imports; the package is typed; docstring examples run."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import metaopt


@pytest.mark.parametrize("name", metaopt.__all__)
def test_every_public_name_imports(name: str) -> None:
    assert getattr(metaopt, name) is not None


@pytest.mark.parametrize("module", ["metaopt", "metaopt.optim", "metaopt.tasks"])
def test_subpackage_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing


def test_package_is_typed() -> None:
    assert (Path(metaopt.__file__).parent / "py.typed").is_file()


def test_top_level_docstring_example_runs() -> None:
    result = doctest.testmod(metaopt, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        metaopt.no_such_name  # noqa: B018
