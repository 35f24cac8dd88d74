"""Step-by-step parity with torch.optim.SGD, torch.optim.Adafactor and transformers' Adafactor.

50 steps of random gradients over 0-D..4-D params. float64: the parameter *change*
agrees to 1e-10 relative (2-norm per param). float32: the operation order differs from the
references, so each step may round the params (|p| ~ 1) differently by an ulp; once the
total change is small (warm-up steps of 1e-6 t) that rounding dominates, so the float32
check is 1e-5 relative to the larger of the change and the params.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers.optimization as hf

from metaopt.optim import SGD, Adafactor

from optim_helpers import SHAPES, param_error, relative_change_error, run_pair

SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.5),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.5, dampening=0.2, weight_decay=0.1, maximize=True),
    dict(lr=0.02, weight_decay=0.3),
]

TORCH_CASES = [
    dict(),
    dict(lr=0.3),
    dict(lr=1e-3, weight_decay=0.1),
    dict(maximize=True),
    dict(beta2_decay=-0.5, d=2.0),
    dict(eps=(1e-6, 1e-2)),
    dict(eps=(0.0, 0.0), beta2_decay=0.0),
    dict(lr=torch.tensor(0.05, dtype=torch.float64)),
]

HF_CASES = [
    dict(),
    dict(warmup_init=True),
    dict(lr=1e-2, relative_step=False),
    dict(lr=5e-2, relative_step=False, scale_parameter=False),
    dict(beta1=0.9),
    dict(weight_decay=0.1, beta1=0.5),
    dict(lr=1e-3, relative_step=False, weight_decay=0.1, clip_threshold=0.5),
    dict(decay_rate=-0.5, eps=(1e-20, 1e-2)),
]


def _check(p0, ours, ref, dtype):
    if dtype == torch.float64:
        assert relative_change_error(p0, ours, ref) < 1e-10
    else:
        for k in ref:
            change = (ref[k] - p0[k]).double().norm()
            err = (ours[k].double() - ref[k].double()).norm()
            assert err <= 1e-5 * max(change, ref[k].double().norm()), (k, err, change)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kwargs", SGD_CASES, ids=str)
def test_sgd_matches_torch(kwargs, dtype):
    p0, ours, ref = run_pair(SGD(**kwargs), functools.partial(torch.optim.SGD, **kwargs), SHAPES, dtype)
    _check(p0, ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kwargs", TORCH_CASES, ids=str)
def test_adafactor_matches_torch(kwargs, dtype):
    p0, ours, ref = run_pair(Adafactor(**kwargs), functools.partial(torch.optim.Adafactor, **kwargs), SHAPES, dtype)
    _check(p0, ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kwargs", HF_CASES, ids=str)
def test_adafactor_matches_transformers(kwargs, dtype):
    ours = Adafactor.from_transformers(**kwargs)
    p0, ours, ref = run_pair(ours, functools.partial(hf.Adafactor, **kwargs), SHAPES, dtype)
    _check(p0, ours, ref, dtype)


def test_paper_preset_is_transformers_defaults():
    p0, ours, ref = run_pair(Adafactor.paper(), hf.Adafactor, SHAPES, torch.float64)
    assert relative_change_error(p0, ours, ref) < 1e-10


def test_sgd_per_parameter_lr_matches_separate_groups():
    lrs = {k: torch.tensor(0.01 * (i + 1), dtype=torch.float64) for i, k in enumerate(SHAPES)}
    ours = SGD(lr=lrs, momentum=0.9)

    def reference(params):
        return torch.optim.SGD([{"params": [p], "lr": lrs[k].item()} for k, p in zip(SHAPES, params)], lr=0.0, momentum=0.9)

    p0, ours, ref = run_pair(ours, reference, SHAPES, torch.float64)
    assert relative_change_error(p0, ours, ref) < 1e-10


def test_sgd_elementwise_lr_is_meta_sgd():
    gen = torch.Generator().manual_seed(1)
    p = {"w": torch.randn(3, 4, dtype=torch.float64, generator=gen)}
    g = {"w": torch.randn(3, 4, dtype=torch.float64, generator=gen)}
    lr = {"w": torch.rand(3, 4, dtype=torch.float64, generator=gen)}
    opt = SGD(lr=lr)
    new, _ = opt.step(p, g, opt.init(p))
    torch.testing.assert_close(new["w"], p["w"] - lr["w"] * g["w"])


def test_transformers_half_precision_runs_in_float32():
    shapes = {"w": (8, 4), "b": (4,)}
    p0, ours, ref = run_pair(Adafactor.paper(), hf.Adafactor, shapes, torch.bfloat16, steps=5)
    for k in ref:
        assert ours[k].dtype == torch.bfloat16
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kwargs", SGD_CASES, ids=str)
def test_sgd_is_bit_exact(kwargs, dtype):
    # Same operations in the same order as torch.optim.SGD: identical bits, 50 steps.
    p0, ours, ref = run_pair(SGD(**kwargs), functools.partial(torch.optim.SGD, **kwargs), SHAPES, dtype)
    for k in ref:
        assert torch.equal(ours[k], ref[k])


@pytest.mark.parametrize("as_chain", [False, True])
@pytest.mark.parametrize("scale_parameter", [False, True])
def test_transformers_adafactor_dead_row_and_column_float32(as_chain: bool, scale_parameter: bool) -> None:
    """A float32 gradient with whole zero rows and columns (dead ReLU units): the factored
    second moment of such an entry is ~1e-30 * 1e-30, which underflows to 0; transformers
    takes rsqrt of each factor before the product and stays finite, and so must we (the
    product-then-rsqrt order gave NaN, found by the inner-optimizer study)."""
    from transformers.optimization import Adafactor as HFAdafactor

    torch.manual_seed(0)
    p = {"w": torch.randn(40, 40)}
    g = torch.randn(40, 40)
    g[:11] = 0
    g[:, :2] = 0
    kw = dict(lr=0.01, relative_step=False, warmup_init=False, scale_parameter=scale_parameter)
    opt = Adafactor.from_transformers(**kw)
    if as_chain:
        opt = opt.as_chain()
    ref = torch.nn.Parameter(p["w"].clone())
    hf = HFAdafactor([ref], **kw)
    state, new = opt.init(p), p
    for _ in range(3):
        new, state = opt.step(new, {"w": g}, state)
        ref.grad = g.clone()
        hf.step()
    assert torch.isfinite(new["w"]).all()
    torch.testing.assert_close(new["w"], ref.detach(), rtol=1e-5, atol=1e-6)
