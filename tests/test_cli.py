"""End to end through the ``metaopt`` command on tiny settings: train (sinusoid, Omniglot),
eval, compare, resume, Ctrl-C, bad configs, help."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaopt import cli

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
# One thread per child: tiny workloads, and a shared 2-core CI machine where two spinning
# OpenMP threads per process slow everything down.
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
QUICK = ["--quiet", "--set", "train.eval_tasks=10", "--set", "train.test_tasks=20", "--set", "train.log_every=2",
         "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10"]


def metaopt(*args: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "metaopt", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"metaopt {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def assert_run_dir(run: Path, metric: str, iterations: int) -> dict:
    """Every documented file of a run directory, with finite metrics and real PNGs."""
    assert (run / "config.yaml").is_file()
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["iteration"] == "0" and int(rows[-1]["iteration"]) == iterations
    assert {"iteration", "meta_loss"} <= set(rows[0])
    losses = [float(r["meta_loss"]) for r in rows if r["meta_loss"]]
    vals = [float(r["val_metric"]) for r in rows if r["val_metric"]]
    assert losses and vals and all(math.isfinite(v) for v in losses + vals)
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert state["iteration"] == iterations and isinstance(state["model"], dict)
    res = json.loads((run / "results.json").read_text())
    assert res["metric"] == metric and math.isfinite(res["mean"]) and math.isfinite(res["ci95"])
    assert res["tasks"] > 0
    pngs = list((run / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG and p.stat().st_size > 5000 for p in pngs)
    assert list(run.glob("events.out.tfevents.*"))
    return res


def test_sinusoid_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    proc = metaopt("train", str(REPO / "configs/sinusoid.yaml"), "--out", "run", "--set", "train.iterations=20",
                   *QUICK, cwd=tmp_path)
    assert "test mse" in proc.stdout
    run = tmp_path / "run"
    res = assert_run_dir(run, "mse", 20)
    assert res["tasks"] == 20 and res["ci95"] > 0
    assert {p.name for p in (run / "plots").glob("*.png")} == {"learning_curves.png", "sinusoid_fit.png"}
    proc = metaopt("eval", "run", "--tasks", "30", cwd=tmp_path)
    assert "test mse" in proc.stdout
    assert json.loads((run / "eval_test_30tasks.json").read_text())["tasks"] == 30
    assert json.loads((run / "results.json").read_text())["tasks"] == 20  # the training's results stay
    assert cli.main(["eval", str(run), "--tasks", "10", "--steps", "1"]) == 0
    one = json.loads((run / "eval_test_10tasks_1steps.json").read_text())
    assert one["inner_steps"] == 1 and one["tasks"] == 10
    capsys.readouterr()  # drop the evaluations' progress output
    for bad, message in ((["--tasks", "0"], "--tasks should be an int >= 1 but is: 0"),
                         (["--steps", "-1"], "--steps should be an int >= 0 but is: -1")):
        assert cli.main(["eval", str(run), *bad]) == 2
        assert capsys.readouterr().err == f"metaopt: error: {message}\n"
    # A second train into the same directory is refused (one line, no traceback).
    again = metaopt("train", str(REPO / "configs/sinusoid.yaml"), "--out", "run", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr


def test_omniglot_train(tmp_path: Path, omniglot_root: Path) -> None:
    metaopt("train", str(REPO / "configs/omniglot_5w1s.yaml"), "--out", "run", "--device", "cpu",
            "--set", "train.iterations=20", "--set", f"task.root={omniglot_root}", "--set", "model.filters=8",
            "--set", "train.meta_batch_size=2", "--set", "task.queries=2", "--set", "inner.eval_steps=2",
            "--set", "train.eval_batch_size=10", *QUICK, cwd=tmp_path)
    res = assert_run_dir(tmp_path / "run", "accuracy", 20)
    assert 0.0 <= res["mean"] <= 1.0
    cfg = (tmp_path / "run/config.yaml").read_text()
    assert "filters: 8" in cfg and "ways: 5" in cfg  # the resolved config


def test_compare_two_inner_optimizers(tmp_path: Path) -> None:
    proc = metaopt("compare", str(REPO / "configs/sinusoid.yaml"), "--inner", "sgd,adafactor:lr=0.1",
                   "--seeds", "2", "--out", "cmp", "--set", "train.iterations=10", *QUICK, cwd=tmp_path)
    out = tmp_path / "cmp"
    for label in ("sgd", "adafactor_lr=0.1"):
        for seed in (0, 1):
            assert_run_dir(out / label / f"seed{seed}", "mse", 10)
    seeds = [json.loads((out / "sgd" / f"seed{s}" / "config.yaml").read_text().split("seed: ")[1].split(",")[0]
                        .split("\n")[0]) for s in (0, 1)]
    assert seeds == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["inner"] for r in summary["rows"]] == ["sgd", "adafactor:lr=0.1"]
    assert all(r["seeds"] == 2 and math.isfinite(r["mean"]) and math.isfinite(r["ci95"]) for r in summary["rows"])
    md = (out / "summary.md").read_text()
    assert "| sgd | 2 |" in md and "±" in md and md in proc.stdout
    for png in ("compare_val_mse.png", "compare_meta_loss.png"):
        assert (out / "plots" / png).read_bytes()[:8] == PNG
    # Re-running reuses the finished runs.
    again = metaopt("compare", str(REPO / "configs/sinusoid.yaml"), "--inner", "sgd,adafactor:lr=0.1",
                    "--seeds", "2", "--out", "cmp", "--set", "train.iterations=10", *QUICK, cwd=tmp_path)
    assert "[compare]" not in again.stderr


def test_resume_through_the_cli(tmp_path: Path) -> None:
    base = [str(REPO / "configs/sinusoid.yaml"), *QUICK, "--set", "train.log_every=1", "--set", "train.plots=false"]
    metaopt("train", *base, "--out", "full", "--set", "train.iterations=20", cwd=tmp_path)
    metaopt("train", *base, "--out", "part", "--set", "train.iterations=10", cwd=tmp_path)
    proc = metaopt("train", "--resume", "part", "--quiet", "--set", "train.iterations=20", cwd=tmp_path)
    assert "resuming part at iteration 10" in proc.stderr

    def rows(run: str) -> list[list[str]]:
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            return [r[:-1] for r in csv.reader(f)]  # all but elapsed_s

    assert rows("full") == rows("part")
    a = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "metaopt", "train", str(REPO / "configs/sinusoid.yaml"), "--out", "run", "--quiet",
         "--set", "train.iterations=1000000", "--set", "train.log_every=1", "--set", "train.eval_every=0",
         "--set", "train.checkpoint_every=0"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run/metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted (Ctrl-C) after iteration" in err and "--resume" in err and "Traceback" not in err
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert state["iteration"] >= 3


BAD_CLI = [
    (["--set", "train.iterationz=5"], "train.iterationz"),
    (["--set", "train.iterations=ten"], "train.iterations"),
    (["--set", "inner.name=adamz"], "adamz"),
    (["--set", "inner.lr=-0.01"], "inner.lr"),
    (["--set", "outer.name=lion"], "outer.name"),
    (["--set", "outer.betas=[0.9]"], "outer"),
    (["--set", "noequals"], "section.key=value"),
]


@pytest.mark.parametrize("extra,needle", BAD_CLI, ids=[n for _, n in BAD_CLI])
def test_bad_configs_exit_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, extra: list, needle: str) -> None:
    code = cli.main(["train", str(REPO / "configs/sinusoid.yaml"), "--out", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("metaopt: error:") and needle in err, err
    assert not (tmp_path / "r").exists()


def test_ways_larger_than_the_split(tmp_path: Path, capsys: pytest.CaptureFixture, omniglot_root: Path) -> None:
    code = cli.main(["train", str(REPO / "configs/omniglot_20w1s.yaml"), "--out", str(tmp_path / "r"),
                     "--set", f"task.root={omniglot_root}", "--set", "task.ways=5000", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "ways=5000" in err, err


def test_missing_files_and_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("train: {iterations: 1}\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/last.pt").write_bytes(b"\x00garbage")
    assert cli.main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and err.count("\n") == 1


def test_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    proc = metaopt("train", str(REPO / "configs/sinusoid.yaml"), "--set", "inner.lr=-1", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert "inner.lr" in proc.stderr


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["compare"], ["config"]])
def test_help_has_examples(command: list, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "metaopt" in out


def test_config_command_prints_the_resolved_config(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["config", str(REPO / "configs/omniglot_20w1s.yaml"), "--set", "inner.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "ways: 20" in out and "steps: 3" in out


def test_bench_subcommand_is_wired(capsys: pytest.CaptureFixture) -> None:
    try:
        code = cli.main(["bench", "--help"])
    except SystemExit as e:  # the benchmark's own argparse help
        code = e.code
    captured = capsys.readouterr()
    if code == 0:
        assert "metaopt bench" in captured.out
    else:  # the benchmark module is not there (yet): say so in one line
        assert code == 2 and "bench" in captured.err and captured.err.count("\n") == 1


def test_python_dash_m_is_the_same_entry_point(tmp_path: Path) -> None:
    proc = metaopt("--help", cwd=tmp_path)
    assert "metaopt train" in proc.stdout and "compare" in proc.stdout
