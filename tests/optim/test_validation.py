"""A table of bad inputs, each raising ValueError with a message that names the value."""

from __future__ import annotations

import pytest
import torch

from metaopt.optim import SGD, Adafactor

P = {"w": torch.zeros(2, 2)}
G = {"w": torch.zeros(2, 2)}

BAD_CONSTRUCTORS = [
    # torch.optim.SGD's messages
    (lambda: SGD(lr=-1), "Invalid learning rate: -1"),
    (lambda: SGD(lr=torch.tensor(-0.5)), "Invalid learning rate: -0.5"),
    (lambda: SGD(lr={"w": torch.tensor(-2.0)}), r"Invalid learning rate: -2.0 \(lr\['w'\]\)"),
    (lambda: SGD(lr=torch.tensor([0.1, 0.2])), "^Tensor lr must be 1-element$"),
    (lambda: SGD(lr=0.1, momentum=-0.5), "Invalid momentum value: -0.5"),
    (lambda: SGD(lr=0.1, weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (lambda: SGD(lr=0.1, nesterov=True), "Nesterov momentum requires a momentum > 0 and zero dampening but got momentum=0.0"),
    (lambda: SGD(lr="0.1"), "lr must be a float, a floating-point tensor or a dict .* but is: '0.1'"),
    (lambda: SGD(lr=torch.tensor(1)), "lr must be a float or a floating-point tensor but is a tensor of dtype torch.int64"),
    (lambda: Adafactor(lr=-1), "Learning rate should be >= 0 but is: -1"),
    (lambda: Adafactor(lr=torch.tensor([0.1, 0.2])), "^Tensor lr must be 1-element$"),
    (lambda: Adafactor(beta2_decay=0.5), "beta2_decay should be <= 0 but is: 0.5"),
    (lambda: Adafactor(d=0.5), "Clipping threshold d should be >= 1 but is: 0.5"),
    (lambda: Adafactor(eps=(-1e-3, 1e-3)), "epsilon1 should be >= 0 but is: -0.001"),
    (lambda: Adafactor(eps=(None, -1.0)), "epsilon2 should be >= 0 but is: -1.0"),
    (lambda: Adafactor(eps=1e-3), r"eps should be a pair \(eps1, eps2\) but is: 0.001"),
    (lambda: Adafactor(weight_decay=-0.1), "weight_decay should be >= 0 but is: -0.1"),
    (lambda: Adafactor(beta1=1.5), r"beta1 should be in \[0, 1\) or None but is: 1.5"),
    (lambda: Adafactor(min_dim_size_to_factor=0), "min_dim_size_to_factor should be None or an int >= 1 but is: 0"),
    (lambda: Adafactor(grad_clip_norm=-1.0), "grad_clip_norm should be > 0 or None but is: -1.0"),
    (lambda: Adafactor(grad_clip_value=0), "grad_clip_value should be > 0 or None but is: 0"),
    (lambda: Adafactor.from_transformers(lr=1e-3), r"Cannot combine manual `lr` and `relative_step=True` options"),
    (lambda: Adafactor.from_transformers(warmup_init=True, relative_step=False, lr=0.1), r"`warmup_init=True` requires `relative_step=True`"),
    (lambda: Adafactor.from_transformers(relative_step=False), "requires a learning rate `lr` but lr is: None"),
    (lambda: Adafactor.from_transformers(decay_rate=0.3), "decay_rate should be <= 0 but is: 0.3"),
    (lambda: Adafactor.from_transformers(clip_threshold=0.0), "clip_threshold should be > 0 but is: 0.0"),
    (lambda: Adafactor.from_transformers(momentum=0.9), r"Unknown Adafactor option\(s\): \['momentum'\]"),
]


@pytest.mark.parametrize("make, message", BAD_CONSTRUCTORS, ids=[m for _, m in BAD_CONSTRUCTORS])
def test_bad_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


OPTIMIZERS = [SGD(lr=0.1), SGD(lr=0.1, momentum=0.9), Adafactor(), Adafactor.paper()]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_mismatched_keys(opt):
    state = opt.init(P)
    with pytest.raises(ValueError, match=r"missing from grads: \['w'\], not in params: \['v'\]"):
        opt.step(P, {"v": torch.zeros(2, 2)}, state)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_integer_tensors(opt):
    with pytest.raises(ValueError, match=r"params\['n'\] must be a floating-point tensor but has dtype torch.int64"):
        opt.step({"n": torch.zeros(3, dtype=torch.int64)}, {"n": torch.zeros(3)}, opt.init(P))
    with pytest.raises(ValueError, match=r"grads\['w'\] must be a floating-point tensor but has dtype torch.int32"):
        opt.step(P, {"w": torch.zeros(2, 2, dtype=torch.int32)}, opt.init(P))


def test_integer_params_at_init():
    with pytest.raises(ValueError, match=r"params\['n'\] must be a floating-point tensor"):
        Adafactor().init({"n": torch.zeros(3, dtype=torch.int64)})


def test_per_parameter_lr_keys_must_match():
    with pytest.raises(ValueError, match=r"lr: \['v'\], params: \['w'\]"):
        SGD(lr={"v": torch.tensor(0.1)}).init(P)
