"""metaopt: functional MAML with differentiable inner optimizers and any torch.optim outer optimizer.

Example:
    >>> import torch, metaopt
    >>> from metaopt.optim import Adafactor
    >>> model = metaopt.models.MLP()
    >>> maml = metaopt.MAML(model, inner_optimizer=Adafactor(lr=1e-2), inner_steps=1,
    ...                     loss_fn=torch.nn.functional.mse_loss)
    >>> outer = torch.optim.Adafactor(maml.parameters(), lr=1e-3)
    >>> batch = metaopt.tasks.Sinusoid(shots=10, queries=10).sample(4, torch.Generator().manual_seed(0))
    >>> out = maml.meta_loss(batch)
    >>> out.loss.backward(); outer.step()
    >>> out.query_loss.shape          # one query loss per task, after adaptation
    torch.Size([4])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metaopt import models, optim, tasks
from metaopt.maml import MAML, MetaLossOutput, default_vectorize
from metaopt.models import MLP, BatchNorm, Conv4
from metaopt.optim import SGD, Adadelta, Adafactor, Adagrad, Adam, Adamax, AdamW, InnerOptimizer, Lion, Muon, NAdam, RAdam, RMSprop
from metaopt.optim.learned import MetaSGD, per_parameter_lr
from metaopt.optim.learned_factors import LearnedAdafactor
from metaopt.tasks import Omniglot, Sinusoid, TaskBatch
from metaopt.types import Buffers, Grads, Params, State
from metaopt.verify import VerifyReport, verify  # the function shadows its module's name

if TYPE_CHECKING:  # the trainer pulls in tqdm/tensorboard/matplotlib: imported on first use
    from metaopt.train import Trainer, load_checkpoint

__version__ = "0.1.0"

_LAZY = {"Trainer": "metaopt.train", "load_checkpoint": "metaopt.train"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metaopt' has no attribute {name!r}")


__all__ = [
    "MAML",
    "MetaLossOutput",
    "default_vectorize",
    "verify",
    "VerifyReport",
    "SGD",
    "Adafactor",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Lion",
    "Muon",
    "MetaSGD",
    "LearnedAdafactor",
    "per_parameter_lr",
    "InnerOptimizer",
    "MLP",
    "Conv4",
    "BatchNorm",
    "TaskBatch",
    "Sinusoid",
    "Omniglot",
    "Trainer",
    "load_checkpoint",
    "Params",
    "Grads",
    "Buffers",
    "State",
    "models",
    "optim",
    "tasks",
    "__version__",
]
