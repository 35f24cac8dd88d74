"""Compare inner optimizers (SGD vs the differentiable Adafactor, ...) on one config, fairly:
each optimizer's inner lr is chosen on VALIDATION tasks from a grid (--tune), then trained on
--seeds seeds; the table gives the test metric's mean and Student-t 95% CI over seeds, paired
differences on the same test tasks, and diverged runs by name; plus learning curves with bands.

Writes the runs under --runs (OUT/<inner>/seed<k>, OUT/<inner>/tune/..., OUT/summary.md,
OUT/plots) and copies the report to --results as inner_comparison_<config>.json and .md.
Re-running reuses finished runs whose config matches and re-runs the others.

    python experiments/compare_inner.py                                     # sinusoid, sgd vs adafactor, 3 seeds
    python experiments/compare_inner.py --config configs/omniglot_5w1s.yaml --inner sgd,adafactor \\
        --tune inner.lr=0.03,0.1,0.3,1 --seeds 3 --set train.iterations=5000 --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from metaopt.compare import compare, markdown_table, write_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TUNE = "inner.lr=0.001,0.003,0.01,0.03,0.1,0.3,1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "sinusoid.yaml"))
    p.add_argument("--inner", default="sgd,adafactor",
                   help="comma-separated NAME[:key=value...] entries (default: sgd,adafactor)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tune", action="append", default=None, metavar="KEY=V1,V2,...",
                   help=f"grid chosen on validation tasks per optimizer (default: {DEFAULT_TUNE})")
    p.add_argument("--no-tune", action="store_true", help="train each entry as given (no tuning)")
    p.add_argument("--tune-seeds", type=int, default=1)
    p.add_argument("--no-rerun", dest="rerun", action="store_false",
                   help="refuse run directories whose config differs instead of re-running them")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None)
    p.add_argument("--runs", default=None, help="default: runs/compare-<config name>")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)

    tune = [] if args.no_tune else (args.tune or [DEFAULT_TUNE])
    stem = Path(args.config).stem
    out = Path(args.runs) if args.runs else Path("runs") / f"compare-{stem}"
    summary = compare(args.config, args.inner, args.seeds, out, overrides=args.overrides, tune=tune,
                      tune_seeds=args.tune_seeds, rerun=args.rerun, device=args.device)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plots = []
    for png in map(Path, summary["plots"]):  # keep the figures next to the table (runs/ is not kept)
        plots.append(shutil.copyfile(png, results / f"inner_comparison_{stem}_{png.name}"))
    md = "## Inner-optimizer comparison\n\n" + markdown_table(summary["rows"], title=f"{stem} ({args.seeds} seeds)",
                                                              paired=summary["paired"])
    md += f"\nConfig: `{Path(args.config).name}`" + (f", overrides: `{' '.join(args.overrides)}`" if args.overrides else "")
    md += f"; tuning: `{' '.join(tune) or 'none'}` on validation tasks ({args.tune_seeds} seed(s) per value)"
    md += "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    j, m = write_report(args.results, f"inner_comparison_{stem}", {**summary, "overrides": args.overrides}, md)
    print(md, end="")
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
