"""Fixtures for the task tests: one shared Omniglot cache, so the resize runs once."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaopt.tasks import Omniglot


@pytest.fixture(scope="session")
def omniglot_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytest's cache folder (kept between runs and shared by xdist workers; the cache
    file is written atomically), or a temporary folder when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("metaopt-omniglot"))
    return tmp_path_factory.mktemp("metaopt-omniglot")


@pytest.fixture(scope="session")
def omniglot_splits(omniglot_root: Path, omniglot_cache: Path) -> dict[str, Omniglot]:
    """5-way 1-shot 15-query datasets of the three Vinyals splits, with rotations."""
    return {
        s: Omniglot(omniglot_root, ways=5, shots=1, queries=15, split=s, cache_dir=omniglot_cache)
        for s in ("train", "val", "test")
    }
