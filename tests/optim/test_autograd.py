"""Differentiability (gradcheck/gradgradcheck through 3 steps) and torch.func.vmap."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from metaopt.optim import SGD, Adafactor, Adam, Muon

from optim_helpers import presets, shapes_for

SHAPES = {"scalar": (), "bias": (3,), "weight": (2, 3), "conv": (2, 1, 2, 3)}  # 0-D..4-D, small: gradcheck is O(numel)

# Factories taking the (tensor) learning rate: every preset (optim_helpers.presets) plus
# Adafactor's options. Points are kept away from the kinks: lr < 1/sqrt(t) (torch's min),
# RMS(p) > eps2 and RMS(U) != d.
EXTRA = {
    "sgd_plain": lambda lr: SGD(lr=lr),
    "adafactor_unfactored": lambda lr: Adafactor(lr=lr, factored=False, maximize=True),
    "adafactor_clip": lambda lr: Adafactor(lr=lr, grad_clip_norm=1.0, grad_clip_value=1.5),
    "adafactor_transformers_chain": lambda lr: Adafactor.from_transformers(
        lr=lr, relative_step=False, warmup_init=False, scale_parameter=False).as_chain(),
}
NAMES = list(presets(0.0)) + list(EXTRA)


def make(name, lr):
    return EXTRA[name](lr) if name in EXTRA else presets(lr)[name]()


def _three_steps(name):
    gen = torch.Generator().manual_seed(0)
    shapes = shapes_for(name, SHAPES)
    grads = [{k: torch.randn(s, dtype=torch.float64, generator=gen) for k, s in shapes.items()} for _ in range(3)]
    keys = list(shapes)

    def f(lr, *params):
        opt = make(name, lr)
        p = dict(zip(keys, params))
        state = opt.init(p)
        for g in grads:
            p, state = opt.step(p, g, state)
        return tuple(p.values())

    params = tuple(torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in shapes.values())
    lr = torch.tensor(0.005, dtype=torch.float64, requires_grad=True)
    return f, (lr, *params)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_three_steps(name):
    f, inputs = _three_steps(name)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_wrt_grads_and_state(name):
    gen = torch.Generator().manual_seed(1)
    shapes = shapes_for(name, SHAPES)
    opt = make(name, 0.005)
    p = {k: torch.randn(s, dtype=torch.float64, generator=gen) for k, s in shapes.items()}
    # A non-trivial state, with second moments ~1 (after one step of b2 = 0.999 they are
    # (1 - b2) g0^2: large g0 keeps them far above gradcheck's finite-difference step).
    g0 = {k: 30.0 * torch.randn(s, dtype=torch.float64, generator=gen) for k, s in shapes.items()}
    _, state = opt.step(p, g0, opt.init(p))
    leaves, spec = torch.utils._pytree.tree_flatten(state)
    float_idx = [i for i, t in enumerate(leaves) if t.is_floating_point()]
    g1 = tuple(torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in shapes.values())
    state_leaves = tuple(leaves[i].clone().requires_grad_() for i in float_idx)

    def f(*args):
        grads, st = dict(zip(shapes, args[: len(g1)])), list(leaves)
        for i, t in zip(float_idx, args[len(g1):]):
            st[i] = t
        new_p, new_s = opt.step(p, grads, torch.utils._pytree.tree_unflatten(st, spec))
        return (*new_p.values(), *[t for t in torch.utils._pytree.tree_leaves(new_s) if t.is_floating_point()])

    # Adadelta's accumulators are ~1e-6 after one step, the size of gradcheck's default
    # finite-difference step: use a smaller one there.
    assert gradcheck(f, g1 + state_leaves, eps=1e-9 if name == "adadelta" else 1e-6, atol=1e-5)


def test_meta_sgd_dict_lr_receives_gradients():
    lr = {k: torch.full(s, 0.1, requires_grad=True) for k, s in SHAPES.items()}
    p = {k: torch.ones(s) for k, s in SHAPES.items()}
    g = {k: torch.ones(s) for k, s in SHAPES.items()}
    new, _ = SGD(lr=lr).step(p, g, SGD(lr=lr).init(p))
    sum(v.sum() for v in new.values()).backward()
    for k in SHAPES:
        torch.testing.assert_close(lr[k].grad, -torch.ones(SHAPES[k]))


VMAP = {**{name: make_() for name, make_ in presets(0.01).items()}, "adafactor_default": Adafactor(),
        "unfactored": Adafactor(factored=False), "paper": Adafactor.paper(),
        "adam_schedule": Adam(lr=lambda count: 0.01 / (1.0 + count)), "adam_tensor_lr": Adam(lr=torch.tensor([0.01]))}


@pytest.mark.parametrize("opt", VMAP.values(), ids=VMAP.keys())
def test_vmap_equals_loop(opt):
    gen = torch.Generator().manual_seed(2)
    batch = 4
    shapes = shapes_for("muon" if isinstance(opt, Muon) else "", SHAPES)
    params = {k: torch.randn((batch, *s), dtype=torch.float64, generator=gen) for k, s in shapes.items()}
    grads = [{k: torch.randn((batch, *s), dtype=torch.float64, generator=gen) for k, s in shapes.items()} for _ in range(3)]

    def run(p, *gs):
        state = opt.init(p)
        for g in gs:
            p, state = opt.step(p, g, state)
        return p, state

    batched, batched_state = torch.func.vmap(run)(params, *grads)
    for i in range(batch):
        ref, ref_state = run({k: v[i] for k, v in params.items()}, *[{k: v[i] for k, v in g.items()} for g in grads])
        for k in shapes:
            torch.testing.assert_close(batched[k][i], ref[k], rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.utils._pytree.tree_leaves(batched_state), torch.utils._pytree.tree_leaves(ref_state)):
            torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_exactly_zero_gradient_entries_give_finite_derivatives(name, dtype):
    # A dead ReLU unit, or a conv bias right before batch norm (which subtracts the mean),
    # gives grad entries that are exactly 0: second moments are 0 there (or transformers'
    # eps1 = 1e-30, whose rsqrt derivative ~1e45 overflows float32), where d sqrt(v)/dv or
    # d rsqrt(v)/dv = inf would turn the meta-gradient into NaN. Every param, matrices and
    # vectors, gets such an entry; float32 too (the Omniglot study's NaN at iteration 1).
    shapes = shapes_for(name, SHAPES)
    gen = torch.Generator().manual_seed(4)
    lr = torch.tensor(0.01, dtype=dtype, requires_grad=True)
    params = {k: torch.randn(s, dtype=dtype, generator=gen).requires_grad_() for k, s in shapes.items()}
    opt = make(name, lr)
    p, state = params, opt.init(params)
    for _ in range(2):
        g = {}
        for k, v in p.items():
            mask = torch.ones_like(v)
            mask.view(-1)[0] = 0.0  # one entry with an exactly-zero gradient
            g[k] = v * 2.0 * mask  # grads depend on params
        p, state = opt.step(p, g, state)
    grads = torch.autograd.grad(sum(v.sum() for v in p.values()), [lr, *params.values()])
    assert all(torch.isfinite(t).all() for t in grads)


def test_tiny_nonzero_gradients_give_the_float64_meta_gradient_in_float32() -> None:
    """Transformers-rule Adafactor (eps1 = 1e-30 inside): a gradient entry of ~1e-15 leaves
    v ~ 1e-30, where d rsqrt/dv ~ 1e45 overflows float32 although the derivative of the update
    rsqrt(v) * g is finite (~1e15). Multiplied in that order it was inf, then NaN: the 70k
    sinusoid runs of the paper recipe went NaN at iteration 42,839 (float64: 3.6e13, finite).
    The float32 derivative must be the float64 one."""
    def meta_grad(dtype: torch.dtype) -> torch.Tensor:
        p0 = torch.tensor([0.5, -1.0, 1e-15], dtype=dtype, requires_grad=True)  # a bias: v unfactored
        opt = Adafactor.from_transformers(lr=None, relative_step=True, warmup_init=False)  # the paper recipe
        p, state = {"b": p0}, opt.init({"b": p0.detach()})
        for _ in range(2):
            p, state = opt.step(p, {"b": p["b"] * 1.0}, state)  # the gradient of |b|^2 / 2
        (out,) = torch.autograd.grad(p["b"].sum(), [p0])
        return out

    g32, g64 = meta_grad(torch.float32), meta_grad(torch.float64)
    assert torch.isfinite(g64).all() and g64.abs().max() > 1e6  # the steep spot is reached
    assert torch.isfinite(g32).all()
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=0.0)


def test_factor_rsqrt_under_vmap_and_grad_matches_the_loop() -> None:
    """The zero-safe rsqrt's hand-written vmap rule: per-sample values, first and second
    derivatives under torch.func equal the unbatched ones, and a zero incoming gradient at a
    1e-30 entry gives 0, not NaN, in float32."""
    from metaopt.optim._util import factor_rsqrt
    x = torch.tensor([[1e-30, 4.0, 0.25], [2.0, 1e-30, 9.0]])
    w = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, 0.5]])

    def f(xi: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
        return (factor_rsqrt(xi) * wi).sum()

    batched = torch.func.vmap(torch.func.grad(f))(x, w)
    looped = torch.stack([torch.func.grad(f)(xi, wi) for xi, wi in zip(x, w)])
    assert torch.equal(batched, looped) and torch.isfinite(batched).all()
    assert batched[0, 0] == 0 and batched[1, 1] == 0
    assert torch.allclose(batched[0, 1:], -0.5 * x[0, 1:] ** -1.5 * w[0, 1:])
    x64, w64 = x[:, 1:].double(), w[:, 1:].double()  # second derivative: 0.75 x^-2.5 w
    hess = torch.func.vmap(torch.func.grad(lambda xi, wi: torch.func.grad(f)(xi, wi).sum()))(x64, w64)
    assert torch.allclose(hess, 0.75 * x64 ** -2.5 * w64)
