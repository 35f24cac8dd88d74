"""Vectorised MAML (torch.func.vmap over tasks) equals the per-task loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt.maml import MAML
from metaopt.optim import SGD
from metaopt.optim.learned import MetaSGD, per_parameter_lr

from test_maml_helpers import (  # noqa: F401  (one_thread is a fixture)
    DT,
    INNER,
    max_abs_diff,
    meta_grads,
    model_and_batch,
    one_thread,
)

TOL = 1e-10
pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(model, make_inner, **kw) -> tuple[MAML, MAML]:
    return MAML(model, make_inner(), vectorize=False, **kw), MAML(model, make_inner(), vectorize=True, **kw)


def _assert_same_outputs(a, b) -> None:
    for name in ("loss", "query_loss", "query_loss_before", "accuracy", "accuracy_before"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape and float((x - y).detach().abs().max()) <= TOL, name


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_vmap_equals_loop(kind: str, inner: str, first_order: bool) -> None:
    model, batch, loss_fn = model_and_batch(kind)
    loop, vec = _pair(model, INNER[inner], inner_steps=2, first_order=first_order, loss_fn=loss_fn)
    assert max_abs_diff(meta_grads(vec, batch), meta_grads(loop, batch)) <= TOL
    _assert_same_outputs(vec.meta_loss(batch), loop.meta_loss(batch))
    _assert_same_outputs(vec.meta_loss(batch, train=False, steps=3), loop.meta_loss(batch, train=False, steps=3))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda m: SGD(lr=nn.Parameter(torch.tensor(0.1, dtype=DT)), momentum=0.9), id="scalar"),
        pytest.param(lambda m: SGD(lr=per_parameter_lr(m, 0.1)), id="per-element"),
        pytest.param(lambda m: MetaSGD.from_model(m, 0.1, granularity="tensor", steps=2), id="per-layer-per-step"),
    ],
)
def test_vmap_equals_loop_with_learned_rates(make) -> None:
    model, batch, loss_fn = model_and_batch("conv")
    inner = make(model)  # shared: the same nn.Parameters, not mapped over tasks
    loop = MAML(model, inner, inner_steps=3, loss_fn=loss_fn, vectorize=False)
    vec = MAML(model, inner, inner_steps=3, loss_fn=loss_fn, vectorize=True)
    assert max_abs_diff(meta_grads(vec, batch), meta_grads(loop, batch)) <= TOL


def test_vmap_in_chunks_equals_loop() -> None:
    model, batch, loss_fn = model_and_batch("conv")
    loop = MAML(model, SGD(lr=0.1), inner_steps=2, loss_fn=loss_fn, vectorize=False)
    chunked = MAML(model, SGD(lr=0.1), inner_steps=2, loss_fn=loss_fn, vectorize=True, chunk_size=1)
    assert max_abs_diff(meta_grads(chunked, batch), meta_grads(loop, batch)) <= TOL
    with pytest.raises(ValueError, match="chunk_size"):
        MAML(model, chunk_size=0)


def test_auto_picks_vmap_for_mlp_on_cpu_and_loop_for_conv() -> None:
    mlp, batch, loss_fn = model_and_batch("mlp")
    auto = MAML(mlp, SGD(lr=0.1), loss_fn=loss_fn)
    assert auto._use_vmap(torch.device("cpu"))
    conv, _, _ = model_and_batch("conv")
    assert not MAML(conv)._use_vmap(torch.device("cpu"))
    torchbn, _, _ = model_and_batch("torchbn")
    assert MAML(torchbn)._use_vmap(torch.device("cuda"))  # exact: elementary batch norm


def test_torch_batchnorm_with_running_stats_vmap_equals_loop() -> None:
    model, batch, loss_fn = model_and_batch("torchbn")
    loop, vec = _pair(model, lambda: SGD(lr=0.1, momentum=0.5), inner_steps=2, loss_fn=loss_fn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = loop.meta_loss(batch), vec.meta_loss(batch)
    _assert_same_outputs(a, b)
    assert max_abs_diff(meta_grads(loop, batch), meta_grads(vec, batch)) <= TOL
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_vectorize_true_rechecks_a_model_changed_after_construction() -> None:
    model, batch, loss_fn = model_and_batch("mlp")
    maml = MAML(model, SGD(lr=0.1), loss_fn=loss_fn, vectorize=True)
    maml.meta_loss(batch)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    nn.utils.parametrizations.spectral_norm(first)
    with pytest.raises(ValueError, match=r"spectral_norm on .*vectorize=False"):
        maml.meta_loss(batch)
