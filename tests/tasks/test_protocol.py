"""The task protocol: a distribution registered with ``metaopt.tasks.register`` trains from a
config (``task.name: mytask`` with its own keys), with its model arguments, loss, splits and
fixed held-out tasks; and a missing Omniglot folder says how to set it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from metaopt import tasks
from metaopt.build import build_tasks
from metaopt.config import ConfigError, resolve
from metaopt.tasks import TaskBatch, eval_batches
from metaopt.train import Trainer

QUICK = {"train": {"iterations": 3, "meta_batch_size": 4, "eval_every": 0, "test_tasks": 6, "eval_batch_size": 4,
                   "progress": False, "plots": False, "tensorboard": False, "device": "cpu"}}


class LinearTasks:
    """y = x @ w for a random w per task; ``dim`` inputs. Records the splits it was built for."""

    built: list[str] = []

    def __init__(self, dim: int = 2, shots: int = 5, split: str = "train", device: Any = "cpu") -> None:
        self.dim, self.shots, self.device = dim, shots, torch.device(device)
        LinearTasks.built.append(split)

    def model_args(self) -> dict[str, Any]:
        return {"in_features": self.dim, "out_features": 1}

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(out, y)

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        w = torch.randn(n, self.dim, 1, generator=generator)  # (tasks, dim, 1)
        xs = torch.randn(n, self.shots, self.dim, generator=generator)
        xq = torch.randn(n, self.shots, self.dim, generator=generator)
        return TaskBatch((xs, xs @ w), (xq, xq @ w)).to(self.device)


@pytest.fixture
def linear() -> Any:
    LinearTasks.built = []
    tasks.register("linear", LinearTasks)
    yield LinearTasks
    tasks.unregister("linear")


def test_a_registered_task_trains_from_a_config(linear: Any) -> None:
    cfg = {**QUICK, "task": {"name": "linear", "dim": 3, "shots": 4}, "model": {"hidden_sizes": [8]}}
    t = Trainer(cfg)
    assert t.model.net[0].in_features == 3  # model_args reached the model
    assert t.maml.loss_fn == t.train_tasks.loss  # the task's loss, not the default MSE
    res = t.fit()
    assert res["metric"] == "mse" and res["tasks"] == 6 and res["iteration"] == 3
    assert linear.built == ["train", "test"]  # one distribution per split
    # Held-out tasks come from a fixed seed: the same numbers at every evaluation.
    assert t.evaluate("test").values == t.evaluate("test").values


def test_task_keys_are_checked_against_the_constructor(linear: Any) -> None:
    with pytest.raises(ConfigError, match=r"'task.depth' is not used by task 'linear'.*its keys: dim, shots"):
        resolve({"task": {"name": "linear", "depth": 3}})
    with pytest.raises(ConfigError, match="'task.ways' is not used by task 'linear'"):
        resolve({"task": {"name": "linear", "ways": 5}})
    cfg = resolve({"task": {"name": "linear", "root": "/data"}})  # a data folder it may ignore
    assert cfg["model"]["name"] == "mlp"  # no `models` attribute: the MLP
    with pytest.raises(ConfigError, match="task.name should be one of linear, omniglot, sinusoid .* but is: .nope."):
        resolve({"task": {"name": "nope"}})


def test_eval_batches_sample_from_a_fixed_seed(linear: Any) -> None:
    src = LinearTasks(dim=2)
    a, b = list(eval_batches(src, 5, 2, 11, "cpu")), list(eval_batches(src, 5, 2, 11, "cpu"))
    assert [x.num_tasks for x in a] == [2, 2, 1]
    assert all(torch.equal(x.query[1], y.query[1]) for x, y in zip(a, b))
    g = torch.Generator().manual_seed(11)
    assert torch.equal(a[0].support[0], src.sample(2, g).support[0])


def test_missing_omniglot_says_how_to_set_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METAOPT_OMNIGLOT", raising=False)
    monkeypatch.setenv("METAOPT_CACHE", str(tmp_path))
    cfg = resolve({"task": {"name": "omniglot", "ways": 5, "shots": 1, "queries": 1}})
    with pytest.raises(ConfigError) as info:
        build_tasks(cfg, "train", torch.device("cpu"))
    msg = str(info.value)
    assert "task.root" in msg and "METAOPT_OMNIGLOT" in msg and "shared" not in msg and "\n" not in msg


def test_a_data_folder_is_ignored_by_tasks_without_data(linear: Any) -> None:
    cfg = resolve({**QUICK, "task": {"name": "linear", "root": "/nowhere"}})
    assert isinstance(build_tasks(cfg, "train", torch.device("cpu")), LinearTasks)
