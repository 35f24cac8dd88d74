"""Inner-optimizer state: its exact size per model, and what it costs in the peak memory of a
second-order MAML meta-step (ResNet12).

Part 1 (exact, no timing): the bytes of the tensors in ``opt.init(params)`` for each model of
the zoo and each inner optimizer, per task and for a vectorised meta-batch (a vmapped engine
holds one state per task).

Part 2 (measured): peak memory of one second-order meta-step of ResNet12 on random 5-way
1-shot data for a few inner optimizers and inner-step counts, with the benchmark's own
measurement (``metaopt.bench.measure``: a fresh process per case, peak RSS above the memory
before the step, after one warm-up step). Second-order MAML keeps every inner step's
optimizer arithmetic in the graph, so the optimizer's share grows with the inner steps.

    python experiments/optimizer_state.py --out results/study/state_memory
    python experiments/optimizer_state.py --no-memory                       # sizes only, seconds
    python experiments/optimizer_state.py --resolution 32 --width 0.25 --steps 1  # quick look
    python experiments/optimizer_state.py --memory-from results/study/state_memory/measured.json  # no re-measuring
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import metaopt.models  # noqa: E402
import metaopt.optim  # noqa: E402
from metaopt.bench.impls import Impl  # noqa: E402
from metaopt.bench.measure import MetaIteration, _measure  # noqa: E402
from metaopt.tasks.base import TaskBatch  # noqa: E402

HARDWARE = f"2-core CPU VM, torch {torch.__version__}"

#: label -> (registry name, kwargs). Hyperparameters that do not change the state's shapes
#: (lr, eps, ...) are left at their defaults; transformers' rule at the study's setting.
INNERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {"lr": 0.01}),
    "sgd momentum=0.9": ("sgd", {"lr": 0.01, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.01}),
    "rmsprop": ("rmsprop", {"lr": 0.01}),
    "lion": ("lion", {"lr": 0.01}),
    "adafactor (torch rule, factored)": ("adafactor", {"lr": 0.01}),
    "adafactor factored=false": ("adafactor", {"lr": 0.01, "factored": False}),
    "adafactor min_dim_size_to_factor=128 (optax rule)": ("adafactor", {"lr": 0.01, "min_dim_size_to_factor": 128}),
    "adafactor_transformers (factored)": ("adafactor_transformers", {
        "lr": 0.01, "relative_step": False, "warmup_init": False, "scale_parameter": False}),
    "adafactor_transformers factored=false": ("adafactor_transformers", {
        "lr": 0.01, "relative_step": False, "warmup_init": False, "scale_parameter": False, "factored": False}),
}

#: label -> (zoo name, kwargs, meta-batch of the usual MAML setting, what that setting is)
MODELS: dict[str, tuple[str, dict[str, Any], int, str]] = {
    "mlp": ("mlp", {"in_features": 1, "hidden": (40, 40), "out_features": 1}, 25, "sinusoid, 25 tasks"),
    "conv4": ("conv4", {"ways": 5, "in_channels": 1, "hidden": 64}, 32, "Omniglot 5-way, 32 tasks"),
    "resnet12": ("resnet12", {"ways": 5, "in_channels": 3, "width": 1.0}, 4, "miniImageNet 5-way, 4 tasks"),
}

#: the optimizers whose peak memory is measured (keys of INNERS)
MEMORY_INNERS = ["sgd", "adam", "adafactor (torch rule, factored)", "adafactor factored=false",
                 "adafactor min_dim_size_to_factor=128 (optax rule)"]


# ---------------------------------------------------------------------------------------
# Part 1: exact state sizes
# ---------------------------------------------------------------------------------------


def state_size(opt: Any, params: dict[str, Tensor]) -> dict[str, int]:
    """Elements and bytes of every tensor in ``opt.init(params)``.

    ``counter_*``: the 0-dim tensors (step counters); the rest is per-parameter state.
    """
    leaves = [x for x in tree_leaves(opt.init(params)) if isinstance(x, Tensor)]
    counters = [x for x in leaves if x.dim() == 0]
    return {
        "tensors": len(leaves),
        "elements": sum(x.numel() for x in leaves),
        "bytes": sum(x.numel() * x.element_size() for x in leaves),
        "counter_elements": len(counters),
        "counter_bytes": sum(x.element_size() for x in counters),
    }


def build_model(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """``MODELS[name]``'s zoo model (float32), initialised from ``seed``."""
    zoo, kwargs, _, _ = MODELS[name]
    torch.manual_seed(seed)  # nn.Module init draws from the global generator
    return metaopt.models.get(zoo, **{**kwargs, **overrides})


