"""metaopt.distributed: two gloo processes on the CPU give the single-process meta-step,
train/checkpoint/resume across rank counts, and clear errors.

Multi-process tests start this file as a script twice (``python tests/test_distributed.py
WORKER OUT``) with the environment torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT on a free port); each rank writes what it saw under OUT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metaopt.config import ConfigError
from metaopt.distributed import free_port, shard_bounds

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.iterations=3", "train.meta_batch_size=4", "train.eval_every=3", "train.eval_tasks=6",
        "train.test_tasks=10", "train.eval_batch_size=4", "train.checkpoint_every=2", "train.log_every=1",
        "train.tensorboard=false", "train.plots=false", "train.progress=false", "model.hidden_sizes=[16]",
        "train.device=cpu"]


# ============================================================================ launching


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run_ranks(argv: list[str], world: int = 2, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Start ``python *argv`` once per rank; wait for all; kill the rest if one hangs."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *argv], env=_env(r, world, port), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def _worker(name: str, out: Path) -> list[subprocess.CompletedProcess]:
    res = _run_ranks([__file__, name, str(out)])
    for r in res:
        assert r.returncode == 0, f"rank failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return res


# ============================================================================ workers (run as a script)


def _step_setup(seed: int = 0):
    """float64 MLP, second-order MAML with 2 inner steps and a learnable inner lr, Adam."""
    from metaopt.maml import MAML
    from metaopt.models import MLP
    from metaopt.optim import SGD

    torch.manual_seed(seed)
    model = MLP(1, (16, 16), 1).double()
    maml = MAML(model, SGD(lr=torch.nn.Parameter(torch.tensor(0.05, dtype=torch.float64))), 2,
                loss_fn=F.mse_loss)
    outer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    return maml, outer


def _step_batches():
    """(name, full meta-batch, grad_clip): an even split, an uneven one (5 tasks), clipping."""
    from metaopt.tasks import Sinusoid

    tasks = Sinusoid(shots=5, queries=7)
    g = torch.Generator().manual_seed(3)
    return [("even", tasks.sample(4, g, dtype=torch.float64), None),
            ("uneven", tasks.sample(5, g, dtype=torch.float64), None),
            ("clipped", tasks.sample(6, g, dtype=torch.float64), 0.05)]


def _reference_steps() -> dict[str, dict[str, torch.Tensor]]:
    from metaopt.loop import meta_step

    maml, outer = _step_setup()
    out = {}
    for name, batch, clip in _step_batches():
        stats = meta_step(maml, outer, batch, grad_clip=clip, stats=True)
        out[name] = {k: v.detach().clone() for k, v in maml.state_dict().items()}
        out[name]["__loss"] = torch.tensor(stats.meta_loss)
    return out


def worker_step(out: Path) -> None:
    """Three meta-steps on sharded batches; every rank saves its parameters after each."""
    from metaopt import distributed
    from metaopt.loop import meta_step

    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    assert ctx is not None and ctx.world_size == 2 and ctx.backend == "gloo"
    maml, outer = _step_setup(seed=ctx.rank)  # rank 1 starts elsewhere: the broadcast fixes it
    ctx.broadcast_parameters(maml)
    saved = {}
    for name, batch, clip in _step_batches():
        shard = ctx.shard_batch(batch, allow_remainder=True)
        stats = meta_step(maml, outer, shard, grad_clip=clip, stats=True, sync=ctx)
        saved[name] = {k: v.detach().clone() for k, v in maml.state_dict().items()}
        saved[name]["__loss"] = torch.tensor(stats.meta_loss)
        saved[name]["__tasks"] = torch.tensor(shard.num_tasks)
    saved["in_sync"] = ctx.parameters_in_sync(maml)
    # Sharded evaluation over 7 tasks in chunks of 3 (shards 1/2, 1/2, 0/1).
    from metaopt.tasks import Sinusoid, eval_batches

    ev = ctx.evaluate(maml, eval_batches(Sinusoid(5, 7, dtype=torch.float64), 7, 3, 11, "cpu"), split="val")
    saved["eval"] = {"values": ev.values, "tasks": ev.tasks, "mean": ev.mean, "ci95": ev.ci95,
                     "before": ev.before_mean, "loss": ev.loss_mean}
    torch.save(saved, out / f"rank{ctx.rank}.pt")


def worker_errors(out: Path) -> None:
    """Each rank: a config that differs on rank 1, then a meta-batch that does not divide."""
    from metaopt.train import Trainer

    rank = int(os.environ["RANK"])
    msgs = {}
    try:
        Trainer(None, overrides=TINY + [f"train.seed={rank}", f"inner.lr={0.01 * (1 + rank)}"])
        msgs["config"] = None
    except ConfigError as e:
        msgs["config"] = str(e)
    try:
        Trainer(None, overrides=TINY + ["train.meta_batch_size=5"])
        msgs["divide"] = None
    except ConfigError as e:
        msgs["divide"] = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(msgs))


WORKERS = {"step": worker_step, "errors": worker_errors}


# ============================================================================ tests


def test_shard_bounds() -> None:
    assert [shard_bounds(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [shard_bounds(5, r, 2, allow_remainder=True) for r in range(2)] == [(0, 2), (2, 5)]
    assert [shard_bounds(1, r, 2, allow_remainder=True) for r in range(2)] == [(0, 0), (0, 1)]
    with pytest.raises(ConfigError, match=r"meta-batch of 25 tasks does not divide by the 2 ranks.*multiple of 2"):
        shard_bounds(25, 0, 2)


def test_single_process_is_not_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    from metaopt import distributed
    from metaopt.loop import LOCAL
    from metaopt.train import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cpu") is None and distributed.is_main_process()
    t = Trainer(None, overrides=TINY)
    assert t.sync is LOCAL and t.is_main


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """Even, uneven (5 tasks: 2 + 3) and clipped meta-steps on 2 ranks equal one process on
    the same meta-batches (float64, second order, learned inner lr), ranks bitwise equal;
    sharded evaluation equals the single-process evaluation."""
    _worker("step", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = _reference_steps()
    for name in ref:
        assert ranks[0][name].keys() - {"__tasks"} == ref[name].keys()
        for k, v in ref[name].items():
            assert torch.equal(ranks[0][name][k], ranks[1][name][k]), (name, k)  # same step everywhere
            torch.testing.assert_close(ranks[0][name][k], v, rtol=0, atol=1e-10, msg=f"{name} {k}")
    assert [int(r["uneven"]["__tasks"]) for r in ranks] == [2, 3]
    assert ranks[0]["in_sync"] and ranks[1]["in_sync"]

    from metaopt.loop import evaluate
    from metaopt.tasks import Sinusoid, eval_batches

    maml, _ = _step_setup()
    maml.load_state_dict({k: v for k, v in ranks[0]["clipped"].items() if not k.startswith("__")})
    ev = evaluate(maml, eval_batches(Sinusoid(5, 7, dtype=torch.float64), 7, 3, 11, "cpu"))
    got = ranks[0]["eval"]
    assert got == ranks[1]["eval"] and got["tasks"] == 7
    torch.testing.assert_close(torch.tensor(got["values"]), torch.tensor(ev.values), rtol=0, atol=1e-12)
    assert abs(got["ci95"] - ev.ci95) < 1e-12 and abs(got["before"] - ev.before_mean) < 1e-12


def test_train_two_ranks_then_resume_with_one(tmp_path: Path) -> None:
    """`python -m metaopt train` on 2 ranks: rank 0 writes the run; the checkpoint has the
    same generator state as a 1-process run; resuming with 1 process continues it."""
    from metaopt.train import Trainer, load_checkpoint, resume

    run = tmp_path / "run2"
    sets = [a for s in TINY for a in ("--set", s)]
    res = _run_ranks(["-m", "metaopt", "train", str(REPO / "configs" / "sinusoid.yaml"), "--out", str(run), *sets])
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "test mse" in res[0].stdout and res[1].stdout == ""  # rank 0 reports
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,") and [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    results = json.loads((run / "results.json").read_text())
    assert results["iteration"] == 3 and results["tasks"] == 10
    two = load_checkpoint(run / "checkpoints" / "last.pt")

    one_dir = tmp_path / "run1"
    one = Trainer(str(REPO / "configs" / "sinusoid.yaml"), one_dir, overrides=TINY)
    one_res = one.fit()
    ref = load_checkpoint(one_dir / "checkpoints" / "last.pt")
    assert torch.equal(two["rng"]["tasks"], ref["rng"]["tasks"])  # same tasks were drawn
    for k, v in ref["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-5, atol=1e-6)
    assert abs(results["mean"] - one_res["mean"]) < 1e-4 * max(1.0, abs(one_res["mean"]))

    # Resume the 2-rank run in this (single) process for two more iterations.
    resumed = resume(run, overrides=["train.iterations=5"])
    assert resumed["iteration"] == 5
    one_more = Trainer(str(REPO / "configs" / "sinusoid.yaml"), None, overrides=TINY + ["train.iterations=5"])
    one_more.fit()
    after = load_checkpoint(run / "checkpoints" / "last.pt")
    for k, v in one_more.model.state_dict().items():
        torch.testing.assert_close(after["model"][k], v, rtol=1e-5, atol=1e-6)
    assert torch.equal(after["rng"]["tasks"], one_more.generator.get_state())


def test_errors_config_disagreement_and_indivisible_batch(tmp_path: Path) -> None:
    _worker("errors", tmp_path)
    msgs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for m in msgs:  # every rank raises, with the same message
        assert m["config"] is not None and "ranks disagree on the resolved config: rank(s) 1 differ" in m["config"]
        assert "inner.lr (0.01 on rank 0 vs 0.02)" in m["config"] and "train.seed (0 on rank 0 vs 1)" in m["config"]
        assert m["divide"] is not None and "meta-batch of 5 tasks does not divide by the 2 ranks" in m["divide"]
    assert msgs[0] == msgs[1]


@pytest.mark.parametrize("kwargs, message", [
    ({"world_sizes": (1, 0)}, "world_sizes must be ints >= 1, got [1, 0]"),
    ({"world_sizes": ()}, "world_sizes must be ints >= 1, got []"),
    ({"iterations": 0}, "iterations must be an int >= 1, got 0"),
    ({"warmup": -1}, "warmup must be an int >= 0, got -1"),
    ({"threads": 0}, "threads must be an int >= 1, got 0"),
])
def test_bench_distributed_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    from metaopt.distributed import benchmark

    with pytest.raises(ValueError) as e:
        benchmark(**kwargs)
    assert message in str(e.value)


def test_bench_distributed_smoke(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_distributed", REPO / "experiments" / "bench_distributed.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--processes", "2", "--iterations", "2", "--warmup", "1", "--repeats", "1",
                     "--meta-batch-size", "4", "--output", str(tmp_path / "bench")]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["processes"] for r in data["rows"]] == [2] and data["rows"][0]["tasks_per_s"] > 0
    assert "not yet measured on several GPUs" in (tmp_path / "bench.md").read_text()


if __name__ == "__main__":  # a rank of a multi-process test: WORKER OUT_DIR
    WORKERS[sys.argv[1]](Path(sys.argv[2]))
