"""Build inner optimizers by name, for configs: ``get("adafactor", lr=1e-2)``."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from metaopt._registry import Registry
from metaopt.optim.base import InnerOptimizer


def _builtins(reg: Registry[InnerOptimizer]) -> None:
    from metaopt.optim.adafactor import Adafactor
    from metaopt.optim.adam import Adam, Adamax, AdamW, NAdam, RAdam
    from metaopt.optim.lion import Lion
    from metaopt.optim.muon import Muon
    from metaopt.optim.rmsprop import Adadelta, Adagrad, RMSprop
    from metaopt.optim.sgd import SGD

    # One name per behaviour: torch.optim's class names in lower case, plus "lion" and
    # transformers' Adafactor flavour (the Adafactor paper's recipe is its defaults).
    for cls in (SGD, Adam, AdamW, RMSprop, Adagrad, Adafactor, Adamax, NAdam, RAdam, Adadelta, Lion, Muon):
        reg.register(cls.__name__.lower(), cls)
    reg.register("adafactor_transformers", Adafactor.from_transformers)


# Names of earlier releases: an error that says what to use instead (not a silent alias).
_RENAMED = {
    "adafactor_torch": 'use "adafactor" (torch.optim.Adafactor\'s rule)',
    "adafactor_hf": 'use "adafactor_transformers"',
    "adafactor_paper": 'use "adafactor_transformers" (its defaults are the paper\'s recipe: relative_step=True, '
    "warmup_init=False, beta1=None, clip_threshold=1.0)",
}


def _known(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"optimizer name must be a string but is: {name!r}")
    hint = _RENAMED.get(name.lower())
    if hint is not None and name.lower() not in _OPTIMIZERS.names():
        raise ValueError(f"Unknown optimizer name: {name!r} was removed; {hint}")
    return name


def allowed_kwargs(name: str) -> Optional[list[str]]:
    """Keyword arguments accepted by the optimizer registered under ``name``, or ``None``
    when its factory takes arbitrary ``**kwargs`` it does not declare.

    Example:
        >>> allowed_kwargs("lion")
        ['lr', 'betas', 'weight_decay', 'decoupled_weight_decay', 'maximize', 'grad_clip_norm', 'grad_clip_value']
    """
    f = factory(name)
    declared = getattr(f, "extension_kwargs", None)
    names, var_kw = [], False
    for p in inspect.signature(f).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL and p.name != "self":
            names.append(p.name)
    if var_kw:
        if declared is None:
            return None
        names += [n for n in declared if n not in names]
    return names

_OPTIMIZERS: Registry[InnerOptimizer] = Registry("optimizer", _builtins)


def register(name: str, factory: Callable[..., InnerOptimizer]) -> None:
    """Register ``factory(**kwargs) -> InnerOptimizer`` under ``name`` (lower case)."""
    _OPTIMIZERS.register(name, factory, replace=True)


def unregister(name: str) -> None:
    """Remove the optimizer registered under ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    _OPTIMIZERS.unregister(_known(name))


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
    return _OPTIMIZERS.factory(_known(name))


def get(name: str, **kwargs: Any) -> InnerOptimizer:
    """Build the optimizer registered under ``name`` with ``kwargs``.

    Args:
        name: one of :func:`names` (case-insensitive), e.g. ``"sgd"``, ``"adafactor"``.
        **kwargs: the optimizer's constructor arguments.

    Raises:
        ValueError: unknown name (the message lists the known ones; removed names say
            what replaces them), an unknown keyword (the message lists the allowed ones), or
            invalid hyperparameters (raised by the optimizer's constructor).

    Example:
        >>> from metaopt.optim import get
        >>> get("sgd", lr=0.1, momentum=0.9)
        SGD(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    """
    allowed = allowed_kwargs(name)
    if allowed is not None:
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown argument(s) for optimizer {name!r}: {unknown}; allowed: {allowed}")
    return _OPTIMIZERS.get(_known(name), **kwargs)
