"""`metaopt bench`: end-to-end smoke run on tiny settings, the meta-gradient guard, the
memory measurement, and peers that cannot be imported."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metaopt.bench as bench
from metaopt.bench.check import check_meta_gradients
from metaopt.bench.impls import IMPLS, NO_ADAFACTOR, get_impls
from metaopt.bench.memreport import MEMORY_INNERS, peak_memory_report, state_sizes
from metaopt.bench.report import to_markdown
from metaopt.bench.workloads import WORKLOADS, FunctionalAdam, make_batch, tiny

REPO = Path(__file__).resolve().parents[1]
TARGETS = REPO / "experiments" / "bench_targets.yaml"
O1_2X = {"kind": "speed_vs_peer", "name": "O1 (SGD, second order) tasks/s >= 2x the fastest peer (CPU)",
         "workload": "O1", "min": 2.0}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_smoke_prints_table_and_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "higher", None)  # a peer that cannot be imported: reported, not skipped
    code = bench.run(_args("--tiny", "--workloads", "S1", "--inner", "sgd", "adafactor", "--order", "second",
                           "--repeats", "1", "--warmup", "0", "--memory", "inline", "--quiet",
                           "--no-memory-report", "--output", str(tmp_path / "bench.md"),
                           "--targets", str(TARGETS)))
    out = capsys.readouterr().out
    assert code == 0
    assert "### S1 · sgd inner · second order" in out and "### S1 · adafactor inner · second order" in out
    assert "| implementation | meta-it/s | tasks/s | ×peer | GFLOP/s | peak MiB | note |" in out
    for impl in get_impls():
        assert f"| {impl.name} |" in out
    assert "not importable: ModuleNotFoundError" in out  # higher's row says why
    assert NO_ADAFACTOR in out
    assert "## Targets" in out and "Adafactor inner time" in out
    assert (tmp_path / "bench.md").read_text().strip() == out.strip()
    res = json.loads((tmp_path / "bench.json").read_text())
    assert [c["inner"] for c in res["cases"]] == ["sgd", "adafactor"]
    rows = {r["impl"]: r for r in res["cases"][0]["rows"]}
    assert rows["higher"]["status"] == "unavailable"
    for key in ("metaopt-vmap", "metaopt-loop", "plain"):
        assert rows[key]["status"] == "ok" and rows[key]["meta_it_s"]["median"] > 0
        assert rows[key]["memory"]["peak_bytes"] >= 0
    assert res["cases"][0]["flops"] > 0
    # CPU: the floor's peak is measured (no datasheet figure), and every case gets a floor.
    assert res["meta"]["peak_tflops"] > 0 and res["meta"]["peak_source"].startswith("measured")
    assert all(c["floor_tasks_s"] > 0 for c in res["cases"])
    assert "Arithmetic floor: " in out and "TFLOP/s (measured, best of matmul" in out
    assert all(c["ok"] for c in res["check"]) and res["check"]
    assert {t["status"] for t in res["targets"]} <= {"met", "not met", "not measured"}


def test_experiments_script_runs(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("experiments_bench", REPO / "experiments" / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--workloads", "O1", "--inner", "sgd", "--order", "first", "--impls", "plain",
                     "metaopt-loop", "--repeats", "1", "--warmup", "0", "--memory", "off", "--no-check",
                     "--no-flops", "--no-memory-report", "--quiet"]) == 0
    assert "### O1 · sgd inner · first order" in capsys.readouterr().out


def test_every_peer_computes_the_plain_loops_meta_gradient() -> None:
    impls = [i for i in get_impls() if i.unavailable() is None]
    results = check_meta_gradients(impls)
    bad = [r for r in results if not r.ok]
    assert not bad, bad
    checked = {r.impl for r in results}
    assert {"metaopt-vmap", "metaopt-loop"} <= checked
    assert {i.key for i in impls if i.key != "plain"} <= checked


def test_peak_memory_sees_a_known_allocation() -> None:
    # In a fresh process, as the benchmark measures: in a long-lived pytest worker, heap
    # pages freed by earlier tests stay resident and a new allocation reuses them.
    code = (
        "import torch\n"
        "from metaopt.bench.measure import PeakMemory\n"
        "with PeakMemory('cpu') as m:\n"
        "    x = torch.ones(16 * 2**20 // 4)  # 16 MiB\n"
        "    del x\n"
        "print(m.peak_bytes, m.method)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, method = out.stdout.split(maxsplit=1)
    assert int(peak) >= 15 * 2**20, method


def test_state_sizes_and_functional_adam() -> None:
    rows = {(r["model"], r["inner"]): r for r in state_sizes()}
    mlp = rows[("MLP 1-40-40-1", "adam")]
    assert mlp["state_elements"] == 2 * mlp["param_elements"] + 1  # m, v and the step counter
    assert rows[("MLP 1-40-40-1", "adafactor")]["state_elements"] < mlp["param_elements"]
    # FunctionalAdam's first step is torch.optim.Adam's.
    p = torch.randn(3, 4, dtype=torch.float64)
    g = torch.randn(3, 4, dtype=torch.float64)
    opt = FunctionalAdam(lr=0.1)
    new, _ = opt.step({"p": p}, {"p": g}, opt.init({"p": p}))
    ref = p.clone().requires_grad_()
    torch_opt = torch.optim.Adam([ref], lr=0.1)
    ref.grad = g.clone()
    torch_opt.step()
    torch.testing.assert_close(new["p"], ref.detach())


def test_memory_report_rows_and_markdown() -> None:
    rows = peak_memory_report("cpu", "inline", True, None, impls=("metaopt-loop",), workloads=("S5",))
    assert [r["inner"] for r in rows] == list(MEMORY_INNERS)
    assert all(r["peak_bytes"] >= 0 and ("VmHWM" in r["method"] or "psutil" in r["method"]) for r in rows)
    res = {"meta": {"torch": "x", "device": "cpu", "device_name": "cpu", "threads": 1, "repeats": 1, "warmup": 0,
                    "tiny": True, "seed": 0, "memory_method": "inline", "memory_iterations": 1,
                    "peak_tflops": None, "workloads": []},
           "peers": [], "check": None, "cases": [], "memory_report": rows, "state_sizes": state_sizes(),
           "targets": []}
    md = to_markdown(res)
    assert "## Inner-optimizer memory" in md and "| S5 | metaopt-loop | adam |" in md
    assert "## Inner-optimizer state size" in md and "| Conv4 20-way | 113,236 | adafactor |" in md


def test_o1_target_reports_ours_and_the_peers_share_of_the_floor() -> None:
    from metaopt.bench.report import targets

    def row(key: str, name: str, tasks_s: float) -> dict:
        return {"impl": key, "name": name, "status": "ok", "tasks_s": tasks_s, "is_metaopt": key.startswith("metaopt"),
                "meta_it_s": {"median": tasks_s / 32}}

    case = {"workload": "O1", "inner": "sgd", "order": "second", "meta_batch": 32, "floor_tasks_s": 40.0,
            "rows": [row("metaopt-loop", "metaopt per-task loop", 10.0), row("higher", "higher", 8.0)]}
    res = {"meta": {"device": "cpu"}, "cases": [case]}
    o1 = targets(res, [O1_2X])[0]
    assert o1["status"] == "not met"
    assert o1["detail"] == ("metaopt per-task loop 10 tasks/s vs higher 8 tasks/s: 1.25x; arithmetic floor "
                            "40 tasks/s: ours at 25.0% of it, higher at 20.0%; 2x the fastest peer would be "
                            "40.0% of the floor")
    case["rows"][0].update(tasks_s=16.0, meta_it_s={"median": 0.5})
    assert targets(res, [O1_2X])[0]["status"] == "met"
    # memory_max: ours over that peer's peak memory, both measured
    spec = [{**O1_2X, "min": 0.95, "memory_max": 1.2}]
    t = targets(res, spec)[0]  # speed holds, memory unknown: not measured, not "not met"
    assert t["status"] == "not measured" and "memory not measured" in t["detail"]
    assert targets(res, [{**spec[0], "min": 3.0}])[0]["status"] == "not met"  # 2x: speed alone fails it
    case["rows"][0]["memory"], case["rows"][1]["memory"] = {"peak_bytes": 130 * 2**20}, {"peak_bytes": 100 * 2**20}
    t = targets(res, spec)[0]
    assert t["status"] == "not met" and t["detail"].endswith("peak memory 130.0 vs 100.0 MiB: 1.30x (<= 1.2x)")
    case["rows"][0]["memory"] = {"peak_bytes": 110 * 2**20}
    assert targets(res, spec)[0]["status"] == "met"
    # device-specific targets are skipped elsewhere
    assert targets(res, [{**O1_2X, "device": "cuda"}]) == []


def test_memory_target_counts_resolvable_peaks_only() -> None:
    from metaopt.bench.report import targets

    def mem(wid: str, key: str, inner: str, kib: float) -> dict:
        return {"workload": wid, "impl": key, "inner": inner, "peak_bytes": kib * 1024}

    res = {"meta": {"device": "cpu"}, "cases": [], "memory_report": [
        mem("S5", "metaopt-loop", "sgd", 16), mem("S5", "metaopt-loop", "adafactor", 4),  # page noise
        mem("O5", "metaopt-loop", "sgd", 1024 * 100), mem("O5", "metaopt-loop", "adafactor", 1024 * 110)]}
    spec = [{"kind": "adafactor_memory", "max": 1.3}]
    t = targets(res, spec)[0]
    assert t["status"] == "met"
    assert t["detail"] == ("S5 metaopt-loop: below resolution (4 vs 16 KiB; not counted); "
                           "O5 metaopt-loop: 1.10x (110.0 vs 100.0 MiB)")
    res["memory_report"][3]["peak_bytes"] = 140 * 2**20
    assert targets(res, spec)[0]["status"] == "not met"


def test_measured_peak_is_positive_and_says_how() -> None:
    from metaopt.bench.measure import measure_peak_tflops

    tflops, how = measure_peak_tflops("cpu", repeats=1)
    assert 0 < tflops < 100 and how.startswith("measured") and "conv2d" in how


def test_workload_batches_have_the_real_shapes() -> None:
    b = make_batch(WORKLOADS["O1"])
    assert b.support[0].shape == (32, 5, 1, 28, 28) and b.query[0].shape == (32, 75, 1, 28, 28)
    assert b.support[1].dtype == torch.int64 and int(b.query[1].max()) == 4
    s = make_batch(tiny(WORKLOADS["S5"]))
    assert s.support[0].shape == (2, 5, 1)
    torch.testing.assert_close(make_batch(WORKLOADS["S1"]).query[1], make_batch(WORKLOADS["S1"]).query[1])


def test_unknown_implementation_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown implementation"):
        get_impls(["nope"])
    assert set(IMPLS) >= {"metaopt-vmap", "metaopt-loop", "higher", "torchopt", "learn2learn", "plain"}


def test_plan_step_validates_and_expands_cases() -> None:
    from metaopt.bench.plan import make_plan

    plan = make_plan(_args("--tiny", "--workloads", "S1", "O1", "--inner", "sgd", "--order", "second",
                           "--precision", "fp32", "bf16"))
    assert [c.label for c in plan.cases] == ["S1 sgd second", "S1 sgd second bf16", "O1 sgd second",
                                             "O1 sgd second bf16"]
    assert plan.targets == [] and plan.remat_workload.meta_batch == 1
    for argv, msg in ((["--curves", "steps", "--curve-steps", "0"], "--curve-steps values must be >= 1 but got: 0"),
                      (["--curves", "model", "--curve-models", "vgg"], "unknown model 'vgg'"),
                      (["--remat-steps", "-1"], "--remat-steps values must be >= 1 but got: -1"),
                      (["--remat-every", "0"], "--remat-every must be >= 1 but is: 0"),
                      (["--repeats", "0"], "--repeats must be >= 1 but is: 0")):
        with pytest.raises(SystemExit, match=msg):
            make_plan(_args(*argv))
    with pytest.raises(SystemExit):  # argparse: not one of fp32, bf16, fp16, tf32
        _args("--precision", "fp8")


def test_targets_live_in_a_yaml_file_not_in_the_package(tmp_path: Path) -> None:
    from metaopt.bench.report import load_targets

    spec = load_targets(TARGETS)
    kinds = {t["kind"] for t in spec}
    assert {"speed_vs_peer", "fidelity", "remat", "adafactor_time", "adafactor_memory"} <= kinds
    bad = tmp_path / "t.yaml"
    bad.write_text("targets:\n  - kind: fastest\n")
    with pytest.raises(ValueError, match="target kind should be one of .* but is: 'fastest'"):
        load_targets(bad)
    src = (REPO / "metaopt" / "bench" / "report.py").read_text()
    assert "0.95" not in src and "1.2x" not in src  # thresholds come from the file


def test_bench_precision_fidelity_curves_and_remat_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = bench.run(_args("--tiny", "--workloads", "O1", "--inner", "sgd", "--order", "second",
                           "--precision", "fp32", "bf16", "--impls", "metaopt-loop", "metaopt-vmap", "plain",
                           "--repeats", "1", "--warmup", "0", "--memory", "inline", "--quiet", "--no-memory-report",
                           "--no-flops", "--fidelity", "--curves", "steps", "model", "--curve-steps", "1", "2",
                           "--curve-models", "conv4", "--curve-impls", "metaopt-loop", "plain",
                           "--remat-steps", "3", "--targets", str(TARGETS), "--output", str(tmp_path / "b")))
    out = capsys.readouterr().out
    assert code == 0
    assert "### O1 · sgd inner · second order · metaopt in bf16" in out
    res = json.loads((tmp_path / "b.json").read_text())
    bf16 = next(c for c in res["cases"] if c["precision"] == "bf16")
    rows = {r["impl"]: r for r in bf16["rows"]}
    assert rows["metaopt-loop"]["status"] == "ok" and rows["metaopt-loop"]["precision"] == "bf16"
    assert rows["plain"]["precision"] == "fp32"  # peers stay float32
    assert rows["metaopt-vmap"]["status"] in ("ok", "n/a")  # n/a where vmap ignores autocast (torch 2.13 CPU)
    pol = {r["policy"]: r for r in res["fidelity"]}
    assert set(pol) == {"fp32", "autocast", "autocast-loss32", "engine", "engine-norm32"}
    assert pol["engine"]["cosine"] > 0.99 and "## Meta-gradient fidelity" in out
    assert [r["point"] for r in res["curves"]["steps"]] == ["1", "1", "2", "2"]
    assert all(r["seconds"] > 0 for r in res["curves"]["steps"] + res["curves"]["model"])
    remat = {r["row"]: r for r in res["remat"]}
    assert set(remat) == {"metaopt plain unroll", "metaopt checkpointed", "plain PyTorch loop"} and remat["metaopt checkpointed"]["every"] == 2
    assert [r["point"] for r in res["remat"]] == ["3", "3", "3"] and all(r["seconds"] > 0 for r in res["remat"])
    assert "## Second-order memory against inner steps" in out and "### Against inner steps" in out
    t = {x["target"]: x for x in res["targets"]}
    assert t["O1 bf16 meta-gradient cosine to float64 >= 0.99"]["status"] == "met"


def test_measure_points_interleaves_points_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """interleave_points: one timing over every point's implementations (the remat table's
    plain against checkpointed ratio is measured side by side); a point's own impl list."""
    from metaopt.bench import curves
    from metaopt.bench.workloads import Case, WORKLOADS, tiny
    calls: list[list[Any]] = []
    real = curves.time_interleaved

    def spy(its, *a, **k):
        calls.append(list(its))
        return real(its, *a, **k)

    monkeypatch.setattr(curves, "time_interleaved", spy)
    w = tiny(WORKLOADS["S1"])
    pts = [("a", Case(w, "sgd", "second")), ("b", Case(w, "sgd", "first"), ["metaopt-loop"])]
    rows = curves.measure_points(pts, ["metaopt-loop", "plain"], torch.device("cpu"), repeats=1, warmup=0,
                                 memory="off", interleave_points=True)
    assert calls == [[("a", "metaopt-loop"), ("a", "plain"), ("b", "metaopt-loop")]]
    assert [(r["point"], r["impl"]) for r in rows] == [("a", "metaopt-loop"), ("a", "plain"), ("b", "metaopt-loop")]
    calls.clear()
    curves.measure_points(pts, ["metaopt-loop", "plain"], torch.device("cpu"), repeats=1, warmup=0, memory="off")
    assert calls == [[("a", "metaopt-loop"), ("a", "plain")], [("b", "metaopt-loop")]]


