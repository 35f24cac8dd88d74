"""Reports of many runs: ``summary.json``, ``summary.md`` and ``plots/compare_*.png``.

:func:`metaopt.compare.compare` trains; this module turns its records into numbers a reader
can trust and files they can read:

* :func:`summarize_compare` - per inner optimizer the mean and Student-t 95% CI over its
  finite seeds (:func:`metaopt.stats.mean_ci`; one seed: no interval), diverged runs listed
  by name and never averaged, paired differences between optimizers on the same test tasks
  and on the same seeds, learning-curve plots; written to ``summary.json`` and ``summary.md``.
* :func:`markdown_table` - the Markdown of that summary.
* :func:`reproduction_markdown` - :func:`metaopt.compare.reproduce`'s rows next to the MAML
  paper's numbers.
* :func:`write_report` - a report as ``NAME.json`` and ``NAME.md``.

Every name here is also importable from :mod:`metaopt.compare`.

Example:
    >>> from metaopt.compare_report import markdown_table
    >>> row = {"inner": "sgd", "metric": "accuracy", "seeds": 2, "finite_seeds": 2,
    ...        "mean": 0.9, "ci95": 0.05, "per_seed": [0.88, 0.92], "iterations": 100}
    >>> print(markdown_table([row]).splitlines()[2])
    | sgd | 2 | not tuned | 100 | 90.00% | ± 5.00% | 88.00%, 92.00% | n/a | None |
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from metaopt import stats
from metaopt.loop import format_metric, format_number
from metaopt.rundir import write_json
from metaopt.runs import per_task_test_values, test_tasks_sha256

__all__ = [
    "format_difference",
    "markdown_table",
    "paired_summary",
    "reproduction_markdown",
    "summarize_compare",
    "write_report",
]


# ============================================================================ summaries


def _summary(values: Sequence[float]) -> dict[str, Any]:
    s = stats.mean_ci(values)
    return {"mean": s.mean, "ci95": s.ci95, "std": s.std, "n": s.n}


def summarize_compare(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, *, title: str = "",
                      device: str | None = None, extra: Mapping[str, Any] | None = None,
                      not_finished: Sequence[str] = ()) -> dict[str, Any]:
    """Aggregate :func:`metaopt.compare.compare`'s runs: per optimizer the mean and Student-t
    95% CI over its finite seeds (none for one seed), diverged runs by name, paired
    differences on the same test tasks, plots; write ``summary.json`` and ``summary.md`` to
    ``out_dir``.

    Args:
        rows: ``{"inner": label, "config": resolved config, "runs": [run_config() records],
            "tune": tuning record or None}`` per optimizer.
        not_finished: optimizers left out because their runs are not finished, one line each.

    Returns:
        ``{"metric", "rows", "paired", "plots", ...extra}``; each row has ``mean``, ``ci95``
        (``None`` with fewer than two finite seeds), ``per_seed`` (``None`` where diverged),
        ``diverged`` (run directories), ``tune``.
    """
    out_dir = Path(out_dir)
    metric = next((r["results"]["metric"] for row in rows for r in row["runs"] if r["results"]), "metric")
    table = []
    for row in rows:
        runs = row["runs"]
        ok = [r for r in runs if r["status"] == "ok" and r["results"].get("mean") is not None]
        finals = [r["results"]["mean"] for r in ok]
        s = _summary(finals) if finals else {"mean": None, "ci95": None, "std": None, "n": 0}
        before = [r["results"]["before"]["mean"] for r in ok if r["results"].get("before")]
        table.append({
            "inner": row["inner"], "metric": metric, "seeds": len(runs), "finite_seeds": len(ok),
            "mean": s["mean"], "ci95": s["ci95"], "std": s["std"],
            "per_seed": [r["results"]["mean"] if r in ok else None for r in runs],
            "diverged": [{"run_dir": r["run_dir"], **(r["diverged"] or {})} for r in runs if r["status"] == "diverged"],
            "before_mean": stats.mean_ci(before).mean if before else None,
            "tasks": ok[0]["results"].get("tasks") if ok else None,
            "iterations": row["config"]["train"]["iterations"],
            "inner_config": dict(row["config"]["inner"]),
            "run_dirs": [r["run_dir"] for r in runs], "tune": row.get("tune"),
            "devices": [_run_device(r) for r in runs],
        })
    paired = _paired(table, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = _plots(table, out_dir / "plots", metric=metric, title=title)
    summary = {**(extra or {}), "title": title, "metric": metric, "ci": "Student t, n-1 df, over seeds",
               "rows": table, "paired": paired, "plots": [str(p) for p in pngs], "not_finished": list(not_finished)}
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(markdown_table(table, title=title, paired=paired, not_finished=not_finished))
    return summary


def _run_device(run: Mapping[str, Any]) -> str | None:
    """The device type a run trained on: its ``results.json``, else its saved config's
    ``train.device`` when that names one (``None``: unknown, e.g. ``auto`` in an older run)."""
    device = (run.get("results") or {}).get("device")
    if device:
        return str(device)
    cfg_path = Path(run["run_dir"]) / "config.yaml"
    if not cfg_path.is_file():
        return None
    saved = (yaml.safe_load(cfg_path.read_text()) or {}).get("train", {}).get("device")
    return str(saved).split(":")[0] if saved in ("cpu", "cuda") or str(saved).startswith("cuda:") else None


def _paired(table: Sequence[Mapping[str, Any]], *, device: str | None) -> list[dict[str, Any]]:
    """Every pair (a, b), a listed after b: a - b on the same test tasks and on the same seeds.

    Over tasks: ``d_i = mean_seeds a(task i) - mean_seeds b(task i)`` with a Student-t CI over
    the test tasks (task-sampling noise of these trained models; training noise is not in it).
    Over seeds: ``d_k = a(seed k) - b(seed k)`` (same model init and training tasks) with a
    Student-t CI over the seeds both finished (training noise; needs >= 2 seeds for a CI).
    Tasks pair only when every run's test tasks hash the same (:func:`test_tasks_sha256`;
    runs older than the hash are taken to agree): CPU and CUDA Omniglot runs see different
    tasks, so a row with seeds from both, or two rows from different devices, pair over
    seeds only, said so.
    """
    live = [r for r in table if r["finite_seeds"]]
    if len(live) < 2:
        return []
    per_task: dict[str, list[float]] = {}
    sha: dict[str, str | None] = {}
    why: dict[str, str] = {}  # a row whose per-task values cannot be paired at all
    for r in live:
        dirs = [d for d, v in zip(r["run_dirs"], r["per_seed"]) if v is not None]
        hashes = {h for h in map(test_tasks_sha256, dirs) if h is not None}
        if len(hashes) > 1:
            why[r["inner"]] = f"not paired: {r['inner']}'s seeds were tested on different tasks (e.g. CPU and CUDA)"
            continue
        sha[r["inner"]] = hashes.pop() if hashes else None
        try:
            seeds = [per_task_test_values(d, device=device) for d in dirs]
        except FileNotFoundError:  # checkpoints deleted (e.g. copied back from another machine): seeds only
            why[r["inner"]] = "not paired: per-task test values not saved and no checkpoint"
            continue
        n = len(seeds[0])
        per_task[r["inner"]] = [math.fsum(s[i] for s in seeds) / len(seeds) for i in range(n)]
    out = []
    for j, a in enumerate(live):
        for b in live[:j]:
            rec: dict[str, Any] = {"a": a["inner"], "b": b["inner"], "metric": a["metric"]}
            note = why.get(a["inner"]) or why.get(b["inner"])
            if note is None and None not in (sha[a["inner"]], sha[b["inner"]]) and sha[a["inner"]] != sha[b["inner"]]:
                note = "not paired: the two rows were tested on different tasks (e.g. CPU and CUDA)"
            rec["over_tasks"] = ({"n": 0, "mean": None, "ci95": None, "note": note} if note is not None else
                                 paired_summary(per_task[a["inner"]], per_task[b["inner"]], "test tasks"))
            both = [(x, y) for x, y in zip(a["per_seed"], b["per_seed"]) if x is not None and y is not None]
            rec["over_seeds"] = paired_summary([x for x, _ in both], [y for _, y in both], "seeds")
            out.append(rec)
    return out


def paired_summary(a: Sequence[float], b: Sequence[float], what: str) -> dict[str, Any]:
    """``a - b`` paired element by element, Student-t CI (``{"mean", "ci95", "std", "n"}``),
    or ``{"n": 0, "mean": None, "ci95": None, "note"}`` when they cannot be paired.

    Example:
        >>> paired_summary([1.0, 2.0], [0.5, 1.0], "seeds")["mean"]
        0.75
        >>> paired_summary([1.0], [0.5, 1.0], "seeds")["note"]
        'not paired: 1 vs 2 seeds'
    """
    if not a or len(a) != len(b):
        return {"n": 0, "mean": None, "ci95": None, "note": f"not paired: {len(a)} vs {len(b)} {what}"}
    s = stats.paired_difference(a, b)
    return {"mean": s.mean, "ci95": s.ci95, "std": s.std, "n": s.n}


# ============================================================================ plots


def _band(seeds: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[list[float], list[float], list[float | None]]:
    """Mean and Student-t CI half-width over seeds at the iterations all seeds logged."""
    common = sorted(set.intersection(*(set(xs) for xs, _ in seeds))) if seeds else []
    lookup = [dict(zip(xs, ys)) for xs, ys in seeds]
    means, cis = [], []
    for x in common:
        s = stats.mean_ci([d[x] for d in lookup])
        means.append(s.mean)
        cis.append(s.ci95)
    return common, means, cis


def wide_positive_range(values: Sequence[float], ratio: float = 100.0) -> bool:
    """Whether ``values`` are all positive and finite and span more than ``ratio`` (max/min): then a
    plot of them needs a log axis to show the small ones.

    Example:
        >>> wide_positive_range([0.36, 1.3, 40371.0]), wide_positive_range([0.36, 1.3, 2.8])
        (True, False)
    """
    vals = list(values)
    return bool(vals) and all(math.isfinite(v) and v > 0 for v in vals) and max(vals) > ratio * min(vals)


def _plots(table: Sequence[Mapping[str, Any]], plot_dir: Path, *, metric: str, title: str) -> list[Path]:
    """Learning curves (validation metric, training meta-loss) with Student-t bands over the
    finite seeds, the final test metric per optimizer with its CI, and the tuning curves."""
    from metaopt import plots  # selects matplotlib's Agg backend

    plt = plots.plt
    pngs = []
    for key, ylabel, name in (("val_metric", f"validation {metric}", f"compare_val_{metric}.png"),
                              ("meta_loss", "meta-loss (train)", "compare_meta_loss.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for row in table:
            seeds = []
            for d, v in zip(row["run_dirs"], row["per_seed"]):
                if v is not None and (Path(d) / "metrics.csv").is_file():
                    cols = plots.read_metrics(Path(d) / "metrics.csv")
                    xs, ys = plots._series(cols, key)
                    if xs:
                        seeds.append((xs, ys))
            xs, m, ci = _band(seeds)
            if not xs:
                continue
            (line,) = ax.plot(xs, m, marker="o", ms=3, label=f"{row['inner']} (n={len(seeds)})")
            if all(c is not None for c in ci):
                ax.fill_between(xs, [a - c for a, c in zip(m, ci)], [a + c for a, c in zip(m, ci)],  # type: ignore[operator]
                                color=line.get_color(), alpha=0.2)
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.set_title(f"{title}: mean over seeds, 95% CI (Student t)" if title else "mean over seeds, 95% CI (Student t)",
                     fontsize=9)
        fig.tight_layout()
        pngs.append(_save(fig, plot_dir / name))

    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(table) + 2), 4.2))
    scale = 100.0 if metric == "accuracy" else 1.0
    for i, row in enumerate(table):
        per = [v * scale for v in row["per_seed"] if v is not None]
        ax.scatter([i] * len(per), per, s=12, alpha=0.5, color="gray")
        if row["mean"] is None:
            ax.annotate("diverged", (i, 0.5), xycoords=("data", "axes fraction"), ha="center", color="red")
            continue
        err = None if row["ci95"] is None else [[row["ci95"] * scale], [row["ci95"] * scale]]
        ax.errorbar([i], [row["mean"] * scale], yerr=err, fmt="o", capsize=5, color="C0")
    shown = [v * scale for r in table for v in [*r["per_seed"], r["mean"]] if v is not None]
    if metric != "accuracy" and wide_positive_range(shown):
        # One blown-up row (test MSE 4e4) would flatten every other row onto 0 on a linear
        # axis; an interval reaching below 0 is drawn to the bottom of the axis.
        ax.set_yscale("log", nonpositive="clip")
    ax.set_xticks(range(len(table)), [r["inner"] for r in table], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"test {metric}" + (" (%)" if metric == "accuracy" else "")
                  + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_xlim(-0.5, len(table) - 0.5)
    ax.set_title("final test metric: mean ± 95% CI over seeds\n(Student t; gray: the seeds)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    pngs.append(_save(fig, plot_dir / f"compare_final_{metric}.png"))

    tuned = [r for r in table if r["tune"] and len(r["tune"].get("grid") or {}) == 1]
    if tuned:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        lowest = math.inf
        for row in tuned:
            (key,) = row["tune"]["grid"]
            pts = [(r["values"][key], r["val_metric"]) for r in row["tune"]["results"]
                   if r["val_metric"] is not None and isinstance(r["values"][key], (int, float))]
            if pts:
                pts.sort()
                lowest = min(lowest, *(v for _, v in pts))
                ax.plot([p for p, _ in pts], [v * scale for _, v in pts], marker="o", label=f"{row['inner']} ({key})")
        ax.set_xscale("log")
        if metric != "accuracy" and 0 < lowest < math.inf:  # a bad lr's loss is orders of magnitude above a good one's
            ax.set_yscale("log")
        ax.set_xlabel("tuned value")
        ax.set_ylabel(f"validation {metric}" + (" (%)" if metric == "accuracy" else ""))
        ax.set_title("tuning on validation tasks (diverged points omitted)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        pngs.append(_save(fig, plot_dir / "compare_tune.png"))
    return pngs


def _save(fig: Any, out_png: Path) -> Path:
    from metaopt import plots

    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plots.plt.close(fig)
    return out_png


# ============================================================================ reports


def _fmt_metric(metric: str, m: float | None, ci: float | None = None) -> str:
    """``"accuracy"`` as a percentage, anything else with 4 decimals; ``"n/a"`` for no value
    (the run layer's :func:`metaopt.loop.format_metric`)."""
    return format_metric(metric, m, ci)


def _fmt_ci(metric: str, ci: float | None, n: int, unit: str = "seed") -> str:
    """``"± 0.0233"``; with one value there is no interval: ``"n/a (1 seed)"``."""
    if n == 0:
        return "n/a"
    if ci is None:
        return f"n/a ({n} {unit})"
    return f"± {100 * ci:.2f}%" if metric == "accuracy" else f"± {format_number(ci)}"


def format_difference(metric: str, d: Mapping[str, Any], unit: str = "task") -> str:
    """A paired difference (:func:`paired_summary`'s dict) as a table cell: accuracy in
    percentage points, anything else with 4 decimals; the reason when there is none.

    Example:
        >>> format_difference("mse", {"mean": 0.0123, "ci95": 0.004, "n": 600})
        '+0.0123 ± 0.0040 (n = 600)'
        >>> format_difference("accuracy", {"mean": -0.02, "ci95": None, "n": 1}, "seed")
        '-2.00 pp, CI n/a (1 seed)'
    """
    if d.get("mean") is None:
        return d.get("note", "n/a")
    m = f"{100 * d['mean']:+.2f} pp" if metric == "accuracy" else format_number(d["mean"], sign=True)
    ci = _fmt_ci(metric, d["ci95"], d["n"], unit).replace("%", " pp")
    return f"{m} {ci} (n = {d['n']})" if d["ci95"] is not None else f"{m}, CI {ci}"


def _fmt_tuned(row: Mapping[str, Any]) -> str:
    t = row.get("tune")
    if not t:
        return "not tuned"
    if "skipped" in t:
        return "fixed: " + ", ".join(f"{k}={v}" for k, v in t["chosen"].items())
    if t["chosen"] is None:
        return "every grid point diverged"
    text = ", ".join(f"{k}={v}" for k, v in t["chosen"].items())
    return text + (f" (edge of grid: {', '.join(t['at_edge'])})" if t.get("at_edge") else "")


def markdown_table(rows: Sequence[Mapping[str, Any]], *, title: str = "",
                   paired: Sequence[Mapping[str, Any]] = (), not_finished: Sequence[str] = ()) -> str:
    """Markdown report: final test metric per optimizer (mean and Student-t 95% CI over
    seeds; one seed: ``n/a (1 seed)``), diverged runs by name, the tuning grid with each
    value's validation metric, and paired differences against the first optimizer."""
    if not rows:
        return "(no runs)\n" + "".join(f"- not finished: {line}\n" for line in not_finished)
    metric = rows[0]["metric"]
    lines = [f"### {title}" if title else "", "",
             (f"| inner optimizer | seeds | tuned on validation | iterations | test {metric} (mean over seeds) | "
             "95% CI over seeds (Student t) | per seed | before adaptation | test tasks |"),
             "|---|---|---|---|---|---|---|---|---|"]
    diverged = []
    for r in rows:
        n, total = r.get("finite_seeds", r["seeds"]), r["seeds"]
        seeds = f"{total}" if n == total else f"{n} of {total} ({total - n} diverged)"
        mean = _fmt_metric(metric, r["mean"]) if r["mean"] is not None or total == 0 else "diverged"
        per = ", ".join("diverged" if v is None else _fmt_metric(metric, v) for v in r.get("per_seed") or [])
        lines.append(
            f"| {r['inner']} | {seeds} | {_fmt_tuned(r)} | {r.get('iterations')} | {mean} | "
            f"{_fmt_ci(metric, r['ci95'], n)} | {per} | {_fmt_metric(metric, r.get('before_mean'))} | {r.get('tasks')} |"
        )
        for d in r.get("diverged") or []:
            where = d.get("where", "meta-loss")
            value = f" {d['value']}" if d.get("value") is not None else ""
            diverged.append(f"- {r['inner']}: `{d['run_dir']}` (non-finite {where}{value} "
                            f"at iteration {d.get('iteration')})")
        t = r.get("tune")
        for d in (t or {}).get("results", []):
            for run_dir in d["diverged"]:
                diverged.append(f"- {r['inner']} tuning {d['values']}: `{run_dir}`")
    kinds = {d for r in rows for d in r.get("devices") or [] if d is not None}
    if len(kinds) > 1:  # Omniglot draws its tasks on the device: different tasks per device type
        lines += ["", "Devices per seed (runs on different device types train and test on different tasks; "
                      "they are compared as samples, not paired over tasks):", ""]
        lines += [f"- {r['inner']}: " + ", ".join(d or "unknown" for d in r.get("devices") or []) for r in rows]
    if not_finished:
        lines += ["", "Not finished (left out of this report until their runs finish):", "",
                  *(f"- {line}" for line in not_finished)]
    if diverged:
        lines += ["", "Diverged runs (reported, never averaged):", *diverged]
    tuned = [r for r in rows if r.get("tune") and r["tune"].get("results")]
    if tuned:
        lines += ["", (f"Tuning (validation {metric} of the final checkpoint, mean over "
                  f"{tuned[0]['tune']['seeds']} tuning seed(s); chosen in bold; test tasks never used):"), ""]
        for r in tuned:
            t = r["tune"]
            cells = []
            for i, d in enumerate(t["results"]):
                point = ", ".join(f"{v}" for v in d["values"].values())
                val = "diverged" if d["val_metric"] is None else _fmt_metric(metric, d["val_metric"])
                cells.append(f"**{point} → {val}**" if i == t["chosen_index"] else f"{point} → {val}")
            mixed = len(t.get("devices") or []) > 1
            lines.append(f"- {r['inner']} ({', '.join(t['grid'])}): " + "; ".join(cells)
                         + (f" (tuned across devices: {', '.join(t['devices'])}; a task sampler on the device "
                            "draws other validation tasks on each)" if mixed else ""))
    if paired:
        ref = paired[0]["b"]
        vs = [p for p in paired if p["b"] == ref]
        lines += ["", (f"Paired differences against {ref} (a − b; for {metric} "
                  f"{'higher' if metric == 'accuracy' else 'lower'} is better):"), "",
                  "| a − b | over the same test tasks (seed-mean per task) | over the same seeds |", "|---|---|---|"]
        for p in vs:
            lines.append(f"| {p['a']} − {p['b']} | {format_difference(metric, p['over_tasks'], 'task')} | "
                         f"{format_difference(metric, p['over_seeds'], 'seed')} |")
    return "\n".join(lines).lstrip() + "\n"


def reproduction_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: setting, iterations, test metric ± 95% CI (tasks), paper."""
    lines = ["| setting | inner | iterations | test metric (mean ± 95% CI) | before adaptation | tasks | MAML paper |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = r.get("metric", "")
        before = r.get("before") or {}
        lines.append(
            f"| {r['setting']} | {r.get('inner')} | {r.get('iteration')} | {metric} {_fmt_metric(metric, r.get('mean'), r.get('ci95'))} | "
            f"{_fmt_metric(metric, before.get('mean'))} | {r.get('tasks')} | {r.get('paper') or 'figure only'} |"
        )
    return "\n".join(lines) + "\n"


def write_report(results_dir: str | Path, name: str, data: Any, markdown: str) -> tuple[Path, Path]:
    """Write ``results_dir/name.json`` and ``results_dir/name.md``."""
    results_dir = Path(results_dir)
    j = write_json(results_dir / f"{name}.json", data)
    m = results_dir / f"{name}.md"
    m.write_text(markdown)
    return j, m
