"""metaopt.precision: precision_context's contexts and validation, and the engine under the
caller's torch.autocast: float32 losses, inner gradients and inner-optimizer steps, a
16-bit query forward, and a meta-gradient close to float64's (a measured bound on a tiny
Conv4, better than autocasting the whole hand-written loop)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from metaopt.bench.fidelity import POLICIES, fidelity
from metaopt.bench.workloads import WORKLOADS, tiny
from metaopt.maml import MAML
from metaopt.models import MLP
from metaopt.optim import SGD
from metaopt.precision import (PRECISIONS, autocast_dtype, full_precision, loss_input, precision_context,
                               vmap_honours_autocast)
from metaopt.tasks.base import TaskBatch


def test_precision_context_on_cpu() -> None:
    x = torch.randn(3, 4)
    lin = torch.nn.Linear(4, 2)
    for precision, dtype in (("fp32", torch.float32), ("tf32", torch.float32), ("bf16", torch.bfloat16),
                             ("fp16", torch.float16)):
        with precision_context(precision, "cpu"):
            assert lin(x).dtype == dtype, precision
            assert autocast_dtype("cpu") == (None if dtype == torch.float32 else dtype)
        assert not torch.is_autocast_enabled("cpu")
    assert set(PRECISIONS) == {"fp32", "bf16", "fp16", "tf32"}


def test_tf32_flags_are_set_and_restored_even_on_error() -> None:
    # cuDNN's flag is set through its flags() context manager: torch's test utilities (the
    # optim_db tests import them) forbid assigning it directly for the rest of the process.
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            with pytest.raises(RuntimeError, match="boom"):
                with precision_context("tf32", torch.device("cuda")):  # flags only: needs no GPU
                    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
                    raise RuntimeError("boom")
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("bad", ["fp8", "float32", "BF16", None])
def test_bad_precision_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=f"precision should be one of fp32, bf16, fp16, tf32 but is: {bad!r}"):
        precision_context(bad, "cpu")  # type: ignore[arg-type]


def test_bad_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device should be a torch device such as 'cpu' or 'cuda' but is: 'gpu0'"):
        precision_context("bf16", "gpu0")


def test_helpers() -> None:
    h = torch.ones(2, dtype=torch.bfloat16)
    assert loss_input(h) is h  # autocast off: left alone
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_input(h).dtype == torch.float32
        with full_precision("cpu"):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")


class _SpySGD(SGD):
    """SGD that records the dtype of the grads it receives and autocast's state."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr=lr)
        self.seen: list[tuple[torch.dtype, bool]] = []

    def step(self, params, grads, state):  # type: ignore[no-untyped-def]
        self.seen.append((next(iter(grads.values())).dtype, torch.is_autocast_enabled("cpu")))
        return super().step(params, grads, state)


def test_vmap_under_an_autocast_it_ignores_takes_the_loop_or_raises() -> None:
    model = MLP(1, (8,), 1)
    batch = TaskBatch(support=(torch.randn(2, 4, 1), torch.randn(2, 4, 1)),
                      query=(torch.randn(2, 4, 1), torch.randn(2, 4, 1)))
    with precision_context("bf16", "cpu"):
        honoured = vmap_honours_autocast("cpu")
        auto = MAML(model, SGD(lr=0.1), loss_fn=F.mse_loss)
        assert auto._use_vmap(torch.device("cpu")) is honoured  # MLP on CPU: vmap unless ignored
        if not honoured:  # torch 2.13 CPU: vmap ignores autocast (measured by the probe)
            with pytest.raises(ValueError, match="vectorize=True under torch.autocast"):
                MAML(model, SGD(lr=0.1), loss_fn=F.mse_loss, vectorize=True).meta_loss(batch)
    assert vmap_honours_autocast("cpu")  # autocast off: nothing to honour


@pytest.mark.parametrize("vectorize", [False, "auto"])
def test_engine_under_autocast_keeps_the_inner_loop_and_losses_in_float32(vectorize: object) -> None:
    torch.manual_seed(0)
    model = MLP(1, (16, 16), 1)
    opt = _SpySGD(lr=0.01)
    maml = MAML(model, opt, inner_steps=2, loss_fn=F.mse_loss, vectorize=vectorize)
    batch = TaskBatch(support=(torch.randn(3, 8, 1), torch.randn(3, 8, 1)),
                      query=(torch.randn(3, 8, 1), torch.randn(3, 8, 1)))
    ref = maml.meta_loss(batch)
    seen_query: list[torch.dtype] = []
    hook = model.net[-1].register_forward_hook(lambda m, i, o: seen_query.append(o.dtype))
    with precision_context("bf16", "cpu"):
        out = maml.meta_loss(batch)
    hook.remove()
    assert out.loss.dtype == torch.float32 and out.query_loss.dtype == torch.float32
    assert torch.bfloat16 in seen_query  # the query forward ran in bfloat16
    assert all(dt == torch.float32 and not amp for dt, amp in opt.seen)  # inner steps: float32, autocast off
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)  # bfloat16-close, not equal
    with precision_context("bf16", "cpu"):
        params = maml.adapt(batch.support[0][0], batch.support[1][0], train=True)
    assert all(p.dtype == torch.float32 for p in params.values())


