"""Cost curves: time and peak memory of one meta-iteration as one size varies (inner steps,
meta-batch size, model), for metaopt and the peers; and the rematerialisation table
(second-order memory against inner steps, plain unroll vs ``MAML(checkpoint_every=k)``).

Each point is a :class:`~metaopt.bench.workloads.Case` derived from a base workload with
:func:`dataclasses.replace`; implementations are timed interleaved at each point (median
of the repeats) and their peak memory is measured like the main table's (a fresh process
per point on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

Example:
    >>> from metaopt.bench.curves import curve_points
    >>> from metaopt.bench.workloads import WORKLOADS
    >>> [(label, c.workload.inner_steps) for label, c in curve_points(WORKLOADS["O1"], "steps", [1, 2])]
    [('1', 1), ('2', 2)]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from metaopt.bench.impls import IMPLS
from metaopt.bench.measure import MetaIteration, memory_in_subprocess, memory_inline, time_interleaved
from metaopt.bench.workloads import Case, Workload, make_batch, make_model

__all__ = ["CURVES", "curve_points", "measure_points", "cost_curves", "remat_table", "default_every"]

#: what a curve varies: name -> Workload field
CURVES = {"steps": "inner_steps", "batch": "meta_batch", "model": "model"}


def curve_points(base: Workload, curve: str, values: Sequence[Any], inner: str = "sgd",
                 order: str = "second") -> list[tuple[str, Case]]:
    """``(label, case)`` per value of ``curve`` (a key of :data:`CURVES`)."""
    if curve not in CURVES:
        raise ValueError(f"curve should be one of {', '.join(CURVES)} but is: {curve!r}")
    return [(str(v), Case(replace(base, **{CURVES[curve]: v}), inner, order)) for v in values]


def measure_points(points: Sequence[tuple[Any, ...]], impl_keys: Sequence[str], device: torch.device, *,
                   repeats: int = 3, warmup: int = 1, memory: str = "subprocess", seed: int = 0,
                   interleave_points: bool = False, log: Callable[[str], None] = lambda s: None,
                   out: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per (point, implementation): seconds per meta-iteration (median) and peak
    memory, or the reason it did not run; appended to ``out`` point by point. A point is
    ``(label, case)``, or ``(label, case, impl_keys)`` to run other implementations there.

    The implementations of a point are timed interleaved (repeat by repeat); with
    ``interleave_points`` every point's are timed together, so that ratios between points
    (a plain against a checkpointed unroll) are measured side by side as well."""
    rows = [] if out is None else out
    groups = [points] if interleave_points else [[p] for p in points]
    for group in groups:
        its: dict[tuple[str, str], MetaIteration] = {}
        group_rows: dict[tuple[str, str], tuple[Case, dict[str, Any]]] = {}  # (label, impl) -> case, row
        for label, case, *own in group:
            keys = own[0] if own else impl_keys
            try:
                model = make_model(case.workload, seed=seed, device=device)
                batch = make_batch(case.workload, seed=seed, device=device)
            except Exception as e:  # noqa: BLE001 - e.g. a model this metaopt lacks: reported
                for key in keys:
                    rows.append({"point": label, "impl": key, "case": case.label, "error": f"{type(e).__name__}: {e}"})
                continue
            for key in keys:
                impl = IMPLS[key]()
                row: dict[str, Any] = {"point": label, "impl": key, "name": impl.name, "case": case.label}
                reason = impl.unavailable() or impl.unsupported(case)
                if reason:
                    row["error"] = reason
                else:
                    try:
                        its[(label, key)] = MetaIteration(impl, case, model, batch, device)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {e}"
                group_rows[(label, key)] = (case, row)
            log(f"  point {label}: {case.label}")
        try:
            times = time_interleaved(its, repeats, warmup, 1)
        except Exception as e:  # noqa: BLE001
            times = {}
            for ident in its:
                group_rows[ident][1]["error"] = f"{type(e).__name__} while timing: {e}"
        del its
        for ident, (case, row) in group_rows.items():
            if ident in times:
                key = ident[1]
                row["seconds"] = statistics.median(times[ident])
                if memory != "off":
                    try:
                        m = (memory_inline(IMPLS[key](), case, device, 1, seed) if memory == "inline"
                             else memory_in_subprocess(key, case, device, 1, seed, torch.get_num_threads()))
                    except Exception as e:  # noqa: BLE001
                        m = {"error": f"{type(e).__name__}: {e}"}
                    row.update(m if "peak_bytes" in m else {"memory_error": m.get("error")})
            rows.append(row)
    return rows


def cost_curves(base: Workload, curves: Mapping[str, Sequence[Any]], impl_keys: Sequence[str], device: torch.device,
                out: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """``{curve: rows}`` for each requested curve (see :func:`measure_points`), filled into
    ``out`` curve by curve."""
    out = {} if out is None else out
    for name, values in curves.items():
        out[name] = []
        measure_points(curve_points(base, name, values), impl_keys, device, out=out[name], **kw)
    return out


def default_every(steps: int) -> int:
    """Segment length that minimises the checkpointed unroll's memory: about ``sqrt(steps)``."""
    return max(1, round(math.sqrt(steps)))


def remat_table(base: Workload, steps: Sequence[int], device: torch.device, every: int | None = None,
                peers: Sequence[str] = ("higher", "torchopt"), out: list[dict[str, Any]] | None = None,
                **kw: Any) -> list[dict[str, Any]]:
    """Second-order memory and time against inner steps: metaopt's plain unroll, metaopt
    with ``checkpoint_every`` (``every``, default :func:`default_every`), and ``peers``;
    rows appended to ``out`` step count by step count."""
    rows = [] if out is None else out
    for n in steps:
        w = replace(base, inner_steps=n)
        k = every or default_every(n)
        # One interleaved timing for the plain unroll, the peers and the checkpointed unroll:
        # the time ratio is measured side by side. (The peers have no checkpointed variant.)
        measured = measure_points([(str(n), Case(w, "sgd", "second")),
                                   (f"{n}-remat", Case(w, "sgd", "second", checkpoint_every=k), ["metaopt-loop"])],
                                  ["metaopt-loop", *peers], device, interleave_points=True, **kw)
        for r in measured:
            if r["point"].endswith("-remat"):
                r["point"], r["row"], r["every"] = str(n), "metaopt checkpointed", k
            else:
                r["row"] = "metaopt plain unroll" if r["impl"] == "metaopt-loop" else r.get("name", r["impl"])
        rows += [{"steps": n, **r} for r in measured]
    return rows
