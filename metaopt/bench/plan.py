"""The plan step of ``metaopt bench``: command-line options -> a validated :class:`Plan`
(what to measure, on which device, how), before anything is run.

Example:
    >>> import argparse
    >>> from metaopt.bench import add_arguments
    >>> from metaopt.bench.plan import make_plan
    >>> args = add_arguments(argparse.ArgumentParser()).parse_args(
    ...     ["--tiny", "--workloads", "O1", "--precision", "fp32", "bf16", "--order", "second"])
    >>> plan = make_plan(args)
    >>> [c.label for c in plan.cases]
    ['O1 sgd second', 'O1 adafactor second', 'O1 sgd second bf16', 'O1 adafactor second bf16']
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from metaopt.bench.workloads import MODELS, WORKLOADS, Case, Workload, tiny

__all__ = ["Plan", "make_plan", "DEFAULT_ITERATIONS"]

#: meta-iterations per timed repeat, per workload (about a second or more per repeat on CPU)
DEFAULT_ITERATIONS = {"S1": 20, "S5": 10, "O1": 1, "O5": 1}


@dataclass
class Plan:
    """Everything ``metaopt bench`` will measure (see :func:`metaopt.bench.add_arguments`)."""

    device: torch.device
    workloads: list[Workload]
    cases: list[Case]  # the speed/memory table, in order
    iterations: dict[str, int]  # workload id -> meta-iterations per timed repeat
    impls: list[str]
    repeats: int = 5
    warmup: int = 1
    memory: str = "subprocess"
    memory_iterations: int = 1
    memory_report: bool = True
    check: bool = True
    flops: bool = True
    peak_tflops: float | None = None
    seed: int = 0
    tiny: bool = False
    fidelity: list[str] = field(default_factory=list)  # workload ids
    fidelity_precisions: list[str] = field(default_factory=list)
    curves: dict[str, list[Any]] = field(default_factory=dict)  # curve -> values
    curve_workload: Workload | None = None
    curve_impls: list[str] = field(default_factory=list)
    remat_steps: list[int] = field(default_factory=list)
    remat_every: int | None = None
    remat_workload: Workload | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)
    targets_source: str | None = None


def _positive(name: str, values: list[int]) -> None:
    bad = [v for v in values if v < 1]
    if bad:
        raise SystemExit(f"--{name} values must be >= 1 but got: {bad[0]}")


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate ``args`` and turn them into a :class:`Plan`; bad values exit with a message."""
    from metaopt.bench.report import load_targets

    for name in ("repeats", "memory_iterations"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1 but is: {getattr(args, name)}")
    if args.warmup < 0 or (args.iterations is not None and args.iterations < 1):
        raise SystemExit("--warmup must be >= 0 and --iterations >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    size = tiny if args.tiny else (lambda w: w)
    workloads = [size(WORKLOADS[w]) for w in args.workloads]
    cases = [Case(w, inner, order, precision)
             for w in workloads for precision in args.precision for order in args.order for inner in args.inner]
    iterations = {w.id: args.iterations or (1 if args.tiny else DEFAULT_ITERATIONS[w.id]) for w in workloads}
    curves: dict[str, list[Any]] = {}
    for name in args.curves:
        if name == "steps":
            _positive("curve-steps", args.curve_steps)
            curves[name] = list(args.curve_steps)
        elif name == "batch":
            _positive("curve-batch", args.curve_batch)
            curves[name] = list(args.curve_batch)
        else:
            unknown = [m for m in args.curve_models if m not in MODELS]
            if unknown:
                raise SystemExit(f"--curve-models: unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
            curves[name] = list(args.curve_models)
    _positive("remat-steps", args.remat_steps)
    if args.remat_every is not None and args.remat_every < 1:
        raise SystemExit(f"--remat-every must be >= 1 but is: {args.remat_every}")
    targets = load_targets(args.targets) if args.targets else []
    cw = size(WORKLOADS[args.curve_workload])
    _positive("curve-meta-batch / --remat-meta-batch", [args.curve_meta_batch or 1, args.remat_meta_batch])
    return Plan(
        device=device, workloads=workloads, cases=cases, iterations=iterations, impls=list(args.impls),
        repeats=args.repeats, warmup=args.warmup, memory=args.memory, memory_iterations=args.memory_iterations,
        memory_report=args.memory_report, check=args.check, flops=args.flops, peak_tflops=args.peak_tflops,
        seed=args.seed, tiny=args.tiny,
        fidelity=[w.id for w in workloads] if args.fidelity else [],
        fidelity_precisions=[p for p in args.precision if p in ("bf16", "fp16")] if args.fidelity else [],
        curves=curves, curve_impls=list(args.curve_impls),
        curve_workload=replace(cw, meta_batch=args.curve_meta_batch or cw.meta_batch),
        remat_steps=list(args.remat_steps), remat_every=args.remat_every,
        remat_workload=replace(size(WORKLOADS["O1"]), meta_batch=args.remat_meta_batch), targets=targets, targets_source=args.targets,
    )
