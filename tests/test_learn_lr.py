"""``inner.learn_lr`` in configs: one meta-learned scalar, per-layer or per-element inner
learning rates for every registry optimizer whose lr can be a dict; their meta-gradient
against finite differences (float64); exact resume; the study's learned-lr rows."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import metaopt
from metaopt import config
from metaopt.build import build_inner, build_maml, build_model
from metaopt.checks import ConfigError
from metaopt.optim import Adafactor
from metaopt.study import load_study
from metaopt.tasks import Sinusoid, TaskBatch

from test_train import TINY, _assert_same_state, _rows

T = importlib.import_module("metaopt.train")
REPO = Path(__file__).resolve().parents[1]
SMALL = {"model": {"hidden_sizes": [8]}, "inner": {"steps": 2}}


def _cfg(**inner: Any) -> config.Config:
    return config.resolve(config.merge(SMALL, {"inner": inner}))


def _batch(dtype: torch.dtype = torch.float32, tasks: int = 3) -> TaskBatch:
    b = Sinusoid(shots=5, queries=5).sample(tasks, generator=torch.Generator().manual_seed(0))
    return TaskBatch(support=(b.support[0].to(dtype), b.support[1].to(dtype)),
                     query=(b.query[0].to(dtype), b.query[1].to(dtype)))


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("given, resolved", [(False, False), (True, "scalar"), ("scalar", "scalar"),
                                             ("per_layer", "per_layer"), ("per_element", "per_element")])
def test_learn_lr_values_resolve_to_one_spelling(given: Any, resolved: Any) -> None:
    """``true`` (old configs and checkpoints) is ``scalar``: one spelling per meaning, so
    a run directory written either way is reused by compare/study."""
    assert _cfg(learn_lr=given)["inner"]["learn_lr"] == resolved
    assert config.load(None, [f"inner.learn_lr={str(given).lower()}"])["inner"]["learn_lr"] == resolved


@pytest.mark.parametrize("bad", ["layer", "Per_Layer", "true", 1, 0, 0.5, [], None])
def test_a_bad_learn_lr_is_a_one_line_error_naming_it_and_the_allowed_values(bad: Any) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(learn_lr=bad)
    msg = str(e.value)
    assert "\n" not in msg and "inner.learn_lr" in msg and repr(bad) in msg
    if bad is not None:
        assert "false, true, scalar, per_layer, per_element" in msg


@pytest.mark.parametrize("mode", ["scalar", "per_layer", "per_element"])
def test_learned_rates_need_an_explicit_lr_to_start_from(mode: str) -> None:
    """transformers' relative step (lr: null) has no rate to learn: refused when resolving,
    and by build_inner on an unchecked mapping."""
    with pytest.raises(ConfigError, match="needs an explicit inner.lr"):
        _cfg(name="adafactor_transformers", lr=None, learn_lr=mode)
    raw = {"inner": {"name": "adafactor_transformers", "lr": None, "learn_lr": mode}}
    with pytest.raises(ConfigError, match="needs an explicit inner.lr"):
        build_inner(raw, build_model(_cfg()))


@pytest.mark.parametrize("mode", ["per_layer", "per_element"])
def test_per_layer_rates_need_the_model(mode: str) -> None:
    with pytest.raises(ConfigError, match=f"inner.learn_lr: {mode} needs the model"):
        build_inner(_cfg(learn_lr=mode))
    assert isinstance(build_inner(_cfg(learn_lr="scalar")).lr, torch.nn.Parameter)  # no model needed


def test_adafactor_refuses_per_element_rates_naming_the_key_and_shape() -> None:
    """Refused when the config is resolved (before a comparison trains anything), and by the
    optimizer itself for an unchecked mapping."""
    with pytest.raises(ConfigError, match=r"inner.learn_lr: per_element does not fit inner optimizer 'adafactor': "
                                          r".*one rate per tensor: lr\['weight'\] .* shape \(2, 3\)"):
        _cfg(name="adafactor", lr=0.01, learn_lr="per_element")
    raw = config.merge(_cfg(name="adafactor", lr=0.01), {"inner": {"learn_lr": "per_element"}})
    with pytest.raises(ConfigError, match=r"one rate per tensor: lr\['net.0.weight'\] .* shape \(8, 1\)"):
        build_inner(raw, build_model(raw))


# ----------------------------------------------------------------------------- every optimizer

# Registry optimizers whose lr can be a dict (the study's kwargs for transformers' rule).
HF = {"relative_step": False, "warmup_init": False}
OPTIMIZERS = {
    "sgd": {},
    "sgd_momentum": {"name": "sgd", "momentum": 0.9},
    "adam": {},
    "rmsprop": {},
    "lion": {},
    "adafactor": {},
    "adafactor_hf_unscaled": {"name": "adafactor_transformers", **HF, "scale_parameter": False},
    "adafactor_hf_scaled": {"name": "adafactor_transformers", **HF, "scale_parameter": True,
                            "beta1": 0.9, "weight_decay": 0.1},
}


def _inner(label: str, **more: Any) -> dict[str, Any]:
    """The ``inner`` section of an OPTIMIZERS row (its ``name`` defaults to the label)."""
    return {"name": label, **OPTIMIZERS[label], **more}


CASES = [(label, mode) for label in OPTIMIZERS for mode in ("per_layer", "per_element")
         if not (mode == "per_element" and label.startswith("adafactor"))]


@pytest.mark.parametrize("label, mode", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_learned_rates_drive_every_optimizer(label: str, mode: str) -> None:
    """Rates keyed and shaped like the parameters, registered with MAML (so the outer
    optimizer trains them); at their initial value the meta-loss is the fixed-lr one, at
    zero it is the un-adapted query loss (each rate really scales its layer's step), and
    every rate gets a finite, non-zero meta-gradient."""
    inner = _inner(label, lr=0.03)
    cfg = _cfg(**inner, learn_lr=mode)
    model = build_model(cfg)
    maml = build_maml(cfg, model, F.mse_loss)
    rates = dict(maml.inner_hparams.named_parameters())
    params = dict(model.named_parameters())
    assert len(rates) == len(params)
    for name, p in params.items():
        rate = rates["lr/" + name.replace(".", "-")]
        assert rate.shape == (() if mode == "per_layer" else p.shape) and bool((rate == 0.03).all())
    ids = {id(p) for p in maml.parameters()}
    assert all(id(r) in ids for r in rates.values())

    batch = _batch()
    fixed = build_maml(_cfg(**inner), model, F.mse_loss).meta_loss(batch).loss
    learned = maml.meta_loss(batch).loss
    torch.testing.assert_close(learned, fixed, rtol=1e-6, atol=0)
    learned.backward()
    for k, r in rates.items():
        assert r.grad is not None and torch.isfinite(r.grad).all() and float(r.grad.abs().sum()) > 0, k
    with torch.no_grad():
        for r in rates.values():
            r.zero_()
    unadapted = F.mse_loss(torch.func.vmap(model)(batch.query[0]), batch.query[1])
    torch.testing.assert_close(maml.meta_loss(batch).loss, unadapted, rtol=1e-6, atol=0)


def test_adafactor_per_tensor_rates_equal_one_optimizer_per_rate() -> None:
    """A dict lr steps each param as Adafactor with that param's rate would (fused step and
    the chain that specifies it; both rules, with weight decay and beta1)."""
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    params = {"w": torch.randn(4, 3, generator=g, dtype=dt), "b": torch.randn(3, generator=g, dtype=dt),
              "s": torch.randn((), generator=g, dtype=dt)}
    rates = {"w": 0.03, "b": 0.2, "s": 0.007}
    makers = [lambda lr: Adafactor(lr=lr, weight_decay=0.1, beta1=0.9),
              lambda lr: Adafactor.from_transformers(lr=lr, relative_step=False, scale_parameter=False),
              lambda lr: Adafactor.from_transformers(lr=lr, relative_step=False, weight_decay=0.1, beta1=0.9)]
    grads = [{k: torch.randn(v.shape, generator=g, dtype=dt) for k, v in params.items()} for _ in range(3)]
    for make in makers:
        for chain in (False, True):
            def build(lr: Any) -> Any:
                opt = make(lr)
                return opt.as_chain() if chain else opt

            opt = build({k: torch.tensor(v, dtype=dt) for k, v in rates.items()})
            p, s = params, opt.init(params)
            for gr in grads:
                p, s = opt.step(p, gr, s)
            for k, r in rates.items():
                ref = build(r)
                q, t = params, ref.init(params)
                for gr in grads:
                    q, t = ref.step(q, gr, t)
                assert p[k].shape == params[k].shape
                torch.testing.assert_close(p[k], q[k], rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- meta-gradient


@pytest.mark.parametrize("label", ["sgd", "adam", "adafactor_hf_unscaled"])
def test_meta_gradient_of_per_layer_rates_matches_finite_differences(label: str) -> None:
    """float64: metaopt.verify (random directions over weights and rates), then each rate's
    own partial derivative against a central difference (the rates are a few numbers among
    hundreds of weights, so a direction barely moves them)."""
    cfg = _cfg(**_inner(label, lr=0.05, learn_lr="per_layer"))
    model = build_model(cfg)
    maml = build_maml(cfg, model, F.mse_loss).double()
    batch = _batch(torch.float64, tasks=2)
    report = metaopt.verify(maml, batch)
    assert report.ok and report.fd_error < 1e-6, str(report)

    rates = list(maml.inner_hparams.parameters())
    grads = torch.autograd.grad(maml.meta_loss(batch).loss, rates)
    eps = 1e-6
    for r, g in zip(rates, grads):
        with torch.no_grad():
            r += eps
            up = float(maml.meta_loss(batch).loss)
            r -= 2 * eps
            down = float(maml.meta_loss(batch).loss)
            r += eps
        fd = (up - down) / (2 * eps)
        assert abs(float(g) - fd) <= 1e-6 * max(abs(fd), 1e-3), (float(g), fd)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("sets", [
    ["inner.name=adafactor_transformers", "inner.relative_step=false", "inner.warmup_init=false",
     "inner.scale_parameter=false", "inner.lr=0.03", "inner.learn_lr=per_layer"],
    ["inner.name=sgd", "inner.lr=0.05", "inner.learn_lr=per_element"],
    ["inner.name=adam", "inner.lr=0.001", "inner.learn_lr=per_layer", "outer.hparams_lr=1e-4"],
], ids=["per_layer-adafactor_hf", "per_element-sgd", "per_layer-adam-hparams_lr"])
def test_resume_round_trips_the_learned_rates(tmp_path: Path, sets: list[str]) -> None:
    """Train 10 iterations, checkpoint, resume to 20: equal to 20 uninterrupted, the learned
    rates included (and they did move from their initial value)."""
    sets = TINY + ["model.hidden_sizes=[8]"] + sets
    T.Trainer(None, tmp_path / "full", overrides=sets + ["train.iterations=20"]).fit()
    T.Trainer(None, tmp_path / "part", overrides=sets + ["train.iterations=10"]).fit()
    assert T.resume(tmp_path / "part", overrides=["train.iterations=20"])["iteration"] == 20
    assert _rows(tmp_path / "full") == _rows(tmp_path / "part")
    _assert_same_state(tmp_path / "full", tmp_path / "part")
    state = T.load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    rates = {k: v for k, v in state["inner_hparams"].items() if k.startswith("inner_hparams.lr/")}
    assert len(rates) == 4  # net.{0,2}.{weight,bias}
    init = float(next(s for s in sets if s.startswith("inner.lr=")).split("=")[1])
    assert any(not torch.allclose(v, torch.full_like(v, init)) for v in rates.values())


# ----------------------------------------------------------------------------- outer.hparams_lr


def _one_outer_step(tmp_path: Path, sets: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """The model's weights and the learned rates before and after one meta-iteration."""
    tr = T.Trainer(None, tmp_path, overrides=TINY + ["model.hidden_sizes=[8]", "train.iterations=1",
                                                     "train.eval_every=0"] + sets)
    before = {k: v.detach().clone() for k, v in tr.maml.named_parameters()}
    tr.fit()
    after = {k: v.detach().clone() for k, v in tr.maml.named_parameters()}
    return before, after, tr


