"""Composable update transforms (optax's ``GradientTransformation``) over ``dict[str, Tensor]``.

A transform is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)

``chain(a, b, ...)`` feeds ``a``'s updates to ``b``. An optimizer is a chain ending in
:func:`scale_by_learning_rate` (which turns a direction into a step ``-lr * u``); the
presets (:class:`~metaopt.optim.Adam`, ...) apply ``params + updates``.

Every ``update`` is out of place, differentiable (w.r.t. grads, params, state and tensor
hyperparameters), works under ``torch.func.vmap`` and never reads a tensor on the host:
step-dependent scalars (bias corrections, schedules) are 0-dim tensors computed from the
state's int64 step counter, and choices that torch makes with Python ``if`` on the step
(RAdam's rectification) are ``torch.where``.

Hyperparameters may be Python floats (kept as floats: no kernel, exact) or 0-dim tensors
(meta-learnable; cast to each update's dtype). Learning rates may also be a dict keyed like
params (per-parameter / per-element rates, Meta-SGD) or a schedule ``f(count) -> lr``
called with the 0-dim int64 tensor of steps taken so far.

The pieces live in four modules, one concept each; this one re-exports every public name of
the other three, so ``from metaopt.optim.transforms import X`` finds every transform:

* :mod:`metaopt.optim.transform_base` - ``GradientTransformation``, ``chain``, ``identity``;
* this module - scaling and learning rates, weight decay, momentum and moments, clipping;
* :mod:`metaopt.optim.factored` - Adafactor's factored second moment, update clipping and
  parameter scaling;
* :mod:`metaopt.optim.orthogonal` - Muon's Newton-Schulz orthogonalisation.

Example:
    >>> import torch
    >>> from metaopt.optim import transforms as T
    >>> tx = T.chain(T.add_decayed_weights(0.1), T.trace(momentum=0.9), T.scale_by_learning_rate(0.5))
    >>> params = {"w": torch.ones(2)}
    >>> updates, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
    >>> updates["w"]   # -0.5 * (1 + 0.1 * 1)
    tensor([-0.5500, -0.5500])

Reference: optax ``_src/transform.py``, ``_src/clipping.py``; the per-algorithm rules are
torch.optim's (see each function).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from metaopt.optim._util import cast_hyper, first_device, is_number, per_param
# Re-exported (see the module docstring); ``_count``, ``_rms`` and ``_step_t`` too, for the
# presets that build their own pieces (adafactor.py reads ``T._count`` and ``T._rms``).
from metaopt.optim.factored import (
    FactoredState,  # noqa: F401  (a state type, kept importable from here)
    _rms,  # noqa: F401
    clip_by_block_rms,
    scale_by_factored_rms,
    scale_by_param_block_rms,
)
from metaopt.optim.orthogonal import scale_by_newton_schulz
from metaopt.optim.transform_base import (
    CountState,
    EmptyState,
    GradientTransformation,
    Updates,
    _count,
    _step_t,
    chain,
    identity,
)
from metaopt.types import Params

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "chain",
    "identity",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "add_decayed_weights",
    "add_decoupled_weight_decay",
    "trace",
    "ema",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_adagrad",
    "scale_by_adadelta",
    "scale_by_lion",
    "scale_by_sign",
    "scale_by_factored_rms",
    "clip_by_block_rms",
    "scale_by_param_block_rms",
    "clip",
    "clip_by_global_norm",
    "scale_by_newton_schulz",
    "lr_at",
]


class TraceState(NamedTuple):
    """``count`` and one buffer per param (same shape)."""

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count: mypy cannot express it
    trace: dict[str, Tensor]


class MomentsState(NamedTuple):
    """``count``, first moment ``mu`` and second moment ``nu`` (same shapes as the params);
    ``nu_max`` (amsgrad) or ``extra`` (per-algorithm, e.g. NAdam's ``mu_product``)."""

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count: mypy cannot express it
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]
    extra: dict[str, Tensor]


def _pow(base: Any, t: Tensor) -> Tensor:
    # base ** t for a Python or tensor base and a 0-dim tensor exponent.
    return torch.pow(cast_hyper(base, t) if isinstance(base, Tensor) else base, t)


def _axpby(a: Any, x: Tensor, b: Any, y: Tensor) -> Tensor:
    """``a x + b y`` with Python-float coefficients folded into one kernel where possible."""
    ax = x if is_number(a) and a == 1 else a * x
    if is_number(b):
        return torch.add(ax, y, alpha=b) if b != 1 else ax + y
    return ax + b * y


