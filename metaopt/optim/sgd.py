"""Functional SGD with momentum, equal step by step to ``torch.optim.SGD``."""

from __future__ import annotations

from typing import NamedTuple, Optional, cast

import torch
from torch import Tensor

from metaopt.optim._util import check_ge, check_hyper, check_inputs, check_lr, cast_hyper, is_number
from metaopt.optim import transforms as T
from metaopt.optim.chain import Chained, grad_clipping
from metaopt.optim.transforms import lr_at
from metaopt.types import Grads, HyperParam, Params, Scalar


class SGDState(NamedTuple):
    """State of :class:`SGD`.

    Attributes:
        count: 0-dim int64 tensor, number of steps taken so far.
        momentum_buffer: one buffer per param (same shape); empty dict when ``momentum=0``.
    """

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count: mypy cannot express it
    momentum_buffer: dict[str, Tensor]


class SGD:
    """Stochastic gradient descent (optionally with momentum), functional and differentiable.

    Update rule, per parameter ``p`` with gradient ``g`` at step ``t`` (1-based)::

        g = -g if maximize else g
        g = g + weight_decay * p
        b_t = g                                         if t == 1
        b_t = momentum * b_{t-1} + (1 - dampening) * g  otherwise
        g = g + momentum * b_t  if nesterov else b_t    (when momentum != 0)
        p = p - lr * g

    ``lr`` (default 1e-3, as torch) may be a float, a 1-element tensor (e.g. an
    ``nn.Parameter`` learned by MAML; viewed 0-d and cast to each param's dtype, so a
    ``(1,)`` rate keeps a 0-d param 0-d), a dict of tensors keyed like params, each
    broadcastable to its param (Meta-SGD's per-parameter rates), or a schedule
    ``f(count) -> lr`` called with the 0-dim int64 count of steps taken (e.g.
    :class:`~metaopt.optim.learned.PerStep`). Any other hyperparameter may also be a
    0-dim tensor. Keyword-only ``grad_clip_norm`` / ``grad_clip_value`` clip the grads first
    (:func:`~metaopt.optim.chain.grad_clipping`; extensions, off by default).

    Example:
        >>> import torch
        >>> from metaopt.optim import SGD
        >>> opt = SGD(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([1.0, -1.0])}, state)
        >>> params["w"]
        tensor([0.9000, 2.1000])
        >>> int(state.count)
        1

    Reference:
        ``torch.optim.SGD`` (Sutskever et al., 2013 for momentum/Nesterov).

    Differences from the reference:
        None in the values computed. The first-step rule (momentum buffer = the grad,
        without dampening) is implemented without a host sync: the buffer starts at zero
        and the grad's coefficient is ``1`` on the first step and ``1 - dampening`` after,
        selected from the step counter.
    """

    def __init__(
        self,
        lr: HyperParam = 1e-3,
        momentum: Scalar = 0.0,
        dampening: Scalar = 0.0,
        weight_decay: Scalar = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        grad_clip_norm: Optional[float] = None,
        grad_clip_value: Optional[float] = None,
    ) -> None:
        check_lr(lr)
        for name, v in (("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)):
            check_hyper(v, name)
        check_ge(momentum, 0.0, "Invalid momentum value: {}")
        check_ge(weight_decay, 0.0, "Invalid weight_decay value: {}")
        if nesterov and (
            not is_number(momentum) or momentum <= 0 or not is_number(dampening) or dampening != 0
        ):
            raise ValueError(
                "Nesterov momentum requires a momentum > 0 and zero dampening but got "
                f"momentum={momentum}, dampening={dampening}"
            )
        self.lr = lr
        self.momentum = momentum
        self.dampening = dampening
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.maximize = maximize
        # Python-level switches decided once, so step() has no branches on tensor values.
        self._use_momentum = not (is_number(momentum) and momentum == 0)
        self._use_wd = not (is_number(weight_decay) and weight_decay == 0)
        self._use_dampening = not (is_number(dampening) and dampening == 0)
        self._scheduled = callable(lr) and not isinstance(lr, (Tensor, dict))
        self.grad_clip_norm, self.grad_clip_value = grad_clip_norm, grad_clip_value
        self._clip = grad_clipping(grad_clip_norm, grad_clip_value)  # stateless pieces, applied to grads first

    def __repr__(self) -> str:
        lr = "{per-param}" if isinstance(self.lr, dict) else "<schedule>" if self._scheduled else self.lr
        return (
            f"SGD(lr={lr}, momentum={self.momentum}, dampening={self.dampening}, "
            f"weight_decay={self.weight_decay}, nesterov={self.nesterov}, maximize={self.maximize}"
            + "".join(f", {k}={getattr(self, k)}" for k in ("grad_clip_norm", "grad_clip_value") if getattr(self, k) is not None)
            + ")"
        )

    def as_chain(self) -> Chained:
        """The same rule as a chain of transforms: ``[negate] -> [g + wd p] -> [trace] -> -lr u``.

        ``step`` keeps torch's operation order (bit-exact with ``torch.optim.SGD``); this
        chain is the composable form, tested equal to it.

        Example:
            >>> import torch
            >>> opt = SGD(lr=0.1, momentum=0.9, weight_decay=0.01)
            >>> p, g = {"w": torch.randn(3)}, {"w": torch.randn(3)}
            >>> ref = opt.as_chain()
            >>> torch.allclose(opt.step(p, g, opt.init(p))[0]["w"], ref.step(p, g, ref.init(p))[0]["w"])
            True
        """
        tx = list(self._clip) + ([T.scale(-1.0)] if self.maximize else [])
        if self._use_wd:
            tx.append(T.add_decayed_weights(self.weight_decay))
        if self._use_momentum:
            tx.append(T.trace(self.momentum, self.dampening, self.nesterov))
        return Chained(T.chain(*tx, T.scale_by_learning_rate(self.lr)))

    def init(self, params: Params) -> SGDState:
        """Step counter 0 and zero momentum buffers (none when ``momentum == 0``)."""
        if isinstance(self.lr, dict) and self.lr.keys() != params.keys():
            raise ValueError(
                f"per-parameter lr must have the same keys as params; lr: {sorted(self.lr)}, "
                f"params: {sorted(params)}"
            )
        ref = next(iter(params.values()), None)
        device = ref.device if ref is not None else None
        count = torch.zeros((), dtype=torch.int64, device=device)
        bufs = {k: torch.zeros_like(p) for k, p in params.items()} if self._use_momentum else {}
        return SGDState(count, bufs)

    def step(self, params: Params, grads: Grads, state: SGDState) -> tuple[Params, SGDState]:
        """One SGD step, out of place. See the class docstring for the rule."""
        check_inputs(params, grads)
        for clip in self._clip:
            grads, _ = clip.update(dict(grads), T.EmptyState(), params)
        new_params: Params = {}
        new_bufs: dict[str, Tensor] = {}
        momentum, nesterov = self.momentum, self.nesterov
        # Coefficient of the grad in the momentum buffer: 1 at the first step (torch sets
        # buf = grad), 1 - dampening afterwards. One 0-dim tensor per dtype, computed once.
        grad_coef: dict[torch.dtype, Tensor] = {}
        # A schedule: called once per step (callable() narrows the type; _scheduled implies it).
        lr_value = self.lr(state.count) if self._scheduled and callable(self.lr) else self.lr
        for k, p in params.items():
            g = grads[k]
            if self.maximize:
                g = -g
            if self._use_wd:
                wd = cast_hyper(self.weight_decay, p)  # same op order as torch (float32 parity)
                g = torch.add(g, p, alpha=wd) if is_number(wd) else g + wd * p
            if self._use_momentum:
                buf = state.momentum_buffer[k]
                if self._use_dampening:
                    c = grad_coef.get(g.dtype)
                    if c is None:
                        started = (state.count > 0).to(g.dtype)  # 0 on the first step
                        c = grad_coef[g.dtype] = 1.0 - self.dampening * started
                    buf = torch.addcmul(momentum * buf, g, c)
                else:
                    # buf starts at zero, so momentum * 0 + g == g exactly on the first step.
                    buf = momentum * buf + g  # torch's order: buf.mul_(momentum).add_(g)
                new_bufs[k] = buf
                if nesterov:
                    g = torch.add(g, buf, alpha=cast(float, momentum)) if is_number(momentum) else g + momentum * buf
                else:
                    g = buf
            lr = lr_at(lr_value, k, None, p)  # 1-element tensors viewed 0-d, cast to p's dtype
            if is_number(lr):
                new_params[k] = torch.add(p, g, alpha=-lr)
            else:
                new_params[k] = p - lr * g
        return new_params, SGDState(state.count + 1, new_bufs)
