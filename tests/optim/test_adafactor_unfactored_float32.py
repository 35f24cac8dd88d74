"""transformers-rule Adafactor with ``factored=False`` as a MAML inner optimizer in float32.

eps1 = 1e-30 sits inside the second moment, so an element whose gradient is exactly 0 (a
dead ReLU unit) has ``v ~ 1e-30`` and ``d rsqrt / dv = -v^-1.5 / 2`` overflows float32. The
gradient reaching it is exactly 0, but ``0 * inf`` is NaN: the first meta-gradient of the
sinusoid study's setting was NaN (every seed "diverged" at iteration 2). The meta-gradient
must be finite and agree with float64, in the fused step and in the chain it is tested against.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaopt.maml import MAML
from metaopt.models import MLP
from metaopt.optim import Adafactor
from metaopt.tasks import TaskBatch


def _batch() -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(3, 5, 1, generator=g, dtype=torch.float64), torch.randn(3, 6, 1, generator=g, dtype=torch.float64)
    return TaskBatch((xs, torch.sin(xs)), (xq, torch.sin(xq)))


@pytest.mark.parametrize("form", ["step", "chain"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_unfactored_meta_gradient_with_dead_units_float32(form: str, vectorize: bool) -> None:
    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1)
    with torch.no_grad():
        model.net[0].bias[:12] = -100.0  # 12 first-layer units never fire: exact-zero gradients
    batch = _batch()
    grads = {}
    for dtype in (torch.float32, torch.float64):
        m = MLP(1, (40, 40), 1).to(dtype)
        m.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
        inner = Adafactor.from_transformers(lr=0.01, relative_step=False, warmup_init=False,
                                            scale_parameter=False, factored=False)
        maml = MAML(m, inner if form == "step" else inner.as_chain(), inner_steps=2, loss_fn=F.mse_loss,
                    vectorize=vectorize)
        b = TaskBatch(tuple(t.to(dtype) for t in batch.support), tuple(t.to(dtype) for t in batch.query))
        maml.meta_loss(b, backward=True)
        grads[dtype] = torch.cat([p.grad.reshape(-1).double() for p in m.parameters()])
    assert torch.isfinite(grads[torch.float32]).all()
    err = (grads[torch.float32] - grads[torch.float64]).norm() / grads[torch.float64].norm()
    assert err < 1e-4, err