def _sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0, not inf.

    A second moment is exactly 0 where every gradient so far was exactly 0 (a dead ReLU
    unit, zero padding); there ``d sqrt / dv = inf`` meets ``dv / dg = 2 (1 - b2) g = 0``
    and ``inf * 0`` makes the whole meta-gradient NaN. The inner ``where`` keeps ``sqrt``
    away from 0 (finite derivatives of every order); the outer one selects 0 there.
    """
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, 1.0)), 0.0)


# --------------------------------------------------------------------------------------
# Scaling and learning rates
# --------------------------------------------------------------------------------------
def scale(factor: Any) -> GradientTransformation:
    """``u = factor * u`` (e.g. ``scale(-1.0)`` for ``maximize``)."""

    def update(updates: Updates, state: EmptyState, params: Params) -> tuple[Updates, EmptyState]:
        if is_number(factor) and factor == -1:
            return {k: torch.neg(u) for k, u in updates.items()}, state
        return {k: u * cast_hyper(factor, u) for k, u in updates.items()}, state

    return GradientTransformation(lambda params: EmptyState(), update)


def lr_at(lr: Any, key: str, count: Optional[Tensor], like: Tensor) -> Any:
    """The learning rate of param ``key`` at step ``count`` (a 0-dim int64 tensor).

    A schedule is called with ``count``; a dict is indexed by ``key``; a one-element tensor
    is viewed as 0-dim (so a ``(1,)`` rate keeps a 0-dim param 0-dim, as torch does); the
    result is cast to ``like``'s dtype. Dict entries keep their shape (they broadcast
    against the param: per-element Meta-SGD rates).
    """
    if callable(lr) and not isinstance(lr, (Tensor, dict)):
        lr = lr(count)
    if isinstance(lr, dict):
        lr = per_param(lr, key)
    elif isinstance(lr, Tensor) and lr.dim() != 0:
        lr = lr.reshape(())
    return cast_hyper(lr, like)


def scale_by_learning_rate(lr: Any, *, flip_sign: bool = True) -> GradientTransformation:
    """``u = -lr * u`` (``+lr * u`` without ``flip_sign``); see :func:`lr_at` for ``lr``.

    Example:
        >>> import torch
        >>> tx = scale_by_learning_rate(lambda count: 0.1 * 0.5 ** count)   # a schedule
        >>> p, g = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
        >>> s = tx.init(p)
        >>> u1, s = tx.update(g, s, p); u2, s = tx.update(g, s, p)
        >>> u1["w"], u2["w"]
        (tensor([-0.1000]), tensor([-0.0500]))
    """
    sign = -1.0 if flip_sign else 1.0
    scheduled = callable(lr) and not isinstance(lr, (Tensor, dict))

    def init(params: Params) -> Any:
        if isinstance(lr, dict) and lr.keys() != params.keys():
            raise ValueError(
                f"per-parameter lr must have the same keys as params; lr: {sorted(lr)}, params: {sorted(params)}"
            )
        return CountState(_count(params)) if scheduled else EmptyState()

    def update(updates: Updates, state: Any, params: Params) -> tuple[Updates, Any]:
        count = state.count if scheduled else None
        value = lr(count) if scheduled else lr  # called once per step, not once per param
        out = {}
        for k, u in updates.items():
            r = lr_at(value, k, None, u)
            out[k] = torch.mul(u, sign * r) if is_number(r) else u * (sign * r)
        if count is None:
            return out, state
        return out, CountState(count + 1)

    return GradientTransformation(init, update)


def scale_by_schedule(schedule: Callable[[Tensor], Any]) -> GradientTransformation:
    """``u = schedule(count) * u``; ``schedule`` gets the count of steps before this one (0 at
    the first step) as a 0-dim tensor in the update's dtype, so the factor is computed in
    that precision, and returns a number or a 0-dim tensor (e.g. Adagrad's
    ``1 / (1 + count * lr_decay)``). Called once per dtype per step."""

    def update(updates: Updates, state: CountState, params: Params) -> tuple[Updates, CountState]:
        factors: dict = {}
        out = {}
        for k, u in updates.items():
            f = factors.get(u.dtype)
            if f is None:
                f = factors[u.dtype] = cast_hyper(schedule(state.count.to(u.dtype)), u)
            out[k] = u * f
        return out, CountState(state.count + 1)

    return GradientTransformation(lambda params: CountState(_count(params)), update)


# --------------------------------------------------------------------------------------
# Weight decay
# --------------------------------------------------------------------------------------
def add_decayed_weights(weight_decay: Any) -> GradientTransformation:
    """Coupled (L2) decay, torch's ``grad = grad + weight_decay * param``."""

    def update(updates: Updates, state: EmptyState, params: Params) -> tuple[Updates, EmptyState]:
        out = {}
        for k, u in updates.items():
            wd = cast_hyper(weight_decay, u)
            out[k] = torch.add(u, params[k], alpha=wd) if is_number(wd) else u + wd * params[k]
        return out, state

    return GradientTransformation(lambda params: EmptyState(), update)


