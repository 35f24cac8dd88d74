"""Property tests (hypothesis): zero grads, update clipping, fixed state structure, purity."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaopt import optim
from metaopt.optim import SGD, Adafactor

from optim_helpers import presets

FACTORIES = [
    lambda: SGD(lr=0.1),
    lambda: SGD(lr=0.1, momentum=0.9, dampening=0.3),
    lambda: SGD(lr=0.1, momentum=0.9, nesterov=True),
    lambda: Adafactor(),
    lambda: Adafactor(lr=0.5, factored=False),
    lambda: Adafactor(min_dim_size_to_factor=2, maximize=True),
    lambda: Adafactor.paper(),
    lambda: Adafactor.from_transformers(lr=0.1, relative_step=False, beta1=0.9),
    lambda: Adafactor(grad_clip_norm=0.5, grad_clip_value=1.0),
    # the presets without weight decay (zero grads must leave params unchanged)
    lambda: optim.Adam(lr=0.1, amsgrad=True),
    lambda: optim.AdamW(lr=0.1, weight_decay=0.0),
    lambda: optim.RMSprop(centered=True, momentum=0.9),
    lambda: optim.Adagrad(lr_decay=0.1, initial_accumulator_value=0.1),
    lambda: optim.Adamax(),
    lambda: optim.NAdam(),
    lambda: optim.RAdam(),
    lambda: optim.Adadelta(),
    lambda: optim.Lion(lr=0.1),
]
# every preset (with weight decay), Muon aside (2-D params only: see test_muon_purity)
FACTORIES_ALL = FACTORIES + [f for name, f in presets(0.01).items() if name != "muon"]
shapes = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple)
SETTINGS = settings(max_examples=15, deadline=None)


def _tensors(shapes_, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": scale * torch.randn(s, dtype=torch.float64, generator=gen) for i, s in enumerate(shapes_)}


@SETTINGS
@given(st.lists(shapes, min_size=1, max_size=3), st.integers(0, len(FACTORIES) - 1), st.integers(0, 2**16))
def test_zero_grad_leaves_params_unchanged(shape_list, which, seed):
    opt = FACTORIES[which]()
    params = _tensors(shape_list, seed)
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    p, state = params, opt.init(params)
    for _ in range(3):
        p, state = opt.step(p, zeros, state)
    for k in params:
        torch.testing.assert_close(p[k], params[k], rtol=0, atol=0)


@SETTINGS
@given(st.lists(shapes, min_size=1, max_size=3), st.floats(1.0, 3.0), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_update_clipping_bounds_rms(shape_list, d, grad_scale, seed):
    # With lr >= 1 (rho_1 = 1) and no weight decay, the step is max(eps2, RMS(p)) * U_clipped,
    # so RMS(step) / max(eps2, RMS(p)) <= d.
    opt = Adafactor(lr=1.0, d=d)
    params = _tensors(shape_list, seed)
    grads = _tensors(shape_list, seed + 1, grad_scale)
    new, _ = opt.step(params, grads, opt.init(params))
    for k, p in params.items():
        rms_step = (new[k] - p).norm() / math.sqrt(p.numel())
        scale = max(1e-3, (p.norm() / math.sqrt(p.numel())).item())
        assert rms_step <= d * scale * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(shapes, min_size=1, max_size=3), st.integers(0, len(FACTORIES_ALL) - 1), st.integers(0, 2**16))
def test_state_structure_fixed_and_inputs_not_mutated(shape_list, which, seed):
    _check_purity(FACTORIES_ALL[which](), _tensors(shape_list, seed), seed)


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3), st.integers(0, 2**16))
def test_muon_purity(shape_list, seed):
    _check_purity(optim.Muon(lr=0.01, ns_dtype=None), _tensors(shape_list, seed), seed)


def _check_purity(opt, params, seed):
    shape_list = [p.shape for p in params.values()]
    state = opt.init(params)
    leaves0, spec0 = torch.utils._pytree.tree_flatten(state)
    meta0 = [(t.shape, t.dtype) for t in leaves0]
    for i in range(3):
        grads = _tensors(shape_list, seed + 10 + i)
        snapshot = [t.clone() for t in (*params.values(), *grads.values(), *torch.utils._pytree.tree_leaves(state))]
        new_params, new_state = opt.step(params, grads, state)
        after = [*params.values(), *grads.values(), *torch.utils._pytree.tree_leaves(state)]
        assert all(torch.equal(a, b) for a, b in zip(snapshot, after)), "step mutated an input"
        leaves, spec = torch.utils._pytree.tree_flatten(new_state)
        assert spec == spec0 and [(t.shape, t.dtype) for t in leaves] == meta0
        assert type(new_state) is type(state)
        assert {k: v.shape for k, v in new_params.items()} == {k: v.shape for k, v in params.items()}
        params, state = new_params, new_state
    counts = [t for t in torch.utils._pytree.tree_leaves(state) if t.dtype == torch.int64]
    assert counts and all(int(c) == 3 for c in counts)
