"""The maths of meta-training: one meta-step, one evaluation, and the batch streams.

* :func:`meta_step` - adapt to every task of a meta-batch, backpropagate the mean query
  loss, take one outer step (the whole of a meta-iteration, as functorch's maml-omniglot
  ``loss_for_task`` + optimizer step).
* :func:`evaluate` - adapt to held-out tasks without the meta-graph; mean and 95% CI of the
  per-task metric (:func:`metaopt.stats.mean_ci`, Student-t) in an :class:`EvalResult`.
* :class:`SampledBatches` / :class:`CycledBatches` - training batches forever, from a task
  distribution or from a user's iterable, with a position that a checkpoint restores.

Both :func:`meta_step` and :func:`evaluate` take a ``sync`` collective: :data:`LOCAL` (one
process; the default) or a :class:`metaopt.distributed.DistributedContext`, which all-reduces
the gradients and gathers per-task metrics. There is one code path, as nanoGPT's DDP:
a single process is the collective of one rank.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from metaopt import MAML, SGD, MLP, Sinusoid
    >>> maml = MAML(MLP(), SGD(lr=0.01), 1, loss_fn=F.mse_loss)
    >>> outer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    >>> batch = Sinusoid().sample(4, torch.Generator().manual_seed(0))
    >>> meta_step(maml, outer, batch).meta_loss > 0
    True
    >>> evaluate(maml, [batch]).tasks
    4
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from metaopt.maml import MAML
from metaopt.rundir import json_safe
from metaopt.stats import mean_ci
from metaopt.tasks.base import TaskBatch, as_task_batch

__all__ = [
    "LOCAL",
    "Collective",
    "CycledBatches",
    "EvalResult",
    "LocalCollective",
    "NonFiniteLossError",
    "SampledBatches",
    "StepStats",
    "evaluate",
    "format_metric",
    "format_number",
    "meta_step",
    "tasks_fingerprint",
]


class NonFiniteLossError(RuntimeError):
    """The meta-loss or its gradient became NaN or infinite; ``iteration`` is the 1-based
    meta-iteration, ``value`` the meta-loss."""

    def __init__(self, iteration: int, value: float, checkpoint: Path | None, *, what: str = "") -> None:
        kept = (
            f"; the last good checkpoint is kept at {checkpoint}" if checkpoint is not None and checkpoint.exists()
            else ""
        )
        what = what or f"non-finite meta-loss ({value})"
        super().__init__(
            f"{what} at iteration {iteration}; training stopped{kept}. "
            "Try a smaller inner.lr or outer.lr, or train.grad_clip"
        )
        self.iteration = iteration
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (a worker process sends it back): rebuilt from its message and
        # attributes, since __init__'s arguments are not what self.args holds.
        return type(self).__new__, (type(self), *self.args), self.__dict__


# ============================================================================ collectives


class Collective(Protocol):
    """What the loop needs from a group of processes (one process: :data:`LOCAL`)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def shard(self, n: int, *, allow_remainder: bool = False) -> tuple[int, int]: ...

    def all_reduce_grads(self, params: Iterable[Tensor], local_tasks: int,
                         means: Sequence[Tensor | float] = ()) -> Sequence[Tensor | float]: ...

    def gather_tasks(self, values: Tensor) -> Tensor: ...

    def any(self, flag: bool) -> bool: ...