def add_decoupled_weight_decay(lr: Any, weight_decay: Any) -> GradientTransformation:
    """Decoupled decay (AdamW): ``u = u + (param (1 - lr wd) - param)``; placed after
    :func:`scale_by_learning_rate` it gives torch's ``p = p * (1 - lr wd) - step``.
    ``lr * weight_decay`` is computed in the param's dtype (a float32 tensor ``lr`` with
    float64 params is cast first)."""
    scheduled = callable(lr) and not isinstance(lr, (Tensor, dict))

    def init(params: Params) -> Any:
        return CountState(_count(params)) if scheduled else EmptyState()

    def update(updates: Updates, state: Any, params: Params) -> tuple[Updates, Any]:
        value = lr(state.count) if scheduled else lr
        out = {}
        for k, u in updates.items():
            c = lr_at(value, k, None, u) * cast_hyper(weight_decay, u)
            # torch scales p by the rounded factor (1 - c); for small c that rounding is ~1e-16 / c
            # of the decay, so reproduce it: p (1 - c) - p is exact (Sterbenz), only the sum rounds.
            p = params[k]
            out[k] = u + (p * (1.0 - c) - p)
        return out, (CountState(state.count + 1) if scheduled else state)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------
# Momentum and moments
# --------------------------------------------------------------------------------------
def trace(momentum: Any, dampening: Any = 0.0, nesterov: bool = False) -> GradientTransformation:
    """torch's SGD momentum: ``b = g`` at the first step, ``b = momentum b + (1 - dampening) g``
    after; ``u = g + momentum b`` (nesterov) or ``b``.

    The first-step rule needs no branch: ``b`` starts at zero and the grad's coefficient is
    ``1 - dampening * (count > 0)``.
    """
    damped = not (is_number(dampening) and dampening == 0)

    def init(params: Params) -> TraceState:
        return TraceState(_count(params), {k: torch.zeros_like(p) for k, p in params.items()})

    def update(updates: Updates, state: TraceState, params: Params) -> tuple[Updates, TraceState]:
        out: dict[str, Tensor] = {}
        bufs: dict[str, Tensor] = {}
        coef: dict[Any, Any] = {}
        for k, g in updates.items():
            if damped:
                c = coef.get(g.dtype)
                if c is None:
                    c = coef[g.dtype] = 1.0 - cast_hyper(dampening, g) * (state.count > 0).to(g.dtype)
                b = torch.addcmul(cast_hyper(momentum, g) * state.trace[k], g, c)
            else:
                b = cast_hyper(momentum, g) * state.trace[k] + g
            bufs[k] = b
            out[k] = _axpby(1.0, g, cast_hyper(momentum, g), b) if nesterov else b
        return out, TraceState(state.count + 1, bufs)

    return GradientTransformation(init, update)


def ema(decay: Any) -> GradientTransformation:
    """``m = lerp(m, u, 1 - decay)``; ``u = m`` (no bias correction; Adafactor's ``beta1``)."""

    def init(params: Params) -> TraceState:
        return TraceState(_count(params), {k: torch.zeros_like(p) for k, p in params.items()})

    def update(updates: Updates, state: TraceState, params: Params) -> tuple[Updates, TraceState]:
        m = {k: torch.lerp(state.trace[k], u, 1.0 - cast_hyper(decay, u)) for k, u in updates.items()}
        return dict(m), TraceState(state.count + 1, m)

    return GradientTransformation(init, update)