def state_table(models: list[str], inners: list[str]) -> list[dict[str, Any]]:
    """One row per (model, inner optimizer): parameter bytes, state bytes per task and per
    vectorised meta-batch."""
    rows = []
    for m in models:
        params = {k: p.detach() for k, p in build_model(m).named_parameters()}
        p_bytes = sum(p.numel() * p.element_size() for p in params.values())
        meta_batch, setting = MODELS[m][2], MODELS[m][3]
        for label in inners:
            name, kwargs = INNERS[label]
            s = state_size(metaopt.optim.get(name, **kwargs), params)
            rows.append({
                "model": m, "inner": label, "param_elements": sum(p.numel() for p in params.values()),
                "param_bytes": p_bytes, "state_elements": s["elements"], "state_bytes": s["bytes"],
                "counter_bytes": s["counter_bytes"], "state_per_param": s["bytes"] / p_bytes,
                "meta_batch": meta_batch, "setting": setting, "meta_batch_state_bytes": meta_batch * s["bytes"],
            })
    return rows


def shape_breakdown(model: str, inners: list[str]) -> list[dict[str, Any]]:
    """State elements by kind of parameter (conv 3x3, conv 1x1, linear, 1-D): where a
    factored rule saves and where it does not."""

    def kind(p: Tensor) -> str:
        if p.dim() == 4:
            return f"conv {p.shape[-2]}x{p.shape[-1]} (out, in, kh, kw)"
        return "linear (out, in)" if p.dim() == 2 else "1-D (bias, norm)"

    params = {k: p.detach() for k, p in build_model(model).named_parameters()}
    groups: dict[str, dict[str, Tensor]] = {}
    for k, p in params.items():
        groups.setdefault(kind(p), {})[k] = p
    rows = []
    for g, ps in groups.items():
        row: dict[str, Any] = {"kind": g, "tensors": len(ps), "param_elements": sum(p.numel() for p in ps.values())}
        for label in inners:
            name, kwargs = INNERS[label]
            s = state_size(metaopt.optim.get(name, **kwargs), ps)
            row[label] = s["elements"] - s["counter_elements"]
        rows.append(row)
    return rows


def graph_bytes(opt: Any, params: dict[str, Tensor], steps: int = 1, seed: int = 0) -> int:
    """Bytes autograd keeps for the backward of ``steps`` differentiable ``opt.step`` calls,
    as in second-order MAML (params and gradients require grad): the tensors saved for
    backward that are still alive after the steps (the final state dropped, as MAML does),
    each storage counted once, leaving out the params of every step: the meta-parameters
    are alive anyway, and the model's forward at each step's params keeps those (torch's
    Adafactor also saves them for its relative step, at no extra cost in MAML). Gradients
    count when the update saves them: SGD's ``p - lr g`` does not, so there the inner
    gradient is freed; ``g * g`` does, so Adam keeps it.
    """
    gen = torch.Generator().manual_seed(seed)
    p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    state = opt.init(p)
    steps_params = [p]  # held to the end, so that no other tensor reuses their addresses
    saved: list[weakref.ref] = []  # weak: a tensor freed with its graph node must not count

    def pack(t: Tensor) -> Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(steps):  # random gradients: the shapes, not the values, set the sizes
            grads = {k: torch.randn(v.shape, generator=gen).requires_grad_() for k, v in params.items()}
            p, state = opt.step(p, grads, state)
            steps_params.append(p)
    del grads, state  # MAML's query pass uses the final params only
    gc.collect()
    params_at = {t.untyped_storage().data_ptr() for ps in steps_params for t in ps.values()}
    kept = {}
    for ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params_at:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(kept.values())


def graph_table(model: str, inners: list[str], steps: list[int]) -> list[dict[str, Any]]:
    """Per inner optimizer: state bytes and bytes kept by the graph for 1..k inner steps."""
    params = {k: p.detach() for k, p in build_model(model).named_parameters()}
    p_bytes = sum(p.numel() * p.element_size() for p in params.values())
    rows = []
    for label in inners:
        name, kwargs = INNERS[label]
        opt = metaopt.optim.get(name, **kwargs)
        rows.append({"model": model, "inner": label, "param_bytes": p_bytes,
                     "state_bytes": state_size(opt, params)["bytes"],
                     "graph_bytes": {str(k): graph_bytes(opt, params, k) for k in steps}})
    return rows


# ---------------------------------------------------------------------------------------
# Part 2: measured peak memory of one second-order meta-step
# ---------------------------------------------------------------------------------------


