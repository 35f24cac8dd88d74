"""Smoke test: the sampling benchmark runs for a couple of iterations on tiny settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench_sampling.py"


def test_bench_sampling_smoke(omniglot_root, omniglot_cache, capsys):
    spec = importlib.util.spec_from_file_location("bench_sampling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rates = module.main(["--root", str(omniglot_root), "--cache-dir", str(omniglot_cache), "--split", "val",
                         "--tasks", "2", "--iterations", "2", "--warmup", "1", "--devices", "cpu,cuda"])
    assert rates["cpu"] > 0
    out = capsys.readouterr().out
    assert "meta-batches/s" in out
    assert "cuda" in rates or "cuda: skipped (no CUDA device available)" in out
