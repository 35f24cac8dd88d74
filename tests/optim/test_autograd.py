"""Differentiability (gradcheck/gradgradcheck through 3 steps) and torch.func.vmap."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from metaopt.optim import SGD, Adafactor

SHAPES = {"scalar": (), "bias": (3,), "weight": (3, 4), "conv": (2, 2, 2, 3)}

# Factories taking the (tensor) learning rate. Points are kept away from the kinks:
# lr < 1/sqrt(t) (torch's min), RMS(p) > eps2 and RMS(U) != d.
FACTORIES = {
    "sgd": lambda lr: SGD(lr=lr),
    "sgd_momentum": lambda lr: SGD(lr=lr, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd_nesterov": lambda lr: SGD(lr=lr, momentum=0.9, nesterov=True, maximize=True),
    "adafactor": lambda lr: Adafactor(lr=lr, weight_decay=0.1),
    "adafactor_unfactored": lambda lr: Adafactor(lr=lr, factored=False, maximize=True),
    "adafactor_hf": lambda lr: Adafactor.from_transformers(lr=lr, relative_step=False, beta1=0.9, weight_decay=0.1),
    "adafactor_clip": lambda lr: Adafactor(lr=lr, grad_clip_norm=1.0, grad_clip_value=1.5),
}


def _three_steps(name):
    gen = torch.Generator().manual_seed(0)
    grads = [{k: torch.randn(s, dtype=torch.float64, generator=gen) for k, s in SHAPES.items()} for _ in range(3)]
    keys = list(SHAPES)

    def f(lr, *params):
        opt = FACTORIES[name](lr)
        p = dict(zip(keys, params))
        state = opt.init(p)
        for g in grads:
            p, state = opt.step(p, g, state)
        return tuple(p.values())

    params = tuple(torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in SHAPES.values())
    lr = torch.tensor(0.005, dtype=torch.float64, requires_grad=True)
    return f, (lr, *params)


@pytest.mark.parametrize("name", FACTORIES)
def test_gradcheck_three_steps(name):
    f, inputs = _three_steps(name)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("name", ["sgd_momentum", "adafactor", "adafactor_hf"])
def test_gradcheck_wrt_grads_and_state(name):
    gen = torch.Generator().manual_seed(1)
    opt = FACTORIES[name](0.005)
    p = {k: torch.randn(s, dtype=torch.float64, generator=gen) for k, s in SHAPES.items()}
    g0 = {k: torch.randn(s, dtype=torch.float64, generator=gen) for k, s in SHAPES.items()}
    _, state = opt.step(p, g0, opt.init(p))  # a non-trivial state
    leaves, spec = torch.utils._pytree.tree_flatten(state)
    float_idx = [i for i, t in enumerate(leaves) if t.is_floating_point()]
    g1 = tuple(torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in SHAPES.values())
    state_leaves = tuple(leaves[i].clone().requires_grad_() for i in float_idx)

    def f(*args):
        grads, st = dict(zip(SHAPES, args[: len(g1)])), list(leaves)
        for i, t in zip(float_idx, args[len(g1):]):
            st[i] = t
        new_p, new_s = opt.step(p, grads, torch.utils._pytree.tree_unflatten(st, spec))
        return (*new_p.values(), *[t for t in torch.utils._pytree.tree_leaves(new_s) if t.is_floating_point()])

    assert gradcheck(f, g1 + state_leaves)


def test_meta_sgd_dict_lr_receives_gradients():
    lr = {k: torch.full(s, 0.1, requires_grad=True) for k, s in SHAPES.items()}
    p = {k: torch.ones(s) for k, s in SHAPES.items()}
    g = {k: torch.ones(s) for k, s in SHAPES.items()}
    new, _ = SGD(lr=lr).step(p, g, SGD(lr=lr).init(p))
    sum(v.sum() for v in new.values()).backward()
    for k in SHAPES:
        torch.testing.assert_close(lr[k].grad, -torch.ones(SHAPES[k]))


@pytest.mark.parametrize(
    "opt",
    [SGD(lr=0.1, momentum=0.9, dampening=0.2), Adafactor(), Adafactor(factored=False), Adafactor.paper(),
     Adafactor.from_transformers(lr=0.01, relative_step=False, beta1=0.9, weight_decay=0.1)],
    ids=["sgd", "adafactor", "unfactored", "paper", "hf_beta1"],
)
def test_vmap_equals_loop(opt):
    gen = torch.Generator().manual_seed(2)
    batch = 4
    params = {k: torch.randn((batch, *s), dtype=torch.float64, generator=gen) for k, s in SHAPES.items()}
    grads = [{k: torch.randn((batch, *s), dtype=torch.float64, generator=gen) for k, s in SHAPES.items()} for _ in range(3)]

    def run(p, *gs):
        state = opt.init(p)
        for g in gs:
            p, state = opt.step(p, g, state)
        return p, state

    batched, batched_state = torch.func.vmap(run)(params, *grads)
    for i in range(batch):
        ref, ref_state = run({k: v[i] for k, v in params.items()}, *[{k: v[i] for k, v in g.items()} for g in grads])
        for k in SHAPES:
            torch.testing.assert_close(batched[k][i], ref[k], rtol=1e-12, atol=1e-12)
        assert int(batched_state.count[i]) == int(ref_state.count) == 3


def test_vmap_shares_unbatched_state():
    # The engine's vmap over tasks: params batched, optimizer state built inside.
    opt = Adafactor()
    base = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    grads = {"w": torch.randn(5, 3, 4), "b": torch.randn(5, 4)}

    def one(g):
        p, _ = opt.step(base, g, opt.init(base))
        return p

    out = torch.func.vmap(one)(grads)
    torch.testing.assert_close(out["w"][2], one({k: v[2] for k, v in grads.items()})["w"])
