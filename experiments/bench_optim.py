"""Microbenchmark: cost of the inner optimizer in second-order MAML (benchmark workload S5).

Times one meta-iteration's forward + double backward (5 inner steps, create_graph) on the
1-40-40-1 ReLU MLP, sinusoid-sized data (10 support + 10 query), meta-batch 25, with SGD
and with Adafactor as the inner optimizer, and prints time and peak-memory ratios.

Two engine styles are timed: ``loop`` (Python loop over tasks, ``torch.autograd.grad`` with
``create_graph=True``) and ``vmap`` (``torch.func.vmap`` over tasks of ``torch.func.grad``).

    python experiments/bench_optim.py --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import functional_call, grad, vmap

from metaopt import optim


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1)
    )


def adapt_loop(model, params, opt, xs, ys, steps):
    state = opt.init(params)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(functional_call(model, params, (xs,)), ys)
        g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params, state = opt.step(params, dict(zip(params, g)), state)
    return params


def meta_loss_loop(model, params, opt, batch, steps):
    sx, sy, qx, qy = batch
    losses = []
    for t in range(sx.shape[0]):  # (tasks, 10, 1)
        adapted = adapt_loop(model, params, opt, sx[t], sy[t], steps)
        losses.append(torch.nn.functional.mse_loss(functional_call(model, adapted, (qx[t],)), qy[t]))
    return torch.stack(losses).mean()


def meta_loss_vmap(model, params, opt, batch, steps):
    def inner_loss(p, x, y):
        return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    def task_loss(p, sx, sy, qx, qy):
        state = opt.init(p)
        for _ in range(steps):
            p, state = opt.step(p, grad(inner_loss)(p, sx, sy), state)
        return inner_loss(p, qx, qy)

    return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *batch).mean()


def bench(opt, mode, repeats, steps, tasks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = make_model()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    x = torch.rand(4, tasks, 10, 1, generator=gen) * 10 - 5  # support x, query x, ...
    batch = (x[0], torch.sin(x[0]), x[1], torch.sin(x[1]))
    fn = meta_loss_loop if mode == "loop" else meta_loss_vmap
    times = []
    for i in range(repeats + 2):  # 2 warm-up iterations
        t0 = time.perf_counter()
        loss = fn(model, params, opt, batch, steps)
        loss.backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    # Memory: bytes of distinct storages saved for backward by the meta-graph (what the outer
    # backward keeps alive). Saved-tensor hooks do not work under torch.func, so the
    # vmap engine reports none.
    if mode != "loop":
        return statistics.median(times), float("nan")
    saved = {}  # one entry per storage: a tensor saved by several nodes counts once

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(model, params, opt, batch, steps)
    return statistics.median(times), sum(saved.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=25)
    parser.add_argument("--modes", default="loop,vmap")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    opts = {
        "sgd": optim.SGD(lr=0.01),
        "adafactor": optim.Adafactor(lr=0.01),
        "adafactor_hf": optim.Adafactor.from_transformers(),
        # optax's rule leaves the small MLP unfactored: fewer kernels per step.
        "adafactor_optax_rule": optim.Adafactor(lr=0.01, min_dim_size_to_factor=128),
    }
    for mode in args.modes.split(","):
        base_t, base_m = bench(opts["sgd"], mode, args.repeats, args.steps, args.tasks)
        print(f"[{mode}] sgd: {base_t * 1e3:.1f} ms/iter, saved tensors {base_m / 2**20:.2f} MiB")
        for name, opt in list(opts.items())[1:]:
            t, m = bench(opt, mode, args.repeats, args.steps, args.tasks)
            print(
                f"[{mode}] {name}: {t * 1e3:.1f} ms/iter ({t / base_t:.2f}x sgd), "
                f"saved tensors {m / 2**20:.2f} MiB ({m / base_m:.2f}x sgd)"
            )


if __name__ == "__main__":
    main()
