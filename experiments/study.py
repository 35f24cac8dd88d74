"""The inner-optimizer study (issue 17): for each setting spec (configs/study/*.yaml), every
optimizer of configs/study/optimizers.yaml - SGD, SGD+momentum, Adam, RMSprop, Lion, Adafactor
(torch rule), Adafactor (transformers flavour, fixed lr, scale_parameter on and off) and the
Adafactor paper recipe - with its fixed lr chosen on validation tasks, over 3 seeds.

Resumable: re-running the same command reuses every finished run whose config matches (an
interrupted run is resumed from its checkpoint), so it can be stopped and started at will.
Runs go to --runs/<setting>, reports to --results/<setting>/ and --results/README.md.

    python experiments/study.py                                   # the sinusoid settings, reduced budget
    python experiments/study.py configs/study/omniglot_5w1s.yaml --device cuda
    python experiments/study.py configs/study/sinusoid_10shot.yaml --full     # the paper's 70k iterations
    python experiments/study.py configs/study/sinusoid_10shot.yaml --full --tune-at-budget  # 70k, lrs from 5k
    python experiments/study.py --only sgd,adafactor_torch --set train.iterations=20   # a smoke run
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from metaopt.config import ConfigError
from metaopt.study import load_study, run_study
from metaopt.train import TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]
DEFAULT = [str(REPO / "configs/study/sinusoid_10shot.yaml"), str(REPO / "configs/study/sinusoid_5shot.yaml")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="*", default=DEFAULT, help="study specs (default: the two sinusoid settings)")
    p.add_argument("--full", action="store_true", help="the configs' own schedules instead of the reduced budgets")
    p.add_argument("--tune-at-budget", action="store_true",
                   help="with --full: choose each lr on the reduced budget's tuning runs (reused), train only "
                        "the final seeds on the full schedule")
    p.add_argument("--only", default=None,
                   help="comma-separated optimizer labels to run (default: all); the report still has every "
                        "optimizer whose runs are finished")
    p.add_argument("--report", action="store_true", help="train nothing: report the finished runs of every optimizer")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None)
    p.add_argument("--no-rerun", dest="rerun", action="store_false",
                   help="refuse run directories whose config differs instead of re-running them")
    p.add_argument("--retry-diverged", action="store_true",
                   help="train again the runs recorded as diverged (e.g. after a fix) instead of reusing the record")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at a time, in worker processes (with OMP_NUM_THREADS=1: one per core)")
    p.add_argument("--runs", default="runs/study")
    p.add_argument("--results", default="results/study")
    args = p.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    try:
        studies = [load_study(s) for s in args.specs]  # every spec checked before anything runs
        for study in studies:
            run_study(study, args.runs, args.results, full=args.full, tune_at_budget=args.tune_at_budget, only=only,
                      report=args.report,
                      overrides=args.overrides, device=args.device, rerun=args.rerun,
                      retry_diverged=args.retry_diverged, jobs=args.jobs, log=lambda m: print(m, file=sys.stderr))
            name = study.name + ("_full" if args.full else "")
            print(f"{name}: {Path(args.results) / name / 'summary.md'}")
    except (ConfigError, FileNotFoundError) as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # Ctrl-C / SIGTERM inside a run: its checkpoint is saved
        print(f"study: {e}; re-run the same command to continue (finished runs are reused)", file=sys.stderr)
        return 128 + int(e.signum)
    except KeyboardInterrupt:  # between runs (or SIGTERM there, see below)
        print("study: interrupted; re-run the same command to continue (finished runs are reused)", file=sys.stderr)
        return 130
    print(f"index: {Path(args.results) / 'README.md'}")
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM between runs stops like Ctrl-C; inside a run the trainer saves first


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
