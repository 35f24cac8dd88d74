"""metaopt.study and experiments/study.py: the shipped specs parse and name valid optimizer
arguments, bad specs are refused by name, a tiny study runs end to end, and re-running it
reuses every run (resumable)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from metaopt import config as config_mod
from metaopt import optim
from metaopt.compare import _inner_config
from metaopt.config import ConfigError
from metaopt.study import load_study, run_study

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "configs/study").glob("*.yaml"))
TINY = ["train.iterations=2", "train.eval_every=1", "train.eval_tasks=2", "train.test_tasks=4",
        "train.meta_batch_size=2", "train.tensorboard=false", "train.plots=false"]


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name != "optimizers.yaml"], ids=lambda p: p.stem)
def test_shipped_specs(spec: Path) -> None:
    study = load_study(spec)
    assert study.config is not None and study.config.is_file() and study.seeds >= 3
    labels = [o.label for o in study.optimizers]
    assert {"sgd", "sgd_momentum", "adam", "rmsprop", "lion", "adafactor_torch", "adafactor_hf_scaled",
            "adafactor_hf_unscaled", "adafactor_paper",
            "sgd_per_layer_lr", "adam_per_layer_lr", "adafactor_hf_unscaled_per_layer_lr"} == set(labels)
    base = config_mod.read_yaml(study.config)
    for o in study.optimizers:
        if o.label == "adafactor_paper":
            assert not o.tune and o.kwargs["lr"] is None and o.kwargs["relative_step"] is True
        else:
            assert list(o.tune) == ["inner.lr"] and len(o.tune["inner.lr"]) >= 5
        if o.name in optim.names():  # the presets of this installation take these arguments
            sets = [f"inner.{k}={json.dumps(v)}" for k, v in o.entry().items()]
            cfg = _inner_config(base, list(study.overrides) + list(study.budget), sets)
            assert cfg["inner"]["name"] == o.name


@pytest.mark.parametrize("text, match", [
    ("config: null\noptimizers: [{name: sgd}]\n", "needs a 'name'"),
    ("name: s\nbogus: 1\noptimizers: [{name: sgd}]\n", "unknown key"),
    ("name: s\noptimizers: []\n", "non-empty list"),
    ("name: s\noptimizers: [{label: a}]\n", "needs a 'name'"),
    ("name: s\noptimizers: [{name: sgd, lr: 1}]\n", "unknown key"),
    ("name: s\noptimizers: [{name: sgd}, {name: sgd}]\n", "used twice"),
    ("name: s\nseeds: 0\noptimizers: [{name: sgd}]\n", "'seeds' must be an int >= 1 but is: 0"),
    ("name: s\noptimizers: [{name: sgd, tune: {inner.lr: []}}]\n", "at least one value"),
    ("name: s\noverrides: train.iterations=2\noptimizers: [{name: sgd}]\n", "list of KEY=VALUE"),
])
def test_bad_specs(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_study(tmp_path / "s.yaml")


def test_unavailable_optimizer_is_named_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("name: s\noptimizers: [{name: sgd}, {name: no_such_opt}]\n")
    study = load_study(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="needs inner optimizer.s. no_such_opt that this installation lacks"):
        run_study(study, tmp_path / "runs", tmp_path / "results")
    with pytest.raises(ConfigError, match="--only: unknown optimizer label"):
        run_study(study, tmp_path / "runs", tmp_path / "results", only=["adam"])
    assert not (tmp_path / "runs").exists()


def _load_script():
    spec = importlib.util.spec_from_file_location("experiments_study", REPO / "experiments" / "study.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_script_end_to_end_and_resumable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "opts.yaml").write_text(
        "optimizers:\n"
        "  - {label: sgd, name: sgd, tune: {inner.lr: [0.001, 0.01]}}\n"
        "  - {label: torch_af, name: adafactor, tune: {inner.lr: [0.01, 0.1]}}\n"
        "  - {label: other, name: no_such_opt}\n")
    (tmp_path / "tiny.yaml").write_text(
        f"name: tiny\nconfig: {REPO / 'configs/sinusoid_10shot.yaml'}\noptimizers: opts.yaml\nseeds: 2\n"
        "overrides: [train.progress=false]\nbudget: [train.iterations=3]\n")
    mod = _load_script()
    argv = [str(tmp_path / "tiny.yaml"), "--only", "sgd,torch_af", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--device", "cpu", *[a for s in TINY for a in ("--set", s)]]
    assert mod.main(argv) == 0
    first = capsys.readouterr()
    assert first.err.count("[compare]") == 2 * 2 + 2 * 2  # 2 grid values + 2 seeds, per optimizer
    summary = json.loads((tmp_path / "results/tiny/summary.json").read_text())
    assert [r["inner"] for r in summary["rows"]] == ["sgd", "torch_af"] and summary["budget"] == ["train.iterations=3"]
    assert all(r["tune"]["split"] == "val" and r["finite_seeds"] == 2 for r in summary["rows"])
    index = (tmp_path / "results/README.md").read_text()
    assert "reduced budget: `train.iterations=3`, then `train.iterations=2" in index  # what really ran
    assert "## tiny" in index and "| torch_af − sgd |" in index and "(tiny/plots/compare_final_mse.png)" in index
    assert (tmp_path / "results/tiny/plots/compare_final_mse.png").is_file()
    # A report beside the study's that the study did not write (a plain `metaopt compare`) is
    # linked under "Other reports", not inlined as if it were a setting.
    other = tmp_path / "results/plain_compare"
    other.mkdir()
    (other / "summary.md").write_text("### tiny.yaml\n\n| a two-row table |\n")
    (other / "summary.json").write_text(json.dumps({"rows": []}))
    assert mod.main(argv[:1] + ["--report"] + argv[3:]) == 0
    index = (tmp_path / "results/README.md").read_text()
    assert "| a two-row table |" not in index and "- [plain_compare](plain_compare/summary.md)" in index
    assert "ablation" not in index  # a folder without a report is not listed...
    (tmp_path / "results/ablation/beta1").mkdir(parents=True)
    (tmp_path / "results/ablation/beta1/README.md").write_text("# beta1\n")
    assert mod.main(argv[:1] + ["--report"] + argv[3:]) == 0  # ...but its reports one level down are
    assert "- [ablation/beta1](ablation/beta1/README.md)" in (tmp_path / "results/README.md").read_text()
    assert "## tiny" in index
    # Re-running the same command trains nothing; the missing optimizer is refused by name.
    assert mod.main(argv) == 0
    assert "[compare]" not in capsys.readouterr().err
    assert mod.main(argv[:1] + argv[3:]) == 2
    assert "no_such_opt" in capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_study_script_stops_with_a_line_not_a_traceback(tmp_path: Path, sig: str) -> None:
    # Ctrl-C or SIGTERM in the middle of a run: the run's checkpoint is saved, the script
    # says how to continue in one line and exits 128 + signal, with no traceback.
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "opts.yaml").write_text("optimizers:\n  - {label: sgd, name: sgd}\n")
    (tmp_path / "long.yaml").write_text(
        f"name: long\nconfig: {REPO / 'configs/sinusoid_10shot.yaml'}\noptimizers: opts.yaml\nseeds: 1\n"
        "overrides: [train.progress=false, train.tensorboard=false, train.plots=false]\n"
        "budget: [train.iterations=1000000, train.eval_every=0, train.checkpoint_every=0]\n")
    proc = subprocess.Popen([sys.executable, str(REPO / "experiments/study.py"), str(tmp_path / "long.yaml"),
                             "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--device", "cpu"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    metrics = tmp_path / "runs/long/sgd/seed0/metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert "Traceback" not in err and "re-run the same command to continue" in err
    assert (tmp_path / "runs/long/sgd/seed0/checkpoints/last.pt").is_file()


def test_full_schedule_tuned_at_the_reduced_budget(tmp_path: Path) -> None:
    """--full --tune-at-budget: the lr is chosen on the reduced study's tuning runs (reused,
    nothing re-tuned) and only the final seeds train on the full schedule, with the chosen lr."""
    (tmp_path / "tiny.yaml").write_text(
        "name: tiny\nconfig: null\nseeds: 2\n"
        "optimizers:\n  - {label: sgd, name: sgd, tune: {inner.lr: [0.001, 0.01, 0.1]}}\n"
        "overrides: [train.progress=false, train.eval_every=1, train.eval_tasks=2, train.test_tasks=4,"
        " train.meta_batch_size=2, train.tensorboard=false, train.plots=false]\n"
        "budget: [train.iterations=2]\nfull: [train.iterations=3]\n")
    study = load_study(tmp_path / "tiny.yaml")
    assert study.full == ("train.iterations=3",)
    runs, results = tmp_path / "runs", tmp_path / "results"
    with pytest.raises(ConfigError, match="tune_at_budget needs full=True"):
        run_study(study, runs, results, tune_at_budget=True, device="cpu", log=None)
    reduced = run_study(study, runs, results, device="cpu", log=None)
    logged: list[str] = []
    full = run_study(study, runs, results, full=True, tune_at_budget=True, device="cpu", log=logged.append)
    assert len(logged) == 2 and all("tuning" not in m and "tiny_full" in m for m in logged)  # the 2 final seeds only
    (r_red,), (r_full,) = reduced["rows"], full["rows"]
    assert r_full["tune"]["results"] == r_red["tune"]["results"] and r_full["tune"]["chosen"] == r_red["tune"]["chosen"]
    final = config_mod.load(runs / "tiny_full/sgd/seed1/config.yaml")
    assert final["train"]["iterations"] == 3 and final["inner"]["lr"] == r_red["tune"]["chosen"]["inner.lr"]
    assert r_full["iterations"] == 3 and not (runs / "tiny_full/sgd/tune").exists()
    assert full["tune_request"]["overrides"][-1] == "train.iterations=2"
    saved = json.loads((results / "tiny_full/summary.json").read_text())
    assert saved["tuned_at_budget"] is True and saved["full"] is True
    assert "chosen on validation tasks at the reduced budget (`train.iterations=2`" in (
        results / "tiny_full/summary.md").read_text()
    # Re-tuning at the full schedule (no tune_at_budget) trains its own grid in tiny_full/.
    logged.clear()
    run_study(study, runs, results, full=True, device="cpu", log=logged.append)
    assert sum("tuning" in m for m in logged) == 3 and (runs / "tiny_full/sgd/tune").is_dir()


def test_rows_only_looked_up_are_looked_up_after_this_process_trains(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `--only` processes: the one that finishes last writes the report, so it must look
    the other's rows up when it is done training, not when it starts (sgd, listed first,
    finishes while this process trains adam: sgd is in the report, not "0 of 2 finished")."""
    from metaopt import runs as runs_mod

    (tmp_path / "two.yaml").write_text(
        "name: two\nconfig: null\nseeds: 1\n"
        "optimizers:\n  - {label: sgd, name: sgd, tune: {inner.lr: [0.01, 0.1]}}\n  - {label: adam, name: adam}\n"
        "overrides: [train.progress=false, train.eval_every=1, train.eval_tasks=2, train.test_tasks=4,"
        " train.meta_batch_size=2, train.tensorboard=false, train.plots=false, train.iterations=2]\n")
    study = load_study(tmp_path / "two.yaml")
    runs, results = tmp_path / "runs", tmp_path / "results"
    real = runs_mod.run_config
    other_done: list[bool] = []

    def run_config(*args: Any, **kwargs: Any) -> Any:
        if not other_done:  # the other process trains sgd's row while this one trains adam
            other_done.append(True)
            monkeypatch.setattr(runs_mod, "run_config", real)
            run_study(study, runs, tmp_path / "other_results", only=["sgd"], device="cpu", log=None)
        return real(*args, **kwargs)

    monkeypatch.setattr(runs_mod, "run_config", run_config)
    last = run_study(study, runs, results, only=["adam"], device="cpu", log=None)
    assert other_done and last["not_finished"] == []
    assert [r["inner"] for r in last["rows"]] == ["sgd", "adam"]  # the spec's order


