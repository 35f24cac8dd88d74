"""transformers' / torch's Adafactor as the meta-optimizer (Python API and configs, exact
resume) and a user's DataLoader of torchmeta-style batches driving the trainer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset
from transformers.optimization import Adafactor as HFAdafactor

from metaopt.config import ConfigError
from metaopt.maml import MAML
from metaopt.models import MLP
from metaopt.optim import SGD
from metaopt.outer import build_outer_optimizer
from metaopt.train import Trainer

QUIET = {"eval_every": 0, "progress": False, "tensorboard": False, "plots": False, "log_every": 5}


def config(outer, iterations=60, **train):
    return {
        "model": {"hidden_sizes": [40, 40]},
        "outer": outer,
        "train": {"iterations": iterations, "meta_batch_size": 10, "test_tasks": 20, "eval_batch_size": 20,
                  **QUIET, **train},
    }


OUTERS = {
    "transformers-relative-step": ({"name": "adafactor", "impl": "transformers", "lr": None}, HFAdafactor,
                                   {"relative_step": True, "scale_parameter": True, "lr": None}),
    "transformers-explicit-lr": ({"name": "adafactor", "impl": "transformers", "lr": 0.01}, HFAdafactor,
                                 {"relative_step": False, "scale_parameter": False, "lr": 0.01}),
    "torch": ({"name": "adafactor", "impl": "torch", "lr": 0.01}, torch.optim.Adafactor, {"lr": 0.01}),
}


@pytest.mark.parametrize("name", sorted(OUTERS))
def test_adafactor_outer_from_config_lowers_meta_loss(name):
    outer, cls, expected = OUTERS[name]
    tr = Trainer(config(outer))
    assert type(tr.outer) is cls
    assert {k: tr.outer.defaults[k] for k in expected} == expected
    before = tr.evaluate("val", tasks=50).mean
    tr.fit()
    after = tr.evaluate("val", tasks=50).mean
    assert after < 0.95 * before, (before, after)


def test_transformers_adafactor_outer_from_python_api():
    """Any torch.optim-style optimizer steps the engine's parameters; here transformers'."""
    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1)
    maml = MAML(model, inner_optimizer=SGD(lr=0.01), loss_fn=F.mse_loss)
    outer = HFAdafactor(maml.parameters(), lr=None, relative_step=True, warmup_init=False)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 20, 1, generator=g) * 10 - 5
    amp, phase = torch.rand(8, 1, 1, generator=g) * 4 + 1, torch.rand(8, 1, 1, generator=g) * 3
    y = amp * torch.sin(x + phase)
    batch = {"train": (x[:, :10], y[:, :10]), "test": (x[:, 10:], y[:, 10:])}
    losses = []
    for _ in range(40):
        outer.zero_grad()
        out = maml.meta_loss(batch)
        out.loss.backward()
        outer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    "outer,match",
    [
        ({"name": "adafactor", "impl": "transformers", "lr": 0.01, "relative_step": True}, "relative"),
        ({"name": "adafactor", "impl": "transformers", "lr": None, "relative_step": False}, "lr"),
        ({"name": "adafactor", "impl": "torch", "lr": None}, "outer.lr"),
        ({"name": "adafactor", "impl": "torch", "scale_parameter": False}, "outer.scale_parameter"),
    ],
)
def test_adafactor_outer_config_errors(outer, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        Trainer(config(outer, iterations=1))


def _equal_states(a, b):
    """Bitwise equality of nested state dicts (tensors with torch.equal, the rest with ==)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_transformers_adafactor_outer_resume_is_exact(tmp_path):
    """A config file with transformers' Adafactor (beta1, relative step): 8 iterations in one
    go equal 4 + a resumed 4, bit for bit (weights, outer state, logged losses, results)."""
    cfg = config({"name": "adafactor", "impl": "transformers", "lr": None, "beta1": 0.9, "weight_decay": 1e-3},
                 iterations=8, checkpoint_every=4, log_every=1, test_tasks=10, eval_batch_size=10)
    path = tmp_path / "hf_outer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full = Trainer(path, tmp_path / "full")
    res_full = full.fit()
    Trainer(path, tmp_path / "split", overrides=["train.iterations=4"]).fit()
    resumed = Trainer(path, tmp_path / "split", overrides=["train.iterations=8"], resume=True)
    assert resumed.iteration == 4 and type(resumed.outer) is HFAdafactor
    res_resumed = resumed.fit()
    assert _equal_states(full.model.state_dict(), resumed.model.state_dict())
    assert _equal_states(full.outer.state_dict(), resumed.outer.state_dict())
    assert full.outer.state_dict()["state"][0]["step"] == 8
    assert [r["meta_loss"] for r in full.history[4:]] == [r["meta_loss"] for r in resumed.history]
    assert res_full["mean"] == res_resumed["mean"]