def _moments_init(params: Params, *, nu: bool = True, extra: Optional[dict] = None) -> MomentsState:
    zeros = {k: torch.zeros_like(p) for k, p in params.items()}
    return MomentsState(_count(params), zeros, dict(zeros) if nu else {}, extra or {})


def _lerp_sq(nu: Tensor, g: Tensor, b2: Any) -> Tensor:
    # torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if is_number(b2):
        return torch.addcmul(nu * b2, g, g, value=1.0 - b2)
    return nu * b2 + (1.0 - b2) * g * g


def scale_by_adam(b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, amsgrad: bool = False) -> GradientTransformation:
    """Adam's direction (torch.optim.Adam): ``m = lerp(m, g, 1-b1)``, ``v = b2 v + (1-b2) g^2``,
    ``u = (m / (1 - b1^t)) / (sqrt(v') / sqrt(1 - b2^t) + eps)``, ``v' = max`` of all ``v``
    so far with ``amsgrad`` (kept in ``extra``)."""

    def init(params: Params) -> MomentsState:
        return _moments_init(params, extra={k: torch.zeros_like(p) for k, p in params.items()} if amsgrad else {})

    def update(updates: Updates, state: MomentsState, params: Params) -> tuple[Updates, MomentsState]:
        cache: dict = {}
        scalars: dict = {}
        out, mu, nu, vmax = {}, {}, {}, {}
        for k, g in updates.items():
            sc = scalars.get(g.dtype)
            if sc is None:
                t = _step_t(state.count, g, cache)
                sc = scalars[g.dtype] = (1.0 - _pow(b1, t), torch.sqrt(1.0 - _pow(b2, t)))
            bc1, bc2_sqrt = sc
            m = torch.lerp(state.mu[k], g, 1.0 - cast_hyper(b1, g))
            v = _lerp_sq(state.nu[k], g, cast_hyper(b2, g))
            mu[k], nu[k] = m, v
            if amsgrad:
                v = vmax[k] = torch.maximum(state.extra[k], v)
            denom = _sqrt(v) / bc2_sqrt + cast_hyper(eps, g)
            out[k] = (m / bc1) / denom
        return out, MomentsState(state.count + 1, mu, nu, vmax)

    return GradientTransformation(init, update)


def scale_by_adamax(b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8) -> GradientTransformation:
    """torch.optim.Adamax: ``m = lerp(m, g, 1-b1)``, ``n = max(b2 n, |g| + eps)``,
    ``u = m / (1 - b1^t) / n`` (``nu`` holds ``n``)."""

    def update(updates: Updates, state: MomentsState, params: Params) -> tuple[Updates, MomentsState]:
        cache: dict = {}
        out, mu, nu = {}, {}, {}
        for k, g in updates.items():
            t = _step_t(state.count, g, cache)
            m = torch.lerp(state.mu[k], g, 1.0 - cast_hyper(b1, g))
            n = torch.maximum(state.nu[k] * cast_hyper(b2, g), torch.abs(g) + cast_hyper(eps, g))
            mu[k], nu[k] = m, n
            out[k] = m / (1.0 - _pow(b1, t)) / n
        return out, MomentsState(state.count + 1, mu, nu, {})

    return GradientTransformation(_moments_init, update)