class ZooMAML(Impl):
    """metaopt's engine as the benchmark runs it (its ``metaopt-loop`` / ``metaopt-vmap``
    rows), with an inner optimizer from the registry instead of the benchmark's two."""

    is_metaopt = True

    def __init__(self, inner: str, steps: int, vectorize: bool) -> None:
        name, kwargs = INNERS[inner]
        self.inner, self.steps, self.vectorize = metaopt.optim.get(name, **kwargs), steps, vectorize
        self.key = "metaopt-vmap" if vectorize else "metaopt-loop"

    def build(self, model: nn.Module, case: Any) -> Any:
        from metaopt.maml import MAML

        maml = MAML(model, self.inner, inner_steps=self.steps, loss_fn=F.cross_entropy, vectorize=self.vectorize)

        def meta_backward(batch: TaskBatch) -> None:
            # As the benchmark: backward inside (task by task on the loop: one task's graph
            # alive at a time), no extra forward at the meta-parameters.
            maml.meta_loss(batch, before=False, backward=True)

        return meta_backward


def random_batch(tasks: int, ways: int, shots: int, queries: int, resolution: int, seed: int = 0) -> TaskBatch:
    """Random images with miniImageNet's shapes; labels 0..ways-1 (memory does not depend on values)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(tasks, ways * shots, 3, resolution, resolution, generator=g)  # (tasks, ways*shots, 3, H, W)
    xq = torch.rand(tasks, ways * queries, 3, resolution, resolution, generator=g)  # (tasks, ways*queries, 3, H, W)
    ys = torch.arange(ways).repeat(shots).expand(tasks, -1).contiguous()
    yq = torch.arange(ways).repeat(queries).expand(tasks, -1).contiguous()
    return TaskBatch(support=(xs, ys), query=(xq, yq))


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the fresh process: build the case, measure one meta-step after one warm-up."""
    torch.set_num_threads(int(spec["threads"]))
    model = build_model("resnet12", width=spec["width"])
    batch = random_batch(spec["meta_batch"], 5, 1, spec["queries"], spec["resolution"])
    impl = ZooMAML(spec["inner"], spec["steps"], spec["vectorize"])
    it = MetaIteration(impl, None, model, batch, torch.device("cpu"))  # settings live in impl
    params = {k: p.detach() for k, p in model.named_parameters()}
    t0 = time.perf_counter()
    out = _measure(it, "cpu", 1, "fresh process")
    return {**out, "seconds_two_steps": time.perf_counter() - t0,
            "param_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            "state_bytes": state_size(impl.inner, params)["bytes"],
            "graph_bytes": graph_bytes(impl.inner, params, spec["steps"])}


def measure_case(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Peak memory of one case in a fresh Python process (this script with ``--worker``)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])
           + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"worker exited {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def size(b: float) -> str:
    """Bytes, KiB or MiB (the table spans 8 bytes to hundreds of MiB)."""
    if abs(b) < 2**10:
        return f"{b:,.0f} B"
    return f"{b / 2**10:,.1f} KiB" if abs(b) < 2**20 else f"{b / 2**20:,.1f} MiB"


