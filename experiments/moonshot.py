"""Moonshot (issue 17, item 4): meta-learned Adafactor second-moment factors against Meta-SGD.

Sinusoid 10-shot (configs/sinusoid_10shot.yaml: MLP 1-40-40-1, 10 support / 10 query, 1 inner
step in training and 10 at test, meta-batch 25, outer Adam 1e-3), every row at the same budget
(``--iterations`` meta-iterations, ``--seeds`` seeds ``train.seed = 0, 1, ...``, the same 600
fixed test tasks):

* ``maml_sgd``           MAML, SGD lr 0.01 (the lr chosen on validation in the study);
* ``meta_sgd``           Meta-SGD: a learned lr per weight, initialised at 0.01;
* ``meta_sgd_layer``     a learned lr per parameter tensor (6 numbers; MAML++'s LSLR without
  the per-step dimension): does a per-layer rate already explain the gain?
* ``learned_adafactor``  :class:`metaopt.optim.LearnedAdafactor`: learned initial row/column
  second-moment factors (V0 = 1, so lr 0.01 / sqrt(V0) = SGD's first step) and a learned
  constant beta2 (initialised at 0.999);
* ``factored_meta_sgd``  the same with beta2 = 1 fixed: a learned rank-one preconditioner;
* ``log_meta_sgd``       the same unfactored: a positive rate per weight learned in log space
  (Meta-SGD's 1761 numbers, the factors' parametrisation): is it the rank-one structure, or
  positive log-space rates, that matter?

Resumable: each run lives in ``--runs/<row>/seed<k>``; a finished run is reused, an
interrupted one resumed from its checkpoint, a run of another config or row refused. The
report (``summary.json``, ``summary.md``, ``plots/``) goes to ``--results``; it uses the
library's statistics (Student-t CIs over seeds, paired differences on the same test tasks).
Each final checkpoint is tested after 10 inner steps (MAML's sinusoid protocol) and after 1, 2
and 5 (1: the training protocol, and Meta-SGD's own: its rates are learned for one step).

    python experiments/moonshot.py                             # 6 rows x 3 seeds x 5,000 iterations
    python experiments/moonshot.py --iterations 20 --seeds 1 --rows maml_sgd,learned_adafactor   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from metaopt import config as config_mod
from metaopt import stats
from metaopt.compare_report import format_difference, markdown_table, paired_summary, summarize_compare
from metaopt.config import ConfigError
from metaopt.loop import NonFiniteLossError
from metaopt.maml import MAML
from metaopt.optim import LearnedAdafactor
from metaopt.optim.learned import MetaSGD
from metaopt.rundir import load_checkpoint, write_json
from metaopt.runs import config_diff
from metaopt.train import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/sinusoid_10shot.yaml"
LR = 0.01  # SGD's inner lr, chosen on validation tasks in results/study/sinusoid_10shot
SWEEP = (1, 2, 5)  # inner steps at test besides the protocol's 10 (1: the training protocol)

#: row -> (what it is, tuning note, inner optimizer for the model or None for the config's SGD).
ROWS: dict[str, tuple[str, dict[str, Any], Callable[[nn.Module], Any] | None]] = {
    "maml_sgd": ("MAML, SGD lr 0.01", {"inner.lr": LR}, None),
    "meta_sgd": ("Meta-SGD, a learned lr per weight (init 0.01)", {"lr init": LR},
                 lambda m: MetaSGD.from_model(m, LR)),
    "meta_sgd_layer": ("Meta-SGD per layer: a learned lr per parameter tensor (init 0.01)", {"lr init": LR},
                       lambda m: MetaSGD.from_model(m, LR, granularity="tensor")),
    "learned_adafactor": (
        "learned initial Adafactor factors (V0 = 1) + learned beta2 (init 0.999), lr 0.01",
        {"lr": LR, "V0": 1.0, "beta2 init": 0.999},
        lambda m: LearnedAdafactor.from_model(m, lr=LR, init=1.0, beta2=0.999, learn_beta2=True)),
    "factored_meta_sgd": (
        "learned initial Adafactor factors (V0 = 1), beta2 = 1 fixed (rank-one learned preconditioner), lr 0.01",
        {"lr": LR, "V0": 1.0, "beta2": 1.0},
        lambda m: LearnedAdafactor.from_model(m, lr=LR, init=1.0, beta2=1.0, learn_beta2=False)),
    "log_meta_sgd": (
        "Meta-SGD with positive rates learned in log space: unfactored learned V0 per weight, beta2 = 1, "
        "rate lr / sqrt(V0), lr 0.01",
        {"lr": LR, "V0": 1.0, "beta2": 1.0},
        lambda m: LearnedAdafactor.from_model(m, lr=LR, init=1.0, beta2=1.0, learn_beta2=False, factored=False)),
}


def make_trainer(cfg: config_mod.Config, run_dir: Path, row: str) -> Trainer:
    """The config's Trainer with the row's inner optimizer (its learned tensors meta-trained
    with the weights by the config's outer optimizer)."""
    factory = ROWS[row][2]
    trainer = Trainer(cfg, run_dir, inner=factory)
    if factory is not None:
        trainer.custom["inner"] = row  # config.yaml then says its inner section is not what ran
    return trainer


def learned_summary(maml: MAML) -> dict[str, Any]:
    """What the inner optimizer learned: its meta-parameter count and the spread of the
    effective first-step lr per weight (Meta-SGD: the rate; learned factors: lr / sqrt(V0))."""
    inner = maml.inner_optimizer
    out: dict[str, Any] = {"meta_parameters": sum(p.numel() for p in maml.inner_hparams.values())}
    with torch.no_grad():
        if isinstance(inner, MetaSGD):
            # a per-tensor rate counts once for every weight it scales
            rates = torch.cat([torch.broadcast_to(inner.lr[k], p.shape).flatten()
                               for k, p in maml.model.named_parameters()]).double()
        elif isinstance(inner, LearnedAdafactor):
            if inner.beta2_logit is not None:
                out["beta2"] = float(torch.sigmoid(inner.beta2_logit.double()))
            state = inner.init({k: p.detach() for k, p in maml.model.named_parameters()})
            parts = [(LR / torch.sqrt(v)).flatten() for v in state.variance.values()]
            for k, r in state.row.items():
                parts.append((LR / torch.sqrt(r * state.col[k] / r.mean(-2, keepdim=True))).flatten())
            rates = torch.cat(parts).double()
        else:
            return out
    q = torch.quantile(rates, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    out["first_step_lr"] = {"min": q[0], "p10": q[1], "median": q[2], "p90": q[3], "max": q[4],
                            "negative_fraction": float((rates < 0).double().mean())}
    return out


def test_values_at(cfg: config_mod.Config, run_dir: Path, row: str, steps: int) -> dict[str, Any]:
    """Per-task test metric of the run's final checkpoint after ``steps`` inner steps (the
    same fixed test tasks), cached in ``results_test_{steps}step.json``; a diverged task is
    ``None``."""
    path = run_dir / f"results_test_{steps}step.json"
    results = json.loads((run_dir / "results.json").read_text())
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("iteration") == results.get("iteration"):
            return cached
    trainer = make_trainer(cfg, run_dir, row)
    trainer.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt", trainer.device))
    trainer.maml.eval_inner_steps = steps
    test = trainer.evaluate("test")
    assert test is not None
    out = {"iteration": trainer.iteration, "inner_steps": steps, "tasks": test.tasks, "metric": test.metric,
           "diverged_tasks": test.diverged_tasks, "values": test.values}
    write_json(path, out)
    return json.loads(path.read_text())  # non-finite values read back as None


def run_one(cfg: config_mod.Config, run_dir: Path, row: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Train (or reuse, or resume) one run; a record as :func:`metaopt.runs.run_config` gives,
    plus the per-task test values (for paired differences) and ``learned.json``."""
    marker = run_dir / "moonshot_run.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        diffs = config_diff(config_mod.load(run_dir / "config.yaml"), cfg) if (run_dir / "config.yaml").is_file() else []
        other_budget = [d for d in diffs if d[0] != "train.iterations"]
        if saved.get("row") != row or other_budget:
            raise ConfigError(f"{run_dir} holds another run (row {saved.get('row')!r}, config differences "
                              f"{other_budget}); remove it or use another --runs")
        diverged = run_dir / "diverged.json"
        if diverged.is_file():
            return {"run_dir": str(run_dir), "status": "diverged", "results": None,
                    "diverged": json.loads(diverged.read_text())}
        res_path, values = run_dir / "results.json", run_dir / "results_test_values.json"
        if res_path.is_file() and values.is_file():
            results = json.loads(res_path.read_text())
            if results.get("iteration") == cfg["train"]["iterations"]:
                log(f"[moonshot] {row} {run_dir.name}: finished, reused")
                return record(run_dir, results)
    trainer = make_trainer(cfg, run_dir, row)
    ckpt = run_dir / "checkpoints" / "last.pt"
    if ckpt.is_file():
        trainer.load_state_dict(load_checkpoint(ckpt, trainer.device))
        log(f"[moonshot] {row} {run_dir.name}: resuming from iteration {trainer.iteration}")
    else:
        log(f"[moonshot] {row} {run_dir.name}: training {cfg['train']['iterations']} iterations")
    write_json(marker, {"row": row, "rule": ROWS[row][0]})
    try:
        results = trainer.fit()
    except NonFiniteLossError as e:
        info = {"iteration": e.iteration, "value": repr(getattr(e, "value", None)), "message": str(e)}
        write_json(run_dir / "diverged.json", info)
        return {"run_dir": str(run_dir), "status": "diverged", "results": None, "diverged": info}
    test = trainer.evaluate("test")  # the same fixed test tasks again, kept per task
    assert test is not None and test.tasks == results["tasks"]
    write_json(run_dir / "results_test_values.json",
               {"iteration": trainer.iteration, "tasks": test.tasks, "metric": test.metric, "values": test.values})
    write_json(run_dir / "learned.json", learned_summary(trainer.maml))
    return record(run_dir, results)


def record(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """A finished run as :func:`metaopt.runs.run_config` records it: a run whose test metric
    is not finite on some tasks (``mean`` is ``None``) is "diverged", reported, never averaged."""
    if results.get("mean") is not None and math.isfinite(results["mean"]):
        return {"run_dir": str(run_dir), "status": "ok", "results": results, "diverged": None}
    found = re.search(r"on \d+ of \d+ tasks", str(results.get("diverged") or ""))
    where = "test metric" + (f" ({found.group(0)})" if found else "")
    info = {"iteration": results.get("iteration"), "where": where, "message": results.get("diverged")}
    return {"run_dir": str(run_dir), "status": "diverged", "results": results, "diverged": info}


def one_step_pairs(one: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every pair of rows whose seeds all finished at 1 inner step: ``a - b`` over the same
    test tasks (seed-mean per task) and over the same seeds, with Student-t CIs."""
    live = {r: seeds for r, seeds in one.items() if seeds and not any(s["diverged_tasks"] for s in seeds)}
    names = list(live)
    per_task = {r: [math.fsum(vs) / len(vs) for vs in zip(*(s["values"] for s in seeds))] for r, seeds in live.items()}
    per_seed = {r: [stats.mean_ci(s["values"]).mean for s in seeds] for r, seeds in live.items()}
    out = []
    for j, a in enumerate(names):
        for b in names[:j]:
            out.append({"a": a, "b": b, "over_tasks": paired_summary(per_task[a], per_task[b], "test tasks"),
                        "over_seeds": paired_summary(per_seed[a], per_seed[b], "seeds")})
    return out


def report(rows: list[dict[str, Any]], learned: dict[str, list[dict[str, Any]]], out_dir: Path,
           extra: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` / ``summary.md``: the library's comparison table and paired
    differences, every pair of rows, and what each inner optimizer learned."""
    title = "sinusoid 10-shot: learned Adafactor factors vs Meta-SGD"
    sweep = extra.pop("sweep", None) or {}
    one = {r: by_steps[1] for r, by_steps in sweep.items() if 1 in by_steps}
    compact = {r: {steps: [{"mean": None if s["diverged_tasks"] else stats.mean_ci(s["values"]).mean,
                            **{k: v for k, v in s.items() if k != "values"}} for s in seeds]
                   for steps, seeds in by_steps.items()} for r, by_steps in sweep.items()}
    summary = summarize_compare(rows, out_dir, title=title,
                                extra={**extra, "test_steps_sweep": compact, "one_step_paired": one_step_pairs(one),
                                       "learned": learned})
    metric = summary["metric"]
    lines = [f"# {title}", "", f"Command: `{extra['command']}`  ", f"Date: {extra['date']}  ",
             f"Hardware: {extra['hardware']}", "",
             f"Config `configs/sinusoid_10shot.yaml` at {extra['iterations']} meta-iterations for every row, "
             f"seeds {', '.join(map(str, range(extra['seeds'])))}, the same {summary['rows'][0]['tasks']} "
             "fixed test tasks (10 inner steps); mean and Student-t 95% CI over seeds.", "",
             markdown_table(summary["rows"], paired=summary["paired"]).rstrip(), "",
             "All pairs (a − b, lower is better for mse):", "",
             "| a − b | over the same test tasks (seed-mean per task) | over the same seeds |", "|---|---|---|"]
    for p in summary["paired"]:
        lines.append(f"| {p['a']} − {p['b']} | {format_difference('mse', p['over_tasks'])} | "
                     f"{format_difference('mse', p['over_seeds'], 'seed')} |")
    if sweep:
        steps_list = sorted({k for by_steps in sweep.values() for k in by_steps})
        lines += ["", "Test mse by the number of inner steps at test (mean over seeds; a seed whose test diverged "
                  "on some tasks is reported, never averaged):", "",
                  "| row | " + " | ".join(f"{k} step{'s' if k > 1 else ''}" for k in steps_list) + " | 10 steps |",
                  "|---|" + "---|" * (len(steps_list) + 1)]
        for r in summary["rows"]:
            cells = []
            for k in steps_list:
                seeds = compact.get(r["inner"], {}).get(k, [])
                bad = [s["diverged_tasks"] for s in seeds if s["diverged_tasks"]]
                ok = [s["mean"] for s in seeds if s["mean"] is not None]
                if bad:
                    cells.append(f"diverged ({len(bad)} of {len(seeds)} seeds, {min(bad)}–{max(bad)} of "
                                 f"{seeds[0]['tasks']} tasks)")
                else:
                    cells.append(f"{stats.mean_ci(ok).mean:.4f}" if ok else "n/a")
            ten = "diverged" if r["mean"] is None else f"{r['mean']:.4f}"
            lines.append(f"| {r['inner']} | " + " | ".join(cells) + f" | {ten} |")
    if one:
        lines += ["", "The same checkpoints after 1 inner step (the training protocol; Meta-SGD's own test "
                  "protocol), same test tasks:", "",
                  "| row | test mse (mean over seeds) | 95% CI over seeds (Student t) | per seed |", "|---|---|---|---|"]
        for r in summary["rows"]:
            seeds = one.get(r["inner"], [])
            per = [None if s["diverged_tasks"] else stats.mean_ci(s["values"]).mean for s in seeds]
            ok = [v for v in per if v is not None]
            m = stats.mean_ci(ok) if ok else None
            cell = "n/a" if m is None else f"{m.mean:.4f}"
            ci = "n/a" if m is None or m.ci95 is None else f"± {m.ci95:.4f}"
            per_txt = ", ".join("diverged" if v is None else f"{v:.4f}" for v in per)
            lines.append(f"| {r['inner']} | {cell} | {ci} | {per_txt} |")
        lines += ["", "Paired differences after 1 inner step (a − b):", "",
                  "| a − b | over the same test tasks (seed-mean per task) | over the same seeds |", "|---|---|---|"]
        for p in one_step_pairs(one):
            lines.append(f"| {p['a']} − {p['b']} | {format_difference('mse', p['over_tasks'])} | "
                         f"{format_difference('mse', p['over_seeds'], 'seed')} |")
    lines += ["", "Meta-parameters and what was learned (per seed):", "",
              "| row | rule | inner meta-parameters | model meta-parameters | learned beta2 | first-step lr per weight: "
              "min / median / max (negative share) |", "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        seeds = learned.get(r["inner"], [])
        counts = sorted({int(s["meta_parameters"]) for s in seeds})
        beta2 = ", ".join(f"{s['beta2']:.4f}" for s in seeds if "beta2" in s) or "—"
        lrs = "; ".join(f"{s['first_step_lr']['min']:.4g} / {s['first_step_lr']['median']:.4g} / "
                        f"{s['first_step_lr']['max']:.4g} ({100 * s['first_step_lr']['negative_fraction']:.1f}%)"
                        for s in seeds if "first_step_lr" in s) or f"{LR} for every weight"
        lines.append(f"| {r['inner']} | {ROWS[r['inner']][0]} | {', '.join(map(str, counts))} | "
                     f"{extra['model_parameters']} | {beta2} | {lrs} |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default: all of {', '.join(ROWS)})")
    p.add_argument("--iterations", type=int, default=5000, help="meta-iterations for every row (default 5000)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row: train.seed 0..N-1 (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run (smoke tests)")
    p.add_argument("--runs", default="runs/moonshot")
    p.add_argument("--results", default="results/study/moonshot")
    p.add_argument("--hardware", default=f"{platform.machine()} CPU, torch {torch.__version__}",
                   help="hardware line written into the report")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        print(f"moonshot: error: unknown row(s) {unknown}; known: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if args.iterations < 1 or args.seeds < 1:
        print(f"moonshot: error: --iterations and --seeds must be >= 1 but are {args.iterations}, {args.seeds}",
              file=sys.stderr)
        return 2
    overrides = ["train.progress=false", f"train.iterations={args.iterations}", "train.eval_every=500",
                 "train.checkpoint_every=1000", *args.overrides]
    try:
        base = config_mod.load(CONFIG, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"moonshot: error: {e}", file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    records: list[dict[str, Any]] = []
    learned: dict[str, list[dict[str, Any]]] = {}
    sweep: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        runs = []
        for k in range(args.seeds):
            cfg = config_mod.load(CONFIG, [*overrides, f"train.seed={base['train']['seed'] + k}"])
            try:
                runs.append(run_one(cfg, Path(args.runs) / row / f"seed{k}", row, log))
            except ConfigError as e:
                print(f"moonshot: error: {e}", file=sys.stderr)
                return 2
            if runs[-1]["results"] is not None:  # trained to the end (its test may have diverged)
                for steps in SWEEP:
                    sweep.setdefault(row, {}).setdefault(steps, []).append(
                        test_values_at(cfg, Path(runs[-1]["run_dir"]), row, steps))
            learned_path = Path(runs[-1]["run_dir"]) / "learned.json"
            if learned_path.is_file():
                learned.setdefault(row, []).append(json.loads(learned_path.read_text()))
        records.append({"inner": row, "runs": runs,
                        "config": {"train": {"iterations": args.iterations}, "inner": {"rule": ROWS[row][0]}},
                        "tune": {"skipped": "fixed by the experiment", "chosen": ROWS[row][1]}})
    model_parameters = sum(p.numel() for p in Trainer(base).model.parameters())
    extra = {"command": "python experiments/moonshot.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "hardware": args.hardware, "torch": torch.__version__, "config": str(CONFIG.relative_to(REPO)),
             "overrides": overrides, "iterations": args.iterations, "seeds": args.seeds,
             "model_parameters": model_parameters, "sweep": sweep}
    report(records, learned, Path(args.results), extra)
    print(f"moonshot: {Path(args.results) / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