class LocalCollective:
    """The collective of a single process: every reduction is the identity."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return True

    def shard(self, n: int, *, allow_remainder: bool = False) -> tuple[int, int]:
        return 0, n

    def all_reduce_grads(self, params: Iterable[Tensor], local_tasks: int,
                         means: Sequence[Tensor | float] = ()) -> Sequence[Tensor | float]:
        return means

    def gather_tasks(self, values: Tensor) -> Tensor:
        return values.detach().reshape(-1).to("cpu", torch.float64)

    def any(self, flag: bool) -> bool:
        return flag

    def __repr__(self) -> str:
        return "LOCAL"


LOCAL = LocalCollective()


# ============================================================================ one meta-step


@dataclass
class StepStats:
    """What one meta-iteration reports (Python floats; NaN where not measured)."""

    meta_loss: float
    loss_before: float = math.nan
    accuracy: float = math.nan
    accuracy_before: float = math.nan


def meta_step(
    maml: MAML,
    outer: torch.optim.Optimizer,
    batch: TaskBatch,
    *,
    grad_clip: float | None = None,
    stats: bool = True,
    iteration: int = 0,
    checkpoint: Path | None = None,
    sync: Collective = LOCAL,
    scaler: torch.amp.GradScaler | None = None,
) -> StepStats:
    """One meta-iteration: adapt to every task, mean query loss, backward, outer step.

    Args:
        maml: the :class:`metaopt.MAML` engine.
        outer: the meta-optimizer over ``maml.parameters()``.
        batch: this process's tasks (under ``torchrun``: its shard of the meta-batch).
        grad_clip: clip the meta-gradient's norm (after the all-reduce).
        stats: also measure the loss/accuracy before adaptation (one more forward).
        iteration, checkpoint: named in a :class:`NonFiniteLossError`.
        sync: the collective; the loss/stats become means over all ranks' tasks and the
            gradients are all-reduced (weighted by tasks) before clipping and the step.
        scaler: a ``torch.amp.GradScaler`` (float16 training): the meta-loss is backpropagated
            at its scale, the gradients unscaled before clipping, and the outer step skipped
            (the scale lowered) when they overflowed; the returned stats are unscaled.

    Raises:
        NonFiniteLossError: the meta-loss is NaN/inf (checked before the outer step, so the
            parameters stay finite).
    """
    outer.zero_grad(set_to_none=True)
    # backward=True: the engine backpropagates task by task, so only one task's graph is
    # alive at a time (Conv4 O1 on CPU: ~1.9 GB -> one task's worth); same meta-gradient.
    loss_scale = None
    if scaler is not None:  # the scale as a tensor on the parameters' device (no host sync)
        loss_scale = scaler.scale(torch.ones((), device=next(iter(maml.parameters())).device))
    out = maml.meta_loss(batch, train=True, before=stats, backward=True, loss_scale=loss_scale)
    parts = [out.loss] + ([out.query_loss_before, out.accuracy, out.accuracy_before] if stats else [])
    means: list[Any] = [math.nan if t is None else t.detach().mean() for t in parts]
    # One all-reduce: .grad := gradient of the mean over all ranks' tasks, and the means
    # over all ranks' tasks (so every rank stops together on a non-finite loss).
    means = list(sync.all_reduce_grads(maml.parameters(), int(out.query_loss.shape[0]), means=means))
    grads = [p.grad for p in maml.parameters() if p.grad is not None]
    # A finite loss can still have a non-finite meta-gradient (an overflow in the backward),
    # and the outer step would then make every parameter NaN. Checked in the same host sync;
    # under fp16 loss scaling inf gradients are expected and the scaler skips the step.
    check_grads = scaler is None and bool(grads)
    if check_grads:
        means.append(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    values = _host_floats(means)  # the one host sync of the step
    if not math.isfinite(values[0]):
        raise NonFiniteLossError(iteration, values[0], checkpoint)
    if check_grads:
        if not values.pop():
            raise NonFiniteLossError(iteration, values[0], checkpoint,
                                     what=f"non-finite meta-gradient (the meta-loss is {values[0]:.6g})")
    if scaler is not None:  # .grad back to the meta-gradient; records whether it overflowed
        scaler.unscale_(outer)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in maml.parameters() if p.grad is not None], grad_clip)
    try:
        if scaler is not None:  # skips the step on inf/NaN gradients and lowers the scale
            scaler.step(outer)
            scaler.update()
        else:
            outer.step()
    except RuntimeError as e:  # a huge lr: "value cannot be converted to type float without overflow"
        if "overflow" not in str(e):
            raise
        lrs = sorted({float(g["lr"]) for g in outer.param_groups if "lr" in g})
        raise NonFiniteLossError(iteration, math.inf, checkpoint,
                                 what=f"the outer step overflowed float (outer lr {', '.join(map(str, lrs))})") from None
    return StepStats(*values)


def _host_floats(values: Sequence[Tensor | float]) -> list[float]:
    """Python floats of 0-dim tensors (all on one device) and floats, with one device-to-host
    copy for all the tensors instead of one sync each."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    host = iter(torch.stack([t.to(torch.float64) for t in tensors]).tolist() if tensors else [])
    return [next(host) if isinstance(v, Tensor) else float(v) for v in values]


