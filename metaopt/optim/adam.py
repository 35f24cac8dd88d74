"""The Adam family, equal step by step to torch.optim: Adam, AdamW, Adamax, NAdam, RAdam.

Each is a chain (see :mod:`metaopt.optim.transforms`)::

    [negate if maximize] -> [coupled decay g + wd p] -> direction -> -lr * u -> [decoupled decay]

with the direction ``scale_by_adam`` / ``scale_by_adamax`` / ``scale_by_nadam`` /
``scale_by_radam``. Arguments, defaults and validation messages are torch's; ``lr`` may
also be a per-parameter dict or a schedule (see :func:`~metaopt.optim.transforms.lr_at`).
Keyword-only extensions, off by default: ``maximize`` where torch lacks it, and gradient
clipping ``grad_clip_norm`` / ``grad_clip_value`` (:func:`~metaopt.optim.chain.grad_clipping`).

Differences from the reference (all of them): the step counter is one tensor per chain piece,
not one per param; torch reads tensor hyperparameters as Python floats, here they stay
tensors (cast to the param dtype), so they receive meta-gradients; decoupled decay is added
to the update (``p + (-step - lr wd p)``) instead of scaling ``p`` first (same value up to
rounding).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from metaopt.optim import transforms as T
from metaopt.optim._util import check_ge, check_hyper, check_lr, check_range
from metaopt.optim.chain import Chained

__all__ = ["Adam", "AdamW", "Adamax", "NAdam", "RAdam"]


def _check_common(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    check_lr(lr)
    check_ge(eps, 0.0, "Invalid epsilon value: {}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas should be a pair (beta1, beta2) but is: {betas!r}")
    for i, b in enumerate(betas):
        check_hyper(b, f"betas[{i}]")
        check_range(b, 0.0, 1.0, f"Invalid beta parameter at index {i}: {{}}")
    check_hyper(weight_decay, "weight_decay")
    check_ge(weight_decay, 0.0, "Invalid weight_decay value: {}")


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _recipe(direction: T.GradientTransformation, lr: Any, weight_decay: Any, decoupled: bool,
            maximize: bool) -> T.GradientTransformation:
    """Variants are list entries, not branches in ``update`` (optax's alias.py shape)."""
    tx = [T.scale(-1.0)] if maximize else []
    if not _is_zero(weight_decay) and not decoupled:
        tx.append(T.add_decayed_weights(weight_decay))
    tx += [direction, T.scale_by_learning_rate(lr)]
    if not _is_zero(weight_decay) and decoupled:
        tx.append(T.add_decoupled_weight_decay(lr, weight_decay))
    return T.chain(*tx)


class Adam(Chained):
    """Adam (Kingma & Ba 2015), functional and differentiable; ``torch.optim.Adam``'s rule::

        g = -g if maximize;  g = g + wd p  (or p = p (1 - lr wd) if decoupled_weight_decay)
        m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2;  v' = max(v', v) if amsgrad
        p = p - lr (m / (1 - b1^t)) / (sqrt(v') / sqrt(1 - b2^t) + eps)

    Example:
        >>> import torch
        >>> opt = Adam(lr=0.1)
        >>> p = {"w": torch.tensor([1.0, -1.0])}
        >>> p, s = opt.step(p, {"w": torch.tensor([2.0, -0.5])}, opt.init(p))
        >>> p["w"]   # the first Adam step is lr * sign(g)
        tensor([ 0.9000, -0.9000])

    Reference: ``torch.optim.Adam``.
    """

    def __init__(
        self, lr: Any = 1e-3, betas: tuple[Any, Any] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: Any = 0.0, amsgrad: bool = False, *, maximize: bool = False,
        decoupled_weight_decay: bool = False, grad_clip_norm: Optional[float] = None,
        grad_clip_value: Optional[float] = None,
    ) -> None:
        _check_common(lr, betas, eps, weight_decay)
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.amsgrad, self.maximize, self.decoupled_weight_decay = amsgrad, maximize, decoupled_weight_decay
        self._repr_keys: tuple[str, ...] = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
        super().__init__(_recipe(T.scale_by_adam(*betas, eps, amsgrad), lr, weight_decay,
                                 decoupled_weight_decay, maximize), grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), ``torch.optim.AdamW``:
    ``p = p (1 - lr wd)`` then the Adam step; ``weight_decay`` defaults to 1e-2.

    Example:
        >>> import torch
        >>> opt = AdamW(lr=0.1, weight_decay=0.5)
        >>> p = {"w": torch.tensor([1.0])}
        >>> opt.step(p, {"w": torch.tensor([3.0])}, opt.init(p))[0]["w"]   # 1 (1 - 0.05) - 0.1
        tensor([0.8500])
    """

    def __init__(
        self, lr: Any = 1e-3, betas: tuple[Any, Any] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: Any = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
        grad_clip_norm: Optional[float] = None, grad_clip_value: Optional[float] = None,
    ) -> None:
        super().__init__(lr, betas, eps, weight_decay, amsgrad, maximize=maximize, decoupled_weight_decay=True,
                         grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)
        self._repr_keys = tuple(k for k in self._repr_keys if k != "decoupled_weight_decay")


class Adamax(Chained):
    """Adamax (Kingma & Ba 2015, Sec. 7), ``torch.optim.Adamax``::

        m = lerp(m, g, 1 - b1);  n = max(b2 n, |g| + eps);  p = p - lr / (1 - b1^t) m / n

    Example:
        >>> import torch
        >>> opt = Adamax(lr=0.1)
        >>> p = {"w": torch.tensor([1.0])}
        >>> opt.step(p, {"w": torch.tensor([-4.0])}, opt.init(p))[0]["w"]
        tensor([1.1000])
    """

    def __init__(
        self, lr: Any = 2e-3, betas: tuple[Any, Any] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: Any = 0.0, *, maximize: bool = False,
        grad_clip_norm: Optional[float] = None, grad_clip_value: Optional[float] = None,
    ) -> None:
        _check_common(lr, betas, eps, weight_decay)
        self.lr, self.betas, self.eps, self.weight_decay, self.maximize = lr, tuple(betas), eps, weight_decay, maximize
        self._repr_keys = ("lr", "betas", "eps", "weight_decay", "maximize")
        super().__init__(_recipe(T.scale_by_adamax(*betas, eps), lr, weight_decay, False, maximize),
                         grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)


class NAdam(Chained):
    """Adam with Nesterov momentum (Dozat 2016), ``torch.optim.NAdam``; see
    :func:`~metaopt.optim.transforms.scale_by_nadam` for the rule.

    Example:
        >>> import torch
        >>> opt = NAdam()
        >>> p = {"w": torch.ones(2)}
        >>> p, s = opt.step(p, {"w": torch.ones(2)}, opt.init(p))
        >>> s[0].extra["mu_product"]   # mu_1 = 0.9 (1 - 0.5 * 0.96^0.004)
        tensor(0.4501)
    """

    def __init__(
        self, lr: Any = 2e-3, betas: tuple[Any, Any] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: Any = 0.0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False,
        *, maximize: bool = False,
        grad_clip_norm: Optional[float] = None, grad_clip_value: Optional[float] = None,
    ) -> None:
        _check_common(lr, betas, eps, weight_decay)
        check_ge(momentum_decay, 0.0, "Invalid momentum_decay value: {}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.momentum_decay, self.decoupled_weight_decay, self.maximize = momentum_decay, decoupled_weight_decay, maximize
        self._repr_keys = ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "maximize")
        super().__init__(_recipe(T.scale_by_nadam(*betas, eps, momentum_decay), lr, weight_decay,
                                 decoupled_weight_decay, maximize), grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)


class RAdam(Chained):
    """Rectified Adam (Liu et al. 2020), ``torch.optim.RAdam``; see
    :func:`~metaopt.optim.transforms.scale_by_radam`. The first steps (``rho_t <= 5``) are
    SGD with bias-corrected momentum.

    Example:
        >>> import torch
        >>> opt = RAdam(lr=0.1)
        >>> p = {"w": torch.tensor([1.0])}
        >>> opt.step(p, {"w": torch.tensor([2.0])}, opt.init(p))[0]["w"]   # 1 - 0.1 * 2
        tensor([0.8000])
    """

    def __init__(
        self, lr: Any = 1e-3, betas: tuple[Any, Any] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: Any = 0.0, decoupled_weight_decay: bool = False, *, maximize: bool = False,
        grad_clip_norm: Optional[float] = None, grad_clip_value: Optional[float] = None,
    ) -> None:
        _check_common(lr, betas, eps, weight_decay)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.decoupled_weight_decay, self.maximize = decoupled_weight_decay, maximize
        self._repr_keys = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize")
        super().__init__(_recipe(T.scale_by_radam(*betas, eps), lr, weight_decay, decoupled_weight_decay, maximize),
                         grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)
