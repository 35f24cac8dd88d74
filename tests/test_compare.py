"""metaopt.compare from Python: --inner specs, per-optimizer configs, the markdown tables,
reports, restartable runs.
(The full ``metaopt compare`` command and the experiment scripts: test_cli.py, test_experiments.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from metaopt import compare as C
from metaopt.config import ConfigError

QUICK = ["train.iterations=2", "train.eval_every=1", "train.eval_tasks=2", "train.test_tasks=4",
         "train.meta_batch_size=2", "train.progress=false", "train.plots=false", "train.tensorboard=false"]


def test_parse_inner_specs() -> None:
    assert C.parse_inner_specs(" sgd, adafactor:lr=0.3:beta2_decay=-0.5 ,") == [
        ("sgd", ["inner.name=sgd"]),
        ("adafactor:lr=0.3:beta2_decay=-0.5", ["inner.name=adafactor", "inner.lr=0.3", "inner.beta2_decay=-0.5"]),
    ]


@pytest.mark.parametrize("text, match", [
    ("", "at least one"), (" , ", "at least one"), ("sgd,sgd", "twice"), ("adafactor:lr", "expected NAME"),
])
def test_parse_inner_specs_rejects(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        C.parse_inner_specs(text)


def test_inner_config_drops_the_other_optimizers_keys() -> None:
    base = {"inner": {"name": "adafactor", "lr": 0.1, "steps": 3, "beta2_decay": -0.5}}
    same = C._inner_config(base, [], ["inner.name=adafactor", "inner.lr=0.3"])["inner"]
    assert (same["lr"], same["steps"], same["beta2_decay"]) == (0.3, 3, -0.5)
    other = C._inner_config(base, ["inner.steps=2"], ["inner.name=sgd"])["inner"]
    assert other["name"] == "sgd" and other["lr"] == 0.1 and other["steps"] == 2 and "beta2_decay" not in other


def test_slug() -> None:
    assert C._slug("adafactor:lr=0.1") == "adafactor_lr=0.1"
    assert C._slug("a b/c") == "a_b_c"


def test_fmt_metric() -> None:
    assert C._fmt_metric("accuracy", 0.9, 0.01) == "90.00% ± 1.00%"
    assert C._fmt_metric("mse", 0.12345) == "0.1235"
    assert C._fmt_metric("mse", None) == C._fmt_metric("mse", math.nan) == "n/a"


def test_markdown_tables() -> None:
    assert C.markdown_table([]) == "(no runs)\n"
    md = C.markdown_table([{"inner": "sgd", "seeds": 2, "metric": "mse", "mean": 0.5, "ci95": 0.1,
                            "before_mean": None, "tasks": 4, "iterations": 10}], title="sine")
    assert md.startswith("### sine\n") and "| sgd | 2 | 10 | 0.5000 ± 0.1000 | n/a | 4 |" in md
    rep = C.reproduction_markdown([{"setting": "omniglot_5w1s", "inner": "sgd", "iteration": 2, "metric": "accuracy",
                                    "mean": 0.5, "ci95": 0.1, "before": {"mean": 0.2}, "tasks": 4,
                                    "paper": C.PAPER_SETTINGS["omniglot_5w1s"][1]}])
    assert "| omniglot_5w1s | sgd | 2 | accuracy 50.00% ± 10.00% | 20.00% | 4 | 98.7 ± 0.4% |" in rep


def test_write_report(tmp_path: Path) -> None:
    j, m = C.write_report(tmp_path / "results", "r", {"a": 1}, "# hi\n")
    assert json.loads(j.read_text()) == {"a": 1} and m.read_text() == "# hi\n"


def test_bad_arguments_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--seeds"):
        C.compare({}, "sgd", 0, tmp_path)
    with pytest.raises(ConfigError, match="unknown setting"):
        C.reproduce(["nope"], tmp_path)
    assert not any(tmp_path.iterdir())


def test_compare_reuses_finished_and_resumes_interrupted_runs(tmp_path: Path) -> None:
    logged: list[str] = []
    first = C.compare({}, "sgd", 2, tmp_path, overrides=QUICK, device="cpu", log=logged.append)
    assert len(logged) == 2 and first["rows"][0]["seeds"] == 2
    (tmp_path / "sgd" / "seed1" / "results.json").unlink()  # seed 1 interrupted after its checkpoint
    logged.clear()
    again = C.compare({}, "sgd", 2, tmp_path, overrides=QUICK, device="cpu", log=logged.append)
    assert logged == [] and (tmp_path / "sgd" / "seed1" / "results.json").is_file()
    assert again["rows"][0]["per_seed"] == pytest.approx(first["rows"][0]["per_seed"])