# ============================================================================ evaluation


def format_number(x: float, digits: int = 4, *, sign: bool = False) -> str:
    """``x`` with ``digits`` decimals, or in scientific notation (``digits`` significant
    digits) from 1e5 up, where decimals say nothing (a diverging inner loop's MSE).

    Example:
        >>> format_number(0.12345), format_number(2.8e18), format_number(-0.5, sign=True)
        ('0.1235', '2.800e+18', '-0.5000')
    """
    plus = "+" if sign else ""
    if math.isfinite(x) and abs(x) >= 1e5:
        return f"{x:{plus}.{digits - 1}e}"
    return f"{x:{plus}.{digits}f}"


def format_metric(metric: str, mean: float | None, ci: float | None = None) -> str:
    """``"accuracy"`` as a percentage, anything else with 4 decimals (scientific from 1e5);
    ``"n/a"`` for no value.

    Example:
        >>> format_metric("accuracy", 0.9812, 0.004), format_metric("mse", 0.5), format_metric("mse", None)
        ('98.12% ± 0.40%', '0.5000', 'n/a')
        >>> format_metric("mse", 9.46e17, 4.1e18)
        '9.460e+17 ± 4.100e+18'
    """
    if mean is None or math.isnan(mean):
        return "n/a"
    if metric == "accuracy":
        text = f"{100 * mean:.2f}%"
        return text + (f" ± {100 * ci:.2f}%" if ci is not None and not math.isnan(ci) else "")
    return format_number(mean) + (f" ± {format_number(ci)}" if ci is not None and not math.isnan(ci) else "")


@dataclass
class EvalResult:
    """Evaluation over ``tasks`` held-out tasks: per-task values -> mean and 95% CI.

    ``metric`` is ``"mse"`` (regression; lower is better) or ``"accuracy"`` (fraction
    correct). ``ci95`` is the Student-t half-width of :func:`metaopt.stats.mean_ci`
    (``None`` for a single task, NaN when a value is not finite); ``std`` the sample std.
    """

    metric: str
    mean: float
    ci95: float | None
    std: float | None
    tasks: int
    inner_steps: int
    before_mean: float
    before_ci95: float | None
    loss_mean: float
    split: str = "val"
    values: list[float] = field(default_factory=list, repr=False)
    tasks_sha256: str | None = None

    @property
    def diverged_tasks(self) -> int:
        """How many tasks' metric is NaN/inf (the inner loop diverged on them)."""
        return sum(not math.isfinite(v) for v in self.values) if self.values else int(not math.isfinite(self.mean))

    def divergence(self, inner_lr: Any = None) -> str | None:
        """``None``, or one line naming the metric, the tasks, the inner steps (and lr) of a
        diverged evaluation, with the fix.

        Example:
            >>> r = EvalResult("mse", math.nan, math.nan, math.nan, 4, 10, 1.0, 0.1, math.nan, "test",
            ...                [0.1, math.nan, 0.2, math.inf])
            >>> r.divergence(0.3)
            'test mse diverged on 2 of 4 tasks after 10 inner steps at inner lr 0.3; use a smaller inner.lr or inner.eval_steps'
        """
        n = self.diverged_tasks
        if not n:
            return None
        lr = f" at inner lr {inner_lr}" if inner_lr is not None else ""
        return (f"{self.split} {self.metric} diverged on {n} of {self.tasks} tasks after {self.inner_steps} inner "
                f"steps{lr}; use a smaller inner.lr or inner.eval_steps")

    def summary(self) -> str:
        name = "accuracy" if self.metric == "accuracy" else "MSE"
        if self.diverged_tasks:
            return f"{self.split} {name} diverged ({self.diverged_tasks} of {self.tasks} tasks non-finite)"
        return (f"{self.split} {name} {format_metric(self.metric, self.mean, self.ci95)} ({self.tasks} tasks, "
                f"{self.inner_steps} inner steps; before adaptation {format_metric(self.metric, self.before_mean)})")

    def to_json(self, inner_lr: Any = None) -> dict[str, Any]:
        """Strict-JSON fields: non-finite numbers become ``None`` and a ``diverged`` entry
        (:meth:`divergence`) says why."""
        d = asdict(self)
        d.pop("values")
        d["before"] = {"mean": d.pop("before_mean"), "ci95": d.pop("before_ci95")}
        d["query_loss"] = d.pop("loss_mean")
        if d["tasks_sha256"] is None:
            d.pop("tasks_sha256")
        reason = self.divergence(inner_lr)
        if reason is not None:
            d["diverged"] = reason
        return json_safe(d)


