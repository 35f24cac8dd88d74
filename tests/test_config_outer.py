"""The outer-optimizer factory: torch.optim optimizers and both Adafactors."""

from __future__ import annotations

import pytest
import torch

from metaopt.outer import build_outer_optimizer


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                      ("sgd", torch.optim.SGD), ("adafactor", torch.optim.Adafactor)])
def test_torch_optimizers(name: str, cls: type) -> None:
    opt = build_outer_optimizer({"name": name, "lr": 0.01}, _params())
    assert type(opt) is cls and opt.defaults["lr"] == 0.01


def test_kwargs_and_lists_become_tuples() -> None:
    opt = build_outer_optimizer("adam", _params(), lr=1e-3, betas=[0.8, 0.9])
    assert opt.defaults["betas"] == (0.8, 0.9)
    opt = build_outer_optimizer({"name": "adafactor", "lr": 0.01, "eps": [None, 1e-3]}, _params())
    assert opt.defaults["eps"] == (None, 1e-3)


def test_transformers_relative_step_mode() -> None:
    from transformers.optimization import Adafactor

    opt = build_outer_optimizer({"name": "adafactor", "impl": "transformers", "lr": None}, _params())
    assert isinstance(opt, Adafactor)
    assert opt.defaults["relative_step"] and opt.defaults["scale_parameter"] and opt.defaults["lr"] is None


def test_transformers_explicit_lr_mode() -> None:
    opt = build_outer_optimizer({"name": "adafactor", "impl": "transformers", "lr": 1e-3}, _params())
    assert opt.defaults["lr"] == 1e-3
    assert not opt.defaults["relative_step"] and not opt.defaults["scale_parameter"]
    opt = build_outer_optimizer({"name": "adafactor", "impl": "transformers", "lr": 1e-3, "scale_parameter": True},
                                _params())
    assert opt.defaults["scale_parameter"]


def test_transformers_lr_with_relative_step_is_refused() -> None:
    with pytest.raises(ValueError, match="relative"):
        build_outer_optimizer({"name": "adafactor", "impl": "transformers", "lr": 1e-3, "relative_step": True},
                              _params())


@pytest.mark.parametrize("spec", [{"name": "adafactor", "impl": "torch", "lr": 0.01},
                                  {"name": "adafactor", "impl": "transformers", "lr": None},
                                  {"name": "adafactor", "impl": "transformers", "lr": 0.01}])
def test_adafactor_outer_steps_reduce_a_quadratic(spec: dict) -> None:
    p = _params()
    opt = build_outer_optimizer(spec, p)
    start = sum(float((q.detach() ** 2).sum()) for q in p)
    for _ in range(20):
        opt.zero_grad()
        sum((q ** 2).sum() for q in p).backward()
        opt.step()
    assert sum(float((q.detach() ** 2).sum()) for q in p) < start


def test_state_dict_round_trip_with_weights_only(tmp_path) -> None:
    for spec in ({"name": "adafactor", "impl": "transformers", "lr": None}, {"name": "adafactor", "lr": 0.01}):
        p = _params()
        opt = build_outer_optimizer(spec, p)
        sum((q ** 2).sum() for q in p).backward()
        opt.step()
        torch.save(opt.state_dict(), tmp_path / "o.pt")
        state = torch.load(tmp_path / "o.pt", weights_only=True)
        build_outer_optimizer(spec, _params()).load_state_dict(state)


@pytest.mark.parametrize("spec,match", [({"name": "lion"}, "unknown outer optimizer"),
                                        ({"name": "adam", "impl": "jax"}, "impl"),
                                        ({"name": "adam", "lr": -1.0}, "learning rate"),
                                        ({"name": "adam", "nope": 1}, "invalid arguments")])
def test_bad_specs(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"(?i){match}"):
        build_outer_optimizer(spec, _params())
