"""The model zoo, as plain ``nn.Module``s: the MAML paper's :class:`MLP` (sinusoid
regression) and :class:`Conv4` (Omniglot), the few-shot backbone :class:`ResNet12`, a small
:class:`TransformerClassifier` and an :class:`LSTMRegressor` for sequence tasks, the
hand-written :class:`BatchNorm` that the conv nets use, and a registry that builds any of
them by name for configs (:func:`get`, :func:`names`, :func:`register`).

Nothing here knows about meta-learning: :class:`metaopt.MAML` runs any ``nn.Module`` at
other parameters with :func:`torch.func.functional_call`.

Example:
    >>> import torch
    >>> from metaopt import models
    >>> models.names()
    ['conv4', 'lstm', 'mlp', 'resnet12', 'transformer']
    >>> net = models.get("resnet12", ways=5, width=0.25)
    >>> net(torch.zeros(2, 1, 28, 28)).shape   # (examples, ways)
    torch.Size([2, 5])

Why a hand-written batch norm: under :func:`torch.func.vmap`, second-order gradients
through ``torch.nn.functional.batch_norm`` are wrong in torch 2.13 (about 6e-3 relative
error, in float64 too), so the vectorised MAML path cannot use ``nn.BatchNorm2d``.
:class:`BatchNorm` computes the same function with :func:`batch_norm`, written from
elementary ops (mean, biased variance, ``rsqrt``) whose derivatives of every order are
exact under ``vmap``, whenever it runs inside a ``torch.func`` transform; on plain tensors
(the per-task loop) it calls torch's kernel, exact there and faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from metaopt._registry import Registry
from metaopt.models.conv import MLP, Conv4, ConvBlock, ResBlock12, ResNet12
from metaopt.models.layers import BatchNorm, batch_norm, drop_block, max_pool2x2
from metaopt.models.sequence import LSTMRegressor, TransformerClassifier

__all__ = [
    "BatchNorm", "MLP", "Conv4", "ConvBlock", "ResNet12", "ResBlock12", "TransformerClassifier", "LSTMRegressor",
    "batch_norm", "max_pool2x2", "drop_block", "get", "names", "register", "unregister", "factory",
]


# ----------------------------------------------------------------------------- registry


def _builtins(reg: Registry[nn.Module]) -> None:
    reg.register("mlp", MLP)
    reg.register("conv4", Conv4)
    reg.register("resnet12", ResNet12)
    reg.register("transformer", TransformerClassifier)
    reg.register("lstm", LSTMRegressor)


_MODELS: Registry[nn.Module] = Registry("model", _builtins)


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``factory(**kwargs) -> nn.Module`` under ``name`` (lower case), replacing
    any model of that name.

    Example:
        >>> from torch import nn
        >>> register("tiny_linear", lambda ways=5: nn.Linear(4, ways))
        >>> get("tiny_linear", ways=3).out_features
        3
        >>> unregister("tiny_linear")
    """
    _MODELS.register(name, factory, replace=True)


def unregister(name: str) -> None:
    """Remove the model registered under ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    _MODELS.unregister(name)


def names() -> list[str]:
    """Sorted list of the registered model names.

    Example:
        >>> names()
        ['conv4', 'lstm', 'mlp', 'resnet12', 'transformer']
    """
    return _MODELS.names()


def factory(name: str) -> Callable[..., nn.Module]:
    """The factory (usually the class) registered under ``name`` (case-insensitive), not
    called; a config layer can read its signature to validate keys.

    Raises:
        ValueError: unknown name (the message lists the known ones).

    Example:
        >>> factory("ResNet12") is ResNet12
        True
    """
    return _MODELS.factory(name)


def get(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered under ``name`` with ``kwargs`` (the constructor's names).

    Args:
        name: one of :func:`names` (case-insensitive): ``"mlp"`` (:class:`MLP`), ``"conv4"``
            (:class:`Conv4`), ``"resnet12"`` (:class:`ResNet12`), ``"transformer"``
            (:class:`TransformerClassifier`), ``"lstm"`` (:class:`LSTMRegressor`).
        **kwargs: the model's constructor arguments.

    Raises:
        ValueError: unknown name (the message lists the known ones), an unknown keyword,
            or a bad value (raised by the constructor).

    Example:
        >>> get("conv4", ways=5, hidden=32).head
        Linear(in_features=32, out_features=5, bias=True)
        >>> get("vgg")
        Traceback (most recent call last):
        ValueError: Unknown model name: 'vgg'; known names: conv4, lstm, mlp, resnet12, transformer
    """
    return _MODELS.get(name, **kwargs)
