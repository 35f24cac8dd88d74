"""Sinusoid tasks: shapes, the MAML ranges (uniform, by a KS test), targets, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.tasks import Sinusoid, SinusoidParams, TaskBatch

KS_CRITICAL_001 = 1.9495  # Kolmogorov distribution: P(sqrt(n) D_n > 1.9495) = 0.001


def ks_uniform(samples: torch.Tensor, low: float, high: float) -> float:
    """sqrt(n) * sup |F_n - F| against U[low, high] (computed by hand; scipy is not a dependency)."""
    x = torch.sort(samples.double().flatten()).values
    n = x.numel()
    cdf = ((x - low) / (high - low)).clamp(0, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
    return float(d) * math.sqrt(n)


def test_shapes_dtype_device():
    tasks = Sinusoid(shots=10, queries=7)
    batch = tasks.sample(25, torch.Generator().manual_seed(0))
    assert isinstance(batch, TaskBatch)
    (xs, ys), (xq, yq) = batch
    assert xs.shape == ys.shape == (25, 10, 1) and xq.shape == yq.shape == (25, 7, 1)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (xs, ys, xq, yq))
    b64 = tasks.sample(3, torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
    assert b64.support[0].dtype == b64.query[1].dtype == torch.float64
    assert Sinusoid(5, 5, dtype=torch.float64).sample(2, torch.Generator()).support[0].dtype == torch.float64


def test_ranges_and_uniformity_on_10k_tasks():
    tasks = Sinusoid(shots=10, queries=10)
    g = torch.Generator().manual_seed(2024)
    params = tasks.sample_params(10_000, g)
    batch = tasks.batch_for(params, g)
    xs = batch.support[0]
    assert params.amplitude.min() >= 0.1 and params.amplitude.max() <= 5.0
    assert params.phase.min() >= 0 and params.phase.max() <= math.pi
    assert xs.min() >= -5 and xs.max() <= 5 and batch.query[0].abs().max() <= 5
    assert ks_uniform(params.amplitude, 0.1, 5.0) < KS_CRITICAL_001
    assert ks_uniform(params.phase, 0.0, math.pi) < KS_CRITICAL_001
    assert ks_uniform(xs[:, 0], -5.0, 5.0) < KS_CRITICAL_001
    assert ks_uniform(batch.query[0][:, 3], -5.0, 5.0) < KS_CRITICAL_001
    # The test has power: a squeezed range is rejected.
    assert ks_uniform(params.amplitude * 0.95 + 0.005, 0.1, 5.0) > KS_CRITICAL_001


def test_targets_are_a_sin_x_minus_phi():
    tasks = Sinusoid(shots=5, queries=6)
    g = torch.Generator().manual_seed(1)
    params = tasks.sample_params(50, g)
    batch = tasks.batch_for(params, g)
    again = tasks.sample(50, torch.Generator().manual_seed(1))  # sample = sample_params + batch_for
    assert all(torch.equal(a, b) for a, b in zip(batch.support + batch.query, again.support + again.query))
    a, phi = params.amplitude.double()[:, None, None], params.phase.double()[:, None, None]
    for x, y in (batch.support, batch.query):
        torch.testing.assert_close(y.double(), a * torch.sin(x.double() - phi), rtol=1e-5, atol=1e-5)
    # Given parameters: A = 2, phi = 0 is 2 sin(x).
    fixed = tasks.batch_for(SinusoidParams(torch.tensor([2.0]), torch.tensor([0.0])), g)
    torch.testing.assert_close(fixed.support[1], 2 * torch.sin(fixed.support[0]))


def test_custom_ranges():
    tasks = Sinusoid(3, 3, amplitude=(1.0, 1.0), phase=(0.5, 0.5), x_range=(0.0, 1.0))
    (x, y), _ = tasks.sample(10, torch.Generator().manual_seed(0))
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(y, torch.sin(x - 0.5))


def test_seeds():
    tasks = Sinusoid(10, 10)
    a = tasks.sample(4, torch.Generator().manual_seed(0))
    b = tasks.sample(4, torch.Generator().manual_seed(0))
    c = tasks.sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(a.support[0], b.support[0]) and torch.equal(a.query[1], b.query[1])
    assert not torch.equal(a.support[0], c.support[0])
    torch.manual_seed(0)  # global state plays no part
    d = tasks.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(a.query[0], d.query[0])


def test_eval_set_is_fixed():
    tasks = Sinusoid(10, 10)
    e1, e2 = tasks.eval_set(), tasks.eval_set()
    assert e1.num_tasks == 600 and e1.support[0].shape == (600, 10, 1)
    assert all(torch.equal(a, b) for a, b in zip(e1.support + e1.query, e2.support + e2.query))
    assert not torch.equal(e1.support[0], tasks.eval_set(seed=1).support[0])
    assert tasks.eval_set(n=7).num_tasks == 7


@pytest.mark.parametrize("kwargs, match", [
    (dict(shots=0), "shots must be an int >= 1, got 0"),
    (dict(queries=2.5), "queries must be an int >= 1, got 2.5"),
    (dict(amplitude=(5.0, 0.1)), r"amplitude must be finite with low <= high, got \(5.0, 0.1\)"),
    (dict(x_range=5), "x_range must be a pair"),
    (dict(dtype=torch.int64), "floating dtype"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sinusoid(**{"shots": 5, "queries": 5, **kwargs})


def test_generator_required():
    with pytest.raises(TypeError, match="torch.Generator"):
        Sinusoid(5, 5).sample(3, None)  # type: ignore[arg-type]
