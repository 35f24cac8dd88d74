"""Presets against their references beyond optim_db: Lion against lion-pytorch, Muon's
bfloat16 iteration against torch's, and the fused Adafactor / bit-exact SGD steps against
their chained (composable) forms."""

from __future__ import annotations

import functools

import pytest
import torch

from metaopt.optim import SGD, Adafactor, Lion, Muon

from optim_helpers import SHAPES, relative_change_error, run_pair

lion_pytorch = pytest.importorskip("lion_pytorch")

LION_CASES = [
    dict(),
    dict(lr=1e-3),
    dict(lr=3e-3, weight_decay=0.1),
    dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.5),
    dict(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
    dict(lr=1e-2, betas=(0.0, 0.5)),
]


@pytest.mark.parametrize("kwargs", LION_CASES, ids=str)
def test_lion_matches_lion_pytorch(kwargs):
    p0, ours, ref = run_pair(Lion(**kwargs), functools.partial(lion_pytorch.Lion, **kwargs), SHAPES, torch.float64)
    assert relative_change_error(p0, ours, ref) < 1e-12


def test_lion_tensor_lr_matches_float():
    p0, a, _ = run_pair(Lion(lr=torch.tensor(1e-3, dtype=torch.float64), weight_decay=0.1), lambda ps: torch.optim.SGD(ps), SHAPES, torch.float64)
    _, b, _ = run_pair(Lion(lr=1e-3, weight_decay=0.1), lambda ps: torch.optim.SGD(ps), SHAPES, torch.float64)
    assert relative_change_error(p0, a, b) < 1e-14


MUON_CASES = [dict(), dict(lr=0.02, nesterov=False, weight_decay=0.0), dict(adjust_lr_fn="match_rms_adamw", momentum=0.8)]


@pytest.mark.parametrize("kwargs", MUON_CASES, ids=str)
def test_muon_bfloat16_iteration_matches_torch(kwargs):
    # Same bfloat16 Newton-Schulz ops in the same order as torch (addmm): float64 agreement.
    shapes = {"w": (8, 5), "v": (4, 6)}
    p0, ours, ref = run_pair(Muon(**kwargs), functools.partial(torch.optim.Muon, **kwargs), shapes, torch.float64)
    assert relative_change_error(p0, ours, ref) < 1e-12


def _ns_float64(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz with float64 in place of bfloat16
    (torch's iteration otherwise rounds to bfloat16, too coarse for a 1e-12 check)."""
    a, b, c = ns_coefficients
    x = grad.double()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if grad.size(0) > grad.size(1):
        x = x.T
    return x



@pytest.mark.parametrize("kwargs", MUON_CASES, ids=str)
def test_muon_float64_iteration_matches_torch_formula(kwargs):
    # ns_dtype=None (exact derivatives) against torch's iteration with bfloat16 -> float64.
    from unittest import mock

    shapes = {"w": (8, 5), "v": (4, 6), "s": (3, 3)}
    with mock.patch("torch.optim._muon._zeropower_via_newtonschulz", _ns_float64):
        p0, ours, ref = run_pair(Muon(ns_dtype=None, **kwargs), functools.partial(torch.optim.Muon, **kwargs), shapes,
                                 torch.float64)
    assert relative_change_error(p0, ours, ref) < 1e-12


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters.*\[3\].*'b'"):
        Muon().init({"w": torch.zeros(2, 2), "b": torch.zeros(3)})


ADAFACTOR_CASES = [
    lambda: Adafactor(),
    lambda: Adafactor(lr=0.3, weight_decay=0.1, maximize=True),
    lambda: Adafactor(eps=(1e-6, 1e-2), beta2_decay=-0.5, d=2.0),
    lambda: Adafactor(factored=False, beta1=0.9),
    lambda: Adafactor(min_dim_size_to_factor=3, grad_clip_norm=1.0, grad_clip_value=1.5),
    lambda: Adafactor(lr=torch.tensor(0.05, dtype=torch.float64), weight_decay=0.2),
    lambda: Adafactor.from_transformers(),
    lambda: Adafactor.from_transformers(warmup_init=True, beta1=0.5, weight_decay=0.1),
    lambda: Adafactor.from_transformers(lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.1),
]


@pytest.mark.parametrize("make", ADAFACTOR_CASES, ids=lambda m: repr(m()))
def test_adafactor_fused_step_equals_chain(make):
    opt = make()
    p0, fused, chained = run_pair(opt, lambda ps: _Driver(opt.as_chain(), ps), SHAPES, torch.float64, steps=20)
    # warm-up steps (1e-6 t) move the params by ~1e-5 in all, so the params' rounding
    # (1e-16 per step, different op order) is 1e-11 of the change there.
    assert relative_change_error(p0, fused, chained) < (1e-10 if opt.warmup_init else 1e-12)


SGD_CASES = [dict(lr=0.1), dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.1),
             dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=str)
def test_sgd_bit_exact_step_equals_chain(kwargs):
    opt = SGD(**kwargs)
    p0, direct, chained = run_pair(opt, lambda ps: _Driver(opt.as_chain(), ps), SHAPES, torch.float64, steps=20)
    assert relative_change_error(p0, direct, chained) < 1e-13


class _Driver:
    """Drives a functional optimizer like a torch.optim one (reads p.grad, writes p)."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, list(params)
        self.keys = list(SHAPES)[: len(self.params)]
        self.state = opt.init(self._dict())

    def _dict(self):
        return {k: p.detach().clone() for k, p in zip(self.keys, self.params)}

    def step(self):
        grads = {k: p.grad for k, p in zip(self.keys, self.params)}
        new, self.state = self.opt.step(self._dict(), grads, self.state)
        with torch.no_grad():
            for k, p in zip(self.keys, self.params):
                p.copy_(new[k])