def test_tune_at_budget_without_full_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "s.yaml").write_text("name: s\noptimizers: [{name: sgd}]\n")
    assert _load_script().main([str(tmp_path / "s.yaml"), "--tune-at-budget", "--runs", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "study: error: tune_at_budget needs full=True (--tune-at-budget goes with --full)"


def test_only_still_reports_every_finished_optimizer_and_report_trains_nothing(tmp_path: Path) -> None:
    """Processes that each run some labels (--only) all write the whole report: finished
    optimizers are looked up, never trained; unfinished ones are named, not shown."""
    (tmp_path / "two.yaml").write_text(
        "name: two\nconfig: null\nseeds: 2\n"
        "optimizers:\n  - {label: sgd, name: sgd, tune: {inner.lr: [0.01, 0.1]}}\n  - {label: adam, name: adam}\n"
        "overrides: [train.progress=false, train.eval_every=1, train.eval_tasks=2, train.test_tasks=4,"
        " train.meta_batch_size=2, train.tensorboard=false, train.plots=false, train.iterations=2]\n")
    study = load_study(tmp_path / "two.yaml")
    runs, results = tmp_path / "runs", tmp_path / "results"
    logged: list[str] = []
    first = run_study(study, runs, results, only=["adam"], device="cpu", log=logged.append)
    assert [r["inner"] for r in first["rows"]] == ["adam"] and len(logged) == 2  # adam's 2 seeds only
    assert first["not_finished"] == ["sgd: tuning, 0 of 2 runs finished"]
    md = (results / "two/summary.md").read_text()
    assert "Not finished (left out of this report" in md and "- sgd: tuning, 0 of 2 runs finished" in md
    logged.clear()
    second = run_study(study, runs, results, only=["sgd"], device="cpu", log=logged.append)
    assert [r["inner"] for r in second["rows"]] == ["sgd", "adam"] and second["not_finished"] == []
    assert not any("adam" in m for m in logged)  # adam looked up, not retrained
    assert second["rows"][1]["per_seed"] == first["rows"][0]["per_seed"]
    # --report: nothing trains; a seed that is not finished takes its row out, named.
    (runs / "two/sgd/seed1/results.json").unlink()
    logged.clear()
    rep = run_study(study, runs, results, report=True, device="cpu", log=logged.append)
    assert logged == [] and [r["inner"] for r in rep["rows"]] == ["adam"]
    assert rep["not_finished"] == ["sgd: 1 of 2 seeds finished"]
    script = _load_script()
    assert script.main([str(tmp_path / "two.yaml"), "--report", "--runs", str(runs), "--results", str(results)]) == 0
