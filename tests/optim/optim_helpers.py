"""Shared tables for the optimizer tests: shapes, reference runners."""

from __future__ import annotations

import torch

# One param of each rank the optimizers must handle; "conv" is a 4-D conv kernel.
SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "bias": (7,),
    "weight": (5, 6),
    "w3d": (2, 4, 3),
    "conv": (4, 3, 3, 3),
}


def random_params(shapes, dtype, generator):
    return {k: torch.randn(s, dtype=dtype, generator=generator) for k, s in shapes.items()}


def run_pair(ours, make_reference, shapes, dtype, steps=50, seed=0):
    """Drive ``ours`` and a ``torch.optim``-style reference with the same random grads.

    Returns ``(p0, ours_final, reference_final)``; the reference is driven by setting
    ``p.grad`` before each ``step()``.
    """
    gen = torch.Generator().manual_seed(seed)
    p0 = random_params(shapes, dtype, gen)
    ref = {k: v.clone() for k, v in p0.items()}
    ref_opt = make_reference(list(ref.values()))
    params, state = dict(p0), ours.init(p0)
    for _ in range(steps):
        grads = random_params(shapes, dtype, gen)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        ref_opt.step()
        params, state = ours.step(params, grads, state)
    return p0, params, ref


def relative_change_error(p0, ours, ref) -> float:
    """max over params of ||(ours - p0) - (ref - p0)|| / ||ref - p0||."""
    errs = []
    for k in p0:
        change = (ref[k] - p0[k]).double()
        errs.append(((ours[k].double() - ref[k].double()).norm() / change.norm()).item())
    return max(errs)


def param_error(ours, ref) -> float:
    """max over params of ||ours - ref|| / ||ref|| (for float32, see test_parity)."""
    return max(((ours[k].double() - ref[k].double()).norm() / ref[k].double().norm()).item() for k in ref)
