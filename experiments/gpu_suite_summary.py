"""Summary of one `experiments/gpu_suite.sh` run: the steps' exit status, every benchmark
target, and the fp32 vs bf16 training runs' test accuracy (mean ± 95% CI) side by side.

    python experiments/gpu_suite_summary.py results/gpu_suite > results/gpu_suite/summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarize(out: Path) -> str:
    L = [f"# GPU suite summary ({out})", ""]
    steps = (out / "steps.txt").read_text().split("\n") if (out / "steps.txt").exists() else []
    L += ["| step | exit | seconds |", "|---|---:|---:|"]
    L += [f"| {s.split()[0]} | {s.split()[1]} | {s.split()[2]} |" for s in steps if s.strip()]
    for name in ("bench", "bench_sinusoid", "curves", "remat"):
        path = out / f"{name}.json"
        if not path.exists():
            L += ["", f"{name}.json: missing (step failed or timed out; see suite.log)"]
            continue
        res = json.loads(path.read_text())
        L += ["", f"## Targets from {name}.json ({res['meta']['device_name']}, torch {res['meta']['torch']})", ""]
        L += [f"- **{t['status']}** — {t['target']}: {t['detail']}" for t in res.get("targets", [])
              if t["status"] != "not measured"]
    runs = {}
    for prec in ("fp32", "bf16"):
        path = out / f"train_{prec}" / "results.json"
        if path.exists():
            runs[prec] = json.loads(path.read_text())
    L += ["", "## Omniglot 5-way 1-shot, short training (test split)", "",
          "| precision | iterations | accuracy | 95% CI | tasks | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for prec, r in runs.items():
        L.append(f"| {prec} | {r.get('iteration')} | {r['mean']:.4f} | ±{r['ci95']:.4f} | {r.get('tasks')} | "
                 f"{r.get('elapsed_s', '–')} |")
    if len(runs) == 2:
        a, b = runs["fp32"], runs["bf16"]
        diff, ci = b["mean"] - a["mean"], (a["ci95"] ** 2 + b["ci95"] ** 2) ** 0.5
        verdict = "equal within the CI" if abs(diff) <= ci else "different beyond the CI"
        L += ["", f"bf16 - fp32 accuracy: {diff:+.4f} (95% CI of the difference of two independent means "
                  f"±{ci:.4f}): **{verdict}**"]
    else:
        L += ["", f"training runs found: {', '.join(runs) or 'none'} (see suite.log)"]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "results/gpu_suite")), end="")
