"""Scale-out meta-training with ``torch.distributed``: several processes (CPU cores or GPUs)
share each meta-batch.

Launch::

    torchrun --nproc_per_node=4 -m metaopt train configs/omniglot_5w1s.yaml --out runs/o5
    torchrun --nproc_per_node=2 -m metaopt train --resume runs/o5       # any number of ranks

From Python, :class:`metaopt.train.Trainer` (and ``train``/``resume``) turns distributed by
itself when the process was started by ``torchrun`` (``WORLD_SIZE > 1`` in the environment)
or a process group is already initialised; ``Trainer(..., distributed=False)`` opts out.

A :class:`DistributedContext` is the collective that :func:`metaopt.loop.meta_step` and
:func:`metaopt.loop.evaluate` take (a single process is :data:`metaopt.loop.LOCAL`), so the
maths has one code path. Semantics:

* Backend by device: NCCL on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), gloo on CPU.
* Sharding: every rank samples the *full* meta-batch from the same seeded generator and keeps
  its contiguous slice (``TaskBatch.split``), so for the same seed the union of the ranks'
  tasks is exactly the single-process meta-batch, and the generator state is identical on
  every rank (sampling is repeated on each rank; it is cheap next to adaptation).
* ``train.meta_batch_size`` must be divisible by the number of ranks (a ``ConfigError``
  otherwise, naming the sizes that work). :meth:`DistributedContext.all_reduce_grads` itself
  handles uneven shards exactly (see below), and evaluation shards unevenly.
* Meta-gradient: each rank backpropagates the mean query loss of its own tasks (the full
  second-order graph through its inner loops), then the ``.grad`` of every meta-parameter
  is all-reduced with weight ``local_tasks / total_tasks``:
  ``sum_r (n_r / N) * grad(mean_r) = grad((1/N) sum_i L_i)``, the gradient of the global mean
  over all tasks. Because MAML's meta-loss is a sum of independent per-task terms of the same
  meta-parameters, this is exact (float64: within 1e-10 of one process). Gradient clipping
  and the outer step then see the same global gradient on every rank, so every rank takes the
  same step (all-reduce results are bitwise identical across ranks).
* Evaluation: each held-out chunk is split across ranks, per-task metrics are all-gathered in
  task order, and mean and 95% CI are over all tasks (the same tasks as one process).
* Rank 0 alone writes ``config.yaml``, ``metrics.csv``, TensorBoard files, checkpoints,
  ``results.json`` and plots. Logged training metrics are means over all ranks' tasks.
* A checkpoint holds no rank-specific state (weights, outer state, the task generator's
  state, which every rank shares), so a run resumes with any number of ranks; the
  remaining iterations then draw the same tasks as an uninterrupted run would.
* At start-up the ranks all-gather a hash of the resolved config (and the run directory);
  a disagreement raises ``ConfigError`` on every rank naming the differing ranks and keys.
  Initial weights are broadcast from rank 0.

Limits: a run directory on a filesystem every rank can read (resuming reads
``checkpoints/last.pt`` on every rank); ``metaopt compare``/``reproduce`` are not rank-aware.

Example (two CPU processes, no torchrun)::

    from metaopt.distributed import launch
    launch(my_fn, world_size=2)          # my_fn(*args) runs on each rank with RANK etc. set
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt import config as config_mod
from metaopt.checks import ConfigError
from metaopt.loop import EvalResult, evaluate, meta_step
from metaopt.maml import MAML
from metaopt.models import MLP
from metaopt.optim import SGD
from metaopt.tasks.base import TaskBatch, as_task_batch
from metaopt.tasks.sinusoid import Sinusoid

__all__ = [
    "DistributedContext",
    "backend_for",
    "benchmark",
    "env_world_size",
    "free_port",
    "init",
    "is_main_process",
    "launch",
    "same_on_every_rank",
    "setup",
    "shard_bounds",
]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by ``torchrun``), 1 when unset."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an int, got {os.environ['WORLD_SIZE']!r}") from None


def _multi_process() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return env_world_size() > 1


def is_main_process() -> bool:
    """True in a single process and on rank 0 (of the initialised group, else ``$RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def backend_for(device: torch.device | str) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def shard_bounds(n: int, rank: int, world_size: int, *, allow_remainder: bool = False) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``n`` tasks that ``rank`` takes.

    Rank ``r`` takes ``[r*n//W, (r+1)*n//W)``. With ``allow_remainder=False`` (training)
    ``n`` must be divisible by ``world_size`` (``ConfigError`` otherwise); with ``True``
    (evaluation) shard sizes differ by at most one and a rank may get none when ``n < W``.

    Example:
        >>> [shard_bounds(10, r, 2) for r in range(2)]
        [(0, 5), (5, 10)]
        >>> [shard_bounds(5, r, 2, allow_remainder=True) for r in range(2)]
        [(0, 2), (2, 5)]
    """
    if n % world_size and not allow_remainder:
        lo = n // world_size * world_size
        near = " or ".join(str(k) for k in (lo, lo + world_size) if k > 0)
        raise ConfigError(
            f"meta-batch of {n} tasks does not divide by the {world_size} ranks; set "
            f"train.meta_batch_size to a multiple of {world_size} (e.g. {near}) or change --nproc_per_node"
        )
    return rank * n // world_size, (rank + 1) * n // world_size


def _flatten(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.items() for k, v in (sec.items() if isinstance(sec, Mapping) else [])}


@dataclass
class DistributedContext:
    """One rank's view of the process group; the trainer's hooks are its methods.

    Attributes:
        rank, world_size: this process and the number of processes.
        device: this rank's device (``cuda:LOCAL_RANK`` or ``cpu``).
        backend: ``"nccl"`` or ``"gloo"``.
        owns_group: this context initialised the process group (and destroys it at exit).
    """

    rank: int
    world_size: int
    device: torch.device
    backend: str
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ sharding

    def shard(self, n: int, *, allow_remainder: bool = False) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of ``n`` tasks (:func:`shard_bounds`)."""
        return shard_bounds(n, self.rank, self.world_size, allow_remainder=allow_remainder)

    def shard_batch(self, batch: Any, *, allow_remainder: bool = False) -> TaskBatch:
        """This rank's contiguous slice of a full meta-batch (a view, no copy)."""
        b = as_task_batch(batch)
        return b.split(*self.shard(b.num_tasks, allow_remainder=allow_remainder))

    # ------------------------------------------------------------------ reductions

    def mean(self, value: Tensor, local_tasks: int) -> Tensor:
        """The mean over all ranks' tasks of a per-rank mean ``value`` over ``local_tasks``
        tasks (float64, same on every rank)."""
        buf = torch.stack([value.detach().to(self.device, torch.float64).reshape(()) * local_tasks,
                           torch.tensor(float(local_tasks), dtype=torch.float64, device=self.device)])
        if local_tasks == 0:
            buf[0] = 0.0  # an empty shard's mean is NaN; it contributes nothing
        dist.all_reduce(buf)
        return buf[0] / buf[1]

    def all_reduce_grads(self, params: Iterable[Tensor], local_tasks: int,
                         means: Sequence[Tensor | float] = ()) -> list[Tensor]:
        """Replace each ``.grad`` (the gradient of this rank's mean loss over ``local_tasks``
        tasks) by the gradient of the mean over all ranks' tasks, in place; also turn the
        per-rank means ``means`` (e.g. the loss) into means over all ranks' tasks.

        One all-reduce (per gradient dtype) of a flat buffer holding ``grad * local_tasks``
        for every parameter, the task count and ``mean * local_tasks``; the sums divided by
        the total count are the global means: ``sum_r (n_r / N) grad(mean_r) =
        grad((1/N) sum_i L_i)``, exact for uneven shards. Parameters without a gradient are
        skipped (every rank must agree on which have one), except on a rank with no tasks,
        which sends zeros.

        Returns:
            the global means (0-dim tensors, in the order of ``means``; NaN stays NaN).
        """
        params = [p for p in params if p.requires_grad]
        if local_tasks == 0:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        groups: dict[torch.dtype, list[Tensor]] = {}  # dtype -> the gradients of that dtype
        for p in params:
            if p.grad is not None:
                groups.setdefault(p.grad.dtype, []).append(p.grad)
        if not groups:
            groups[torch.float64] = []
        out: list[Tensor] = []
        for i, dtype in enumerate(sorted(groups, key=str)):  # same order on every rank
            grads = groups[dtype]
            extra = [float(local_tasks)]
            if i == 0:  # the means ride along in the first buffer
                extra += [0.0 if local_tasks == 0 else float(m) * local_tasks for m in means]
            flat = torch.cat([g.reshape(-1) * local_tasks for g in grads]
                             + [torch.tensor(extra, dtype=dtype, device=self.device)])
            dist.all_reduce(flat)
            offset = 0
            total = flat[sum(g.numel() for g in grads)]
            for g in grads:
                k = g.numel()
                g.copy_((flat[offset:offset + k] / total).view_as(g))
                offset += k
            if i == 0:
                out = list(flat[offset + 1:] / total)
        return out

    def gather_tasks(self, values: Tensor) -> Tensor:
        """All-gather 1-D per-task values of possibly different lengths, concatenated in
        rank order (float64, on CPU; the same on every rank)."""
        v = values.detach().reshape(-1).to(self.device, torch.float64)
        n = torch.tensor([v.numel()], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        m = int(max(int(s) for s in sizes))
        padded = torch.zeros(m, dtype=torch.float64, device=self.device)
        padded[: v.numel()] = v
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return torch.cat([o[: int(s)] for o, s in zip(out, sizes)]).cpu()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. a Ctrl-C seen by one rank)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``module``."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def parameters_in_sync(self, module: nn.Module) -> bool:
        """True when every rank holds bitwise the same parameters (a debugging check)."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to(self.device, torch.float64) for p in module.parameters()])
            lo, hi = flat.clone(), flat.clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    # ------------------------------------------------------------------ agreement

    def check_config(self, cfg: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None) -> str:
        """All-gather a SHA-256 of the resolved config (and ``extra``, e.g. the run
        directory); raise ``ConfigError`` on every rank if any rank differs from rank 0.

        Returns the hash (the same on every rank).
        """
        text = config_mod.dump(cfg) + "\n" + repr(sorted((extra or {}).items()))
        digest = hashlib.sha256(text.encode()).hexdigest()
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (digest, _flatten(cfg), dict(extra or {})))
        if all(g[0] == digest for g in gathered):
            return digest
        ref_cfg = {**gathered[0][1], **gathered[0][2]}
        parts = []
        for r, (h, flat, ext) in enumerate(gathered):
            if h == gathered[0][0]:
                continue
            mine = {**flat, **ext}
            keys = sorted(k for k in set(ref_cfg) | set(mine) if ref_cfg.get(k) != mine.get(k))
            diffs = ", ".join(f"{k} ({ref_cfg.get(k)!r} on rank 0 vs {mine.get(k)!r})" for k in keys[:5])
            parts.append(f"rank {r}: {diffs or 'hash differs'}")
        bad = [r for r, g in enumerate(gathered) if g[0] != gathered[0][0]]
        raise ConfigError(
            f"ranks disagree on the resolved config: rank(s) {', '.join(map(str, bad))} differ from rank 0 "
            f"({'; '.join(parts)}); every rank must be started with the same config and --set/--out options"
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, maml: MAML, batches: Iterable[Any], *, split: str = "val",
                 device: torch.device | None = None) -> EvalResult:
        """:func:`metaopt.loop.evaluate` with this context as the collective: each batch is
        split across ranks, per-task metrics are gathered in task order, mean and CI are
        over all tasks; the same :class:`metaopt.loop.EvalResult` on every rank."""
        return evaluate(maml, batches, split=split, device=device, sync=self)


# ============================================================================ set-up


_CONTEXT: DistributedContext | None = None


def _destroy() -> None:
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def init(device: torch.device | str = "cpu") -> DistributedContext | None:
    """Join (or reuse) the process group of a multi-process launch; ``None`` in one process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (as set
    by ``torchrun``). On CUDA this rank uses ``cuda:LOCAL_RANK`` and NCCL; on CPU gloo.
    Idempotent: a second call returns the same context.

    Raises:
        ConfigError: the group was initialised with NCCL but the device is the CPU, or
            ``torch.distributed`` is not available in this build.
    """
    global _CONTEXT
    if not _multi_process():
        return None
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    device = torch.device(device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", (dist.get_rank() if dist.is_initialized() else 0)))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s); "
                "use --nproc_per_node <= the number of GPUs"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if _CONTEXT is not None and dist.is_initialized():
        if _CONTEXT.device != device:
            raise ConfigError(f"process group already set up for {_CONTEXT.device}, not {device}")
        return _CONTEXT
    owns = False
    if not dist.is_initialized():
        backend = backend_for(device)
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method="env://", **kwargs)
        owns = True
        atexit.register(_destroy)
    backend = str(dist.get_backend())
    if device.type == "cpu" and "gloo" not in backend:
        raise ConfigError(f"the process group uses {backend!r}, which cannot reduce CPU tensors; "
                          "train on CUDA (--device cuda) or initialise the group with gloo")
    _CONTEXT = DistributedContext(dist.get_rank(), dist.get_world_size(), device, backend, owns)
    return _CONTEXT


def setup(cfg: Mapping[str, Any], device: torch.device | str, *, run_dir: Any = None,
          meta_batch_size: int | None = None) -> DistributedContext | None:
    """What :class:`metaopt.train.Trainer` calls: :func:`init`, then check that the ranks
    agree on ``cfg`` (and ``run_dir``) and that ``meta_batch_size`` divides by the ranks.

    Returns ``None`` in a single process.
    """
    ctx = init(device)
    if ctx is None:
        return None
    ctx.check_config(cfg, extra={"run directory": None if run_dir is None else str(run_dir)})
    if meta_batch_size is not None:
        ctx.shard(meta_batch_size)
    return ctx


def same_on_every_rank(obj: Any, device: torch.device | str = "cpu") -> Any:
    """Rank 0's ``obj`` on every rank of a multi-process launch (``obj`` itself in one
    process), e.g. a default run directory named after the clock."""
    ctx = init(device)
    return obj if ctx is None else ctx.broadcast_object(obj)


# ============================================================================ launching


def free_port() -> int:
    """A TCP port that is free right now on this machine (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        fn(*args)
    finally:
        _destroy()


def launch(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *, port: int | None = None) -> None:
    """Run ``fn(*args)`` in ``world_size`` fresh processes on this machine with the
    environment ``torchrun`` would set (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ...).

    ``fn`` must be importable (a module-level function). Raises if any rank fails.
    """
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(fn, world_size, port or free_port(), tuple(args)), nprocs=world_size, join=True)


# ============================================================================ benchmark


def _bench_rank(meta_batch_size: int, iterations: int, warmup: int, inner_steps: int, threads: int,
                queue: Any) -> None:
    torch.set_num_threads(threads)
    ctx = init("cpu")
    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1)  # workload S1 (S5 with inner_steps=5)
    maml = MAML(model, SGD(lr=0.01), inner_steps, loss_fn=F.mse_loss)
    outer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    tasks = Sinusoid(shots=10, queries=10)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        batch = tasks.sample(meta_batch_size, g)
        if ctx is None:
            meta_step(maml, outer, batch, stats=False)
        else:
            meta_step(maml, outer, ctx.shard_batch(batch), stats=False, sync=ctx)

    for _ in range(warmup):
        step()
    if ctx:
        ctx.barrier()
    t0 = time.perf_counter()
    for _ in range(iterations):
        step()
    if ctx:
        ctx.barrier()
    elapsed = time.perf_counter() - t0
    if ctx is None or ctx.is_main:
        queue.put(elapsed)


