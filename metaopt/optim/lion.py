"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"), equal step by
step to the ``lion-pytorch`` package (``from lion_pytorch import Lion``).

Chain: ``[negate] -> scale_by_lion -> -lr * u -> decoupled decay``.
"""

from __future__ import annotations

from typing import Any, Optional

from metaopt.optim import transforms as T
from metaopt.optim._util import check_ge, check_hyper, check_lr, check_range, is_number
from metaopt.optim.chain import Chained

__all__ = ["Lion"]


class Lion(Chained):
    """Lion: the sign of an interpolated momentum, with decoupled weight decay::

        u = sign(b1 m + (1 - b1) g);  p = p (1 - lr wd) - lr u;  m = b2 m + (1 - b2) g

    The step has zero derivative with respect to the grads (a sign); meta-gradients flow
    through the parameters, the weight decay and a tensor ``lr``.

    Args:
        lr: step size (``lion-pytorch`` default 1e-4; it asserts ``lr > 0``, here ``>= 0``).
        betas: ``(b1, b2)``, each in ``[0, 1]``.
        weight_decay: decoupled decay coefficient, scaled by ``lr``.
        decoupled_weight_decay: as ``lion-pytorch``: decay ``p (1 - wd lr / lr_0)`` where
            ``lr_0`` is the initial ``lr`` (so ``p (1 - wd)`` at a constant rate).
        maximize: ascend (an extension; ``lion-pytorch`` has no such flag).
        grad_clip_norm, grad_clip_value: gradient clipping first (extensions, off by default).

    Example:
        >>> import torch
        >>> opt = Lion(lr=0.1)
        >>> p = {"w": torch.tensor([1.0, 1.0])}
        >>> opt.step(p, {"w": torch.tensor([3.0, -0.01])}, opt.init(p))[0]["w"]
        tensor([0.9000, 1.1000])

    Reference: ``lion_pytorch.Lion`` (lucidrains/lion-pytorch); Chen et al. 2023, Alg. 2.
    """

    def __init__(
        self, lr: Any = 1e-4, betas: tuple[Any, Any] = (0.9, 0.99), weight_decay: Any = 0.0,
        decoupled_weight_decay: bool = False, *, maximize: bool = False,
        grad_clip_norm: Optional[float] = None, grad_clip_value: Optional[float] = None,
    ) -> None:
        check_lr(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas should be a pair (beta1, beta2) but is: {betas!r}")
        for i, b in enumerate(betas):
            check_hyper(b, f"betas[{i}]")
            check_range(b, 0.0, 1.0, f"Invalid beta parameter at index {i}: {{}}", closed_high=True)
        check_hyper(weight_decay, "weight_decay")
        check_ge(weight_decay, 0.0, "Invalid weight_decay value: {}")
        if decoupled_weight_decay and not is_number(lr):
            raise ValueError(f"decoupled_weight_decay=True needs a float lr (it divides by the initial lr) but lr is: {lr!r}")
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.decoupled_weight_decay, self.maximize = decoupled_weight_decay, maximize
        self._repr_keys = ("lr", "betas", "weight_decay", "decoupled_weight_decay", "maximize")
        tx = [T.scale(-1.0)] if maximize else []
        tx += [T.scale_by_lion(*betas), T.scale_by_learning_rate(lr)]
        if not (is_number(weight_decay) and weight_decay == 0):
            wd = weight_decay / lr if decoupled_weight_decay and lr != 0 else weight_decay
            tx.append(T.add_decoupled_weight_decay(lr, wd))
        super().__init__(T.chain(*tx), grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)
