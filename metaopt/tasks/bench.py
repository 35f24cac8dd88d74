"""Time task sampling: meta-batches per second, for ``experiments/bench_sampling.py``."""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["sampling_rate"]


def sampling_rate(tasks: Any, num_tasks: int, generator: torch.Generator,
                  iterations: int = 100, warmup: int = 10) -> float:
    """Meta-batches of ``num_tasks`` tasks that ``tasks.sample`` makes per second.

    The clock stops after the device has finished the last batch (CUDA is synchronized),
    so the number counts the work, not just its launch.
    """
    if iterations < 1 or warmup < 0:
        raise ValueError(f"iterations must be >= 1 and warmup >= 0, got {iterations}, {warmup}")
    device = generator.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        tasks.sample(num_tasks, generator)
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        tasks.sample(num_tasks, generator)
    sync()
    return iterations / (time.perf_counter() - start)
