"""Layer support matrix: for every common layer type, every ``vectorize`` setting and two
inner optimizers, the second-order meta-gradient (float64, 2 inner steps) equals central
finite differences along random directions, or the setting raises a ValueError naming the
module. Never silently wrong.

``python tests/test_layer_matrix.py`` prints the measured table (layer x loop/vmap x order).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.maml import MAML
from metaopt.models import BatchNorm
from metaopt.optim import SGD, Adafactor
from metaopt.tasks.base import TaskBatch

DT = torch.float64
RTOL = 1e-6  # |autograd - finite difference| / |meta-gradient| along unit directions
EPS = 1e-6


class Head(nn.Module):
    """``body`` then flatten and a linear head to 2 outputs (regression)."""

    def __init__(self, body: nn.Module, width: int, pick: Callable | None = None) -> None:
        super().__init__()
        self.body, self.head, self.pick = body, nn.Linear(width, 2), pick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.pick is not None:
            h = self.pick(h)
        return self.head(torch.tanh(h).flatten(1))


class Tied(nn.Module):
    """One linear layer applied twice (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))[:, :2]


class Scaled(nn.Module):
    """A buffer used in the forward (a user's layer with state of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def _frozen() -> nn.Module:
    m = Head(nn.Linear(3, 4), 4)
    m.body.weight.requires_grad_(False)
    return m


def _attention() -> nn.Module:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(3, 4)
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x)
            return self.mha(h, h, h, need_weights=False)[0]  # torch's SDPA kernels

    return Head(Attn(), 12)


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(3, 1, dim_feedforward=4, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(x, x)  # the sequence attends to itself as memory


class _Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, 3): two steps of the cell
        h, c = self.cell(x[:, 0])
        return self.cell(x[:, 1], (h, c))[0]


class _Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(3, 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bil(x, torch.sin(x))


def _activations() -> nn.Module:
    """Every pointwise activation of the table, each behind a linear layer."""
    acts = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.PReLU(), nn.ELU(), nn.SELU(), nn.CELU(), nn.GELU(),
            nn.SiLU(), nn.Mish(), nn.Tanh(), nn.Sigmoid(), nn.Softplus(), nn.Hardtanh(), nn.Softsign(),
            nn.Tanhshrink(), nn.Softmax(-1), nn.LogSoftmax(-1), nn.Identity()]
    layers: list[nn.Module] = []
    for act in acts:
        layers += [nn.Linear(4, 4), act]
    return Head(nn.Sequential(nn.Linear(3, 4), *layers), 4)


# name -> (model factory, per-example input shape or "tokens")
LAYERS: dict[str, tuple[Callable[[], nn.Module], object]] = {
    "LayerNorm": (lambda: Head(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), 4), (3,)),
    # A linear map on the last dim first: the norm's input then depends on parameters,
    # which is where the native kernels' second derivatives under vmap go wrong.
    "InstanceNorm1d": (lambda: Head(nn.Sequential(nn.Linear(5, 5), nn.InstanceNorm1d(2, affine=True)), 10), (2, 5)),
    "InstanceNorm2d": (lambda: Head(nn.Sequential(nn.Linear(3, 3), nn.InstanceNorm2d(2, affine=True)), 18), (2, 3, 3)),
    "BatchNorm1d": (lambda: Head(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), 4), (3,)),
    "BatchNorm2d": (lambda: Head(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm2d(2)), 18), (2, 3, 3)),
    "metaopt BatchNorm": (lambda: Head(nn.Sequential(nn.Linear(3, 4), BatchNorm(4)), 4), (3,)),
    "GroupNorm": (lambda: Head(nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4)), 4), (3,)),
    "RMSNorm": (lambda: Head(nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4)), 4), (3,)),
    "Conv1d": (lambda: Head(nn.Conv1d(2, 3, 3), 9), (2, 5)),
    "Conv2d": (lambda: Head(nn.Conv2d(1, 2, 3), 8), (1, 4, 4)),
    "ConvTranspose2d": (lambda: Head(nn.ConvTranspose2d(1, 2, 2), 32), (1, 3, 3)),
    "pooling": (lambda: Head(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.AvgPool2d(2)), 2), (1, 4, 4)),
    "pooling 1d/3d, adaptive": (
        lambda: Head(nn.Sequential(
            nn.Conv3d(1, 2, 2), nn.MaxPool3d(2, ceil_mode=True), nn.AvgPool3d(1), nn.Flatten(2),
            nn.AdaptiveMaxPool1d(3), nn.AdaptiveAvgPool1d(2), nn.MaxPool1d(1), nn.AvgPool1d(1)), 4),
        (1, 3, 3, 3),
    ),
    "activations": (_activations, (3,)),
    "Bilinear": (lambda: Head(_Bilinear(), 4), (3,)),
    "Embedding": (lambda: Head(nn.Embedding(5, 3), 9), "tokens"),
    "tied weights": (Tied, (3,)),
    "frozen parameters": (_frozen, (3,)),
    "buffers": (Scaled, (3,)),
    "MultiheadAttention": (_attention, (3, 3)),
    "TransformerEncoderLayer": (
        lambda: Head(nn.TransformerEncoderLayer(3, 1, dim_feedforward=4, dropout=0.0, batch_first=True), 9),
        (3, 3),
    ),
    "TransformerEncoder": (
        lambda: Head(nn.TransformerEncoder(
            nn.TransformerEncoderLayer(3, 1, dim_feedforward=4, dropout=0.0, batch_first=True), 2,
            enable_nested_tensor=False), 9),
        (3, 3),
    ),
    # No parameters of its own: judged by its submodules (attention, linear, LayerNorm).
    "TransformerDecoderLayer": (lambda: Head(_Decoder(), 9), (3, 3)),
    "LSTMCell": (lambda: Head(_Cell(), 3), (3, 3)),
    "LSTM": (lambda: Head(nn.LSTM(3, 4, batch_first=True), 4, pick=lambda o: o[0][:, -1]), (3, 3)),
    "GRU": (lambda: Head(nn.GRU(3, 4, batch_first=True), 4, pick=lambda o: o[0][:, -1]), (3, 3)),
    "spectral_norm": (lambda: Head(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)), 4), (3,)),
    "weight_norm": (lambda: Head(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), 4), (3,)),
}
# vectorize=True must refuse these, naming the module.
REFUSED = {"LSTM": "LSTM", "GRU": "GRU", "LSTMCell": "LSTMCell", "spectral_norm": "spectral_norm"}
# Exact under vmap but outside the table: "auto" uses the loop. "buffers" is a user's class
# holding a buffer of its own; nn.Bilinear has no batching rule (vmap falls back to a loop).
UNKNOWN = {"buffers", "Bilinear"}
INNER = {"sgd": lambda: SGD(lr=0.1), "adafactor": lambda: Adafactor(lr=0.05)}


def model_and_batch(name: str, seed: int = 0) -> tuple[nn.Module, TaskBatch]:
    factory, shape = LAYERS[name]
    torch.manual_seed(seed)
    model = factory().to(DT).eval()  # eval: spectral norm's power iteration stays put
    g = torch.Generator().manual_seed(seed + 1)

    def x() -> torch.Tensor:  # 2 tasks x 4 examples
        if shape == "tokens":
            return torch.randint(0, 5, (2, 4, 3), generator=g)
        return torch.randn(2, 4, *shape, generator=g, dtype=DT)

    def y() -> torch.Tensor:
        return torch.randn(2, 4, 2, generator=g, dtype=DT)

    return model, TaskBatch(support=(x(), y()), query=(x(), y()))


def fd_error(maml: MAML, batch: TaskBatch, directions: int = 2, seed: int = 0) -> float:
    """max over random unit directions d of |<grad, d> - (L(p+eps d) - L(p-eps d)) / 2eps|
    divided by |grad| (a directional derivative can be ~0; the gradient norm cannot)."""
    params = [p for p in maml.parameters() if p.requires_grad]
    grads = torch.autograd.grad(maml.meta_loss(batch, train=True, before=False).loss, params)
    gnorm = torch.sqrt(sum(g.square().sum() for g in grads))
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    saved = [p.detach().clone() for p in params]
    for _ in range(directions):
        d = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
        norm = torch.sqrt(sum(t.square().sum() for t in d))
        d = [t / norm for t in d]
        ad = sum((g * t).sum() for g, t in zip(grads, d))
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, t in zip(params, d):
                    p.add_(sign * EPS * t)
                losses.append(maml.meta_loss(batch, train=True, before=False).loss)
                for p, t in zip(params, saved):
                    p.copy_(t)  # exactly back
        fd = (losses[0] - losses[1]) / (2 * EPS)
        worst = max(worst, float((ad - fd).abs() / gnorm))
    return worst


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("vectorize", ["auto", True, False])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_meta_gradient_matches_finite_differences_or_refuses(layer: str, vectorize: object, inner: str) -> None:
    model, batch = model_and_batch(layer)
    if vectorize is True and layer in REFUSED:
        with pytest.raises(ValueError, match=rf"{REFUSED[layer]}.*vectorize=False"):
            MAML(model, INNER[inner](), inner_steps=2, loss_fn=F.mse_loss, vectorize=True)
        return
    maml = MAML(model, INNER[inner](), inner_steps=2, loss_fn=F.mse_loss, vectorize=vectorize)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fd_error(maml, batch) <= RTOL
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("layer", [name for name in LAYERS if name not in REFUSED])
def test_evaluation_vmap_equals_loop(layer: str) -> None:
    """train=False (no graph; in eval mode torch may pick its fused inference kernels)."""
    model, batch = model_and_batch(layer)
    loop, vec = (MAML(model, SGD(lr=0.1), inner_steps=2, loss_fn=F.mse_loss, vectorize=v) for v in (False, True))
    a, b = loop.meta_loss(batch, train=False), vec.meta_loss(batch, train=False)
    assert float((a.query_loss - b.query_loss).abs().max()) <= 1e-12
    assert float((a.query_loss_before - b.query_loss_before).abs().max()) <= 1e-12


def test_elementary_ops_equal_torch() -> None:
    """The engine's replacements give torch's values (and running-stat updates)."""
    from metaopt._exact_ops import instance_norm, layer_norm, weight_norm
    from metaopt.models import batch_norm

    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=DT)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return float((a - b).abs().max()) <= 1e-12

    x, w, b = r(4, 3, 5), r(5), r(5)
    assert close(layer_norm(x, (5,), w, b, 1e-5), F.layer_norm(x, (5,), w, b))
    assert close(layer_norm(x, (3, 5)), F.layer_norm(x, (3, 5)))
    for use_input_stats in (True, False):
        rm, rv = r(3), r(3).abs()
        rm2, rv2 = rm.clone(), rv.clone()
        wc, bc = r(3), r(3)
        ours = instance_norm(x, rm, rv, wc, bc, use_input_stats, 0.1, 1e-5)
        theirs = F.instance_norm(x, rm2, rv2, wc, bc, use_input_stats, 0.1, 1e-5)
        assert close(ours, theirs) and close(rm, rm2) and close(rv, rv2)
    for training in (True, False):
        rm, rv = r(3), r(3).abs()
        rm2, rv2 = rm.clone(), rv.clone()
        ours = batch_norm(x, rm, rv, wc, bc, training, 0.1, 1e-5)
        assert close(ours, F.batch_norm(x, rm2, rv2, wc, bc, training, 0.1, 1e-5)) and close(rm, rm2) and close(rv, rv2)
    v = r(4, 3, 5)
    for dim, gshape in ((0, (4, 1, 1)), (1, (1, 3, 1)), (2, (1, 1, 5)), (-1, ())):
        gg = r(*gshape)
        assert close(weight_norm(v, gg, dim), torch._weight_norm(v, gg, dim)), dim


def test_weight_norm_double_backward_is_exact_through_the_engines_ops() -> None:
    """torch._weight_norm fails gradgradcheck in torch 2.13 (not asserted: a torch fix must
    not break this suite); the replacement passes it."""
    from metaopt._exact_ops import ExactOps

    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)
    gg = torch.randn(3, 1, generator=g, dtype=DT, requires_grad=True)

    def f(v: torch.Tensor, gg: torch.Tensor) -> torch.Tensor:
        with ExactOps():
            return torch._weight_norm(v, gg, 0)

    assert torch.autograd.gradgradcheck(f, (v, gg))


def test_auto_uses_vmap_only_where_exact() -> None:
    """On CUDA (where auto prefers vmap whenever it is exact) the table decides."""
    for layer in LAYERS:
        model, _ = model_and_batch(layer)
        auto = MAML(model, loss_fn=F.mse_loss)._use_vmap(torch.device("cuda"))
        assert auto == (layer not in REFUSED and layer not in UNKNOWN), layer


def test_functional_forward_under_a_users_vmap_is_exact() -> None:
    """A hand-written functorch MAML step over maml.functional_forward (LayerNorm model):
    the engine's exact ops apply inside the user's own vmap(grad(...)) too."""
    model, batch = model_and_batch("LayerNorm")
    maml = MAML(model, loss_fn=F.mse_loss)
    (xs, ys) = batch.support

    def task(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = dict(model.named_parameters())
        g = torch.func.grad(lambda p: F.mse_loss(maml.functional_forward(p, x), y))(p)
        return F.mse_loss(maml.functional_forward({k: p[k] - 0.3 * g[k] for k in p}, x), y)

    params = list(model.parameters())
    vec = torch.autograd.grad(torch.func.vmap(task)(xs, ys).mean(), params)
    loop = torch.autograd.grad(torch.stack([task(xs[i], ys[i]) for i in range(2)]).mean(), params)
    assert max(float((a - b).abs().max()) for a, b in zip(vec, loop)) <= 1e-12


def test_outer_backward_after_meta_loss_through_attention() -> None:
    """The outer .backward() runs after meta_loss returned (outside the engine's kernel
    choice): the recorded graph must not need the flash kernel's missing double backward."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    x = torch.randn(2, 3, 5, 4)
    batch = TaskBatch(support=(x, x.clone()), query=(x, x.clone()))
    for vec in (False, True):
        maml = MAML(model, SGD(lr=0.1), inner_steps=2, loss_fn=F.mse_loss, vectorize=vec)
        model.zero_grad()
        maml.meta_loss(batch).loss.backward()
        g = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        maml.meta_loss(batch, backward=True)
        assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(g, model.parameters()))


