"""Task distributions for meta-learning: sinusoid regression and Omniglot episodes.

Example:
    >>> import torch, metaopt.tasks as tasks
    >>> batch = tasks.get("sinusoid", shots=10, queries=10).sample(4, torch.Generator().manual_seed(0))
    >>> batch.support[0].shape
    torch.Size([4, 10, 1])
"""

from metaopt.tasks.base import TaskBatch, TaskDistribution, as_task_batch, default_loss, eval_batches
from metaopt.tasks.omniglot import ChecksumError, Omniglot, default_cache_dir, load_split
from metaopt.tasks.registry import factory, get, names, register, unregister
from metaopt.tasks.sinusoid import Sinusoid, SinusoidParams

__all__ = [
    "TaskBatch",
    "TaskDistribution",
    "as_task_batch",
    "default_loss",
    "eval_batches",
    "Sinusoid",
    "SinusoidParams",
    "Omniglot",
    "ChecksumError",
    "load_split",
    "default_cache_dir",
    "factory",
    "get",
    "names",
    "register",
    "unregister",
]
