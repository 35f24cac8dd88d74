"""Learned Adafactor state: the initial row/column second-moment factors as meta-parameters.

Meta-SGD (:class:`metaopt.optim.learned.MetaSGD`) learns one inner learning rate per weight:
``n*m`` meta-parameters for an ``n x m`` matrix. Meta-Curvature learns a full preconditioner,
O(n^2) and more. Adafactor keeps its second moment of an ``n x m`` matrix as a row factor
``R`` (n, 1) and a column factor ``C`` (1, m) with ``V = R C / mean(R)``; learning the
*initial* ``R`` and ``C`` gives a learned per-element preconditioner ``1 / sqrt(V)`` of rank
one, from ``n + m`` meta-parameters per matrix (``n`` per vector).

Why not Adafactor's own decay: with ``beta2_t = 1 - t^-0.8`` the EMA weight of the new
``g^2`` at step 1 is ``1 - beta2_1 = 1``, so whatever the state starts at is overwritten by
the first gradient and a learned initial state would receive no meta-gradient. Here the
decay is a constant ``beta2`` (optionally meta-learned through a sigmoid), so the initial
factors weigh ``beta2^t`` after ``t`` steps; with ``beta2 = 1`` they are never overwritten
and the rule is "factored Meta-SGD": ``p -= lr * g / sqrt(R C / mean(R))``. With
``factored=False`` every param gets a full learned ``V0``: Meta-SGD with positive rates
``lr / sqrt(V0)`` learned in log space.

Measured against MAML and Meta-SGD on sinusoid 10-shot by ``experiments/moonshot.py``
(report: ``results/study/moonshot/summary.md``).

Example:
    >>> import torch
    >>> from metaopt.maml import MAML
    >>> from metaopt.models import MLP
    >>> from metaopt.optim.learned_factors import LearnedAdafactor
    >>> model = MLP(1, (40, 40), 1)
    >>> inner = LearnedAdafactor.from_model(model, lr=0.01, beta2=0.999, learn_beta2=True)
    >>> inner.num_meta_parameters()          # 243 factors + beta2 (Meta-SGD: 1761 rates)
    244
    >>> maml = MAML(model, inner, loss_fn=torch.nn.functional.mse_loss)
    >>> sum(p.numel() for p in maml.inner_hparams.values())   # registered: the outer optimizer trains them
    244
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from metaopt.optim._util import cast_hyper, check_hyper, check_inputs, check_lr, is_number
from metaopt.optim.adafactor import AdafactorState
from metaopt.optim.factored import _factored_dims
from metaopt.optim.learned import _named_params
from metaopt.types import Grads, Params, Scalar

__all__ = ["LearnedAdafactor"]


def _factor_shapes(shape: torch.Size, dims: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the row factor (the ``b`` dim reduced) and the column factor (``a`` reduced)."""
    a, b = dims
    rs, cs = list(shape), list(shape)
    rs[b], cs[a] = 1, 1
    return tuple(rs), tuple(cs)


