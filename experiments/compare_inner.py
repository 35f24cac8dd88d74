"""Compare inner optimizers (SGD vs the differentiable Adafactor, ...) on one config over
several seeds: learning curves with 95% CI bands and a table of final test metrics.

Writes the runs under --runs (OUT/<inner>/seed<k>, plus OUT/summary.md and OUT/plots) and
copies the table to --results as inner_comparison_<config>.json and .md.

    python experiments/compare_inner.py                                     # sinusoid, sgd vs adafactor, 3 seeds
    python experiments/compare_inner.py --config configs/omniglot_5w1s.yaml --inner sgd,adafactor:lr=0.1 \\
        --seeds 3 --set train.iterations=5000 --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from metaopt.compare import compare, markdown_table, write_report

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "sinusoid.yaml"))
    p.add_argument("--inner", default="sgd,adafactor:lr=0.1",
                   help="comma-separated NAME[:key=value...] entries (default: sgd,adafactor:lr=0.1)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None)
    p.add_argument("--runs", default=None, help="default: runs/compare-<config name>")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)

    stem = Path(args.config).stem
    out = Path(args.runs) if args.runs else Path("runs") / f"compare-{stem}"
    summary = compare(args.config, args.inner, args.seeds, out, overrides=args.overrides, device=args.device)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plots = []
    for png in map(Path, summary["plots"]):  # keep the figures next to the table (runs/ is not kept)
        plots.append(shutil.copyfile(png, results / f"inner_comparison_{stem}_{png.name}"))
    md = "## Inner-optimizer comparison\n\n" + markdown_table(summary["rows"], title=f"{stem} ({args.seeds} seeds)")
    md += f"\nConfig: `{Path(args.config).name}`" + (f", overrides: `{' '.join(args.overrides)}`" if args.overrides else "")
    md += "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    j, m = write_report(args.results, f"inner_comparison_{stem}", {**summary, "overrides": args.overrides}, md)
    print(md, end="")
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
