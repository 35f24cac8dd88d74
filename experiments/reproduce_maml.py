"""Reproduce the MAML paper's settings (Finn et al. 2017): sinusoid 5/10-shot and Omniglot
5-way/20-way 1/5-shot, with the paper's protocol from configs/*.yaml.

Writes one run directory per setting under --runs and the table of test results (mean ±
95% CI over 600 tasks, next to the paper's numbers) to --results as
maml_reproduction[_<inner>].json and .md. Finished runs are reused and interrupted ones
resumed, so the same command continues a partial reproduction.

    python experiments/reproduce_maml.py                                   # all six, full schedules
    python experiments/reproduce_maml.py --settings omniglot_5w1s --device cuda
    python experiments/reproduce_maml.py --inner adafactor                 # the *_adafactor.yaml variants
    python experiments/reproduce_maml.py --iterations 2000 --settings sinusoid_10shot
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metaopt.compare import PAPER_SETTINGS, reproduce, reproduction_markdown, write_report

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(PAPER_SETTINGS),
                   help=f"comma-separated subset of {', '.join(PAPER_SETTINGS)}")
    p.add_argument("--inner", default=None, help="inner optimizer variant, e.g. adafactor (default: the paper's SGD)")
    p.add_argument("--iterations", type=int, default=None, help="override train.iterations (default: the paper's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every setting (repeatable)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None)
    p.add_argument("--configs", default=str(REPO / "configs"), help="folder of the config files")
    p.add_argument("--runs", default="runs/reproduce", help="run directories go here")
    p.add_argument("--results", default="results", help="JSON and markdown tables go here")
    args = p.parse_args(argv)

    overrides = list(args.overrides)
    if args.iterations is not None:
        overrides.append(f"train.iterations={args.iterations}")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    rows = reproduce(settings, args.runs, configs_dir=args.configs, overrides=overrides,
                     inner=args.inner, device=args.device)
    name = "maml_reproduction" + (f"_{args.inner}" if args.inner else "")
    md = "## MAML reproduction\n\n" + reproduction_markdown(rows)
    j, m = write_report(args.results, name, {"rows": rows, "overrides": overrides}, md)
    print(md, end="")
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
