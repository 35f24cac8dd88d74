"""Shared type aliases.

A model's parameters, their gradients and an optimizer's per-parameter state are all
plain ``dict[str, Tensor]`` keyed like ``dict(model.named_parameters())``, so they can be
passed to :func:`torch.func.functional_call`, mapped with :func:`torch.func.vmap` and
differentiated through.
"""

from __future__ import annotations

from typing import Any, Union

from torch import Tensor

#: Parameters of a model, keyed like ``model.named_parameters()``.
Params = dict[str, Tensor]
#: Gradients, keyed exactly like the params they belong to.
Grads = dict[str, Tensor]
#: Buffers of a model (BatchNorm running stats, ...), keyed like ``model.named_buffers()``.
Buffers = dict[str, Tensor]
#: An optimizer's state: a NamedTuple (or any pytree) of tensors and dicts of tensors.
State = Any
#: A hyperparameter that may be a Python float, a 0-dim tensor (possibly requiring grad),
#: or, where documented, a dict of tensors keyed like params (per-parameter values).
Scalar = Union[float, Tensor]
HyperParam = Union[float, Tensor, dict[str, Tensor]]

__all__ = ["Params", "Grads", "Buffers", "State", "Scalar", "HyperParam"]
