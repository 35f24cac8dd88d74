"""The transform protocol: ``GradientTransformation``, ``chain`` and the state every piece shares.

A transform is a pair of pure functions over ``dict[str, Tensor]`` (optax's
``GradientTransformation``)::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)

The pieces themselves live in :mod:`metaopt.optim.transforms` (scaling, weight decay,
momentum, moments, clipping), :mod:`metaopt.optim.factored` (Adafactor's pieces) and
:mod:`metaopt.optim.orthogonal` (Muon's Newton-Schulz step); all of them import this module
and none imports another, so ``transforms`` can re-export every piece without a cycle.

Example:
    >>> import torch
    >>> from metaopt.optim.transform_base import chain, identity
    >>> tx = chain(identity(), identity())
    >>> tx.update({"w": torch.ones(1)}, tx.init({}), {})[0]["w"]
    tensor([1.])

Reference: optax ``_src/base.py`` and ``_src/combine.py``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from metaopt.optim._util import first_device
from metaopt.types import Params

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "CountState",
    "identity",
    "chain",
]

Updates = dict[str, Tensor]


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params) -> (updates, state)``."""

    init: Callable[[Params], Any]
    update: Callable[[Updates, Any, Params], tuple[Updates, Any]]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


class CountState(NamedTuple):
    """``count``: 0-dim int64 tensor, steps taken so far."""

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count: mypy cannot express it


def _count(params: Params) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=first_device(params))


def _step_t(count: Tensor, like: Tensor, cache: dict) -> Tensor:
    """``t = count + 1`` (1-based step) as a 0-dim tensor of ``like``'s dtype, once per dtype."""
    t = cache.get(like.dtype)
    if t is None:
        t = cache[like.dtype] = (count + 1).to(like.dtype)
    return t


def identity() -> GradientTransformation:
    """Pass updates through unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda u, s, p: (dict(u), s))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    Example:
        >>> import torch
        >>> from metaopt.optim.transforms import scale
        >>> tx = chain(scale(2.0), scale(3.0))
        >>> tx.update({"w": torch.ones(1)}, tx.init({}), {})[0]["w"]
        tensor([6.])
    """

    def init(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Updates, state: tuple, params: Params) -> tuple[Updates, tuple]:
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)
