"""experiments/optimizer_state.py: its byte counting against sizes worked out by hand, and a
smoke run of both parts on tiny settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from metaopt import optim

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("experiments_optimizer_state", REPO / "experiments/optimizer_state.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _params() -> dict[str, torch.Tensor]:
    # (n, m) = (6, 5) weight, a bias, a 3x3 conv kernel and a 1x1 one: every shape class.
    return {"w": torch.randn(6, 5), "b": torch.randn(6), "k3": torch.randn(4, 2, 3, 3), "k1": torch.randn(4, 2, 1, 1)}


def test_adam_is_two_moments_plus_a_counter(script: ModuleType) -> None:
    params = _params()
    p_bytes = sum(p.numel() * 4 for p in params.values())
    s = script.state_size(optim.get("adam", lr=0.1), params)
    assert s["counter_elements"] >= 1
    assert s["bytes"] == 2 * p_bytes + s["counter_bytes"]
    assert s["elements"] == 2 * sum(p.numel() for p in params.values()) + s["counter_elements"]


def test_sgd_keeps_only_counters_and_momentum_one_buffer(script: ModuleType) -> None:
    params = _params()
    n = sum(p.numel() for p in params.values())
    plain = script.state_size(optim.get("sgd", lr=0.1), params)
    assert plain["elements"] == plain["counter_elements"]
    mom = script.state_size(optim.get("sgd", lr=0.1, momentum=0.9), params)
    assert mom["elements"] - mom["counter_elements"] == n


def test_adafactor_factored_is_n_plus_m(script: ModuleType) -> None:
    w = {"w": torch.randn(6, 5)}
    s = script.state_size(optim.get("adafactor", lr=0.1), w)
    assert (s["elements"], s["bytes"]) == (6 + 5 + 1, 4 * (6 + 5) + 8)  # row + col floats, int64 counter
    full = script.state_size(optim.get("adafactor", lr=0.1, factored=False), w)
    assert (full["elements"], full["bytes"]) == (6 * 5 + 1, 4 * 6 * 5 + 8)


def test_adafactor_torch_rule_on_conv_kernels(script: ModuleType) -> None:
    # The reference rule factors the last two dims: a (4, 2, 3, 3) kernel keeps (4, 2, 3, 1)
    # + (4, 2, 1, 3) = 48 of its 72 elements; a 1x1 kernel keeps twice its size.
    opt = optim.get("adafactor", lr=0.1)
    k3 = script.state_size(opt, {"k": torch.randn(4, 2, 3, 3)})
    k1 = script.state_size(opt, {"k": torch.randn(4, 2, 1, 1)})
    assert k3["elements"] - k3["counter_elements"] == 4 * 2 * 3 + 4 * 2 * 3
    assert k1["elements"] - k1["counter_elements"] == 2 * 4 * 2
    # optax's rule factors the two largest dims (out, in) when both are >= the threshold:
    # an (8, 6, 3, 3) kernel keeps (8, 1, 3, 3) + (1, 6, 3, 3); under the threshold, all of it.
    k = {"k": torch.randn(8, 6, 3, 3)}
    optax = script.state_size(optim.get("adafactor", lr=0.1, min_dim_size_to_factor=4), k)
    assert optax["elements"] - optax["counter_elements"] == 8 * 9 + 6 * 9
    small = script.state_size(optim.get("adafactor", lr=0.1, min_dim_size_to_factor=7), k)
    assert small["elements"] - small["counter_elements"] == 8 * 6 * 9


def test_state_table_and_breakdown(script: ModuleType) -> None:
    rows = {r["inner"]: r for r in script.state_table(["mlp"], ["adam", "adafactor (torch rule, factored)"])}
    adam = rows["adam"]
    assert adam["param_elements"] == 1 * 40 + 40 + 40 * 40 + 40 + 40 * 1 + 1
    assert adam["meta_batch_state_bytes"] == adam["meta_batch"] * adam["state_bytes"]
    assert adam["state_per_param"] == adam["state_bytes"] / adam["param_bytes"]
    # MLP 1-40-40-1 under the torch rule: (40,1) -> 41, (40,40) -> 80, (1,40) -> 41, biases 81
    assert rows["adafactor (torch rule, factored)"]["state_elements"] == 41 + 80 + 41 + 81 + 1


def test_smoke_both_parts(script: ModuleType, tmp_path: Path) -> None:
    code = script.main(["--models", "mlp", "resnet12", "--inners", "sgd", "adam", "adafactor factored=false",
                        "--memory-inners", "adam", "--steps", "1", "--resolution", "16", "--width", "0.125",
                        "--queries", "1", "--out", str(tmp_path)])
    assert code == 0
    res = json.loads((tmp_path / "summary.json").read_text())
    (adam,) = res["memory"]
    assert "error" not in adam, adam
    assert adam["inner"] == "adam" and adam["peak_bytes"] > 0
    assert adam["state_bytes"] == 2 * adam["param_bytes"] + 8  # the measured (width 0.125) model's
    assert "| resnet12 | 12,427,525 | adam |" in (tmp_path / "summary.md").read_text()
    # --memory-from: the measured rows are reused, the exact graph count recomputed
    graph = adam.pop("graph_bytes")
    (tmp_path / "earlier.json").write_text(json.dumps(res))
    assert script.main(["--models", "mlp", "--inners", "adam", "--memory-from", str(tmp_path / "earlier.json"),
                        "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again/summary.json").read_text())
    assert again["memory"][0]["peak_bytes"] == adam["peak_bytes"]
    assert again["memory"][0]["graph_bytes"] == graph > 0
    assert again["memory_from"]["command"] == res["command"]


class _Rule:
    """A stateless inner 'optimizer' whose update is ``p - 0.1 * f(g)``."""

    def __init__(self, f):  # type: ignore[no-untyped-def]
        self.f = f

    def init(self, params: dict[str, torch.Tensor]) -> tuple:
        return ()

    def step(self, params, grads, state):  # type: ignore[no-untyped-def]
        return {k: p - 0.1 * self.f(grads[k]) for k, p in params.items()}, state


def test_graph_bytes_counts_what_autograd_keeps(script: ModuleType) -> None:
    params = {"w": torch.randn(6, 5), "b": torch.randn(6)}
    p_bytes = 4 * (30 + 6)
    assert script.graph_bytes(_Rule(lambda g: g), params) == 0  # scaling by a constant saves nothing
    assert script.graph_bytes(_Rule(lambda g: g * g), params) == p_bytes  # g saved twice, counted once
    assert script.graph_bytes(_Rule(torch.exp), params) == p_bytes  # exp keeps its (new) output
    assert script.graph_bytes(_Rule(torch.exp), params, steps=3) == 3 * p_bytes
    # a real optimizer: SGD keeps nothing, Adam keeps at least its gradients, and more each step
    assert script.graph_bytes(optim.get("sgd", lr=0.1), params) == 0
    adam1 = script.graph_bytes(optim.get("adam", lr=0.1), params)
    assert adam1 >= p_bytes
    adam2 = script.graph_bytes(optim.get("adam", lr=0.1), params, steps=2)
    assert adam2 > adam1
    # sizes, not values: another gradient draw keeps the same bytes (freed addresses reused
    # by new tensors once made this depend on the allocator)
    assert all(script.graph_bytes(optim.get(n, lr=0.1), params, steps=3, seed=s)
               == script.graph_bytes(optim.get(n, lr=0.1), params, steps=3, seed=0)
               for n in ("adam", "adafactor") for s in (1, 2))
