"""transformers' Adafactor as the meta-optimizer: a short meta-training run learns.

(Checkpoint-and-resume exactness with it is tests/test_train.py::
test_resume_equals_uninterrupted_bit_for_bit[learned-lr-adafactor-inner-hf-outer].)"""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import pytest

pytest.importorskip("transformers")
T = importlib.import_module("metaopt.train")

QUIET = ["train.progress=false", "train.plots=false", "train.tensorboard=false"]


def _meta_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["meta_loss"]) for r in csv.DictReader(f) if r["meta_loss"]]


@pytest.mark.parametrize(
    "outer",
    [
        ["outer.name=adafactor", "outer.impl=transformers", "outer.lr=null"],  # relative step
        ["outer.name=adafactor", "outer.impl=transformers", "outer.lr=0.003"],  # explicit lr
    ],
    ids=["relative-step", "explicit-lr"],
)
def test_short_run_with_transformers_adafactor_outer_lowers_the_meta_loss(tmp_path: Path, outer: list[str]) -> None:
    sets = QUIET + outer + [
        "train.iterations=600", "train.meta_batch_size=10", "train.eval_every=600",
        "train.eval_tasks=20", "train.test_tasks=20", "train.log_every=1", "train.checkpoint_every=600",
    ]
    T.train("configs/sinusoid.yaml", tmp_path, overrides=sets)
    losses = _meta_losses(tmp_path)
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.8 * first, (first, last)
