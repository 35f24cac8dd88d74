"""``metaopt bench``: meta-iterations/s, tasks/s and peak memory of MAML meta-steps,
metaopt (vectorised and per-task loop) against higher, torchopt, learn2learn and a
hand-written plain-PyTorch loop, on the fixed workloads S1, S5, O1, O5 (:mod:`metaopt.bench.workloads`); with
``--precision`` metaopt's rows also in bf16/fp16/tf32, ``--fidelity`` their meta-gradient
against float64, ``--curves`` time and memory against inner steps / meta-batch / model, and
``--remat-steps`` second-order memory against inner steps with ``MAML(checkpoint_every=k)``.

Three steps: **plan** (:func:`metaopt.bench.plan.make_plan`: options -> what to measure),
**measure** (:func:`metaopt.bench.collect.collect`: a JSON-ready result dict) and
**report** (:mod:`metaopt.bench.report`: markdown, plots, and the targets of a YAML file
given with ``--targets``, e.g. experiments/bench_targets.yaml; none are built in).

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
      the reason, never left out silently;
    - metaopt's rows use the lean recipe ``meta_loss(batch, backward=True)`` (one task's
      graph alive at a time), as the peers' per-task ``backward``; in a bf16/fp16/tf32
      case only metaopt's rows change precision, the peers stay float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metaopt.bench.impls import IMPLS
from metaopt.bench.plan import DEFAULT_ITERATIONS
from metaopt.bench.workloads import INNERS, MODELS, ORDERS, WORKLOADS
from metaopt.precision import PRECISIONS

__all__ = ["add_arguments", "run", "main", "DEFAULT_ITERATIONS"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``metaopt bench``'s options to ``parser`` (used by the CLI and experiments/bench.py)."""
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS),
                        metavar="ID", help=f"workloads of the speed table (default: all of {', '.join(WORKLOADS)}; "
                                           "none: only the curves / remat table)")
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
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS),
                        help="precisions of metaopt's rows (metaopt.precision.precision_context; peers stay "
                             "float32 in every case) (default: fp32)")
    parser.add_argument("--fidelity", action="store_true",
                        help="meta-gradient fidelity of the bf16/fp16 precisions against float64, per policy "
                             "(metaopt.bench.fidelity)")
    parser.add_argument("--targets", default=None, metavar="YAML",
                        help="acceptance targets to report (e.g. experiments/bench_targets.yaml; default: none)")
    parser.add_argument("--curves", nargs="*", default=[], choices=["steps", "batch", "model"],
                        help="cost curves: time and peak memory against inner steps / meta-batch / model")
    parser.add_argument("--curve-workload", default="O1", choices=list(WORKLOADS), help="base of the curves")
    parser.add_argument("--curve-steps", nargs="+", type=int, default=[1, 2, 5, 10], metavar="N")
    parser.add_argument("--curve-batch", nargs="+", type=int, default=[1, 4, 16, 32], metavar="N")
    parser.add_argument("--curve-models", nargs="+", default=["conv4", "resnet12"], metavar="NAME",
                        help=f"models for --curves model (known: {', '.join(MODELS)})")
    parser.add_argument("--curve-meta-batch", type=int, default=None,
                        help="meta-batch of the steps/model curves (default: the workload's)")
    parser.add_argument("--curve-impls", nargs="+", default=["metaopt-loop", "metaopt-vmap", "torchopt", "higher"],
                        choices=list(IMPLS), help="rows of the curves (peers also go into --remat-steps)")
    parser.add_argument("--remat-steps", nargs="*", type=int, default=[], metavar="N",
                        help="second-order memory vs inner steps on O1's Conv4: plain unroll, "
                             "MAML(checkpoint_every=k) and the peers (e.g. 5 20 50 100)")
    parser.add_argument("--remat-every", type=int, default=None,
                        help="segment length k for --remat-steps (default: round(sqrt(steps)))")
    parser.add_argument("--remat-meta-batch", type=int, default=1, help="tasks per meta-iteration in --remat-steps")
    parser.add_argument("--plots", action="store_true", help="with --output: PREFIX_curves.png etc. (matplotlib)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Plan, measure and report the benchmark described by ``args`` (see
    :func:`add_arguments`): print the markdown report, optionally write it, the raw JSON and
    plots. Returns the exit status (0; 1 when an implementation's meta-gradient does not
    match the plain loop)."""
    import torch

    from metaopt.bench.collect import collect
    from metaopt.bench.plan import make_plan
    from metaopt.bench.report import plot, targets, to_markdown

    plan = make_plan(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    res: dict = {}
    try:
        collect(plan, log, res)
    except KeyboardInterrupt:  # e.g. `timeout --signal=INT`: report what was measured
        if "meta" not in res:
            raise
        res["meta"]["interrupted"] = True
        log("interrupted: reporting the parts measured so far")
    res["targets"] = targets(res, plan.targets)
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
        if args.plots:
            for path in plot(res, prefix):
                log(f"wrote {path}")
    failed = {c["impl"] for c in (res["check"] or []) if not c["ok"]}
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m metaopt.bench`` / experiments/bench.py entry point."""
    parser = argparse.ArgumentParser(prog="metaopt bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
