"""metaopt._registry.Registry: the name -> factory table behind optim.get and tasks.get."""

from __future__ import annotations

import pytest

from metaopt._registry import Registry


def test_register_by_call_or_decorator_and_get_case_insensitive():
    reg: Registry[tuple] = Registry("widget")
    reg.register("Box", lambda size=1: ("box", size))

    @reg.register("BALL")
    def ball(r: float = 1.0) -> tuple:
        return ("ball", r)

    assert ball() == ("ball", 1.0)  # the decorator returns the function itself
    assert reg.names() == ["ball", "box"]
    assert reg.get("box", size=3) == ("box", 3) and reg.get("Ball", r=2.0) == ("ball", 2.0)


def test_errors_name_the_kind_and_the_known_names():
    reg: Registry[int] = Registry("gadget")
    reg.register("one", lambda: 1)
    with pytest.raises(ValueError, match=r"^Unknown gadget name: 'two'; known names: one$"):
        reg.get("two")
    with pytest.raises(ValueError, match=r"^Unknown gadget name: 3; known names: one$"):
        reg.get(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^Invalid arguments for gadget 'one': .*bogus"):
        reg.get("one", bogus=1)


def test_duplicate_registration_is_an_error_unless_replace():
    reg: Registry[int] = Registry("gadget")
    reg.register("one", lambda: 1)
    with pytest.raises(ValueError, match="gadget name 'one' is already registered"):
        reg.register("ONE", lambda: 2)
    reg.register("One", lambda: 2, replace=True)
    assert reg.get("one") == 2


def test_builtins_load_once_and_lazily_before_user_entries():
    calls = []

    def builtins(reg: Registry[int]) -> None:
        calls.append(1)
        reg.register("base", lambda: 0)

    reg: Registry[int] = Registry("gadget", builtins)
    assert calls == []
    reg.register("base", lambda: 5, replace=True)  # loads the builtins first, then replaces
    assert calls == [1] and reg.get("base") == 5 and reg.names() == ["base"] and calls == [1]


def test_public_registries_replace_silently_as_before():
    from metaopt import optim
    optim.register("SGD2", optim.SGD)
    try:
        optim.register("sgd2", lambda **kw: optim.SGD(lr=0.5))
        assert optim.get("sgd2").lr == 0.5
        assert optim.factory("SGD2") is not optim.SGD  # metaopt.config reads the factory
    finally:
        optim.unregister("Sgd2")
    assert "sgd2" not in optim.names()
    with pytest.raises(ValueError, match="Unknown optimizer name: 'sgd2'; known names: adadelta, adafactor"):
        optim.unregister("sgd2")
    with pytest.raises(ValueError, match="Unknown optimizer name: 'nope'"):
        optim.factory("nope")


def test_docstring_example_runs():
    import doctest

    import metaopt._registry

    result = doctest.testmod(metaopt._registry)
    assert result.attempted > 0 and result.failed == 0
