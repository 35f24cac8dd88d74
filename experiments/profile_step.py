"""Where one meta-iteration spends its time: a torch.profiler breakdown by kind of kernel.

Profiles ``--iterations`` meta-iterations of one benchmark case (``metaopt.bench``
workloads and implementations: same models, data and meta-step as ``metaopt bench``) and
groups the self CPU time of every aten op into convolution forward/backward, matmul,
batch norm, pooling, ReLU, memory (fills, copies, allocation) and the rest. This is
what decides which optimisation can pay: on CPU, O1 spends about half its time in
convolutions that every MAML library runs identically, and most of the rest in
memory-bound batch norm / pooling / ReLU passes and fills over the 28x28 activations.

    python experiments/profile_step.py --workload O1 --impl plain
    python experiments/profile_step.py --workload S5 --impl metaopt-vmap --inner adafactor
    python experiments/profile_step.py --workload O1 --impl metaopt-loop --order first --top 15
    python experiments/profile_step.py --workload O1 --impl metaopt-loop --precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from metaopt.bench.impls import get_impls
from metaopt.bench.workloads import INNERS, ORDERS, WORKLOADS, Case, make_batch, make_model, tiny

# aten op name -> category (self time of leaf kernels; anything unlisted is "other").
CATEGORIES: dict[str, tuple[str, ...]] = {
    "convolution forward": ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward",
                            "aten::cudnn_convolution", "aten::thnn_conv2d"),
    "convolution backward": ("aten::convolution_backward", "aten::_slow_conv2d_backward",
                             "aten::mkldnn_convolution_backward"),
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::dot"),
    "batch norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward",
                   "aten::_batch_norm_impl_index", "aten::batch_norm_stats",
                   "aten::batch_norm_elemt", "aten::batch_norm_backward_reduce"),
    "pooling": ("aten::max_pool2d_with_indices", "aten::max_pool2d_with_indices_backward"),
    "ReLU": ("aten::relu", "aten::clamp_min", "aten::threshold_backward"),
    "memory (fill, copy, alloc)": ("aten::fill_", "aten::zero_", "aten::copy_", "aten::empty",
                                   "aten::empty_strided", "aten::empty_like", "aten::zeros",
                                   "aten::resize_"),
}
_LOOKUP = {op: cat for cat, ops in CATEGORIES.items() for op in ops}


def breakdown(events: Any, iterations: int) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Self CPU ms per meta-iteration by category, and per op (name, ms, calls per iteration)."""
    cats: dict[str, float] = {c: 0.0 for c in CATEGORIES}
    cats["other"] = 0.0
    ops: list[tuple[str, float, int]] = []
    for e in events:
        ms = e.self_cpu_time_total / 1e3 / iterations
        if ms <= 0:
            continue
        cats[_LOOKUP.get(e.key, "other")] += ms
        ops.append((e.key, ms, e.count // iterations))
    ops.sort(key=lambda r: -r[1])
    return cats, ops


def markdown(title: str, cats: dict[str, float], ops: Sequence[tuple[str, float, int]], top: int) -> str:
    total = sum(cats.values())
    lines = [f"### {title}", "", f"self CPU time per meta-iteration: {total:.1f} ms", "",
             "| kind | ms / meta-it | share |", "|---|---:|---:|"]
    for c, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {c} | {ms:.2f} | {100 * ms / total:.1f}% |")
    lines += ["", "| op | ms / meta-it | calls / meta-it |", "|---|---:|---:|"]
    lines += [f"| `{name}` | {ms:.2f} | {calls} |" for name, ms, calls in ops[:top]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="O1")
    p.add_argument("--impl", default="plain", help="implementation key, e.g. plain, metaopt-loop, "
                   "metaopt-vmap, higher, torchopt (default: plain)")
    p.add_argument("--inner", choices=INNERS, default="sgd")
    p.add_argument("--order", choices=ORDERS, default="second")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-batch (default: the workload's)")
    p.add_argument("--iterations", type=int, default=1, help="profiled meta-iterations (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    p.add_argument("--top", type=int, default=10, help="ops listed individually")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "tf32"],
                   help="metaopt rows: metaopt.precision.precision_context (default: fp32)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    for flag in ("iterations", "meta_batch", "threads", "top"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")

    impls = {i.key: i for i in get_impls()}
    if args.impl not in impls:
        p.error(f"unknown --impl {args.impl!r}; known: {', '.join(sorted(impls))}")
    impl = impls[args.impl]
    why = impl.unavailable()
    w = tiny(WORKLOADS[args.workload]) if args.tiny else WORKLOADS[args.workload]
    if args.meta_batch is not None:
        w = replace(w, meta_batch=args.meta_batch)
    case = Case(w, args.inner, args.order, args.precision)
    why = why or impl.unsupported(case)
    if why:
        print(f"{impl.name} cannot run {case.label}: {why}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, batch = make_model(w), make_batch(w)
    meta_backward = impl.build(model, case)
    meta_backward(batch)  # warm-up (first-call allocations, lazy imports)
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.iterations):
            meta_backward(batch)
            model.zero_grad(set_to_none=True)
    cats, ops = breakdown(prof.key_averages(), args.iterations)
    title = (f"{case.label} · {impl.name} · meta-batch {w.meta_batch} · torch {torch.__version__}, "
             f"{args.threads} thread(s)")
    print(markdown(title, cats, ops, args.top))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"case": case.label, "impl": impl.key, "meta_batch": w.meta_batch,
                                         "categories_ms": cats, "ops": ops[: args.top]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
