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
  listed by name and never averaged. It and the other report writers live in
  :mod:`metaopt.compare_report` and are re-exported here.
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
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from metaopt import config as config_mod
from metaopt import stats
from metaopt.compare_report import markdown_table, reproduction_markdown, summarize_compare, write_report
from metaopt.compare_report import _fmt_ci, _fmt_metric  # noqa: F401  (the formats, for callers of compare._fmt_*)
from metaopt.compare_report import _run_device
from metaopt.config import Config, ConfigError
from metaopt.runs import (
    COSMETIC_KEYS,
    RunPool,
    _yaml_value,
    config_diff,
    finished_run,
    per_task_test_values,
    run_config,
    test_tasks_sha256,
    validation_metric,
)

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


class _Plan(NamedTuple):
    """One ``--inner`` entry of :func:`compare`, resolved before anything trains."""

    label: str
    base: Config  # the entry's config (no grid point applied)
    grid: dict[str, list[Any]]  # the keys tuned and their values (``fixed`` keys removed)
    fixed: dict[str, list[Any]]  # grid keys the entry sets itself: not tuned
    points: list[dict[str, Any]]  # the grid's points, key -> value
    point_cfgs: list[Config]  # ``base`` at each point (the final seeds' budget)
    tune_cfgs: list[Config]  # the same points on the tuning budget


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
    tune_overrides: Sequence[str] | None = None,
    tune_dir: str | Path | None = None,
    rerun: bool = True,
    retry_diverged: bool = False,
    jobs: int = 1,
    report_only: Collection[str] = (),
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
        tune_overrides: ``--set`` items for the tuning runs INSTEAD of ``overrides`` (default:
            the same): tune on a reduced budget, then train the final seeds on the full one.
            The chosen values are applied to the final runs' config.
        tune_dir: folder of the tuning runs, ``<tune_dir>/<inner>/tune/...`` (default:
            ``out_dir``), e.g. a reduced-budget comparison whose tuning runs are reused.
        rerun: re-run a run directory whose config differs (False: refuse, naming the key).
        retry_diverged: train again the runs recorded as diverged (default: reuse the record).
        jobs: runs at a time, in worker processes (:class:`~metaopt.runs.RunPool`): every
            tuning run is queued first, each optimizer's final seeds as soon as its value is
            chosen. The results do not depend on it.
        report_only: labels whose runs are only looked up (:func:`~metaopt.runs.finished_run`),
            never trained: a row whose runs are not all finished is left out of the report and
            named under "Not finished" (e.g. a report of every optimizer while some still train
            in other processes).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (default: the config's).
        log: progress messages (``None``: silent).

    Returns:
        The summary written to ``summary.json`` (see :func:`summarize_compare`).

    Raises:
        ConfigError: bad arguments or configs (checked for every run before any training),
            or a stale run directory with ``rerun=False``.
    """
    for name, v in (("--seeds", seeds), ("--tune-seeds", tune_seeds), ("--jobs", jobs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
    specs = _specs(inner)
    out_dir = Path(out_dir)
    default_grid = parse_tune(tune)
    unknown = sorted(set(grids or {}) - {label for label, _ in specs})
    if unknown:
        raise ConfigError(f"grids for unknown --inner label(s) {', '.join(unknown)}")
    unknown = sorted(set(report_only) - {label for label, _ in specs})
    if unknown:
        raise ConfigError(f"report_only names unknown --inner label(s) {', '.join(unknown)}")
    # Every config (each optimizer, each grid point) is resolved before anything trains.
    plans: list[_Plan] = []
    for label, sets in specs:
        base = _inner_config(config, overrides, sets)
        grid = parse_tune(grids[label]) if grids and label in grids else default_grid
        fixed = {k: v for k, v in grid.items() if any(s.startswith(k + "=") for s in sets)}
        grid = {k: v for k, v in grid.items() if k not in fixed}
        points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
        point_cfgs = [_with(base, p) for p in points]
        # The tuning runs' own configs: the same points on the tuning budget, when one is given.
        tune_cfgs = (point_cfgs if tune_overrides is None
                     else [_with(_inner_config(config, tune_overrides, sets), p) for p in points])
        plans.append(_Plan(label, base, grid, fixed, points, point_cfgs, tune_cfgs))

    rows: list[dict[str, Any]] = []
    finals: list[tuple[dict[str, Any], list[tuple[Config, Path, str]]]] = []
    not_finished: list[tuple[str, str]] = []
    tune_runs: dict[str, list[list[tuple[Config, Path, str]]]] = {}

    def add_row(plan: _Plan, pool: RunPool | None) -> None:
        """One optimizer's row: trained on ``pool``, or (``None``) only looked up."""
        label, base, grid, fixed, points, point_cfgs, tune_cfgs = plan
        slug = out_dir / _slug(label)
        fetch = pool.result if pool is not None else _lookup
        tuning: dict[str, Any] | None = None
        final_cfg = base
        if points:
            tuning = _tune(grid, points, tune_cfgs, tune_runs[label], fetch, device=device)
            if tuning is None:
                done = sum(finished_run(*run[:2]) is not None for runs in tune_runs[label] for run in runs)
                not_finished.append((label, f"{label}: tuning, {done} of {sum(map(len, tune_runs[label]))} runs finished"))
                return
            if tuning["chosen"] is None:  # every grid point diverged: nothing to train
                rows.append({"inner": label, "config": base, "runs": [], "tune": tuning})
                return
            final_cfg = point_cfgs[tuning["chosen_index"]]
        elif fixed:
            tuning = {"skipped": f"{', '.join(fixed)} set by the --inner entry",
                      "chosen": {k: _get(base, k) for k in fixed}}
        seed_runs = [(_with(final_cfg, {"train.seed": final_cfg["train"]["seed"] + k}), slug / f"seed{k}",
                      f"[compare] {label} seed {k} -> {slug / f'seed{k}'}") for k in range(seeds)]
        row: dict[str, Any] = {"inner": label, "config": final_cfg, "runs": seed_runs, "tune": tuning}
        if pool is None:
            found = [_lookup(*run) for run in seed_runs]
            if any(r is None for r in found):
                not_finished.append((label, f"{label}: {sum(r is not None for r in found)} of {seeds} seeds finished"))
                return
            row["runs"] = found
            rows.append(row)
            return
        for run in seed_runs:
            pool.submit(*run)
        rows.append(row)
        finals.append((row, seed_runs))
        if not pool.parallel:  # one at a time: each optimizer's row is finished before the next
            row["runs"] = [pool.result(*run) for run in seed_runs]

    with RunPool(jobs, device=device, rerun=rerun, retry_diverged=retry_diverged, log=log) as pool:
        # Every tuning run is queued before any is waited for (a no-op when jobs == 1).
        for plan in plans:
            root = (Path(tune_dir) if tune_dir is not None else out_dir) / _slug(plan.label) / "tune"
            tune_runs[plan.label] = _tuning_runs(plan.label, plan.points, plan.tune_cfgs, root, tune_seeds)
            for point_runs in tune_runs[plan.label] if plan.label not in report_only else ():
                for run in point_runs:
                    pool.submit(*run)
        for plan in plans:
            if plan.label not in report_only:
                add_row(plan, pool)
        for row, seed_runs in finals:
            if pool.parallel:
                row["runs"] = [pool.result(*run) for run in seed_runs]
    # Rows only looked up, looked up now that this process's training is done: another
    # process (`experiments/study.py --only`) may have finished them in the meantime.
    for plan in plans:
        if plan.label in report_only:
            add_row(plan, None)
    order = {plan.label: i for i, plan in enumerate(plans)}
    rows.sort(key=lambda r: order[r["inner"]])
    not_finished.sort(key=lambda x: order[x[0]])
    title = Path(config).name if isinstance(config, (str, Path)) else ""
    return summarize_compare(rows, out_dir, title=title, device=device, not_finished=[m for _, m in not_finished],
                             extra={"config": str(config) if isinstance(config, (str, Path)) else None,
                                    "overrides": list(overrides), "seeds": seeds,
                                    "tune_request": {"grid": default_grid, "grids": dict(grids or {}),
                                                     "seeds": tune_seeds, "split": "val",
                                                     "overrides": (list(overrides) if tune_overrides is None
                                                                   else list(tune_overrides)),
                                                     "dir": str(tune_dir) if tune_dir is not None else None}})


def _get(cfg: Config, key: str) -> Any:
    s, _, k = key.partition(".")
    return cfg[s][k]


def _tuning_runs(label: str, points: list[dict[str, Any]], point_cfgs: list[Config], tune_dir: Path,
                 tune_seeds: int) -> list[list[tuple[Config, Path, str]]]:
    """Per grid point, per tuning seed: ``(config, run directory, log message)``."""
    out = []
    for point, cfg in zip(points, point_cfgs):
        runs = []
        for k in range(tune_seeds):
            # Tuning runs only need their checkpoint and metrics: no per-run figures or event files.
            seeded = _with(cfg, {"train.seed": cfg["train"]["seed"] + TUNE_SEED_OFFSET + k,
                                 "train.plots": False, "train.tensorboard": False})
            run_dir = tune_dir / _point_slug(point) / f"seed{k}"
            runs.append((seeded, run_dir, f"[compare] tuning {label} {_point_slug(point)} seed {k} -> {run_dir}"))
        out.append(runs)
    return out


def _lookup(cfg: Config, run_dir: Path, message: str = "") -> dict[str, Any] | None:
    return finished_run(cfg, run_dir)


def _tune(grid: Mapping[str, list[Any]], points: list[dict[str, Any]], point_cfgs: list[Config],
          runs: list[list[tuple[Config, Path, str]]], fetch: Callable[..., dict[str, Any] | None], *,
          device: str | None) -> dict[str, Any] | None:
    """Every grid point's tuning runs (``fetch``: trained, or only looked up), scored on
    validation tasks; the choice. ``None`` when a looked-up run is not finished."""
    results: list[dict[str, Any]] = []
    metric = None
    for cfg, point_runs in zip(point_cfgs, runs):
        vals: list[float | None] = []
        diverged = []
        devices = []
        for run in point_runs:
            rec = fetch(*run)
            if rec is None:
                return None
            run_dir = run[1]
            devices.append(_run_device({**rec, "run_dir": str(run_dir)}))
            metric = metric or (rec["results"] or {}).get("metric")
            v = validation_metric(run_dir, device=device) if rec["status"] == "ok" else None
            if v is None or not math.isfinite(v):
                diverged.append(str(run_dir))
                v = None
            vals.append(v)
        finite = [v for v in vals if v is not None]
        score = stats.mean_ci(finite).mean if finite and not diverged else None
        results.append({"values": {k: _get(cfg, k) for k in grid}, "val_metric": score, "per_seed": vals,
                        "diverged": diverged, "devices": devices})
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
    # Omniglot draws its tasks on the device that holds the images, so grid values trained on
    # different device types were scored on different validation tasks: said in the report.
    kinds = sorted({d for r in results for d in r["devices"] if d})
    return {"split": "val", "metric": metric, "grid": {k: list(v) for k, v in grid.items()},
            "seeds": len(runs[0]) if runs else 0, "results": results, "chosen_index": best,
            "chosen": results[best]["values"] if best is not None else None, "at_edge": at_edge,
            "devices": kinds}


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
    "finished_run",
    "per_task_test_values",
    "test_tasks_sha256",
    "reproduce",
    "reproduction_markdown",
    "run_config",
    "summarize_compare",
    "validation_metric",
    "write_report",
]
