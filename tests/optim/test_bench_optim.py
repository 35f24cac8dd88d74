"""experiments/bench_optim.py runs on tiny settings, and the torch.compile recipe it times
(``opt.step = torch.compile(opt.step)``) gives second-order MAML the eager meta-gradient."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import metaopt
from metaopt.models import MLP
from metaopt.optim import Adafactor

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_optim", ROOT / "experiments" / "bench_optim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_optim_smoke(capsys):
    _load_bench().main(["--workloads", "S1", "--modes", "loop,vmap", "--repeats", "1", "--tasks", "2"])
    out = capsys.readouterr().out
    assert "[S1 loop] adafactor" in out and "x sgd" in out and "[S1 vmap] adafactor_transformers" in out
    for name in ("adam", "rmsprop", "lion", "nadam", "radam", "adadelta", "adagrad", "adamax", "adamw"):
        assert f"[S1 vmap] {name} " in out


@pytest.mark.parametrize("argv, message", [
    (["--modes", "vamp"], "unknown mode 'vamp'; known: loop, vmap"),
    (["--workloads", "S9"], "unknown workload 'S9'"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--tasks", "0"], "--tasks must be >= 1, got 0"),
])
def test_bench_optim_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        _load_bench().main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_step_gives_the_eager_meta_gradient():
    # AOTAutograd has no double backward, but second-order MAML only backpropagates once
    # through each step (inner grads are taken w.r.t. the step's outputs), so it works;
    # the tensor lr checks that hyperparameter meta-gradients flow through it too.
    torch.manual_seed(0)
    batch = metaopt.tasks.Sinusoid(shots=5, queries=5).sample(2, generator=torch.Generator().manual_seed(0))
    model = MLP(hidden=(8, 8))
    results = []
    for compiled in (False, True):
        lr = torch.nn.Parameter(torch.tensor(0.01))
        opt = Adafactor(lr=lr)
        if compiled:
            opt.step = torch.compile(opt.step, dynamic=False)
        maml = metaopt.MAML(model, inner_optimizer=opt, inner_steps=3, loss_fn=F.mse_loss, vectorize=False)
        loss = maml.meta_loss(batch, before=False).loss
        results.append(torch.autograd.grad(loss, [*model.parameters(), lr]))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-6)
