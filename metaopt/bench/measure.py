"""Measuring: interleaved timing, peak memory, FLOPs.

Peak memory, and why it is measured this way:

- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes at the start of the
  measured region (after ``reset_peak_memory_stats``): exact tensor memory, no allocator
  cache.
- CPU: the peak resident set size (RSS) of a **fresh process per case** (``--memory
  subprocess``, the default) minus its RSS just before the measured meta-iteration(s).
  The peak is the kernel's own high-water mark ``VmHWM``, reset to the current RSS through
  ``/proc/self/clear_refs`` (Linux >= 4.0), so no short spike is missed; where that reset is
  unavailable, a psutil thread samples RSS every millisecond (may miss spikes shorter than
  that; the method is reported).

  Three things would otherwise distort an RSS delta, and are removed: (1) code pages of
  torch's libraries faulted in on the first call of each kernel: one untimed meta-iteration
  runs before the measurement; (2) glibc's heap keeping freed memory resident, so that the
  measured iteration reuses the warm-up's pages without raising the mark: allocations of
  64 KiB and more are made with ``mmap`` and returned to the kernel on free
  (``mallopt(M_MMAP_THRESHOLD, 65536)``, ``M_TRIM_THRESHOLD`` 0), which every tensor that
  matters is; (3) earlier cases' leftovers: each case runs in a fresh process. What remains
  is the memory one meta-iteration adds on top of the model, the data and the outer
  optimizer's state. ``--memory inline`` measures in the benchmark process (fast, for smoke
  tests; earlier cases' freed pages may be reused, so it can under-report).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, Mapping

import torch

from metaopt.bench.impls import Impl
from metaopt.bench.workloads import Case, Workload, make_batch, make_model

__all__ = ["PeakMemory", "MetaIteration", "build_iteration", "time_interleaved", "count_flops",
           "measure_peak_tflops", "memory_in_subprocess", "memory_inline"]


# ---------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def release_freed_memory() -> bool:
    """glibc: return freed blocks of 64 KiB or more to the kernel at once (see module doc).
    False where the C library has no ``mallopt`` (then the method says so)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 65536) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 0) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def _rss_bytes() -> int:
    rss = _status_kib("VmRSS")
    if rss is not None:
        return rss * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (peak above the start),
    ``m.method`` (how it was measured)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._base = _rss_bytes()
        if _reset_hwm():
            self.method = "VmHWM (peak RSS, reset via clear_refs)"
        else:
            self.method = "psutil RSS sampled every 1 ms"
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self._max = max(self._max, int(proc.memory_info().rss))
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, _rss_bytes())
        else:
            peak = (_status_kib("VmHWM") or 0) * 1024
        self.peak_bytes = max(0, peak - self._base)


# ---------------------------------------------------------------------------------------
# One meta-iteration
# ---------------------------------------------------------------------------------------


