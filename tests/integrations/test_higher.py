"""Adafactor inside higher: the same maths as metaopt's engine and as the torch/transformers
optimizers (float64, 1e-10), parameter groups, frozen/unused params, existing state, override."""

from __future__ import annotations

import copy
import subprocess
import sys

import higher
import pytest
import torch
import torch.nn.functional as F
from transformers.optimization import Adafactor as HFAdafactor

import metaopt.integrations.higher as mh
from metaopt.maml import MAML
from metaopt.models import MLP
from metaopt.optim import Adafactor

TOL = 1e-10
STEPS = 3

# (torch.optim / transformers constructor kwargs) -> metaopt.optim.Adafactor factory: one table.
TORCH_CASES = [
    {},
    {"lr": 0.05, "weight_decay": 0.1},
    {"lr": 0.2, "eps": (1e-6, 1e-2), "d": 2.0, "beta2_decay": -0.5},
    {"lr": 0.03, "maximize": True},
]
HF_CASES = [
    {},  # relative step, scale_parameter=True (transformers' defaults)
    {"lr": 0.02, "relative_step": False, "scale_parameter": False},
    {"lr": 0.05, "relative_step": False, "beta1": 0.9, "weight_decay": 0.1, "clip_threshold": 0.5},
    {"warmup_init": True, "scale_parameter": True},
]


def torch_case(kwargs):
    return (lambda ps: torch.optim.Adafactor(ps, **kwargs)), Adafactor(**kwargs)


def hf_case(kwargs):
    return (lambda ps: HFAdafactor(ps, **kwargs)), Adafactor.from_transformers(**kwargs)


CASES = [pytest.param(*torch_case(k), id=f"torch-{i}") for i, k in enumerate(TORCH_CASES)] + [
    pytest.param(*hf_case(k), id=f"transformers-{i}") for i, k in enumerate(HF_CASES)
]


def make_model(seed=0):
    torch.manual_seed(seed)  # test-local model init; the data below uses its own generator
    return MLP(1, (8, 8), 1).double()


def tasks(n=2, seed=1):
    """A torchmeta-style batch of ``n`` sinusoid-like regression tasks (float64)."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(n, 1, 1, generator=g, dtype=torch.float64) * 4 + 1
    phase = torch.rand(n, 1, 1, generator=g, dtype=torch.float64) * 3
    xs = torch.rand(n, 10, 1, generator=g, dtype=torch.float64) * 10 - 5
    xq = torch.rand(n, 10, 1, generator=g, dtype=torch.float64) * 10 - 5
    return {"train": (xs, amp * torch.sin(xs + phase)), "test": (xq, amp * torch.sin(xq + phase))}


def higher_meta_grad(model, make_opt, batch, steps=STEPS, **ctx):
    """Mean query loss over tasks through higher; returns (grads, adapted params per task)."""
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    model.zero_grad()
    adapted = []
    for i in range(xs.shape[0]):
        opt = make_opt(model.parameters())
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **ctx) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.mse_loss(fmodel(xs[i]), ys[i]))
            (F.mse_loss(fmodel(xq[i]), yq[i]) / xs.shape[0]).backward()
            adapted.append([p.detach().clone() for p in fmodel.parameters()])
    return [p.grad.clone() for p in model.parameters()], adapted


def maxdiff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("make_opt,ours", CASES)
def test_meta_gradient_equals_metaopt_engine(make_opt, ours):
    model, batch = make_model(), tasks()
    got, _ = higher_meta_grad(model, make_opt, batch)
    model.zero_grad()
    maml = MAML(model, inner_optimizer=ours, inner_steps=STEPS, loss_fn=F.mse_loss, vectorize=False)
    maml.meta_loss(batch).loss.backward()
    want = [p.grad for p in model.parameters()]
    assert maxdiff(got, want) < TOL
    assert max(g.abs().max().item() for g in want) > 1e-3  # not vacuous


@pytest.mark.parametrize("make_opt,ours", CASES)
def test_inner_steps_equal_reference_optimizer(make_opt, ours):
    """The fast weights after a few differentiable steps equal plain ``opt.step()`` calls."""
    model, batch = make_model(), tasks(n=1)
    (xs, ys) = batch["train"]
    _, adapted = higher_meta_grad(model, make_opt, batch)
    ref = copy.deepcopy(model)
    opt = make_opt(ref.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        F.mse_loss(ref(xs[0]), ys[0]).backward()
        opt.step()
    moved = maxdiff(list(ref.parameters()), list(model.parameters()))
    assert moved > 1e-6  # warmup_init moves by ~1e-6 t per step
    assert maxdiff(adapted[0], list(ref.parameters())) < TOL


def grouped(params, make_group_opt):
    params = list(params)
    weights = [p for p in params if p.dim() > 1]
    biases = [p for p in params if p.dim() == 1]
    return make_group_opt(weights, biases)


GROUPS = {
    "torch": lambda w, b: torch.optim.Adafactor(
        [{"params": w, "lr": 0.05}, {"params": b, "lr": 0.2, "weight_decay": 0.1, "d": 2.0}], lr=0.01
    ),
    "transformers": lambda w, b: HFAdafactor(
        [{"params": w}, {"params": b, "lr": 0.05, "relative_step": False, "scale_parameter": False}]
    ),
}


@pytest.mark.parametrize("kind", sorted(GROUPS))
def test_param_groups_keep_their_hyperparameters(kind):
    model, batch = make_model(), tasks(n=1)
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    make = lambda ps: grouped(ps, GROUPS[kind])  # noqa: E731
    got, adapted = higher_meta_grad(model, make, batch)
    # Reference inner steps: the optimizer itself, with its groups.
    ref = copy.deepcopy(model)
    opt = make(ref.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        F.mse_loss(ref(xs[0]), ys[0]).backward()
        opt.step()
    assert maxdiff(adapted[0], list(ref.parameters())) < TOL
    # Reference meta-gradient: one metaopt optimizer per group, by hand.
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    group_keys = [[n for n in names if params[n].dim() > 1], [n for n in names if params[n].dim() == 1]]
    diff = higher.optim.get_diff_optim(opt, ref.parameters())
    opts = [diff.functional_optimizer(0), diff.functional_optimizer(1)]
    p = dict(params)
    states = [o.init({k: p[k] for k in ks}) for o, ks in zip(opts, group_keys)]
    for _ in range(STEPS):
        loss = F.mse_loss(torch.func.functional_call(model, p, (xs[0],)), ys[0])
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()), create_graph=True)))
        for j, (o, ks) in enumerate(zip(opts, group_keys)):
            new, states[j] = o.step({k: p[k] for k in ks}, {k: grads[k] for k in ks}, states[j])
            p.update(new)
    qloss = F.mse_loss(torch.func.functional_call(model, p, (xq[0],)), yq[0])
    want = torch.autograd.grad(qloss, list(model.parameters()))
    assert maxdiff(got, want) < TOL


class Partial(torch.nn.Module):
    """A frozen layer and a parameter the loss never uses."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(1, 8).double()
        self.b = torch.nn.Linear(8, 1).double()
        self.unused = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
        self.a.bias.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("kind", ["torch", "transformers"])