def scale_by_nadam(
    b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, momentum_decay: Any = 4e-3
) -> GradientTransformation:
    """torch.optim.NAdam (Dozat 2016 with torch's momentum schedule)::

        mu_t = b1 (1 - 0.5 * 0.96^(t psi)),  P_t = prod_{i<=t} mu_i   (extra["mu_product"])
        u = (1 - mu_t) / (1 - P_t) g / d + mu_{t+1} / (1 - P_t mu_{t+1}) m / d,
        d = sqrt(v / (1 - b2^t)) + eps
    """

    def init(params: Params) -> MomentsState:
        ref = next(iter(params.values()), None)
        dtype = torch.get_default_dtype() if ref is None else ref.dtype
        one = torch.ones((), dtype=dtype, device=first_device(params))
        return _moments_init(params, extra={"mu_product": one})

    def update(updates: Updates, state: MomentsState, params: Params) -> tuple[Updates, MomentsState]:
        prod0 = state.extra["mu_product"]
        t = (state.count + 1).to(prod0.dtype)
        mu_t = b1 * (1.0 - 0.5 * _pow(0.96, t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * _pow(0.96, (t + 1.0) * momentum_decay))
        prod = prod0 * mu_t
        c_grad = (1.0 - mu_t) / (1.0 - prod)  # (,)
        c_avg = mu_next / (1.0 - prod * mu_next)  # (,)
        bc2 = 1.0 - _pow(b2, t)
        out, mu, nu = {}, {}, {}
        for k, g in updates.items():
            m = torch.lerp(state.mu[k], g, 1.0 - cast_hyper(b1, g))
            v = _lerp_sq(state.nu[k], g, cast_hyper(b2, g))
            mu[k], nu[k] = m, v
            denom = _sqrt(v / bc2.to(g.dtype)) + cast_hyper(eps, g)
            out[k] = (g * c_grad.to(g.dtype) + m * c_avg.to(g.dtype)) / denom
        return out, MomentsState(state.count + 1, mu, nu, {"mu_product": prod})

    return GradientTransformation(init, update)


def scale_by_radam(b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8) -> GradientTransformation:
    """torch.optim.RAdam (Liu et al. 2020): Adam with the variance rectification ``r_t``
    where ``rho_t > 5`` and plain momentum ``m / (1 - b1^t)`` before. The switch is a
    ``torch.where`` on the step counter (torch uses a Python ``if``)."""

    def update(updates: Updates, state: MomentsState, params: Params) -> tuple[Updates, MomentsState]:
        cache: dict = {}
        scalars: dict = {}
        out, mu, nu = {}, {}, {}
        for k, g in updates.items():
            sc = scalars.get(g.dtype)
            if sc is None:
                t = _step_t(state.count, g, cache)
                b2t = _pow(b2, t)
                bc2 = 1.0 - b2t
                rho_inf = 2.0 / (1.0 - cast_hyper(b2, g)) - 1.0
                rho_t = rho_inf - 2.0 * t * b2t / bc2
                # clamp: the ratio is negative for small t, where it is not used (no NaN grads)
                rect = _sqrt(torch.clamp(
                    (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), min=0.0
                ))
                sc = scalars[g.dtype] = (1.0 - _pow(b1, t), torch.sqrt(bc2), rect, rho_t > 5.0)
            bc1, bc2_sqrt, rect, use = sc
            m = torch.lerp(state.mu[k], g, 1.0 - cast_hyper(b1, g))
            v = _lerp_sq(state.nu[k], g, cast_hyper(b2, g))
            mu[k], nu[k] = m, v
            adaptive = bc2_sqrt / (_sqrt(v) + cast_hyper(eps, g))
            out[k] = (m / bc1) * torch.where(use, adaptive * rect, torch.ones_like(adaptive))
        return out, MomentsState(state.count + 1, mu, nu, {})

    return GradientTransformation(_moments_init, update)


def scale_by_rms(alpha: Any = 0.99, eps: Any = 1e-8, centered: bool = False) -> GradientTransformation:
    """torch.optim.RMSprop's direction: ``v = alpha v + (1-alpha) g^2``; ``u = g / (sqrt(v) + eps)``,
    or ``g / (sqrt(v - m^2) + eps)`` with ``m = lerp(m, g, 1-alpha)`` when ``centered``."""

    def init(params: Params) -> MomentsState:
        st = _moments_init(params)
        return st if centered else st._replace(mu={})

    def update(updates: Updates, state: MomentsState, params: Params) -> tuple[Updates, MomentsState]:
        out, mu, nu = {}, {}, {}
        for k, g in updates.items():
            a = cast_hyper(alpha, g)
            v = nu[k] = _lerp_sq(state.nu[k], g, a)
            if centered:
                m = mu[k] = torch.lerp(state.mu[k], g, 1.0 - a)
                avg = _sqrt(torch.clamp(torch.addcmul(v, m, m, value=-1.0), min=0.0))  # >= 0 up to rounding
            else:
                avg = _sqrt(v)
            out[k] = g / (avg + cast_hyper(eps, g))
        return out, MomentsState(state.count + 1, mu, nu, {})

    return GradientTransformation(init, update)


def scale_by_adagrad(initial_accumulator_value: Any = 0.0, eps: Any = 1e-10) -> GradientTransformation:
    """torch.optim.Adagrad's direction: ``s = s + g^2`` (from ``initial_accumulator_value``),
    ``u = g / (sqrt(s) + eps)``."""

    def init(params: Params) -> MomentsState:
        acc = {k: torch.full_like(p, initial_accumulator_value) if is_number(initial_accumulator_value)
               else torch.zeros_like(p) + initial_accumulator_value for k, p in params.items()}
        return MomentsState(_count(params), {}, acc, {})

    def update(updates: Updates, state: MomentsState, params: Params) -> tuple[Updates, MomentsState]:
        out, nu = {}, {}
        for k, g in updates.items():
            s = nu[k] = torch.addcmul(state.nu[k], g, g)
            out[k] = g / (_sqrt(s) + cast_hyper(eps, g))
        return out, MomentsState(state.count + 1, {}, nu, {})

    return GradientTransformation(init, update)


def scale_by_adadelta(rho: Any = 0.9, eps: Any = 1e-6) -> GradientTransformation:
    """torch.optim.Adadelta (Zeiler 2012): ``v = rho v + (1-rho) g^2``,
    ``u = sqrt(a + eps) / sqrt(v + eps) g``, ``a = rho a + (1-rho) u^2`` (``mu`` holds ``a``)."""

    def update(updates: Updates, state: MomentsState, params: Params) -> tuple[Updates, MomentsState]:
        out, acc, nu = {}, {}, {}
        for k, g in updates.items():
            r, e = cast_hyper(rho, g), cast_hyper(eps, g)
            v = nu[k] = _lerp_sq(state.nu[k], g, r)
            delta = torch.sqrt(state.mu[k] + e) / torch.sqrt(v + e) * g
            acc[k] = _lerp_sq(state.mu[k], delta, r)
            out[k] = delta
        return out, MomentsState(state.count + 1, acc, nu, {})

    return GradientTransformation(_moments_init, update)


def scale_by_lion(b1: Any = 0.9, b2: Any = 0.99) -> GradientTransformation:
    """Lion (Chen et al. 2023): ``u = sign(b1 m + (1-b1) g)``; then ``m = b2 m + (1-b2) g``."""

    def init(params: Params) -> TraceState:
        return TraceState(_count(params), {k: torch.zeros_like(p) for k, p in params.items()})

    def update(updates: Updates, state: TraceState, params: Params) -> tuple[Updates, TraceState]:
        out, m = {}, {}
        for k, g in updates.items():
            out[k] = torch.sign(_axpby(cast_hyper(b1, g), state.trace[k], 1.0 - cast_hyper(b1, g), g))
            m[k] = _axpby(cast_hyper(b2, g), state.trace[k], 1.0 - cast_hyper(b2, g), g)
        return out, TraceState(state.count + 1, m)

    return GradientTransformation(init, update)


def scale_by_sign() -> GradientTransformation:
    """``u = sign(u)`` (signSGD; the derivative is zero almost everywhere)."""
    return GradientTransformation(
        lambda params: EmptyState(), lambda u, s, p: ({k: torch.sign(x) for k, x in u.items()}, s)
    )


# --------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------
def clip(max_delta: Any) -> GradientTransformation:
    """Clamp every entry to ``[-max_delta, max_delta]`` (``torch.nn.utils.clip_grad_value_``)."""

    def update(updates: Updates, state: EmptyState, params: Params) -> tuple[Updates, EmptyState]:
        if is_number(max_delta):
            return {k: u.clamp(-max_delta, max_delta) for k, u in updates.items()}, state
        return {k: torch.clamp(u, -cast_hyper(max_delta, u), cast_hyper(max_delta, u)) for k, u in updates.items()}, state

    return GradientTransformation(lambda params: EmptyState(), update)


def clip_by_global_norm(max_norm: Any) -> GradientTransformation:
    """Rescale all updates by ``min(1, max_norm / (||u|| + 1e-6))``, ``||u||`` the global
    2-norm (as ``torch.nn.utils.clip_grad_norm_``; no host sync)."""

    def update(updates: Updates, state: EmptyState, params: Params) -> tuple[Updates, EmptyState]:
        if not updates:
            return {}, state
        # norms in the widest update dtype (at least float32: half-precision sums overflow)
        dtype = torch.float32
        for u in updates.values():
            dtype = torch.promote_types(dtype, u.dtype)
        norms = torch.stack([torch.linalg.vector_norm(u).to(dtype) for u in updates.values()])  # (P,)
        coef = torch.clamp(max_norm / (torch.linalg.vector_norm(norms) + 1e-6), max=1.0)  # (,)
        return {k: u * coef.to(u.dtype) for k, u in updates.items()}, state

    return GradientTransformation(lambda params: EmptyState(), update)
