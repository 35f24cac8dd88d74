"""Reliability of the run layer, one test per way a user saw it fail: every failure is one
line naming the cause and the fix with exit status 2 (usage/config) or 1 (run time), results
files are strict JSON, SIGTERM checkpoints like Ctrl-C, checkpoints and caches carry
checksums, a run directory has one writer, and a run killed at random moments resumes to
the uninterrupted run's results bit for bit."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from metaopt import cli, rundir
from metaopt.rundir import load_checkpoint, lock_run_dir, save_checkpoint
from metaopt.train import Trainer

REPO = Path(__file__).resolve().parents[1]
SINE = str(REPO / "configs/sinusoid.yaml")
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
# Tiny sinusoid runs: seconds, not minutes.
TINY = ["--quiet", "--set", "train.meta_batch_size=2", "--set", "train.eval_tasks=4", "--set", "train.test_tasks=4",
        "--set", "train.eval_batch_size=4", "--set", "train.plots=false", "--set", "train.tensorboard=false",
        "--set", "model.hidden_sizes=[8]", "--set", "train.log_every=1"]
TINY_CFG: dict[str, Any] = {
    "model": {"hidden_sizes": [8]},
    "train": {"meta_batch_size": 2, "eval_tasks": 4, "test_tasks": 4, "eval_batch_size": 4, "plots": False,
              "tensorboard": False, "progress": False, "log_every": 1},
}


def strict_json(path: Path) -> Any:
    """json.loads that refuses NaN/Infinity (Python's json accepts them; JSON does not)."""
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("metaopt: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def spawn(*argv: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metaopt", *argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def inode(path: Path) -> int | None:
    return path.stat().st_ino if path.exists() else None


def last_iteration(metrics: Path) -> int:
    """The last iteration logged in ``metrics.csv`` (-1: none yet)."""
    try:
        last = metrics.read_text().rstrip("\n").rsplit("\n", 1)[-1].split(",", 1)[0]
    except OSError:
        return -1
    return int(last) if last.isdigit() else -1


def wait_for_rows(metrics: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"{metrics} never reached {rows} rows (exit {proc.poll()})")


# ============================================================================ divergence


def test_diverged_evaluation_is_named_and_results_stay_strict_json(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(capsys, "train", SINE, "--out", str(tmp_path / "r"), *TINY, "--set", "train.iterations=2",
                             "--set", "inner.lr=3", "--set", "inner.eval_steps=10", "--set", "train.eval_every=1")
    line = one_error_line(err)
    assert code == 1, err
    assert "test mse diverged" in line and "10 inner steps" in line and "inner lr 3.0" in line and "inner.lr" in line
    res = strict_json(tmp_path / "r/results.json")
    assert res["mean"] is None and res["query_loss"] is None and "diverged" in res
    assert res["before"]["mean"] > 0  # what is finite stays a number
    # Validation: "nan" (measured, diverged), not an empty cell (not measured).
    rows = (tmp_path / "r/metrics.csv").read_text().splitlines()
    assert all(r.split(",")[5] == "nan" for r in rows[1:] if r.split(",")[0] in ("1", "2")), rows
    # metaopt eval of the same run: same report, its own strict-JSON file.
    code, _out, err = run_cli(capsys, "eval", str(tmp_path / "r"), "--tasks", "3", "--split", "val", "--quiet")
    assert code == 1 and "val mse diverged" in one_error_line(err)
    assert strict_json(tmp_path / "r/eval_val_3tasks.json")["mean"] is None


def test_eval_names_its_split_and_never_overwrites_the_training_results(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "r"
    assert run_cli(capsys, "train", SINE, "--out", str(run), *TINY, "--set", "train.iterations=2")[0] == 0
    before = (run / "results.json").read_bytes()
    code, out, err = run_cli(capsys, "eval", str(run), "--split", "val", "--tasks", "5", "--quiet")
    assert code == 0 and out.startswith("val mse:") and "test" not in out.splitlines()[0], out
    assert (run / "results.json").read_bytes() == before
    assert strict_json(run / "eval_val_5tasks.json")["tasks"] == 5
    # With progress on, the evaluation shows a bar (it takes a minute on Omniglot).
    code, out, err = run_cli(capsys, "eval", str(run), "--tasks", "6")
    assert code == 0 and "test (6 tasks)" in err and out.startswith("test mse:")


# ============================================================================ OS errors


def test_unusable_out_is_one_line_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        code, _, err = run_cli(capsys, "train", SINE, "--out", str(out), *TINY)
        assert code == 2 and "is a file, not a folder" in one_error_line(err)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:  # root ignores permission bits; nobody can create folders in /proc
        target = ro / "run" if not os.access(ro, os.W_OK) else Path("/proc/self/run")
        code, _, err = run_cli(capsys, "train", SINE, "--out", str(target), *TINY)
        assert code == 2 and "cannot create folders in" in one_error_line(err), err
        assert not target.exists()
    finally:
        ro.chmod(0o700)


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import metaopt.train as train_mod

    calls = []

    def full(state: Any, path: Path) -> Path:
        calls.append(state["iteration"])
        if state["iteration"] >= 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_checkpoint(state, path)

    monkeypatch.setattr(train_mod, "save_checkpoint", full)
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", SINE, "--out", str(run), *TINY, "--set", "train.iterations=6",
                           "--set", "train.checkpoint_every=2")
    line = one_error_line(err)
    assert code == 1 and "no space left on device" in line and "--resume" in line, err
    assert load_checkpoint(run / "checkpoints/last.pt")["iteration"] == 2


def test_a_really_full_disk_is_one_line(tmp_path: Path) -> None:
    """The same on a 64 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "metaopt", "train", SINE, "--out", str(small / "run"), *TINY,
             "--set", "train.iterations=100000", "--set", "train.checkpoint_every=20", "--set", "train.eval_every=0"],
            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, check=False)
        line = one_error_line(proc.stderr)
        assert proc.returncode == 1 and f"cannot write {small / 'run'}: no space left on device" in line, proc.stderr
        assert load_checkpoint(small / "run/checkpoints/last.pt")["iteration"] % 20 == 0
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_an_overflowing_outer_lr_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "train", SINE, "--out", str(tmp_path / "r"), *TINY, "--set", "outer.lr=1e38",
                           "--set", "train.iterations=2")
    line = one_error_line(err)
    assert code == 1 and "overflow" in line and "outer lr 1e+38" in line and "outer.lr" in line


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "--debug", "train", SINE, "--out", str(tmp_path / "r"), *TINY,
                           "--set", "outer.lr=1e38", "--set", "train.iterations=1")
    assert code == 1 and "Traceback" in err and err.strip().endswith("or train.grad_clip")


# ============================================================================ signals, temporaries, locks


def test_sigterm_checkpoints_and_exits_like_ctrl_c(tmp_path: Path) -> None:
    proc = spawn("train", SINE, "--out", "run", *TINY, "--set", "train.iterations=1000000",
                 "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", cwd=tmp_path)
    wait_for_rows(tmp_path / "run/metrics.csv", 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM) after iteration" in err and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["iteration"] >= 3


def test_stale_temporaries_are_removed_and_a_second_writer_is_refused(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "r"
    assert run_cli(capsys, "train", SINE, "--out", str(run), *TINY, "--set", "train.iterations=2")[0] == 0
    stale = [run / "checkpoints/.last.pt.k1ll3d.tmp", run / ".metrics.csv.abc.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    with lock_run_dir(run):  # another live writer: refused, naming the directory and its pid
        code, _, err = run_cli(capsys, "train", "--resume", str(run), "--set", "train.iterations=3", "--quiet")
        line = one_error_line(err)
        assert code == 1 and str(run) in line and f"pid {os.getpid()}" in line
        assert all(p.exists() for p in stale)  # not ours to remove while the holder lives
    assert run_cli(capsys, "train", "--resume", str(run), "--set", "train.iterations=3", "--quiet")[0] == 0
    assert not any(p.exists() for p in stale)


# ============================================================================ checksums


def _flip_a_weight_byte(path: Path) -> None:
    """Flip one byte inside the stored bytes of the first weight (torch.save stores
    tensor data uncompressed, so the weight's bytes appear verbatim in the file)."""
    state = torch.load(path, weights_only=True)
    weight = next(iter(state["model"].values()))
    needle = weight.contiguous().numpy().tobytes()[:16]
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_checkpoint_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "r"
    assert run_cli(capsys, "train", SINE, "--out", str(run), *TINY, "--set", "train.iterations=2")[0] == 0
    ckpt = run / "checkpoints/last.pt"
    torch.load(ckpt, weights_only=True)  # loads fine before ...
    _flip_a_weight_byte(ckpt)
    torch.load(ckpt, weights_only=True)  # ... and after: torch does not notice
    for argv in (["eval", str(run)], ["train", "--resume", str(run), "--set", "train.iterations=3"]):
        code, _, err = run_cli(capsys, *argv, "--quiet")
        line = one_error_line(err)
        assert code == 2 and str(ckpt) in line and "checksum" in line, line
    # A truncated file: torch's own error, without its advice to load with weights_only=False.
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    code, _, err = run_cli(capsys, "eval", str(run), "--quiet")
    line = one_error_line(err)
    assert code == 2 and str(ckpt) in line and "weights_only" not in err and "corrupt" in line


def _tiny_omniglot(root: Path) -> dict[str, list[list[str]]]:
    """Omniglot's NumPy layout with 3 random characters per set (seconds to preprocess,
    not the 20 s of the real one); returns a split file naming them."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir()
    index = {}
    for s in ("images_background", "images_evaluation"):
        np.savez(root / f"{s}.npz", images=rng.random((3, 20, 105, 105)) > 0.1)
        index[s] = [{"alphabet": "A", "characters": 3, "first_index": 0, "first_id": 1}]
    (root / "index.json").write_text(json.dumps(index))
    chars = [[s, "A", f"character{k:02d}"] for s in index for k in (1, 2, 3)]
    return {"train": chars[:2], "val": chars[2:4], "test": chars[4:]}


def test_a_zeroed_omniglot_cache_is_detected_and_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from metaopt.tasks import Omniglot

    kwargs: dict[str, Any] = {"ways": 2, "verify": False, "split_file": _tiny_omniglot(tmp_path / "data"),
                                  "cache_dir": tmp_path / "cache"}
    first = Omniglot(tmp_path / "data", **kwargs)
    assert Omniglot(tmp_path / "data", **kwargs).cache_hit
    obj = torch.load(first.cache_path, weights_only=True)
    obj["images"] = torch.zeros_like(obj["images"])  # a well-formed file with zeroed data
    torch.save(obj, first.cache_path)
    capsys.readouterr()
    again = Omniglot(tmp_path / "data", **kwargs)
    assert not again.cache_hit and torch.equal(again.images, first.images) and again.images.any()
    assert f"{first.cache_path} fails its checksum" in capsys.readouterr().err
    assert Omniglot(tmp_path / "data", **kwargs).cache_hit  # the rebuilt file passes


# ============================================================================ validation up front


def test_config_mistakes_fail_before_a_run_directory_exists(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            omniglot_root: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    cases = [
        ([str(empty)], "is empty"),
        ([SINE, "--set", "train.iterations=0"], "train.iterations should be an int >= 1 but is: 0"),
        ([str(REPO / "configs/omniglot_5w1s.yaml"), "--set", f"task.root={omniglot_root}", "--set", "task.ways=700",
          "--device", "cpu"], "ways=700"),
        ([str(REPO / "configs/omniglot_5w1s.yaml"), "--set", f"task.root={tmp_path / 'none'}", "--device", "cpu"],
         "task.download=true"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(capsys, "train", *argv, "--out", str(tmp_path / "r"), "--quiet")
        assert code == 2 and needle in one_error_line(err), (argv, err)
        assert not (tmp_path / "r").exists(), argv
    # The checksum keys the hints name can be set from the command line.
    code, _, err = run_cli(capsys, "config", str(REPO / "configs/omniglot_5w1s.yaml"), "--set", "task.verify=false",
                           "--set", "task.checksums={index.json: abc}")
    assert code == 0, err


def test_a_failed_download_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    from metaopt.tasks import Omniglot

    def offline(*a: Any, **k: Any) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match=r"cannot download https://.*images_background.zip \(Name or service"):
        Omniglot(tmp_path / "data", download=True, cache_dir=tmp_path)
    assert cli.describe_error(OSError("cannot download x (y)")) == (1, "cannot download x (y)")
    assert cli.describe_error(IsADirectoryError(errno.EISDIR, "Is a directory", "r/x")) == (1, "is a directory: r/x")


# ============================================================================ short runs, threads


def test_short_runs_validate_at_the_last_iteration_and_plot_single_points(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from metaopt import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figs.append(fig) or Path(out))
    cfg = {**TINY_CFG, "train": {**TINY_CFG["train"], "iterations": 3, "eval_every": 2, "plots": True}}
    t = Trainer(cfg, tmp_path / "r")
    t.fit()
    assert [r["iteration"] for r in t.history if "val_metric" in r] == [0, 2, 3]
    curves = figs[0]
    assert len(curves.axes) == 2 and curves.axes[1].get_ylabel() == "validation mse"
    # One logged iteration: a marker, not an invisible one-point line; no empty panel.
    figs.clear()
    cfg = {**TINY_CFG, "train": {**TINY_CFG["train"], "iterations": 1, "eval_every": 0, "plots": True}}
    Trainer(cfg, tmp_path / "one").fit()
    (ax,) = figs[0].axes
    assert all(line.get_marker() == "o" for line in ax.get_lines()) and ax.get_lines()
    # compare's train meta-loss panel is not labelled "validation".
    plots.compare_curves({"sgd": [([1, 2], [0.5, 0.4])]}, tmp_path / "c.png", metric="meta-loss (train)")
    assert figs[-1].axes[0].get_ylabel() == "meta-loss (train)"


def test_cpu_threads_default_to_one_for_small_models() -> None:
    old = torch.get_num_threads()
    try:
        assert Trainer(TINY_CFG).threads == 1 and torch.get_num_threads() == 1
        cfg = {**TINY_CFG, "train": {**TINY_CFG["train"], "threads": 2}}
        assert Trainer(cfg).threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


# ============================================================================ runs from Python


def test_cli_refuses_runs_started_from_python_with_their_own_objects(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from metaopt import Sinusoid

    gen = torch.Generator().manual_seed(0)
    data = [Sinusoid().sample(2, gen) for _ in range(3)]
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    run = tmp_path / "r"
    cfg = {**TINY_CFG, "train": {**TINY_CFG["train"], "iterations": 2, "eval_every": 0}}
    Trainer(cfg, run, data=data, model=model, test_data=data[:1]).fit()
    assert (run / "config.yaml").read_text().startswith("# started from Python with its own data=list, model=Sequential")
    for argv in (["train", "--resume", str(run), "--set", "train.iterations=3"], ["eval", str(run)]):
        code, _, err = run_cli(capsys, *argv)
        line = one_error_line(err)
        assert code == 2 and "started from Python" in line and "model (Sequential)" in line, line
    # From Python, with the same objects, it resumes.
    t = Trainer({**cfg, "train": {**cfg["train"], "iterations": 3}}, run, data=data, model=model, resume=True)
    assert t.iteration == 2 and t.fit()["iteration"] == 3


# ============================================================================ fault injection


def test_random_sigkills_resume_to_the_uninterrupted_results_bit_for_bit(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Kill a run with SIGKILL at random moments (fixed seed), resume each time, and get
    exactly the uninterrupted run's checkpoint and results."""
    args = [*TINY, "--set", "train.iterations=40", "--set", "train.checkpoint_every=3", "--set", "train.eval_every=10"]
    assert run_cli(capsys, "train", SINE, "--out", str(tmp_path / "ref"), *args)[0] == 0  # in this process
    # Random moments in training progress rather than wall-clock time (so that a fast and a
    # loaded machine kill at the same kind of moments): past iteration k, plus 0-20 ms.
    rng = random.Random(16)
    targets = sorted(rng.sample(range(2, 38), 3))
    metrics = tmp_path / "run/metrics.csv"
    kills, old, saved = 0, None, []
    proc = spawn("train", SINE, "--out", "run", *args, cwd=tmp_path)
    for target in targets:
        # A start or resume replaces metrics.csv (new inode; a resume drops the rows after
        # its checkpoint), so the killed process's rows do not count.
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and (
                inode(metrics) in (None, old) or last_iteration(metrics) < target):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(timeout=60)
        old = inode(metrics)
        saved.append(last_iteration(metrics))
        if not (tmp_path / "run/checkpoints/last.pt").exists():  # killed before the first checkpoint
            proc = spawn("train", SINE, "--out", "run", *args, cwd=tmp_path)
        else:
            proc = spawn("train", "--resume", "run", "--quiet", cwd=tmp_path)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert kills == 3 and all(target <= it < 40 for target, it in zip(targets, saved)), (targets, saved)
    a = torch.load(tmp_path / "ref/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 40
    # Every tensor: weights, optimizer state, the task generator's state; except the global
    # CPU RNG state, which training does not draw from and which differs between two fresh
    # processes even without a kill.
    ta, tb = dict(rundir._tensors(a)), dict(rundir._tensors(b))
    assert ta.keys() == tb.keys() and len(ta) > 10
    assert all(torch.equal(ta[k], tb[k]) for k in ta if k != "/rng/torch_cpu")
    ra, rb = strict_json(tmp_path / "ref/results.json"), strict_json(tmp_path / "run/results.json")
    ra.pop("elapsed_s"), rb.pop("elapsed_s")
    assert ra == rb
    drop_time = lambda p: [r.rsplit(",", 1)[0] for r in p.read_text().splitlines()]
    assert drop_time(tmp_path / "ref/metrics.csv") == drop_time(tmp_path / "run/metrics.csv")
    assert not list((tmp_path / "run").rglob(".*.tmp"))
