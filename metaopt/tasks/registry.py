"""Build task distributions by name, for configs: ``get("omniglot", root=..., ways=5)``."""

from __future__ import annotations

from typing import Any, Callable

from metaopt._registry import Registry
from metaopt.tasks.omniglot import Omniglot
from metaopt.tasks.sinusoid import Sinusoid


def _builtins(reg: Registry[Any]) -> None:
    reg.register("sinusoid", Sinusoid)
    reg.register("omniglot", Omniglot)


_TASKS: Registry[Any] = Registry("task", _builtins)


def register(name: str, factory: Callable[..., Any]) -> None:
    """Register ``factory(**cfg)`` (an object with ``sample(n, generator)``) under ``name``."""
    _TASKS.register(name, factory, replace=True)


def unregister(name: str) -> None:
    """Remove the task distribution registered under ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    _TASKS.unregister(name)


def factory(name: str) -> Callable[..., Any]:
    """The factory registered under ``name`` (case-insensitive), not called; configs read
    its signature to check the ``task`` section's keys.

    Raises:
        ValueError: unknown name (the message lists the known ones).

    Example:
        >>> from metaopt.tasks import Sinusoid, factory
        >>> factory("sinusoid") is Sinusoid
        True
    """
    return _TASKS.factory(name)


def names() -> list[str]:
    """Sorted list of the registered task names."""
    return _TASKS.names()


def get(name: str, **cfg: Any) -> Any:
    """Build the task distribution registered under ``name`` with ``cfg``.

    Args:
        name: one of :func:`names` (case-insensitive): ``"sinusoid"``, ``"omniglot"``.
        **cfg: the constructor's arguments, e.g. ``shots=10, queries=10``.

    Raises:
        ValueError: unknown name (the message lists the known ones), or arguments the
            constructor does not take or rejects.

    Example:
        >>> from metaopt.tasks import get
        >>> get("sinusoid", shots=5, queries=5)
        Sinusoid(shots=5, queries=5, amplitude=(0.1, 5.0), phase=(0.0, 3.141592653589793), x_range=(-5.0, 5.0))
    """
    return _TASKS.get(name, **cfg)
