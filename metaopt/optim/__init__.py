"""Functional, differentiable inner optimizers: ``init(params) -> state``,
``step(params, grads, state) -> (params, state)``.

Presets reproduce torch.optim step by step under torch's names, arguments and defaults
(plus Lion from ``lion-pytorch``); they are built from the composable pure transforms of
:mod:`metaopt.optim.transforms` (optax style), wrapped by :class:`Chained`.

Example:
    >>> import torch
    >>> from metaopt import optim
    >>> opt = optim.get("sgd", lr=0.5)
    >>> params = {"w": torch.ones(2)}
    >>> params, _ = opt.step(params, {"w": torch.ones(2)}, opt.init(params))
    >>> params["w"]
    tensor([0.5000, 0.5000])
    >>> optim.names()
    ['adadelta', 'adafactor', 'adafactor_transformers', 'adagrad', 'adam', 'adamax', 'adamw', 'lion', 'muon', 'nadam', 'radam', 'rmsprop', 'sgd']
"""

from metaopt.optim import transforms
from metaopt.optim.adafactor import Adafactor, AdafactorState
from metaopt.optim.adam import Adam, Adamax, AdamW, NAdam, RAdam
from metaopt.optim.base import InnerOptimizer
from metaopt.optim.chain import Chained
from metaopt.optim.learned_factors import LearnedAdafactor
from metaopt.optim.lion import Lion
from metaopt.optim.muon import Muon
from metaopt.optim.registry import allowed_kwargs, factory, get, names, register, unregister
from metaopt.optim.rmsprop import Adadelta, Adagrad, RMSprop
from metaopt.optim.sgd import SGD, SGDState

__all__ = [
    "Adadelta",
    "Adafactor",
    "AdafactorState",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Chained",
    "InnerOptimizer",
    "LearnedAdafactor",
    "Lion",
    "Muon",
    "NAdam",
    "RAdam",
    "RMSprop",
    "SGD",
    "SGDState",
    "allowed_kwargs",
    "factory",
    "get",
    "names",
    "register",
    "transforms",
    "unregister",
]
