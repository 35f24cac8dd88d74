"""The task registry and the public names of metaopt.tasks."""

from __future__ import annotations

import pytest

import metaopt.tasks as tasks


def test_all_names_importable():
    for name in tasks.__all__:
        assert getattr(tasks, name) is not None
    for name in ("TaskBatch", "as_task_batch", "Sinusoid", "Omniglot", "get"):
        assert name in tasks.__all__


def test_get_builds_by_name(omniglot_root, omniglot_cache):
    s = tasks.get("sinusoid", shots=3, queries=4)
    assert isinstance(s, tasks.Sinusoid) and s.shots == 3 and s.queries == 4
    assert isinstance(tasks.get("SINUSOID"), tasks.Sinusoid)
    o = tasks.get("omniglot", root=omniglot_root, ways=5, shots=1, queries=15, split="val", cache_dir=omniglot_cache)
    assert isinstance(o, tasks.Omniglot) and o.num_classes == 688
    assert tasks.names() == ["omniglot", "sinusoid"]


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="Unknown task name: 'mnist'; known names: omniglot, sinusoid"):
        tasks.get("mnist")


def test_bad_argument_is_a_value_error():
    with pytest.raises(ValueError, match="Invalid arguments for task 'sinusoid'.*wayz"):
        tasks.get("sinusoid", wayz=5)


def test_register():
    tasks.register("const", lambda **cfg: cfg)
    try:
        assert tasks.get("const", a=1) == {"a": 1}
    finally:
        tasks.unregister("const")
    assert "const" not in tasks.names()
