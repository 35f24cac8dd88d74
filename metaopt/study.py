"""A study of inner optimizers: one setting (config + budget) times several optimizers, each
with its fixed lr tuned on validation tasks, over seeds; resumable, reported per setting.

A study spec is a small YAML file (``configs/study/*.yaml``)::

    name: sinusoid_10shot
    config: ../sinusoid_10shot.yaml      # relative to the spec file
    optimizers: optimizers.yaml          # a list here, or a file holding `optimizers:`
    seeds: 3                             # final seeds per optimizer
    tune_seeds: 1                        # seeds per grid value (disjoint from the final ones)
    overrides: [train.progress=false]    # always applied
    budget: [train.iterations=5000]      # the reduced budget; dropped by full=True
    full: [train.eval_every=10000]       # applied only with full=True

and each optimizer is ``{label, name, kwargs: {...}, tune: {inner.lr: [...]}}``: a
:func:`metaopt.optim.get` name and its constructor arguments. :func:`run_study` hands the
whole setting to :func:`metaopt.compare.compare` (tuning on validation, Student-t CIs over
seeds, paired differences, diverged runs by name) and copies the report to
``results_dir/<name>/``; re-running reuses every finished run whose config matches, so an
interrupted study continues where it stopped and a changed spec re-runs only what changed.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "s.yaml").write_text(
    ...     "name: s\\nconfig: null\\nseeds: 2\\n"
    ...     "optimizers:\\n  - {label: mom, name: sgd, kwargs: {momentum: 0.9}, tune: {inner.lr: [0.01, 0.1]}}\\n")
    >>> study = load_study(d / "s.yaml")
    >>> study.name, study.seeds, study.optimizers[0].entry()
    ('s', 2, {'name': 'sgd', 'momentum': 0.9})
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metaopt.compare import compare, markdown_table, parse_tune, write_report
from metaopt.config import ConfigError

_STUDY_KEYS = {"name", "config", "optimizers", "seeds", "tune_seeds", "overrides", "budget", "full"}
_OPTIMIZER_KEYS = {"label", "name", "kwargs", "tune"}


@dataclass(frozen=True)
class StudyOptimizer:
    """One row of a study: ``metaopt.optim.get(name, **kwargs)``, its lr grid ``tune``."""

    label: str
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    tune: Mapping[str, list[Any]] = field(default_factory=dict)

    def entry(self) -> dict[str, Any]:
        """The ``inner`` entry for :func:`metaopt.compare.compare`: ``{"name": ..., **kwargs}``."""
        return {"name": self.name, **self.kwargs}


@dataclass(frozen=True)
class Study:
    """A parsed study spec (see the module docstring)."""

    name: str
    config: Path | None
    optimizers: tuple[StudyOptimizer, ...]
    seeds: int = 3
    tune_seeds: int = 1
    overrides: tuple[str, ...] = ()
    budget: tuple[str, ...] = ()
    full: tuple[str, ...] = ()


def _mapping(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    return data


def _strings(data: Any, what: str) -> tuple[str, ...]:
    if data is None:
        return ()
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise ConfigError(f"{what} must be a list of KEY=VALUE strings, got {data!r}")
    return tuple(data)


def _optimizers(data: Any, base: Path, where: str) -> tuple[StudyOptimizer, ...]:
    if isinstance(data, str):  # a file holding `optimizers:`
        path = base / data
        data = _mapping(yaml.safe_load(path.read_text()), str(path)).get("optimizers")
        where = str(path)
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: 'optimizers' must be a non-empty list")
    out = []
    for i, raw in enumerate(data):
        o = _mapping(raw, f"{where}: optimizers[{i}]")
        unknown = sorted(set(o) - _OPTIMIZER_KEYS)
        if unknown:
            raise ConfigError(f"{where}: optimizers[{i}]: unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(_OPTIMIZER_KEYS))}")
        if not isinstance(o.get("name"), str) or not o["name"]:
            raise ConfigError(f"{where}: optimizers[{i}] needs a 'name' (a metaopt.optim name)")
        label = str(o.get("label", o["name"]))
        out.append(StudyOptimizer(label, o["name"], dict(_mapping(o.get("kwargs") or {}, f"{label}: kwargs")),
                                  parse_tune(dict(_mapping(o.get("tune") or {}, f"{label}: tune")))))
    labels = [o.label for o in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"{where}: optimizer label(s) {', '.join(dup)} used twice")
    return tuple(out)


def _count(spec: Mapping[str, Any], key: str, default: int, where: str) -> int:
    v = spec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{where}: '{key}' must be an int >= 1 but is: {v!r}")
    return v


def load_study(path: str | Path) -> Study:
    """Read and check a study spec; paths in it are relative to the spec file.

    Raises:
        ConfigError: unknown keys, a missing name or optimizer list, counts < 1, a bad grid.
    """
    path = Path(path)
    spec = _mapping(yaml.safe_load(path.read_text()), str(path))
    unknown = sorted(set(spec) - _STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_STUDY_KEYS))}")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ConfigError(f"{path}: needs a 'name' (the folder of its runs and results)")
    config = spec.get("config")
    return Study(
        name=spec["name"],
        config=(path.parent / config).resolve() if config is not None else None,
        optimizers=_optimizers(spec.get("optimizers"), path.parent, str(path)),
        seeds=_count(spec, "seeds", 3, str(path)),
        tune_seeds=_count(spec, "tune_seeds", 1, str(path)),
        overrides=_strings(spec.get("overrides"), f"{path}: 'overrides'"),
        budget=_strings(spec.get("budget"), f"{path}: 'budget'"),
        full=_strings(spec.get("full"), f"{path}: 'full'"),
    )


def run_study(
    study: Study,
    runs_dir: str | Path,
    results_dir: str | Path,
    *,
    full: bool = False,
    tune_at_budget: bool = False,
    only: Sequence[str] | None = None,
    report: bool = False,
    overrides: Sequence[str] = (),
    device: str | None = None,
    rerun: bool = True,
    retry_diverged: bool = False,
    jobs: int = 1,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run (or continue) one study setting and write its report.

    Runs go to ``runs_dir/<name>`` (``<name>_full`` with ``full``: the budget overrides
    dropped, i.e. the config's own schedule); the report (``summary.json``, ``summary.md``,
    ``plots/``) to ``results_dir/<name>[_full]/``, and ``results_dir/README.md`` indexes
    every setting reported there.

    Args:
        full: the config's own schedule (the spec's ``budget`` dropped, its ``full`` applied).
        tune_at_budget: with ``full``, choose each optimizer's values on the reduced budget's
            tuning runs (``runs_dir/<name>/<label>/tune``, reused when they exist) and train
            only the final seeds on the full schedule; the report says so.
        only: optimizer labels to run (default: all). The report still has every optimizer
            whose runs are finished (the others only looked up, never trained), so processes
            that each run some labels all write the whole report; unfinished rows are named.
        report: train nothing; report the finished runs of every optimizer.
        overrides: extra ``--set`` items, applied last.
        rerun, retry_diverged, jobs: as in :func:`~metaopt.compare.compare`.

    Raises:
        ConfigError: ``tune_at_budget`` without ``full``, an unknown label in ``only``, an
            optimizer name that this installation does not provide (named, with the known
            ones), or any bad config.
    """
    from metaopt import optim

    if tune_at_budget and not full:
        raise ConfigError("tune_at_budget needs full=True (--tune-at-budget goes with --full)")
    chosen = list(study.optimizers)
    labels = [o.label for o in chosen]
    if only:
        unknown = [x for x in only if x not in labels]
        if unknown:
            raise ConfigError(f"--only: unknown optimizer label(s) {', '.join(unknown)}; known: {', '.join(labels)}")
    trained = set() if report else {x for x in labels if not only or x in only}
    missing = sorted({o.name for o in chosen if o.label in trained and o.name.lower() not in optim.names()})
    # Looked-up rows whose optimizer this installation lacks cannot even be configured: named.
    absent = [o for o in chosen if o.label not in trained and o.name.lower() not in optim.names()]
    chosen = [o for o in chosen if o not in absent]
    if missing:
        raise ConfigError(f"study {study.name!r} needs inner optimizer(s) {', '.join(missing)} that this "
                          f"installation lacks (known: {', '.join(optim.names())}); run the others with --only")
    name = study.name + ("_full" if full else "")
    sets = [*study.overrides, *(study.full if full else study.budget), *overrides]
    # tune_at_budget: the tuning runs are exactly the reduced study's (same overrides, same folder).
    tune_sets = [*study.overrides, *study.budget, *overrides] if tune_at_budget else None
    summary = compare(
        study.config if study.config is not None else {}, {o.label: o.entry() for o in chosen}, study.seeds,
        Path(runs_dir) / name, overrides=sets, grids={o.label: o.tune for o in chosen if o.tune},
        tune=None, tune_seeds=study.tune_seeds, tune_overrides=tune_sets,
        tune_dir=Path(runs_dir) / study.name if tune_at_budget else None, rerun=rerun,
        retry_diverged=retry_diverged, jobs=jobs, device=device, log=log,
        report_only=[o.label for o in chosen if o.label not in trained],
    )
    summary["not_finished"] += [f"{o.label}: inner optimizer {o.name!r} is not in this installation" for o in absent]
    out = Path(results_dir) / name
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots = [Path(shutil.copyfile(png, out / "plots" / png.name)) for png in map(Path, summary["plots"])]
    budget = "the config's full schedule" if full else ("reduced budget: `" + " ".join(study.budget) + "`"
                                                         if study.budget else "the config's schedule")
    if full and study.full:
        budget += " with `" + " ".join(study.full) + "`"
    if overrides:
        budget += ", then `" + " ".join(overrides) + "`"
    where = (" at the reduced budget (`" + " ".join(study.budget) + "`, the tuning runs of "
             f"`{study.name}`)") if tune_at_budget else ""
    md = (f"## {name}\n\nConfig `{study.config.name if study.config else 'defaults'}`, {budget}; "
          f"{study.seeds} seeds per optimizer, each optimizer's lr chosen on validation tasks{where} "
          f"({study.tune_seeds} tuning seed(s) per value).\n\n"
          + markdown_table(summary["rows"], paired=summary["paired"], not_finished=summary["not_finished"])
          + "\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n")
    write_report(out, "summary", {**summary, "study": study.name, "full": full, "budget": list(study.budget),
                                  "tuned_at_budget": tune_at_budget}, md)
    _write_index(Path(results_dir))
    return summary