def test_engine_bf16_meta_gradient_fidelity_on_tiny_conv4() -> None:
    # Measured: tiny O1 (Conv4 with 8 filters, 2 tasks): engine cosine 0.994 against float64,
    # a hand-written loop entirely under autocast 0.88.
    w = replace(tiny(WORKLOADS["O1"]), queries=3)
    rows = {r["policy"]: r for r in fidelity(w, ("fp32", "autocast", "engine"), dtype=torch.bfloat16)}
    assert rows["fp32"]["cosine"] > 0.99999
    assert rows["engine"]["cosine"] >= 0.99
    assert rows["engine"]["rel_err"] < rows["autocast"]["rel_err"]
    assert set(rows["engine"]["layers"]) == {k for k, _ in __import__("metaopt.bench.workloads", fromlist=["x"])
                                             .make_model(w).named_parameters()}
    assert rows["engine"]["layers"]["features.0.conv.bias"]["cosine"] is None  # zero in float64: no direction
    assert len(POLICIES) == 5


# ---------------------------------------------------------------------------- fp16 loss scaling


def _sinusoid_batch(tasks: int = 8) -> TaskBatch:
    from metaopt.tasks import Sinusoid
    return Sinusoid().sample(tasks, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("vectorize", [False, True])
def test_loss_scale_scales_the_meta_gradient_exactly(vectorize: bool) -> None:
    torch.manual_seed(0)
    maml = MAML(MLP(), SGD(lr=0.01), 2, loss_fn=F.mse_loss, vectorize=vectorize)
    batch = _sinusoid_batch()
    plain = maml.meta_loss(batch, train=True, backward=True)
    g = [p.grad.clone() for p in maml.parameters()]
    maml.zero_grad()
    scaled = maml.meta_loss(batch, train=True, backward=True, loss_scale=torch.tensor(1024.0))
    assert torch.equal(plain.query_loss, scaled.query_loss)  # the returned losses are unscaled
    for a, p in zip(g, maml.parameters()):
        assert torch.equal(a * 1024, p.grad)  # a power of two: exact
    with pytest.raises(ValueError, match="loss_scale=...\\) needs backward=True"):
        maml.meta_loss(batch, train=True, loss_scale=2.0)


def test_fp16_meta_gradient_underflows_without_the_scaler_and_not_with_it() -> None:
    """A small loss (1e-7 x MSE): its gradient at the float16 query output is below float16's
    smallest subnormal (6e-8), so without scaling the whole meta-gradient flushes to zero;
    at the GradScaler's default scale (2^16) it matches float32."""
    torch.manual_seed(0)
    maml = MAML(MLP(), SGD(lr=0.01), 1, loss_fn=lambda o, t: 1e-7 * F.mse_loss(o, t), vectorize=False)
    batch = _sinusoid_batch()

    def meta_grad(scale: float | None, fp16: bool) -> torch.Tensor:
        maml.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            maml.meta_loss(batch, train=True, backward=True, loss_scale=scale)
        return torch.cat([p.grad.flatten() for p in maml.parameters()]) / (scale or 1.0)

    ref = meta_grad(None, False)
    assert ref.abs().max() > 0
    assert torch.count_nonzero(meta_grad(None, True)) == 0  # underflow: all zero
    assert F.cosine_similarity(meta_grad(2.0**16, True), ref, 0) > 0.9999


def test_meta_step_with_a_grad_scaler() -> None:
    """In float32 a GradScaler changes nothing (power-of-two scale, exact unscale); on overflow
    the outer step is skipped and the scale lowered, without stopping training."""
    import copy
    from metaopt.loop import meta_step
    torch.manual_seed(0)
    a = MAML(MLP(), SGD(lr=0.01), 1, loss_fn=F.mse_loss)
    b = copy.deepcopy(a)
    oa, ob = torch.optim.Adam(a.parameters(), 1e-3), torch.optim.Adam(b.parameters(), 1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    batch = _sinusoid_batch(4)
    for _ in range(3):
        sa, sb = meta_step(a, oa, batch), meta_step(b, ob, batch, scaler=scaler)
        assert sa == sb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = MAML(MLP(), SGD(lr=0.01), 1, loss_fn=lambda o, t: 1e3 * F.mse_loss(o, t))  # gradients >> 1
    oc = torch.optim.Adam(c.parameters(), 1e-3)
    huge = torch.amp.GradScaler("cpu", init_scale=3e38)  # scaled gradients overflow float32
    before = [p.detach().clone() for p in c.parameters()]
    stats = meta_step(c, oc, batch, scaler=huge)
    assert math.isfinite(stats.meta_loss)
    assert all(torch.equal(p, q) for p, q in zip(before, c.parameters()))  # step skipped
    assert huge.get_scale() == pytest.approx(1.5e38)  # backoff_factor 0.5


def test_trainer_fp16_keeps_the_scaler_in_its_checkpoint(tmp_path) -> None:
    from metaopt.train import Trainer, load_checkpoint
    sets = ["train.iterations=2", "train.eval_every=0", "train.test_tasks=4", "train.meta_batch_size=2",
            "train.progress=false", "train.plots=false", "train.tensorboard=false"]
    t = Trainer(None, tmp_path, overrides=[*sets, "train.precision=fp16"])
    assert isinstance(t.scaler, torch.amp.GradScaler)
    t.fit()
    t.scaler.update(new_scale=12345.0)
    t.save()
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["scaler"]["scale"] == 12345.0
    again = Trainer(None, tmp_path, overrides=[*sets, "train.precision=fp16"], resume=True)
    assert again.scaler is not None and again.scaler.get_scale() == 12345.0
    assert Trainer(None, None, overrides=sets).scaler is None  # fp32 (and bf16): no scaler