def _mean_ci(values: Tensor) -> tuple[float, float | None, float | None]:
    """(mean, Student-t 95% half-width, sample std) of per-task values; a diverged task
    (NaN/inf) gives its non-finite mean and NaN interval instead of an exception, so the
    report says what happened."""
    v = values.tolist()
    if all(math.isfinite(x) for x in v):
        s = mean_ci(v)
        return s.mean, s.ci95, s.std
    return float(values.mean()), math.nan, math.nan


def evaluate(maml: MAML, batches: Iterable[Any], *, split: str = "val", device: torch.device | None = None,
             sync: Collective = LOCAL, fingerprint: bool = False) -> EvalResult:
    """Adapt to each held-out task (``eval_inner_steps``, no meta-graph) and aggregate.

    Args:
        maml: the :class:`metaopt.MAML` engine.
        batches: TaskBatches or torchmeta-style dicts (e.g. :func:`metaopt.tasks.eval_batches`,
            a DataLoader); every rank iterates over the same full batches.
        split: label for reports.
        device: where to move each batch.
        sync: the collective; each batch is split across its ranks (unevenly if need be),
            per-task values are gathered in task order, so every rank returns the result
            of one process over the same tasks.
        fingerprint: also hash the tasks' tensors (``tasks_sha256``, see
            :func:`tasks_fingerprint`): per-task values of two runs pair only when it agrees.

    Raises:
        ValueError: the batches hold no task.
    """
    rows: list[Tensor] = []  # (tasks, 4): global task index, metric after, before, query loss
    classify = False
    seen = 0  # global index of the current batch's first task
    digest = hashlib.sha256() if fingerprint else None
    for raw in batches:
        full = as_task_batch(raw)
        if digest is not None:  # the full batch: the same on every rank
            _hash_batch(digest, full)
        start, stop = sync.shard(full.num_tasks, allow_remainder=True)
        first, seen = seen, seen + full.num_tasks
        if stop == start:
            continue
        b = full.split(start, stop) if (start, stop) != (0, full.num_tasks) else full
        if device is not None:
            b = b.to(device)
        out = maml.meta_loss(b, train=False, before=True)
        classify = out.accuracy is not None
        after = out.accuracy if out.accuracy is not None else out.query_loss
        before = out.accuracy_before if out.accuracy_before is not None else out.query_loss_before
        assert before is not None  # before=True always measures it
        index = torch.arange(first + start, first + stop, device=after.device)
        rows.append(torch.stack([t.detach().to(torch.float64) for t in (index, after, before, out.query_loss)], 1))
    classify = sync.any(classify)
    table = torch.cat(rows).cpu() if rows else torch.zeros(0, 4, dtype=torch.float64)
    table = sync.gather_tasks(table).view(-1, 4)  # all ranks' rows, rank order
    table = table[table[:, 0].argsort(stable=True)]  # task order: the order of one process
    a, b0, lo = table[:, 1], table[:, 2], table[:, 3]
    if a.numel() == 0:
        raise ValueError(f"no {split} tasks to evaluate (empty data)")
    mean, ci, std = _mean_ci(a)
    bm, bci, _ = _mean_ci(b0)
    return EvalResult(
        metric="accuracy" if classify else "mse", mean=mean, ci95=ci, std=std, tasks=a.numel(),
        inner_steps=int(getattr(maml, "eval_inner_steps", 0)), before_mean=bm, before_ci95=bci,
        loss_mean=float(lo.mean()), split=split, values=a.tolist(),
        tasks_sha256=digest.hexdigest() if digest is not None else None,
    )


