"""Fixtures for the interoperability tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests run tiny MLPs: intra-op threads only add synchronisation (10-50x slower
    # on a loaded 2-core machine). Runs after the root conftest's fixture, restores after.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
