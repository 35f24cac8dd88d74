"""Task distributions for meta-learning: sinusoid regression and Omniglot episodes.

Example:
    >>> import torch, metaopt.tasks as tasks
    >>> batch = tasks.get("sinusoid", shots=10, queries=10).sample(4, torch.Generator().manual_seed(0))
    >>> batch.support[0].shape
    torch.Size([4, 10, 1])
"""

from metaopt.tasks.base import TaskBatch, as_task_batch
from metaopt.tasks.omniglot import ChecksumError, Omniglot, default_cache_dir, load_split
from metaopt.tasks.registry import get, names, register, unregister
from metaopt.tasks.sinusoid import Sinusoid, SinusoidParams

__all__ = [
    "TaskBatch",
    "as_task_batch",
    "Sinusoid",
    "SinusoidParams",
    "Omniglot",
    "ChecksumError",
    "load_split",
    "default_cache_dir",
    "get",
    "names",
    "register",
    "unregister",
]