@pytest.mark.parametrize("stop_after", [0, 2])
def test_an_interrupted_case_keeps_its_finished_repeats(stop_after: int, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (`timeout --signal=INT`) during a case's timing: the repeats that every
    implementation finished are reported, and the heading says how many; a case with no
    whole repeat is left out; the next cases are not measured."""
    from metaopt.bench import measure
    real = measure.time_interleaved

    def interrupted(its, repeats, warmup, iterations, log=lambda s: None, times=None):
        def stop_log(line: str) -> None:
            log(line)
            if line.strip().startswith(f"repeat {stop_after}/"):
                raise KeyboardInterrupt
        if stop_after == 0:  # during the first repeat: one implementation timed, the others not
            first = next(iter(its))
            times = {} if times is None else times
            times.update({k: [] for k in its})
            times[first].append(0.1)
            raise KeyboardInterrupt
        return real(its, repeats, warmup, iterations, stop_log, times)

    monkeypatch.setattr(measure, "time_interleaved", interrupted)
    code = bench.run(_args("--tiny", "--workloads", "S1", "--inner", "sgd", "adafactor", "--order", "second",
                           "--impls", "metaopt-loop", "plain", "--repeats", "3", "--warmup", "0",
                           "--memory", "off", "--no-check", "--quiet", "--no-memory-report"))
    out = capsys.readouterr().out
    assert code == 0
    assert "**Interrupted**" in out
    assert "### S1 · adafactor inner" not in out  # after the interruption: not measured
    if stop_after == 0:
        assert "### S1 · sgd inner" not in out
        return
    assert "### S1 · sgd inner · second order" in out and "(interrupted: 2 of 3 repeats)" in out
    table = out.split("### S1 · sgd inner")[1]
    rows = [line for line in table.splitlines() if line.startswith("| metaopt per-task loop |")
            or line.startswith("| plain PyTorch loop |")]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 for r in rows)
