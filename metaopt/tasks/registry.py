"""Build task distributions by name, for configs: ``get("omniglot", root=..., ways=5)``."""

from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any]) -> None:
    """Register ``factory(**cfg)`` (an object with ``sample(n, generator)``) under ``name``."""
    _REGISTRY[name.lower()] = factory


def names() -> list[str]:
    """Sorted list of the registered task names."""
    _ensure_builtins()
    return sorted(_REGISTRY)


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
    _ensure_builtins()
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"Unknown task name: {name!r}; known names: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name.lower()](**cfg)
    except TypeError as e:  # unexpected keyword: report it as a bad config value
        raise ValueError(f"Invalid arguments for task {name!r}: {e}") from e


def _ensure_builtins() -> None:
    if "sinusoid" in _REGISTRY:
        return
    from metaopt.tasks.omniglot import Omniglot
    from metaopt.tasks.sinusoid import Sinusoid

    register("sinusoid", Sinusoid)
    register("omniglot", Omniglot)
