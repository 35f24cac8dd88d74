"""Markdown tables and target checks from the benchmark's result dict (see ``run``)."""

from __future__ import annotations

from typing import Any

__all__ = ["targets", "to_markdown", "PEAK_TFLOPS"]

#: FP32 (non-tensor-core) peak TFLOP/s by device-name substring, for the arithmetic floor
#: on CUDA when --peak-tflops is not given. Vendor datasheet figures (SXM parts).
PEAK_TFLOPS = {"H200": 67.0, "H100 PCIe": 51.0, "H100": 67.0, "A100": 19.5, "L40S": 91.6, "L4": 30.3,
               "A10G": 31.2, "V100": 15.7, "T4": 8.1}

MiB = 2**20
KiB = 2**10
#: Peak-memory deltas below this are page-level noise (allocator reuse), not a measurement.
MIN_RESOLVABLE = 256 * KiB


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _mib(row: dict[str, Any]) -> str:
    mem = row.get("memory") or {}
    if "peak_bytes" in mem:
        return _mib_str(mem["peak_bytes"])
    if "error" in mem:
        return f"error: {mem['error']}"
    return "–"


def _mib_str(nbytes: float) -> str:
    mib = nbytes / MiB
    return f"{mib:,.1f}" if mib >= 10 else f"{mib:.3f}"


def _rows_ok(case: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in case["rows"] if r["status"] == "ok"]


def fastest_peer(case: dict[str, Any]) -> dict[str, Any] | None:
    peers = [r for r in _rows_ok(case) if not r["is_metaopt"]]
    return max(peers, key=lambda r: r["meta_it_s"]["median"]) if peers else None


def best_metaopt(case: dict[str, Any]) -> dict[str, Any] | None:
    ours = [r for r in _rows_ok(case) if r["is_metaopt"]]
    return max(ours, key=lambda r: r["meta_it_s"]["median"]) if ours else None


