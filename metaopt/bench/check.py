"""The benchmark's honesty guard: every implementation's meta-gradient equals the plain
PyTorch loop's, in float64, on tiny versions of the workloads (2 inner steps, so the
multi-step path is covered), in second and first order.

SGD cases compare against the plain loop; Adafactor cases (which only metaopt, and higher
through ``metaopt.integrations.higher``, can run) compare against metaopt's per-task loop,
whose Adafactor has its own step-by-step parity tests against ``torch.optim.Adafactor``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from metaopt.bench.impls import Impl
from metaopt.bench.workloads import WORKLOADS, Case, Workload, make_batch, make_model

__all__ = ["CheckResult", "check_meta_gradients", "check_workloads"]


@dataclass
class CheckResult:
    impl: str
    case: str
    reference: str
    max_abs_diff: float
    ok: bool


def check_workloads() -> list[Workload]:
    """Tiny float64 versions of S1 (3 tasks) and O1 (2 tasks, 8 filters), 2 inner steps."""
    s = replace(WORKLOADS["S1"], meta_batch=3, shots=5, queries=5, inner_steps=2)
    o = replace(WORKLOADS["O1"], meta_batch=2, queries=2, inner_steps=2, hidden=8)
    return [s, o]


def _meta_grad(impl: Impl, model: torch.nn.Module, case: Case, batch) -> list[torch.Tensor]:
    model = copy.deepcopy(model)
    fn = impl.build(model, case)
    fn(batch)
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def check_meta_gradients(impls: list[Impl], workloads: list[Workload] | None = None,
                         inners: tuple[str, ...] = ("sgd", "adafactor"),
                         orders: tuple[str, ...] = ("second", "first"),
                         rtol: float = 1e-7, atol: float = 1e-10) -> list[CheckResult]:
    """Compare each usable implementation's meta-gradient to the reference (see module doc).

    Returns one :class:`CheckResult` per (implementation, case) that ran; implementations
    that are unavailable or don't support a case are left out (the table says why).
    """
    by_key = {i.key: i for i in impls}
    usable = [i for i in impls if i.unavailable() is None]
    results: list[CheckResult] = []
    for w in workloads or check_workloads():
        model = make_model(w, seed=1, dtype=torch.float64)
        batch = make_batch(w, seed=1, dtype=torch.float64)
        for inner in inners:
            for order in orders:
                case = Case(w, inner, order)
                ref_key = "plain" if inner == "sgd" else "metaopt-loop"
                ref_impl = by_key.get(ref_key)
                if ref_impl is None:
                    from metaopt.bench.impls import IMPLS

                    ref_impl = IMPLS[ref_key]()
                if ref_impl.unavailable() or ref_impl.unsupported(case):
                    continue
                ref = _meta_grad(ref_impl, model, case, batch)
                for impl in usable:
                    if impl.key == ref_key or impl.unsupported(case):
                        continue
                    got = _meta_grad(impl, model, case, batch)
                    diff = max(float((a - b).abs().max()) for a, b in zip(got, ref))
                    ok = all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(got, ref))
                    results.append(CheckResult(impl.key, f"{w.id}-tiny {inner} {order}", ref_key, diff, ok))
    return results