def test_frozen_and_unused_params_are_skipped(kind):
    torch.manual_seed(0)
    model, batch = Partial(), tasks(n=1)
    (xs, ys) = batch["train"]
    make = (lambda ps: torch.optim.Adafactor(ps, lr=0.1)) if kind == "torch" else (lambda ps: HFAdafactor(ps))
    ref = copy.deepcopy(model)
    opt = make(model.parameters())
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(F.mse_loss(fmodel(xs[0]), ys[0]))
        adapted = list(fmodel.parameters())
        names = [n for n, _ in model.named_parameters()]
        stepped = {names[i] for i, s in diffopt.state[0].items() if s}
    ref_opt = make(ref.parameters())
    for _ in range(STEPS):
        ref_opt.zero_grad()
        F.mse_loss(ref(xs[0]), ys[0]).backward()
        ref_opt.step()
    assert maxdiff(adapted, list(ref.parameters())) < TOL
    assert stepped == {"a.weight", "b.weight", "b.bias"}  # no state for the frozen/unused ones
    assert torch.equal(adapted[names.index("unused")], model.unused.detach())


@pytest.mark.parametrize("kind", ["torch", "transformers"])
def test_existing_optimizer_state_is_continued(kind):
    """An optimizer that already took steps: the inner loop continues from its state."""
    model, batch = make_model(), tasks(n=1)
    (xs, ys) = batch["train"]
    make = (
        (lambda ps: torch.optim.Adafactor(ps, lr=0.05))
        if kind == "torch"
        else (lambda ps: HFAdafactor(ps, beta1=0.5, lr=0.02, relative_step=False))
    )
    opt = make(model.parameters())
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # warm the state up on other data
        opt.zero_grad()
        x = torch.randn(10, 1, generator=g, dtype=torch.float64)
        F.mse_loss(model(x), x.sin()).backward()
        opt.step()
    ref = copy.deepcopy(model)
    ref_opt = make(ref.parameters())
    ref_opt.load_state_dict(opt.state_dict())
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(F.mse_loss(fmodel(xs[0]), ys[0]))
        adapted = list(fmodel.parameters())
        assert all(int(s["step"]) == 2 + STEPS for s in diffopt.state[0].values())
    for _ in range(STEPS):
        ref_opt.zero_grad()
        F.mse_loss(ref(xs[0]), ys[0]).backward()
        ref_opt.step()
    assert maxdiff(adapted, list(ref.parameters())) < TOL


