"""Learning rates in every form, for every preset: floats, 1-element tensors (validated,
0-d, in the params' dtype), per-parameter dicts (Meta-SGD), schedules ``f(count)`` and
learned per-step rates (MAML++)."""

from __future__ import annotations

import pytest
import torch

from metaopt import optim
from metaopt.optim.learned import PerStep

from optim_helpers import SHAPES, relative_change_error, run_pair

lion_pytorch = pytest.importorskip("lion_pytorch")

NAMES = optim.names()


def _make(name, **kwargs):
    if name == "adafactor_transformers":
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("lr", 0.01)
    if name == "muon":
        kwargs.setdefault("ns_dtype", None)
    return optim.get(name, **kwargs)


def _shapes(name):
    return {k: s for k, s in SHAPES.items() if len(s) == 2} if name == "muon" else SHAPES


@pytest.mark.parametrize("name", NAMES)
def test_multi_element_tensor_lr_rejected(name):
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element$"):
        _make(name, lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("name", NAMES)
def test_one_element_lr_keeps_param_shapes(name):
    opt = _make(name, lr=torch.tensor([0.01]))
    params = {k: torch.randn(s) for k, s in _shapes(name).items()}
    new, _ = opt.step(params, {k: torch.randn(s) for k, s in _shapes(name).items()}, opt.init(params))
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in params.items()}


DECAYING = [("sgd", {}), ("adafactor", {}), ("adamw", {}), ("adam", {}), ("nadam", dict(decoupled_weight_decay=True)),
            ("radam", dict(decoupled_weight_decay=True)), ("lion", {}), ("muon", {}), ("rmsprop", {}), ("adagrad", {})]


@pytest.mark.parametrize("name, extra", DECAYING, ids=[n for n, _ in DECAYING])
def test_float32_tensor_lr_on_float64_params_is_computed_in_float64(name, extra):
    # torch reads a tensor lr as a Python float: the float32 value, then float64 arithmetic.
    lr32 = torch.tensor(0.02, dtype=torch.float32)
    a = _make(name, lr=lr32, weight_decay=0.1, **extra)
    b = _make(name, lr=float(lr32), weight_decay=0.1, **extra)
    p0, pa, pb = run_pair(a, lambda ps: _Replay(b, ps, _shapes(name)), _shapes(name), torch.float64, steps=5)
    assert relative_change_error(p0, pa, pb) < 1e-14


def test_adafactor_one_element_lr_with_weight_decay():
    # Was an IndexError: a (1,) lr made the decay factor (1,) and it was indexed per param.
    kw = dict(weight_decay=0.1)
    p0, a, ref = run_pair(optim.Adafactor(lr=torch.tensor([0.02], dtype=torch.float64), **kw),
                          lambda ps: torch.optim.Adafactor(ps, lr=0.02, **kw), SHAPES, torch.float64, steps=10)
    assert relative_change_error(p0, a, ref) < 1e-12
    assert a["scalar"].shape == ()


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("adafactor")])
def test_per_parameter_dict_lr_equals_separate_runs(name):
    # Every chained preset is per-parameter, so a dict lr {k: r_k} equals running param k
    # alone with lr r_k (Muon: 2-D params only).
    shapes = _shapes(name)
    rates = {k: torch.tensor(0.002 * (i + 1), dtype=torch.float64) for i, k in enumerate(shapes)}
    gen = torch.Generator().manual_seed(3)
    p0 = {k: torch.randn(s, dtype=torch.float64, generator=gen) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, dtype=torch.float64, generator=gen) for k, s in shapes.items()} for _ in range(5)]
    opt = _make(name, lr=rates)
    p, st = p0, opt.init(p0)
    for g in grads:
        p, st = opt.step(p, g, st)
    for k in shapes:
        single = _make(name, lr=float(rates[k]))
        q, sq = {k: p0[k]}, single.init({k: p0[k]})
        for g in grads:
            q, sq = single.step(q, {k: g[k]}, sq)
        torch.testing.assert_close(p[k], q[k], rtol=1e-13, atol=1e-15)


def test_adam_per_parameter_lr_matches_torch_param_groups():
    rates = {k: 0.001 * (i + 1) for i, k in enumerate(SHAPES)}
    ours = optim.Adam(lr={k: torch.tensor(r, dtype=torch.float64) for k, r in rates.items()}, weight_decay=0.1)

    def reference(ps):
        return torch.optim.Adam([{"params": [p], "lr": r} for p, r in zip(ps, rates.values())], weight_decay=0.1)

    p0, a, ref = run_pair(ours, reference, SHAPES, torch.float64)
    assert relative_change_error(p0, a, ref) < 1e-12


