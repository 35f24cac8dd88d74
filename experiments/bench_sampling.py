"""Benchmark Omniglot episode sampling: meta-batches per second on CPU and, if present, CUDA.

Default workload: 32 tasks of 5-way 1-shot with 15 queries per class (benchmark O1).

    python experiments/bench_sampling.py --root /path/to/omniglot     # or set $METAOPT_OMNIGLOT
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from metaopt.tasks import Omniglot
from metaopt.tasks.bench import sampling_rate

DEFAULT_ROOT = os.environ.get("METAOPT_OMNIGLOT")


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=DEFAULT_ROOT,
                   help="Omniglot folder (npz copy or official zips); default $METAOPT_OMNIGLOT")
    p.add_argument("--split", default="train")
    p.add_argument("--tasks", type=int, default=32, help="tasks per meta-batch")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated devices to try")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU run")
    args = p.parse_args(argv)
    if not args.root:
        p.error("--root is required (or set METAOPT_OMNIGLOT): the Omniglot folder")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    print(f"workload: {args.tasks} tasks x {args.ways}-way {args.shots}-shot, {args.queries} queries "
          f"per class, split {args.split!r}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.devices.split(","):
        device = torch.device(name.strip())
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"{name}: skipped (no CUDA device available)")
            continue
        start = time.perf_counter()
        data = Omniglot(args.root, ways=args.ways, shots=args.shots, queries=args.queries,
                        split=args.split, device=device, cache_dir=args.cache_dir)
        load = time.perf_counter() - start
        gen = torch.Generator(device=device).manual_seed(0)
        rate = sampling_rate(data, args.tasks, gen, iterations=args.iterations, warmup=args.warmup)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"{name} ({label}): {rate:,.1f} meta-batches/s ({1e3 / rate:.2f} ms each); "
              f"dataset load {load:.2f} s ({'cache hit' if data.cache_hit else 'built cache'})")
        results[name] = rate
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
