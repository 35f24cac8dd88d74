"""Inner-optimizer memory: peak memory of 5-step second-order adaptation (S5 / O5) with
SGD, Adafactor, and full-second-moment optimizers, and each optimizer's state size.

"Full second moment" is measured two ways: ``Adafactor(factored=False)`` (metaopt's own
Adafactor keeping ``V`` per element, no first moment) and :class:`FunctionalAdam` (a minimal
differentiable Adam written for this report: first and second moment per element).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves

from metaopt.bench.impls import IMPLS
from metaopt.bench.measure import memory_in_subprocess, memory_inline
from metaopt.bench.workloads import WORKLOADS, Case, Workload, make_inner, make_model, tiny

__all__ = ["MEMORY_INNERS", "state_sizes", "peak_memory_report"]

#: inner optimizer -> description for the table
MEMORY_INNERS = {
    "sgd": "SGD (no state)",
    "adafactor": "Adafactor (factored second moment)",
    "adafactor_full": "Adafactor(factored=False) (full second moment)",
    "adam": "Adam, bench's FunctionalAdam (full first + second moment)",
}


def state_sizes(models: dict[str, torch.nn.Module] | None = None) -> list[dict[str, Any]]:
    """Elements and bytes of ``opt.init(params)`` for each inner optimizer and model."""
    if models is None:
        models = {
            "MLP 1-40-40-1": make_model(WORKLOADS["S1"]),
            "Conv4 5-way": make_model(WORKLOADS["O1"]),
            "Conv4 20-way": make_model(WORKLOADS["O5"]),
        }
    rows = []
    for mname, model in models.items():
        params = {k: p.detach() for k, p in model.named_parameters()}
        n_params = sum(p.numel() for p in params.values())
        b_params = sum(p.numel() * p.element_size() for p in params.values())
        for inner in MEMORY_INNERS:
            leaves = [x for x in tree_leaves(make_inner(inner, 0.1).init(params)) if isinstance(x, torch.Tensor)]
            rows.append({
                "model": mname, "inner": inner, "param_elements": n_params, "param_bytes": b_params,
                "state_elements": sum(x.numel() for x in leaves),
                "state_bytes": sum(x.numel() * x.element_size() for x in leaves),
            })
    return rows


def peak_memory_report(device: str, memory: str, use_tiny: bool, threads: int | None,
                       impls: tuple[str, ...] = ("metaopt-vmap", "metaopt-loop"),
                       workloads: tuple[str, ...] = ("S5", "O5"),
                       log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Peak memory of one second-order meta-iteration of S5 and O5 (5 inner steps)."""
    rows = []
    for wid in workloads:
        w: Workload = tiny(WORKLOADS[wid]) if use_tiny else WORKLOADS[wid]
        for key in impls:
            impl = IMPLS[key]()
            if impl.unavailable():
                continue
            for inner in MEMORY_INNERS:
                case = Case(w, inner, "second")
                log(f"  memory report: {wid} {key} {inner}")
                try:
                    if memory == "inline":
                        m = memory_inline(impl, case, device)
                    else:
                        m = memory_in_subprocess(key, case, device, threads=threads)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    m = {"error": f"{type(e).__name__}: {e}"}
                rows.append({"workload": wid, "impl": key, "inner": inner, **m})
    return rows