class LearnedAdafactor:
    """Adafactor's second-moment recursion with a meta-learned initial state and constant decay.

    Update rule, per parameter ``p`` with gradient ``g`` (factored dims ``a < b``: Adafactor's
    rule, the last two dims of every param with ndim >= 2, or the two largest with
    ``min_dim_size_to_factor``)::

        state at init:  R = exp(log_row) (..., n, 1),  C = exp(log_col) (..., 1, m)   # factored
                        V = exp(log_v)   (same shape as p)                         # vectors, scalars
        each step:      R = beta2 R + (1 - beta2) mean_b(g^2)
                        C = beta2 C + (1 - beta2) mean_a(g^2)
                        V = R C / mean_a(R)               (factored)
                        V = beta2 V + (1 - beta2) g^2     (otherwise)
                        U = g / sqrt(V + eps)
                        U = U / max(1, RMS(U) / clip_threshold)   (only with clip_threshold)
                        p = p - lr U

    ``log_row``, ``log_col``, ``log_v`` (and ``beta2`` with ``learn_beta2``) are meta-learned:
    they are ``nn.Parameter``s held here, which :class:`metaopt.MAML` finds and registers, so
    ``maml.parameters()`` hands them to the outer optimizer and ``maml.state_dict()`` saves
    them. Log space keeps the second moment positive. ``R``'s overall scale cancels in
    ``R / mean(R)``, so a matrix has ``n + m - 1`` effective degrees of freedom.

    With ``beta2 = 1`` the state never moves and the step is SGD preconditioned by the
    learned rank-one ``1 / sqrt(V0)``; with ``lr = 0.01`` and all logs 0 (``V0 = 1``) it is
    exactly SGD with lr 0.01. With ``beta2 < 1`` the gradients blend in (Adam/RMSprop-like
    adaptivity) at the learned rate ``1 - beta2``.

    ``step`` is out of place, differentiable with respect to params, grads, state and every
    meta-parameter, has no host sync and works under ``torch.func.vmap``. The state is an
    :class:`~metaopt.optim.AdafactorState` (``exp_avg`` empty).

    Args:
        log_row: ``{name: Tensor}`` log of the initial row factor ``(..., n, 1)`` (``b`` dim
            of size 1) of each factored param.
        log_col: same keys, log of the initial column factor (``a`` dim of size 1).
        log_v: ``{name: Tensor}`` log of the initial full second moment of every other param.
        lr: step size (float or 1-element tensor; a tensor requiring grad is meta-learned too).
        beta2: constant decay of the second moment, in ``(0, 1]`` (``(0, 1)`` with
            ``learn_beta2``).
        learn_beta2: hold ``beta2`` as ``sigmoid(beta2_logit)`` with ``beta2_logit`` an
            ``nn.Parameter`` (so it is meta-learned).
        eps: added to ``V`` under the square root (>= 0).
        clip_threshold: Adafactor's update clipping threshold ``d`` (> 0), or ``None`` (off).
        factored: ``False`` learns the full initial second moment of every param (``n*m``
            numbers per matrix, as many as Meta-SGD: with ``beta2 = 1`` it is Meta-SGD with
            positive rates ``lr / sqrt(V0)`` learned in log space).
        min_dim_size_to_factor: ``None``: Adafactor's reference rule (last two dims); an
            int: optax's rule (two largest dims, both at least this size).

    Raises:
        ValueError: a bad hyperparameter (named, with the allowed range), factors of the
            wrong shape for their params (at ``init``), keys that do not match the params.

    Example:
        >>> import torch
        >>> opt = LearnedAdafactor({"w": torch.zeros(2, 1)}, {"w": torch.log(torch.tensor([[1.0, 4.0]]))},
        ...                        {"b": torch.zeros(3)}, lr=0.5, beta2=1.0)
        >>> p = {"w": torch.ones(2, 2), "b": torch.ones(3)}
        >>> p, s = opt.step(p, {"w": torch.ones(2, 2), "b": torch.ones(3)}, opt.init(p))
        >>> p["w"]                              # column 1 preconditioned by 1/sqrt(4)
        tensor([[0.5000, 0.7500],
                [0.5000, 0.7500]])

    Reference:
        Shazeer & Stern, "Adafactor", ICML 2018 (factored second moment); Li et al.,
        "Meta-SGD", 2017; Park & Oliva, "Meta-Curvature", NeurIPS 2019.

    Differences from Adafactor:
        constant ``beta2`` instead of ``1 - t^-0.8`` (see the module docstring); no relative
        step or parameter scaling (the step is ``lr``); ``eps`` is added to ``V`` rather than
        flooring it; update clipping is off unless ``clip_threshold`` is given.
    """

    def __init__(
        self,
        log_row: dict[str, Tensor],
        log_col: dict[str, Tensor],
        log_v: dict[str, Tensor],
        *,
        lr: Scalar = 0.01,
        beta2: float = 1.0,
        learn_beta2: bool = False,
        eps: float = 1e-30,
        clip_threshold: Optional[float] = None,
        factored: bool = True,
        min_dim_size_to_factor: Optional[int] = None,
    ) -> None:
        for name, d in (("log_row", log_row), ("log_col", log_col), ("log_v", log_v)):
            if not isinstance(d, dict) or not all(isinstance(v, Tensor) for v in d.values()):
                raise TypeError(f"{name} must be a dict of tensors keyed like params but is: {type(d).__name__}")
            for k, v in d.items():
                if not torch.is_floating_point(v):
                    raise ValueError(f"{name}[{k!r}] must be a floating-point tensor but has dtype {v.dtype}")
        if log_row.keys() != log_col.keys():
            raise ValueError(f"log_row and log_col must have the same keys; log_row: {sorted(log_row)}, "
                             f"log_col: {sorted(log_col)}")
        both = sorted(set(log_row) & set(log_v))
        if both:
            raise ValueError(f"a param is either factored (log_row/log_col) or not (log_v), but {both} are both")
        check_lr(lr, "Learning rate should be >= 0 but is: {}")
        if isinstance(lr, dict):
            raise ValueError("LearnedAdafactor's lr must be a float or a 1-element tensor but is a dict "
                             "(its per-element scale is the learned second moment)")
        if not is_number(beta2):
            raise ValueError(f"beta2 must be a float in (0, 1] but is: {beta2!r}")
        if not 0.0 < beta2 <= 1.0:
            raise ValueError(f"beta2 should be in (0, 1] but is: {beta2}")
        if learn_beta2 and beta2 == 1.0:
            raise ValueError(f"beta2 should be in (0, 1) with learn_beta2=True (it is a sigmoid) but is: {beta2}")
        check_hyper(eps, "eps")
        if not is_number(eps) or not eps >= 0:
            raise ValueError(f"eps should be a float >= 0 but is: {eps!r}")
        if clip_threshold is not None and not (is_number(clip_threshold) and clip_threshold > 0):
            raise ValueError(f"clip_threshold should be None or a float > 0 but is: {clip_threshold!r}")
        if min_dim_size_to_factor is not None and (
            not isinstance(min_dim_size_to_factor, int) or isinstance(min_dim_size_to_factor, bool)
            or min_dim_size_to_factor < 1
        ):
            raise ValueError(f"min_dim_size_to_factor should be None or an int >= 1 but is: {min_dim_size_to_factor!r}")
        self.log_row = log_row
        self.log_col = log_col
        self.log_v = log_v
        self.lr = lr
        self.eps = float(eps)
        self.clip_threshold = clip_threshold
        self.factored = bool(factored)
        self.min_dim_size_to_factor = min_dim_size_to_factor
        self.beta2: float = float(beta2)
        self.beta2_logit: Optional[nn.Parameter] = None
        if learn_beta2:
            ref = next(iter({**log_row, **log_v}.values()), None)
            dtype = ref.dtype if ref is not None else torch.get_default_dtype()
            device = ref.device if ref is not None else None
            logit = math.log(beta2) - math.log1p(-beta2)
            self.beta2_logit = nn.Parameter(torch.tensor(logit, dtype=dtype, device=device))

    @classmethod
    def from_model(
        cls,
        params_or_model: Union[nn.Module, Params],
        *,
        lr: Scalar = 0.01,
        init: float = 1.0,
        beta2: float = 0.999,
        learn_beta2: bool = True,
        eps: float = 1e-30,
        clip_threshold: Optional[float] = None,
        factored: bool = True,
        min_dim_size_to_factor: Optional[int] = None,
    ) -> "LearnedAdafactor":
        """Factors for every parameter of a model (that requires grad) or params dict.

        Every initial second moment starts at ``init`` (> 0): the column factor at ``init``
        and the row factor at 1 (``V = R C / mean(R) = init``), full moments at ``init``. The
        first step is then ``lr / sqrt(init)`` times the gradient, up to the ``1 - beta2``
        share of ``g^2``: with the defaults (lr 0.01, init 1, beta2 0.999) it is SGD with lr
        0.01 to within a relative ``(1 - beta2) g^2 / 2`` per element.

        Example:
            >>> import torch
            >>> opt = LearnedAdafactor.from_model({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, learn_beta2=False)
            >>> opt.log_row["w"].shape, opt.log_col["w"].shape, opt.log_v["b"].shape, opt.num_meta_parameters()
            (torch.Size([4, 1]), torch.Size([1, 3]), torch.Size([3]), 10)
        """
        if not is_number(init) or not init > 0:
            raise ValueError(f"init (the initial second moment) should be a float > 0 but is: {init!r}")
        log_row: dict[str, Tensor] = {}
        log_col: dict[str, Tensor] = {}
        log_v: dict[str, Tensor] = {}
        for k, p in _named_params(params_or_model).items():
            dims = _factored_dims(p.shape, min_dim_size_to_factor) if factored else None
            if dims is None:
                log_v[k] = nn.Parameter(torch.full(tuple(p.shape), math.log(init), dtype=p.dtype, device=p.device))
            else:
                rs, cs = _factor_shapes(p.shape, dims)
                log_row[k] = nn.Parameter(torch.zeros(rs, dtype=p.dtype, device=p.device))
                log_col[k] = nn.Parameter(torch.full(cs, math.log(init), dtype=p.dtype, device=p.device))
        return cls(log_row, log_col, log_v, lr=lr, beta2=beta2, learn_beta2=learn_beta2, eps=eps,
                   clip_threshold=clip_threshold, factored=factored, min_dim_size_to_factor=min_dim_size_to_factor)

    def __repr__(self) -> str:
        beta2 = "learned" if self.beta2_logit is not None else self.beta2
        return (f"LearnedAdafactor({len(self.log_row)} factored, {len(self.log_v)} full, "
                f"{self.num_meta_parameters()} meta-parameters, lr={self.lr}, beta2={beta2})")

    def num_meta_parameters(self) -> int:
        """Numbers meta-learned here: every factor entry, plus 1 with ``learn_beta2``
        (plus the lr's if it is a tensor requiring grad)."""
        n = sum(t.numel() for d in (self.log_row, self.log_col, self.log_v) for t in d.values())
        n += 0 if self.beta2_logit is None else 1
        if isinstance(self.lr, Tensor) and self.lr.requires_grad:
            n += self.lr.numel()
        return n

    def factored_dims(self, shape: torch.Size) -> Optional[tuple[int, int]]:
        """The two dims ``(a, b)`` whose second moment is factored, or ``None`` (Adafactor's rule)."""
        return _factored_dims(shape, self.min_dim_size_to_factor) if self.factored else None

    def _beta2(self, like: Tensor) -> tuple[Union[float, Tensor], Union[float, Tensor]]:
        """``(beta2, 1 - beta2)``; the second as ``sigmoid(-logit)``, exact near beta2 = 1."""
        if self.beta2_logit is None:
            return self.beta2, 1.0 - self.beta2
        z = self.beta2_logit.to(like.dtype)
        return torch.sigmoid(z), torch.sigmoid(-z)

    def init(self, params: Params) -> AdafactorState:
        """The learned initial second moments, ``exp`` of the logs (differentiable).

        Raises:
            ValueError: params not keyed like the factors, or a factor whose shape is not
                the one Adafactor's factoring rule gives for its param.
        """
        if params.keys() != set(self.log_row) | set(self.log_v):
            raise ValueError(f"the factors must have the same keys as params; factored: {sorted(self.log_row)}, "
                             f"full: {sorted(self.log_v)}, params: {sorted(params)}")
        row, col, full = {}, {}, {}
        for k, p in params.items():
            dims = self.factored_dims(p.shape)
            if k in self.log_v:
                want = [(tuple(p.shape), self.log_v[k])]
                if dims is not None:
                    raise ValueError(f"param {k!r} of shape {tuple(p.shape)} is factored over dims {dims} but has a "
                                     "full log_v; give it log_row/log_col")
            else:
                if dims is None:
                    raise ValueError(f"param {k!r} of shape {tuple(p.shape)} has no two dims to factor; give it log_v")
                rs, cs = _factor_shapes(p.shape, dims)
                want = [(rs, self.log_row[k]), (cs, self.log_col[k])]
            for shape, t in want:
                if tuple(t.shape) != shape:
                    raise ValueError(f"the learned factor of {k!r} (param shape {tuple(p.shape)}) must have shape "
                                     f"{shape} but has {tuple(t.shape)}")
            if k in self.log_v:
                full[k] = torch.exp(self.log_v[k].to(p.dtype))
            else:
                row[k] = torch.exp(self.log_row[k].to(p.dtype))  # (..., n, 1)
                col[k] = torch.exp(self.log_col[k].to(p.dtype))  # (..., 1, m)
        ref = next(iter(params.values()), None)
        count = torch.zeros((), dtype=torch.int64, device=None if ref is None else ref.device)
        return AdafactorState(count, row, col, full, {})

    def step(self, params: Params, grads: Grads, state: AdafactorState) -> tuple[Params, AdafactorState]:
        """One step, out of place. See the class docstring for the rule."""
        check_inputs(params, grads)
        new: Params = {}
        row, col, full = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            b2, w = self._beta2(g)
            g2 = torch.square(g)
            if k in state.row:
                dims = self.factored_dims(g.shape)
                if dims is None:  # init factored exactly these params; a reshaped grad is a caller bug
                    raise ValueError(f"gradient {k!r} of shape {tuple(g.shape)} no longer has two factorable dims")
                a, b = dims
                r, c = state.row[k], state.col[k]
                if self.beta2_logit is not None or self.beta2 != 1.0:  # beta2 = 1: the state never moves
                    r = b2 * r + w * g2.mean(b, keepdim=True)  # (..., n, 1)
                    c = b2 * c + w * g2.mean(a, keepdim=True)  # (..., 1, m)
                row[k], col[k] = r, c
                v = r * c / r.mean(a, keepdim=True)  # rank one: (..., n, 1) * (..., 1, m) -> (..., n, m)
            else:
                v = state.variance[k]
                if self.beta2_logit is not None or self.beta2 != 1.0:
                    v = b2 * v + w * g2
                full[k] = v
            u = g * torch.rsqrt(v + self.eps)
            if self.clip_threshold is not None:
                rms = torch.linalg.vector_norm(u) / math.sqrt(max(u.numel(), 1))
                u = u / torch.clamp(rms / self.clip_threshold, min=1.0)
            new[k] = p - cast_hyper(self.lr, p) * u
        return new, AdafactorState(state.count + 1, row, col, full, {})