def _schedule(count):
    return 0.01 * torch.pow(torch.tensor(0.8, dtype=torch.float64), count)


SCHEDULED = {
    "sgd": (torch.optim.SGD, dict(momentum=0.9, weight_decay=0.1)),
    "adam": (torch.optim.Adam, dict(weight_decay=0.1)),
    "adamw": (torch.optim.AdamW, dict(amsgrad=True)),
    "rmsprop": (torch.optim.RMSprop, dict(centered=True, momentum=0.5)),
    "adagrad": (torch.optim.Adagrad, dict(lr_decay=0.1)),
    "adafactor": (torch.optim.Adafactor, dict(weight_decay=0.1)),
    "adamax": (torch.optim.Adamax, {}),
    "nadam": (torch.optim.NAdam, dict(weight_decay=0.1, decoupled_weight_decay=True)),
    "radam": (torch.optim.RAdam, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "lion": (lion_pytorch.Lion, dict(weight_decay=0.1)),
}


@pytest.mark.parametrize("name", SCHEDULED)
def test_schedule_matches_reference_with_changing_group_lr(name):
    cls, kw = SCHEDULED[name]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch's internal scalars (NAdam) in float64
    try:
        p0, a, ref = run_pair(_make(name, lr=_schedule, **kw), lambda ps: _Scheduled(cls(ps, lr=0.01, **kw)),
                              SHAPES, torch.float64, steps=12)
    finally:
        torch.set_default_dtype(old)
    assert relative_change_error(p0, a, ref) < 1e-12


@pytest.mark.parametrize("name", [n for n in NAMES if n != "adafactor_transformers"])
def test_per_step_rates_equal_a_schedule(name):
    # MAML++ per-layer, per-step rates for any preset: PerStep indexes rates[k][min(t, S-1)].
    shapes = _shapes(name)
    steps = 3
    rates = {k: torch.tensor([0.01, 0.005, 0.002], dtype=torch.float64) * (i + 1) for i, k in enumerate(shapes)}
    table = [{k: float(v[min(t, steps - 1)]) for k, v in rates.items()} for t in range(5)]
    if name == "adafactor":  # scalar rates only: one rate per step for all layers
        rates = {"all": rates[next(iter(shapes))]}
        per_step = PerStep(rates, steps)
        lr_a, lr_b = (lambda c: per_step(c)["all"]), (lambda c: table[int(c)][next(iter(shapes))])
    else:
        lr_a, lr_b = PerStep(rates, steps), (lambda c: table[int(c)])
    p0, a, b = run_pair(_make(name, lr=lr_a), lambda ps: _Replay(_make(name, lr=lr_b), ps, shapes), shapes,
                        torch.float64, steps=5)
    assert relative_change_error(p0, a, b) < 1e-13


def test_schedule_runs_under_vmap_without_host_sync():
    opt = optim.Adam(lr=PerStep({"w": torch.tensor([0.1, 0.01])}, steps=2))

    def two_steps(p, g):
        p, s = opt.step(p, g, opt.init(p))
        return opt.step(p, g, s)[0]

    out = torch.func.vmap(two_steps)({"w": torch.zeros(4, 3)}, {"w": torch.ones(4, 3)})
    torch.testing.assert_close(out["w"], torch.full((4, 3), -0.11))


class _Scheduled:
    """A torch.optim optimizer whose group lr follows _schedule (set before each step)."""

    def __init__(self, opt):
        self.opt, self.t = opt, 0

    def step(self):
        for group in self.opt.param_groups:
            group["lr"] = float(_schedule(torch.tensor(self.t)))
        self.opt.step()
        self.t += 1


class _Replay:
    """Drives one of our optimizers like a torch.optim one (p.grad in, p updated)."""

    def __init__(self, opt, params, shapes):
        self.opt, self.params, self.keys = opt, list(params), list(shapes)
        self.state = opt.init(self._dict())

    def _dict(self):
        return {k: p.detach().clone() for k, p in zip(self.keys, self.params)}

    def step(self):
        new, self.state = self.opt.step(self._dict(), {k: p.grad for k, p in zip(self.keys, self.params)}, self.state)
        with torch.no_grad():
            for k, p in zip(self.keys, self.params):
                p.copy_(new[k])
