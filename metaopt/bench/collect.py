"""The measure step of ``metaopt bench``: run a :class:`~metaopt.bench.plan.Plan` and
return the raw result dict (JSON-ready) that the report step renders.

Order: implementations' availability, the float64 meta-gradient guard, the speed table
(interleaved timing per case), peak memory per case, the inner-optimizer memory report,
meta-gradient fidelity of the 16-bit precisions, cost curves, the rematerialisation table.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from metaopt.bench.impls import IMPLS, get_impls
from metaopt.bench.plan import Plan
from metaopt.bench.workloads import Case

__all__ = ["collect"]

Log = Callable[[str], None]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _peak_tflops(plan: Plan) -> tuple[float | None, str]:
    """The arithmetic floor's peak and where it comes from: --peak-tflops, a known CUDA
    device's datasheet figure, else measured; none with --no-flops."""
    if plan.peak_tflops is not None:
        return plan.peak_tflops, "--peak-tflops"
    if not plan.flops:
        return None, "not used (--no-flops)"
    if plan.device.type == "cuda":
        from metaopt.bench.report import PEAK_TFLOPS

        name = torch.cuda.get_device_name(plan.device)
        for key, v in PEAK_TFLOPS.items():
            if key in name:
                return v, f"FP32 datasheet peak of {key}"
    from metaopt.bench.measure import measure_peak_tflops

    return measure_peak_tflops(plan.device)


