"""Benchmark MAML meta-steps: metaopt (vectorised / per-task loop) vs higher, torchopt,
learn2learn and a plain PyTorch loop on the fixed workloads S1, S5, O1, O5.

A thin script over :mod:`metaopt.bench` (same options as ``metaopt bench``; the targets
default to experiments/bench_targets.yaml)::

    python experiments/bench.py --tiny --workloads S1 --memory off        # smoke run
    python experiments/bench.py --output results/bench_cpu                 # full CPU run
    python experiments/bench.py --device cuda --output results/bench_cuda  # full GPU run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from metaopt.bench import main as _main  # noqa: E402

TARGETS = Path(__file__).resolve().with_name("bench_targets.yaml")


def main(argv: list[str] | None = None) -> int:
    """``metaopt bench`` with the project's targets (bench_targets.yaml beside this file)
    unless ``--targets`` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--targets" not in argv:
        argv += ["--targets", str(TARGETS)]
    return _main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
