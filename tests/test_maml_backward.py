"""meta_loss(backward=True): the same meta-gradient, one task's graph alive at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaopt.maml import MAML
from metaopt.models import MLP, Conv4
from metaopt.optim import SGD, Adafactor
from metaopt.tasks import TaskBatch


def _batch(kind: str, g: torch.Generator) -> TaskBatch:
    if kind == "mlp":
        xs, xq = torch.randn(4, 5, 1, generator=g), torch.randn(4, 6, 1, generator=g)
        return TaskBatch((xs, torch.sin(xs)), (xq, torch.sin(xq)))
    xs, xq = torch.rand(3, 6, 1, 28, 28, generator=g), torch.rand(3, 9, 1, 28, 28, generator=g)
    ys, yq = torch.arange(3).repeat(3, 2), torch.arange(3).repeat(3, 3)
    return TaskBatch((xs, ys), (xq, yq))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("inner", ["sgd", "adafactor"])
def test_backward_inside_equals_backward_outside(kind: str, vectorize: bool, inner: str) -> None:
    torch.manual_seed(0)
    model = (MLP() if kind == "mlp" else Conv4(ways=3, hidden=4)).double()
    loss_fn = F.mse_loss if kind == "mlp" else F.cross_entropy
    opt = SGD(lr=0.1, momentum=0.9) if inner == "sgd" else Adafactor(lr=0.05)
    maml = MAML(model, opt, inner_steps=2, loss_fn=loss_fn, vectorize=vectorize)
    batch = _batch(kind, torch.Generator().manual_seed(1))
    batch = TaskBatch(
        tuple(t.double() if t.is_floating_point() else t for t in batch.support),
        tuple(t.double() if t.is_floating_point() else t for t in batch.query),
    )

    out = maml.meta_loss(batch)
    out.loss.backward()
    expected = {k: p.grad.clone() for k, p in maml.named_parameters()}
    maml.zero_grad(set_to_none=True)

    out2 = maml.meta_loss(batch, backward=True)
    assert not out2.loss.requires_grad
    torch.testing.assert_close(out2.query_loss, out.query_loss.detach(), rtol=0, atol=1e-12)
    for k, p in maml.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-10, atol=1e-12, msg=k)


def test_backward_needs_training_mode() -> None:
    maml = MAML(MLP(), SGD(lr=0.1), loss_fn=F.mse_loss)
    batch = _batch("mlp", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="backward=True"):
        maml.meta_loss(batch, train=False, backward=True)
