"""The docstring examples in metaopt.optim run (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["metaopt.optim", "metaopt.optim.base", "metaopt.optim.sgd", "metaopt.optim.adafactor", "metaopt.optim.registry",
           "metaopt.optim.transforms", "metaopt.optim.chain", "metaopt.optim.adam", "metaopt.optim.rmsprop",
           "metaopt.optim.lion", "metaopt.optim.muon", "metaopt.optim.learned"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
