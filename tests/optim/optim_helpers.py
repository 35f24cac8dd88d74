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
        change = (ref[k] - p0[k]).double().norm().item()
        err = (ours[k].double() - ref[k].double()).norm().item()
        # A param may come back exactly where it started (Lion's +-lr steps): then only 0 passes.
        errs.append(err / change if change > 0 else (0.0 if err == 0 else float("inf")))
    return max(errs)


def param_error(ours, ref) -> float:
    """max over params of ||ours - ref|| / ||ref|| (for float32, see test_parity)."""
    return max(((ours[k].double() - ref[k].double()).norm() / ref[k].double().norm()).item() for k in ref)


def presets(lr):
    """Every preset (and the main variants) as a factory of its learning rate: the table the
    autograd, vmap and property tests iterate over. Points are kept off the kinks (Adafactor:
    lr < 1/sqrt(t), RMS(p) > eps2; Lion/sign: momentum away from 0)."""
    from metaopt import optim

    return {
        "sgd": lambda: optim.SGD(lr=lr, momentum=0.9, dampening=0.1, weight_decay=0.01),
        "sgd_nesterov": lambda: optim.SGD(lr=lr, momentum=0.9, nesterov=True, maximize=True),
        "adam": lambda: optim.Adam(lr=lr, weight_decay=0.1),
        "adam_amsgrad": lambda: optim.Adam(lr=lr, amsgrad=True, maximize=True),
        "adamw": lambda: optim.AdamW(lr=lr, weight_decay=0.1),
        "rmsprop": lambda: optim.RMSprop(lr=lr, weight_decay=0.1),
        "rmsprop_centered": lambda: optim.RMSprop(lr=lr, centered=True, momentum=0.5),
        "adagrad": lambda: optim.Adagrad(lr=lr, lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=0.1),
        "adafactor": lambda: optim.Adafactor(lr=lr, weight_decay=0.1),
        "adafactor_transformers": lambda: optim.Adafactor.from_transformers(lr=lr, relative_step=False, beta1=0.9, weight_decay=0.1),
        "adamax": lambda: optim.Adamax(lr=lr, weight_decay=0.1),
        "nadam": lambda: optim.NAdam(lr=lr, weight_decay=0.1, decoupled_weight_decay=True),
        "radam": lambda: optim.RAdam(lr=lr, weight_decay=0.1),
        "adadelta": lambda: optim.Adadelta(lr=lr * 100, weight_decay=0.1),
        "lion": lambda: optim.Lion(lr=lr, weight_decay=0.1),
        "muon": lambda: optim.Muon(lr=lr, ns_dtype=None),
    }


def shapes_for(name, shapes):
    """Muon takes 2-D params only."""
    return {k: s for k, s in shapes.items() if len(s) == 2} if name == "muon" else shapes
