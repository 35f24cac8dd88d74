"""Accumulator optimizers, equal step by step to torch.optim: RMSprop, Adagrad, Adadelta.

Chains (see :mod:`metaopt.optim.transforms`)::

    RMSprop:  [negate] -> [g + wd p] -> scale_by_rms -> [trace(momentum)] -> -lr * u
    Adagrad:  [negate] -> [g + wd p] -> scale_by_adagrad -> 1 / (1 + (t-1) lr_decay) -> -lr * u
    Adadelta: [negate] -> [g + wd p] -> scale_by_adadelta -> -lr * u

Every preset also takes keyword-only ``grad_clip_norm`` / ``grad_clip_value``
(:func:`~metaopt.optim.chain.grad_clipping`), off by default.

Differences from the reference: tensor hyperparameters stay tensors (meta-gradients flow
into them); one step counter per chain piece instead of one per param.
"""

from __future__ import annotations

from typing import Any, Optional

from metaopt.optim import transforms as T
from metaopt.optim._util import check_ge, check_hyper, check_lr, check_range, is_number
from metaopt.optim.chain import Chained

__all__ = ["RMSprop", "Adagrad", "Adadelta"]


def _prefix(weight_decay: Any, maximize: bool) -> list[T.GradientTransformation]:
    tx = [T.scale(-1.0)] if maximize else []
    if not (is_number(weight_decay) and weight_decay == 0):
        tx.append(T.add_decayed_weights(weight_decay))
    return tx


def _check_wd(weight_decay: Any) -> None:
    check_hyper(weight_decay, "weight_decay")
    check_ge(weight_decay, 0.0, "Invalid weight_decay value: {}")


class RMSprop(Chained):
    """RMSprop (Hinton 2012), ``torch.optim.RMSprop``::

        g = -g if maximize;  g = g + wd p
        v = alpha v + (1 - alpha) g^2;  m = lerp(m, g, 1 - alpha)           (centered)
        u = g / (sqrt(v - m^2 if centered else v) + eps)
        b = momentum b + u; u = b                                           (momentum > 0)
        p = p - lr u

    Example:
        >>> import torch
        >>> opt = RMSprop(lr=0.01)
        >>> p = {"w": torch.tensor([1.0])}
        >>> opt.step(p, {"w": torch.tensor([2.0])}, opt.init(p))[0]["w"]   # 1 - 0.01 / sqrt(0.01)
        tensor([0.9000])
    """

    def __init__(
        self, lr: Any = 1e-2, alpha: Any = 0.99, eps: float = 1e-8, weight_decay: Any = 0.0,
        momentum: Any = 0.0, centered: bool = False, *, maximize: bool = False,
        grad_clip_norm: Optional[float] = None, grad_clip_value: Optional[float] = None,
    ) -> None:
        check_lr(lr)
        check_ge(eps, 0.0, "Invalid epsilon value: {}")
        check_hyper(momentum, "momentum")
        check_ge(momentum, 0.0, "Invalid momentum value: {}")
        _check_wd(weight_decay)
        check_hyper(alpha, "alpha")
        check_ge(alpha, 0.0, "Invalid alpha value: {}")
        self.lr, self.alpha, self.eps, self.weight_decay = lr, alpha, eps, weight_decay
        self.momentum, self.centered, self.maximize = momentum, centered, maximize
        self._repr_keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
        tx = _prefix(weight_decay, maximize) + [T.scale_by_rms(alpha, eps, centered)]
        if not (is_number(momentum) and momentum == 0):
            tx.append(T.trace(momentum))  # b starts at 0: b_1 = u_1, as torch's zero buffer
        super().__init__(T.chain(*tx, T.scale_by_learning_rate(lr)),
                         grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)


class Adagrad(Chained):
    """Adagrad (Duchi et al. 2011), ``torch.optim.Adagrad``::

        g = -g if maximize;  g = g + wd p;  s = s + g^2   (s starts at initial_accumulator_value)
        p = p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)

    Example:
        >>> import torch
        >>> opt = Adagrad(lr=0.5)
        >>> p = {"w": torch.tensor([1.0])}
        >>> opt.step(p, {"w": torch.tensor([-3.0])}, opt.init(p))[0]["w"]
        tensor([1.5000])
    """

    def __init__(
        self, lr: Any = 1e-2, lr_decay: Any = 0.0, weight_decay: Any = 0.0,
        initial_accumulator_value: float = 0.0, eps: float = 1e-10, *, maximize: bool = False,
        grad_clip_norm: Optional[float] = None, grad_clip_value: Optional[float] = None,
    ) -> None:
        check_lr(lr)
        check_hyper(lr_decay, "lr_decay")
        check_ge(lr_decay, 0.0, "Invalid lr_decay value: {}")
        _check_wd(weight_decay)
        check_ge(initial_accumulator_value, 0.0, "Invalid initial_accumulator_value value: {}")
        check_ge(eps, 0.0, "Invalid epsilon value: {}")
        self.lr, self.lr_decay, self.weight_decay = lr, lr_decay, weight_decay
        self.initial_accumulator_value, self.eps, self.maximize = initial_accumulator_value, eps, maximize
        self._repr_keys = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize")
        tx = _prefix(weight_decay, maximize) + [T.scale_by_adagrad(initial_accumulator_value, eps)]
        if not (is_number(lr_decay) and lr_decay == 0):
            # count is the number of steps before this one: t - 1.
            tx.append(T.scale_by_schedule(lambda count: 1.0 / (1.0 + count * lr_decay)))
        super().__init__(T.chain(*tx, T.scale_by_learning_rate(lr)),
                         grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)


class Adadelta(Chained):
    """Adadelta (Zeiler 2012), ``torch.optim.Adadelta``::

        g = -g if maximize;  g = g + wd p;  v = rho v + (1 - rho) g^2
        u = sqrt(a + eps) / sqrt(v + eps) g;  a = rho a + (1 - rho) u^2;  p = p - lr u

    Example:
        >>> import torch
        >>> opt = Adadelta()
        >>> p = {"w": torch.tensor([1.0])}
        >>> opt.step(p, {"w": torch.tensor([1.0])}, opt.init(p))[0]["w"]   # 1 - sqrt(1e-6 / (0.1 + 1e-6))
        tensor([0.9968])
    """

    def __init__(
        self, lr: Any = 1.0, rho: Any = 0.9, eps: float = 1e-6, weight_decay: Any = 0.0, *, maximize: bool = False,
        grad_clip_norm: Optional[float] = None, grad_clip_value: Optional[float] = None,
    ) -> None:
        check_lr(lr)
        check_hyper(rho, "rho")
        check_range(rho, 0.0, 1.0, "Invalid rho value: {}", closed_high=True)
        check_ge(eps, 0.0, "Invalid epsilon value: {}")
        _check_wd(weight_decay)
        self.lr, self.rho, self.eps, self.weight_decay, self.maximize = lr, rho, eps, weight_decay, maximize
        self._repr_keys = ("lr", "rho", "eps", "weight_decay", "maximize")
        tx = _prefix(weight_decay, maximize) + [T.scale_by_adadelta(rho, eps)]
        super().__init__(T.chain(*tx, T.scale_by_learning_rate(lr)),
                         grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)