def test_override_lr_tensor_receives_meta_gradient():
    model, batch = make_model(), tasks(n=1)
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adafactor(model.parameters(), lr=0.01, weight_decay=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (f, d):
        for _ in range(STEPS):
            d.step(F.mse_loss(f(xs[0]), ys[0]))
        got = torch.autograd.grad(F.mse_loss(f(xq[0]), yq[0]), [lr, *model.parameters()])
    # Reference: the engine with the same tensor lr (a 0-dim tensor requiring grad).
    lr2 = lr.detach().clone().requires_grad_()
    maml = MAML(model, inner_optimizer=Adafactor(lr=lr2, weight_decay=0.1), inner_steps=STEPS,
                loss_fn=F.mse_loss, vectorize=False)
    loss = maml.meta_loss(tasks(n=1)).loss
    want = torch.autograd.grad(loss, [lr2, *model.parameters()])
    assert got[0].abs().item() > 1e-6
    assert maxdiff(got, want) < TOL


def test_override_needs_relative_step_off_for_transformers():
    model, batch = make_model(), tasks(n=1)
    (xs, ys) = batch["train"]
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    with higher.innerloop_ctx(model, HFAdafactor(model.parameters()), copy_initial_weights=False,
                              override={"lr": [lr]}) as (f, d):
        with pytest.raises(ValueError, match="relative_step"):
            d.step(F.mse_loss(f(xs[0]), ys[0]))
    override = {"lr": [lr], "relative_step": [False]}
    with higher.innerloop_ctx(model, HFAdafactor(model.parameters()), copy_initial_weights=False,
                              override=override) as (f, d):
        d.step(F.mse_loss(f(xs[0]), ys[0]))
        (g,) = torch.autograd.grad(f(xs[0]).sum(), [lr])
    assert g.abs().item() > 0


def test_track_higher_grads_false_gives_detached_equal_steps():
    model, batch = make_model(), tasks(n=1)
    make = lambda ps: torch.optim.Adafactor(ps, lr=0.05)  # noqa: E731
    _, tracked = higher_meta_grad(model, make, batch)
    (xs, ys) = batch["train"]
    with higher.innerloop_ctx(model, make(model.parameters()), copy_initial_weights=False,
                              track_higher_grads=False) as (f, d):
        for _ in range(STEPS):
            d.step(F.mse_loss(f(xs[0]), ys[0]))
        fast = list(f.parameters())
        assert all(p.grad_fn is None for p in fast)
        assert all(not s["row" if "row" in s else "variance"].requires_grad for s in d.state[0].values())
    assert maxdiff(fast, tracked[0]) < TOL


def test_registration_and_lazy_import():
    assert mh.register()[torch.optim.Adafactor] is mh.DifferentiableAdafactor
    assert higher.optim._opt_mapping[HFAdafactor] is mh.DifferentiableTransformersAdafactor
    code = "import sys, metaopt.integrations; assert 'higher' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_does_not_import_transformers_and_registers_its_twin_late():
    """transformers (seconds to import) is not imported by this module; its Adafactor still
    works with higher once the user imports it, and REGISTERED lists it (imported on access)."""
    code = """if True:
        import sys, higher, torch
        import metaopt.integrations.higher as mh
        assert 'transformers' not in sys.modules, 'imported transformers'
        assert higher.optim._opt_mapping[torch.optim.Adafactor] is mh.DifferentiableAdafactor
        from transformers.optimization import Adafactor as HF
        model = torch.nn.Linear(3, 1)
        diffopt = higher.optim.get_diff_optim(HF(model.parameters()), model.parameters())
        assert type(diffopt) is mh.DifferentiableTransformersAdafactor, type(diffopt)
        assert mh.REGISTERED[HF] is mh.DifferentiableTransformersAdafactor
    """
    subprocess.run([sys.executable, "-c", code], check=True)


def test_higher_table_lookups_still_miss_for_unknown_optimizers():
    mapping = higher.optim._opt_mapping  # wrapped by metaopt.integrations.higher
    assert HFAdafactor in mapping and mapping.get(HFAdafactor) is mh.DifferentiableTransformersAdafactor
    assert int not in mapping and mapping.get(int) is None
    with pytest.raises(KeyError):
        mapping[int]
    with pytest.raises(ValueError, match="not supported by higher"):
        higher.optim.get_diff_optim(object(), [])


@pytest.mark.parametrize("name", ["metaopt.integrations", "metaopt.integrations.higher"])
def test_doctests(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
