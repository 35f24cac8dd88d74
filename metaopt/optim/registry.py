"""Build inner optimizers by name, for configs: ``get("adafactor", lr=1e-2)``."""

from __future__ import annotations

from typing import Any, Callable

from metaopt._registry import Registry
from metaopt.optim.base import InnerOptimizer


def _builtins(reg: Registry[InnerOptimizer]) -> None:
    from metaopt.optim.adafactor import Adafactor
    from metaopt.optim.sgd import SGD

    reg.register("sgd", SGD)
    reg.register("adafactor", Adafactor)
    reg.register("adafactor_torch", Adafactor)
    reg.register("adafactor_hf", Adafactor.from_transformers)
    reg.register("adafactor_transformers", Adafactor.from_transformers)
    reg.register("adafactor_paper", Adafactor.paper)


_OPTIMIZERS: Registry[InnerOptimizer] = Registry("optimizer", _builtins)


def register(name: str, factory: Callable[..., InnerOptimizer]) -> None:
    """Register ``factory(**kwargs) -> InnerOptimizer`` under ``name`` (lower case)."""
    _OPTIMIZERS.register(name, factory, replace=True)


def unregister(name: str) -> None:
    """Remove the optimizer registered under ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    _OPTIMIZERS.unregister(name)


def names() -> list[str]:
    """Sorted list of the registered optimizer names."""
    return _OPTIMIZERS.names()


def factory(name: str) -> Callable[..., InnerOptimizer]:
    """The factory registered under ``name`` (case-insensitive), not called: a class such
    as :class:`~metaopt.optim.SGD` or a constructor such as ``Adafactor.from_transformers``.
    ``metaopt.config`` reads its signature to validate config keys.

    Raises:
        ValueError: unknown name (the message lists the known ones).

    Example:
        >>> from metaopt.optim import SGD, factory
        >>> factory("SGD") is SGD
        True
    """
    return _OPTIMIZERS.factory(name)


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
    return _OPTIMIZERS.get(name, **kwargs)
