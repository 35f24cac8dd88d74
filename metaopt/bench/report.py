"""The report step: markdown tables, plots and target checks from the benchmark's result
dict (see :func:`metaopt.bench.run`). The targets themselves are data, not code: a YAML
file given with ``--targets`` (the project's are in experiments/bench_targets.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["targets", "load_targets", "to_markdown", "plot", "PEAK_TFLOPS"]

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


def _find(res: dict[str, Any], wid: str, inner: str, order: str, precision: str = "fp32") -> dict[str, Any] | None:
    for c in res["cases"]:
        if (c["workload"] == wid and c["inner"] == inner and c["order"] == order
                and c.get("precision", "fp32") == precision):
            return c
    return None


def load_targets(path: str | Path) -> list[dict[str, Any]]:
    """The acceptance targets from a YAML file: a list of ``{kind, name?, device?, ...}``
    (see experiments/bench_targets.yaml); an unknown kind is an error naming it."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    items = spec.get("targets") if isinstance(spec, dict) else spec
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of targets under 'targets:' but got {type(items).__name__}")
    for t in items:
        if not isinstance(t, dict) or t.get("kind") not in _KINDS:
            raise ValueError(f"{path}: target kind should be one of {', '.join(_KINDS)} but is: "
                             f"{t.get('kind') if isinstance(t, dict) else t!r}")
    return items


