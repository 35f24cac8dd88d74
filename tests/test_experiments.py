"""Smoke test: each experiment script runs a couple of steps on tiny settings and writes
its JSON and markdown results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.iterations=2", "train.eval_every=1", "train.eval_tasks=2", "train.test_tasks=4",
        "train.meta_batch_size=2", "train.progress=false", "train.tensorboard=false",
        "model.filters=8", "task.queries=1", "inner.eval_steps=1"]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", REPO / "experiments" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sets(extra: list[str] = []) -> list[str]:
    return [a for s in TINY + extra for a in ("--set", s)]


def test_reproduce_maml(tmp_path: Path, omniglot_root: Path, capsys: pytest.CaptureFixture) -> None:
    mod = _load("reproduce_maml")
    code = mod.main(["--settings", "sinusoid_5shot,omniglot_20w5s", "--runs", str(tmp_path / "runs"),
                     "--results", str(tmp_path / "results"), "--device", "cpu",
                     *_sets([f"task.root={omniglot_root}"])])
    assert code == 0
    data = json.loads((tmp_path / "results/maml_reproduction.json").read_text())
    assert [r["setting"] for r in data["rows"]] == ["sinusoid_5shot", "omniglot_20w5s"]
    assert [r["metric"] for r in data["rows"]] == ["mse", "accuracy"]
    assert all(r["iteration"] == 2 for r in data["rows"])
    md = (tmp_path / "results/maml_reproduction.md").read_text()
    assert "omniglot_20w5s" in md and "98.9 ± 0.2%" in md
    assert (tmp_path / "runs/omniglot_20w5s/results.json").is_file()


def test_reproduce_maml_adafactor_variant(tmp_path: Path) -> None:
    mod = _load("reproduce_maml")
    assert mod.main(["--settings", "sinusoid_10shot", "--inner", "adafactor", "--runs", str(tmp_path / "runs"),
                     "--results", str(tmp_path / "results"), *_sets()]) == 0
    data = json.loads((tmp_path / "results/maml_reproduction_adafactor.json").read_text())
    assert data["rows"][0]["inner"] == "adafactor"


def test_compare_inner(tmp_path: Path) -> None:
    mod = _load("compare_inner")
    code = mod.main(["--config", str(REPO / "configs/sinusoid.yaml"), "--inner", "sgd,adafactor", "--seeds", "2",
                     "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), *_sets()])
    assert code == 0
    data = json.loads((tmp_path / "results/inner_comparison_sinusoid.json").read_text())
    assert [r["inner"] for r in data["rows"]] == ["sgd", "adafactor"]
    assert "| adafactor | 2 |" in (tmp_path / "results/inner_comparison_sinusoid.md").read_text()
    assert (tmp_path / "runs/plots/compare_val_mse.png").stat().st_size > 5000


def test_profile_step_breaks_a_meta_iteration_down(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mod = _load("profile_step")
    out = tmp_path / "profile.json"
    assert mod.main(["--workload", "O1", "--impl", "plain", "--tiny", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| convolution forward |" in text and "| kind | ms / meta-it | share |" in text
    data = json.loads(out.read_text())
    cats = data["categories_ms"]
    # Conv4 on the plain loop runs convolutions forward and backward; every category is >= 0.
    assert cats["convolution forward"] > 0 and cats["convolution backward"] > 0
    assert all(v >= 0 for v in cats.values())
    # An implementation without a differentiable Adafactor is refused with the reason.
    assert mod.main(["--workload", "S1", "--impl", "plain", "--inner", "adafactor", "--tiny"]) == 2
    assert "no differentiable Adafactor" in capsys.readouterr().err
    # Bad counts are refused with the flag and the value.
    for flag in ("--meta-batch", "--iterations", "--threads", "--top"):
        with pytest.raises(SystemExit):
            mod.main([flag, "0", "--tiny"])
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
