"""Shared fixtures. Omniglot is read from ``../shared/data/omniglot`` beside the checkout
(or ``$METAOPT_OMNIGLOT``); CI always has it, so a missing copy is an error, not a skip."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _omniglot_root() -> Path:
    env = os.environ.get("METAOPT_OMNIGLOT")
    return Path(env) if env else REPO.parent / "shared" / "data" / "omniglot"


def pytest_configure(config: pytest.Config) -> None:
    # Tests send Ctrl-C (SIGINT) to the runs they start. A CI runner may start pytest the way
    # a script starts a background job, with SIGINT ignored, which every child would inherit
    # and metaopt would respect (a run stops on SIGTERM only then): Ctrl-C as from a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    root = _omniglot_root()
    if not (root / "images_background.npz").is_file():
        pytest.fail(
            f"Omniglot copy not found at {root}; set METAOPT_OMNIGLOT to the folder that "
            "holds images_background.npz, images_evaluation.npz and index.json"
        )
    return root


@pytest.fixture(autouse=True)
def _one_thread_per_worker():
    # CI has two cores and runs two pytest-xdist workers; one torch thread each avoids
    # oversubscription, which made small conv tests ~100x slower on a busy 2-core machine.
    torch.set_num_threads(1)
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
