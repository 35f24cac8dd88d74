"""Every docstring example in the package runs and prints what it says (doctest)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import metaopt

MODULES = sorted(m.name for m in pkgutil.walk_packages(metaopt.__path__, "metaopt."))


def test_every_module_is_collected() -> None:
    assert {"metaopt.maml", "metaopt.models", "metaopt.optim.adafactor", "metaopt._registry",
            "metaopt.bench", "metaopt.tasks.omniglot"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
