"""Functional, differentiable inner optimizers: ``init(params) -> state``,
``step(params, grads, state) -> (params, state)``.

Example:
    >>> import torch
    >>> from metaopt import optim
    >>> opt = optim.get("sgd", lr=0.5)
    >>> params = {"w": torch.ones(2)}
    >>> params, _ = opt.step(params, {"w": torch.ones(2)}, opt.init(params))
    >>> params["w"]
    tensor([0.5000, 0.5000])
    >>> optim.names()
    ['adafactor', 'adafactor_hf', 'adafactor_paper', 'adafactor_torch', 'adafactor_transformers', 'sgd']
"""

from metaopt.optim.adafactor import Adafactor, AdafactorState
from metaopt.optim.base import InnerOptimizer
from metaopt.optim.registry import factory, get, names, register, unregister
from metaopt.optim.sgd import SGD, SGDState

__all__ = [
    "Adafactor",
    "AdafactorState",
    "InnerOptimizer",
    "SGD",
    "SGDState",
    "factory",
    "get",
    "names",
    "register",
    "unregister",
]
