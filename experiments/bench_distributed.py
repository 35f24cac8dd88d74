"""Benchmark distributed meta-training: tasks/s with 1, 2, ... processes (gloo, CPU).

Workload S1 (sinusoid MLP 1-40-40-1, 1 inner SGD step, second order), each process with one
torch thread; every rank samples the full meta-batch, adapts its shard, all-reduces the
meta-gradient and takes the outer step. Reports the best of ``--repeats`` runs.

    python experiments/bench_distributed.py --processes 1 2 --output results/bench_distributed

Multi-GPU (NCCL) throughput is not measured by this script (no multi-GPU machine was
available); run ``torchrun --nproc_per_node=N -m metaopt train ...`` there and compare the
``elapsed_s`` column of ``metrics.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from metaopt.distributed import benchmark

NOTE = (
    "CPU numbers come from a small shared machine and are noisy (other jobs ran on the same "
    "cores); read them as an order of magnitude. Multi-GPU (NCCL): not yet measured on several "
    "GPUs (no multi-GPU machine available)."
)


def markdown(rows: list[dict], cores: int | None) -> str:
    lines = [f"### Distributed meta-training throughput, CPU + gloo ({cores} cores, torch {torch.__version__})", "",
             "| processes | threads each | meta-batch | inner steps | ms / iteration | tasks/s (best) | speed-up | all runs (tasks/s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = ", ".join(f"{x:.0f}" for x in r["all_tasks_per_s"])
        lines.append(f"| {r['processes']} | {r['threads_per_process']} | {r['meta_batch_size']} | {r['inner_steps']} | "
                     f"{r['ms_per_iteration']:.2f} | {r['tasks_per_s']:.0f} | {r['speedup']:.2f}x | {runs} |")
    return "\n".join(lines) + "\n\n" + NOTE + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="numbers of processes to compare")
    p.add_argument("--meta-batch-size", type=int, default=24, help="tasks per meta-iteration (divisible by each)")
    p.add_argument("--inner-steps", type=int, default=1, help="1: workload S1, 5: S5")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--output", default=None, help="write OUTPUT.json and OUTPUT.md")
    args = p.parse_args(argv)

    rows = benchmark(args.processes, meta_batch_size=args.meta_batch_size, iterations=args.iterations,
                     warmup=args.warmup, inner_steps=args.inner_steps, threads=args.threads, repeats=args.repeats)
    md = markdown(rows, os.cpu_count())
    print(md, end="")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
                "note": NOTE}
        out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
