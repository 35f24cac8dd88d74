"""Many runs, one table: inner optimizers compared over seeds, and the MAML paper reproduced.

A single run (:mod:`metaopt.train`) gives one number with a 95% CI over test tasks; whether
an inner optimizer is better needs several seeds of each, and a reproduction needs every
paper setting. This module drives those runs and turns them into reports:

* :func:`compare` - one config, several inner optimizers (``"sgd,adafactor:lr=0.3"``,
  parsed by :func:`parse_inner_specs`), ``seeds`` runs each; :func:`summarize_compare`
  writes ``summary.json``, ``summary.md`` (:func:`markdown_table`: mean ± 95% CI over seeds)
  and ``plots/compare_*.png``.
* :func:`reproduce` - the paper's settings (:data:`PAPER_SETTINGS`), one run each;
  :func:`reproduction_markdown` puts the results next to the paper's numbers.
* :func:`write_report` - a report as ``NAME.json`` and ``NAME.md``.

Both drivers are restartable: a run directory with ``results.json`` is reused and one with
only ``checkpoints/last.pt`` is resumed, so re-running an interrupted command continues it.

Example::

    from metaopt.compare import compare, markdown_table
    summary = compare("configs/sinusoid.yaml", "sgd,adafactor:lr=0.1", seeds=3,
                      out_dir="runs/cmp", overrides=["train.iterations=500"])
    print(markdown_table(summary["rows"], title="sinusoid"))
    # or from the shell: metaopt compare configs/sinusoid.yaml --inner sgd,adafactor --seeds 3
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from metaopt import config as config_mod
from metaopt.config import Config, ConfigError
from metaopt.rundir import write_json
from metaopt.train import RESUMABLE_KEYS, Trainer, make_resumed_trainer

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


def _run_once(cfg: Config, run_dir: Path, *, device: str | None, resume_overrides: Sequence[str] = (),
              log: Callable[[str], None] | None = None, message: str = "") -> dict[str, Any]:
    """Results of the run in ``run_dir``: read if finished, resumed if interrupted, else trained."""
    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return make_resumed_trainer(run_dir, overrides=resume_overrides, device=device).fit()
    if log:
        log(message)
    return Trainer(cfg, run_dir, device=device).fit()


# ============================================================================ compare


def parse_inner_specs(text: str) -> list[tuple[str, list[str]]]:
    """``"sgd,adafactor:lr=0.3:beta2_decay=-0.5"`` -> ``[("sgd", []), ("adafactor:lr=0.3...",
    ["inner.lr=0.3", "inner.beta2_decay=-0.5"])]`` (label, inner overrides)."""
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


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label.replace(":", "_"))


def compare(
    config: str | Path | Mapping[str, Any],
    inner: str | Sequence[str],
    seeds: int,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    device: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train ``config`` with each inner optimizer and ``seeds`` seeds; aggregate and plot.

    Runs go to ``out_dir/<inner>/seed<k>`` (``train.seed`` = the config's seed + k); a run
    with a ``results.json`` is reused and one with only a checkpoint is resumed, so an
    interrupted comparison can be restarted with the same command. Writes
    ``out_dir/summary.json``, ``out_dir/summary.md`` and ``out_dir/plots/compare_*.png``.

    Args:
        inner: ``"sgd,adafactor"`` or a list of specs, each ``NAME[:key=value...]``
            (e.g. ``"adafactor:lr=0.3"``) setting ``inner.*`` keys for that optimizer.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be an int >= 1, got {seeds!r}")
    specs = parse_inner_specs(inner if isinstance(inner, str) else ",".join(inner))
    out_dir = Path(out_dir)
    cfgs = {label: _inner_config(config, overrides, sets) for label, sets in specs}  # validate all first
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, cfg in cfgs.items():
        for k in range(seeds):
            run_dir = out_dir / _slug(label) / f"seed{k}"
            seeded = config_mod.resolve(config_mod.merge(cfg, {"train": {"seed": cfg["train"]["seed"] + k}}))
            res = _run_once(seeded, run_dir, device=device, log=log, message=f"[compare] {label} seed {k} -> {run_dir}")
            runs.setdefault(label, []).append({"run_dir": str(run_dir), **res})
    return summarize_compare(runs, out_dir, title=Path(config).name if isinstance(config, (str, Path)) else "")


def summarize_compare(runs: Mapping[str, list[dict[str, Any]]], out_dir: Path, *, title: str = "") -> dict[str, Any]:
    """Mean ± 95% CI over seeds of each inner optimizer's final test metric; plots and tables."""
    from metaopt import plots

    rows = []
    curves: dict[str, list[tuple[list[float], list[float]]]] = {}
    losses: dict[str, list[tuple[list[float], list[float]]]] = {}
    metric = "metric"
    for label, rs in runs.items():
        finals = [r["mean"] for r in rs if r.get("mean") is not None]
        metric = rs[0].get("metric", metric)
        m, ci = plots.mean_ci(finals)
        before = [r["before"]["mean"] for r in rs if r.get("before")]
        rows.append({
            "inner": label, "seeds": len(rs), "metric": metric, "mean": m, "ci95": ci,
            "per_seed": finals, "task_ci95": [r.get("ci95") for r in rs],
            "before_mean": plots.mean_ci(before)[0] if before else None,
            "tasks": rs[0].get("tasks"), "iterations": rs[0].get("iteration"),
            "run_dirs": [r["run_dir"] for r in rs],
        })
        for r in rs:
            cols = plots.read_metrics(Path(r["run_dir"]) / "metrics.csv")
            curves.setdefault(label, []).append(plots._series(cols, "val_metric"))
            losses.setdefault(label, []).append(plots._series(cols, "meta_loss"))
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = [
        plots.compare_curves(curves, out_dir / "plots" / f"compare_val_{metric}.png", metric=metric, title=title),
        plots.compare_curves(losses, out_dir / "plots" / "compare_meta_loss.png", metric="meta-loss (train)", title=title),
    ]
    summary = {"metric": metric, "rows": rows, "plots": [str(p) for p in pngs]}
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(markdown_table(rows, title=title))
    return summary


