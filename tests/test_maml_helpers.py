"""Shared helpers for the MAML engine tests (tiny float64 models, batches, finite differences).

No tests here; ``test_maml.py`` and ``test_maml_vmap.py`` import from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.maml import MAML
from metaopt.models import Conv4, MLP
from metaopt.optim import SGD, Adafactor
from metaopt.tasks.base import TaskBatch

DT = torch.float64


@pytest.fixture
def one_thread(_one_thread_per_worker: None) -> Iterator[None]:
    """Tiny float64 tensors: intra-op threads only add overhead, and on a busy 2-core
    machine two spinning threads made these tests ~100x slower. conftest already sets one
    thread for every test; this keeps the guarantee explicit for the engine's tests even if
    that default changes (it runs after conftest's fixture, which it depends on)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(2, (8, 8), 3).to(DT)


def tiny_conv(seed: int = 0, track_running_stats: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return Conv4(ways=3, in_channels=1, hidden=3, image_size=16, track_running_stats=track_running_stats).to(DT)


class TorchBNConv(nn.Module):
    """Small conv net with torch's BatchNorm2d tracking running stats (loop path only)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def torch_bn_conv(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = TorchBNConv().to(DT)
    with torch.no_grad():  # non-trivial running stats, so "unchanged" means something
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    return m


def regression_batch(tasks: int = 3, shots: int = 5, queries: int = 6, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    return TaskBatch(support=(r(tasks, shots, 2), r(tasks, shots, 3)), query=(r(tasks, queries, 2), r(tasks, queries, 3)))


def mlp_class_batch(tasks: int = 3, shots: int = 6, queries: int = 6, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    c = lambda *s: torch.randint(0, 3, s, generator=g)  # noqa: E731
    return TaskBatch(support=(r(tasks, shots, 2), c(tasks, shots)), query=(r(tasks, queries, 2), c(tasks, queries)))


def image_batch(tasks: int = 2, shots: int = 6, queries: int = 6, side: int = 16, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.rand(tasks, n, 1, side, side, generator=g, dtype=DT)  # noqa: E731
    y = lambda n: torch.randint(0, 3, (tasks, n), generator=g)  # noqa: E731
    return TaskBatch(support=(x(shots), y(shots)), query=(x(queries), y(queries)))


def model_and_batch(kind: str, seed: int = 0) -> tuple[nn.Module, TaskBatch, Callable]:
    """(model, batch, loss_fn) for "mlp" (regression), "conv" (Conv4) or "torchbn"."""
    if kind == "mlp":
        return tiny_mlp(seed), regression_batch(seed=seed), F.mse_loss
    if kind == "conv":
        return tiny_conv(seed), image_batch(seed=seed), F.cross_entropy
    if kind == "torchbn":
        return torch_bn_conv(seed), image_batch(side=8, seed=seed), F.cross_entropy
    raise ValueError(kind)


# Inner optimizers by id: factories so each test gets fresh state-free objects.
INNER = {
    "sgd": lambda: SGD(lr=0.1),
    "sgd_momentum": lambda: SGD(lr=0.1, momentum=0.9),
    "adafactor": lambda: Adafactor(lr=0.02),
    "adafactor_hf": lambda: Adafactor.from_transformers(),  # relative step, parameter scaling
}


def meta_grads(maml: MAML, batch: TaskBatch, **kw) -> list[torch.Tensor]:
    """Meta-gradient of ``maml.meta_loss(batch).loss`` for every ``maml.parameters()``."""
    params = list(maml.parameters())
    loss = maml.meta_loss(batch, train=True, before=False, **kw).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def fd_relative_errors(maml: MAML, batch: TaskBatch, directions: int = 2, eps: float = 1e-6, seed: int = 1) -> list[float]:
    """Relative error of <meta-grad, v> against central differences along random unit v.

    ReLU and max-pool make the meta-loss piecewise smooth: a perturbation that crosses a
    kink breaks central differences (not the gradient). Unit-norm directions keep the
    perturbation at ``eps``; tests use data seeds whose neighbourhood is smooth (the conv
    net at seed 0 has a kink within 1e-5 along one direction: the error there vanishes
    at eps=1e-8, so it is the difference quotient that is wrong, not the gradient).
    """
    params = list(maml.parameters())
    grads = meta_grads(maml, batch)
    g = torch.Generator().manual_seed(seed)
    errors = []
    for _ in range(directions):
        vs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        norm = sum(float((v * v).sum()) for v in vs) ** 0.5
        vs = [v / norm for v in vs]
        analytic = sum(float((gr * v).sum()) for gr, v in zip(grads, vs))
        values = []
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for sign in (1.0, -1.0):
                for p, v, s in zip(params, vs, saved):
                    p.copy_(s + sign * eps * v)
                values.append(float(maml.meta_loss(batch, train=True, before=False).loss))
            for p, s in zip(params, saved):
                p.copy_(s)
        fd = (values[0] - values[1]) / (2 * eps)
        errors.append(abs(fd - analytic) / max(abs(fd), abs(analytic), 1e-12))
    return errors


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))
