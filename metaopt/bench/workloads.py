"""The fixed benchmark workloads (S1, S5, O1, O5: the table in :data:`WORKLOADS`), their models, inner
optimizers and random, seeded meta-batches.

A workload fixes the model, the task shapes, the meta-batch size, the number of inner steps
and the inner learning rate; a *case* adds the inner optimizer (``sgd`` / ``adafactor``) and
the order (``second`` / ``first``). Data is random with the real shapes (Omniglot
``(tasks, ways*shots, 1, 28, 28)``), generated from a fixed seed: the benchmark measures
the meta-step, not data loading, and needs no dataset on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.tasks.base import TaskBatch

__all__ = [
    "Workload", "WORKLOADS", "INNERS", "ORDERS", "MODELS", "Case", "FunctionalAdam", "AdamState",
    "make_model", "make_batch", "make_inner", "tiny",
]

INNERS = ("sgd", "adafactor")
ORDERS = ("second", "first")


@dataclass(frozen=True)
class Workload:
    """One row of the benchmark workload table (S1, S5, O1, O5)."""

    id: str
    kind: str  # "sinusoid" | "omniglot"
    meta_batch: int
    inner_steps: int
    inner_lr: float
    ways: int = 1  # omniglot: classes per task (and the head's size)
    shots: int = 10  # sinusoid: support points; omniglot: examples per class
    queries: int = 10  # sinusoid: query points; omniglot: query examples per class
    hidden: int = 64  # Conv4 filters (the paper's 64)
    model: str = ""  # a key of MODELS; "" = the kind's model (MLP for sinusoid, Conv4 for omniglot)

    @property
    def model_name(self) -> str:
        return self.model or ("mlp" if self.kind == "sinusoid" else "conv4")

    @property
    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        return F.mse_loss if self.kind == "sinusoid" else F.cross_entropy

    def describe(self) -> str:
        if self.kind == "sinusoid":
            data = f"sinusoid {self.shots}+{self.queries}"
            model = "MLP 1-40-40-1"
        else:
            data = f"{self.ways}-way {self.shots}-shot, {self.queries} query/class, 28x28"
            model = f"Conv4({self.hidden}) {self.ways}-way" if self.model_name == "conv4" else \
                f"{self.model_name} {self.ways}-way"
        return (f"{self.id}: {model}, {data}, meta-batch {self.meta_batch}, "
                f"{self.inner_steps} inner step(s), lr {self.inner_lr}")


WORKLOADS: dict[str, Workload] = {
    "S1": Workload("S1", "sinusoid", meta_batch=25, inner_steps=1, inner_lr=0.01),
    "S5": Workload("S5", "sinusoid", meta_batch=25, inner_steps=5, inner_lr=0.01),
    "O1": Workload("O1", "omniglot", meta_batch=32, inner_steps=1, inner_lr=0.4, ways=5, shots=1, queries=15),
    "O5": Workload("O5", "omniglot", meta_batch=16, inner_steps=5, inner_lr=0.1, ways=20, shots=1, queries=15),
}


def tiny(w: Workload) -> Workload:
    """Tiny sizes for smoke tests: 2 tasks, few queries, Conv4 with 8 filters; input shapes,
    ways and step counts kept."""
    if w.kind == "sinusoid":
        return replace(w, meta_batch=2, shots=5, queries=5)
    return replace(w, meta_batch=2, queries=1, hidden=8)


class Case(NamedTuple):
    workload: Workload
    inner: str  # "sgd" | "adafactor" (+ "adafactor_full" | "adam" in the memory report)
    order: str  # "second" | "first"
    precision: str = "fp32"  # metaopt rows run under metaopt.precision.precision_context; peers in fp32
    checkpoint_every: int | None = None  # metaopt rows: MAML(checkpoint_every=...) (metaopt.remat)

    @property
    def first_order(self) -> bool:
        return self.order == "first"

    @property
    def label(self) -> str:
        extra = "" if self.precision == "fp32" else f" {self.precision}"
        if self.checkpoint_every:
            extra += f" remat/{self.checkpoint_every}"
        return f"{self.workload.id} {self.inner} {self.order}{extra}"


def _resnet12(w: Workload) -> nn.Module:
    import metaopt.models

    if not hasattr(metaopt.models, "ResNet12"):
        raise ValueError("metaopt.models.ResNet12 is not available in this version of metaopt")
    return metaopt.models.ResNet12(w.ways, in_channels=1)


#: Models a workload can name (``Workload.model``), built from the workload's sizes. Add an
#: entry to benchmark another model on the same tasks (cost curves: ``--curve-models``).
MODELS: dict[str, Callable[[Workload], nn.Module]] = {
    "mlp": lambda w: __import__("metaopt.models", fromlist=["MLP"]).MLP(1, (40, 40), 1),
    "conv4": lambda w: __import__("metaopt.models", fromlist=["Conv4"]).Conv4(w.ways, hidden=w.hidden),
    "resnet12": _resnet12,
}


def make_model(w: Workload, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> nn.Module:
    """The workload's model (``MODELS[w.model_name]``), initialised from ``seed``."""
    if w.model_name not in MODELS:
        raise ValueError(f"unknown model {w.model_name!r}; known: {', '.join(MODELS)}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # nn.Module init draws from the global generator; restore it after
    try:
        model = MODELS[w.model_name](w)
    finally:
        torch.random.set_rng_state(state)
    return model.to(device=device, dtype=dtype)


def make_batch(w: Workload, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> TaskBatch:
    """A random meta-batch with the workload's real shapes (task dimension first)."""
    g = torch.Generator().manual_seed(seed)
    T = w.meta_batch
    if w.kind == "sinusoid":
        # Finn et al. ranges: amplitude [0.1, 5], phase [0, pi], x in [-5, 5].
        amp = torch.empty(T, 1, 1).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(T, 1, 1).uniform_(0.0, math.pi, generator=g)
        xs = torch.empty(T, w.shots, 1).uniform_(-5.0, 5.0, generator=g)
        xq = torch.empty(T, w.queries, 1).uniform_(-5.0, 5.0, generator=g)
        batch = TaskBatch(support=(xs, amp * torch.sin(xs - phase)), query=(xq, amp * torch.sin(xq - phase)))
    else:
        # Binary "ink = 1" images like Omniglot's; labels 0..ways-1, each class `shots` times.
        ns, nq = w.ways * w.shots, w.ways * w.queries
        xs = (torch.rand(T, ns, 1, 28, 28, generator=g) < 0.2).float()  # (tasks, ways*shots, 1, 28, 28)
        xq = (torch.rand(T, nq, 1, 28, 28, generator=g) < 0.2).float()  # (tasks, ways*queries, 1, 28, 28)
        ys = torch.arange(w.ways).repeat(w.shots).expand(T, ns).contiguous()
        yq = torch.arange(w.ways).repeat(w.queries).expand(T, nq).contiguous()
        batch = TaskBatch(support=(xs, ys), query=(xq, yq))
    (xs, ys), (xq, yq) = batch

    def cast(t: Tensor) -> Tensor:  # inputs (and regression targets) take the model's dtype
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return TaskBatch(support=(cast(xs), cast(ys)), query=(cast(xq), cast(yq)))


# ---------------------------------------------------------------------------------------
# Inner optimizers
# ---------------------------------------------------------------------------------------


class AdamState(NamedTuple):
    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count: mypy cannot express it
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


class FunctionalAdam:
    """Minimal functional, differentiable Adam (``torch.optim.Adam`` defaults), for the
    memory comparison only: a full first and second moment per parameter element.

    Update rule (step ``t``)::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    ``sqrt`` of a zero second moment has an infinite derivative, so ``v + tiny`` is used
    under the root (1e-30): the value is unchanged to float precision and the second-order
    graph stays finite.
    """

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps

    def init(self, params: dict[str, Tensor]) -> AdamState:
        ref = next(iter(params.values()))
        return AdamState(
            torch.zeros((), dtype=ref.dtype, device=ref.device),
            {k: torch.zeros_like(p) for k, p in params.items()},
            {k: torch.zeros_like(p) for k, p in params.items()},
        )

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], state: AdamState) -> tuple[dict[str, Tensor], AdamState]:
        b1, b2 = self.betas
        t = state.count + 1
        bc1 = 1 - b1 ** t
        bc2 = 1 - b2 ** t
        new_p, new_m, new_v = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            m = state.exp_avg[k] * b1 + g * (1 - b1)
            v = state.exp_avg_sq[k] * b2 + g * g * (1 - b2)
            new_p[k] = p - self.lr * (m / bc1) / (torch.sqrt(v / bc2 + 1e-30) + self.eps)
            new_m[k], new_v[k] = m, v
        return new_p, AdamState(t, new_m, new_v)


def make_inner(name: str, lr: float) -> Any:
    """``sgd`` / ``adafactor`` (metaopt.optim, torch's defaults but ``lr``);
    ``adafactor_full``: ``Adafactor(factored=False)`` (full second moment, no first moment);
    ``adam``: :class:`FunctionalAdam` (full first and second moments)."""
    from metaopt.optim import SGD, Adafactor

    if name == "sgd":
        return SGD(lr=lr)
    if name == "adafactor":
        return Adafactor(lr=lr)
    if name == "adafactor_full":
        return Adafactor(lr=lr, factored=False)
    if name == "adam":
        return FunctionalAdam(lr=lr)
    raise ValueError(f"unknown inner optimizer {name!r}; known: sgd, adafactor, adafactor_full, adam")