def markdown(res: dict[str, Any]) -> str:
    L = [f"# Inner-optimizer state: size and peak memory ({res['date']})", "",
         f"Command: `{res['command']}`  ", f"Hardware: {res['hardware']}", "",
         "## Exact state size (bytes of the tensors in `opt.init(params)`, float32 params)", "",
         "| model | params | inner optimizer | state per task | state / params | "
         "meta-batch (setting) | state per meta-batch, vectorised |",
         "|---|---:|---|---:|---:|---|---:|"]
    for r in res["state"]:
        L.append(f"| {r['model']} | {r['param_elements']:,} | {r['inner']} | {size(r['state_bytes'])} | "
                 f"{r['state_per_param']:.3f} | {r['meta_batch']} ({r['setting']}) | "
                 f"{size(r['meta_batch_state_bytes'])} |")
    if res.get("breakdown"):
        inners = [k for k in res["breakdown"][0] if k in INNERS]
        L += ["", "### ResNet12: per-parameter state elements by kind of parameter", "",
              "| parameter kind | tensors | params | " + " | ".join(inners) + " |",
              "|---|---:|---:|" + "---:|" * len(inners)]
        for r in res["breakdown"]:
            L.append(f"| {r['kind']} | {r['tensors']} | {r['param_elements']:,} | "
                     + " | ".join(f"{r[i]:,}" for i in inners) + " |")
    if res.get("graph"):
        ks = list(res["graph"][0]["graph_bytes"])
        L += ["", "### ResNet12: what second-order MAML keeps of the inner optimizer (exact)", "",
              "Bytes autograd saves for the backward of k differentiable inner steps and still holds after "
              "them (each storage once; the params of every step left out: the model's forward keeps them "
              "anyway; a gradient counted when the update saves it).", "",
              "| inner optimizer | state per task | " + " | ".join(f"graph, {k} step(s)" for k in ks)
              + " | graph per step / param bytes |", "|---|---:|" + "---:|" * len(ks) + "---:|"]
        for r in res["graph"]:
            k = ks[-1]
            L.append(f"| {r['inner']} | {size(r['state_bytes'])} | "
                     + " | ".join(size(r["graph_bytes"][k_]) for k_ in ks)
                     + f" | {r['graph_bytes'][k] / int(k) / r['param_bytes']:.2f} |")
    if res.get("memory"):
        m = res["memory_setting"]
        L += ["", f"## Measured peak memory of one second-order meta-step: ResNet12 width {m['width']}, "
              f"{m['resolution']}x{m['resolution']}x3, 5-way 1-shot, {m['queries']} queries/class, "
              f"meta-batch {m['meta_batch']}, {'vectorised' if m['vectorize'] else 'per-task loop'}", "",
              f"Method: {res['memory'][0].get('method', '')}."
              + (f" Measured by `{res['memory_from']['command']}` ({res['memory_from']['date']})."
                 if res.get("memory_from") else ""), "",
              "| inner optimizer | inner steps | peak (MiB) | / SGD's | minus SGD's (MiB) | per inner step (MiB) | "
              "optimizer's graph, exact (MiB) | state per task | (minus SGD) / state | seconds (warm-up + measured) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        sgd = {r["steps"]: r.get("peak_bytes") for r in res["memory"] if r["inner"] == "sgd"}
        for r in res["memory"]:
            if "error" in r:
                L.append(f"| {r['inner']} | {r['steps']} | {r['error']} | | | | | | | |")
                continue
            base = sgd.get(r["steps"])
            st = r["state_bytes"]  # of the measured model
            if base is None or r["inner"] == "sgd":
                rel = delta = per_step = ratio = "—"
            else:
                d = r["peak_bytes"] - base
                rel, delta, per_step = f"{r['peak_bytes'] / base:.3f}", mib(d), mib(d / r["steps"])
                ratio = f"{d / st:.2f}"
            graph = mib(r["graph_bytes"]) if "graph_bytes" in r else "—"
            L.append(f"| {r['inner']} | {r['steps']} | {mib(r['peak_bytes'])} | {rel} | {delta} | {per_step} | "
                     f"{graph} | {size(st)} | {ratio} | {r['seconds_two_steps']:.0f} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--inners", nargs="+", default=list(INNERS), choices=list(INNERS), metavar="INNER")
    p.add_argument("--no-memory", action="store_true", help="state sizes only (no meta-steps)")
    p.add_argument("--memory-inners", nargs="+", default=MEMORY_INNERS, choices=list(INNERS), metavar="INNER")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 5], help="inner steps of the measured meta-steps")
    p.add_argument("--meta-batch", type=int, default=1)
    p.add_argument("--vectorize", action="store_true", help="vmapped engine (default: per-task loop)")
    p.add_argument("--resolution", type=int, default=84)
    p.add_argument("--width", type=float, default=1.0, help="ResNet12 width multiplier")
    p.add_argument("--queries", type=int, default=15, help="query examples per class")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None, help="folder for summary.md and summary.json")
    p.add_argument("--memory-from", default=None, metavar="SUMMARY_JSON",
                   help="take the measured rows from an earlier run's summary.json instead of measuring "
                        "(the exact parts are recomputed)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    res: dict[str, Any] = {
        "command": "python experiments/optimizer_state.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": HARDWARE, "state": state_table(args.models, args.inners),
    }
    if "resnet12" in args.models:
        res["breakdown"] = shape_breakdown("resnet12", [i for i in args.inners if INNERS[i][0] == "adafactor"])
        res["graph"] = graph_table("resnet12", args.inners, args.steps)
    if args.memory_from:
        earlier = json.loads(Path(args.memory_from).read_text())
        res["memory_setting"], res["memory"] = earlier["memory_setting"], earlier["memory"]
        res["memory_from"] = {"file": args.memory_from, "command": earlier["command"], "date": earlier["date"]}
        params = {k: p.detach() for k, p in build_model("resnet12", width=res["memory_setting"]["width"]).named_parameters()}
        for r in res["memory"]:  # the exact count, recomputed with this version of graph_bytes
            if "error" not in r:
                name, kwargs = INNERS[r["inner"]]
                r["graph_bytes"] = graph_bytes(metaopt.optim.get(name, **kwargs), params, r["steps"])
    elif not args.no_memory:
        setting = {"width": args.width, "resolution": args.resolution, "queries": args.queries,
                   "meta_batch": args.meta_batch, "vectorize": args.vectorize, "threads": args.threads}
        res["memory_setting"], res["memory"] = setting, []
        for steps in args.steps:
            for inner in args.memory_inners:
                print(f"measuring {inner}, {steps} inner step(s) ...", file=sys.stderr, flush=True)
                r = measure_case({**setting, "inner": inner, "steps": steps})
                res["memory"].append({"inner": inner, "steps": steps, **r})
                print(f"  {r}", file=sys.stderr, flush=True)
    md = markdown(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(md)
        (out / "summary.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
