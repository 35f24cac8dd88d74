"""LearnedAdafactor: meta-gradients against finite differences (float64), vmap against the
loop, the update against rules written out by hand, O(n+m) counts, checkpoints, bad input,
and a smoke run of experiments/moonshot.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaopt
from metaopt.maml import MAML
from metaopt.models import MLP
from metaopt.optim import SGD, AdafactorState, LearnedAdafactor
from metaopt.optim.learned import MetaSGD
from metaopt.tasks.base import TaskBatch

REPO = Path(__file__).resolve().parents[2]


def _batch(tasks: int = 3, shots: int = 6, dim: int = 3, out: int = 2, dtype=torch.float64) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return TaskBatch(support=(r(tasks, shots, dim), r(tasks, shots, out)), query=(r(tasks, shots, dim), r(tasks, shots, out)))


def _smooth_model() -> nn.Module:
    torch.manual_seed(0)  # tanh: no kinks, so central differences are exact to O(eps^2)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _randomise(opt: LearnedAdafactor, seed: int = 1) -> None:
    """Move every learned factor away from its (uniform) init, so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in (opt.log_row, opt.log_col, opt.log_v):
            for t in d.values():
                t.add_(0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype))


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no-clip", "update-clip"])
def test_meta_gradient_of_factors_and_beta2_matches_central_differences(clip) -> None:
    model = _smooth_model()
    inner = LearnedAdafactor.from_model(model, lr=0.3, beta2=0.8, learn_beta2=True, clip_threshold=clip)
    _randomise(inner)
    maml = MAML(model, inner, inner_steps=3, loss_fn=F.mse_loss, vectorize=False)
    batch = _batch()
    meta = dict(maml.inner_hparams.named_parameters())
    assert any("log_row" in k for k in meta) and any("log_col" in k for k in meta) and any("beta2" in k for k in meta)
    grads = torch.autograd.grad(maml.meta_loss(batch).loss, list(meta.values()))
    checked = 0
    for (name, p), g in zip(meta.items(), grads):
        for i in range(min(p.numel(), 3)):  # a few coordinates of every learned tensor
            flat = p.data.view(-1)
            old = float(flat[i])
            values = []
            for sign in (1.0, -1.0):
                flat[i] = old + sign * 1e-6
                with torch.no_grad():
                    values.append(float(maml.meta_loss(batch).loss))
            flat[i] = old
            fd = (values[0] - values[1]) / 2e-6
            assert abs(float(g.view(-1)[i]) - fd) <= 1e-7 + 1e-6 * abs(fd), (name, i, float(g.view(-1)[i]), fd)
            checked += 1
    assert checked >= 10
    # The learned initial state is not overwritten: its meta-gradient is far from zero.
    assert max(float(g.abs().max()) for g in grads) > 1e-3


def test_verify_passes_on_the_sinusoid_mlp() -> None:
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    inner = LearnedAdafactor.from_model(model, lr=0.05, beta2=0.9, learn_beta2=True)
    _randomise(inner)
    maml = MAML(model, inner, inner_steps=2, loss_fn=F.mse_loss)
    report = metaopt.verify(maml, _batch(tasks=2, shots=5, dim=1, out=1, dtype=torch.float32))
    assert report.ok, str(report)
    assert report.fd_error < 1e-6 and report.vmap_error is not None and report.vmap_error < 1e-6


