"""metaopt.verify passes sound models and flags wrong ones (a wrong double backward, a wrong
vmap rule, an inner optimizer writing through .data)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaopt
from metaopt import MAML, VerifyReport, verify
from metaopt.optim import SGD, Adafactor
from metaopt.tasks.base import TaskBatch


def _batch(shape: tuple[int, ...] = (3,), seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        support=(torch.randn(2, 4, *shape, generator=g), torch.randn(2, 4, 2, generator=g)),
        query=(torch.randn(2, 4, *shape, generator=g), torch.randn(2, 4, 2, generator=g)),
    )


class _WrongSecondOrderTanh(torch.autograd.Function):
    """tanh with a correct first derivative and a wrong second one: backward uses the
    output as a constant, so the double backward misses d(1 - y^2)/dx."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        (y,) = ctx.saved_tensors
        return g * (1 - y.detach() ** 2)


class _WrongUnderVmap(torch.autograd.Function):
    """x * 2, with a hand-written vmap rule that returns x * 3 (a wrong batching rule)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        pass

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return g * 2

    @staticmethod
    def vmap(info, in_dims, x):  # type: ignore[no-untyped-def]
        return x * 3, in_dims[0]


class _Act(nn.Module):
    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x)


def _net(act: nn.Module | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), act or nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2))


def test_sound_model_passes_and_report_prints_a_table() -> None:
    maml = MAML(_net(), Adafactor(lr=0.05), inner_steps=2, loss_fn=F.mse_loss)
    report = verify(maml, _batch())
    assert isinstance(report, VerifyReport) and report.ok
    assert report.fd_error < 1e-6 and report.vmap_status == "compared" and report.vmap_error < 1e-10
    assert report.vmap_used and report.changed == []
    text = str(report)
    assert "finite differences" in text and "vmap vs loop" in text and "ok: True" in text
    assert metaopt.verify is verify


def test_flags_a_wrong_double_backward() -> None:
    maml = MAML(_net(_Act(_WrongSecondOrderTanh)), SGD(lr=0.5), inner_steps=2, loss_fn=F.mse_loss, vectorize=False)
    report = verify(maml, _batch())
    assert not report.ok and not report.fd_ok and report.fd_error > 1e-4
    assert "WRONG" in str(report)


def test_flags_a_wrong_vmap_rule_only_where_vmap_is_used() -> None:
    used = verify(MAML(_net(_Act(_WrongUnderVmap)), SGD(lr=0.1), inner_steps=1, loss_fn=F.mse_loss, vectorize=True), _batch())
    assert used.fd_ok and used.vmap_error > 1e-2 and not used.ok  # FD checks the vmap path too
    loop = verify(MAML(_net(_Act(_WrongUnderVmap)), SGD(lr=0.1), inner_steps=1, loss_fn=F.mse_loss, vectorize=False), _batch())
    assert loop.ok and not loop.vmap_used and loop.vmap_error > 1e-2 and loop.notes


def test_weight_norm_is_exact() -> None:
    """torch's own double backward of _weight_norm is wrong; the engine replaces it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2))
    report = verify(MAML(model, SGD(lr=0.3), inner_steps=2, loss_fn=F.mse_loss), _batch())
    assert report.ok and report.fd_error < 1e-6


def test_rnn_reports_vmap_refused() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    report = verify(MAML(Net(), SGD(lr=0.1), inner_steps=2, loss_fn=F.mse_loss), _batch((3, 3)))
    assert report.ok and report.vmap_status.startswith("refused: GRU") and not report.vmap_used


class _DataWritingSGD:
    """Writes the update through .data: bypasses the version counter the engine checks."""

    def init(self, params):  # type: ignore[no-untyped-def]
        return ()

    def step(self, params, grads, state):  # type: ignore[no-untyped-def]
        for p, g in zip(params.values(), grads.values()):
            p.data.sub_(0.1 * g.detach())
        return dict(params), state


def test_flags_an_inner_optimizer_writing_through_data() -> None:
    model = _net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = verify(MAML(model, _DataWritingSGD(), inner_steps=1, loss_fn=F.mse_loss, vectorize=False), _batch())
    assert not report.ok and "model.0.weight" in report.changed and "CHANGED" in str(report)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # verify restored it


def test_dropout_is_checked_with_fixed_masks_and_leaves_the_callers_stream() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2))
    maml = MAML(model, SGD(lr=0.1), inner_steps=2, loss_fn=F.mse_loss)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = verify(maml, _batch())
    assert torch.equal(torch.rand(3), expected)  # caller's random stream untouched
    assert first.ok and first.fd_error < 1e-6 and first.vmap_error < 1e-10
    assert verify(maml, _batch()).fd_error == first.fd_error  # deterministic


def test_first_order_is_checked_at_second_order() -> None:
    report = verify(MAML(_net(), SGD(lr=0.1), inner_steps=2, first_order=True, loss_fn=F.mse_loss), _batch())
    assert report.ok and any("second order" in n for n in report.notes)


@pytest.mark.parametrize(
    "kw, message",
    [({"directions": 0}, "directions should be an int >= 1 but is: 0"), ({"eps": 0.0}, "eps should be > 0 but is: 0.0"),
     ({"rtol": -1.0}, "rtol and atol should be >= 0")],
)
def test_bad_arguments(kw: dict, message: str) -> None:
    maml = MAML(_net(), SGD(lr=0.1), loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match=message):
        verify(maml, _batch(), **kw)
    with pytest.raises(TypeError, match="metaopt.MAML"):
        verify(_net(), _batch())  # type: ignore[arg-type]


def test_learned_inner_learning_rates_are_checked_too() -> None:
    """Directions span maml.parameters(): the model and the learned per-parameter rates."""
    from metaopt.optim.learned import per_parameter_lr

    model = _net()
    maml = MAML(model, SGD(lr=per_parameter_lr(model, 0.1)), inner_steps=2, loss_fn=F.mse_loss)
    assert any(n.startswith("inner_hparams") for n, _ in maml.named_parameters())
    report = verify(maml, _batch())
    assert report.ok and report.fd_error < 1e-6
