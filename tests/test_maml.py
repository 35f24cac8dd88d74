"""MAML engine (per-task loop): purity, exact meta-gradients, first order, learned rates, errors."""

from __future__ import annotations

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.maml import MAML, MetaLossOutput, default_vectorize
from metaopt.models import MLP, Conv4
from metaopt.optim import SGD
from metaopt.optim.learned import MetaSGD, per_parameter_lr
from metaopt.tasks.base import TaskBatch

from test_maml_helpers import (  # noqa: F401  (one_thread is a fixture)
    DT,
    INNER,
    fd_relative_errors,
    image_batch,
    max_abs_diff,
    meta_grads,
    mlp_class_batch,
    one_thread,
    model_and_batch,
    regression_batch,
    tiny_conv,
    tiny_mlp,
    torch_bn_conv,
)

FD_TOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- purity


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"{k} changed"


@pytest.mark.parametrize("kind", ["torchbn", "conv_tracked"])
@pytest.mark.parametrize("training", [True, False])
def test_params_and_buffers_bit_identical(kind: str, training: bool) -> None:
    if kind == "torchbn":
        model, batch = torch_bn_conv(), image_batch(side=8)
    else:
        model, batch = tiny_conv(track_running_stats=True), image_batch()
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "running_var"):
                    m.running_var.uniform_(0.5, 2)
    model.train(training)
    snap = _snapshot(model)
    assert any("running" in k for k in snap)
    for vec in ([False, True] if kind == "conv_tracked" else [False]):
        for fo in (False, True):
            maml = MAML(model, SGD(lr=0.1, momentum=0.5), inner_steps=2, first_order=fo, vectorize=vec)
            params = maml.adapt(batch.support[0][0], batch.support[1][0])
            maml.functional_forward(params, batch.query[0][0]).sum().backward()
            maml.meta_loss(batch).loss.backward()
            maml.meta_loss(batch, train=False)
            _assert_bit_identical(model, snap)
    assert model.training == training
    assert all(m.training == training for m in model.modules())


def test_inner_loop_uses_batch_statistics_whatever_the_mode() -> None:
    model, batch = torch_bn_conv(), image_batch(side=8)
    maml = MAML(model, SGD(lr=0.1), inner_steps=1)
    model.train()
    a = maml.meta_loss(batch).query_loss
    model.eval()  # running stats would give different values; MAML still uses batch stats
    b = maml.meta_loss(batch, train=True).query_loss
    assert torch.equal(a, b)
    own = MAML(model, SGD(lr=0.1), inner_steps=1, batch_stats=False)  # model's own (eval) mode
    assert not torch.allclose(own.meta_loss(batch, train=True).query_loss, a)


# ----------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_second_order_meta_gradient_matches_finite_differences(kind: str, steps: int, inner: str) -> None:
    model, batch, loss_fn = model_and_batch(kind, seed=1)
    maml = MAML(model, INNER[inner](), inner_steps=steps, loss_fn=loss_fn, vectorize=False)
    errors = fd_relative_errors(maml, batch)
    assert max(errors) <= FD_TOL, errors


@pytest.mark.parametrize("steps", [1, 3])
def test_torch_batchnorm_net_meta_gradient_matches_finite_differences(steps: int) -> None:
    model, batch, loss_fn = model_and_batch("torchbn", seed=1)
    maml = MAML(model, SGD(lr=0.1, momentum=0.9), inner_steps=steps, loss_fn=loss_fn)
    assert max(fd_relative_errors(maml, batch)) <= FD_TOL


# ----------------------------------------------------------------------------- higher parity


