"""Small helpers shared by the functional optimizers (validation, hyperparameter lookup)."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from metaopt.types import Grads, HyperParam, Params


def is_number(x: Any) -> bool:
    """True for Python ints/floats (not bools, not tensors)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_hyper(x: Any, name: str, *, allow_dict: bool = False) -> None:
    """Reject hyperparameters of the wrong kind: not a number, an integer tensor, ...."""
    if is_number(x):
        return
    if isinstance(x, Tensor):
        if not torch.is_floating_point(x):
            raise ValueError(f"{name} must be a float or a floating-point tensor but is a tensor of dtype {x.dtype}")
        return
    if allow_dict and isinstance(x, dict):
        for k, v in x.items():
            check_hyper(v, f"{name}[{k!r}]")
        return
    allowed = "a float, a floating-point tensor" + (" or a dict of tensors keyed like params" if allow_dict else "")
    raise ValueError(f"{name} must be {allowed} but is: {x!r}")


def check_ge(x: Any, bound: float, message: str) -> None:
    """Raise ``ValueError(message.format(x))`` unless ``x >= bound``.

    Only Python numbers (and tensors outside any transform) are checked: checking a tensor
    requires a host sync, which is fine at construction time but impossible under vmap.
    """
    if is_number(x):
        if not x >= bound:
            raise ValueError(message.format(x))
    elif isinstance(x, Tensor) and not _is_wrapped(x):
        if x.numel() and not bool((x.detach() >= bound).all()):
            raise ValueError(message.format(x.detach().tolist() if x.numel() == 1 else x.detach()))


def _is_wrapped(x: Tensor) -> bool:
    # functorch-wrapped tensors (inside vmap/grad) cannot be read on the host.
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(x)
    except AttributeError:  # pragma: no cover - older torch
        return False


def check_inputs(params: Params, grads: Grads) -> None:
    """Same keys, floating dtypes. Cheap Python-only checks (no host sync)."""
    if params.keys() != grads.keys():
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        raise ValueError(
            f"grads must have the same keys as params; missing from grads: {missing}, "
            f"not in params: {extra}"
        )
    for k, p in params.items():
        if not torch.is_floating_point(p):
            raise ValueError(f"params[{k!r}] must be a floating-point tensor but has dtype {p.dtype}")
        g = grads[k]
        if not torch.is_floating_point(g):
            raise ValueError(f"grads[{k!r}] must be a floating-point tensor but has dtype {g.dtype}")


def per_param(h: HyperParam, key: str) -> float | Tensor:
    """Look up a hyperparameter that may be a dict keyed like params."""
    if isinstance(h, dict):
        try:
            return h[key]
        except KeyError:
            raise ValueError(f"per-parameter hyperparameter has no entry for {key!r}; keys: {sorted(h)}") from None
    return h


def check_lr(lr: Any, message: str = "Invalid learning rate: {}") -> None:
    """Validate a learning rate the way torch.optim does, plus the forms metaopt adds.

    Allowed: a number >= 0; a floating tensor with one element (torch: "Tensor lr must be
    1-element"); a dict of such values or of broadcastable tensors keyed like params
    (Meta-SGD); a callable schedule ``f(count) -> lr`` (checked when called, not here).
    """
    if callable(lr) and not isinstance(lr, (Tensor, dict)):
        return
    check_hyper(lr, "lr", allow_dict=True)
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if isinstance(lr, dict):
        for k, v in lr.items():
            check_ge(v, 0.0, message + f" (lr[{k!r}])")
    else:
        check_ge(lr, 0.0, message)


def check_range(x: Any, low: float, high: float, message: str, *, closed_high: bool = False) -> None:
    """Raise ``ValueError(message.format(x))`` unless ``low <= x < high`` (``<= high`` if
    ``closed_high``); numbers, and tensors outside transforms (a construction-time sync)."""
    check_ge(x, low, message)
    if is_number(x):
        ok = x <= high if closed_high else x < high
    elif isinstance(x, Tensor) and not _is_wrapped(x) and x.numel():
        v = x.detach()
        ok = bool((v <= high).all()) if closed_high else bool((v < high).all())
    else:
        ok = True
    if not ok:
        raise ValueError(message.format(x.detach().tolist() if isinstance(x, Tensor) and x.numel() == 1 else x))


def first_device(params: Params) -> torch.device | None:
    """Device of the first param (None for an empty dict): where step counters live."""
    ref = next(iter(params.values()), None)
    return None if ref is None else ref.device


def cast_hyper(h: Any, like: Tensor) -> Any:
    """A hyperparameter in ``like``'s dtype: numbers stay Python numbers (exact, no kernel);
    tensors are cast (differentiably) so a float32 ``lr`` on float64 params is computed in
    float64, like torch, which reads a tensor ``lr`` as a Python float."""
    if isinstance(h, Tensor) and h.dtype != like.dtype:
        return h.to(like.dtype)
    return h


class _FactorRsqrt(torch.autograd.Function):
    """``rsqrt(x)`` whose derivative is 0 wherever the incoming gradient is exactly 0, and
    computed without overflowing float32 where the product does not.

    Adafactor's transformers rule keeps ``eps1 = 1e-30`` inside its factored second moment,
    so a dead row or column (a ReLU unit whose gradient is exactly 0) has a factor of about
    1e-30 and ``d rsqrt / dx = -x^-1.5 / 2`` overflows float32 (~1e45). The gradient that
    reaches it is exactly 0 there (the update is ``rsqrt(...) * g`` with ``g = 0``), and the
    true product is 0, but ``0 * inf`` is NaN and would poison the whole meta-gradient.
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.rsqrt(x)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None], x: Tensor) -> tuple[Tensor, int | None]:
        # Elementwise: the batched tensor goes through as it is, its batch dim unchanged.
        # (A hand-written rule: generate_vmap_rule builds a new Function per call, which
        # made this one call a third of transformers-Adafactor's inner step under vmap.)
        return _FactorRsqrt.apply(x), in_dims[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        # -grad * y^3 / 2, multiplied in from the gradient: y^3 alone overflows float32 for
        # x below ~1e-26, and a tiny but nonzero gradient there (|g| ~ 1e-15 in Adafactor's
        # update rsqrt(g^2 + 1e-30) * g) times inf is inf, then NaN. The gradient that reaches
        # y is about g's size, so (grad * y) * y * y stays finite where the product does.
        return torch.where(grad == 0, torch.zeros_like(grad), ((grad * y) * y) * (-0.5 * y))


def factor_rsqrt(x: Tensor) -> Tensor:
    """``torch.rsqrt`` with a zero-safe first derivative (see :class:`_FactorRsqrt`).

    Example:
        >>> x = torch.tensor([1e-30, 4.0], requires_grad=True)
        >>> y = factor_rsqrt(x)
        >>> (y * torch.tensor([0.0, 1.0])).sum().backward()
        >>> x.grad
        tensor([ 0.0000, -0.0625])
    """
    return _FactorRsqrt.apply(x)