def _speed(plan: Plan, impls: list[Any], peers: list[dict[str, Any]], failed: set[str], peak: float | None,
           log: Log, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from metaopt.bench.measure import MetaIteration, build_iteration, count_flops, summarize, time_interleaved
    from metaopt.bench.workloads import make_batch, make_model

    device, flops_of = plan.device, {}
    for case in plan.cases:
        w = case.workload
        iterations = plan.iterations[w.id]
        if plan.flops and (w.id, case.order) not in flops_of:
            flops_of[w.id, case.order] = count_flops(
                build_iteration(IMPLS["plain"](), Case(w, "sgd", case.order), device, plan.seed))
        flops = flops_of.get((w.id, case.order))
        log(f"{case.label}: {iterations} meta-iteration(s) x {plan.repeats} repeats")
        rows, its = [], {}
        model = make_model(w, seed=plan.seed, device=device)
        batch = make_batch(w, seed=plan.seed, device=device)
        for impl, p in zip(impls, peers):
            row = {"impl": impl.key, "name": impl.name, "is_metaopt": impl.is_metaopt, "note": impl.note,
                   "check_failed": impl.key in failed,
                   "precision": case.precision if impl.is_metaopt else "fp32"}
            reason = p["reason"] or impl.unsupported(case)
            if reason:
                row.update(status="n/a" if p["reason"] is None else "unavailable", reason=reason)
            else:
                try:
                    its[impl.key] = MetaIteration(impl, case, model, batch, device)
                    row["status"] = "ok"
                except NotImplementedError as e:  # a combination this implementation cannot run
                    row.update(status="n/a", reason=str(e))
                except Exception as e:  # noqa: BLE001 - reported in the table
                    row.update(status="error", reason=f"error: {type(e).__name__}: {e}")
            rows.append(row)
        times: dict[str, list[float]] = {}
        done: int | None = None  # repeats every implementation finished, when interrupted
        try:
            time_interleaved(its, plan.repeats, plan.warmup, iterations, log, times=times)
        except KeyboardInterrupt:  # keep the repeats every implementation finished, then stop
            done = min((len(v) for v in times.values()), default=0)
            times = {k: v[:done] for k, v in times.items()} if done else {}
        except Exception as e:  # noqa: BLE001
            times = {}
            for row in rows:
                if row["status"] == "ok":
                    row.update(status="error", reason=f"error while timing: {type(e).__name__}: {e}")
        del its
        for row in rows:
            if row["status"] == "ok" and row["impl"] in times:
                row["seconds"] = times[row["impl"]]
                row["meta_it_s"] = summarize(times[row["impl"]])
                row["tasks_s"] = row["meta_it_s"]["median"] * w.meta_batch
        entry = {"workload": w.id, "inner": case.inner, "order": case.order, "precision": case.precision,
                 "meta_batch": w.meta_batch, "iterations": iterations, "flops": flops, "rows": rows}
        if flops and peak:
            entry["floor_tasks_s"] = w.meta_batch / (flops / (peak * 1e12))
        if done is not None:
            if done:  # a case with at least one whole repeat is reported, saying how many
                entry["repeats_done"] = done
                out.append(entry)
            raise KeyboardInterrupt
        out.append(entry)
    return out


def _memory(plan: Plan, cases: list[dict[str, Any]], log: Log) -> None:
    from metaopt.bench.measure import memory_in_subprocess, memory_inline

    for c, case in zip(cases, plan.cases):
        for row in c["rows"]:
            if row["status"] != "ok":
                continue
            log(f"memory: {case.label} {row['impl']}")
            try:
                if plan.memory == "inline":
                    row["memory"] = memory_inline(IMPLS[row["impl"]](), case, plan.device, plan.memory_iterations,
                                                  plan.seed)
                else:
                    row["memory"] = memory_in_subprocess(row["impl"], case, plan.device, plan.memory_iterations,
                                                         plan.seed, torch.get_num_threads())
            except Exception as e:  # noqa: BLE001
                row["memory"] = {"error": f"{type(e).__name__}: {e}"}


def _fidelity(plan: Plan, log: Log) -> list[dict[str, Any]]:
    from metaopt.bench.fidelity import POLICIES, fidelity

    rows = []
    for wid in plan.fidelity:
        w = next(x for x in plan.workloads if x.id == wid)
        for prec in plan.fidelity_precisions:
            log(f"fidelity: {wid} {prec} vs float64")
            dtype = torch.bfloat16 if prec == "bf16" else torch.float16
            for r in fidelity(w, POLICIES, dtype=dtype, device=plan.device, seed=plan.seed):
                rows.append({"workload": wid, "precision": prec, "data": "random data with the real shapes",
                             **r})
    return rows


def collect(plan: Plan, log: Log = lambda s: None, res: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``plan``; return the result dict (``meta``, ``peers``, ``check``, ``cases``,
    and when planned ``memory_report``, ``state_sizes``, ``fidelity``, ``curves``, ``remat``).

    ``res``: a dict to fill in place (and return), so that a caller interrupted half way
    (Ctrl-C, ``timeout --signal=INT``) can still report the parts already measured."""
    from metaopt.bench.check import check_meta_gradients

    t_start = time.time()
    device = plan.device
    impls = get_impls(plan.impls)
    peers = []
    for i in impls:
        reason = i.unavailable()
        peers.append({"key": i.key, "name": i.name, "reason": reason, "note": i.note, "is_metaopt": i.is_metaopt})
        log(f"{i.name}: {'available' if reason is None else reason}")
    check = None
    if plan.check and plan.cases:
        log("checking meta-gradients against the plain loop (float64, tiny S1/O1)")
        inners = tuple(dict.fromkeys(c.inner for c in plan.cases))
        orders = tuple(dict.fromkeys(c.order for c in plan.cases))
        check = [asdict(c) for c in check_meta_gradients(impls, inners=inners, orders=orders)]
    failed = {c["impl"] for c in (check or []) if not c["ok"]}
    peak, peak_source = _peak_tflops(plan)
    mem_method = {"subprocess": "peak RSS (VmHWM) of a fresh process per case" if device.type == "cpu"
                  else "torch.cuda.max_memory_allocated in a fresh process per case",
                  "inline": "measured inside the benchmark process (under-reports on CPU)",
                  "off": "not measured"}[plan.memory]
    res = {} if res is None else res
    res.update({
        "meta": {
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": _device_name(device), "threads": torch.get_num_threads(),
            "repeats": plan.repeats, "warmup": plan.warmup, "tiny": plan.tiny, "seed": plan.seed,
            "memory": plan.memory, "memory_method": mem_method, "memory_iterations": plan.memory_iterations,
            "peak_tflops": peak, "peak_source": peak_source, "workloads": [w.describe() for w in plan.workloads],
            "precisions": list(dict.fromkeys(c.precision for c in plan.cases)),
            "targets_source": plan.targets_source, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "peers": peers, "check": check, "cases": [],
    })
    _speed(plan, impls, peers, failed, peak, log, res["cases"])
    if plan.memory != "off":
        _memory(plan, res["cases"], log)
    if plan.memory_report:
        from metaopt.bench.memreport import peak_memory_report, state_sizes

        res["state_sizes"] = state_sizes()
        if plan.memory != "off":
            res["memory_report"] = peak_memory_report(str(device), plan.memory, plan.tiny, torch.get_num_threads(),
                                                      log=log)
    if plan.fidelity and plan.fidelity_precisions:
        res["fidelity"] = _fidelity(plan, log)
    if plan.curves and plan.curve_workload is not None:
        from metaopt.bench.curves import cost_curves

        log(f"cost curves on {plan.curve_workload.describe()}")
        res["curves"] = {"workload": plan.curve_workload.describe()}
        cost_curves(plan.curve_workload, plan.curves, plan.curve_impls, device, repeats=min(plan.repeats, 3),
                    warmup=plan.warmup, memory=plan.memory, seed=plan.seed, log=log, out=res["curves"])
    if plan.remat_steps and plan.remat_workload is not None:
        from metaopt.bench.curves import remat_table

        log(f"rematerialisation table on {plan.remat_workload.describe()}")
        res["meta"]["remat_workload"] = plan.remat_workload.describe()
        res["remat"] = []
        remat_table(plan.remat_workload, plan.remat_steps, device, plan.remat_every,
                    peers=[k for k in plan.curve_impls if not k.startswith("metaopt")], repeats=min(plan.repeats, 3),
                    warmup=plan.warmup, memory=plan.memory, seed=plan.seed, log=log, out=res["remat"])
    res["meta"]["seconds"] = round(time.time() - t_start, 1)
    return res
