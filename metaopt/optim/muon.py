"""Muon (Jordan et al., 2024), ``torch.optim.Muon``, made differentiable for inner loops.

Chain: ``[negate] -> nesterov momentum (lerp form) -> Newton-Schulz orthogonalisation ->
-adjusted_lr * u -> decoupled decay``. The Newton-Schulz iterations are matmuls, so
second-order MAML can differentiate through them.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from metaopt.optim import transforms as T
from metaopt.optim._util import check_ge, check_hyper, check_lr, first_device, is_number
from metaopt.optim.chain import Chained
from metaopt.optim.transforms import EmptyState, GradientTransformation, TraceState
from metaopt.types import Params

__all__ = ["Muon"]


def _muon_momentum(momentum: Any, nesterov: bool) -> GradientTransformation:
    """torch's Muon momentum: ``b = lerp(b, g, 1 - mu)``; ``u = lerp(g, b, mu)`` (nesterov) or ``b``."""

    def init(params: Params) -> TraceState:
        return TraceState(torch.zeros((), dtype=torch.int64, device=first_device(params)), {k: torch.zeros_like(p) for k, p in params.items()})

    def update(updates, state, params):
        out, bufs = {}, {}
        for k, g in updates.items():
            mu = momentum if is_number(momentum) else momentum.to(g.dtype)
            b = bufs[k] = torch.lerp(state.trace[k], g, 1.0 - mu)
            out[k] = torch.lerp(g, b, mu) if nesterov else b
        return out, TraceState(state.count + 1, bufs)

    return GradientTransformation(init, update)


def _shape_scale(adjust_lr_fn: Optional[str]) -> GradientTransformation:
    """Muon's per-matrix learning-rate ratio: ``sqrt(max(1, A/B))`` ("original") or
    ``0.2 sqrt(max(A, B))`` ("match_rms_adamw"), ``(A, B)`` the param's shape."""

    def ratio(shape: torch.Size) -> float:
        a, b = shape[:2]
        return 0.2 * math.sqrt(max(a, b)) if adjust_lr_fn == "match_rms_adamw" else math.sqrt(max(1, a / b))

    return GradientTransformation(
        lambda params: EmptyState(),
        lambda u, s, p: ({k: x * ratio(x.shape) for k, x in u.items()}, s),
    )


class Muon(Chained):
    """Muon: momentum, orthogonalised by Newton-Schulz iterations, for 2-D params::

        b = lerp(b, g, 1 - momentum);  u = lerp(g, b, momentum) if nesterov else b
        O = NS(u)   (ns_steps quintic iterations, coefficients ns_coefficients)
        p = p (1 - lr wd) - lr * ratio(A, B) * O

    Args:
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn:
            as ``torch.optim.Muon`` (defaults too: ``weight_decay=0.1``, ``momentum=0.95``).
        ns_dtype: dtype of the iterations; torch's is ``torch.bfloat16``. ``None`` iterates
            in the param's dtype: needed for exact float64 derivatives (gradcheck) and more
            accurate meta-gradients, at the cost of speed on accelerators.
        maximize: ascend (an extension).
        grad_clip_norm, grad_clip_value: gradient clipping first (extensions, off by default).

    Raises:
        ValueError: a param that is not 2-D (at ``init``, as torch at construction).

    Example:
        >>> import torch
        >>> opt = Muon(lr=0.1, weight_decay=0.0, ns_dtype=None)
        >>> p = {"w": torch.zeros(2, 2)}
        >>> p, s = opt.step(p, {"w": torch.eye(2)}, opt.init(p))
        >>> bool(p["w"][0, 0] < 0) and bool(p["w"][0, 1] == 0)   # -0.1 * NS(I) ~ -0.1 * 0.7 I
        True

    Reference: ``torch.optim.Muon``; K. Jordan et al., "Muon: An optimizer for hidden layers
    in neural networks", 2024.

    Differences from the reference: none in the values (the bfloat16 iteration uses
    torch's ops in torch's order; float64 parity to 1e-12 is tested). ``ns_dtype`` and
    ``maximize`` are extensions; a tensor ``lr`` stays a tensor (meta-gradients).
    """

    def __init__(
        self, lr: Any = 1e-3, weight_decay: Any = 0.1, momentum: Any = 0.95, nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315), eps: float = 1e-7,
        ns_steps: int = 5, adjust_lr_fn: Optional[str] = None, *,
        ns_dtype: Optional[torch.dtype] = torch.bfloat16, maximize: bool = False,
        grad_clip_norm: Optional[float] = None, grad_clip_value: Optional[float] = None,
    ) -> None:
        check_lr(lr, "Learning rate should be >= 0 but is: {}")
        check_hyper(momentum, "momentum")
        check_ge(momentum, 0.0, "momentum should be >= 0 but is: {}")
        check_hyper(weight_decay, "weight_decay")
        check_ge(weight_decay, 0.0, "weight decay should be >= 0 but is: {}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
            raise ValueError(f"ns_steps should be an int in [0, 100) but is: {ns_steps!r}")
        if len(ns_coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        self.lr, self.weight_decay, self.momentum, self.nesterov = lr, weight_decay, momentum, nesterov
        self.ns_coefficients, self.eps, self.ns_steps, self.adjust_lr_fn = tuple(ns_coefficients), eps, ns_steps, adjust_lr_fn
        self.ns_dtype, self.maximize = ns_dtype, maximize
        self._repr_keys = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn", "ns_dtype", "maximize")
        tx = [T.scale(-1.0)] if maximize else []
        tx += [
            _muon_momentum(momentum, nesterov),
            T.scale_by_newton_schulz(tuple(ns_coefficients), ns_steps, eps, ns_dtype),
            _shape_scale(adjust_lr_fn),
            T.scale_by_learning_rate(lr),
        ]
        if not (is_number(weight_decay) and weight_decay == 0):
            tx.append(T.add_decoupled_weight_decay(lr, weight_decay))
        super().__init__(T.chain(*tx), grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value)

    def init(self, params: Params) -> Any:
        """Zero momentum buffers; rejects params that are not 2-D."""
        for k, p in params.items():
            if p.dim() != 2:
                raise ValueError(
                    f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()} ({k!r})"
                )
        return super().init(params)
