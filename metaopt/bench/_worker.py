"""Subprocess entry point for per-case peak memory: ``python -m metaopt.bench._worker SPEC``.

Prints one JSON line ``{"peak_bytes": ..., "method": ...}`` (or ``{"error": ...}``).
"""

from __future__ import annotations

import json
import sys

from metaopt.bench.measure import run_worker

if __name__ == "__main__":
    print(json.dumps(run_worker(json.loads(sys.argv[1]))), flush=True)