# ------------------------------------------------------------------ torchmeta-style DataLoader


class SineTasks(Dataset):
    """One sinusoid task per item, ``{"train": (x, y), "test": (x, y)}`` (torchmeta's layout);
    task ``i`` is drawn from a generator seeded with ``seed + i``."""

    def __init__(self, n, seed=0, shots=10):
        self.n, self.seed, self.shots = n, seed, shots

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed + i)
        amp, phase = torch.rand(1, generator=g) * 4.9 + 0.1, torch.rand(1, generator=g) * math.pi
        x = torch.rand(2 * self.shots, 1, generator=g) * 10 - 5
        y = amp * torch.sin(x - phase)
        return {"train": (x[: self.shots], y[: self.shots]), "test": (x[self.shots:], y[self.shots:])}


def loaders(seed=0):
    train = DataLoader(SineTasks(40), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(SineTasks(30, seed=10_000), batch_size=15)
    return train, val


def test_dataloader_of_torchmeta_batches_drives_training():
    train, val = loaders()
    batch = next(iter(train))  # default collate: {"train": [x (10, 10, 1), y], "test": [...]}
    assert batch["train"][0].shape == (10, 10, 1)
    tr = Trainer(config({"name": "adam", "lr": 1e-3}, iterations=40), data=train, val_data=val, test_data=val)
    before = tr.evaluate("val").mean
    res = tr.fit()  # 40 iterations = 10 passes over the 4-batch loader
    assert tr.data_batches == 40 and res["iteration"] == 40
    assert res["metric"] == "mse" and res["tasks"] == 30
    assert res["mean"] < 0.9 * before, (before, res["mean"])


def test_dataloader_with_transformers_outer_resumes_exactly(tmp_path):
    """Resuming skips the batches already consumed: with a seeded shuffling loader
    re-created identically, the resumed run equals the uninterrupted one bit for bit."""
    outer = {"name": "adafactor", "impl": "transformers", "lr": None}
    cfg = config(outer, iterations=6, checkpoint_every=3, log_every=1)
    full = Trainer(cfg, tmp_path / "full", data=loaders()[0])
    full.fit()
    Trainer(cfg, tmp_path / "split", data=loaders()[0], overrides=["train.iterations=3"]).fit()
    resumed = Trainer(cfg, tmp_path / "split", data=loaders()[0], overrides=["train.iterations=6"], resume=True)
    resumed.fit()
    assert _equal_states(full.model.state_dict(), resumed.model.state_dict())
    assert _equal_states(full.outer.state_dict(), resumed.outer.state_dict())


class TinyClassifier(torch.nn.Module):
    def __init__(self, ways=3):
        super().__init__()
        self.fc = torch.nn.Linear(4, ways)

    def forward(self, x):
        return self.fc(x)


class BlobTasks(Dataset):
    """3-way classification of Gaussian blobs with task-specific centres (int64 labels)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        centres = torch.randn(3, 4, generator=g) * 3
        y = torch.arange(3).repeat(4)  # 4 shots per class: 2 support + 2 query
        x = centres[y] + torch.randn(12, 4, generator=g)
        return {"train": (x[:6], y[:6]), "test": (x[6:], y[6:])}


def test_dataloader_classification_with_own_model():
    train = DataLoader(BlobTasks(), batch_size=4)
    torch.manual_seed(0)
    tr = Trainer(config({"name": "adafactor", "impl": "transformers", "lr": None}, iterations=8),
                 data=train, val_data=train, test_data=train, model=TinyClassifier())
    res = tr.fit()
    assert res["metric"] == "accuracy" and res["tasks"] == 16
    assert 0.0 <= res["mean"] <= 1.0
