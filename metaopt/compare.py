"""Many runs, one table: inner optimizers compared fairly over seeds, and the MAML paper reproduced.

A single run (:mod:`metaopt.train`) gives one number with a 95% CI over test tasks; whether
an inner optimizer is better needs each optimizer at its own best setting, several seeds of
each, and intervals that are honest about having only a few seeds. This module drives those
runs and turns them into reports:

* :func:`compare` - one config, several inner optimizers (``"sgd,adafactor:lr=0.3"``,
  parsed by :func:`parse_inner_specs`), ``seeds`` runs each. With ``tune={"inner.lr":
  [...]}`` each optimizer's value is first chosen on VALIDATION tasks (never test tasks)
  from runs on separate seeds, then the final seeds are trained with it.
* every run goes through :func:`metaopt.runs.run_config` (re-exported here): a run
  directory is reused only when its saved ``config.yaml`` matches the config it would run;
  a stale one is re-run (the old directory kept as ``*.stale-K``) or refused, naming the
  differing key.
* :func:`summarize_compare` - ``summary.json``, ``summary.md`` and ``plots/compare_*.png``:
  mean and Student-t 95% CI over seeds (:func:`metaopt.stats.mean_ci`; one seed: no
  interval), paired differences between optimizers on the same test tasks, diverged runs
  listed by name and never averaged.
* :func:`reproduce` - the paper's settings (:data:`PAPER_SETTINGS`), one run each;
  :func:`reproduction_markdown` puts the results next to the paper's numbers.
* :func:`write_report` - a report as ``NAME.json`` and ``NAME.md``.

Example:
    >>> from metaopt.compare import parse_inner_specs, parse_tune
    >>> parse_inner_specs("sgd,adafactor:lr=0.3")
    [('sgd', ['inner.name=sgd']), ('adafactor:lr=0.3', ['inner.name=adafactor', 'inner.lr=0.3'])]
    >>> parse_tune(["inner.lr=0.01,0.1"])
    {'inner.lr': [0.01, 0.1]}

From the shell::

    metaopt compare configs/sinusoid.yaml --inner sgd,adafactor --seeds 3 \\
        --tune inner.lr=0.003,0.01,0.03,0.1,0.3,1
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from metaopt import config as config_mod
from metaopt import stats
from metaopt.config import Config, ConfigError
from metaopt.runs import (
    COSMETIC_KEYS,
    _yaml_value,
    config_diff,
    per_task_test_values,
    run_config,
    validation_metric,
)
from metaopt.rundir import write_json

#: The MAML paper's settings (configs/*.yaml) and its reported test accuracy (Finn et al.
#: 2017, Table 1: mean ± 95% CI over 600 tasks); sinusoid results are reported as a figure only.
PAPER_SETTINGS: dict[str, tuple[str, str | None]] = {
    "sinusoid_5shot": ("sinusoid_5shot.yaml", None),
    "sinusoid_10shot": ("sinusoid_10shot.yaml", None),
    "omniglot_5w1s": ("omniglot_5w1s.yaml", "98.7 ± 0.4%"),
    "omniglot_5w5s": ("omniglot_5w5s.yaml", "99.9 ± 0.1%"),
    "omniglot_20w1s": ("omniglot_20w1s.yaml", "95.8 ± 0.3%"),
    "omniglot_20w5s": ("omniglot_20w5s.yaml", "98.9 ± 0.2%"),
}

#: Tuning runs use seeds ``train.seed + TUNE_SEED_OFFSET + k``, disjoint from the final
#: seeds ``train.seed + k``: the value is chosen on one set of training runs and reported on
#: another, so a lucky tuning seed does not also become a reported seed.
TUNE_SEED_OFFSET = 1000

#: Keys ``tune`` refuses: choosing a seed or the optimizer itself on validation is not tuning.
UNTUNABLE_KEYS = frozenset({"train.seed", "inner.name", "task.name"})


# ============================================================================ specs


def parse_inner_specs(text: str) -> list[tuple[str, list[str]]]:
    """``"sgd,adafactor:lr=0.3:beta2_decay=-0.5"`` -> ``[("sgd", ["inner.name=sgd"]),
    ("adafactor:lr=0.3:beta2_decay=-0.5", ["inner.name=adafactor", "inner.lr=0.3",
    "inner.beta2_decay=-0.5"])]`` (label, inner overrides).

    Raises:
        ConfigError: an empty list, a repeated entry, or a ``key=value`` without ``=``.
    """
    specs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, *kvs = part.split(":")
        sets = [f"inner.name={name}"]
        for kv in kvs:
            if "=" not in kv:
                raise ConfigError(f"--inner entry {part!r}: expected NAME[:key=value...], got {kv!r}")
            sets.append(f"inner.{kv}")
        specs.append((part, sets))
    if not specs:
        raise ConfigError("--inner needs at least one inner optimizer name")
    labels = [s[0] for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--inner lists an optimizer twice: {text!r}")
    return specs


def _specs(inner: str | Sequence[str] | Mapping[str, str | Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """Labelled specs: a mapping ``{label: spec}`` keeps its labels (a spec may also be a
    mapping ``{"name": ..., **kwargs}``, whose values may hold commas); otherwise label = spec."""
    if isinstance(inner, Mapping):
        out = []
        for label, spec in inner.items():
            if isinstance(spec, Mapping):
                if "name" not in spec:
                    raise ConfigError(f"--inner {label!r}: a mapping entry needs a 'name', got {dict(spec)!r}")
                out.append((str(label), [f"inner.{k}={_yaml_value(v)}" for k, v in spec.items()]))
                continue
            parsed = parse_inner_specs(spec)
            if len(parsed) != 1:
                raise ConfigError(f"--inner {label!r}: expected one NAME[:key=value...] entry, got {spec!r}")
            out.append((str(label), parsed[0][1]))
        if not out:
            raise ConfigError("--inner needs at least one inner optimizer name")
        return out
    return parse_inner_specs(inner if isinstance(inner, str) else ",".join(inner))


def parse_tune(items: Sequence[str] | Mapping[str, Sequence[Any]] | None) -> dict[str, list[Any]]:
    """``["inner.lr=0.01,0.1"]`` (``--tune`` items; values read as YAML) or a mapping ->
    ``{"inner.lr": [0.01, 0.1]}``; the grid is the product over keys.

    Raises:
        ConfigError: a malformed item, a key that is not ``section.key`` or is in
            :data:`UNTUNABLE_KEYS`, a repeated key, or an empty or repeated value.
    """
    if not items:
        return {}
    pairs: list[tuple[str, list[Any]]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), list(v)) for k, v in items.items()]
    else:
        for item in items:
            key, sep, vals = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--tune {item!r}: expected KEY=V1,V2,... e.g. inner.lr=0.01,0.1")
            pairs.append((key.strip(), [_number(yaml.safe_load(v)) for v in vals.split(",") if v.strip()]))
    grid: dict[str, list[Any]] = {}
    for key, values in pairs:
        section, _, name = key.partition(".")
        if section not in config_mod.SECTIONS or not name:
            raise ConfigError(f"--tune key {key!r}: expected SECTION.KEY with SECTION one of "
                              f"{', '.join(config_mod.SECTIONS)}")
        if key in UNTUNABLE_KEYS:
            raise ConfigError(f"--tune key {key!r} cannot be tuned (choosing it on validation is not tuning)")
        if key in grid:
            raise ConfigError(f"--tune key {key!r} given twice")
        if not values:
            raise ConfigError(f"--tune {key}: needs at least one value")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"--tune {key}: a value is repeated in {values!r}")
        grid[key] = values
    return grid


def _number(v: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a grid value that reads as a number is one."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _inner_config(config: str | Path | Mapping[str, Any], overrides: Sequence[str], inner_sets: Sequence[str]) -> Config:
    raw = config_mod.read_yaml(config) if isinstance(config, (str, Path)) else dict(config)
    raw = config_mod.apply_overrides(raw, list(overrides))
    base_inner = dict(raw.get("inner") or {})
    new = config_mod.apply_overrides({"inner": {}}, list(inner_sets))["inner"]
    if new.get("name", base_inner.get("name")) != base_inner.get("name", "sgd"):
        # Another optimizer: keep only the generic keys (optimizer-specific ones may not apply).
        own = set(config_mod.SCHEMA["inner"])
        base_inner = {k: v for k, v in base_inner.items() if k in own}
    raw["inner"] = {**base_inner, **new}
    return config_mod.resolve(raw)


def _with(cfg: Config, values: Mapping[str, Any]) -> Config:
    """``cfg`` with ``{"section.key": value}`` set, resolved (so bad values fail here)."""
    patch: dict[str, dict[str, Any]] = {}
    for key, v in values.items():
        s, _, k = key.partition(".")
        patch.setdefault(s, {})[k] = v
    return config_mod.resolve(config_mod.merge(cfg, patch))


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label.replace(":", "_"))


def _point_slug(point: Mapping[str, Any]) -> str:
    return _slug("_".join(f"{k}={v}" for k, v in point.items()))


def _better(metric: str) -> Callable[[float, float], bool]:
    """``better(a, b)``: a is strictly better than b (accuracy: higher; losses: lower)."""
    return (lambda a, b: a > b) if metric == "accuracy" else (lambda a, b: a < b)


# ============================================================================ compare


def compare(
    config: str | Path | Mapping[str, Any],
    inner: str | Sequence[str] | Mapping[str, str | Mapping[str, Any]],
    seeds: int,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    tune: Sequence[str] | Mapping[str, Sequence[Any]] | None = None,
    grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    tune_seeds: int = 1,
    rerun: bool = True,
    device: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train ``config`` with each inner optimizer (tuned on validation) and ``seeds`` seeds.

    For each optimizer whose spec does not itself set a tuned key: every point of the grid
    (``tune``, or ``grids[label]`` for that optimizer) is trained on ``tune_seeds`` seeds
    (``train.seed + TUNE_SEED_OFFSET + k``, in ``out_dir/<inner>/tune/<point>/seed<k>``) and
    scored by the final checkpoint's mean metric on the VALIDATION tasks; the best point
    (lowest MSE / highest accuracy, mean over tuning seeds; a point with a diverged seed is
    out; ties go to the first) is then trained on the final seeds (``train.seed + k``, in
    ``out_dir/<inner>/seed<k>``), whose test metrics are reported. Run directories are reused
    only when their config matches (:func:`run_config`), so re-running continues a comparison
    and a changed config re-runs what changed.

    Args:
        config: a YAML path or a config mapping.
        inner: ``"sgd,adafactor:lr=0.3"``, a list of such entries, or ``{label: entry}`` with
            an entry a string or a mapping ``{"name": "sgd", "momentum": 0.9}``.
        seeds: final seeds per optimizer (>= 1).
        out_dir: output folder; ``summary.json``, ``summary.md`` and ``plots/`` go there.
        overrides: ``--set`` items applied to ``config`` for every run.
        tune: ``["inner.lr=0.01,0.1"]`` or ``{"inner.lr": [0.01, 0.1]}`` (see :func:`parse_tune`).
        grids: per-optimizer grids ``{label: {key: values}}`` replacing ``tune`` for that label.
        tune_seeds: seeds per grid point (>= 1).
        rerun: re-run a run directory whose config differs (False: refuse, naming the key).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (default: the config's).
        log: progress messages (``None``: silent).

    Returns:
        The summary written to ``summary.json`` (see :func:`summarize_compare`).

    Raises:
        ConfigError: bad arguments or configs (checked for every run before any training),
            or a stale run directory with ``rerun=False``.
    """
    for name, v in (("--seeds", seeds), ("--tune-seeds", tune_seeds)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
    specs = _specs(inner)
    out_dir = Path(out_dir)
    default_grid = parse_tune(tune)
    unknown = sorted(set(grids or {}) - {label for label, _ in specs})
    if unknown:
        raise ConfigError(f"grids for unknown --inner label(s) {', '.join(unknown)}")
    # Every config (each optimizer, each grid point) is resolved before anything trains.
    plans = []
    for label, sets in specs:
        base = _inner_config(config, overrides, sets)
        grid = parse_tune(grids[label]) if grids and label in grids else default_grid
        fixed = {k: v for k, v in grid.items() if any(s.startswith(k + "=") for s in sets)}
        grid = {k: v for k, v in grid.items() if k not in fixed}
        points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
        point_cfgs = [_with(base, p) for p in points]
        plans.append((label, base, grid, fixed, points, point_cfgs))

    rows: list[dict[str, Any]] = []
    for label, base, grid, fixed, points, point_cfgs in plans:
        slug = out_dir / _slug(label)
        tuning: dict[str, Any] | None = None
        final_cfg = base
        if points:
            tuning = _tune(label, grid, points, point_cfgs, slug / "tune", tune_seeds,
                           device=device, rerun=rerun, log=log)
            if tuning["chosen"] is None:  # every grid point diverged: nothing to train
                rows.append({"inner": label, "config": base, "runs": [], "tune": tuning})
                continue
            final_cfg = point_cfgs[tuning["chosen_index"]]
        elif fixed:
            tuning = {"skipped": f"{', '.join(fixed)} set by the --inner entry",
                      "chosen": {k: _get(base, k) for k in fixed}}
        runs = []
        for k in range(seeds):
            seeded = _with(final_cfg, {"train.seed": final_cfg["train"]["seed"] + k})
            run_dir = slug / f"seed{k}"
            runs.append(run_config(seeded, run_dir, device=device, rerun=rerun, log=log,
                                   message=f"[compare] {label} seed {k} -> {run_dir}"))
        rows.append({"inner": label, "config": final_cfg, "runs": runs, "tune": tuning})
    title = Path(config).name if isinstance(config, (str, Path)) else ""
    return summarize_compare(rows, out_dir, title=title, device=device,
                             extra={"config": str(config) if isinstance(config, (str, Path)) else None,
                                    "overrides": list(overrides), "seeds": seeds,
                                    "tune_request": {"grid": default_grid, "grids": dict(grids or {}),
                                                     "seeds": tune_seeds, "split": "val"}})


def _get(cfg: Config, key: str) -> Any:
    s, _, k = key.partition(".")
    return cfg[s][k]


def _tune(label: str, grid: Mapping[str, list[Any]], points: list[dict[str, Any]], point_cfgs: list[Config],
          tune_dir: Path, tune_seeds: int, *, device: str | None, rerun: bool,
          log: Callable[[str], None] | None) -> dict[str, Any]:
    """Train every grid point on the tuning seeds, score it on validation tasks, choose."""
    results: list[dict[str, Any]] = []
    metric = None
    for point, cfg in zip(points, point_cfgs):
        vals: list[float | None] = []
        diverged = []
        for k in range(tune_seeds):
            # Tuning runs only need their checkpoint and metrics: no per-run figures or event files.
            seeded = _with(cfg, {"train.seed": cfg["train"]["seed"] + TUNE_SEED_OFFSET + k,
                                 "train.plots": False, "train.tensorboard": False})
            run_dir = tune_dir / _point_slug(point) / f"seed{k}"
            rec = run_config(seeded, run_dir, device=device, rerun=rerun, log=log,
                             message=f"[compare] tuning {label} {_point_slug(point)} seed {k} -> {run_dir}")
            metric = metric or (rec["results"] or {}).get("metric")
            v = validation_metric(run_dir, device=device) if rec["status"] == "ok" else None
            if v is None or not math.isfinite(v):
                diverged.append(str(run_dir))
                v = None
            vals.append(v)
        finite = [v for v in vals if v is not None]
        score = stats.mean_ci(finite).mean if finite and not diverged else None
        results.append({"values": {k: _get(cfg, k) for k in grid}, "val_metric": score, "per_seed": vals,
                        "diverged": diverged})
    better = _better(metric or "mse")
    best: int | None = None
    for i, r in enumerate(results):
        if r["val_metric"] is not None and (best is None or better(r["val_metric"], results[best]["val_metric"])):
            best = i
    at_edge: list[str] = []
    if best is not None:
        for key, values in grid.items():
            nums = sorted(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
            if len(nums) == len(values) > 1 and points[best][key] in (nums[0], nums[-1]):
                at_edge.append(key)
    return {"split": "val", "metric": metric, "grid": {k: list(v) for k, v in grid.items()},
            "seeds": tune_seeds, "results": results, "chosen_index": best,
            "chosen": results[best]["values"] if best is not None else None, "at_edge": at_edge}


# ============================================================================ summaries


def _summary(values: Sequence[float]) -> dict[str, Any]:
    s = stats.mean_ci(values)
    return {"mean": s.mean, "ci95": s.ci95, "std": s.std, "n": s.n}


def summarize_compare(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, *, title: str = "",
                      device: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Aggregate :func:`compare`'s runs: per optimizer the mean and Student-t 95% CI over
    its finite seeds (none for one seed), diverged runs by name, paired differences on the
    same test tasks, plots; write ``summary.json`` and ``summary.md`` to ``out_dir``.

    Args:
        rows: ``{"inner": label, "config": resolved config, "runs": [run_config() records],
            "tune": tuning record or None}`` per optimizer.

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
        })
    paired = _paired(table, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = _plots(table, out_dir / "plots", metric=metric, title=title)
    summary = {**(extra or {}), "title": title, "metric": metric, "ci": "Student t, n-1 df, over seeds",
               "rows": table, "paired": paired, "plots": [str(p) for p in pngs]}
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(markdown_table(table, title=title, paired=paired))
    return summary


def _paired(table: Sequence[Mapping[str, Any]], *, device: str | None) -> list[dict[str, Any]]:
    """Every pair (a, b), a listed after b: a - b on the same test tasks and on the same seeds.

    Over tasks: ``d_i = mean_seeds a(task i) - mean_seeds b(task i)`` with a Student-t CI over
    the test tasks (task-sampling noise of these trained models; training noise is not in it).
    Over seeds: ``d_k = a(seed k) - b(seed k)`` (same model init and training tasks) with a
    Student-t CI over the seeds both finished (training noise; needs >= 2 seeds for a CI).
    """
    live = [r for r in table if r["finite_seeds"]]
    if len(live) < 2:
        return []
    per_task: dict[str, list[float]] = {}
    for r in live:
        seeds = [per_task_test_values(d, device=device) for d, v in zip(r["run_dirs"], r["per_seed"]) if v is not None]
        n = len(seeds[0])
        per_task[r["inner"]] = [math.fsum(s[i] for s in seeds) / len(seeds) for i in range(n)]
    out = []
    for j, a in enumerate(live):
        for b in live[:j]:
            ta, tb = per_task[a["inner"]], per_task[b["inner"]]
            rec: dict[str, Any] = {"a": a["inner"], "b": b["inner"], "metric": a["metric"]}
            rec["over_tasks"] = _summary_or_reason(ta, tb, "test tasks")
            both = [(x, y) for x, y in zip(a["per_seed"], b["per_seed"]) if x is not None and y is not None]
            rec["over_seeds"] = _summary_or_reason([x for x, _ in both], [y for _, y in both], "seeds")
            out.append(rec)
    return out


def _summary_or_reason(a: Sequence[float], b: Sequence[float], what: str) -> dict[str, Any]:
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
    ax.set_xticks(range(len(table)), [r["inner"] for r in table], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"test {metric}" + (" (%)" if metric == "accuracy" else ""))
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
    """``"accuracy"`` as a percentage, anything else with 4 decimals; ``"n/a"`` for no value."""
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    if metric == "accuracy":
        return f"{100 * m:.2f}%" + (f" ± {100 * ci:.2f}%" if ci is not None else "")
    return f"{m:.4f}" + (f" ± {ci:.4f}" if ci is not None else "")


def _fmt_ci(metric: str, ci: float | None, n: int, unit: str = "seed") -> str:
    """``"± 0.0233"``; with one value there is no interval: ``"n/a (1 seed)"``."""
    if n == 0:
        return "n/a"
    if ci is None:
        return f"n/a ({n} {unit})"
    return f"± {100 * ci:.2f}%" if metric == "accuracy" else f"± {ci:.4f}"


def _fmt_diff(metric: str, d: Mapping[str, Any], unit: str) -> str:
    if d.get("mean") is None:
        return d.get("note", "n/a")
    m = f"{100 * d['mean']:+.2f} pp" if metric == "accuracy" else f"{d['mean']:+.4f}"
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
                   paired: Sequence[Mapping[str, Any]] = ()) -> str:
    """Markdown report: final test metric per optimizer (mean and Student-t 95% CI over
    seeds; one seed: ``n/a (1 seed)``), diverged runs by name, the tuning grid with each
    value's validation metric, and paired differences against the first optimizer."""
    if not rows:
        return "(no runs)\n"
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
            lines.append(f"- {r['inner']} ({', '.join(t['grid'])}): " + "; ".join(cells))
    if paired:
        ref = paired[0]["b"]
        vs = [p for p in paired if p["b"] == ref]
        lines += ["", (f"Paired differences against {ref} (a − b; for {metric} "
                  f"{'higher' if metric == 'accuracy' else 'lower'} is better):"), "",
                  "| a − b | over the same test tasks (seed-mean per task) | over the same seeds |", "|---|---|---|"]
        for p in vs:
            lines.append(f"| {p['a']} − {p['b']} | {_fmt_diff(metric, p['over_tasks'], 'task')} | "
                         f"{_fmt_diff(metric, p['over_seeds'], 'seed')} |")
    return "\n".join(lines).lstrip() + "\n"


# ============================================================================ paper reproduction


def reproduce(
    settings: Sequence[str],
    runs_dir: str | Path,
    *,
    configs_dir: str | Path = "configs",
    overrides: Sequence[str] = (),
    inner: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Train and test each paper setting (``PAPER_SETTINGS`` keys) into ``runs_dir/<setting>``.

    A finished run of the same config is reused, an interrupted one resumed and one of another
    config re-run (:func:`run_config`); a diverged run gives a row with ``status: "diverged"``.
    ``inner`` swaps the inner optimizer (e.g. ``"adafactor"``; its ``*_adafactor.yaml`` config).
    Returns one row per setting with the test metric and the paper's number.
    """
    unknown = [s for s in settings if s not in PAPER_SETTINGS]
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(PAPER_SETTINGS)}")
    rows = []
    for name in settings:
        file, paper = PAPER_SETTINGS[name]
        if inner:
            file = file.replace(".yaml", f"_{inner}.yaml")
        path = Path(configs_dir) / file
        cfg = config_mod.load(path, list(overrides))
        run_dir = Path(runs_dir) / (name + (f"_{inner}" if inner else ""))
        rec = run_config(cfg, run_dir, device=device, log=log, message=f"[reproduce] {name} ({path}) -> {run_dir}")
        res = rec["results"] or {"metric": None, "mean": None, "ci95": None, "iteration": (rec["diverged"] or {}).get("iteration")}
        rows.append({"setting": name, "config": str(path), "run_dir": str(run_dir), "paper": paper,
                     "inner": cfg["inner"]["name"], "status": rec["status"], **res})
    return rows


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


__all__ = [
    "COSMETIC_KEYS",
    "PAPER_SETTINGS",
    "TUNE_SEED_OFFSET",
    "UNTUNABLE_KEYS",
    "compare",
    "config_diff",
    "markdown_table",
    "parse_inner_specs",
    "parse_tune",
    "per_task_test_values",
    "reproduce",
    "reproduction_markdown",
    "run_config",
    "summarize_compare",
    "validation_metric",
    "write_report",
]