def _table() -> None:  # pragma: no cover - a report, run by hand
    """Print layer x (loop, vmap) x order: second order = FD error (max over both inner
    optimizers); first order = |vmap - loop| / |loop| of the FOMAML gradient."""
    print(f"{'layer':26s} {'2nd loop':>10s} {'2nd vmap':>10s} {'1st vmap-loop':>14s} {'auto picks (cpu/cuda)':>22s}")
    for layer in LAYERS:
        row = []
        for vec in (False, True):
            errs = []
            for make in INNER.values():
                model, batch = model_and_batch(layer)
                try:
                    maml = MAML(model, make(), inner_steps=2, loss_fn=F.mse_loss, vectorize=vec)
                except ValueError:
                    errs = None
                    break
                errs.append(fd_error(maml, batch, directions=4))
            row.append("refused" if errs is None else f"{max(errs):.1e}")
        model, batch = model_and_batch(layer)
        fo = []
        for vec in (False, True):
            try:
                maml = MAML(model, SGD(lr=0.1), inner_steps=2, first_order=True, loss_fn=F.mse_loss, vectorize=vec)
            except ValueError:
                break
            loss = maml.meta_loss(batch, train=True, before=False).loss
            fo.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])]))
        first = f"{float((fo[1] - fo[0]).abs().max() / fo[0].abs().max()):.1e}" if len(fo) == 2 else "refused"
        m = MAML(model, loss_fn=F.mse_loss)
        picks = "/".join("vmap" if m._use_vmap(torch.device(d)) else "loop" for d in ("cpu", "cuda"))
        print(f"{layer:26s} {row[0]:>10s} {row[1]:>10s} {first:>14s} {picks:>22s}")


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(1)
    _table()
    sys.exit(0)
