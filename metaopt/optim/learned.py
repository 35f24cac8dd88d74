"""Learned inner learning rates: Meta-SGD (per parameter) and MAML++ (per layer, per step).

Any preset takes them: a dict from :func:`per_parameter_lr` is a per-parameter ``lr``
(``Adam(lr=per_parameter_lr(model))``), and :func:`per_step_lr` is a schedule indexed by the
inner step (``RMSprop(lr=per_step_lr(model, steps=5))``, MAML++'s LSLR for any rule).

The rates are ``nn.Parameter``s held by the optimizer; :class:`metaopt.MAML` finds and
registers them, so ``maml.parameters()`` hands them to the outer optimizer with the model's
weights and ``maml.state_dict()`` checkpoints them.

Example:
    >>> import torch
    >>> from metaopt.maml import MAML
    >>> from metaopt.models import MLP
    >>> from metaopt.optim.learned import MetaSGD
    >>> model = MLP()
    >>> inner = MetaSGD.from_model(model, init=0.01, granularity="tensor", steps=5)  # MAML++
    >>> inner.lr["net.0.weight"].shape                     # one rate per step
    torch.Size([5])
    >>> maml = MAML(model, inner, inner_steps=5, loss_fn=torch.nn.functional.mse_loss)
    >>> len(list(maml.parameters())) == len(list(model.parameters())) * 2
    True
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Union, cast

import torch
from torch import Tensor, nn

from metaopt.optim._util import check_inputs
from metaopt.types import Grads, Params

__all__ = ["MetaSGD", "MetaSGDState", "PerStep", "per_parameter_lr", "per_step_lr"]

Granularity = Literal["element", "tensor"]


def _named_params(params_or_model: Union[nn.Module, Params]) -> Params:
    if isinstance(params_or_model, nn.Module):
        return {k: p for k, p in params_or_model.named_parameters() if p.requires_grad}
    if isinstance(params_or_model, dict):
        return params_or_model
    raise TypeError(
        "expected an nn.Module or a dict[str, Tensor] of params but got "
        f"{type(params_or_model).__name__}"
    )


def per_parameter_lr(
    params_or_model: Union[nn.Module, Params],
    init: float = 0.01,
    *,
    granularity: Granularity = "element",
    steps: int | None = None,
) -> dict[str, nn.Parameter]:
    """Learnable learning rates keyed like the model's parameters.

    Args:
        params_or_model: an ``nn.Module`` (its parameters that require grad) or a params dict.
        init: initial value of every rate.
        granularity: ``"element"`` — one rate per scalar weight, same shape as the param
            (Meta-SGD, Li et al. 2017); ``"tensor"`` — one rate per parameter tensor
            (per layer, MAML++, Antoniou et al. 2019).
        steps: if given, a leading dimension of that size: one rate per inner step
            (use with :class:`MetaSGD`, which indexes it by its step counter).

    Returns:
        ``{name: nn.Parameter}``; pass it as ``SGD(lr=...)`` (without ``steps``) or
        ``MetaSGD(lr=...)``.

    Example:
        >>> import torch
        >>> lrs = per_parameter_lr({"w": torch.zeros(2, 3)}, 0.5)
        >>> lrs["w"].shape, lrs["w"].detach()[0, 0].item()
        (torch.Size([2, 3]), 0.5)
    """
    if granularity not in ("element", "tensor"):
        raise ValueError(f"granularity must be 'element' or 'tensor' but is: {granularity!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be None or an int >= 1 but is: {steps!r}")
    if not init >= 0:
        raise ValueError(f"Learning rate should be >= 0 but is: {init}")
    out: dict[str, nn.Parameter] = {}
    for k, p in _named_params(params_or_model).items():
        shape = tuple(p.shape) if granularity == "element" else ()
        if steps is not None:
            shape = (steps, *shape)
        out[k] = nn.Parameter(torch.full(shape, float(init), dtype=p.dtype, device=p.device))
    return out


class MetaSGDState(NamedTuple):
    """State of :class:`MetaSGD`: ``count``, a 0-dim int64 tensor of steps taken."""

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count: mypy cannot express it


class MetaSGD:
    """SGD with learned learning rates, optionally a different rate at every inner step.

    Update rule at inner step ``t`` (0-based), per parameter ``p`` with gradient ``g``::

        p = p - lr[name] * g                          # steps=None (Meta-SGD)
        p = p - lr[name][min(t, steps - 1)] * g       # steps=S    (MAML++ per-step rates)

    ``lr[name]`` broadcasts to the parameter (a 0-dim rate per layer or a full-shape rate
    per element). Steps past ``steps - 1`` reuse the last rate (e.g. evaluating with more
    inner steps than training). The index is a tensor op on the state's counter: no host
    sync, differentiable with respect to the rates, works under ``torch.func.vmap``.

    Args:
        lr: ``{name: Tensor}`` keyed like params (typically from :func:`per_parameter_lr`).
        steps: size of the leading per-step dimension of every rate, or ``None``.

    Example:
        >>> import torch
        >>> opt = MetaSGD({"w": torch.tensor([0.1, 0.2])}, steps=2)
        >>> p, s = opt.step({"w": torch.ones(3)}, {"w": torch.ones(3)}, opt.init({"w": torch.ones(3)}))
        >>> p["w"], int(s.count)
        (tensor([0.9000, 0.9000, 0.9000]), 1)

    Reference:
        Li et al., "Meta-SGD", 2017; Antoniou et al., "How to train your MAML", 2019 (LSLR).
    """

    def __init__(self, lr: dict[str, Tensor], *, steps: int | None = None) -> None:
        if not isinstance(lr, dict) or not all(isinstance(v, Tensor) for v in lr.values()):
            raise TypeError(f"lr must be a dict of tensors keyed like params but is: {type(lr).__name__}")
        if steps is not None:
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ValueError(f"steps must be None or an int >= 1 but is: {steps!r}")
            for k, v in lr.items():
                if v.dim() == 0 or v.shape[0] != steps:
                    raise ValueError(
                        f"with steps={steps}, lr[{k!r}] needs a leading dimension of size {steps} "
                        f"but has shape {tuple(v.shape)}"
                    )
        for k, v in lr.items():
            if not torch.is_floating_point(v):
                raise ValueError(f"lr[{k!r}] must be a floating-point tensor but has dtype {v.dtype}")
        self.lr = lr
        self.steps = steps

    @classmethod
    def from_model(
        cls,
        params_or_model: Union[nn.Module, Params],
        init: float = 0.01,
        *,
        granularity: Granularity = "element",
        steps: int | None = None,
    ) -> "MetaSGD":
        """``MetaSGD(per_parameter_lr(params_or_model, init, granularity=..., steps=...), steps=...)``."""
        # dict[str, Parameter] is a dict[str, Tensor] that MetaSGD only reads (dict is invariant).
        lr = cast("dict[str, Tensor]", per_parameter_lr(params_or_model, init, granularity=granularity, steps=steps))
        return cls(lr, steps=steps)

    def __repr__(self) -> str:
        return f"MetaSGD(lr={{{len(self.lr)} learned rates}}, steps={self.steps})"

    def init(self, params: Params) -> MetaSGDState:
        """Step counter 0."""
        if self.lr.keys() != params.keys():
            raise ValueError(
                f"lr must have the same keys as params; lr: {sorted(self.lr)}, params: {sorted(params)}"
            )
        ref = next(iter(params.values()), None)
        return MetaSGDState(torch.zeros((), dtype=torch.int64, device=None if ref is None else ref.device))

    def step(self, params: Params, grads: Grads, state: MetaSGDState) -> tuple[Params, MetaSGDState]:
        """One step, out of place. See the class docstring for the rule."""
        check_inputs(params, grads)
        index = None
        if self.steps is not None:
            index = torch.clamp(state.count, max=self.steps - 1).reshape(1)  # (1,)
        new: Params = {}
        for k, p in params.items():
            lr = self.lr[k]
            if index is not None:
                lr = torch.index_select(lr, 0, index.to(lr.device)).squeeze(0)
            new[k] = p - lr * grads[k]
        return new, MetaSGDState(state.count + 1)


class PerStep:
    """A learning-rate schedule from learned per-step rates: ``lr(count) = {k: rates[k][min(count, S-1)]}``.

    ``rates[k]`` has a leading dimension of size ``S`` (one rate per inner step); the rest
    broadcasts to the param (``()`` per layer, the param's shape per element). Indexing is a
    tensor op on the counter: no host sync, differentiable w.r.t. the rates, vmappable.
    The rates are held here as ``nn.Parameter``s, so :class:`metaopt.MAML` finds them.

    Args:
        rates: ``{name: Tensor}`` with leading dimension ``steps``.
        steps: that size.

    Example:
        >>> import torch
        >>> from metaopt.optim import Adam
        >>> lr = PerStep({"w": torch.tensor([0.1, 0.01])}, steps=2)
        >>> opt = Adam(lr=lr)
        >>> p = {"w": torch.zeros(1)}
        >>> s = opt.init(p)
        >>> p1, s = opt.step(p, {"w": torch.ones(1)}, s)
        >>> p2, s = opt.step(p1, {"w": torch.ones(1)}, s)
        >>> p1["w"], p2["w"] - p1["w"]
        (tensor([-0.1000]), tensor([-0.0100]))
    """

    def __init__(self, rates: dict[str, Tensor], steps: int) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1 but is: {steps!r}")
        if not isinstance(rates, dict) or not all(isinstance(v, Tensor) for v in rates.values()):
            raise TypeError(f"rates must be a dict of tensors keyed like params but is: {type(rates).__name__}")
        for k, v in rates.items():
            if not torch.is_floating_point(v):
                raise ValueError(f"rates[{k!r}] must be a floating-point tensor but has dtype {v.dtype}")
            if v.dim() == 0 or v.shape[0] != steps:
                raise ValueError(
                    f"with steps={steps}, rates[{k!r}] needs a leading dimension of size {steps} "
                    f"but has shape {tuple(v.shape)}"
                )
        self.rates = rates
        self.steps = steps

    def __call__(self, count: Tensor) -> dict[str, Tensor]:
        index = torch.clamp(count, max=self.steps - 1).reshape(1)  # (1,)
        return {k: torch.index_select(v, 0, index.to(v.device)).squeeze(0) for k, v in self.rates.items()}

    def __repr__(self) -> str:
        return f"PerStep({{{len(self.rates)} learned rates}}, steps={self.steps})"


def per_step_lr(
    params_or_model: Union[nn.Module, Params], init: float = 0.01, *, steps: int,
    granularity: Granularity = "tensor",
) -> PerStep:
    """Learnable per-step rates for any preset (MAML++'s LSLR, Antoniou et al. 2019):
    ``PerStep(per_parameter_lr(..., steps=steps), steps)``; ``granularity="tensor"`` (one rate
    per layer and step) by default.

    Example:
        >>> import torch
        >>> from metaopt.optim import RMSprop
        >>> opt = RMSprop(lr=per_step_lr({"w": torch.zeros(3)}, 0.01, steps=5))
        >>> opt.lr.rates["w"].shape
        torch.Size([5])
    """
    # dict[str, Parameter] is a dict[str, Tensor] that PerStep only reads (dict is invariant).
    rates = cast("dict[str, Tensor]", per_parameter_lr(params_or_model, init, granularity=granularity, steps=steps))
    return PerStep(rates, steps)