def _report(folder: Path) -> str | None:
    """The name of ``folder``'s report (``README.md``, else ``summary.md``), if it has one."""
    return next((n for n in ("README.md", "summary.md") if (folder / n).is_file()), None)


def _write_index(results_dir: Path) -> Path:
    """``results_dir/README.md``: every study setting's report, in name order, then links to
    the folder's other reports (a ``metaopt compare`` or a script writing beside the study), so
    that a two-row comparison is not read as a setting of the study."""
    parts = ["# Inner-optimizer study\n",
             ("One section per setting (written by `experiments/study.py`; specs in `configs/study/`). "
             "Test metric: mean and Student-t 95% CI over seeds; each optimizer's lr chosen on validation "
             "tasks; paired differences on the same test tasks; diverged runs listed by name.\n")]
    others: list[str] = []
    for sub in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        md, js = sub / "summary.md", sub / "summary.json"
        try:
            is_study = "study" in json.loads(js.read_text())
        except (OSError, ValueError):
            is_study = False
        if is_study and md.is_file():
            parts.append(md.read_text().replace("](plots/", f"]({sub.name}/plots/"))
        else:  # a report's folder, or a folder of them (one level down)
            for d in [sub] if _report(sub) else sorted(c for c in sub.iterdir() if c.is_dir() and _report(c)):
                rel = d.relative_to(results_dir).as_posix()
                others.append(f"- [{rel}]({rel}/{_report(d)})")
    if others:
        parts.append("## Other reports in this folder\n\nNot settings of the study: "
                     "their own commands and protocols are in each report.\n\n" + "\n".join(others) + "\n")
    path = results_dir / "README.md"
    path.write_text("\n".join(parts))
    return path


__all__ = ["Study", "StudyOptimizer", "load_study", "run_study"]