def test_hparams_lr_gives_the_learned_rates_their_own_outer_lr(tmp_path: Path) -> None:
    """With outer.hparams_lr the rates are a second group: Adam's first step moves each one
    by lr * g / (|g| + eps), i.e. by hparams_lr where its meta-gradient is not tiny, and the
    weights by outer.lr. Without it: one group, every parameter at outer.lr (as before)."""
    sets = ["inner.name=adam", "inner.lr=0.001", "inner.learn_lr=per_layer", "outer.lr=0.001"]
    before, after, tr = _one_outer_step(tmp_path / "split", sets + ["outer.hparams_lr=1e-5"])
    assert [g["lr"] for g in tr.outer.param_groups] == [1e-3, 1e-5]
    rates = [k for k in before if k.startswith("inner_hparams.")]
    weights = [k for k in before if k.startswith("model.")]
    assert len(rates) == 4 and len(weights) == 4
    assert [id(p) for p in tr.outer.param_groups[1]["params"]] == [id(tr.maml.get_parameter(k)) for k in rates]
    for keys, lr in ((rates, 1e-5), (weights, 1e-3)):
        moved = torch.cat([(after[k] - before[k]).abs().flatten() for k in keys])
        assert float(moved.max()) <= lr * (1 + 1e-5)
        assert float(moved.max()) == pytest.approx(lr, rel=1e-3)
    before, after, tr = _one_outer_step(tmp_path / "one", sets)
    assert len(tr.outer.param_groups) == 1 and tr.outer.param_groups[0]["lr"] == 1e-3
    moved = torch.cat([(after[k] - before[k]).abs().flatten() for k in rates])
    assert float(moved.max()) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("sets, match", [
    (["outer.hparams_lr=1e-5"], r"outer.hparams_lr' is 1e-05 but the inner optimizer meta-learns nothing"),
    (["outer.hparams_lr=-1"], r"outer.hparams_lr"),
    (["outer.name=adafactor", "outer.impl=transformers", "outer.lr=null", "outer.hparams_lr=1e-5",
      "inner.learn_lr=true"], r"outer.hparams_lr' needs an outer lr"),
], ids=["nothing-learned", "negative", "relative-step-outer"])
def test_a_bad_hparams_lr_is_a_one_line_error_naming_it(tmp_path: Path, sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        T.Trainer(None, tmp_path, overrides=TINY + ["train.iterations=1"] + sets)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- study rows


def test_study_learned_lr_rows_are_their_twins_plus_per_layer_rates() -> None:
    study = load_study(REPO / "configs" / "study" / "sinusoid_10shot.yaml")
    rows = {o.label: o for o in study.optimizers}
    for label in ("sgd", "adam", "adafactor_hf_unscaled"):
        twin, learned = rows[label], rows[f"{label}_per_layer_lr"]
        assert learned.entry() == {**twin.entry(), "learn_lr": "per_layer"}
        assert learned.tune == twin.tune  # the INITIAL lr is tuned over the twin's grid
        cfg = config.resolve({"inner": {**learned.entry(), "lr": learned.tune["inner.lr"][0]}})
        maml = build_maml(cfg, build_model(cfg), F.mse_loss)
        assert len(maml.inner_hparams) == len(list(maml.model.parameters()))