def benchmark(world_sizes: Sequence[int] = (1, 2), *, meta_batch_size: int = 24, iterations: int = 100,
              warmup: int = 10, inner_steps: int = 1, threads: int = 1, repeats: int = 3) -> list[dict[str, Any]]:
    """Meta-training throughput (tasks/s over all ranks) of workload S1 (sinusoid MLP
    1-40-40-1, second order) on the CPU with gloo, for each number of processes.

    Each process uses ``threads`` torch threads; the best of ``repeats`` runs is reported
    (each run spawns fresh processes). Timings include sampling, the all-reduces and the
    outer step, not process start-up.
    """
    import torch.multiprocessing as mp

    for name, value, least in (("meta_batch_size", meta_batch_size, 1), ("iterations", iterations, 1),
                               ("warmup", warmup, 0), ("inner_steps", inner_steps, 0), ("threads", threads, 1),
                               ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    bad = [w for w in world_sizes if isinstance(w, bool) or not isinstance(w, int) or w < 1]
    if bad or not world_sizes:
        raise ValueError(f"world_sizes must be ints >= 1, got {list(world_sizes)!r}")
    rows = []
    mpctx = mp.get_context("spawn")
    for w in world_sizes:
        shard_bounds(meta_batch_size, 0, w)  # fail early on a bad size
        times = []
        for _ in range(repeats):
            q = mpctx.SimpleQueue()
            launch(_bench_rank, w, (meta_batch_size, iterations, warmup, inner_steps, threads, q))
            times.append(q.get())
        best = min(times)
        rows.append({
            "processes": w, "threads_per_process": threads, "meta_batch_size": meta_batch_size,
            "inner_steps": inner_steps, "iterations": iterations, "seconds": best,
            "tasks_per_s": meta_batch_size * iterations / best,
            "all_tasks_per_s": [meta_batch_size * iterations / t for t in times],
            "ms_per_iteration": 1000 * best / iterations,
        })
    base = rows[0]["tasks_per_s"]
    for r in rows:
        r["speedup"] = r["tasks_per_s"] / base if base and math.isfinite(base) else math.nan
    return rows
