"""The ``metaopt`` command (also ``python -m metaopt``).

Every failure prints one line ``metaopt: error: <cause>; <fix>`` on stderr, never a
traceback (``--debug`` shows it), and exits with:

* 2 - usage and config: a bad key or value, a missing file, an unusable ``--out``, a
  corrupt checkpoint, a run the command line cannot rebuild;
* 1 - at run time: a non-finite meta-loss, an evaluation that diverged (results files
  then hold ``null`` and the reason), a run directory in use by another process, an OS
  error (full disk, permissions, network);
* 130 after Ctrl-C and 143 after SIGTERM, with a checkpoint of the last finished iteration.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from metaopt import __version__, config
from metaopt.build import resolve_device
from metaopt.checks import ConfigError, check_int
from metaopt.distributed import is_main_process, same_on_every_rank
from metaopt.loop import NonFiniteLossError, format_metric
from metaopt.rundir import CheckpointError, RunDirLocked
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
TensorBoard event files (tensorboard --logdir runs), eval_*.json (metaopt eval).

errors: one line on stderr (--debug: the traceback); exit 2 for usage/config, 1 at run
time (non-finite loss, diverged evaluation, run directory in use, disk full), 130 after
Ctrl-C and 143 after SIGTERM (both write a checkpoint first).
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set inner.lr=0.05 (repeatable; values read as YAML)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="overrides train.device (default: the config's, 'auto')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_debug(p)


def _add_debug(p: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    # SUPPRESS on subcommands: a subparser's default would overwrite ``metaopt --debug train``.
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, print the full traceback instead of one line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaopt",
        description="Functional MAML with differentiable inner optimizers: train, evaluate, compare, benchmark.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"metaopt {__version__}")
    _add_debug(parser, default=False)
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
        description="Evaluate RUN_DIR's checkpoints/last.pt on held-out tasks; writes\n"
                    "RUN_DIR/eval_<split>_<tasks>tasks[_<N>steps].json (never the training's results.json).",
        epilog="examples:\n  metaopt eval runs/sine\n  metaopt eval runs/sine --steps 1     # after one inner step\n"
               "  metaopt eval runs/o5 --tasks 1000 --split val",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--tasks", type=int, default=600, help="held-out tasks (default 600)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--steps", type=int, default=None,
                   help="inner steps at test time (default: inner.eval_steps; writes results_<split>_<N>steps.json)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_debug(p)

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
               "seeds with it; an entry that sets KEY itself is not tuned. --tune-set KEY=VALUE applies\n"
               "only to the tuning runs (e.g. a reduced budget). CIs over seeds are Student t\n"
               "(n-1 df; one seed: n/a); paired differences use the same test tasks and seeds.\n"
               "Writes OUT/<inner>/seed<k>/ (and OUT/<inner>/tune/...) run directories, OUT/summary.md,\n"
               "OUT/summary.json and OUT/plots/compare_*.png. Re-running reuses a finished run only when\n"
               "its saved config.yaml matches; a run of another config is re-run (the old one kept as\n"
               "RUN.stale-K), or refused with --no-rerun, naming the differing key. A run recorded as\n"
               "diverged is reused as such; --retry-diverged trains it again (e.g. after a fix).",
    )
    p.add_argument("config")
    p.add_argument("--inner", required=True, help="comma-separated inner optimizers, e.g. sgd,adafactor")
    p.add_argument("--seeds", type=int, default=3, help="seeds per inner optimizer (default 3)")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="choose KEY per optimizer on validation tasks from these values (repeatable: grid product)")
    p.add_argument("--tune-seeds", type=int, default=1, help="seeds per tuning value (default 1)")
    p.add_argument("--tune-set", dest="tune_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="applied after --set to the tuning runs only, e.g. --tune-set train.iterations=5000: "
                        "tune on a reduced budget, train the final seeds on the full one")
    p.add_argument("--no-rerun", dest="rerun", action="store_false",
                   help="refuse (instead of re-running) a run directory whose config differs")
    p.add_argument("--retry-diverged", action="store_true",
                   help="train again the runs recorded as diverged (default: reuse the record)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at a time, in worker processes (default 1; on a CPU with OMP_NUM_THREADS=1, one per core)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/compare-<config name>-<time>)")
    _add_common(p)

    p = sub.add_parser(
        "config", help="print the resolved config (defaults + file + --set)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the config a run would use: the defaults, CONFIG (with its base: chain) and --set.",
        epilog="examples:\n"
               "  metaopt config                                   # the defaults\n"
               "  metaopt config configs/omniglot_20w5s.yaml\n"
               "  metaopt config configs/sinusoid.yaml --set inner.name=adafactor --set inner.lr=0.3\n"
               "  metaopt config runs/sine/config.yaml            # what a run used",
    )
    p.add_argument("config", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set inner.lr=0.05 (repeatable; values read as YAML)")
    _add_debug(p)

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


def _check_out(out: Path) -> None:
    """A usable ``--out``: a folder (or nothing yet) under a writable existing ancestor."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {out}: {probe} is a file, not a folder; choose another --out")
    try:  # really create something there: permission bits do not bind root, /proc or a read-only mount do
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".metaopt-probe-"))
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create folders in {probe} ({e.strerror or e}); "
                          "choose a writable --out") from None


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
        _check_out(out)
        if (out / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        trainer = Trainer(cfg, out, device=args.device)
        if trainer.is_main:
            print(f"run directory: {out}", file=sys.stderr)
    if trainer.threads and trainer.threads > 1 and trainer.is_main:
        print(f"using {trainer.threads} CPU threads (train.threads); on a shared machine set train.threads=1 "
              "if training is slow", file=sys.stderr)
    results = trainer.fit()
    run_dir = trainer.run_dir
    if not trainer.is_main or run_dir is None:
        return 0
    return _print_results(results, run_dir / "results.json", run_dir / "plots")


def _print_results(results: dict, path: Path | str | None, plots: Path | None = None) -> int:
    """Print the results (stdout); a diverged evaluation is an error line (stderr) and 1."""
    split = results.get("split", "test")
    if results.get("mean") is not None:
        print(f"{split} {results['metric']}: {format_metric(results['metric'], results['mean'], results['ci95'])} "
              f"({results['tasks']} tasks, {results.get('inner_steps')} inner steps; before adaptation "
              f"{format_metric(results['metric'], results['before']['mean'])}) at iteration {results['iteration']}")
    if path is not None:
        print(f"results: {path}" + (f"  plots: {plots}" if plots is not None else ""))
    if results.get("diverged"):
        print(f"metaopt: error: {results['diverged']} (written as null to {path})", file=sys.stderr)
        return 1
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    check_int("--tasks", args.tasks, least=1, error=ConfigError)
    results = evaluate_run(args.run_dir, tasks=args.tasks, split=args.split, steps=args.steps, device=args.device,
                           progress=not args.quiet)
    if is_main_process():  # under torchrun the evaluation is sharded; rank 0 reports
        return _print_results(results, results.get("path"))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from metaopt.compare import compare

    out = Path(args.out) if args.out else _default_out(args.config, "compare-")
    overrides = args.overrides + (["train.progress=false"] if args.quiet else [])
    for item in args.tune_sets:  # a malformed item is named as --tune-set's, not --set's
        config.parse_override(item, "--tune-set")
    tune_overrides = [*overrides, *args.tune_sets] if args.tune_sets else None
    compare(args.config, args.inner, args.seeds, out, overrides=overrides, tune=args.tune, tune_seeds=args.tune_seeds,
            tune_overrides=tune_overrides, rerun=args.rerun, retry_diverged=args.retry_diverged, jobs=args.jobs,
            device=args.device,
            log=lambda m: print(m, file=sys.stderr))
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
    # SIGTERM outside the training loop (start-up, a long evaluation): stop like Ctrl-C, with
    # a line and 143, instead of dying silently. The loop installs its own checkpointing handler.
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if _in_main_thread() else None
    try:
        return commands[args.command](args)
    except TrainingInterrupted as e:
        where = f" --resume {e.checkpoint.parent.parent}" if e.checkpoint is not None else ""
        print(f"metaopt: {e}; continue with: metaopt train{where}", file=sys.stderr)
        return 128 + int(e.signum)
    except _Terminated:
        print("metaopt: terminated (SIGTERM); a run continues from its last checkpoint with: "
              "metaopt train --resume RUN_DIR", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("metaopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into a line and a status
        if args.debug:
            traceback.print_exc()
        code, line = describe_error(e)
        print(f"metaopt: error: {line}", file=sys.stderr)
        return code
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def describe_error(e: BaseException) -> tuple[int, str]:
    """(exit status, one line naming the cause and the fix) for an error that ends a command.

    Example:
        >>> describe_error(OSError(errno.ENOSPC, "No space left on device", "runs/a/metrics.csv"))
        (1, 'cannot write runs/a/metrics.csv: no space left on device; free some space, then continue with metaopt train --resume RUN_DIR (the last checkpoint is intact)')
    """
    if isinstance(e, (ConfigError, CheckpointError)):
        return 2, str(e)
    if isinstance(e, FileNotFoundError):
        return 2, str(e) if e.filename is None else f"file not found: {e.filename}"
    if isinstance(e, (NonFiniteLossError, RunDirLocked)):
        return 1, str(e)
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return 1, (f"cannot write{where}: no space left on device; free some space, then continue with "
                       "metaopt train --resume RUN_DIR (the last checkpoint is intact)")
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return 1, f"permission denied{where} ({e.strerror}); choose a writable --out or fix the permissions"
        if e.strerror:
            return 1, f"{e.strerror.lower()}:{where}" if where else e.strerror
        return 1, (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = (str(e).strip().splitlines() or [""])[0]
    return 1, (f"unexpected {type(e).__name__}: {first[:300]} (rerun with --debug for the traceback, and please "
               "report it)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
