"""Second-order MAML with memory sublinear in the number of inner steps (rematerialisation).

A plain second-order unroll keeps, for every inner step, the graph of the support forward
and of its ``create_graph=True`` backward until the meta-backward: memory grows linearly
with the steps. :func:`checkpointed_unroll` runs the inner loop in segments of ``every``
steps and keeps only the parameters and optimizer state *between* segments. In the
meta-backward each segment is recomputed from its saved start (support forward, inner
gradient with ``create_graph=True``, optimizer step: the full second-order graph of that
segment alone) and ``torch.autograd.grad`` carries the incoming gradient back to the
segment's start and to the hyperparameters the step uses. This is "gradient checkpointing
for MAML" written as a ``torch.autograd.Function`` per segment; the meta-gradient is the
plain unroll's to rounding (float64 test: 1e-10).

Why not ``torch.utils.checkpoint``: its non-reentrant mode drops *every* tensor saved in
the segment, including those the inner ``torch.autograd.grad`` needs during the forward,
so each inner gradient re-runs the segment up to that step (``k(k+1)/2`` step forwards per
segment of ``k``); the reentrant mode runs the segment under ``no_grad``, where the inner
gradient cannot be taken. Here the forward runs each step on detached inputs (graph freed
step by step), the backward recomputes each segment once.

Cost, ``N`` steps in segments of ``k``: memory ``~ N/k`` boundary states plus one
segment's second-order graph (``k`` steps), smallest near ``k = sqrt(N)``; time: every
step's forward (support forward + inner backward) runs twice, the backward through it
once. The meta-backward through the unroll is not itself differentiable
(``once_differentiable``): third-order derivatives of the meta-loss are not supported.

Used by :class:`metaopt.MAML` with ``checkpoint_every=k`` (per-task loop only).

Example:
    >>> import torch
    >>> from metaopt.maml import MAML
    >>> from metaopt.models import MLP
    >>> from metaopt.optim import SGD
    >>> from metaopt.tasks.base import TaskBatch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = MLP(1, (8,), 1).double()
    >>> batch = TaskBatch(support=(torch.randn(2, 5, 1).double(), torch.randn(2, 5, 1).double()),
    ...                   query=(torch.randn(2, 5, 1).double(), torch.randn(2, 5, 1).double()))
    >>> mse = torch.nn.functional.mse_loss
    >>> plain = MAML(model, SGD(lr=0.1), inner_steps=6, loss_fn=mse, vectorize=False)
    >>> remat = MAML(model, SGD(lr=0.1), inner_steps=6, loss_fn=mse, checkpoint_every=2)
    >>> g1 = torch.autograd.grad(plain.meta_loss(batch).loss, list(model.parameters()))
    >>> g2 = torch.autograd.grad(remat.meta_loss(batch).loss, list(model.parameters()))
    >>> max(float((a - b).abs().max()) for a, b in zip(g1, g2)) < 1e-12
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from metaopt.types import Params

__all__ = ["checkpointed_unroll", "check_checkpoint_every"]

#: one differentiable inner step: ``(params, state) -> (params, state)``
Step = Callable[[Params, Any], tuple[Params, Any]]


def check_checkpoint_every(value: Any) -> None:
    """Validate ``MAML(checkpoint_every=...)``: ``None`` or an int >= 1.

    Example:
        >>> check_checkpoint_every(0)
        Traceback (most recent call last):
        ...
        ValueError: checkpoint_every should be None or an int >= 1 but is: 0
    """
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"checkpoint_every should be None or an int >= 1 but is: {value!r}")


def _segment(step: Step, n: int, params: Params, state: Any) -> tuple[Params, Any]:
    for _ in range(n):
        params, state = step(params, state)
    return params, state


class _Run:
    """A segment as a function of a flat list of tensors (its start's params and state),
    so that a ``torch.autograd.Function`` can take it; non-tensor leaves ride along."""

    def __init__(self, step: Step, n: int, params: Params, state: Any) -> None:
        self.step, self.n = step, n
        self.leaves, self.spec = tree_flatten((params, state))
        self.is_t = [isinstance(v, Tensor) for v in self.leaves]
        self.out_leaves: list[Any] = []
        self.out_spec: Any = None
        self.out_is_t: list[bool] = []

    def inputs(self) -> list[Tensor]:
        return [v for v, t in zip(self.leaves, self.is_t) if t]

    def __call__(self, tensors: Sequence[Tensor], detach_each_step: bool) -> list[Tensor]:
        it = iter(tensors)
        params, state = tree_unflatten([next(it) if t else v for v, t in zip(self.leaves, self.is_t)], self.spec)
        for _ in range(self.n):
            params, state = self.step(params, state)
            if detach_each_step:  # forward pass: free each step's graph as soon as it is done
                params, state = _detached((params, state))
        leaves, self.out_spec = tree_flatten((params, state))
        self.out_is_t = [isinstance(v, Tensor) for v in leaves]
        self.out_leaves = leaves
        return [v for v, t in zip(leaves, self.out_is_t) if t]

    def rebuild(self, tensors: Sequence[Tensor]) -> tuple[Params, Any]:
        it = iter(tensors)
        return tree_unflatten([next(it) if t else v for v, t in zip(self.out_leaves, self.out_is_t)], self.out_spec)


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(t.requires_grad and t.is_floating_point())


def _detached(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([_leaf(v) if isinstance(v, Tensor) else v for v in leaves], spec)


class _Segment(torch.autograd.Function):
    """forward: run the segment, keep only its start; backward: recompute, then grad."""

    @staticmethod
    def forward(ctx: Any, run: _Run, n_in: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        inputs, extras = tensors[:n_in], tensors[n_in:]
        with torch.enable_grad():
            outs = run([_leaf(t) for t in inputs], detach_each_step=True)
        ctx.run, ctx.n_in, ctx.extras = run, n_in, extras
        ctx.save_for_backward(*inputs)
        return tuple(o.detach() for o in outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outs: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        inputs = [_leaf(t) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outs = ctx.run(inputs, detach_each_step=False)  # this segment's full second-order graph
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
        wrt = [t for t in (*inputs, *ctx.extras) if t.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                     if pairs and wrt else [None] * len(wrt))
        return (None, None, *[next(grads) if t.requires_grad else None for t in (*inputs, *ctx.extras)])


def checkpointed_unroll(step: Step, params: Params, state: Any, steps: int, every: int,
                        extras: Sequence[Tensor] = ()) -> tuple[Params, Any]:
    """``steps`` applications of ``step`` to ``(params, state)``, in recomputed segments of
    ``every`` steps (the last one may be shorter).

    Args:
        step: one differentiable inner step (it may call ``torch.autograd.grad`` with
            ``create_graph=True``); it must be deterministic, since it runs again in the
            backward (a random layer such as dropout would draw new numbers).
        params: the starting parameters (e.g. the meta-parameters).
        state: the inner optimizer's state (any pytree of tensors and constants).
        steps: number of steps (>= 0).
        every: steps per segment (>= 1).
        extras: tensors requiring grad that ``step`` uses besides ``params`` and ``state``
            (learnable hyperparameters such as a learned learning rate): they receive
            their gradient through the recomputation. A tensor ``step`` uses that is in
            neither gets no gradient through the unroll.

    Returns:
        ``(params, state)`` after ``steps`` steps, differentiable (once) with respect to
        the starting ``params`` and ``state`` and to ``extras``, as the plain unroll.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> def step(p, s):
        ...     g, = torch.autograd.grad((p["w"] ** 3).sum(), [p["w"]], create_graph=True)
        ...     return {"w": p["w"] - 0.1 * g}, s
        >>> p, _ = checkpointed_unroll(step, {"w": w}, (), steps=4, every=2)
        >>> q, _ = _segment(step, 4, {"w": w}, ())
        >>> torch.allclose(torch.autograd.grad(p["w"].sum(), w)[0], torch.autograd.grad(q["w"].sum(), w)[0])
        True
    """
    check_checkpoint_every(every)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps should be an int >= 0 but is: {steps!r}")
    if not torch.is_grad_enabled():  # nothing to save, nothing to recompute
        return _segment(step, steps, params, state)
    extras = [t for t in extras if isinstance(t, Tensor) and t.requires_grad]
    done = 0
    while done < steps:
        n = min(every, steps - done)
        run = _Run(step, n, params, state)
        inputs = run.inputs()
        outs = _Segment.apply(run, len(inputs), *inputs, *extras)
        params, state = run.rebuild(outs)
        done += n
    return params, state
