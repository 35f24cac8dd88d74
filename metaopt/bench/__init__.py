"""``metaopt bench``: meta-iterations/s, tasks/s and peak memory of MAML meta-steps,
metaopt (vectorised and per-task loop) against higher, torchopt, learn2learn and a
hand-written plain-PyTorch loop, on the fixed workloads S1, S5, O1, O5 (DESIGN.md).

Example:
    >>> import argparse, metaopt.bench
    >>> parser = argparse.ArgumentParser()
    >>> _ = metaopt.bench.add_arguments(parser)
    >>> args = parser.parse_args(["--tiny", "--workloads", "S1", "--inner", "sgd",
    ...                           "--order", "second", "--memory", "off", "--no-memory-report"])
    >>> metaopt.bench.run(args)  # doctest: +SKIP
    0

How it stays honest:
    - every implementation's meta-gradient is first compared with the plain loop's in
      float64 (:mod:`metaopt.bench.check`); a mismatch is flagged in the table;
    - implementations are timed interleaved (A B C A B C ...), median over repeats;
    - peak memory is measured per case in a fresh process (:mod:`metaopt.bench.measure`);
    - a peer that cannot be imported, or has no differentiable Adafactor, is a row with
      the reason, never left out silently.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from metaopt.bench.impls import IMPLS, get_impls
from metaopt.bench.workloads import INNERS, ORDERS, WORKLOADS, Case, make_batch, make_model, tiny

__all__ = ["add_arguments", "run", "main", "DEFAULT_ITERATIONS"]

#: meta-iterations per timed repeat, per workload (about a second or more per repeat on CPU)
DEFAULT_ITERATIONS = {"S1": 20, "S5": 10, "O1": 1, "O5": 1}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``metaopt bench``'s options to ``parser`` (used by the CLI and experiments/bench.py)."""
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS),
                        metavar="ID", help=f"workloads to run (default: all of {', '.join(WORKLOADS)})")
    parser.add_argument("--inner", nargs="+", default=list(INNERS), choices=list(INNERS),
                        help="inner optimizers (default: sgd adafactor)")
    parser.add_argument("--order", nargs="+", default=list(ORDERS), choices=list(ORDERS),
                        help="MAML order (default: second first)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS),
                        help="implementations (rows) to compare (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-iterations first (default: 1)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="meta-iterations per timed repeat (default: per workload, "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_ITERATIONS.items()) + "; 1 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (2 tasks, few queries) for smoke tests")
    parser.add_argument("--memory", choices=["subprocess", "inline", "off"], default="subprocess",
                        help="peak memory per case: fresh process (honest, default), in this process "
                             "(fast, under-reports on CPU), or not measured")
    parser.add_argument("--memory-iterations", type=int, default=1,
                        help="meta-iterations in each memory measurement (default: 1)")
    parser.add_argument("--no-memory-report", dest="memory_report", action="store_false",
                        help="skip the inner-optimizer memory report (S5/O5 peak memory, state sizes); "
                             "--memory off skips its peak-memory part")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the float64 meta-gradient check against the plain loop")
    parser.add_argument("--no-flops", dest="flops", action="store_false",
                        help="skip counting FLOPs (one extra meta-iteration per workload and order)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak TFLOP/s for the arithmetic floor (default: known CUDA "
                             "devices' FP32 datasheet peak; on CPU, and on unknown GPUs, the measured "
                             "throughput of a matmul and of O1's main convolution)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and the random data")
    parser.add_argument("--output", default=None,
                        help="write PREFIX.md and PREFIX.json (a .md/.json suffix is dropped)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    """The arithmetic floor's peak and where it comes from: --peak-tflops, a known CUDA
    device's datasheet figure, else measured (:func:`measure_peak_tflops`); none with
    --no-flops (there is no floor without FLOPs)."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if not args.flops:
        return None, "not used (--no-flops)"
    if device.type == "cuda":
        from metaopt.bench.report import PEAK_TFLOPS

        name = torch.cuda.get_device_name(device)
        for key, v in PEAK_TFLOPS.items():
            if key in name:
                return v, f"FP32 datasheet peak of {key}"
    from metaopt.bench.measure import measure_peak_tflops

    return measure_peak_tflops(device)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); print the
    markdown report, optionally write it and the raw JSON. Returns the exit status
    (0; 1 when an implementation's meta-gradient does not match the plain loop)."""
    from metaopt.bench.check import check_meta_gradients
    from metaopt.bench.measure import (build_iteration, count_flops, memory_in_subprocess, memory_inline,
                                       summarize, time_interleaved)
    from metaopt.bench.memreport import peak_memory_report, state_sizes
    from metaopt.bench.report import targets, to_markdown

    for name in ("repeats", "memory_iterations"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1 but is: {getattr(args, name)}")
    if args.warmup < 0 or (args.iterations is not None and args.iterations < 1):
        raise SystemExit("--warmup must be >= 0 and --iterations >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t_start = time.time()

    impls = get_impls(args.impls)
    peers = []
    for i in impls:
        reason = i.unavailable()
        peers.append({"key": i.key, "name": i.name, "reason": reason, "note": i.note, "is_metaopt": i.is_metaopt})
        log(f"{i.name}: {'available' if reason is None else reason}")

    check = None
    if args.check:
        log("checking meta-gradients against the plain loop (float64, tiny S1/O1)")
        check = [asdict(c) for c in check_meta_gradients(impls, inners=tuple(args.inner), orders=tuple(args.order))]
    failed = {(c["impl"]) for c in (check or []) if not c["ok"]}

    workloads = [tiny(WORKLOADS[w]) if args.tiny else WORKLOADS[w] for w in args.workloads]
    peak, peak_source = _peak_tflops(args, device)
    mem_method = {"subprocess": "peak RSS (VmHWM) of a fresh process per case" if device.type == "cpu"
                  else "torch.cuda.max_memory_allocated in a fresh process per case",
                  "inline": "measured inside the benchmark process (under-reports on CPU)",
                  "off": "not measured"}[args.memory]
    res: dict[str, Any] = {
        "meta": {
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": _device_name(device), "threads": torch.get_num_threads(),
            "repeats": args.repeats, "warmup": args.warmup, "tiny": args.tiny, "seed": args.seed,
            "memory": args.memory, "memory_method": mem_method, "memory_iterations": args.memory_iterations,
            "peak_tflops": peak, "peak_source": peak_source, "workloads": [w.describe() for w in workloads],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "peers": peers, "check": check, "cases": [],
    }

    for w in workloads:
        iterations = args.iterations or (1 if args.tiny else DEFAULT_ITERATIONS[w.id])
        for order in args.order:
            flops = None
            if args.flops:
                flops = count_flops(build_iteration(IMPLS["plain"](), Case(w, "sgd", order), device, args.seed))
            for inner in args.inner:
                case = Case(w, inner, order)
                log(f"{case.label}: {iterations} meta-iteration(s) x {args.repeats} repeats")
                rows, its = [], {}
                model = make_model(w, seed=args.seed, device=device)
                batch = make_batch(w, seed=args.seed, device=device)
                for impl, p in zip(impls, peers):
                    row = {"impl": impl.key, "name": impl.name, "is_metaopt": impl.is_metaopt, "note": impl.note,
                           "check_failed": impl.key in failed}
                    reason = p["reason"] or impl.unsupported(case)
                    if reason:
                        row.update(status="n/a" if p["reason"] is None else "unavailable", reason=reason)
                    else:
                        try:
                            from metaopt.bench.measure import MetaIteration

                            its[impl.key] = MetaIteration(impl, case, model, batch, device)
                            row["status"] = "ok"
                        except Exception as e:  # noqa: BLE001 - reported in the table
                            row.update(status="error", reason=f"error: {type(e).__name__}: {e}")
                    rows.append(row)
                try:
                    times = time_interleaved(its, args.repeats, args.warmup, iterations, log)
                except Exception as e:  # noqa: BLE001
                    times = {}
                    for row in rows:
                        if row["status"] == "ok":
                            row.update(status="error", reason=f"error while timing: {type(e).__name__}: {e}")
                del its
                for row in rows:
                    if row["status"] == "ok" and row["impl"] in times:
                        row["seconds"] = times[row["impl"]]
                        row["meta_it_s"] = summarize(times[row["impl"]])
                        row["tasks_s"] = row["meta_it_s"]["median"] * w.meta_batch
                entry = {"workload": w.id, "inner": inner, "order": order, "meta_batch": w.meta_batch,
                         "iterations": iterations, "flops": flops, "rows": rows}
                if flops and peak:
                    entry["floor_tasks_s"] = w.meta_batch / (flops / (peak * 1e12))
                res["cases"].append(entry)

    if args.memory != "off":
        for c in res["cases"]:
            w = next(x for x in workloads if x.id == c["workload"])
            case = Case(w, c["inner"], c["order"])
            for row in c["rows"]:
                if row["status"] != "ok":
                    continue
                log(f"memory: {case.label} {row['impl']}")
                try:
                    if args.memory == "inline":
                        row["memory"] = memory_inline(IMPLS[row["impl"]](), case, device, args.memory_iterations,
                                                      args.seed)
                    else:
                        row["memory"] = memory_in_subprocess(row["impl"], case, device, args.memory_iterations,
                                                             args.seed, torch.get_num_threads())
                except Exception as e:  # noqa: BLE001
                    row["memory"] = {"error": f"{type(e).__name__}: {e}"}

    if args.memory_report:
        res["state_sizes"] = state_sizes()
        if args.memory != "off":
            res["memory_report"] = peak_memory_report(str(device), args.memory, args.tiny, torch.get_num_threads(),
                                                      log=log)
    res["targets"] = targets(res)
    res["meta"]["seconds"] = round(time.time() - t_start, 1)
    md = to_markdown(res)
    print(md)
    if args.output:
        prefix = Path(args.output)
        if prefix.suffix in (".md", ".json"):
            prefix = prefix.with_suffix("")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".md").write_text(md)
        prefix.with_suffix(".json").write_text(json.dumps(res, indent=1))
        log(f"wrote {prefix.with_suffix('.md')} and {prefix.with_suffix('.json')}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m metaopt.bench`` / experiments/bench.py entry point."""
    parser = argparse.ArgumentParser(prog="metaopt bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
