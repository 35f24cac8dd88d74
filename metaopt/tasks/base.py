"""The batch format shared by every task distribution and the MAML engine, and the task
protocol: what a distribution registered with :func:`metaopt.tasks.register` provides."""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Protocol

import torch
import torch.nn.functional as F
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


# ============================================================================ the task protocol


class TaskDistribution(Protocol):
    """What the trainer needs from a task distribution registered with
    :func:`metaopt.tasks.register` (so that ``task.name: mytask`` works from a config).

    Required:
        ``sample(num_tasks, generator) -> TaskBatch``: a meta-batch; the generator is the
        only source of randomness.

    Optional (each has a default, see the functions below):
        ``models`` (class attribute): names of the models that fit these tasks, the first
            being the default for ``model.name: auto`` (default ``("mlp",)``).
        ``model_args() -> dict``: the data-dependent model arguments, e.g.
            ``{"in_features": 1, "out_features": 1}`` (default ``{}``).
        ``loss(output, target) -> Tensor``: the task loss (default :func:`default_loss`).
        ``eval_set(n, seed, device=...) -> TaskBatch``: a fixed evaluation set (default:
            ``sample`` from a generator seeded with ``seed``).
        ``generator_device``: the device of the generator ``sample`` wants (default CPU).

    A factory that takes a ``split`` argument is built once per split ("train", "val",
    "test"); one that does not serves held-out tasks from fixed seeds of the same
    distribution. The constructor's own arguments come from the config's ``task`` section.
    """

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch: ...


def default_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error for floating targets, cross-entropy for class indices.

    Example:
        >>> import torch
        >>> float(default_loss(torch.zeros(2, 1), torch.ones(2, 1)))
        1.0
    """
    if torch.is_floating_point(target):
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def task_loss(source: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """``source.loss`` when the distribution defines one, else :func:`default_loss`."""
    loss = getattr(source, "loss", None)
    return loss if callable(loss) else default_loss


def default_models(factory: Any) -> tuple[str, ...]:
    """The model names a task factory (class) declares, default first (``("mlp",)`` if none)."""
    return tuple(getattr(factory, "models", ("mlp",)))


def model_args(source: Any) -> dict[str, Any]:
    """The data-dependent model arguments of a task distribution (``{}`` if it names none)."""
    fn = getattr(source, "model_args", None)
    return dict(fn()) if callable(fn) else {}


def generator_device(source: Any) -> torch.device:
    """The device of the ``torch.Generator`` that ``source.sample`` wants (CPU by default)."""
    return torch.device(getattr(source, "generator_device", "cpu"))


def eval_batches(source: Any, n: int, chunk: int, seed: int, device: torch.device | str) -> Iterator[TaskBatch]:
    """``n`` held-out tasks in chunks of ``chunk`` from ``seed``: the same tasks at every call.

    Uses ``source.eval_set(n, seed, device=device)`` when the distribution has a fixed
    evaluation set, else samples from a generator seeded with ``seed``.

    Example:
        >>> from metaopt.tasks import Sinusoid
        >>> [b.num_tasks for b in eval_batches(Sinusoid(), 5, 2, seed=0, device="cpu")]
        [2, 2, 1]
    """
    if hasattr(source, "eval_set"):
        full = source.eval_set(n, seed, device=device)
        for i in range(0, n, chunk):
            yield full.split(i, min(n, i + chunk))
        return
    g = torch.Generator(device=generator_device(source)).manual_seed(seed)
    done = 0
    while done < n:
        k = min(chunk, n - done)
        yield source.sample(k, g).to(device)
        done += k