def _find(res: dict[str, Any], wid: str, inner: str, order: str) -> dict[str, Any] | None:
    for c in res["cases"]:
        if c["workload"] == wid and c["inner"] == inner and c["order"] == order:
            return c
    return None


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each ``{"target", "status": met|not met|not measured, "detail"}``."""
    out: list[dict[str, Any]] = []
    cuda = res["meta"]["device"].startswith("cuda")
    need = 5.0 if cuda else 2.0
    o1 = _find(res, "O1", "sgd", "second")
    name = f"O1 (SGD, second order) tasks/s >= {need:g}x the fastest peer ({'GPU' if cuda else 'CPU'})"
    if o1 is None or best_metaopt(o1) is None or fastest_peer(o1) is None:
        out.append({"target": name, "status": "not measured", "detail": "run with --workloads O1"})
    else:
        ours, peer = best_metaopt(o1), fastest_peer(o1)
        ratio = ours["tasks_s"] / peer["tasks_s"]
        detail = (f"{ours['name']} {ours['tasks_s']:.3g} tasks/s vs {peer['name']} "
                  f"{peer['tasks_s']:.3g} tasks/s: {ratio:.2f}x")
        if o1.get("floor_tasks_s"):
            floor = o1["floor_tasks_s"]
            detail += (f"; arithmetic floor {floor:.4g} tasks/s: ours at {ours['tasks_s'] / floor:.1%} of it, "
                       f"{peer['name']} at {peer['tasks_s'] / floor:.1%}; {need:g}x the fastest peer "
                       f"would be {need * peer['tasks_s'] / floor:.1%} of the floor")
        out.append({"target": name, "status": "met" if ratio >= need else "not met", "detail": detail})

    # Adafactor time: metaopt's best row per workload/order, Adafactor vs SGD.
    lines, ok_all, any_ = [], True, False
    for c in res["cases"]:
        if c["inner"] != "adafactor":
            continue
        s = _find(res, c["workload"], "sgd", c["order"])
        a_best, s_best = best_metaopt(c), best_metaopt(s) if s else None
        if a_best is None or s_best is None:
            continue
        for key in ("metaopt-vmap", "metaopt-loop"):
            a = next((r for r in _rows_ok(c) if r["impl"] == key), None)
            b = next((r for r in _rows_ok(s) if r["impl"] == key), None)
            if a and b:
                r = b["meta_it_s"]["median"] / a["meta_it_s"]["median"]
                lines.append(f"{c['workload']} {c['order']} {key}: {r:.2f}x")
        r_best = s_best["meta_it_s"]["median"] / a_best["meta_it_s"]["median"]
        lines.append(f"**{c['workload']} {c['order']} best: {r_best:.2f}x**")
        any_ = True
        ok_all &= r_best <= 1.2
    out.append({"target": "Adafactor inner time <= 1.2x SGD inner (metaopt, best of vectorised/loop)",
                "status": ("met" if ok_all else "not met") if any_ else "not measured",
                "detail": "; ".join(lines) if lines else "run with --inner sgd adafactor"})

    # Adafactor memory, from the memory report (5-step second order).
    lines, ok_all, any_ = [], True, False
    mem = [r for r in res.get("memory_report", []) if "peak_bytes" in r]
    for wid in ("S5", "O5"):
        for key in ("metaopt-vmap", "metaopt-loop"):
            got = {r["inner"]: r["peak_bytes"] for r in mem if r["workload"] == wid and r["impl"] == key}
            if "sgd" in got and "adafactor" in got and max(got["sgd"], got["adafactor"]) < MIN_RESOLVABLE:
                # A few pages of RSS: allocator reuse decides these, not the optimizer.
                lines.append(f"{wid} {key}: below resolution ({got['adafactor'] / KiB:.0f} vs "
                             f"{got['sgd'] / KiB:.0f} KiB; not counted)")
            elif "sgd" in got and "adafactor" in got and got["sgd"] > 0:
                r = got["adafactor"] / got["sgd"]
                lines.append(f"{wid} {key}: {r:.2f}x ({got['adafactor'] / MiB:.1f} vs {got['sgd'] / MiB:.1f} MiB)")
                any_ = True
                ok_all &= r <= 1.3
    out.append({"target": "Adafactor inner peak memory <= 1.3x SGD's (5-step second order)",
                "status": ("met" if ok_all else "not met") if any_ else "not measured",
                "detail": "; ".join(lines) if lines else "memory report not run"})
    return out


def to_markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    L: list[str] = ["# metaopt bench", ""]
    L.append(f"torch {m['torch']}, device `{m['device']}` ({m['device_name']}), {m['threads']} threads, "
             f"repeats {m['repeats']} (interleaved), warmup {m['warmup']}, {'tiny sizes, ' if m['tiny'] else ''}"
             f"float32, seed {m['seed']}. Memory: {m['memory_method']}.")
    L.append("")
    L.append("Workloads: " + "; ".join(m["workloads"]) + ". One meta-iteration = adapt every task, "
             "query losses, backward, outer Adam step. Random data with the real shapes.")
    if m.get("peak_tflops"):
        L.append("")
        L.append(f"Arithmetic floor: the case's FLOPs (convolutions and matmuls, every backward) at "
                 f"{m['peak_tflops']:.3g} TFLOP/s ({m.get('peak_source', 'peak')}).")
    L.append("")
    L.append("## Implementations")
    L.append("")
    L.append("| implementation | status | note |")
    L.append("|---|---|---|")
    for p in res["peers"]:
        L.append(f"| {p['name']} | {'available' if p['reason'] is None else p['reason']} | {p['note']} |")
    L.append("")
    if res.get("check") is not None:
        bad = [c for c in res["check"] if not c["ok"]]
        L.append("## Correctness guard (float64 meta-gradients, tiny S1/O1, 2 inner steps)")
        L.append("")
        if not res["check"]:
            L.append("nothing to compare")
        elif not bad:
            worst = max(c["max_abs_diff"] for c in res["check"])
            impls = sorted({c["impl"] for c in res["check"]})
            L.append(f"all {len(res['check'])} comparisons match (max abs diff {worst:.1e}): "
                     + ", ".join(impls) + " vs the plain loop (SGD) / metaopt loop (Adafactor).")
        else:
            L.append("**MISMATCH** — these rows do not compute the same meta-gradient:")
            for c in bad:
                L.append(f"- {c['impl']} on {c['case']}: max abs diff {c['max_abs_diff']:.3g} vs {c['reference']}")
        L.append("")
    L.append("## Speed and memory")
    L.append("")
    L.append("meta-it/s: median over repeats (min–max in the JSON); ×peer: meta-it/s over the fastest "
             "non-metaopt implementation of the same case; peak MiB: peak memory of "
             f"{m['memory_iterations']} meta-iteration(s) above the process's memory before it.")
    for c in res["cases"]:
        L.append("")
        head = f"### {c['workload']} · {c['inner']} inner · {c['order']} order"
        if c.get("flops"):
            head += f" — {c['flops'] / 1e9:.3g} GFLOP/meta-it"
            if c.get("floor_tasks_s"):
                head += f", floor {c['floor_tasks_s']:.4g} tasks/s at {m['peak_tflops']:g} TFLOP/s"
        L.append(head)
        L.append("")
        L.append("| implementation | meta-it/s | tasks/s | ×peer | GFLOP/s | peak MiB | note |")
        L.append("|---|---:|---:|---:|---:|---:|---|")
        peer = fastest_peer(c)
        for r in c["rows"]:
            if r["status"] != "ok":
                L.append(f"| {r['name']} | {r['reason']} | | | | | |")
                continue
            rate = r["meta_it_s"]["median"]
            x = f"{rate / peer['meta_it_s']['median']:.2f}" if peer else "–"
            gf = f"{c['flops'] * rate / 1e9:.3g}" if c.get("flops") else "–"
            note = r.get("note", "")
            if r.get("check_failed"):
                note = ("**meta-gradient MISMATCH** " + note).strip()
            L.append(f"| {r['name']} | {_fmt(rate)} | {_fmt(r['tasks_s'])} | {x} | {gf} | {_mib(r)} | {note} |")
    if res.get("memory_report"):
        L.append("")
        L.append("## Inner-optimizer memory: one 5-step second-order meta-iteration")
        L.append("")
        L.append("\"Full second moment\": `Adafactor(factored=False)` (metaopt) and a minimal "
                 "functional Adam written in `metaopt/bench/workloads.py` (first + second moment).")
        L.append("")
        L.append("| workload | implementation | inner | peak MiB | ×SGD |")
        L.append("|---|---|---|---:|---:|")
        for r in res["memory_report"]:
            sgd = next((s for s in res["memory_report"] if s["workload"] == r["workload"]
                        and s["impl"] == r["impl"] and s["inner"] == "sgd"), None)
            ratio = (f"{r['peak_bytes'] / sgd['peak_bytes']:.2f}"
                     if "peak_bytes" in r and sgd and sgd.get("peak_bytes") else "–")
            peak = _mib_str(r["peak_bytes"]) if "peak_bytes" in r else f"error: {r.get('error')}"
            L.append(f"| {r['workload']} | {r['impl']} | {r['inner']} | {peak} | {ratio} |")
    if res.get("state_sizes"):
        L.append("")
        L.append("## Inner-optimizer state size (`opt.init(params)`, float32)")
        L.append("")
        L.append("| model | params (elements) | inner | state elements | state bytes | state / params |")
        L.append("|---|---:|---|---:|---:|---:|")
        for r in res["state_sizes"]:
            L.append(f"| {r['model']} | {r['param_elements']:,} | {r['inner']} | {r['state_elements']:,} | "
                     f"{r['state_bytes']:,} | {r['state_elements'] / r['param_elements']:.2f} |")
    L.append("")
    L.append("## Targets")
    L.append("")
    for t in res["targets"]:
        L.append(f"- **{t['status']}** — {t['target']}: {t['detail']}")
    L.append("")
    return "\n".join(L)
