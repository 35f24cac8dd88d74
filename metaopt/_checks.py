"""Input checks of the MAML engine: the silent traps of torch's stock losses, a missing task
dimension, and parameters the support loss never uses (found from the autograd graph, since
``torch.func.grad`` returns zeros for them).

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> check_loss_inputs(F.mse_loss, torch.zeros(10, 1), torch.zeros(10))
    Traceback (most recent call last):
    ...
    ValueError: the model's output (10, 1) and the targets (10,) of mse_loss must have the same shape (torch would broadcast them into a wrong loss); reshape the targets or the output
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.types import Params

__all__ = ["check_loss_inputs", "check_task_dim", "in_transform", "unused"]

_CLASSIFICATION_LOSSES = (F.cross_entropy, F.nll_loss)
_CLASSIFICATION_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)
_REGRESSION_LOSSES = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)
_REGRESSION_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)


def check_loss_inputs(loss_fn: Any, out: Tensor, y: Tensor) -> None:
    """Refuse the two silent traps of torch's stock losses (a user's own loss is theirs):

    - cross-entropy / NLL on float targets. Torch reads float targets of the output's shape
      as class probabilities, so a regression target ``(N, 1)`` against one output column
      gives a loss of exactly 0 (softmax over one class). Float targets are accepted only as
      class probabilities: same shape as the output, at least two classes (dim 1).
    - MSE-like losses on outputs and targets of different shapes: torch broadcasts them
      (``(10, 1)`` against ``(10,)`` is a ``(10, 10)`` loss) with only a warning.
    """
    if loss_fn in _CLASSIFICATION_LOSSES or isinstance(loss_fn, _CLASSIFICATION_MODULES):
        if y.is_floating_point():
            soft = loss_fn is not F.nll_loss and not isinstance(loss_fn, nn.NLLLoss)
            soft = soft and out.shape == y.shape and out.dim() >= 2 and out.shape[1] > 1
            if not soft:
                raise ValueError(
                    f"loss_fn {getattr(loss_fn, '__name__', type(loss_fn).__name__)} is a classification "
                    f"loss but the targets are {y.dtype} {tuple(y.shape)} (output {tuple(out.shape)}): "
                    "for regression pass loss_fn=torch.nn.functional.mse_loss; class targets must be "
                    "integer indices (or class probabilities shaped like the output, >= 2 classes)"
                )
    elif (loss_fn in _REGRESSION_LOSSES or isinstance(loss_fn, _REGRESSION_MODULES)) and out.shape != y.shape:
        raise ValueError(
            f"the model's output {tuple(out.shape)} and the targets {tuple(y.shape)} of "
            f"{getattr(loss_fn, '__name__', type(loss_fn).__name__)} must have the same shape "
            "(torch would broadcast them into a wrong loss); reshape the targets or the output"
        )


def unused(loss: Tensor, params: Params) -> list[str]:
    """Names of ``params`` that ``loss``'s autograd graph does not reach (a walk over the
    graph of the first real support loss; ``torch.func.grad`` itself returns zeros)."""
    seen, reached, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad: a leaf the graph reaches
        if var is not None:
            reached.add(id(var))
        stack.extend(f for f, _ in node.next_functions)
    return [k for k, p in params.items() if id(p) not in reached]


def in_transform(x: Tensor) -> bool:
    """True inside a user's torch.func transform (e.g. vmap over :meth:`MAML.adapt`)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def check_task_dim(x: Tensor, where: str) -> None:
    """A float input ``(N, 1)`` would be N tasks of one scalar example: almost surely one
    task's ``(examples, features)`` without the task dimension."""
    if x.is_floating_point() and x.dim() == 2 and x.shape[1] == 1 and x.shape[0] > 1:
        raise ValueError(
            f"{where} inputs {tuple(x.shape)} read as {x.shape[0]} tasks of one scalar example each; "
            "inputs need a leading task dimension (tasks, examples, ...): for one task of "
            f"{x.shape[0]} examples use x.unsqueeze(0), shape (1, {x.shape[0]}, 1)"
        )
