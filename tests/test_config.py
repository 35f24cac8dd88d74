"""Config files: defaults, ``base:`` includes, ``--set`` overrides, key-by-key checking."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metaopt import config
from metaopt.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_are_the_sinusoid_protocol() -> None:
    cfg = config.resolve({})
    assert cfg["task"]["name"] == "sinusoid" and cfg["model"]["name"] == "mlp"
    assert cfg["model"]["hidden_sizes"] == [40, 40]
    assert (cfg["inner"]["name"], cfg["inner"]["lr"], cfg["inner"]["steps"]) == ("sgd", 0.01, 1)
    assert (cfg["outer"]["name"], cfg["outer"]["lr"]) == ("adam", 0.001)
    assert cfg["train"]["meta_batch_size"] == 25
    assert cfg["inner"]["eval_steps"] == cfg["inner"]["steps"]  # null resolves to steps


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_resolves(path: Path) -> None:
    cfg = config.load(path)
    assert set(cfg) == set(config.SECTIONS)
    # The resolved config round-trips through YAML unchanged.
    assert config.resolve(yaml.safe_load(config.dump(cfg))) == cfg


def test_paper_protocols() -> None:
    s10, s5 = config.load(REPO / "configs/sinusoid_10shot.yaml"), config.load(REPO / "configs/sinusoid_5shot.yaml")
    assert s10["train"]["iterations"] == s5["train"]["iterations"] == 70000
    assert (s10["task"]["shots"], s5["task"]["shots"]) == (10, 5)
    o = {n: config.load(REPO / f"configs/omniglot_{n}.yaml") for n in ("5w1s", "5w5s", "20w1s", "20w5s")}
    for n, c in o.items():
        five = n.startswith("5w")
        assert c["task"]["ways"] == (5 if five else 20)
        assert c["task"]["shots"] == int(n[-2])
        assert (c["inner"]["lr"], c["inner"]["steps"]) == ((0.4, 1) if five else (0.1, 5))
        assert c["train"]["meta_batch_size"] == (32 if five else 16)
        assert c["train"]["iterations"] == 60000 and c["model"]["name"] == "conv4"
        assert c["train"]["test_tasks"] == 600
        af = config.load(REPO / f"configs/omniglot_{n}_adafactor.yaml")
        assert af["inner"]["name"] == "adafactor" and af["task"] == c["task"]
    quick = config.load(REPO / "configs/sinusoid.yaml")
    assert quick["train"]["iterations"] < 70000


def test_base_include_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("train: {iterations: 7, seed: 3}\ninner: {lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {iterations: 9}\n")
    cfg = config.load(tmp_path / "b.yaml", ["inner.steps=4", "model.hidden_sizes=[8, 8]", "outer.lr=1e-4"])
    assert cfg["train"]["iterations"] == 9 and cfg["train"]["seed"] == 3  # deep merge
    assert cfg["inner"]["lr"] == 0.5 and cfg["inner"]["steps"] == 4
    assert cfg["model"]["hidden_sizes"] == [8, 8]
    assert cfg["outer"]["lr"] == 1e-4


def test_yaml_exponent_without_dot_reads_as_float(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("outer: {lr: 1e-3}\n")  # a string in YAML 1.1
    assert config.load(tmp_path / "c.yaml")["outer"]["lr"] == 1e-3


def test_include_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        config.load(tmp_path / "a.yaml")


def test_safe_load_only(tmp_path: Path) -> None:
    (tmp_path / "evil.yaml").write_text("train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        config.load(tmp_path / "evil.yaml")


BAD = [
    ({"train": {"iterationz": 5}}, "train.iterationz"),
    ({"bogus": {}}, "bogus"),
    ({"train": {"iterations": "ten"}}, "train.iterations"),
    ({"train": {"iterations": True}}, "train.iterations"),
    ({"train": {"meta_batch_size": 0}}, "train.meta_batch_size"),
    ({"inner": {"lr": -0.1}}, "inner.lr"),
    ({"inner": {"lr": "fast"}}, "inner.lr"),
    ({"inner": {"first_order": "no way"}}, "inner.first_order"),
    ({"inner": {"name": "adamz"}}, "inner.name"),
    ({"inner": {"beta2_decay": -0.5}}, "inner.beta2_decay"),  # not an SGD argument
    ({"inner": {"momentum": -1.0}}, "Invalid momentum value"),
    ({"inner": {"name": "adafactor", "beta2_decay": 0.5}}, "beta2_decay should be <= 0"),
    ({"outer": {"name": "lion"}}, "outer.name"),
    ({"outer": {"lr": -1}}, "outer.lr"),
    ({"outer": {"lr": None}}, "outer.lr"),
    ({"outer": {"foo": 1}}, "outer.foo"),
    ({"outer": {"weight_decay": -1}}, "weight_decay"),
    ({"outer": {"name": "adafactor", "impl": "transformers", "lr": 0.01, "relative_step": True}}, "relative"),
    ({"outer": {"impl": "transformers"}}, "only available for adafactor"),
    ({"task": {"name": "imagenet"}}, "task.name"),
    ({"task": {"ways": 5}}, "task.ways"),  # sinusoid has no ways
    ({"task": {"image_size": 28}}, "task.image_size"),  # an Omniglot argument, not a Sinusoid one
    ({"task": {"name": "omniglot", "ways": 0}}, "task.ways should be an int >= 1 but is: 0"),
    ({"model": {"name": "resnet"}}, "model.name"),
    ({"model": {"widths": [3]}}, "model.widths"),
    ({"train": {"precision": "fp8"}}, "train.precision should be one of fp32, bf16, fp16, tf32 but is: 'fp8'"),
    ({"train": {"iterations": -1}}, "train.iterations should be an int >= 1 but is: -1"),
    ({"model": {"name": "conv4"}}, "model.name"),
    ({"model": {"hidden_sizes": [40, "x"]}}, "model.hidden_sizes"),
    ({"train": {"device": "tpu"}}, "train.device"),
    ({"train": None, "inner": 3}, "inner"),
]


@pytest.mark.parametrize("data,needle", BAD, ids=[n for _, n in BAD])
def test_bad_configs_name_the_problem(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.resolve(data)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["iterations"])
    with pytest.raises(ConfigError, match="not found"):
        config.load("no/such/file.yaml")


def test_optimizer_arguments_pass_through() -> None:
    cfg = config.resolve({"inner": {"momentum": 0.9}, "outer": {"name": "adamw", "weight_decay": 0.1,
                                                                "betas": [0.8, 0.99]}})
    assert cfg["inner"]["momentum"] == 0.9 and cfg["outer"]["betas"] == [0.8, 0.99]
    hf = config.resolve({"outer": {"name": "adafactor", "impl": "transformers", "lr": None}})
    assert hf["outer"]["lr"] is None


def test_save_writes_resolved_yaml(tmp_path: Path) -> None:
    cfg = config.load(REPO / "configs/omniglot_20w5s.yaml")
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_precision_key() -> None:
    assert config.resolve({})["train"]["precision"] == "fp32"
    assert config.resolve({"train": {"precision": "bf16"}})["train"]["precision"] == "bf16"


def test_omniglot_task_keys_pass_through_and_ways_defaults_to_the_constructor() -> None:
    cfg = config.resolve({"task": {"name": "omniglot", "image_size": 14, "rotations": False}})
    assert cfg["model"]["name"] == "conv4" and cfg["task"]["image_size"] == 14 and cfg["task"]["ways"] is None


def test_inner_section_passes_every_preset_argument_through() -> None:
    """An inner optimizer registered with torch's argument names (as the adam/rmsprop/lion
    presets): every key it takes reaches it (lists as tuples), anything else is refused
    with the allowed keys listed."""
    from metaopt import optim
    from metaopt.build import build_inner

    seen: dict = {}

    def adamish(lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8, amsgrad: bool = False):
        seen.update(lr=lr, betas=betas, eps=eps, amsgrad=amsgrad)
        return optim.SGD(lr=lr)

    optim.register("adamish", adamish)
    try:
        cfg = config.resolve({"inner": {"name": "adamish", "lr": 0.1, "betas": [0.5, 0.9], "eps": 1e-6,
                                        "amsgrad": True}})
        seen.clear()
        build_inner(cfg)
        assert seen == {"lr": 0.1, "betas": (0.5, 0.9), "eps": 1e-6, "amsgrad": True}
        with pytest.raises(ConfigError, match=r"^unknown config key 'inner.momentum' for inner optimizer "
                                              r"'adamish'; allowed keys: amsgrad, betas, eps, eval_steps, "):
            config.resolve({"inner": {"name": "adamish", "momentum": 0.9}})
    finally:
        optim.unregister("adamish")
