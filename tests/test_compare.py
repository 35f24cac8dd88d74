"""metaopt.compare: --inner specs and --tune grids, tuning on validation tasks (never test),
stale-run detection, Student-t intervals over seeds, paired differences, diverged runs, one-seed
output, reports, restartable runs and the ``metaopt compare`` command in-process. (The command as a subprocess: test_cli.py; the scripts:
test_experiments.py.)"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
import scipy.stats

from metaopt import cli
from metaopt import compare as C
from metaopt import compare_report as R
from metaopt import config as config_mod
from metaopt import runs as runs_mod
from metaopt.config import ConfigError
from metaopt.train import evaluate_run

REPO = Path(__file__).resolve().parents[1]
QUICK = ["train.iterations=2", "train.eval_every=1", "train.eval_tasks=2", "train.test_tasks=4",
         "train.meta_batch_size=2", "train.progress=false", "train.plots=false", "train.tensorboard=false"]


def t_half_width(values: list[float]) -> float:
    """The reference: scipy's Student-t quantile with n-1 df times the standard error."""
    n = len(values)
    return float(scipy.stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


# ---------------------------------------------------------------------------- parsing


def test_parse_inner_specs() -> None:
    assert C.parse_inner_specs(" sgd, adafactor:lr=0.3:beta2_decay=-0.5 ,") == [
        ("sgd", ["inner.name=sgd"]),
        ("adafactor:lr=0.3:beta2_decay=-0.5", ["inner.name=adafactor", "inner.lr=0.3", "inner.beta2_decay=-0.5"]),
    ]
    assert C._specs({"mom": "sgd:momentum=0.9"}) == [("mom", ["inner.name=sgd", "inner.momentum=0.9"])]
    with pytest.raises(ConfigError, match="expected one"):
        C._specs({"two": "sgd,adafactor"})


@pytest.mark.parametrize("text, match", [
    ("", "at least one"), (" , ", "at least one"), ("sgd,sgd", "twice"), ("adafactor:lr", "expected NAME"),
])
def test_parse_inner_specs_rejects(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        C.parse_inner_specs(text)


def test_parse_tune() -> None:
    assert C.parse_tune(None) == {} and C.parse_tune([]) == {}
    assert C.parse_tune(["inner.lr=0.003,0.01,1", "inner.steps=1,2"]) == {"inner.lr": [0.003, 0.01, 1],
                                                                        "inner.steps": [1, 2]}
    assert C.parse_tune({"inner.lr": (0.1, 0.2)}) == {"inner.lr": [0.1, 0.2]}


@pytest.mark.parametrize("items, match", [
    (["inner.lr"], "expected KEY=V1,V2"), (["=1,2"], "expected KEY=V1,V2"),
    (["lr=0.1"], "expected SECTION.KEY"), (["optim.lr=0.1"], "expected SECTION.KEY"),
    (["train.seed=0,1"], "'train.seed' cannot be tuned"), (["inner.name=sgd,adafactor"], "cannot be tuned"),
    (["inner.lr=0.1", "inner.lr=0.2"], "given twice"), (["inner.lr="], "at least one value"),
    (["inner.lr=0.1,0.1"], "repeated"),
])
def test_parse_tune_rejects(items: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        C.parse_tune(items)


def test_inner_config_drops_the_other_optimizers_keys() -> None:
    base = {"inner": {"name": "adafactor", "lr": 0.1, "steps": 3, "beta2_decay": -0.5}}
    same = C._inner_config(base, [], ["inner.name=adafactor", "inner.lr=0.3"])["inner"]
    assert (same["lr"], same["steps"], same["beta2_decay"]) == (0.3, 3, -0.5)
    other = C._inner_config(base, ["inner.steps=2"], ["inner.name=sgd"])["inner"]
    assert other["name"] == "sgd" and other["lr"] == 0.1 and other["steps"] == 2 and "beta2_decay" not in other


def test_better_follows_the_metric() -> None:
    assert C._better("accuracy")(0.9, 0.8) and not C._better("accuracy")(0.8, 0.9)
    assert C._better("mse")(0.1, 0.2) and not C._better("mse")(0.2, 0.1)


def test_slug_and_config_diff() -> None:
    assert C._slug("adafactor:lr=0.1") == "adafactor_lr=0.1"
    assert C._slug("a b/c") == "a_b_c"
    a = config_mod.resolve({"inner": {"steps": 1}})
    b = config_mod.resolve({"inner": {"steps": 1}, "train": {"device": "cpu", "progress": False},
                            "task": {"root": "/elsewhere"}})
    assert C.config_diff(a, b) == []  # where a run happens and what it draws are not its identity
    c = config_mod.resolve({"inner": {"steps": 2, "eval_steps": 1}, "train": {"iterations": 7}})
    assert C.config_diff(a, c) == [("inner.steps", 1, 2), ("train.iterations", 5000, 7)]


# ---------------------------------------------------------------------------- reports (no training)


def _fake_run(tmp: Path, name: str, values: list[float], metric: str = "mse",
              tasks_sha256: str | None = None) -> dict[str, Any]:
    """A finished run directory whose results.json holds its per-task test values."""
    d = tmp / name
    d.mkdir(parents=True)
    res = {"metric": metric, "mean": sum(values) / len(values), "ci95": 0.0, "tasks": len(values),
           "iteration": 10, "before": {"mean": 2.0}, "values": values}
    if tasks_sha256 is not None:
        res["tasks_sha256"] = tasks_sha256
    (d / "results.json").write_text(json.dumps(res))
    return {"run_dir": str(d), "status": "ok", "results": res, "diverged": None}


def _row(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"inner": label, "config": config_mod.resolve({"train": {"iterations": 10}}), "runs": runs, "tune": None}


def test_student_t_ci_paired_differences_and_diverged_runs(tmp_path: Path) -> None:
    # Three seeds of A and B on the same 5 test tasks, plus a diverged fourth seed of B.
    a = [[0.50, 0.70, 0.40, 0.90, 0.60], [0.55, 0.65, 0.45, 0.95, 0.50], [0.45, 0.80, 0.35, 0.85, 0.70]]
    b = [[0.60, 0.75, 0.55, 1.00, 0.65], [0.70, 0.70, 0.50, 1.10, 0.60], [0.50, 0.90, 0.45, 0.90, 0.80]]
    runs_a = [_fake_run(tmp_path, f"a{k}", v) for k, v in enumerate(a)]
    runs_b = [_fake_run(tmp_path, f"b{k}", v) for k, v in enumerate(b)]
    runs_b.append({"run_dir": str(tmp_path / "b3"), "status": "diverged", "results": None,
                   "diverged": {"iteration": 7, "value": "nan"}})
    s = C.summarize_compare([_row("A", runs_a), _row("B", runs_b)], tmp_path / "out", title="t")
    ra, rb = s["rows"]
    finals_a = [sum(v) / 5 for v in a]
    finals_b = [sum(v) / 5 for v in b]
    assert ra["mean"] == pytest.approx(statistics.mean(finals_a))
    assert ra["ci95"] == pytest.approx(t_half_width(finals_a), rel=1e-9)
    assert ra["ci95"] > 1.96 * statistics.pstdev(finals_a) / math.sqrt(3) * 2  # the old rule was >2x too narrow
    # The diverged seed is reported by name and never averaged.
    assert rb["seeds"] == 4 and rb["finite_seeds"] == 3 and rb["per_seed"][3] is None
    assert rb["mean"] == pytest.approx(statistics.mean(finals_b))
    assert rb["ci95"] == pytest.approx(t_half_width(finals_b), rel=1e-9)
    assert rb["diverged"] == [{"run_dir": str(tmp_path / "b3"), "iteration": 7, "value": "nan"}]
    # Paired over tasks: seed-mean per task of B minus A, against scipy's paired t interval.
    (p,) = s["paired"]
    assert (p["a"], p["b"]) == ("B", "A")
    ta = [statistics.mean(col) for col in zip(*a)]
    tb = [statistics.mean(col) for col in zip(*b)]
    ref = scipy.stats.ttest_rel(tb, ta).confidence_interval(0.95)
    assert p["over_tasks"]["n"] == 5
    assert p["over_tasks"]["mean"] - p["over_tasks"]["ci95"] == pytest.approx(ref.low, rel=1e-9)
    assert p["over_tasks"]["mean"] + p["over_tasks"]["ci95"] == pytest.approx(ref.high, rel=1e-9)
    ref_seeds = scipy.stats.ttest_rel(finals_b, finals_a).confidence_interval(0.95)
    assert p["over_seeds"]["n"] == 3
    assert p["over_seeds"]["mean"] + p["over_seeds"]["ci95"] == pytest.approx(ref_seeds.high, rel=1e-9)
    md = (tmp_path / "out/summary.md").read_text()
    assert "| B | 3 of 4 (1 diverged) |" in md and str(tmp_path / "b3") in md and "never averaged" in md
    assert "| B − A |" in md and "(n = 5)" in md
    saved = json.loads((tmp_path / "out/summary.json").read_text())
    assert saved["rows"][1]["per_seed"][3] is None and saved["ci"].startswith("Student t")
    for png in ("compare_final_mse.png", "compare_val_mse.png", "compare_meta_loss.png"):
        assert (tmp_path / "out/plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_one_seed_has_no_interval(tmp_path: Path) -> None:
    s = C.summarize_compare([_row("A", [_fake_run(tmp_path, "a0", [0.4, 0.6])]),
                             _row("B", [_fake_run(tmp_path, "b0", [0.5, 0.9])])], tmp_path / "out")
    assert s["rows"][0]["ci95"] is None and s["rows"][0]["mean"] == pytest.approx(0.5)
    md = (tmp_path / "out/summary.md").read_text()
    assert "| 0.5000 | n/a (1 seed) |" in md and "± 0.0000" not in md
    # Over tasks there are two paired values; over seeds one: no interval there either.
    p = s["paired"][0]
    assert p["over_tasks"]["n"] == 2 and p["over_tasks"]["ci95"] is not None
    assert p["over_seeds"]["n"] == 1 and p["over_seeds"]["ci95"] is None
    assert "+0.2000, CI n/a (1 seed)" in md


def test_runs_without_values_or_checkpoint_pair_over_seeds_only(tmp_path: Path) -> None:
    # Run directories copied back without checkpoints, from before per-task values were
    # saved: the report still pairs over seeds and says why it cannot pair over tasks.
    runs = {}
    for label, finals in (("A", [0.4, 0.5]), ("B", [0.7, 0.9])):
        runs[label] = [_fake_run(tmp_path, f"{label}{k}", [v, v]) for k, v in enumerate(finals)]
        for r in runs[label]:
            res = json.loads((Path(r["run_dir"]) / "results.json").read_text())
            del res["values"]
            (Path(r["run_dir"]) / "results.json").write_text(json.dumps(res))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        C.per_task_test_values(runs["A"][0]["run_dir"])
    s = C.summarize_compare([_row("A", runs["A"]), _row("B", runs["B"])], tmp_path / "out")
    (p,) = s["paired"]
    assert p["over_tasks"]["mean"] is None and "no checkpoint" in p["over_tasks"]["note"]
    assert p["over_seeds"]["n"] == 2 and p["over_seeds"]["mean"] == pytest.approx(0.35)


def test_runs_on_different_test_tasks_are_not_paired_over_tasks(tmp_path: Path) -> None:
    """Per-task values pair only when the tasks' hashes agree: rows tested on other tasks (CPU
    against CUDA Omniglot), or a row mixing both, pair over seeds only, and say why."""
    v = [0.5, 0.6, 0.7]
    rows = [_row("A", [_fake_run(tmp_path, f"a{k}", v, tasks_sha256="cpu") for k in range(2)]),
            _row("B", [_fake_run(tmp_path, f"b{k}", [x + 0.1 for x in v], tasks_sha256="cpu") for k in range(2)]),
            _row("C", [_fake_run(tmp_path, f"c{k}", v, tasks_sha256="cuda") for k in range(2)]),
            _row("D", [_fake_run(tmp_path, "d0", v, tasks_sha256="cpu"), _fake_run(tmp_path, "d1", v, tasks_sha256="cuda")]),
            _row("E", [_fake_run(tmp_path, f"e{k}", v) for k in range(2)])]  # older than the hash
    s = C.summarize_compare(rows, tmp_path / "out")
    over = {(p["a"], p["b"]): p["over_tasks"] for p in s["paired"]}
    assert over[("B", "A")]["n"] == 3 and over[("B", "A")]["mean"] == pytest.approx(0.1)
    assert over[("C", "A")]["note"] == "not paired: the two rows were tested on different tasks (e.g. CPU and CUDA)"
    assert over[("D", "A")]["note"] == "not paired: D's seeds were tested on different tasks (e.g. CPU and CUDA)"
    assert over[("E", "A")]["n"] == 3 and over[("E", "C")]["n"] == 3  # no hash: taken to agree, as before
    assert all(p["over_seeds"]["n"] == 2 for p in s["paired"])  # seeds still pair
    assert "tested on different tasks" in (tmp_path / "out/summary.md").read_text()


def test_devices_per_seed_are_listed_when_runs_used_more_than_one(tmp_path: Path) -> None:
    runs = [_fake_run(tmp_path, f"a{k}", [0.5, 0.6]) for k in range(3)]
    for r, dev in zip(runs, ("cuda", "cuda", "cpu")):
        r["results"]["device"] = dev
    same = [_fake_run(tmp_path, f"b{k}", [0.4, 0.5]) for k in range(2)]
    (Path(same[1]["run_dir"]) / "config.yaml").write_text("train: {device: cuda}\n")  # older run: the config says
    s = C.summarize_compare([_row("A", runs), _row("B", same)], tmp_path / "out")
    assert [r["devices"] for r in s["rows"]] == [["cuda", "cuda", "cpu"], [None, "cuda"]]
    md = (tmp_path / "out/summary.md").read_text()
    assert "- A: cuda, cuda, cpu" in md and "- B: unknown, cuda" in md
    one = C.summarize_compare([_row("B", same)], tmp_path / "one")
    assert "Devices per seed" not in (tmp_path / "one/summary.md").read_text() and one["rows"][0]["devices"][1] == "cuda"


def test_all_seeds_diverged_row(tmp_path: Path) -> None:
    dead = {"run_dir": str(tmp_path / "x"), "status": "diverged", "results": None,
            "diverged": {"iteration": 1, "value": "inf"}}
    s = C.summarize_compare([_row("ok", [_fake_run(tmp_path, "a0", [0.4, 0.6])]), _row("dead", [dead])],
                            tmp_path / "out")
    assert s["rows"][1]["mean"] is None and s["paired"] == []
    assert "| dead | 0 of 1 (1 diverged) | not tuned | 10 | diverged | n/a |" in (tmp_path / "out/summary.md").read_text()


def test_fmt_metric_and_markdown() -> None:
    assert C._fmt_metric("accuracy", 0.9, 0.01) == "90.00% ± 1.00%"
    assert C._fmt_metric("mse", 0.12345) == "0.1235"
    assert C._fmt_metric("mse", None) == C._fmt_metric("mse", math.nan) == "n/a"
    assert C._fmt_ci("mse", None, 1) == "n/a (1 seed)" and C._fmt_ci("accuracy", 0.012, 3) == "± 1.20%"
    # A diverging inner loop's MSE (finite but huge) in scientific notation, not 20 digits
    assert C._fmt_metric("mse", 2.8373977128576604e18) == "2.837e+18" and C._fmt_ci("mse", 1.2e19, 3) == "± 1.200e+19"
    from metaopt.compare_report import format_difference
    assert format_difference("mse", {"mean": 9.5e17, "ci95": 4e18, "n": 600}) == "+9.500e+17 ± 4.000e+18 (n = 600)"
    assert C.markdown_table([]) == "(no runs)\n"
    md = C.markdown_table([{"inner": "sgd", "seeds": 2, "metric": "mse", "mean": 0.5, "ci95": 0.1,
                            "before_mean": None, "tasks": 4, "iterations": 10, "per_seed": [0.45, 0.55]}],
                          title="sine")
    assert md.startswith("### sine\n") and "| sgd | 2 | not tuned | 10 | 0.5000 | ± 0.1000 | 0.4500, 0.5500 | n/a | 4 |" in md
    rep = C.reproduction_markdown([{"setting": "omniglot_5w1s", "inner": "sgd", "iteration": 2, "metric": "accuracy",
                                    "mean": 0.5, "ci95": 0.1, "before": {"mean": 0.2}, "tasks": 4,
                                    "paper": C.PAPER_SETTINGS["omniglot_5w1s"][1]}])
    assert "| omniglot_5w1s | sgd | 2 | accuracy 50.00% ± 10.00% | 20.00% | 4 | 98.7 ± 0.4% |" in rep


def test_write_report(tmp_path: Path) -> None:
    j, m = C.write_report(tmp_path / "results", "r", {"a": 1}, "# hi\n")
    assert json.loads(j.read_text()) == {"a": 1} and m.read_text() == "# hi\n"


# ---------------------------------------------------------------------------- runs


def test_bad_arguments_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--seeds"):
        C.compare({}, "sgd", 0, tmp_path)
    with pytest.raises(ConfigError, match="--tune-seeds"):
        C.compare({}, "sgd", 1, tmp_path, tune_seeds=0)
    with pytest.raises(ConfigError, match="--jobs must be an int >= 1, got 0"):
        C.compare({}, "sgd", 1, tmp_path, jobs=0)
    with pytest.raises(ConfigError, match="inner.lr"):  # a bad grid value fails before any run
        C.compare({}, "sgd", 1, tmp_path, tune=["inner.lr=0.1,-1"], overrides=QUICK)
    with pytest.raises(ConfigError, match="grids for unknown"):
        C.compare({}, "sgd", 1, tmp_path, grids={"adam": {"inner.lr": [1]}})
    with pytest.raises(ConfigError, match="unknown setting"):
        C.reproduce(["nope"], tmp_path)
    assert not any(tmp_path.iterdir())


def test_compare_reuses_finished_and_resumes_interrupted_runs(tmp_path: Path) -> None:
    logged: list[str] = []
    first = C.compare({}, "sgd", 2, tmp_path, overrides=QUICK, device="cpu", log=logged.append)
    assert len(logged) == 2 and first["rows"][0]["seeds"] == 2
    (tmp_path / "sgd" / "seed1" / "results.json").unlink()  # seed 1 interrupted after its checkpoint
    logged.clear()
    again = C.compare({}, "sgd", 2, tmp_path, overrides=QUICK + ["train.progress=true"], device="cpu",
                      log=logged.append)
    assert len(logged) == 1 and "resuming" in logged[0] and (tmp_path / "sgd" / "seed1" / "results.json").is_file()
    assert again["rows"][0]["per_seed"] == pytest.approx(first["rows"][0]["per_seed"])
    logged.clear()
    C.compare({}, "sgd", 2, tmp_path, overrides=QUICK, device="cpu", log=logged.append)
    assert logged == []  # finished, same config (train.progress does not count): reused


def test_stale_runs_are_refused_or_rerun(tmp_path: Path) -> None:
    logged: list[str] = []
    first = C.compare({}, "sgd", 1, tmp_path, overrides=QUICK, device="cpu", log=logged.append)
    # Another inner.steps: refused with --no-rerun, naming the key and both values...
    with pytest.raises(ConfigError, match=r"'inner.steps' is 1 there but 2 now"):
        C.compare({}, "sgd", 1, tmp_path, overrides=QUICK + ["inner.steps=2"], device="cpu", rerun=False)
    # ...else re-run, the old run kept aside.
    logged.clear()
    second = C.compare({}, "sgd", 1, tmp_path, overrides=QUICK + ["inner.steps=2"], device="cpu", log=logged.append)
    assert any("'inner.steps' is 1 there but 2 now" in m for m in logged)
    assert (tmp_path / "sgd/seed0.stale-1/results.json").is_file()
    assert config_mod.load(tmp_path / "sgd/seed0/config.yaml")["inner"]["steps"] == 2
    assert second["rows"][0]["mean"] != first["rows"][0]["mean"]
    # A longer schedule extends the run from its checkpoint; equal to a fresh run of 4 iterations.
    logged.clear()
    longer = QUICK + ["inner.steps=2", "train.iterations=4"]
    extended = C.compare({}, "sgd", 1, tmp_path, overrides=longer, device="cpu", log=logged.append)
    assert len(logged) == 1 and "resuming" in logged[0]
    assert extended["rows"][0]["iterations"] == 4
    fresh = C.compare({}, "sgd", 1, tmp_path / "fresh", overrides=longer, device="cpu", log=None)
    assert extended["rows"][0]["mean"] == pytest.approx(fresh["rows"][0]["mean"], rel=1e-6)


def test_diverged_runs_are_reused_unless_retried(tmp_path: Path) -> None:
    """A diverged record is reused (same config, same outcome); ``retry_diverged`` trains it
    again, e.g. after a fix the config does not record, keeping the old record aside."""
    first = C.compare({}, "sgd", 1, tmp_path, overrides=QUICK, device="cpu", log=None)
    seed0 = tmp_path / "sgd" / "seed0"
    # What an older code version left: the same config, recorded as diverged at iteration 1.
    (seed0 / "results.json").unlink()
    shutil.rmtree(seed0 / "checkpoints")
    (seed0 / "diverged.json").write_text(json.dumps({"iteration": 1, "value": "nan"}))
    logged: list[str] = []
    reused = C.compare({}, "sgd", 1, tmp_path, overrides=QUICK, device="cpu", log=logged.append)
    assert logged == [] and reused["rows"][0]["mean"] is None and len(reused["rows"][0]["diverged"]) == 1
    retried = C.compare({}, "sgd", 1, tmp_path, overrides=QUICK, device="cpu", retry_diverged=True,
                        log=logged.append)
    assert any("diverged at iteration 1 before; retrying" in m for m in logged)
    assert retried["rows"][0]["mean"] == pytest.approx(first["rows"][0]["mean"], rel=1e-6)
    assert (tmp_path / "sgd/seed0.stale-1/diverged.json").is_file() and not (seed0 / "diverged.json").exists()
    logged.clear()  # and the retried run is now an ordinary finished one: reused
    C.compare({}, "sgd", 1, tmp_path, overrides=QUICK, device="cpu", retry_diverged=True, log=logged.append)
    assert logged == []


def test_jobs_run_in_worker_processes_with_the_same_results(tmp_path: Path) -> None:
    """jobs=2: tuning runs and final seeds train in two worker processes (each run's lock
    names its holder's pid), and every number equals the one-at-a-time comparison."""
    import os

    kw: dict[str, Any] = {"overrides": QUICK, "tune": ["inner.lr=0.01,0.1"], "device": "cpu", "log": None}
    one = C.compare({}, "sgd,adam", 2, tmp_path / "one", **kw)
    two = C.compare({}, "sgd,adam", 2, tmp_path / "two", jobs=2, **kw)
    for a, b in zip(one["rows"], two["rows"]):
        assert a["per_seed"] == pytest.approx(b["per_seed"], rel=1e-6)
        assert [r["val_metric"] for r in a["tune"]["results"]] == pytest.approx(
            [r["val_metric"] for r in b["tune"]["results"]], rel=1e-6)
        assert a["tune"]["chosen"] == b["tune"]["chosen"]
    holders = {int((d / ".lock").read_text()) for d in (tmp_path / "two").glob("*/**/seed*") if (d / ".lock").is_file()}
    assert len(holders) >= 2 and os.getpid() not in holders and len(list((tmp_path / "two").glob("*/**/.lock"))) == 8
    assert (tmp_path / "two/summary.md").read_text().count("| sgd | 2 |") == 1


def test_run_pool_interrupt_saves_the_running_runs(tmp_path: Path) -> None:
    """Leaving the pool on an error interrupts the workers' runs: each saves a checkpoint,
    and the run resumes from it."""
    import time

    from metaopt import runs

    cfg = config_mod.resolve(config_mod.apply_overrides(
        {}, QUICK + ["train.iterations=100000", "train.eval_every=0", "train.checkpoint_every=100000"]))
    run_dir = tmp_path / "long"
    with pytest.raises(KeyboardInterrupt):
        with runs.RunPool(jobs=2, device="cpu") as pool:
            pool.submit(cfg, run_dir)
            deadline = time.monotonic() + 120
            while not (run_dir / "metrics.csv").is_file() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # some iterations in
            raise KeyboardInterrupt
    assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / "results.json").exists()
    from metaopt.rundir import load_checkpoint
    assert 0 < load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] < 100000


POOL_INTERRUPT_SCRIPT = """
import os, signal, sys, threading, time
from pathlib import Path
from metaopt import config as config_mod, runs

def main():
    # Ctrl-C as from a terminal. A non-interactive shell starts a background job (`cmd &`, as
    # a CI runner may run the tests) with SIGINT ignored, and Python then keeps it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root, how = Path(sys.argv[1]), sys.argv[2]
    fast = config_mod.resolve(config_mod.apply_overrides({}, sys.argv[3:]))
    # r1's iterations take far longer than r0's: r0 stops and reports first, r1 is mid-iteration
    slow = config_mod.resolve(config_mod.apply_overrides(
        {}, sys.argv[3:] + ["train.meta_batch_size=1024", "inner.steps=5"]))
    dirs = [root / f"r{i}" for i in range(3)]
    cfgs = [fast, slow, fast]

    def interrupt():  # Ctrl-C once both workers' runs are some iterations in
        while not all((d / "metrics.csv").is_file() for d in dirs[:2]):
            time.sleep(0.1)
        time.sleep(1.0)
        if how == "process":  # to the process: the kernel hands it to the (waiting) main thread
            os.kill(os.getpid(), signal.SIGINT)
        else:  # handled on this thread, as when the kernel picks another thread than the main one
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    try:
        with runs.RunPool(jobs=2, device="cpu") as pool:
            for cfg, d in zip(cfgs, dirs):
                pool.submit(cfg, d)
            for cfg, d in zip(cfgs, dirs):
                pool.result(cfg, d)
    except KeyboardInterrupt:
        print("interrupted")

if __name__ == "__main__":
    main()
"""


def test_run_pool_result_passes_on_a_runs_own_timeout_error() -> None:
    # RunPool.result waits in slices; a TimeoutError raised by the run itself is its outcome,
    # not "still running" (waiting with result(timeout=...) would loop on it for ever).
    import threading
    from concurrent.futures import Future

    with runs_mod.RunPool(jobs=2) as pool:
        done: Future[dict[str, Any]] = Future()
        done.set_exception(TimeoutError("the run's own timeout"))
        pool._futures["r"] = done
        raised: list[BaseException] = []

        def wait() -> None:
            try:
                pool.result({}, "r")
            except TimeoutError as e:
                raised.append(e)

        t = threading.Thread(target=wait, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive() and [str(e) for e in raised] == ["the run's own timeout"]


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (Linux /proc; elsewhere the leader only)."""
    import signal

    pids = [sid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:  # fields after "(comm)": state ppid pgrp session
                pids.append(int(stat.parent.name))
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["process", "thread"])
def test_run_pool_interrupt_with_every_worker_busy_saves_each_run_and_starts_no_queued_one(
        tmp_path: Path, how: str) -> None:
    """Ctrl-C with two runs mid-iteration (one with long iterations) and a third queued:
    both running runs save a checkpoint, the queued one never starts, and the pool closes. (Before: a worker's
    TrainingInterrupted could not be unpickled in the parent, the executor called the pool
    broken and SIGTERMed the other worker mid-save: a lost checkpoint or a hang on the
    result queue's lock; and an idle worker died of the SIGINT, with the same effect.)
    ``thread``: the signal is handled on another thread than the main one, which waits in
    :meth:`RunPool.result` (before: it slept on until the run ended, here never)."""
    import subprocess
    import sys

    from metaopt.rundir import load_checkpoint

    script = tmp_path / "pool_interrupt.py"
    script.write_text(POOL_INTERRUPT_SCRIPT)
    argv = QUICK + ["train.iterations=100000", "train.eval_every=0", "train.checkpoint_every=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "runs"), how, *argv], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)  # the workers too (own process groups, same session): they would train on
        stdout, stderr = proc.communicate()
        pytest.fail(f"the interrupted pool did not close in 180 s: {stderr[-2000:]!r}")
    assert proc.returncode == 0 and "interrupted" in stdout, stderr[-2000:]
    for name in ("r0", "r1"):
        ckpt = load_checkpoint(tmp_path / "runs" / name / "checkpoints" / "last.pt")
        assert 0 < ckpt["iteration"] < 100000
    assert not (tmp_path / "runs" / "r2").exists()


def test_tune_selects_on_validation_not_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid's test-best and validation-best differ by construction: the stub validation
    metric is minus the run's own test MSE, so validation prefers the test-WORST value.
    Choosing that value proves the choice follows validation; a diverging value is never chosen."""
    seen: list[Path] = []

    def fake_validation(run_dir: Path | str, *, device: str | None = None) -> float:
        seen.append(Path(run_dir))
        return -json.loads((Path(run_dir) / "results.json").read_text())["mean"]

    monkeypatch.setattr(C, "validation_metric", fake_validation)
    grid = ["inner.lr=0.001,0.03,0.3,1e30"]  # 1e30 makes the meta-loss non-finite
    s = C.compare({}, "sgd", 1, tmp_path, overrides=QUICK + ["train.iterations=3"], tune=grid, device="cpu", log=None)
    t = s["rows"][0]["tune"]
    assert t["split"] == "val" and t["grid"] == {"inner.lr": [0.001, 0.03, 0.3, 1e30]}
    by_lr = {r["values"]["inner.lr"]: r for r in t["results"]}
    assert by_lr[1e30]["val_metric"] is None and by_lr[1e30]["diverged"]
    (dead,) = by_lr[1e30]["diverged"]
    assert json.loads((Path(dead) / "diverged.json").read_text())["iteration"] == 1
    tests = {lr: json.loads((tmp_path / f"sgd/tune/inner.lr={lr}/seed0/results.json").read_text())["mean"]
             for lr in ("0.001", "0.03", "0.3")}
    test_best, test_worst = min(tests, key=tests.get), max(tests, key=tests.get)
    assert test_best != test_worst
    assert t["chosen"] == {"inner.lr": float(test_worst)}
    # Tuning runs use their own seeds; the final seed trains the chosen value.
    assert config_mod.load(tmp_path / "sgd/tune/inner.lr=0.03/seed0/config.yaml")["train"]["seed"] == C.TUNE_SEED_OFFSET
    final = config_mod.load(tmp_path / "sgd/seed0/config.yaml")
    assert final["inner"]["lr"] == float(test_worst) and final["train"]["seed"] == 0
    assert all("tune" in p.parts for p in seen)  # validation scored only tuning runs
    md = (tmp_path / "summary.md").read_text()
    assert f"**{float(test_worst)} →" in md and "1e+30 → diverged" in md
    assert (tmp_path / "plots/compare_tune.png").is_file()


def test_tuning_across_devices_is_said(tmp_path: Path) -> None:
    # A grid finished partly on a GPU and partly on the CPU (Omniglot: a task sampler on the
    # device, so other validation tasks) is reported as tuned across devices.
    kw: dict[str, Any] = dict(overrides=QUICK, tune=["inner.lr=0.01,0.1"], device="cpu", log=None)
    t = C.compare({}, "sgd", 1, tmp_path, **kw)["rows"][0]["tune"]
    assert t["devices"] == ["cpu"] and "tuned across devices" not in (tmp_path / "summary.md").read_text()
    res = tmp_path / "sgd/tune/inner.lr=0.1/seed0/results.json"
    res.write_text(json.dumps({**json.loads(res.read_text()), "device": "cuda"}))
    t = C.compare({}, "sgd", 1, tmp_path, **kw)["rows"][0]["tune"]  # reuses every run
    assert t["devices"] == ["cpu", "cuda"] and [r["devices"] for r in t["results"]] == [["cpu"], ["cuda"]]
    assert "tuned across devices: cpu, cuda" in (tmp_path / "summary.md").read_text()


def test_entry_that_sets_the_tuned_key_is_not_tuned(tmp_path: Path) -> None:
    s = C.compare({}, "sgd:lr=0.02", 1, tmp_path, overrides=QUICK, tune=["inner.lr=0.1,0.2"], device="cpu", log=None)
    assert s["rows"][0]["tune"] == {"skipped": "inner.lr set by the --inner entry", "chosen": {"inner.lr": 0.02}}
    assert not (tmp_path / "sgd_lr=0.02/tune").exists()


def test_validation_metric_reads_validation_tasks(tmp_path: Path) -> None:
    # eval_every=0: no validation during the run, so the checkpoint is evaluated on val.
    C.compare({}, "sgd", 1, tmp_path, overrides=QUICK + ["train.eval_tasks=3", "train.iterations=3",
                                                         "train.eval_every=0"], device="cpu", log=None)
    run = tmp_path / "sgd/seed0"
    v = C.validation_metric(run)
    assert v == pytest.approx(evaluate_run(run, split="val", write=False)["mean"])
    assert v != pytest.approx(json.loads((run / "results.json").read_text())["mean"])
    assert json.loads((run / "eval_val_3tasks.json").read_text())["tasks"] == 3
    # With a validation at the last iteration, the run's own number is that same evaluation.
    C.compare({}, "sgd", 1, tmp_path / "b", overrides=QUICK + ["train.eval_tasks=3"], device="cpu", log=None)
    run_b = tmp_path / "b/sgd/seed0"
    v_b = C.validation_metric(run_b)
    assert not list(run_b.glob("eval_val_*.json"))
    assert v_b == pytest.approx(evaluate_run(run_b, split="val", write=False)["mean"], rel=1e-6)
    # Training saved the per-task test values; re-evaluating the checkpoint (the path for
    # runs from before they were saved) reproduces them and the saved mean, and caches them.
    saved = json.loads((run / "results_test_values.json").read_text())
    (run / "results_test_values.json").unlink()
    values = C.per_task_test_values(run)
    assert values == pytest.approx(saved["values"], rel=1e-6) and saved["iteration"] == 3
    assert len(values) == 4 and statistics.mean(values) == pytest.approx(
        json.loads((run / "results.json").read_text())["mean"], rel=1e-9)
    assert json.loads((run / "results_test_values.json").read_text())["values"] == values
    # The test tasks' hash: saved by training and by the re-evaluation, equal to hashing the
    # sinusoid test tasks directly (the seed and count the trainer uses).
    from metaopt.loop import tasks_fingerprint
    from metaopt.tasks import Sinusoid, eval_batches
    from metaopt.train import TEST_SEED
    expected = tasks_fingerprint(eval_batches(Sinusoid(shots=10, queries=10), 4, 1, TEST_SEED, "cpu"))
    assert saved["tasks_sha256"] == expected == C.test_tasks_sha256(run)
    assert json.loads((run / "results_test_values.json").read_text())["tasks_sha256"] == expected
    assert expected != tasks_fingerprint(eval_batches(Sinusoid(shots=10, queries=10), 4, 1, TEST_SEED + 1, "cpu"))


def test_cli_compare_with_tune_and_no_rerun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sets = [a for s in QUICK for a in ("--set", s)]
    argv = ["compare", str(Path(__file__).resolve().parents[1] / "configs/sinusoid.yaml"), "--inner", "sgd,adafactor", "--seeds", "2", "--out", str(tmp_path),
            "--tune", "inner.lr=0.01,0.1", "--device", "cpu", *sets]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    for row in summary["rows"]:
        t = row["tune"]
        assert t["grid"] == {"inner.lr": [0.01, 0.1]} and len(t["results"]) == 2
        assert all(math.isfinite(r["val_metric"]) for r in t["results"]) and t["chosen"]["inner.lr"] in (0.01, 0.1)
    assert "| sgd | 2 |" in out and "Tuning (validation mse" in out and "| adafactor − sgd |" in out
    assert cli.main(argv + ["--no-rerun", "--set", "inner.steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaopt: error: ") and "'inner.steps' is 1 there but 2 now" in err


def test_cli_compare_tunes_on_a_reduced_budget_with_tune_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--tune-set applies to the tuning runs only: tuned at 2 iterations, final seeds at 3."""
    sets = [a for s in QUICK for a in ("--set", s)]
    argv = ["compare", str(Path(__file__).resolve().parents[1] / "configs/sinusoid.yaml"), "--inner", "sgd",
            "--seeds", "1", "--out", str(tmp_path), "--tune", "inner.lr=0.01,0.1", "--device", "cpu", *sets,
            "--set", "train.iterations=3", "--tune-set", "train.iterations=2"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    for lr in ("0.01", "0.1"):
        assert config_mod.load(tmp_path / f"sgd/tune/inner.lr={lr}/seed0/config.yaml")["train"]["iterations"] == 2
    final = config_mod.load(tmp_path / "sgd/seed0/config.yaml")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert final["train"]["iterations"] == 3 and final["inner"]["lr"] == summary["rows"][0]["tune"]["chosen"]["inner.lr"]
    assert summary["tune_request"]["overrides"][-1] == "train.iterations=2" and summary["rows"][0]["iterations"] == 3
    assert cli.main(argv[:-1] + ["iterations"]) == 2  # a malformed --tune-set item, named as such
    assert "--tune-set expects section.key=value (e.g. inner.lr=0.05), got 'iterations'" in capsys.readouterr().err
    # --retry-diverged reaches the runs: a seed recorded as diverged is trained again.
    seed0 = tmp_path / "sgd/seed0"
    (seed0 / "results.json").unlink()
    (seed0 / "diverged.json").write_text(json.dumps({"iteration": 2, "value": "nan"}))
    assert cli.main(argv + ["--retry-diverged"]) == 0
    assert "retrying" in capsys.readouterr().err and (tmp_path / "sgd/seed0.stale-1/diverged.json").is_file()
    assert (seed0 / "results.json").is_file()




def test_validation_metric_of_a_diverged_evaluation_is_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose validation diverges (results hold null) counts as diverged in tuning,
    rather than crashing the comparison (found by the study: float(None))."""
    import math

    from metaopt import runs

    C.compare({}, "sgd", 1, tmp_path, overrides=QUICK + ["train.eval_every=0"], device="cpu", log=None)
    run = tmp_path / "sgd/seed0"
    monkeypatch.setattr(runs, "evaluate_run", lambda *a, **k: {"mean": None, "diverged": "val mse diverged"})
    assert math.isnan(C.validation_metric(run))


@pytest.mark.parametrize("blown_up, scale", [(4e4, "log"), (3.0, "linear")])
def test_final_plot_takes_a_log_axis_when_a_row_blew_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       blown_up: float, scale: str) -> None:
    # The 5-shot study's momentum row (test MSE 2.7, 70, 40,371 over seeds) flattened every
    # other row onto 0 on a linear axis; a log axis keeps 0.36 and 1.3 apart.
    seen: dict[str, str] = {}
    save = R._save

    def spy(fig: Any, out_png: Path) -> Path:
        seen[out_png.name] = fig.axes[0].get_yscale()
        return save(fig, out_png)

    monkeypatch.setattr(R, "_save", spy)
    rows = [_row("A", [_fake_run(tmp_path, f"a{k}", [0.3 + 0.01 * k, 0.4]) for k in range(3)]),
            _row("B", [_fake_run(tmp_path, f"b{k}", [1.2, 1.4 if k else blown_up]) for k in range(3)])]
    C.summarize_compare(rows, tmp_path / "out")
    assert seen["compare_final_mse.png"] == scale
    assert R.wide_positive_range([0.3, 3e4]) and not R.wide_positive_range([-1.0, 3e4])
    assert not R.wide_positive_range([0.3, float("nan"), 3e4]) and not R.wide_positive_range([])