def _higher_meta_grads(model: nn.Module, batch: TaskBatch, loss_fn, lr: float, momentum: float, steps: int):
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    (xs, ys), (xq, yq) = batch.support, batch.query
    for i in range(batch.num_tasks):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fmodel(xs[i]), ys[i]))
            (loss_fn(fmodel(xq[i]), yq[i]) / batch.num_tasks).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_equals_higher(steps: int, momentum: float, vectorize: bool) -> None:
    model = tiny_mlp()
    for batch, loss_fn in ((regression_batch(), F.mse_loss), (mlp_class_batch(), F.cross_entropy)):
        ref = _higher_meta_grads(model, batch, loss_fn, 0.1, momentum, steps)
        maml = MAML(model, SGD(lr=0.1, momentum=momentum), inner_steps=steps, loss_fn=loss_fn, vectorize=vectorize)
        assert max_abs_diff(meta_grads(maml, batch), ref) <= 1e-10


# ----------------------------------------------------------------------------- first order


def _graph_node_names(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_is_query_gradient_at_adapted_params(steps: int, vectorize: bool) -> None:
    model, batch = tiny_mlp(), regression_batch()
    maml = MAML(model, SGD(lr=0.1), inner_steps=steps, first_order=True, loss_fn=F.mse_loss, vectorize=vectorize)
    got = meta_grads(maml, batch)
    # FOMAML by definition: mean over tasks of grad L_query(theta') at theta' = adapt(theta).
    want = [torch.zeros_like(p) for p in model.parameters()]
    (xs, ys), (xq, yq) = batch.support, batch.query
    for i in range(batch.num_tasks):
        adapted = {k: v.requires_grad_() for k, v in maml.adapt(xs[i], ys[i], train=False, steps=steps).items()}
        loss = F.mse_loss(maml.functional_forward(adapted, xq[i]), yq[i]) / batch.num_tasks
        for w, g in zip(want, torch.autograd.grad(loss, [adapted[k] for k, _ in model.named_parameters()])):
            w += g
    assert max_abs_diff(got, want) <= 1e-12


@pytest.mark.parametrize("vectorize", [False, True])
def test_first_order_builds_no_second_order_graph(vectorize: bool) -> None:
    model, batch = tiny_mlp(), regression_batch()
    second = MAML(model, SGD(lr=0.1), inner_steps=2, loss_fn=F.mse_loss, vectorize=vectorize)
    first = MAML(model, SGD(lr=0.1), inner_steps=2, first_order=True, loss_fn=F.mse_loss, vectorize=vectorize)
    so = _graph_node_names(second.meta_loss(batch).loss)
    fo = _graph_node_names(first.meta_loss(batch).loss)
    # ReLU's backward (threshold_backward) appears in the graph only if it is differentiated.
    assert any("BackwardBackward" in n for n in so), sorted(so)
    assert not any("BackwardBackward" in n for n in fo), sorted(fo)
    ev = second.meta_loss(batch, train=False)
    assert ev.loss.grad_fn is None and not ev.loss.requires_grad


# ----------------------------------------------------------------------------- learned rates


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda m: SGD(lr=nn.Parameter(torch.tensor(0.1, dtype=DT))), id="scalar"),
        pytest.param(lambda m: SGD(lr=per_parameter_lr(m, 0.1)), id="per-element"),
        pytest.param(lambda m: SGD(lr=per_parameter_lr(m, 0.1, granularity="tensor"), momentum=0.9), id="per-layer"),
        pytest.param(lambda m: MetaSGD.from_model(m, 0.1, granularity="tensor", steps=3), id="per-layer-per-step"),
    ],
)
def test_learnable_inner_lr_gets_meta_gradient_equal_to_finite_differences(make) -> None:
    model, batch, loss_fn = model_and_batch("mlp", seed=1)
    maml = MAML(model, make(model), inner_steps=3, loss_fn=loss_fn, vectorize=False)
    hp = list(maml.inner_hparams.parameters())
    assert hp and all(isinstance(p, nn.Parameter) for p in hp)
    assert len(list(maml.parameters())) == len(list(model.parameters())) + len(hp)
    grads = meta_grads(maml, batch)[-len(hp):]
    assert all(float(g.abs().sum()) > 0 for g in grads)
    assert max(fd_relative_errors(maml, batch, directions=3)) <= FD_TOL
    # checkpoint round trip carries the learned rates
    state = maml.state_dict()
    assert any(k.startswith("inner_hparams.") for k in state)
    with torch.no_grad():
        for p in hp:
            p.mul_(2)
    maml.load_state_dict(state)
    assert torch.equal(maml.meta_loss(batch).loss, maml.meta_loss(batch).loss)


