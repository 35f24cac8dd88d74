"""MAML meta-gradients through Adam, RMSprop and Lion inner loops against finite differences.

float64 MLP, two inner steps, loop (``vectorize=False``) and vmap (``vectorize=True``)
engines. The meta-gradient with respect to every meta-parameter (the model's weights and
the inner optimizer's learned rates) is checked along random directions with a central
difference: ``(L(theta + h d) - L(theta - h d)) / 2h`` against ``<grad L, d>``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.maml import MAML
from metaopt.models import MLP
from metaopt.optim import Adam, Lion, RMSprop
from metaopt.optim.learned import per_parameter_lr, per_step_lr
from metaopt.tasks import TaskBatch


def _batch():
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(3, 5, 1, generator=g, dtype=torch.float64), torch.randn(3, 6, 1, generator=g, dtype=torch.float64)
    return TaskBatch((xs, torch.sin(xs)), (xq, torch.sin(xq)))


def _inner(name, model):
    if name == "adam":
        return Adam(lr=nn.Parameter(torch.tensor(0.01, dtype=torch.float64)), weight_decay=0.01)
    if name == "adam_per_step":  # MAML++ per-layer, per-step rates, with Adam
        return Adam(lr=per_step_lr(model, 0.01, steps=2))
    if name == "rmsprop":
        return RMSprop(lr=per_parameter_lr(model, 0.003), centered=True, momentum=0.5)  # Meta-SGD-style rates
    if name == "lion":
        return Lion(lr=nn.Parameter(torch.tensor(0.003, dtype=torch.float64)), weight_decay=0.1)
    raise AssertionError(name)


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("name", ["adam", "adam_per_step", "rmsprop", "lion"])
def test_meta_gradient_matches_finite_differences(name, vectorize):
    torch.manual_seed(0)
    model = MLP(hidden=(8, 8)).double()
    maml = MAML(model, _inner(name, model), inner_steps=2, loss_fn=F.mse_loss, vectorize=vectorize)
    params = [p for p in maml.parameters() if p.requires_grad]
    n_model = len(list(model.parameters()))
    assert len(params) > n_model, "the inner optimizer's learned rates are meta-parameters"
    batch = _batch()

    maml.zero_grad(set_to_none=True)
    maml.meta_loss(batch).loss.backward()
    grads = [p.grad.clone() for p in params]
    assert all(g.abs().sum() > 0 for g in grads[n_model:]), "learned rates received no meta-gradient"

    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        d = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
        h = 1e-6  # the loss is strongly curved in per-element rates: 1e-4 is outside the linear regime

        def loss_at(sign):
            with torch.no_grad():
                for p, di in zip(params, d):
                    p.add_(di, alpha=sign * h)
            try:
                return maml.meta_loss(batch).loss.detach()
            finally:
                with torch.no_grad():
                    for p, di in zip(params, d):
                        p.sub_(di, alpha=sign * h)

        fd = (loss_at(1.0) - loss_at(-1.0)) / (2 * h)
        analytic = sum((g * di).sum() for g, di in zip(grads, d))
        torch.testing.assert_close(analytic, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("vectorize", [False, True])
def test_transformers_adafactor_meta_gradient_with_dead_units_float32(vectorize: bool) -> None:
    """transformers' Adafactor as the inner optimizer on an MLP with dead ReLU units, in
    float32: the factored second moment of a dead row/column is ~1e-30, whose rsqrt
    derivative overflows float32. The meta-gradient must stay finite and agree with the
    same computation in float64 (found by the inner-optimizer study: NaN at iteration 2)."""
    from metaopt.optim import Adafactor

    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1)
    with torch.no_grad():
        model.net[0].bias[:12] = -100.0  # 12 first-layer units never fire: zero rows and columns
    batch = _batch()
    grads = {}
    for dtype in (torch.float32, torch.float64):
        m = MLP(1, (40, 40), 1).to(dtype)
        m.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
        inner = Adafactor.from_transformers(lr=0.01, relative_step=False, warmup_init=False, scale_parameter=False)
        maml = MAML(m, inner, inner_steps=2, loss_fn=F.mse_loss, vectorize=vectorize)
        b = TaskBatch(tuple(t.to(dtype) for t in batch.support), tuple(t.to(dtype) for t in batch.query))
        maml.meta_loss(b, backward=True)
        grads[dtype] = torch.cat([p.grad.reshape(-1).double() for p in m.parameters()])
    assert torch.isfinite(grads[torch.float32]).all()
    err = (grads[torch.float32] - grads[torch.float64]).norm() / grads[torch.float64].norm()
    assert err < 1e-4, err
