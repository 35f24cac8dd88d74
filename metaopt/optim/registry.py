"""Build inner optimizers by name, for configs: ``get("adafactor", lr=1e-2)``."""

from __future__ import annotations

from typing import Any, Callable

from metaopt.optim.base import InnerOptimizer

_REGISTRY: dict[str, Callable[..., InnerOptimizer]] = {}


def register(name: str, factory: Callable[..., InnerOptimizer]) -> None:
    """Register ``factory(**kwargs) -> InnerOptimizer`` under ``name`` (lower case)."""
    _REGISTRY[name.lower()] = factory


def names() -> list[str]:
    """Sorted list of the registered optimizer names."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get(name: str, **kwargs: Any) -> InnerOptimizer:
    """Build the optimizer registered under ``name`` with ``kwargs``.

    Args:
        name: one of :func:`names` (case-insensitive), e.g. ``"sgd"``, ``"adafactor"``.
        **kwargs: the optimizer's constructor arguments.

    Raises:
        ValueError: unknown name (the message lists the known ones), or invalid
            hyperparameters (raised by the optimizer's constructor).

    Example:
        >>> from metaopt.optim import get
        >>> get("sgd", lr=0.1, momentum=0.9)
        SGD(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    """
    _ensure_builtins()
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"Unknown optimizer name: {name!r}; known names: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name.lower()](**kwargs)
    except TypeError as e:  # unexpected keyword: report it as a bad config value
        raise ValueError(f"Invalid arguments for optimizer {name!r}: {e}") from e


def _ensure_builtins() -> None:
    if "sgd" in _REGISTRY:
        return
    from metaopt.optim.adafactor import Adafactor
    from metaopt.optim.sgd import SGD

    register("sgd", SGD)
    register("adafactor", Adafactor)
    register("adafactor_torch", Adafactor)
    register("adafactor_hf", Adafactor.from_transformers)
    register("adafactor_transformers", Adafactor.from_transformers)
    register("adafactor_paper", Adafactor.paper)
