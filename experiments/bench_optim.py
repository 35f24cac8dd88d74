"""Microbenchmark: cost of each inner optimizer in second-order MAML, against SGD.

Times one meta-iteration (adapt every task, query losses, backward) of ``metaopt.MAML`` on
the benchmark workloads with SGD and with every preset of ``metaopt.optim`` as the inner
optimizer (``--inner`` selects), and prints time and memory ratios against SGD; Adafactor's
line shows its targets on the Omniglot workloads (at most 1.1x SGD's time, 1.3x its memory;
on the tiny sinusoid MLP the per-op overhead dominates and no target is set). Muon is left out by
default: it takes 2-D params only, and the MLP/Conv4 have 1-D biases and 4-D kernels.

The workloads, models and data are ``metaopt bench``'s (:mod:`metaopt.bench.workloads`):
- ``S1``/``S5``: MLP 1-40-40-1, sinusoid 10 support + 10 query, 25 tasks, 1/5 steps.
- ``O1``/``O5``: Conv4 on 28x28 Omniglot-shaped inputs (random binary images: only the
  shapes matter for timing), 5-way 1-shot 32 tasks 1 step / 20-way 1-shot 16 tasks 5 steps.

Engines: ``loop`` (``vectorize=False``) and ``vmap`` (``vectorize=True``). The optimizers
are timed interleaved (SGD, Adafactor, ..., SGD, ...) in one process, so machine noise
hits them alike; medians over the repeats are reported. Memory is the bytes of distinct
storages saved for backward by the meta-graph (what the outer backward keeps alive),
measured with saved-tensor hooks; those do not see inside ``torch.func``, so the vmap
engine reports none.

    python experiments/bench_optim.py --repeats 20
    python experiments/bench_optim.py --workloads O1 --modes loop --repeats 3
    python experiments/bench_optim.py --compile   # adds Adafactor with a compiled step
    python experiments/bench_optim.py --inner adam,lion --workloads O1
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace
from typing import Any, Optional

import torch

import metaopt
from metaopt import optim
from metaopt.bench.workloads import WORKLOADS, make_batch, make_model

TIME_TARGET, MEMORY_TARGET = 1.1, 1.3  # Adafactor / SGD

# The presets' learning rates for the benchmark (timing does not depend on them much; these
# keep the adapted losses finite). SGD uses the workload's own rate.
BENCH_LRS = {"adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3, "adagrad": 1e-2, "adafactor": 1e-2, "adamax": 2e-3,
             "nadam": 2e-3, "radam": 1e-3, "adadelta": 1.0, "lion": 1e-4}
DEFAULT_INNER = ["adafactor", "adafactor_transformers", "adam", "adamw", "rmsprop", "adagrad", "adamax", "nadam",
                 "radam", "adadelta", "lion"]


def saved_bytes(maml: metaopt.MAML, batch: metaopt.tasks.TaskBatch) -> int:
    """Bytes of distinct storages saved for backward while building the meta-loss."""
    saved: dict[int, int] = {}  # one entry per storage: a tensor saved by several nodes counts once

    @torch.compiler.disable  # called from inside a compiled step: keep dynamo out of it
    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        maml.meta_loss(batch, before=False)
    return sum(saved.values())


def bench(
    workload: str, mode: str, repeats: int, tasks: Optional[int] = None, compile_step: bool = False,
    seed: int = 0, inner: Optional[list[str]] = None,
) -> dict[str, dict[str, float]]:
    """Median seconds per meta-iteration and saved bytes, per inner optimizer (``inner``:
    registry names, default every preset but Muon; SGD is always timed as the baseline)."""
    w = WORKLOADS[workload]
    if tasks is not None:
        w = replace(w, meta_batch=tasks)
    model, batch = make_model(w, seed=seed), make_batch(w, seed=seed)
    opts: dict[str, Any] = {"sgd": optim.SGD(lr=w.inner_lr)}
    for name in DEFAULT_INNER if inner is None else inner:
        if name != "sgd":
            opts[name] = optim.get(name, **({"lr": BENCH_LRS[name]} if name in BENCH_LRS else {}))
    if compile_step:
        # Dynamo's recompile limit (8) is per code object, i.e. shared by every Adafactor.step
        # in the process; past it the step silently runs eager. Start each benchmark afresh.
        torch._dynamo.reset()
        # AOTAutograd has no double backward, but second-order MAML never needs one through
        # the step (inner grads are taken w.r.t. the step's outputs). Under vmap torch.compile
        # falls back to eager. The first calls compile (excluded by the warm-up).
        opt = optim.Adafactor(lr=0.01)
        opt.step = torch.compile(opt.step, dynamic=False)
        opts["adafactor+compile"] = opt
    mamls = {
        name: metaopt.MAML(model, inner_optimizer=opt, inner_steps=w.inner_steps, loss_fn=w.loss_fn,
                           vectorize=mode == "vmap")
        for name, opt in opts.items()
    }
    times: dict[str, list[float]] = {name: [] for name in opts}
    for i in range(repeats + 2):  # 2 warm-up rounds
        for name, maml in mamls.items():  # interleaved: SGD, Adafactor, ..., SGD, ...
            t0 = time.perf_counter()
            maml.meta_loss(batch, before=False).loss.backward()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    out = {}
    for name, maml in mamls.items():
        mem = float(saved_bytes(maml, batch)) if mode == "loop" else math.nan
        out[name] = {"time": statistics.median(times[name]), "memory": mem}
    return out


def report(workload: str, mode: str, res: dict[str, dict[str, float]]) -> None:
    base = res["sgd"]
    for name, r in res.items():
        line = f"[{workload} {mode}] {name:18s} {r['time'] * 1e3:8.1f} ms/iter"
        if name != "sgd":
            targeted = name == "adafactor" and workload.startswith("O")  # the targets are set on Omniglot
            line += f" ({r['time'] / base['time']:.2f}x sgd" + (f", target <= {TIME_TARGET}x)" if targeted else ")")
        if not math.isnan(r["memory"]):
            line += f", saved tensors {r['memory'] / 2**20:8.2f} MiB"
            if name != "sgd":
                line += f" ({r['memory'] / base['memory']:.2f}x sgd" + (f", target <= {MEMORY_TARGET}x)" if targeted else ")")
        print(line, flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="S5", help=f"comma-separated, from {sorted(WORKLOADS)}")
    parser.add_argument("--modes", default="loop,vmap")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=None, help="override the workload's meta-batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time Adafactor with torch.compile'd step")
    parser.add_argument("--inner", default=",".join(DEFAULT_INNER), help="comma-separated metaopt.optim names")
    args = parser.parse_args(argv)
    for flag in ("repeats", "tasks", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be >= 1, got {value}")
    workloads, modes = args.workloads.split(","), args.modes.split(",")
    for workload in workloads:
        if workload not in WORKLOADS:
            parser.error(f"unknown workload {workload!r}; known: {sorted(WORKLOADS)}")
    for mode in modes:
        if mode not in ("loop", "vmap"):
            parser.error(f"unknown mode {mode!r}; known: loop, vmap")
    inner = [n for n in args.inner.split(",") if n]
    for name in inner:
        if name not in optim.names():
            parser.error(f"unknown inner optimizer {name!r}; known: {optim.names()}")
    torch.set_num_threads(args.threads)
    for workload in workloads:
        for mode in modes:
            report(workload, mode, bench(workload, mode, args.repeats, args.tasks, args.compile, inner=inner))


if __name__ == "__main__":
    main()