def test_per_step_rates_are_indexed_by_step() -> None:
    model, batch = tiny_mlp(), regression_batch()
    opt = MetaSGD.from_model(model, 0.1, granularity="tensor", steps=2)
    with torch.no_grad():
        for v in opt.lr.values():
            v[1] = 0.0  # second step does nothing
    maml = MAML(model, opt, inner_steps=2, loss_fn=F.mse_loss, vectorize=False)
    one = MAML(model, SGD(lr=0.1), inner_steps=1, loss_fn=F.mse_loss, vectorize=False)
    assert torch.allclose(maml.meta_loss(batch).loss, one.meta_loss(batch).loss, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- closed form


def test_closed_form_linear_regression_one_sgd_step() -> None:
    torch.manual_seed(0)
    d, n, m, alpha = 4, 7, 5, 0.05
    model = nn.Linear(d, 1, bias=False).to(DT)
    lr = nn.Parameter(torch.tensor(alpha, dtype=DT))
    maml = MAML(model, SGD(lr=lr), inner_steps=1, loss_fn=F.mse_loss, vectorize=False)
    xs, ys, xq, yq = torch.randn(1, n, d, dtype=DT), torch.randn(1, n, 1, dtype=DT), torch.randn(1, m, d, dtype=DT), torch.randn(1, m, 1, dtype=DT)
    out = maml.meta_loss(TaskBatch(support=(xs, ys), query=(xq, yq)))
    out.loss.backward()
    w = model.weight.detach().reshape(d, 1)
    Xs, Xq = xs[0], xq[0]
    grad_s = 2 / n * Xs.T @ (Xs @ w - ys[0])  # grad of the support loss at w
    w1 = w - alpha * grad_s
    grad_q = 2 / m * Xq.T @ (Xq @ w1 - yq[0])  # grad of the query loss at w'
    A = 2 / n * Xs.T @ Xs  # support Hessian
    want_w = (torch.eye(d, dtype=DT) - alpha * A) @ grad_q
    want_lr = -(grad_q * grad_s).sum()
    assert torch.allclose(model.weight.grad.reshape(d, 1), want_w, rtol=1e-12, atol=1e-14)
    assert torch.allclose(lr.grad, want_lr, rtol=1e-12, atol=1e-14)
    assert torch.allclose(out.loss, ((Xq @ w1 - yq[0]) ** 2).mean(), rtol=1e-13)


# ----------------------------------------------------------------------------- API behaviour


def test_output_fields_and_torchmeta_dict() -> None:
    model, batch = tiny_conv(), image_batch()
    maml = MAML(model, SGD(lr=0.1), inner_steps=1)
    out = maml.meta_loss(batch)
    assert isinstance(out, MetaLossOutput)
    assert out.loss.dim() == 0 and torch.allclose(out.loss, out.query_loss.mean())
    for t in (out.query_loss, out.query_loss_before, out.accuracy, out.accuracy_before):
        assert t.shape == (2,) and torch.isfinite(t).all()
    assert ((out.accuracy >= 0) & (out.accuracy <= 1)).all()
    d = maml.meta_loss(batch.as_dict())
    assert torch.equal(d.loss, out.loss)
    reg = MAML(tiny_mlp(), SGD(lr=0.1), loss_fn=F.mse_loss).meta_loss(regression_batch())
    assert reg.accuracy is None and reg.accuracy_before is None and reg.query_loss_before.shape == (3,)
    assert MAML(model, SGD(lr=0.1)).meta_loss(batch, before=False).query_loss_before is None


def test_train_and_eval_step_counts() -> None:
    model, batch = tiny_conv(), image_batch()
    maml = MAML(model, SGD(lr=0.1), inner_steps=1, eval_inner_steps=3)
    assert maml.meta_loss(batch).inner_steps == 1
    ev = maml.meta_loss(batch, train=False)
    assert ev.inner_steps == 3 and not ev.loss.requires_grad
    maml.eval()
    assert maml.meta_loss(batch).inner_steps == 3
    assert maml.meta_loss(batch, steps=0).inner_steps == 0
    maml.train()
    with torch.no_grad():  # same values as the differentiable path, no graph
        nog = maml.meta_loss(batch, steps=3)
    assert torch.allclose(nog.loss, ev.loss, rtol=1e-13) and not nog.loss.requires_grad
    zero = maml.meta_loss(batch, steps=0)
    assert torch.equal(zero.query_loss, zero.query_loss_before)


def test_adapt_and_functional_forward_match_meta_loss() -> None:
    model, batch, loss_fn = model_and_batch("mlp")
    maml = MAML(model, SGD(lr=0.1, momentum=0.9), inner_steps=2, loss_fn=loss_fn)
    out = maml.meta_loss(batch)
    (xs, ys), (xq, yq) = batch.support, batch.query
    for i in range(batch.num_tasks):
        params = maml.adapt(xs[i], ys[i])
        assert params.keys() == dict(model.named_parameters()).keys()
        assert params["net.0.weight"].requires_grad
        assert torch.allclose(loss_fn(maml.functional_forward(params, xq[i]), yq[i]), out.query_loss[i], rtol=1e-13)


def test_frozen_parameters_are_held_fixed() -> None:
    model, batch, loss_fn = model_and_batch("mlp")
    model.net[0].weight.requires_grad_(False)
    maml = MAML(model, SGD(lr=0.1), inner_steps=2, loss_fn=loss_fn)
    params = maml.adapt(batch.support[0][0], batch.support[1][0])
    assert torch.equal(params["net.0.weight"], model.net[0].weight)
    assert not torch.equal(params["net.0.bias"], model.net[0].bias)
    maml.meta_loss(batch).loss.backward()
    assert model.net[0].weight.grad is None and model.net[0].bias.grad is not None


def test_outer_loop_with_torch_adafactor_reduces_loss() -> None:
    model, batch, loss_fn = model_and_batch("mlp")
    maml = MAML(model, INNER["adafactor"](), inner_steps=1, loss_fn=loss_fn)
    outer = torch.optim.Adafactor(maml.parameters(), lr=1e-2)
    first = float(maml.meta_loss(batch, train=False).loss)
    for _ in range(20):
        outer.zero_grad()
        maml.meta_loss(batch).loss.backward()
        outer.step()
    assert float(maml.meta_loss(batch, train=False).loss) < first


def test_default_vectorize_rule() -> None:
    assert default_vectorize(MLP(), "cpu") and default_vectorize(MLP(), "cuda")
    assert not default_vectorize(Conv4(5), "cpu") and default_vectorize(Conv4(5), "cuda")
    # torch's BatchNorm is exact under vmap through the engine's elementary ops; RNNs and
    # modules outside the tested table go to the loop whatever the device.
    assert default_vectorize(torch_bn_conv(), "cuda") and not default_vectorize(torch_bn_conv(), "cpu")
    assert not default_vectorize(nn.LSTM(2, 3), "cuda")
    assert not default_vectorize(nn.Sequential(nn.Linear(2, 3), nn.LSTMCell(3, 3)), "cuda")


# ----------------------------------------------------------------------------- errors


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 3)
        self.spare = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("vectorize", [False, True])
