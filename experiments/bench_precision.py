"""Meta-gradient fidelity of mixed-precision policies against float64 on real Omniglot
tasks (5-way 1-shot, O1's Conv4 at its seeded initialisation): the measurement behind the
engine's precision policy (metaopt/precision.py, docs/performance.md).

    python experiments/bench_precision.py --tasks 32 --output results/precision_fidelity
    python experiments/bench_precision.py --dtype fp16 --tasks 4        # fp16 is slow on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from metaopt.bench.fidelity import POLICIES, fidelity  # noqa: E402
from metaopt.bench.workloads import WORKLOADS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--omniglot", default=os.environ.get("METAOPT_OMNIGLOT"),
                   help="Omniglot folder (default $METAOPT_OMNIGLOT; none: random data with the real shapes)")
    p.add_argument("--tasks", type=int, default=32, help="meta-batch (default 32, O1's)")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args(argv)
    if args.tasks < 1:
        raise SystemExit(f"--tasks must be >= 1 but is: {args.tasks}")
    from dataclasses import replace

    w = replace(WORKLOADS["O1"], meta_batch=args.tasks)
    batch, data = None, "random data with the real shapes"
    if args.omniglot:
        from metaopt.tasks import Omniglot

        tasks = Omniglot(args.omniglot, ways=w.ways, shots=w.shots, queries=w.queries, split="train")
        b = tasks.sample(args.tasks, generator=torch.Generator().manual_seed(args.seed))
        batch = type(b)(*[tuple(t.to(args.device) for t in pair) for pair in b])
        data = f"Omniglot train split, {args.tasks} tasks, seed {args.seed}"
    rows = []
    for name in args.dtype:
        dtype = torch.bfloat16 if name == "bf16" else torch.float16
        for r in fidelity(w, args.policies, dtype=dtype, device=args.device, seed=args.seed, batch=batch):
            rows.append({"precision": name, "data": data, **r})
    L = [f"# Meta-gradient fidelity against float64: O1 Conv4, {data}, torch {torch.__version__}, {args.device}",
         "", "| precision | policy | cosine | rel. error | worst layer cosine | worst layer rel. error |",
         "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['precision']} | {r['policy']} | {r['cosine']:.5f} | {r['rel_err']:.3g} | "
                 f"{r['min_layer_cosine']:.4f} | {r['max_layer_rel_err']:.3g} |")
    layers = list(rows[0]["layers"]) if rows else []
    L += ["", "Per layer (cosine / relative error; – : zero meta-gradient in float64):", "",
          "| precision | policy | " + " | ".join(layers) + " |", "|---|---|" + "---:|" * len(layers)]
    for r in rows:
        cells = ["–" if v["cosine"] is None else f"{v['cosine']:.4f} / {v['rel_err']:.2g}" for v in r["layers"].values()]
        L.append(f"| {r['precision']} | {r['policy']} | " + " | ".join(cells) + " |")
    md = "\n".join(L) + "\n"
    print(md)
    if args.output:
        prefix = Path(args.output)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".md").write_text(md)
        prefix.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
