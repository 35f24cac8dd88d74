"""The ``metaopt`` command (also ``python -m metaopt``).

User errors (bad config, missing data, corrupt checkpoint) print one line
``metaopt: error: ...`` on stderr and exit with status 2; a non-finite loss exits with 1,
Ctrl-C with 130 (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from metaopt import __version__, config
from metaopt.build import resolve_device
from metaopt.checks import ConfigError, check_int
from metaopt.distributed import is_main_process, same_on_every_rank
from metaopt.loop import NonFiniteLossError, format_metric
from metaopt.rundir import CheckpointError
from metaopt.train import Trainer, TrainingInterrupted, evaluate_run, make_resumed_trainer

EPILOG = """\
examples:
  metaopt train configs/sinusoid.yaml                       # a few minutes on a laptop CPU
  metaopt train configs/sinusoid.yaml --set train.iterations=70000 --out runs/sine-paper
  metaopt train configs/omniglot_5w1s.yaml --device cuda --set inner.name=adafactor
  metaopt train --resume runs/sine-paper                    # continue from checkpoints/last.pt
  metaopt train --resume runs/sine --set train.iterations=20000   # extend a finished run
  torchrun --nproc_per_node=2 -m metaopt train configs/sinusoid.yaml --out runs/sine2  # 2 processes
  metaopt eval runs/sine --tasks 600                        # mean and 95% CI on test tasks
  metaopt compare configs/sinusoid.yaml --inner sgd,adafactor:lr=0.3 --seeds 3
  metaopt config configs/omniglot_20w5s.yaml                # print the resolved config
  metaopt bench --help

