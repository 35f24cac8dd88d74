"""Parity with torch.optim on PyTorch's own optimizer test inputs (``optim_db``).

For every preset with a torch.optim counterpart, every ``OptimizerInput`` torch tests that
class with (``optim_inputs_func``), with the implementation flags dropped (foreach, fused,
capturable, differentiable: they select kernels, not values), is run for 50 steps of
random float64 gradients on 0-D..4-D params next to torch's optimizer; the parameter
change must agree to 1e-12 relative (2-norm per param). torch's error inputs
(``optim_error_inputs_func``) that are expressible with our arguments must raise the same
exception type with a message matching torch's regex.

Tensor hyperparameters are converted to float64 for both (torch.optim.Muon would compute
``1 - lr * weight_decay`` in float32 from a float32 tensor ``lr``; ours casts to the params'
dtype first, see test_hyperparams.py). Not expressible (skipped, counted in the report): inputs with explicit param groups or
named params (our params are one ``dict[str, Tensor]``), complex params, and error inputs
about implementation flags.

The reference runs with ``torch.set_default_dtype(torch.float64)``: torch keeps some
scalars (NAdam's ``mu_product``, step counters) in the default dtype, which would
otherwise round them to float32 while the params are float64.

Run as a script to print the per-optimizer table of docs/optimizers.md::

    python tests/optim/test_optim_db.py
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from optim_helpers import SHAPES, relative_change_error, run_pair  # noqa: E402

from metaopt import optim  # noqa: E402

common = pytest.importorskip("torch.testing._internal.common_optimizers", reason="needs expecttest")
optim_db = common.optim_db

IMPL_FLAGS = ("foreach", "fused", "capturable", "differentiable")
TOL = 1e-12
STEPS = 50
MUON_SHAPES = {"weight": (5, 6), "tall": (7, 3), "square": (4, 4)}

# torch class name -> our preset (same constructor arguments)
PRESETS = {
    "SGD": optim.SGD, "Adam": optim.Adam, "AdamW": optim.AdamW, "RMSprop": optim.RMSprop,
    "Adagrad": optim.Adagrad, "Adafactor": optim.Adafactor, "Adamax": optim.Adamax,
    "NAdam": optim.NAdam, "RAdam": optim.RAdam, "Adadelta": optim.Adadelta, "Muon": optim.Muon,
}
INFOS = {info.optim_cls.__name__: info for info in optim_db if info.optim_cls.__name__ in PRESETS}


@contextlib.contextmanager
def default_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _inputs(name):
    """[(id, kwargs or None, skip reason or None)] for the class's optim_db inputs."""
    out = []
    for i, inp in enumerate(INFOS[name].optim_inputs_func(device="cpu")):
        kwargs = {k: v for k, v in inp.kwargs.items() if k not in IMPL_FLAGS}
        # Tensor hyperparameters in the params' dtype: given a float32 tensor lr, torch.optim.Muon
        # computes 1 - lr * wd in float32 (1e-4 of the decay off); ours computes it in float64.
        kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        reason = "explicit param groups" if inp.params is not None else None
        out.append((f"{name}-{i}-{inp.desc}", kwargs, reason))
    return out


def run_input(name, kwargs):
    """Max relative error of the param change after STEPS steps, ours vs torch."""
    shapes = MUON_SHAPES if name == "Muon" else SHAPES  # Muon: 2-D params only
    with default_float64():
        ref_cls = INFOS[name].optim_cls
        p0, ours, ref = run_pair(PRESETS[name](**kwargs), lambda ps: ref_cls(ps, **kwargs), shapes,
                                 torch.float64, steps=STEPS)
    return relative_change_error(p0, ours, ref)


CASES = [(name, case) for name in PRESETS for case in _inputs(name)]


@pytest.mark.parametrize("name, case", CASES, ids=[c[0] for _, c in CASES])
def test_optim_db_parity(name, case):
    _, kwargs, reason = case
    if reason:
        pytest.skip(reason)
    err = run_input(name, kwargs)
    assert err < TOL, f"{name}({kwargs}): relative error {err:.3g}"


def _error_inputs(name):
    """[(id, kwargs, error_type, regex, skip reason)] for the class's optim_db error inputs."""
    out = []
    sig = optim.allowed_kwargs(name.lower())
    for i, e in enumerate(INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float64)):
        inp = e.optimizer_error_input
        reason = None
        if inp.params is not None:
            reason = "param-group structure / complex params (not expressible with dict[str, Tensor])"
        elif set(inp.kwargs) & set(IMPL_FLAGS):
            reason = "about an implementation flag (foreach/fused/capturable)"
        elif not set(inp.kwargs) <= set(sig):
            reason = f"arguments not in ours: {sorted(set(inp.kwargs) - set(sig))}"
        out.append((f"{name}-err{i}-{e.error_regex[:40]}", dict(inp.kwargs), e.error_type, e.error_regex, reason))
    return out


ERR_CASES = [(name, case) for name in PRESETS for case in _error_inputs(name)]


@pytest.mark.parametrize("name, case", ERR_CASES, ids=[c[0] for _, c in ERR_CASES])
def test_optim_db_error_inputs(name, case):
    _, kwargs, error_type, regex, reason = case
    if reason:
        pytest.skip(reason)
    with pytest.raises(error_type, match=regex):
        opt = PRESETS[name](**kwargs)
        opt.step(*({"w": torch.zeros(2, 2)},) * 2, opt.init({"w": torch.zeros(2, 2)}))


def report() -> str:
    """The per-optimizer table of docs/optimizers.md."""
    rows = ["| torch.optim | inputs run | max rel. error | inputs skipped | error inputs checked | skipped |",
            "|---|---|---|---|---|---|"]
    for name in PRESETS:
        errs, skipped = [], []
        for _, kwargs, reason in _inputs(name):
            if reason:
                skipped.append(reason)
            else:
                errs.append(run_input(name, kwargs))
        checked, eskipped = 0, {}
        for _, kwargs, etype, regex, reason in _error_inputs(name):
            if reason:
                key = reason.split(" (")[0]
                eskipped[key] = eskipped.get(key, 0) + 1
                continue
            try:
                opt = PRESETS[name](**kwargs)
                opt.step(*({"w": torch.zeros(2, 2)},) * 2, opt.init({"w": torch.zeros(2, 2)}))
                raise AssertionError(f"{name}({kwargs}) did not raise")
            except etype as ex:
                assert re.search(regex, str(ex)), (name, kwargs, str(ex))
                checked += 1
        skip_txt = "; ".join(f"{n} {k}" for k, n in eskipped.items()) or "-"
        rows.append(f"| {name} | {len(errs)} | {max(errs):.1e} | {len(skipped) or '-'} | {checked} | {skip_txt} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(report())