def test_unused_parameter_error_and_allow_unused(vectorize: bool) -> None:
    torch.manual_seed(0)
    model, batch = _Unused().to(DT), regression_batch()
    with pytest.raises(ValueError, match=r"spare\.weight.*allow_unused=True"):
        MAML(model, SGD(lr=0.1), loss_fn=F.mse_loss, vectorize=vectorize).meta_loss(batch)
    ok = MAML(model, SGD(lr=0.1, momentum=0.9), inner_steps=2, loss_fn=F.mse_loss, allow_unused=True, vectorize=vectorize)
    grads = meta_grads(ok, batch)
    ref = MAML(model.body, SGD(lr=0.1, momentum=0.9), inner_steps=2, loss_fn=F.mse_loss, vectorize=vectorize)
    assert max_abs_diff(grads[:2], meta_grads(ref, batch)) <= 1e-14
    assert all(float(g.abs().sum()) == 0 for g in grads[2:])


def test_bad_inputs_raise_clear_errors() -> None:
    model, batch = tiny_mlp(), regression_batch()
    with pytest.raises(ValueError, match="inner_steps must be an int >= 0 but is: -1"):
        MAML(model, SGD(lr=0.1), inner_steps=-1)
    with pytest.raises(TypeError, match="inner_steps must be an int"):
        MAML(model, SGD(lr=0.1), inner_steps=1.5)
    with pytest.raises(ValueError, match="eval_inner_steps"):
        MAML(model, SGD(lr=0.1), eval_inner_steps=-2)
    with pytest.raises(TypeError, match="init.*step"):
        MAML(model, torch.optim.SGD)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        MAML(lambda x: x)
    with pytest.raises(ValueError, match="vectorize must be True, False or 'auto'"):
        MAML(model, vectorize="yes")
    with pytest.raises(ValueError, match=r"containing GRU \(1\).*vectorize=False"):
        MAML(nn.Sequential(nn.Linear(2, 2), nn.GRU(2, 2)), vectorize=True)
    maml = MAML(model, SGD(lr=0.1), loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="steps must be an int >= 0 but is: -3"):
        maml.meta_loss(batch, steps=-3)
    (xs, ys), (xq, yq) = batch.support, batch.query
    with pytest.raises(ValueError, match="leading task dimension"):
        maml.meta_loss(TaskBatch(support=(xs, ys), query=(xq[:2], yq[:2])))
    with pytest.raises(ValueError, match="same number of examples"):
        maml.meta_loss(TaskBatch(support=(xs, ys[:, :3]), query=(xq, yq)))
    with pytest.raises(ValueError, match="per-example shape"):
        maml.meta_loss(TaskBatch(support=(xs, ys), query=(torch.cat([xq, xq], -1), yq)))
    with pytest.raises(ValueError, match="per-example shape and dtype"):
        maml.meta_loss(TaskBatch(support=(xs, ys), query=(xq, yq[..., :1])))
    with pytest.raises(TypeError, match="TaskBatch"):
        maml.meta_loss({"support": (xs, ys)})
    with pytest.raises(ValueError, match=r"same number of examples"):
        maml.adapt(xs[0], ys[0, :2])
    for vec in (False, True):
        bad = MAML(model, SGD(lr=0.1), loss_fn=lambda o, t: F.mse_loss(o, t, reduction="none"), vectorize=vec)
        with pytest.raises(ValueError, match=r"scalar \(0-dim\).*\(5, 3\)"):
            bad.meta_loss(batch)


class _ModuleSGD(nn.Module):
    """A user-written inner optimizer that is an nn.Module with a learned log-rate."""

    def __init__(self) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(-2.0, dtype=DT))

    def init(self, params):
        return ()

    def step(self, params, grads, state):
        return {k: p - self.log_lr.exp() * grads[k] for k, p in params.items()}, state


def test_user_written_inner_optimizer_module() -> None:
    model, batch, loss_fn = model_and_batch("mlp", seed=1)
    maml = MAML(model, _ModuleSGD(), inner_steps=2, loss_fn=loss_fn)
    assert "inner_optimizer.log_lr" in maml.state_dict()
    assert max(fd_relative_errors(maml, batch)) <= FD_TOL


class _InPlaceSGD:
    def init(self, params):
        return ()

    def step(self, params, grads, state):
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(0.1 * grads[k])
        return params, state


def test_inner_optimizer_mutating_params_is_caught() -> None:
    model, batch, loss_fn = model_and_batch("mlp")
    with pytest.raises(RuntimeError, match="in place"):
        MAML(model, _InPlaceSGD(), loss_fn=loss_fn, vectorize=False).meta_loss(batch)
