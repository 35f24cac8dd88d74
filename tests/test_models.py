"""Models: shapes, parameter names, and the hand-written BatchNorm against torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.models import MLP, BatchNorm, Conv4, batch_norm, max_pool2x2

DT = torch.float64


@pytest.mark.parametrize("shape", [(7, 4), (6, 4, 5), (5, 4, 3, 3)])
def test_hand_written_batch_norm_equals_torch_training_mode(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g, dtype=DT) * 3 + 1).requires_grad_()
    w = torch.randn(4, generator=g, dtype=DT).requires_grad_()
    b = torch.randn(4, generator=g, dtype=DT).requires_grad_()
    y = batch_norm(x, None, None, w, b, training=True)
    ref = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    assert torch.allclose(y, ref, rtol=0, atol=1e-13)
    # first and second derivatives agree too
    v = torch.randn(shape, generator=g, dtype=DT)
    gy = torch.autograd.grad((y * v).sum() ** 2, (x, w, b), create_graph=True)
    gr = torch.autograd.grad((ref * v).sum() ** 2, (x, w, b), create_graph=True)
    for a, c in zip(gy, gr):
        assert torch.allclose(a, c, rtol=1e-11, atol=1e-12)
    hy = torch.autograd.grad(gy[0].sum() + gy[1].sum(), (x, w))
    hr = torch.autograd.grad(gr[0].sum() + gr[1].sum(), (x, w))
    for a, c in zip(hy, hr):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-11)
    # the module (torch's kernel outside transforms) computes the same
    bn = BatchNorm(4).to(DT)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    assert torch.allclose(bn(x), ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("hand_written", [False, True])
def test_batchnorm_running_stats_match_torch(hand_written: bool, monkeypatch) -> None:
    if hand_written:  # force the elementary-ops path used under vmap
        monkeypatch.setattr("metaopt.models.layers._functorch_wrapped", lambda t: True)
    torch.manual_seed(0)
    ours, ref = BatchNorm(3, track_running_stats=True).to(DT), nn.BatchNorm2d(3).to(DT)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=DT) * 2 + 0.5
        assert torch.allclose(ours(x), ref(x), atol=1e-13)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-14)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-14)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    assert torch.allclose(ours(x), ref(x), atol=1e-13)
    assert not dict(BatchNorm(3).named_buffers())  # default: no running stats, like MAML


def test_batchnorm_second_order_under_vmap_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 2, 4, 4, generator=g, dtype=DT)
    bn = BatchNorm(2).to(DT)
    params = {k: v.detach().clone().requires_grad_() for k, v in bn.named_parameters()}

    def loss(p, xi):
        return (torch.func.functional_call(bn, p, (xi,)) ** 3).mean()

    def per_task(xi):  # one inner step then the loss: needs second order
        gr = torch.func.grad(loss)(params, xi)
        return loss({k: params[k] - 0.1 * gr[k] for k in params}, xi)

    vm = torch.autograd.grad(torch.func.vmap(per_task)(x).sum(), list(params.values()))
    lp = torch.autograd.grad(sum(per_task(xi) for xi in x), list(params.values()))
    for a, c in zip(vm, lp):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-13)


def test_batchnorm_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"expects input \(N, 3, \.\.\.\)"):
        BatchNorm(3)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="num_features"):
        BatchNorm(0)


def test_conv4_shapes_and_names() -> None:
    m = Conv4(ways=5)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    assert m.head.in_features == 64
    names = [k for k, _ in m.named_parameters()]
    assert names[:4] == ["features.0.conv.weight", "features.0.conv.bias", "features.0.norm.weight", "features.0.norm.bias"]
    assert names[-2:] == ["head.weight", "head.bias"]
    assert not dict(m.named_buffers())
    assert Conv4(20, in_channels=3, hidden=32, image_size=84)(torch.zeros(2, 3, 84, 84)).shape == (2, 20)
    assert dict(Conv4(5, track_running_stats=True).named_buffers())
    with pytest.raises(ValueError, match="ways"):
        Conv4(0)


def test_mlp_shapes_and_names() -> None:
    m = MLP()
    assert m(torch.zeros(10, 1)).shape == (10, 1)
    assert [k for k, _ in m.named_parameters()] == [f"net.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]
    assert sum(p.numel() for p in m.parameters()) == 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1
    with pytest.raises(ValueError, match="positive ints"):
        MLP(1, (0,), 1)


@pytest.mark.parametrize("name", ["metaopt.models", "metaopt.maml", "metaopt.optim.learned"])
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def _reference_conv4(model: Conv4) -> nn.Module:
    """The textbook Conv4 (torch layers, ReLU before max-pool) with ``model``'s weights."""
    layers: list[nn.Module] = []
    for block in model.features:
        conv = nn.Conv2d(block.conv.in_channels, block.conv.out_channels, 3, padding=1, dtype=torch.float64)
        bn = nn.BatchNorm2d(block.conv.out_channels, track_running_stats=False, dtype=torch.float64)
        conv.load_state_dict(block.conv.state_dict())
        bn.weight.data.copy_(block.norm.weight)
        bn.bias.data.copy_(block.norm.bias)
        layers += [conv, bn, nn.ReLU(), nn.MaxPool2d(2)]
    head = nn.Linear(model.head.in_features, model.head.out_features, dtype=torch.float64)
    head.load_state_dict(model.head.state_dict())
    return nn.Sequential(*layers, nn.Flatten(), head)