# ============================================================================ reports


def _fmt_metric(metric: str, m: float | None, ci: float | None = None) -> str:
    """``"accuracy"`` as a percentage, anything else with 4 decimals; ``"n/a"`` for no value."""
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    if metric == "accuracy":
        return f"{100 * m:.2f}%" + (f" ± {100 * ci:.2f}%" if ci is not None else "")
    return f"{m:.4f}" + (f" ± {ci:.4f}" if ci is not None else "")


def markdown_table(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> str:
    """Markdown table of final test metrics, mean ± 95% CI over seeds."""
    if not rows:
        return "(no runs)\n"
    metric = rows[0]["metric"]
    lines = [f"### {title}" if title else "", "",
             f"| inner optimizer | seeds | iterations | test {metric} (mean ± 95% CI over seeds) | before adaptation | tasks per test |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['inner']} | {r['seeds']} | {r.get('iterations')} | {_fmt_metric(metric, r['mean'], r['ci95'])} | "
            f"{_fmt_metric(metric, r.get('before_mean'))} | {r.get('tasks')} |"
        )
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

    A finished run (``results.json`` present) is reused and an interrupted one resumed.
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
        res = _run_once(cfg, run_dir, device=device,
                        resume_overrides=[o for o in overrides if o.split("=")[0] in RESUMABLE_KEYS],
                        log=log, message=f"[reproduce] {name} ({path}) -> {run_dir}")
        rows.append({"setting": name, "config": str(path), "run_dir": str(run_dir), "paper": paper,
                     "inner": cfg["inner"]["name"], **res})
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
    "PAPER_SETTINGS",
    "compare",
    "markdown_table",
    "parse_inner_specs",
    "reproduce",
    "reproduction_markdown",
    "summarize_compare",
    "write_report",
]
