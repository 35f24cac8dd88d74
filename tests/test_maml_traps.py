"""New-user traps become clear errors or documented behaviour (issue 13, item 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.maml import MAML
from metaopt.models import MLP
from metaopt.optim import SGD
from metaopt.tasks.base import TaskBatch


def _reg_batch(x_shape=(2, 5, 1), y_shape=(2, 5, 1), seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        support=(torch.randn(*x_shape, generator=g), torch.randn(*y_shape, generator=g)),
        query=(torch.randn(*x_shape, generator=g), torch.randn(*y_shape, generator=g)),
    )


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, F.nll_loss, nn.CrossEntropyLoss()])
def test_classification_loss_on_float_targets_is_refused(loss_fn, vectorize: bool) -> None:
    maml = MAML(MLP(1, (8,), 1), SGD(lr=0.1), loss_fn=loss_fn, vectorize=vectorize)  # default loss is cross_entropy
    with pytest.raises(ValueError, match=r"classification loss but the targets are torch\.float32 \(5, 1\).*mse_loss"):
        maml.meta_loss(_reg_batch())


def test_default_loss_on_regression_targets_is_refused() -> None:
    with pytest.raises(ValueError, match=r"torch\.float32.*loss_fn=torch\.nn\.functional\.mse_loss"):
        MAML(MLP(1, (8,), 1), SGD(lr=0.1)).meta_loss(_reg_batch())


def test_class_probabilities_are_still_accepted() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=g)
    probs = torch.softmax(torch.randn(2, 5, 4, generator=g), -1)
    out = MAML(MLP(3, (8,), 4), SGD(lr=0.1)).meta_loss(TaskBatch(support=(x, probs), query=(x, probs)))
    assert torch.isfinite(out.loss) and out.loss > 0


def test_missing_task_dimension_is_refused() -> None:
    maml = MAML(MLP(1, (8,), 1), SGD(lr=0.1), loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match=r"support inputs \(10, 1\) read as 10 tasks.*x\.unsqueeze\(0\), shape \(1, 10, 1\)"):
        maml.meta_loss(_reg_batch((10, 1), (10, 1)))
    # Valid batches with two-dimensional inputs are untouched: token ids (tasks, examples).
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    tokens = torch.randint(0, 5, (2, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (2, 4), generator=torch.Generator().manual_seed(1))
    MAML(emb, SGD(lr=0.1)).meta_loss(TaskBatch(support=(tokens, labels), query=(tokens, labels)))


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("loss_fn", [F.mse_loss, F.l1_loss, nn.MSELoss(), F.smooth_l1_loss])
def test_broadcasting_targets_are_refused(loss_fn, vectorize: bool) -> None:
    maml = MAML(MLP(1, (8,), 1), SGD(lr=0.1), loss_fn=loss_fn, vectorize=vectorize)
    with pytest.raises(ValueError, match=r"output \(10, 1\) and the targets \(10,\).*same shape"):
        maml.meta_loss(_reg_batch((4, 10, 1), (4, 10)))


def test_a_users_own_loss_is_theirs() -> None:
    maml = MAML(MLP(1, (8,), 1), SGD(lr=0.1), loss_fn=lambda o, t: F.mse_loss(o.squeeze(-1), t))
    assert torch.isfinite(maml.meta_loss(_reg_batch((4, 10, 1), (4, 10))).loss)


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("vectorize", [False, True])
def test_no_hidden_forward_and_first_call_equals_later_ones(vectorize: bool) -> None:
    torch.manual_seed(0)
    model = _Counting()
    maml = MAML(model, SGD(lr=0.1), inner_steps=2, loss_fn=F.mse_loss, vectorize=vectorize)
    batch = _reg_batch()
    torch.manual_seed(1)
    first = maml.meta_loss(batch, before=False).loss
    # vmap: one batched forward per inner step and one for the query; loop: per task.
    assert model.calls == (3 if vectorize else 2 * 3)
    torch.manual_seed(1)
    assert torch.equal(maml.meta_loss(batch, before=False).loss, first)


@pytest.mark.parametrize("vectorize", [False, True])
def test_before_does_not_touch_the_training_random_stream(vectorize: bool) -> None:
    torch.manual_seed(0)
    maml = MAML(_Counting(), SGD(lr=0.1), inner_steps=2, loss_fn=F.mse_loss, vectorize=vectorize)
    batch = _reg_batch()
    torch.manual_seed(1)
    without = maml.meta_loss(batch, before=False)
    after_without = torch.rand(3)
    torch.manual_seed(1)
    with_before = maml.meta_loss(batch, before=True)
    assert torch.equal(torch.rand(3), after_without)  # stream where it would be without before
    assert torch.equal(with_before.query_loss, without.query_loss)
    assert with_before.query_loss_before is not None and with_before.query_loss_before.shape == (2,)


def test_unused_parameter_still_detected_under_vmap_without_extra_forward() -> None:
    class Spare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.spare = nn.Linear(1, 1), nn.Linear(1, 1)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.body(x)

    model = Spare()
    with pytest.raises(ValueError, match=r"spare\.weight.*allow_unused=True"):
        MAML(model, SGD(lr=0.1), loss_fn=F.mse_loss, vectorize=True).meta_loss(_reg_batch())
    assert model.calls == 1  # the first real support forward, nothing more
