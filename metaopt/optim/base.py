"""The inner-optimizer protocol shared by every functional optimizer.

An inner optimizer is any object with two pure methods over ``dict[str, Tensor]``::

    state = opt.init(params)
    params, state = opt.step(params, grads, state)

``step`` never mutates its inputs, never calls ``.item()`` (no host sync), and is built
from differentiable torch ops, so MAML can backpropagate through it and
``torch.func.vmap`` can map it over a batch of tasks.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from metaopt.types import Grads, Params, State


@runtime_checkable
class InnerOptimizer(Protocol):
    """Structural type of an inner optimizer (optax's ``init``/``update`` pair, torch names).

    Example:
        >>> import torch
        >>> from metaopt.optim import SGD, InnerOptimizer
        >>> isinstance(SGD(lr=0.1), InnerOptimizer)
        True
    """

    def init(self, params: Params) -> State:
        """Return the initial state for ``params`` (built from zeros; nothing is mutated)."""
        ...

    def step(self, params: Params, grads: Grads, state: State) -> tuple[Params, State]:
        """Return ``(new_params, new_state)`` computed out of place from the inputs."""
        ...