class MetaIteration:
    """``it()``: zero grads, adapt every task + query losses + backward, outer Adam step."""

    def __init__(self, impl: Impl, case: Case, model: torch.nn.Module, batch: Any, device: torch.device) -> None:
        self.model = copy.deepcopy(model).train()
        self.meta_backward = impl.build(self.model, case)
        self.outer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batch = batch
        self.device = device

    def __call__(self) -> None:
        self.outer.zero_grad(set_to_none=True)
        self.meta_backward(self.batch)
        self.outer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build_iteration(impl: Impl, case: Case, device: str | torch.device, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> MetaIteration:
    device = torch.device(device)
    w = case.workload
    model = make_model(w, seed=seed, dtype=dtype, device=device)
    batch = make_batch(w, seed=seed, dtype=dtype, device=device)
    return MetaIteration(impl, case, model, batch, device)


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def time_interleaved(its: Mapping[Any, MetaIteration], repeats: int, warmup: int, iterations: int,
                     log: Callable[[str], None] = lambda s: None,
                     times: dict[Any, list[float]] | None = None) -> dict[Any, list[float]]:
    """Seconds per meta-iteration for each implementation, one entry per repeat.

    Implementations alternate (A B C A B C ...) so that a slow phase of the machine (another
    process, thermal state) is shared by all of them instead of landing on one.

    ``times``: a dict to fill in place (and return), so that a caller interrupted half way
    (Ctrl-C, ``timeout --signal=INT``) keeps the repeats already timed.
    """
    times = {} if times is None else times
    times.update({k: [] for k in its})
    for _ in range(warmup):
        for it in its.values():
            it()
            it.sync()
    for r in range(repeats):
        for k, it in its.items():
            gc.collect()
            it.sync()
            t0 = time.perf_counter()
            for _ in range(iterations):
                it()
            it.sync()
            times[k].append((time.perf_counter() - t0) / iterations)
        log(f"    repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {1 / v[-1]:.3g}/s" for k, v in times.items()))
    return times


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median meta-iterations/s and the spread (min..max) over repeats."""
    rates = [1.0 / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------


def measure_peak_tflops(device: str | torch.device, repeats: int = 5) -> tuple[float, str]:
    """Measured FP32 TFLOP/s of the kernels the workloads spend their FLOPs in: the best of a
    2048x2048 matmul and the O1 query pass's dominant convolution (75 x 64 x 14 x 14 input,
    64 3x3 filters, padding 1), best of ``repeats`` runs each, with torch's current threads.

    Used as the arithmetic floor's peak where no datasheet figure applies (CPU): a CPU's
    vendor peak depends on clocks, vector width and core count under load, while this is what
    the same kernels reach on the same machine. Returns ``(tflops, description)``.
    """
    import torch.nn.functional as F

    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def best(fn: Callable[[], Any], flops: float) -> float:
        fn()  # warm-up: oneDNN/cuBLAS pick their kernels here
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return flops / min(times) / 1e12

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(2048, 2048, device=device, generator=g)
    b = torch.randn(2048, 2048, device=device, generator=g)
    x = torch.randn(75, 64, 14, 14, device=device, generator=g)
    w = torch.randn(64, 64, 3, 3, device=device, generator=g)
    mm = best(lambda: a @ b, 2 * 2048**3)
    conv = best(lambda: F.conv2d(x, w, padding=1), 2 * 75 * 14 * 14 * 64 * 64 * 9)
    desc = (f"measured, best of matmul 2048^2 ({mm:.3g} TFLOP/s) and conv2d 64->64 3x3 on "
            f"75x14x14 ({conv:.3g} TFLOP/s), {torch.get_num_threads()} thread(s)")
    return max(mm, conv), desc


def count_flops(it: MetaIteration) -> int:
    """FLOPs of one meta-iteration as ``torch.utils.flop_counter`` counts them: matmuls and
    convolutions, forward and every backward (elementwise ops, including the inner
    optimizer's, are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        it()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------
# Memory of one case
# ---------------------------------------------------------------------------------------


def memory_inline(impl: Impl, case: Case, device: str | torch.device, iterations: int = 1,
                  seed: int = 0) -> dict[str, Any]:
    # No mallopt here: it would change the allocator for the rest of this process.
    return _measure(build_iteration(impl, case, device, seed), device, iterations,
                    "in the benchmark process", trim=False)


def _measure(it: MetaIteration, device: str | torch.device, iterations: int, where: str,
             trim: bool = True) -> dict[str, Any]:
    """Warm-up meta-iteration, then the peak of ``iterations`` more above the memory before."""
    trimmed = torch.device(device).type != "cpu" or (trim and release_freed_memory())
    it()  # faults in code pages, creates the outer optimizer's state; not measured
    it.sync()
    with PeakMemory(device) as m:
        for _ in range(iterations):
            it()
        it.sync()
    how = f"{m.method}, after 1 warm-up meta-iteration, {where}"
    if not trimmed:
        how += ", freed heap may be reused (can under-report)"
    return {"peak_bytes": m.peak_bytes, "method": how}


def memory_in_subprocess(impl_key: str, case: Case, device: str | torch.device, iterations: int = 1,
                         seed: int = 0, threads: int | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Peak memory of ``iterations`` meta-iterations in a fresh Python process."""
    spec = {
        "impl": impl_key, "workload": asdict(case.workload), "inner": case.inner, "order": case.order,
        "precision": case.precision, "checkpoint_every": case.checkpoint_every,
        "device": str(device), "iterations": iterations, "seed": seed,
        "threads": threads or torch.get_num_threads(),
    }
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "metaopt.bench._worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"worker exited {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the subprocess: build the case, then measure its meta-iterations."""
    from metaopt.bench.impls import IMPLS

    torch.set_num_threads(int(spec["threads"]))
    w = Workload(**spec["workload"])
    case = Case(w, spec["inner"], spec["order"], spec.get("precision", "fp32"), spec.get("checkpoint_every"))
    impl = IMPLS[spec["impl"]]()
    reason = impl.unavailable() or impl.unsupported(case)
    if reason:
        return {"error": reason}
    it = build_iteration(impl, case, spec["device"], spec["seed"])
    return _measure(it, spec["device"], int(spec["iterations"]), "fresh process")
