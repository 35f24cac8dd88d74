"""Meta-gradient fidelity of mixed-precision policies against float64.

A *policy* says which parts of a second-order MAML meta-step run in 16 bits. Each policy's
meta-gradient (mean query loss over the meta-batch, ``.grad`` of every model parameter) is
compared with the same meta-step computed in float64 on a float64 copy of the model and
the batch: cosine over all parameters, and per layer the cosine and the relative error
``||g - g64|| / ||g64||``.

Policies (``POLICIES``):

- ``fp32``: no autocast (the float32 floor of the comparison);
- ``autocast``: a hand-written MAML loop entirely inside ``torch.autocast`` (what a user
  gets by wrapping their meta-step), losses in whatever precision autocast picks;
- ``autocast-loss32``: the same loop with the model's output cast to float32 before every
  loss (support and query);
- ``engine``: :class:`metaopt.MAML` under the caller's ``torch.autocast``, i.e. the policy
  of :mod:`metaopt.precision`: the inner loop (support passes, inner gradients and their
  second-order graph, inner-optimizer steps) in float32, the query forward in 16 bits, its
  loss in float32;
- ``engine-norm32``: as ``engine``, with every normalisation layer's input cast to float32
  in the query pass (statistics, normalisation, ReLU and pooling in float32; only the
  convolutions and matmuls in 16 bits).

A layer whose float64 meta-gradient is zero (a convolution bias right before a batch norm
on batch statistics: the normalisation removes it) has no direction to compare; its
per-layer figures are ``None`` and it is left out of the worst-layer figures.

Example:
    >>> from metaopt.bench.fidelity import fidelity
    >>> from metaopt.bench.workloads import WORKLOADS, tiny
    >>> rows = fidelity(tiny(WORKLOADS["S1"]), policies=("fp32", "engine"))
    >>> [r["policy"] for r in rows], rows[0]["cosine"] > 0.9999
    (['fp32', 'engine'], True)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.bench.workloads import Workload, make_batch, make_inner, make_model
from metaopt.tasks.base import TaskBatch

__all__ = ["POLICIES", "fidelity", "meta_gradient", "compare"]

POLICIES = ("fp32", "autocast", "autocast-loss32", "engine", "engine-norm32")


@contextlib.contextmanager
def _norm_inputs_fp32(model: nn.Module) -> Iterator[None]:
    """Cast the input of every normalisation layer to float32 for the duration."""
    from metaopt.maml import _NORM_TYPES

    hooks = [m.register_forward_pre_hook(lambda _m, args: (args[0].float(), *args[1:]))
             for m in model.modules() if isinstance(m, _NORM_TYPES)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def meta_gradient(model: nn.Module, w: Workload, batch: TaskBatch, policy: str, dtype: torch.dtype,
                  inner: str = "sgd") -> dict[str, Tensor]:
    """The second-order meta-gradient of ``model`` (left untouched) on ``batch`` under
    ``policy`` with 16-bit ``dtype`` (``torch.bfloat16`` / ``torch.float16``)."""
    from metaopt.maml import MAML

    if policy not in POLICIES:
        raise ValueError(f"policy should be one of {', '.join(POLICIES)} but is: {policy!r}")
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    dev = next(model.parameters()).device.type
    maml = MAML(model, make_inner(inner, w.inner_lr), inner_steps=w.inner_steps, loss_fn=w.loss_fn,
                vectorize=False)
    amp = (lambda: torch.autocast(dev, dtype=dtype)) if policy != "fp32" else contextlib.nullcontext
    if policy in ("fp32", "engine", "engine-norm32"):
        hooks = _norm_inputs_fp32(model) if policy == "engine-norm32" else contextlib.nullcontext()
        with hooks, amp():
            maml.meta_loss(batch, before=False, backward=True)
        return _grads(model)
    # "autocast" / "autocast-loss32": a hand-written per-task loop entirely under autocast.
    (xs, ys), (xq, yq) = batch
    T = xs.shape[0]
    params0: dict[str, Tensor] = dict(model.named_parameters())
    opt = make_inner(inner, w.inner_lr)
    cast = (lambda out: out) if policy == "autocast" else (lambda out: out.float())
    with amp():
        for t in range(T):
            params = params0
            state = opt.init(params)
            for _ in range(w.inner_steps):
                loss = w.loss_fn(cast(torch.func.functional_call(model, params, (xs[t],))), ys[t])
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params, state = opt.step(params, dict(zip(params, grads)), state)
            loss = w.loss_fn(cast(torch.func.functional_call(model, params, (xq[t],))), yq[t])
            (loss / T).backward()
    return _grads(model)


def _grads(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every parameter's ``.grad`` after the meta-backward."""
    out: dict[str, Tensor] = {}
    for k, p in model.named_parameters():
        if p.grad is None:
            raise ValueError(f"parameter {k!r} received no meta-gradient (its .grad is None)")
        out[k] = p.grad.detach().clone()
    return out


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def compare(g: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, Any]:
    """Cosine and relative error over all parameters; per layer the same (``None`` for a
    layer whose reference gradient is zero); the worst layer's cosine and relative error."""
    flat = torch.cat([g[k].double().flatten() for k in ref])
    flat_ref = torch.cat([ref[k].double().flatten() for k in ref])
    scale = max(float(r.double().norm()) for r in ref.values())
    layers: dict[str, dict[str, float | None]] = {}
    for k in ref:
        r = ref[k].double()
        if float(r.norm()) <= 1e-9 * scale:  # zero in float64 (up to rounding): no direction
            layers[k] = {"cosine": None, "rel_err": None}
        else:
            layers[k] = {"cosine": _cos(g[k], r), "rel_err": float((g[k].double() - r).norm() / r.norm())}
    valid = [v for v in layers.values() if v["cosine"] is not None]
    return {"cosine": _cos(flat, flat_ref),
            "rel_err": float((flat - flat_ref).norm() / flat_ref.norm()),
            "min_layer_cosine": min(v["cosine"] for v in valid),  # type: ignore[type-var]
            "max_layer_rel_err": max(v["rel_err"] for v in valid),  # type: ignore[type-var]
            "layers": layers}


def _double(t: Tensor) -> Tensor:
    return t.double() if t.is_floating_point() else t


def fidelity(w: Workload, policies: Sequence[str] = POLICIES, dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu", seed: int = 0, batch: TaskBatch | None = None,
             inner: str = "sgd") -> list[dict[str, Any]]:
    """One row per policy: ``{"policy", "dtype", "cosine", "rel_err", "min_layer_cosine",
    "max_layer_rel_err", "layers"}`` against the float64 meta-gradient. ``batch``: a real
    meta-batch (float32, on ``device``); default the workload's random one."""
    model = make_model(w, seed=seed, device=device)
    batch = batch if batch is not None else make_batch(w, seed=seed, device=device)
    (xs, ys), (xq, yq) = batch
    b64 = TaskBatch((_double(xs), _double(ys)), (_double(xq), _double(yq)))
    ref = meta_gradient(copy.deepcopy(model).double(), w, b64, "fp32", dtype, inner)
    rows = []
    for policy in policies:
        g = meta_gradient(model, w, batch, policy, dtype, inner)
        rows.append({"policy": policy, "dtype": str(dtype).replace("torch.", "") if policy != "fp32" else "float32",
                     **compare(g, ref)})
    return rows