def test_vmap_equals_loop() -> None:
    model = _smooth_model()
    inner = LearnedAdafactor.from_model(model, lr=0.2, beta2=0.7, learn_beta2=True, clip_threshold=1.0)
    _randomise(inner)
    batch = _batch(tasks=4)
    out = {}
    for vec in (False, True):
        maml = MAML(model, inner, inner_steps=3, loss_fn=F.mse_loss, vectorize=vec)
        loss = maml.meta_loss(batch).loss
        out[vec] = (loss, torch.autograd.grad(loss, list(maml.parameters())))
    (l0, g0), (l1, g1) = out[False], out[True]
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_beta2_one_is_sgd_preconditioned_by_a_learned_rank_one_matrix() -> None:
    g = torch.Generator().manual_seed(3)
    n, m = 4, 3
    params = {"w": torch.randn(n, m, generator=g, dtype=torch.float64), "b": torch.randn(m, generator=g, dtype=torch.float64)}
    opt = LearnedAdafactor.from_model(params, lr=0.1, beta2=1.0, learn_beta2=False)
    _randomise(opt, seed=4)
    r = torch.exp(opt.log_row["w"].detach()).view(n)  # the learned row and column factors
    c = torch.exp(opt.log_col["w"].detach()).view(m)
    precond_w = 1.0 / torch.sqrt(torch.outer(r, c) / r.mean() + opt.eps)  # (n, m), rank one inside the sqrt
    precond_b = 1.0 / torch.sqrt(torch.exp(opt.log_v["b"].detach()) + opt.eps)
    p, state = dict(params), opt.init(params)
    ref = {k: v.clone() for k, v in params.items()}
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        p, state = opt.step(p, grads, state)
        ref = {"w": ref["w"] - 0.1 * precond_w * grads["w"], "b": ref["b"] - 0.1 * precond_b * grads["b"]}
    for k in params:
        torch.testing.assert_close(p[k].detach(), ref[k], rtol=1e-13, atol=1e-13)
    assert int(state.count) == 3


def test_initial_state_of_ones_with_beta2_one_is_sgd() -> None:
    g = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(5, 2, generator=g), "conv": torch.randn(2, 3, 3, 3, generator=g), "b": torch.randn(5, generator=g)}
    opt = LearnedAdafactor.from_model(params, lr=0.01, init=1.0, beta2=1.0, learn_beta2=False)
    sgd = SGD(lr=0.01)
    p1, s1, p2, s2 = params, opt.init(params), params, sgd.init(params)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        p1, s1 = opt.step(p1, grads, s1)
        p2, s2 = sgd.step(p2, grads, s2)
    for k in params:
        torch.testing.assert_close(p1[k].detach(), p2[k], rtol=1e-6, atol=1e-7)


def test_unfactored_with_beta2_one_is_meta_sgd_with_rates_lr_over_sqrt_v0() -> None:
    g = torch.Generator().manual_seed(8)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g, dtype=torch.float64)}
    opt = LearnedAdafactor.from_model(params, lr=0.05, beta2=1.0, learn_beta2=False, factored=False)
    assert opt.log_row == {} and opt.log_v["w"].shape == (4, 3)
    _randomise(opt, seed=9)
    meta_sgd = MetaSGD({k: 0.05 * torch.exp(-0.5 * v.detach()) for k, v in opt.log_v.items()})
    p1, s1, p2, s2 = params, opt.init(params), params, meta_sgd.init(params)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        p1, s1 = opt.step(p1, grads, s1)
        p2, s2 = meta_sgd.step(p2, grads, s2)
    for k in params:
        torch.testing.assert_close(p1[k].detach(), p2[k], rtol=1e-12, atol=1e-12)


def test_ema_steps_match_the_rule_written_elementwise() -> None:
    """beta2 < 1: the factored recursion against loops over rows and columns."""
    g = torch.Generator().manual_seed(6)
    n, m, lr, beta2 = 3, 4, 0.05, 0.6
    w0 = torch.randn(n, m, generator=g, dtype=torch.float64)
    opt = LearnedAdafactor.from_model({"w": w0}, lr=lr, beta2=beta2, learn_beta2=False, clip_threshold=0.7)
    _randomise(opt, seed=7)
    R = [math.exp(float(opt.log_row["w"].detach()[i, 0])) for i in range(n)]
    C = [math.exp(float(opt.log_col["w"].detach()[0, j])) for j in range(m)]
    w = [[float(w0[i, j]) for j in range(m)] for i in range(n)]
    p, state = {"w": w0}, opt.init({"w": w0})
    for _ in range(3):
        grad = torch.randn(n, m, generator=g, dtype=torch.float64)
        p, state = opt.step(p, {"w": grad}, state)
        G = grad.tolist()
        R = [beta2 * R[i] + (1 - beta2) * sum(G[i][j] ** 2 for j in range(m)) / m for i in range(n)]
        C = [beta2 * C[j] + (1 - beta2) * sum(G[i][j] ** 2 for i in range(n)) / n for j in range(m)]
        mean_r = sum(R) / n
        U = [[G[i][j] / math.sqrt(R[i] * C[j] / mean_r + opt.eps) for j in range(m)] for i in range(n)]
        rms = math.sqrt(sum(u * u for row in U for u in row) / (n * m))
        scale = 1.0 / max(1.0, rms / 0.7)
        w = [[w[i][j] - lr * scale * U[i][j] for j in range(m)] for i in range(n)]
    torch.testing.assert_close(p["w"].detach(), torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.row["w"].detach().view(n), torch.tensor(R, dtype=torch.float64), rtol=1e-12, atol=0)


