"""Adafactor's pieces (Shazeer & Stern 2018): factored second moment, update clipping and
relative (parameter-scaled) steps, each a small :class:`~metaopt.optim.transform_base.GradientTransformation`.

:class:`~metaopt.optim.Adafactor` chains them (optax's ``adafactor`` recipe)::

    scale_by_factored_rms -> clip_by_block_rms -> scale_by_param_block_rms -> ...

Example:
    >>> import torch
    >>> from metaopt.optim.factored import scale_by_factored_rms
    >>> tx = scale_by_factored_rms()
    >>> params = {"w": torch.zeros(2, 3)}
    >>> state = tx.init(params)
    >>> state.row["w"].shape, state.col["w"].shape   # (n, 1) and (1, m) factors, not (n, m)
    (torch.Size([2, 1]), torch.Size([1, 3]))
    >>> updates, state = tx.update({"w": torch.full((2, 3), 2.0)}, state, params)
    >>> updates["w"]   # g / sqrt(g^2) at the first step (w_1 = 1)
    tensor([[1., 1., 1.],
            [1., 1., 1.]])

Reference: optax ``_src/factorized.py`` and ``_src/clipping.py``; torch.optim.Adafactor.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from metaopt.optim._util import factor_rsqrt
from metaopt.optim.transform_base import EmptyState, GradientTransformation, Updates, _count, _step_t
from metaopt.types import Params

__all__ = [
    "FactoredState",
    "scale_by_factored_rms",
    "clip_by_block_rms",
    "scale_by_param_block_rms",
]


class FactoredState(NamedTuple):
    """``count``; ``row`` ``(..., n, 1)`` and ``col`` ``(..., 1, m)`` factors of factored
    params; full ``v`` of the others."""

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count: mypy cannot express it
    row: dict[str, Tensor]
    col: dict[str, Tensor]
    v: dict[str, Tensor]


def _factored_dims(shape: torch.Size, min_dim_size_to_factor: Optional[int]) -> Optional[tuple[int, int]]:
    """Last two dims (torch) or, with ``min_dim_size_to_factor``, the two largest (optax)."""
    if len(shape) < 2:
        return None
    if min_dim_size_to_factor is None:
        return len(shape) - 2, len(shape) - 1
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    a, b = sorted(order[-2:])
    return None if min(shape[a], shape[b]) < min_dim_size_to_factor else (a, b)


def scale_by_factored_rms(
    beta2_decay: float = -0.8, eps: Optional[float] = None, *, eps_inside: bool = False,
    factored: bool = True, min_dim_size_to_factor: Optional[int] = None,
) -> GradientTransformation:
    """Adafactor's normalised update ``u = g / sqrt(V)`` with ``w_t = t^beta2_decay``::

        factored (dims a < b): R = lerp(R, mean_b(g^2), w_t), C = lerp(C, mean_a(g^2), w_t),
                               V = R C / mean_a(R)
        otherwise:             V = lerp(V, g^2, w_t)

    ``eps`` (``None``: the dtype's machine epsilon) floors ``mean_a(R)`` at ``eps`` and ``V``
    at ``eps^2`` (torch); ``eps_inside=True`` adds it to ``g^2`` instead (transformers).
    """

    def init(params: Params) -> FactoredState:
        row, col, v = {}, {}, {}
        for k, p in params.items():
            dims = _factored_dims(p.shape, min_dim_size_to_factor) if factored else None
            if dims is None:
                v[k] = torch.zeros_like(p)
            else:
                a, b = dims
                rs, cs = list(p.shape), list(p.shape)
                rs[b], cs[a] = 1, 1
                row[k], col[k] = p.new_zeros(rs), p.new_zeros(cs)
        return FactoredState(_count(params), row, col, v)

    def update(updates: Updates, state: FactoredState, params: Params) -> tuple[Updates, FactoredState]:
        cache: dict = {}
        out, row, col, full = {}, {}, {}, {}
        for k, g in updates.items():
            w = torch.pow(_step_t(state.count, g, cache), beta2_decay)
            e = torch.finfo(g.dtype).eps if eps is None else eps
            g2 = torch.square(g) + e if eps_inside else torch.square(g)
            if k in state.row:
                dims = _factored_dims(g.shape, min_dim_size_to_factor)
                if dims is None:  # init factored exactly these params; a reshaped grad is a caller bug
                    raise ValueError(f"gradient {k!r} of shape {tuple(g.shape)} no longer has two factorable dims")
                a, b = dims
                r = row[k] = torch.lerp(state.row[k], g2.mean(b, keepdim=True), w)  # (..., n, 1)
                c = col[k] = torch.lerp(state.col[k], g2.mean(a, keepdim=True), w)  # (..., 1, m)
                r_mean = r.mean(a, keepdim=True)
                if eps_inside:
                    # transformers' order: rsqrt of each factor, then the product. With eps1
                    # = 1e-30 a dead row times a dead column (~1e-30 * 1e-30) underflows to
                    # 0 in float32, and rsqrt(0) * 0 would be NaN; each factor stays finite.
                    out[k] = factor_rsqrt(r / r_mean) * factor_rsqrt(c) * g
                    continue
                v = (r / r_mean.clamp(min=e)) * c
            else:
                v = full[k] = torch.lerp(state.v[k], g2, w)
            if not eps_inside:
                v = v.clamp(min=e * e)
            out[k] = torch.rsqrt(v) * g
        return out, FactoredState(state.count + 1, row, col, full)

    return GradientTransformation(init, update)


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def clip_by_block_rms(threshold: Any) -> GradientTransformation:
    """Update clipping: ``u = u / max(1, RMS(u) / threshold)`` per param."""

    def update(updates: Updates, state: EmptyState, params: Params) -> tuple[Updates, EmptyState]:
        return {k: u / torch.clamp(_rms(u) / threshold, min=1.0) for k, u in updates.items()}, state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_param_block_rms(min_scale: Any = 1e-3) -> GradientTransformation:
    """Relative step: ``u = max(min_scale, RMS(p)) * u`` per param."""

    def update(updates: Updates, state: EmptyState, params: Params) -> tuple[Updates, EmptyState]:
        return {k: u * torch.clamp(_rms(params[k].to(u.dtype)), min=min_scale) for k, u in updates.items()}, state

    return GradientTransformation(lambda params: EmptyState(), update)