run directory: config.yaml, metrics.csv, checkpoints/last.pt, results.json, plots/*.png,
TensorBoard event files (tensorboard --logdir runs).
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set inner.lr=0.05 (repeatable; values read as YAML)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="overrides train.device (default: the config's, 'auto')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaopt",
        description="Functional MAML with differentiable inner optimizers: train, evaluate, compare, benchmark.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"metaopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "train", help="meta-train from a config into a run directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Meta-train from CONFIG (YAML: task, model, inner, outer, train sections).",
        epilog="examples:\n"
               "  metaopt train configs/sinusoid.yaml\n"
               "  metaopt train configs/sinusoid.yaml --set train.iterations=70000 --set inner.steps=5\n"
               "  metaopt train configs/omniglot_5w1s_adafactor.yaml --out runs/o5-af --device cuda\n"
               "  metaopt train --resume runs/o5-af\n\n"
               "config keys (section.key  type  default  meaning):\n" + _describe(),
    )
    p.add_argument("config", nargs="?", help="config file (not needed with --resume)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<config name>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    _add_common(p)

    p = sub.add_parser(
        "eval", help="evaluate a run's last checkpoint on held-out tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  metaopt eval runs/sine\n  metaopt eval runs/sine --steps 1     # after one inner step\n"
               "  metaopt eval runs/o5 --tasks 1000 --split val",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--tasks", type=int, default=600, help="held-out tasks (default 600)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--steps", type=int, default=None,
                   help="inner steps at test time (default: inner.eval_steps; writes results_<split>_<N>steps.json)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None)

    p = sub.add_parser(
        "compare", help="train one config with several inner optimizers (tuned on validation) and seeds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  metaopt compare configs/sinusoid.yaml --inner sgd,adafactor --seeds 3 "
               "--tune inner.lr=0.003,0.01,0.03,0.1,0.3,1\n"
               "  metaopt compare configs/omniglot_5w1s.yaml --inner sgd,adafactor:lr=0.5 --seeds 2 "
               "--set train.iterations=5000\n\n"
               "Each --inner entry is NAME[:key=value...] (inner.* keys for that optimizer).\n"
               "--tune KEY=V1,V2,... trains each value on --tune-seeds separate seeds, picks the best\n"
               "mean metric on VALIDATION tasks (never test tasks) per optimizer, then trains the final\n"
               "seeds with it; an entry that sets KEY itself is not tuned. CIs over seeds are Student t\n"
               "(n-1 df; one seed: n/a); paired differences use the same test tasks and seeds.\n"
               "Writes OUT/<inner>/seed<k>/ (and OUT/<inner>/tune/...) run directories, OUT/summary.md,\n"
               "OUT/summary.json and OUT/plots/compare_*.png. Re-running reuses a finished run only when\n"
               "its saved config.yaml matches; a run of another config is re-run (the old one kept as\n"
               "RUN.stale-K), or refused with --no-rerun, naming the differing key.",
    )
    p.add_argument("config")
    p.add_argument("--inner", required=True, help="comma-separated inner optimizers, e.g. sgd,adafactor")
    p.add_argument("--seeds", type=int, default=3, help="seeds per inner optimizer (default 3)")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="choose KEY per optimizer on validation tasks from these values (repeatable: grid product)")
    p.add_argument("--tune-seeds", type=int, default=1, help="seeds per tuning value (default 1)")
    p.add_argument("--no-rerun", dest="rerun", action="store_false",
                   help="refuse (instead of re-running) a run directory whose config differs")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/compare-<config name>-<time>)")
    _add_common(p)

    p = sub.add_parser("config", help="print the resolved config (defaults + file + --set)")
    p.add_argument("config", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("bench", help="benchmark the engine (see: metaopt bench --help)", add_help=False)
    return parser


def _describe() -> str:
    return config.describe()


def _default_out(config: str | None, prefix: str = "") -> Path:
    stem = Path(config).stem if config else "run"
    return Path("runs") / f"{prefix}{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _bench(argv: Sequence[str]) -> int:
    try:
        import metaopt.bench as bench
    except ModuleNotFoundError as e:
        if e.name in ("metaopt.bench",):
            print("metaopt: error: the benchmark module (metaopt.bench) is not available in this installation",
                  file=sys.stderr)
            return 2
        raise
    if not (hasattr(bench, "add_arguments") and hasattr(bench, "run")):
        print("metaopt: error: metaopt.bench does not provide add_arguments()/run() yet", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="metaopt bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark the MAML engine on the fixed workloads (S1, S5, O1, O5).",
        epilog="examples:\n"
               "  metaopt bench --tiny --workloads S1 --memory off          # smoke run, seconds\n"
               "  metaopt bench --workloads S1 S5 --inner sgd adafactor --output results/bench_cpu\n"
               "  metaopt bench --device cuda --output results/bench_cuda",
    )
    bench.add_arguments(parser)
    return int(bench.run(parser.parse_args(list(argv))) or 0)


def _cmd_train(args: argparse.Namespace) -> int:
    progress = ["train.progress=false"] if args.quiet else []
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("--out and --resume name different run directories; give only --resume RUN_DIR")
        trainer = make_resumed_trainer(args.resume, overrides=args.overrides + progress, device=args.device,
                                         config=args.config)
        if trainer.is_main:
            print(f"resuming {args.resume} at iteration {trainer.iteration}", file=sys.stderr)
    else:
        if not args.config:
            raise ConfigError("train needs a CONFIG file (or --resume RUN_DIR)")
        cfg = config.load(args.config, args.overrides + progress)  # config errors first
        out = Path(args.out) if args.out else _default_out(args.config)
        if not args.out:  # under torchrun: rank 0's clock names the run directory for all ranks
            out = same_on_every_rank(out, resolve_device(args.device or cfg["train"]["device"]))
        if (out / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        trainer = Trainer(cfg, out, device=args.device)
        if trainer.is_main:
            print(f"run directory: {out}", file=sys.stderr)
    results = trainer.fit()
    if trainer.is_main:
        _print_results(results, trainer.run_dir)
    return 0


def _print_results(results: dict, run_dir: Path | None) -> None:
    if results.get("mean") is not None:
        print(f"test {results['metric']}: {format_metric(results['metric'], results['mean'], results['ci95'])} "
              f"({results['tasks']} tasks, {results.get('inner_steps')} inner steps; before adaptation "
              f"{format_metric(results['metric'], results['before']['mean'])}) at iteration {results['iteration']}")
    if run_dir is not None:
        print(f"results: {run_dir / 'results.json'}  plots: {run_dir / 'plots'}")


def _cmd_eval(args: argparse.Namespace) -> int:
    check_int("--tasks", args.tasks, least=1, error=ConfigError)
    results = evaluate_run(args.run_dir, tasks=args.tasks, split=args.split, steps=args.steps, device=args.device)
    if is_main_process():  # under torchrun the evaluation is sharded; rank 0 reports
        _print_results(results, None)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from metaopt.compare import compare

    out = Path(args.out) if args.out else _default_out(args.config, "compare-")
    overrides = args.overrides + (["train.progress=false"] if args.quiet else [])
    compare(args.config, args.inner, args.seeds, out, overrides=overrides, tune=args.tune, tune_seeds=args.tune_seeds,
            rerun=args.rerun, device=args.device, log=lambda m: print(m, file=sys.stderr))
    print((out / "summary.md").read_text(), end="")
    print(f"summary: {out / 'summary.md'}  plots: {out / 'plots'}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(config.dump(config.load(args.config, args.overrides)), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metaopt`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    commands = {"train": _cmd_train, "eval": _cmd_eval, "compare": _cmd_compare, "config": _cmd_config}
    try:
        return commands[args.command](args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"metaopt: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"metaopt: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        where = f" --resume {e.checkpoint.parent.parent}" if e.checkpoint is not None else ""
        print(f"metaopt: {e}; continue with: metaopt train{where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("metaopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