@pytest.mark.parametrize("fast_pool_min_numel", [0, 10**12], ids=["channels-last-pool", "torch-pool"])
def test_conv4_pool_before_relu_equals_textbook_order_to_second_order(fast_pool_min_numel: int, monkeypatch) -> None:
    # Binary images with blank regions give exact ties in every max-pool window: the
    # pool-then-ReLU order must route gradients (and second-order terms) exactly like the
    # textbook ReLU-then-pool order. One MAML step (second order) checks both, with every
    # pool through max_pool2x2's channels-last kernel and with every pool through torch's.
    monkeypatch.setattr("metaopt.models.layers._CHANNELS_LAST_POOL_MIN_NUMEL", fast_pool_min_numel)
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=16).to(torch.float64)
    with torch.no_grad():  # non-trivial BN affine parameters, negative scales included
        for block in model.features:
            block.norm.weight.uniform_(-1.5, 1.5)
            block.norm.bias.uniform_(-0.5, 0.5)
    ref = _reference_conv4(model)
    xs = (torch.rand(5, 1, 28, 28) < 0.15).double()
    xq = (torch.rand(10, 1, 28, 28) < 0.15).double()
    ys, yq = torch.arange(5), torch.arange(5).repeat(2)

    def meta_grads(net: nn.Module) -> list[torch.Tensor]:
        params = list(net.parameters())
        loss = F.cross_entropy(net(xs), ys)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        fast = [p - 0.4 * g for p, g in zip(params, grads)]
        out = torch.func.functional_call(net, dict(zip([n for n, _ in net.named_parameters()], fast)), (xq,))
        return list(torch.autograd.grad(F.cross_entropy(out, yq), params))

    torch.testing.assert_close(model(xq), ref(xq), rtol=0, atol=1e-12)
    ours, theirs = meta_grads(model), meta_grads(ref)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _pool_derivatives(pool, x: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """Output, first derivative (vjp with v) and the derivative of that vjp w.r.t. v: the
    terms MAML's second-order meta-gradient takes through a max-pool."""
    x = x.detach().requires_grad_()
    v = v.detach().requires_grad_()
    y = pool(x)
    (g,) = torch.autograd.grad(y, x, v, create_graph=True)
    (gv,) = torch.autograd.grad(g, v, w)
    return [y, g, gv]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 28, 28), (2, 3, 7, 9), (4, 64, 14, 14), (1, 2, 3, 3)])
def test_max_pool2x2_equals_torch_max_pool_to_second_order(shape, dtype, monkeypatch) -> None:
    # Threshold 0: every shape (odd sizes too) takes the channels-last path. Rounded values
    # and blank planes give many exact ties, whose routing (first maximum) must match.
    monkeypatch.setattr("metaopt.models.layers._CHANNELS_LAST_POOL_MIN_NUMEL", 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype).round()
    x[0, 0] = 0.0
    out = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    v = torch.randn(out, generator=g, dtype=dtype)
    w = torch.randn(shape, generator=g, dtype=dtype)
    ours = _pool_derivatives(max_pool2x2, x, v, w)
    ref = _pool_derivatives(lambda t: F.max_pool2d(t, 2), x, v, w)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.is_contiguous()
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(max_pool2x2(x), F.max_pool2d(x, 2))


def test_max_pool2x2_falls_back_to_torch_where_its_kernel_does_not_apply() -> None:
    x = torch.randn(2, 64, 28, 28)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool2x2(cl), F.max_pool2d(x, 2))  # channels-last input: torch's kernel
    assert torch.equal(max_pool2x2(x[:, :, :, :27]), F.max_pool2d(x[:, :, :, :27], 2))  # strided
    assert torch.equal(max_pool2x2(x[0]), F.max_pool2d(x[0], 2))  # unbatched (C, H, W)
    # Under vmap (the vectorised MAML path) it is F.max_pool2d, batching rule included.
    xb = torch.randn(3, 2, 64, 28, 28)
    assert torch.equal(torch.func.vmap(max_pool2x2)(xb), F.max_pool2d(xb.flatten(0, 1), 2).view(3, 2, 64, 14, 14))
    grads = torch.func.vmap(torch.func.grad(lambda t: max_pool2x2(t).square().sum()))(xb)
    ref = torch.func.vmap(torch.func.grad(lambda t: F.max_pool2d(t, 2).square().sum()))(xb)
    assert torch.equal(grads, ref)