def test_learned_beta2_is_a_sigmoid_and_unfactored_params_follow_their_ema() -> None:
    opt = LearnedAdafactor({}, {}, {"b": torch.zeros(2, dtype=torch.float64)}, lr=1.0, beta2=0.75, learn_beta2=True)
    assert opt.beta2_logit is not None
    torch.testing.assert_close(torch.sigmoid(opt.beta2_logit).detach(), torch.tensor(0.75, dtype=torch.float64))
    p = {"b": torch.zeros(2, dtype=torch.float64)}
    grad = torch.tensor([2.0, 0.0], dtype=torch.float64)
    p, s = opt.step(p, {"b": grad}, opt.init(p))
    v = 0.75 * 1.0 + 0.25 * grad.square()
    torch.testing.assert_close(s.variance["b"].detach(), v)
    torch.testing.assert_close(p["b"].detach(), -grad / torch.sqrt(v + opt.eps))


def test_counts_are_n_plus_m_per_matrix() -> None:
    n, m = 64, 32
    params = {"w": torch.zeros(n, m), "b": torch.zeros(m), "conv": torch.zeros(8, 4, 3, 3), "s": torch.zeros(())}
    opt = LearnedAdafactor.from_model(params, learn_beta2=False)
    state = opt.init(params)
    assert isinstance(state, AdafactorState) and state.exp_avg == {}
    assert state.row["w"].shape == (n, 1) and state.col["w"].shape == (1, m)
    assert state.row["conv"].shape == (8, 4, 3, 1) and state.col["conv"].shape == (8, 4, 1, 3)  # torch's rule
    assert state.variance["b"].shape == (m,) and state.variance["s"].shape == ()
    assert opt.num_meta_parameters() == (n + m) + m + 8 * 4 * (3 + 3) + 1
    optax_rule = LearnedAdafactor.from_model(params, learn_beta2=False, min_dim_size_to_factor=4)
    s2 = optax_rule.init(params)
    assert s2.row["conv"].shape == (8, 1, 3, 3) and s2.col["conv"].shape == (1, 4, 3, 3)  # the two largest dims
    # The sinusoid MLP: 243 factors (+ beta2) against Meta-SGD's 1761 rates.
    model = MLP(1, (40, 40), 1)
    learned = MAML(model, LearnedAdafactor.from_model(model), loss_fn=F.mse_loss)
    meta_sgd = MAML(model, MetaSGD.from_model(model), loss_fn=F.mse_loss)
    assert sum(p.numel() for p in learned.inner_hparams.values()) == 244
    assert sum(p.numel() for p in meta_sgd.inner_hparams.values()) == sum(p.numel() for p in model.parameters()) == 1761
    assert LearnedAdafactor.from_model(model, factored=False, learn_beta2=False).num_meta_parameters() == 1761


