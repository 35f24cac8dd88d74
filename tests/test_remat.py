"""metaopt.remat / MAML(checkpoint_every=k): the checkpointed second-order unroll gives the
plain unroll's meta-gradient (float64, 1e-10), for SGD and Adafactor inner optimizers, a
learnable inner learning rate, batch norm on batch statistics, and segment lengths that do
and do not divide the step count; bad values are refused with the value named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.maml import MAML
from metaopt.models import MLP, Conv4
from metaopt.optim import SGD, Adafactor
from metaopt.remat import checkpointed_unroll
from metaopt.tasks.base import TaskBatch


def _omniglot_batch(tasks: int = 2, ways: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(tasks, ways, 1, 28, 28, generator=g, dtype=torch.float64)
    xq = torch.rand(tasks, 2 * ways, 1, 28, 28, generator=g, dtype=torch.float64)
    ys = torch.arange(ways).expand(tasks, ways).contiguous()
    yq = torch.arange(ways).repeat(2).expand(tasks, 2 * ways).contiguous()
    return TaskBatch(support=(xs, ys), query=(xq, yq))


def _meta_grads(maml: MAML, batch: TaskBatch, backward: bool) -> list[torch.Tensor]:
    maml.zero_grad(set_to_none=True)
    if backward:
        maml.meta_loss(batch, before=False, backward=True)
    else:
        maml.meta_loss(batch, before=False).loss.backward()
    return [p.grad.clone() for p in maml.parameters()]


@pytest.mark.parametrize("inner", ["sgd", "adafactor"])
@pytest.mark.parametrize("steps,every", [(5, 2), (4, 4), (3, 1), (6, 10)])
def test_checkpointed_conv4_equals_plain_unroll_float64(inner: str, steps: int, every: int) -> None:
    torch.manual_seed(0)
    model = Conv4(3, hidden=4).double()
    lr = nn.Parameter(torch.tensor(0.05, dtype=torch.float64))  # a learnable hyperparameter too
    opt = SGD(lr=lr) if inner == "sgd" else Adafactor(lr=lr)
    batch = _omniglot_batch()
    plain = MAML(model, opt, inner_steps=steps, vectorize=False)
    remat = MAML(model, opt, inner_steps=steps, checkpoint_every=every)
    for backward in (False, True):
        ref = _meta_grads(plain, batch, backward)
        got = _meta_grads(remat, batch, backward)
        assert len(ref) == len(got) == len(list(model.parameters())) + 1  # + the learnable lr
        for a, b in zip(ref, got):
            assert a.abs().max() > 0 or b.abs().max() == 0
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


def test_checkpointed_unroll_matches_on_mlp_and_adapt() -> None:
    torch.manual_seed(1)
    model = MLP(1, (16, 16), 1).double()
    x, y = torch.randn(10, 1, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    plain = MAML(model, SGD(lr=0.01), inner_steps=7, loss_fn=F.mse_loss, vectorize=False)
    remat = MAML(model, SGD(lr=0.01), inner_steps=7, loss_fn=F.mse_loss, checkpoint_every=3)
    p1, p2 = plain.adapt(x, y, train=True), remat.adapt(x, y, train=True)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=1e-12)
    g1 = torch.autograd.grad(sum(v.square().sum() for v in p1.values()), list(model.parameters()))
    g2 = torch.autograd.grad(sum(v.square().sum() for v in p2.values()), list(model.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


def test_checkpointed_unroll_recomputes_in_backward() -> None:
    # The segment's forward runs once more in the backward: that is where the memory goes.
    calls = []

    def step(p: dict[str, torch.Tensor], s: tuple) -> tuple[dict[str, torch.Tensor], tuple]:
        calls.append(1)
        (g,) = torch.autograd.grad((p["w"] ** 3).sum(), [p["w"]], create_graph=True)
        return {"w": p["w"] - 0.1 * g}, s

    w = torch.tensor([0.5, -0.3], dtype=torch.float64, requires_grad=True)
    out, _ = checkpointed_unroll(step, {"w": w}, (), steps=6, every=3)
    assert len(calls) == 6  # each step once (torch.utils.checkpoint would take 12 here)
    out["w"].sum().backward()
    assert len(calls) == 12  # each segment recomputed once
    # The plain unroll's gradient, by hand.
    v = w.detach().clone().requires_grad_()
    p = v
    for _ in range(6):
        (g,) = torch.autograd.grad((p**3).sum(), [p], create_graph=True)
        p = p - 0.1 * g
    p.sum().backward()
    torch.testing.assert_close(w.grad, v.grad, rtol=0, atol=1e-14)


def test_bad_checkpoint_every_is_refused() -> None:
    model = MLP(1, (4,), 1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"checkpoint_every should be None or an int >= 1 but is: {bad!r}"):
            MAML(model, checkpoint_every=bad)
    with pytest.raises(ValueError, match="checkpoint_every needs the per-task loop"):
        MAML(model, checkpoint_every=2, vectorize=True)
    assert MAML(model, checkpoint_every=2)._use_vmap(torch.device("cpu")) is False