def _speed_vs_peer(res: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    """Best metaopt row over the fastest peer of one case (tasks/s), optionally peak memory."""
    wid, inner, order, prec = t["workload"], t.get("inner", "sgd"), t.get("order", "second"), t.get("precision", "fp32")
    need = float(t["min"])
    name = t.get("name") or f"{wid} ({inner}, {order} order, {prec}) tasks/s >= {need:g}x the fastest peer"
    c = _find(res, wid, inner, order, prec)
    ours = best_metaopt(c) if c is not None else None
    peer = fastest_peer(c) if c is not None else None
    if c is None or ours is None or peer is None:
        return {"target": name, "status": "not measured",
                "detail": f"run with --workloads {wid} --inner {inner} --order {order} --precision {prec}"}
    ratio = ours["tasks_s"] / peer["tasks_s"]
    ok = ratio >= need
    detail = (f"{ours['name']} {ours['tasks_s']:.3g} tasks/s vs {peer['name']} "
              f"{peer['tasks_s']:.3g} tasks/s: {ratio:.2f}x")
    if c.get("floor_tasks_s"):
        floor = c["floor_tasks_s"]
        detail += (f"; arithmetic floor {floor:.4g} tasks/s: ours at {ours['tasks_s'] / floor:.1%} of it, "
                   f"{peer['name']} at {peer['tasks_s'] / floor:.1%}; {need:g}x the fastest peer "
                   f"would be {need * peer['tasks_s'] / floor:.1%} of the floor")
    if t.get("memory_max") is not None:
        mo, mp = (ours.get("memory") or {}).get("peak_bytes"), (peer.get("memory") or {}).get("peak_bytes")
        if mo is None or not mp:
            # half a target is not measured: speed alone neither meets it nor (when it holds) fails it
            detail += "; memory not measured (run with --memory subprocess or inline to the end)"
            return {"target": name, "status": "not met" if not ok else "not measured", "detail": detail}
        detail += f"; peak memory {mo / MiB:.1f} vs {mp / MiB:.1f} MiB: {mo / mp:.2f}x (<= {t['memory_max']:g}x)"
        ok = ok and mo / mp <= float(t["memory_max"])
    return {"target": name, "status": "met" if ok else "not met", "detail": detail}


def _adafactor_time(res: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    """metaopt's best row per workload/order: Adafactor-inner time over SGD-inner time."""
    lines, ok_all, any_ = [], True, False
    for c in res["cases"]:
        if c["inner"] != "adafactor" or c.get("precision", "fp32") != "fp32":
            continue
        s = _find(res, c["workload"], "sgd", c["order"])
        a_best, s_best = best_metaopt(c), best_metaopt(s) if s else None
        if s is None or a_best is None or s_best is None:
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
        ok_all &= r_best <= float(t["max"])
    return {"target": t.get("name") or f"Adafactor inner time <= {t['max']:g}x SGD inner (metaopt, best of "
            "vectorised/loop)", "status": ("met" if ok_all else "not met") if any_ else "not measured",
            "detail": "; ".join(lines) if lines else "run with --inner sgd adafactor"}


def _adafactor_memory(res: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    """From the memory report (5-step second order): Adafactor's peak over SGD's."""
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
                ok_all &= r <= float(t["max"])
    return {"target": t.get("name") or f"Adafactor inner peak memory <= {t['max']:g}x SGD's (5-step second order)",
            "status": ("met" if ok_all else "not met") if any_ else "not measured",
            "detail": "; ".join(lines) if lines else "memory report not run"}


def _fidelity(res: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    """The engine policy's meta-gradient cosine to float64 (``--fidelity``)."""
    prec, wid, need = t.get("precision", "bf16"), t["workload"], float(t["min_cosine"])
    name = t.get("name") or f"{wid} {prec} meta-gradient cosine to float64 >= {need:g} (engine policy)"
    rows = [r for r in res.get("fidelity", []) if r["workload"] == wid and r["precision"] == prec
            and r["policy"] == t.get("policy", "engine")]
    if not rows:
        return {"target": name, "status": "not measured", "detail": f"run with --fidelity --precision {prec}"}
    r = rows[0]
    return {"target": name, "status": "met" if r["cosine"] >= need else "not met",
            "detail": f"cosine {r['cosine']:.5f}, relative error {r['rel_err']:.3g}, worst layer cosine "
                      f"{r['min_layer_cosine']:.4f} ({r['data']})"}


def _remat(res: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    """Checkpointed second-order unroll vs the plain one at ``steps`` (``--remat-steps``)."""
    steps = int(t["steps"])
    name = t.get("name") or (f"{steps}-step second order: checkpointed peak memory <= {t['memory_max']:.0%} of the "
                             f"plain unroll's, time <= {t['time_max']:g}x")
    rows = {r["row"]: r for r in res.get("remat", []) if r["steps"] == steps}
    plain, remat = rows.get("metaopt plain unroll"), rows.get("metaopt checkpointed")
    if not plain or not remat or "peak_bytes" not in plain or "peak_bytes" not in remat or not plain.get("seconds"):
        return {"target": name, "status": "not measured", "detail": f"run with --remat-steps {steps}"}
    if plain["peak_bytes"] < MIN_RESOLVABLE:
        return {"target": name, "status": "not measured",
                "detail": f"plain unroll's peak {plain['peak_bytes'] / KiB:.0f} KiB is below resolution"}
    m = remat["peak_bytes"] / plain["peak_bytes"]
    s = remat["seconds"] / plain["seconds"]
    ok = m <= float(t["memory_max"]) and s <= float(t["time_max"])
    return {"target": name, "status": "met" if ok else "not met",
            "detail": (f"segments of {remat['every']}: {remat['peak_bytes'] / MiB:.1f} vs {plain['peak_bytes'] / MiB:.1f} "
                       f"MiB ({m:.1%}), {remat['seconds']:.3g} vs {plain['seconds']:.3g} s per meta-iteration ({s:.2f}x)")}


_KINDS = {"speed_vs_peer": _speed_vs_peer, "adafactor_time": _adafactor_time, "adafactor_memory": _adafactor_memory,
          "fidelity": _fidelity, "remat": _remat}


def targets(res: dict[str, Any], spec: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate ``spec`` (:func:`load_targets`) on a result dict: one ``{"target", "status":
    met|not met|not measured, "detail"}`` per target whose ``device`` (if any) matches."""
    out = []
    for t in spec:
        dev = t.get("device")
        if dev and not res["meta"]["device"].startswith(dev):
            continue
        try:
            out.append(_KINDS[t["kind"]](res, t))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # a malformed target or result
            out.append({"target": t.get("name") or t["kind"], "status": "not measured",
                        "detail": f"cannot evaluate: {type(e).__name__}: {e}"})
    return out


def to_markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    L: list[str] = ["# metaopt bench", ""]
    if m.get("interrupted"):
        L += ["**Interrupted**: the tables below hold only what was measured before the interruption.", ""]
    L.append(f"torch {m['torch']}, device `{m['device']}` ({m['device_name']}), {m['threads']} threads, "
             f"repeats {m['repeats']} (interleaved), warmup {m['warmup']}, {'tiny sizes, ' if m['tiny'] else ''}"
             f"precision {', '.join(m.get('precisions', ['fp32']))} (peers always float32), seed {m['seed']}. "
             f"Memory: {m['memory_method']}.")
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
        prec = c.get("precision", "fp32")
        head = f"### {c['workload']} · {c['inner']} inner · {c['order']} order"
        if prec != "fp32":
            head += f" · metaopt in {prec}"
        if c.get("flops"):
            head += f" — {c['flops'] / 1e9:.3g} GFLOP/meta-it"
            if c.get("floor_tasks_s"):
                head += f", floor {c['floor_tasks_s']:.4g} tasks/s at {m['peak_tflops']:g} TFLOP/s"
        if "repeats_done" in c:
            head += f" (interrupted: {c['repeats_done']} of {m['repeats']} repeats)"
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
    L += _fidelity_md(res) + _curves_md(res) + _remat_md(res)
    L.append("")
    L.append("## Targets")
    L.append("")
    if not res["targets"]:
        L.append("none given (--targets YAML, e.g. experiments/bench_targets.yaml)")
    for t in res["targets"]:
        L.append(f"- **{t['status']}** — {t['target']}: {t['detail']}")
    L.append("")
    return "\n".join(L)


def _fidelity_md(res: dict[str, Any]) -> list[str]:
    rows = res.get("fidelity")
    if not rows:
        return []
    L = ["", "## Meta-gradient fidelity against float64 (second order, SGD inner)", "",
         "Policies (metaopt/bench/fidelity.py): `autocast` = a hand-written loop inside torch.autocast; "
         "`autocast-loss32` = the same with float32 losses; `engine` = metaopt.MAML under the caller's "
         "autocast (inner loop float32, query forward 16-bit, float32 loss); `engine-norm32` = engine with "
         "normalisation inputs in float32. Per-layer figures leave out layers whose float64 meta-gradient "
         "is zero (conv biases before batch norm).", "",
         "| workload | precision | policy | cosine | rel. error | worst layer cosine | worst layer rel. error |",
         "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['workload']} | {r['precision']} | {r['policy']} | {r['cosine']:.5f} | {r['rel_err']:.3g} | "
                 f"{r['min_layer_cosine']:.4f} | {r['max_layer_rel_err']:.3g} |")
    return L


def _point_table(rows: list[dict[str, Any]], first: str) -> list[str]:
    L = [f"| {first} | implementation | s / meta-it | peak MiB |", "|---|---|---:|---:|"]
    for r in rows:
        if "seconds" not in r:
            L.append(f"| {r['point']} | {r.get('row', r.get('name', r['impl']))} | {r.get('error', 'error')} | |")
            continue
        mem = _mib_str(r["peak_bytes"]) if "peak_bytes" in r else (r.get("memory_error") or "–")
        L.append(f"| {r['point']} | {r.get('row', r.get('name', r['impl']))} | {r['seconds']:.3g} | {mem} |")
    return L


def _curves_md(res: dict[str, Any]) -> list[str]:
    curves = res.get("curves")
    if not curves:
        return []
    L = ["", f"## Cost curves ({curves['workload']}; SGD inner, second order; metaopt fp32)"]
    names = {"steps": "inner steps", "batch": "meta-batch", "model": "model"}
    for key, title in names.items():
        if key in curves:
            L += ["", f"### Against {title}", ""] + _point_table(curves[key], title)
    return L


def _remat_md(res: dict[str, Any]) -> list[str]:
    rows = res.get("remat")
    if not rows:
        return []
    L = ["", f"## Second-order memory against inner steps ({res['meta'].get('remat_workload', 'O1')})", "",
         "metaopt plain unroll: `meta_loss(backward=True)`; metaopt checkpointed: the same with "
         "`MAML(checkpoint_every=k)` (metaopt.remat; k in the row); peers: their plain unroll.", "",
         "| inner steps | implementation | s / meta-it | peak MiB | × plain unroll memory |",
         "|---:|---|---:|---:|---:|"]
    for r in rows:
        plain = next((p for p in rows if p["steps"] == r["steps"] and p.get("row") == "metaopt plain unroll"), None)
        label = r.get("row", r["impl"]) + (f" (k={r['every']})" if r.get("every") else "")
        if "seconds" not in r:
            L.append(f"| {r['steps']} | {label} | {r.get('error', 'error')} | | |")
            continue
        mem = _mib_str(r["peak_bytes"]) if "peak_bytes" in r else "–"
        ratio = (f"{r['peak_bytes'] / plain['peak_bytes']:.2f}" if plain and plain.get("peak_bytes")
                 and "peak_bytes" in r else "–")
        L.append(f"| {r['steps']} | {label} | {r['seconds']:.3g} | {mem} | {ratio} |")
    return L


def plot(res: dict[str, Any], prefix: Path) -> list[Path]:
    """PNG plots of the cost curves and the rematerialisation table next to ``prefix``
    (``PREFIX_curve_steps.png``, ...); nothing when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    series: dict[str, list[dict[str, Any]]] = dict((k, v) for k, v in (res.get("curves") or {}).items()
                                                   if k != "workload")
    if res.get("remat"):
        series["remat"] = [{**r, "point": str(r["steps"]), "impl": r.get("row", r["impl"])} for r in res["remat"]]
    for key, rows in series.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        points = list(dict.fromkeys(r["point"] for r in rows))
        for impl in dict.fromkeys(r.get("row", r["impl"]) if key != "remat" else r["impl"] for r in rows):
            mine = {r["point"]: r for r in rows if (r.get("row", r["impl"]) if key != "remat" else r["impl"]) == impl}
            xs = [i for i, p in enumerate(points) if "seconds" in mine.get(p, {})]
            axes[0].plot(xs, [mine[points[i]]["seconds"] for i in xs], marker="o", label=impl)
            xm = [i for i in xs if "peak_bytes" in mine[points[i]]]
            axes[1].plot(xm, [mine[points[i]]["peak_bytes"] / MiB for i in xm], marker="o", label=impl)
        for ax, ylabel in zip(axes, ("seconds per meta-iteration", "peak MiB")):
            ax.set_xticks(range(len(points)), points)
            ax.set_xlabel("inner steps" if key in ("steps", "remat") else key)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"metaopt bench: {key} ({res['meta']['device']})")
        fig.tight_layout()
        path = prefix.parent / f"{prefix.name}_{'remat' if key == 'remat' else 'curve_' + key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out
