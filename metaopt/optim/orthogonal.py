"""Muon's orthogonalisation: each 2-D update replaced by the nearest semi-orthogonal matrix
``U V^T`` (of ``u = U S V^T``), approximated by quintic Newton-Schulz iterations.

Example:
    >>> import torch
    >>> from metaopt.optim.orthogonal import scale_by_newton_schulz
    >>> tx = scale_by_newton_schulz(dtype=None)
    >>> u, _ = tx.update({"w": torch.diag(torch.tensor([4.0, 1.0]))}, tx.init({}), {})
    >>> u["w"].diagonal().round(decimals=2)   # singular values 4 and 1 both sent near 1
    tensor([0.7400, 0.7400])

Muon's coefficients trade exactness for speed: five steps bring every singular value near
1, not to exactly 1.

Reference: torch.optim.Muon (``_zeropower_via_newtonschulz``); Jordan et al. 2024.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from metaopt.optim.transform_base import EmptyState, GradientTransformation, Updates
from metaopt.types import Params

__all__ = ["scale_by_newton_schulz"]


def _newton_schulz(g: Tensor, coefficients: tuple, steps: int, eps: float, dtype: Optional[torch.dtype]) -> Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration towards ``U V^T`` of ``g = U S V^T``;
    matmuls only, so differentiable. ``dtype=None`` iterates in ``g``'s dtype."""
    a, b, c = coefficients
    x = g if dtype is None else g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / torch.clamp(torch.linalg.vector_norm(x), min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        # torch's op order (addmm: one rounding each), so bfloat16 iterations match its bits
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x.to(g.dtype)


def scale_by_newton_schulz(
    coefficients: tuple = (3.4445, -4.775, 2.0315), steps: int = 5, eps: float = 1e-7,
    dtype: Optional[torch.dtype] = torch.bfloat16,
) -> GradientTransformation:
    """Muon's orthogonalisation of each (2-D) update by Newton-Schulz iterations in ``dtype``
    (torch: bfloat16; ``None``: the update's dtype, needed for float64 gradcheck)."""

    def update(updates: Updates, state: EmptyState, params: Params) -> tuple[Updates, EmptyState]:
        return {k: _newton_schulz(u, coefficients, steps, eps, dtype) for k, u in updates.items()}, state

    return GradientTransformation(lambda params: EmptyState(), update)