def _hash_batch(digest: Any, batch: TaskBatch) -> None:
    """Feed ``batch`` to ``digest`` task by task (so the chunking into batches does not count)."""
    tensors = [t.detach().cpu().contiguous() for t in (*batch.support, *batch.query)]
    tensors = [t.view(torch.int16) if t.dtype == torch.bfloat16 else t for t in tensors]  # numpy has no bf16
    for i in range(batch.num_tasks):
        for t in tensors:
            digest.update(f"{t.dtype}{tuple(t.shape[1:])}".encode())
            digest.update(t[i].numpy().tobytes())


def tasks_fingerprint(batches: Iterable[Any]) -> str:
    """SHA-256 of held-out tasks' tensors (support and query, inputs and targets, in order).

    Two runs' per-task values pair task by task only when they were measured on the same
    tasks. Seeds fix them, but not across device types: Omniglot draws its tasks with a
    generator on the device that holds the images, so CPU and CUDA runs see different ones.

    Example:
        >>> from metaopt.tasks import Sinusoid, eval_batches
        >>> a = tasks_fingerprint(eval_batches(Sinusoid(), 4, 2, seed=1, device="cpu"))
        >>> a == tasks_fingerprint(eval_batches(Sinusoid(), 4, 2, seed=1, device="cpu")), len(a)
        (True, 64)
        >>> a == tasks_fingerprint(eval_batches(Sinusoid(), 4, 2, seed=2, device="cpu"))
        False
    """
    digest = hashlib.sha256()
    for raw in batches:
        _hash_batch(digest, as_task_batch(raw))
    return digest.hexdigest()


# ============================================================================ batch streams


class SampledBatches:
    """Meta-batches of ``n`` tasks drawn forever from ``source`` with ``generator``.

    Under several processes every rank draws the full meta-batch from the same generator
    and keeps its shard (``sync.shard``), so the union of the shards is the single-process
    meta-batch and the generator state is the same on every rank. The position is the
    generator's state (checkpointed by the trainer); ``consumed`` stays 0.
    """

    def __init__(self, source: Any, n: int, generator: torch.Generator, device: torch.device,
                 sync: Collective = LOCAL) -> None:
        self.source, self.n, self.generator, self.device, self.sync = source, n, generator, device, sync
        self.consumed = 0

    def __iter__(self) -> Iterator[TaskBatch]:
        return self

    def __next__(self) -> TaskBatch:
        batch = self.source.sample(self.n, self.generator).to(self.device)
        return batch.split(*self.sync.shard(self.n))


class CycledBatches:
    """A user's iterable of batches (``TaskBatch`` or torchmeta dicts), cycled forever.

    ``consumed`` counts the batches taken; a trainer resumed with ``consumed = k`` skips
    the first ``k`` (modulo the iterable's length) so it continues where the run stopped.
    """

    def __init__(self, data: Iterable[Any], device: torch.device, sync: Collective = LOCAL) -> None:
        self.data, self.device, self.sync = data, device, sync
        self.consumed = 0
        self._it: Iterator[TaskBatch] | None = None

    def __iter__(self) -> Iterator[TaskBatch]:
        return self

    def _cycle(self) -> Iterator[TaskBatch]:
        skip = self.consumed  # batches a resumed run has already trained on
        while True:
            items = 0
            for raw in self.data:
                items += 1
                if skip:
                    skip -= 1
                    continue
                batch = as_task_batch(raw).to(self.device)
                yield batch.split(*self.sync.shard(batch.num_tasks))
            if items == 0:
                raise ValueError("the training data yielded no batches")

    def __next__(self) -> TaskBatch:
        if self._it is None:
            self._it = self._cycle()
        batch = next(self._it)
        self.consumed += 1
        return batch
