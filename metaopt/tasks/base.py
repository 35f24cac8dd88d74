"""The batch format shared by every task distribution and by the MAML engine."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor


class TaskBatch(NamedTuple):
    """A meta-batch of tasks, task dimension first.

    Attributes:
        support: ``(inputs, targets)`` used for adaptation, e.g. Omniglot
            ``(tasks, ways*shots, 1, 28, 28)`` float and ``(tasks, ways*shots)`` int64.
        query: ``(inputs, targets)`` used for the meta-loss, e.g.
            ``(tasks, ways*queries, 1, 28, 28)`` and ``(tasks, ways*queries)``.

    Example:
        >>> import torch
        >>> b = TaskBatch(support=(torch.zeros(4, 5, 1), torch.zeros(4, 5, 1)),
        ...               query=(torch.zeros(4, 7, 1), torch.zeros(4, 7, 1)))
        >>> b.num_tasks
        4
    """

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]

    @property
    def num_tasks(self) -> int:
        return int(self.support[0].shape[0])

    def to(self, device: torch.device | str) -> "TaskBatch":
        """Return the batch with every tensor moved to ``device``."""
        return TaskBatch(
            support=(self.support[0].to(device), self.support[1].to(device)),
            query=(self.query[0].to(device), self.query[1].to(device)),
        )

    def split(self, start: int, stop: int) -> "TaskBatch":
        """Return tasks ``start:stop`` (a view, no copy)."""
        return TaskBatch(
            support=(self.support[0][start:stop], self.support[1][start:stop]),
            query=(self.query[0][start:stop], self.query[1][start:stop]),
        )

    def as_dict(self) -> dict[str, tuple[Tensor, Tensor]]:
        """torchmeta's format: ``{"train": support, "test": query}``."""
        return {"train": self.support, "test": self.query}


def as_task_batch(batch: Any) -> TaskBatch:
    """Accept a :class:`TaskBatch` or a torchmeta-style dict ``{"train": (x, y), "test": (x, y)}``.

    Raises:
        TypeError: for anything else, naming what was given and what is accepted.
        ValueError: when the four tensors disagree on the number of tasks.
    """
    if isinstance(batch, TaskBatch):
        out = batch
    elif isinstance(batch, dict) and "train" in batch and "test" in batch:
        out = TaskBatch(support=tuple(batch["train"]), query=tuple(batch["test"]))  # type: ignore[arg-type]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in batch
    ):
        out = TaskBatch(support=tuple(batch[0]), query=tuple(batch[1]))  # type: ignore[arg-type]
    else:
        raise TypeError(
            "batch must be a metaopt.tasks.TaskBatch or a torchmeta-style dict "
            f"{{'train': (x, y), 'test': (x, y)}}, got {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
        )
    for name, pair in (("support", out.support), ("query", out.query)):
        if len(pair) != 2 or not all(isinstance(t, Tensor) for t in pair):
            raise TypeError(f"batch {name} must be a pair of tensors (inputs, targets)")
    sizes = {
        "support inputs": out.support[0].shape[0] if out.support[0].dim() else None,
        "support targets": out.support[1].shape[0] if out.support[1].dim() else None,
        "query inputs": out.query[0].shape[0] if out.query[0].dim() else None,
        "query targets": out.query[1].shape[0] if out.query[1].dim() else None,
    }
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            "all four batch tensors must share the leading task dimension, got "
            + ", ".join(f"{k} {v}" for k, v in sizes.items())
        )
    for name, (x, y) in (("support", out.support), ("query", out.query)):
        if x.dim() < 2 or y.dim() < 2 or x.shape[1] != y.shape[1]:
            raise ValueError(
                f"{name} inputs {tuple(x.shape)} and targets {tuple(y.shape)} must be "
                "(tasks, examples, ...) with the same number of examples"
            )
    return out