def test_maml_registers_the_factors_and_state_dict_round_trips() -> None:
    model = _smooth_model()
    inner = LearnedAdafactor.from_model(model, beta2=0.9, learn_beta2=True)
    maml = MAML(model, inner, inner_steps=2, loss_fn=F.mse_loss)
    ids = {id(p) for p in maml.parameters()}
    held = [*inner.log_row.values(), *inner.log_col.values(), *inner.log_v.values(), inner.beta2_logit]
    assert all(id(p) in ids for p in held)
    # A few outer steps move the factors, which the checkpoint must carry.
    outer = torch.optim.Adam(maml.parameters(), lr=0.05)
    for _ in range(3):
        outer.zero_grad()
        maml.meta_loss(_batch()).loss.backward()
        outer.step()
    assert float(inner.log_col["0.weight"].detach().abs().max()) > 0.01
    saved = maml.state_dict()
    assert any(k.startswith("inner_hparams.") and "log_row" in k for k in saved)
    fresh_model = _smooth_model()
    fresh = MAML(fresh_model, LearnedAdafactor.from_model(fresh_model, beta2=0.9, learn_beta2=True),
                 inner_steps=2, loss_fn=F.mse_loss)
    fresh.load_state_dict(saved)
    with torch.no_grad():
        torch.testing.assert_close(fresh.meta_loss(_batch()).loss, maml.meta_loss(_batch()).loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta2": 0.0}, r"beta2 should be in \(0, 1\] but is: 0.0"),
        ({"beta2": 1.5}, r"beta2 should be in \(0, 1\] but is: 1.5"),
        ({"beta2": 1.0, "learn_beta2": True}, r"beta2 should be in \(0, 1\) with learn_beta2=True"),
        ({"lr": -1.0}, "Learning rate should be >= 0 but is: -1.0"),
        ({"eps": -1e-8}, "eps should be a float >= 0 but is: -1e-08"),
        ({"clip_threshold": 0.0}, "clip_threshold should be None or a float > 0 but is: 0.0"),
        ({"init": 0.0}, r"init \(the initial second moment\) should be a float > 0 but is: 0.0"),
        ({"min_dim_size_to_factor": 0}, "min_dim_size_to_factor should be None or an int >= 1 but is: 0"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LearnedAdafactor.from_model({"w": torch.zeros(2, 2)}, **kwargs)


def test_factors_that_do_not_fit_the_params_are_named() -> None:
    opt = LearnedAdafactor.from_model({"w": torch.zeros(3, 2)}, learn_beta2=False)
    with pytest.raises(ValueError, match=r"must have shape \(4, 1\) but has \(3, 1\)"):
        opt.init({"w": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="the factors must have the same keys as params"):
        opt.init({"v": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="has no two dims to factor; give it log_v"):
        opt.init({"w": torch.zeros(6)})
    with pytest.raises(ValueError, match="log_row and log_col must have the same keys"):
        LearnedAdafactor({"w": torch.zeros(3, 1)}, {}, {})
    with pytest.raises(ValueError, match="lr must be a float or a 1-element tensor but is a dict"):
        LearnedAdafactor({}, {}, {"b": torch.zeros(2)}, lr={"b": torch.ones(2)})


def test_moonshot_experiment_runs_resumes_and_reports(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("experiments_moonshot", REPO / "experiments" / "moonshot.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--iterations", "2", "--seeds", "2", "--rows", "maml_sgd,meta_sgd,learned_adafactor",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
            *[a for s in ("train.eval_tasks=2", "train.test_tasks=4", "train.meta_batch_size=2", "train.eval_every=1",
                          "inner.eval_steps=1", "train.tensorboard=false", "train.plots=false") for a in ("--set", s)]]
    assert mod.main(args) == 0
    data = json.loads((tmp_path / "res/summary.json").read_text())
    assert [r["inner"] for r in data["rows"]] == ["maml_sgd", "meta_sgd", "learned_adafactor"]
    assert all(r["finite_seeds"] == 2 and r["iterations"] == 2 and r["tasks"] == 4 for r in data["rows"])
    assert [s["meta_parameters"] for s in data["learned"]["learned_adafactor"]] == [244, 244]
    assert {(p["a"], p["b"]) for p in data["paired"]} >= {("learned_adafactor", "meta_sgd")}
    assert [len(data["test_steps_sweep"][r]["1"]) for r in ("maml_sgd", "meta_sgd", "learned_adafactor")] == [2, 2, 2]
    assert all(s["inner_steps"] == 5 and s["tasks"] == 4 for s in data["test_steps_sweep"]["meta_sgd"]["5"])
    md = (tmp_path / "res/summary.md").read_text()
    assert "learned_adafactor − meta_sgd" in md and "1761" in md
    # A rerun reuses every finished run (their results files are left as they were).
    stamp = (tmp_path / "runs/meta_sgd/seed1/results.json").stat().st_mtime_ns
    assert mod.main(args) == 0
    assert (tmp_path / "runs/meta_sgd/seed1/results.json").stat().st_mtime_ns == stamp
    assert mod.main([*args[:4], "--rows", "nope"]) == 2
