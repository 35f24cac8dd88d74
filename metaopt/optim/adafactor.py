"""Functional Adafactor (Shazeer & Stern, 2018), equal step by step to ``torch.optim.Adafactor``
and, through :meth:`Adafactor.from_transformers`, to ``transformers.optimization.Adafactor``.

The recipe, per parameter ``p`` (shape ``(..., n, m)`` when factored) with gradient ``g``
at step ``t`` (1-based), is a chain of small named pieces:

1. *gradient clipping* (optional, beyond both references): by value, then by global norm;
2. *second moment*, decayed with ``w_t = t ** beta2_decay`` (``beta2_t = 1 - w_t``):
   factored: ``R = lerp(R, mean_m(g^2), w_t)`` (..., n, 1), ``C = lerp(C, mean_n(g^2), w_t)``
   (..., 1, m), ``V = R C / mean_n(R)``; not factored: ``V = lerp(V, g^2, w_t)``;
3. *normalised update* ``U = g / sqrt(V)``;
4. *update clipping* ``U = U / max(1, RMS(U) / d)``;
5. *relative step and parameter scaling* ``alpha_t = max(eps2, RMS(p)) * rho_t``;
6. optional *momentum* on ``alpha_t U`` (``beta1``), *weight decay*, and ``p = p - alpha_t U``.

Implementation notes (speed): ``step`` is called inside MAML's inner loop on ~10-20 small
tensors with autograd recording, so the cost is the number of kernels, not flops. Every
step-dependent scalar (``w_t``, ``rho_t``) is computed once per step and dtype, never per
tensor; Python-float hyperparameters stay Python floats; steps 4-5 are folded into a
single per-parameter scale ``max(|p|, eps2 sqrt(N)) / max(|U|, d sqrt(N)) * rho_t d``
(``|.|`` the 2-norm, ``N`` the numel), and the norms of all parameters go through that
formula in one batch of stacked ops.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, cast

import torch
from torch import Tensor

from metaopt.optim._util import cast_hyper, check_ge, check_hyper, check_inputs, check_lr, factor_rsqrt, is_number
from metaopt.optim import transforms as T
from metaopt.optim.chain import Chained
from metaopt.optim.transforms import lr_at
from metaopt.types import Grads, Params, Scalar

_HALF = (torch.float16, torch.bfloat16)


class AdafactorState(NamedTuple):
    """State of :class:`Adafactor`.

    Attributes:
        count: 0-dim int64 tensor, number of steps taken so far (shared by all params).
        row: factored second moment, row factor, for each factored param ``(..., n, 1)``
            (``n`` and ``m`` being the two factored dims; other dims kept).
        col: column factor ``(..., 1, m)`` for each factored param.
        variance: full second moment (same shape as the param) for each other param.
        exp_avg: first moment of the scaled update (only when ``beta1`` is set; else empty).
    """

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count: mypy cannot express it
    row: dict[str, Tensor]
    col: dict[str, Tensor]
    variance: dict[str, Tensor]
    exp_avg: dict[str, Tensor]


class Adafactor:
    """Adafactor: factored second moments, update clipping, relative step sizes.

    Arguments and defaults are ``torch.optim.Adafactor``'s; the keyword-only options after
    ``maximize`` go beyond it (all default to the reference behaviour).

    Update rule (torch flavour), per parameter at step ``t``::

        w_t   = t ** beta2_decay                       # = 1 - beta2_t
        rho_t = min(lr, 1 / sqrt(t))
        alpha = max(eps2, RMS(p)) * rho_t
        p     = p * (1 - lr * weight_decay)
        if factored (last two dims, n x m):
            R = lerp(R, mean(g^2, -1), w_t);  C = lerp(C, mean(g^2, -2), w_t)
            V = R @ C / max(mean(R, -2), eps1)
        else:
            V = lerp(V, g^2, w_t)
        U = g / sqrt(max(V, eps1^2))
        p = p - alpha * U / max(1, RMS(U) / d)

    Args:
        lr: maximum relative step size ``rho_t`` (and weight-decay scale); float or tensor
            (a 0-dim tensor requiring grad receives meta-gradients).
        beta2_decay: ``beta2_t = 1 - t ** beta2_decay``; must be <= 0.
        eps: ``(eps1, eps2)``: ``eps1`` floors the second moment (``None``: the dtype's
            machine epsilon), ``eps2`` floors the parameter RMS.
        d: update clipping threshold, >= 1.
        weight_decay: decoupled decay, ``p *= 1 - lr * weight_decay``.
        maximize: ascend instead of descend.
        factored: ``False`` keeps the full second moment for every param (``n*m`` numbers
            instead of ``n+m``).
        min_dim_size_to_factor: ``None`` (reference rule): factor the last two dims of
            every param with ndim >= 2. An int selects optax's rule: factor the two
            largest dims, only when both are >= this size.
        beta1: momentum of the scaled update as in transformers (``None``: off).
        grad_clip_value: clamp each gradient entry to ``[-v, v]`` first (``None``: off).
        grad_clip_norm: then rescale all gradients by ``min(1, c / (||g|| + 1e-6))``,
            ``||g||`` the global 2-norm (as ``torch.nn.utils.clip_grad_norm_``).

    Example:
        >>> import torch
        >>> from metaopt.optim import Adafactor
        >>> opt = Adafactor(lr=1e-2)
        >>> params = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
        >>> state = opt.init(params)
        >>> state.row["w"].shape, state.col["w"].shape, state.variance["b"].shape
        (torch.Size([3, 1]), torch.Size([1, 2]), torch.Size([2]))
        >>> grads = {"w": torch.full((3, 2), 0.5), "b": torch.ones(2)}
        >>> params, state = opt.step(params, grads, state)
        >>> params["w"]  # RMS(w) = 1, rho_1 = 0.01, |U| = 1 per entry
        tensor([[0.9900, 0.9900],
                [0.9900, 0.9900],
                [0.9900, 0.9900]])

    Reference:
        ``torch.optim.Adafactor``; N. Shazeer and M. Stern, "Adafactor: Adaptive Learning
        Rates with Sublinear Memory Cost", ICML 2018.

    Differences from the reference:
        - Values: none beyond rounding (parity to 1e-10 relative in float64 is tested).
          The last two steps are fused into one scale per param (see the module notes),
          so the operation order differs.
        - Gradients: torch computes ``RMS(p)``, ``RMS(U)`` and ``min(lr, 1/sqrt(t))`` as
          Python floats with ``.item()``; here they are tensors, so derivatives flow
          through the parameter scaling and the update clipping (and into a tensor ``lr``).
        - The step counter is one tensor for all params, not one per param.
        - ``factored``, ``min_dim_size_to_factor``, ``beta1`` and gradient clipping are
          extensions; eps placement follows torch (a floor on ``V``), whereas
          :meth:`from_transformers` and :meth:`paper` add ``eps1`` to ``g^2``.
    """

    def __init__(
        self,
        lr: Scalar = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[Optional[float], float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: Scalar = 0.0,
        *,
        maximize: bool = False,
        factored: bool = True,
        min_dim_size_to_factor: Optional[int] = None,
        beta1: Optional[float] = None,
        grad_clip_norm: Optional[float] = None,
        grad_clip_value: Optional[float] = None,
    ) -> None:
        if isinstance(lr, dict):
            raise ValueError("Adafactor's lr must be a float, a 1-element tensor or a schedule f(count) -> lr "
                             "(per-parameter rates: use T.adafactor chains or SGD/Adam) but is a dict")
        check_lr(lr, "Learning rate should be >= 0 but is: {}")
        check_ge(-beta2_decay, 0.0, f"beta2_decay should be <= 0 but is: {beta2_decay}")
        eps1, eps2 = _check_eps(eps)
        if eps1 is not None:
            check_ge(eps1, 0.0, "epsilon1 should be >= 0 but is: {}")
        check_ge(eps2, 0.0, "epsilon2 should be >= 0 but is: {}")
        check_hyper(d, "d")
        check_ge(d, 1.0, "Clipping threshold d should be >= 1 but is: {}")
        check_hyper(weight_decay, "weight_decay")
        check_ge(weight_decay, 0.0, "weight_decay should be >= 0 but is: {}")
        self._configure(
            flavour="torch", lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d,
            weight_decay=weight_decay, maximize=maximize, factored=factored,
            min_dim_size_to_factor=min_dim_size_to_factor, beta1=beta1,
            grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value,
            relative_step=True, scale_parameter=True, warmup_init=False,
        )

    # ----------------------------------------------------------------------------------
    # Alternative constructors
    # ----------------------------------------------------------------------------------
    @classmethod
    def from_transformers(
        cls,
        lr: Optional[Scalar] = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: Optional[float] = None,
        weight_decay: Scalar = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        **extensions: Any,
    ) -> "Adafactor":
        """Adafactor reproducing ``transformers.optimization.Adafactor`` step by step.

        Same arguments, defaults and validation errors as transformers. The rule differs
        from torch's in three places: ``eps1`` is added to ``g^2`` (no floor on ``V``);
        without ``lr`` the step is ``rho_t = min(1e-2, 1/sqrt(t))`` (``min(1e-6 t,
        1/sqrt(t))`` with ``warmup_init``); weight decay is ``p -= weight_decay * alpha_t * p``
        and ``beta1`` keeps an EMA of the scaled update. float16/bfloat16 params are updated
        in float32 (state in float32), like transformers.

        Args:
            lr: fixed step (requires ``relative_step=False``); float or tensor.
            eps: ``(eps1, eps2)``: added to ``g^2``; floor of ``RMS(p)``.
            clip_threshold: update clipping threshold ``d``.
            decay_rate: ``beta2_t = 1 - t ** decay_rate``.
            beta1: momentum coefficient of the scaled update (``None``: no first moment).
            weight_decay: decay coefficient, scaled by the step size.
            scale_parameter: multiply the step by ``max(eps2, RMS(p))``.
            relative_step: use the built-in ``1/sqrt(t)`` schedule instead of ``lr``.
            warmup_init: linear warm-up ``1e-6 t`` of the relative step.
            **extensions: ``maximize``, ``factored``, ``min_dim_size_to_factor``,
                ``grad_clip_norm``, ``grad_clip_value`` as in :class:`Adafactor`.

        Raises:
            ValueError: ``lr`` together with ``relative_step=True``; ``warmup_init``
                without ``relative_step``; no ``lr`` without ``relative_step``; negative
                values.

        Example:
            >>> import torch
            >>> from metaopt.optim import Adafactor
            >>> opt = Adafactor.from_transformers(lr=1e-3, relative_step=False)
            >>> p = {"w": torch.ones(2, 2)}
            >>> p, s = opt.step(p, {"w": torch.ones(2, 2)}, opt.init(p))
            >>> p["w"][0, 0]
            tensor(0.9990)
        """
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        if lr is None and not relative_step:
            raise ValueError("`relative_step=False` requires a learning rate `lr` but lr is: None")
        if lr is not None:
            if isinstance(lr, dict):
                raise ValueError("Adafactor's lr must be a float, a 1-element tensor or a schedule but is a dict")
            check_lr(lr, "Learning rate should be >= 0 but is: {}")
        eps1, eps2 = _check_eps(eps)
        if eps1 is None:
            raise ValueError("epsilon1 must be a float for the transformers flavour but is: None")
        check_ge(eps1, 0.0, "epsilon1 should be >= 0 but is: {}")
        check_ge(eps2, 0.0, "epsilon2 should be >= 0 but is: {}")
        check_hyper(clip_threshold, "clip_threshold")
        if not clip_threshold > 0:
            raise ValueError(f"clip_threshold should be > 0 but is: {clip_threshold}")
        check_ge(-decay_rate, 0.0, f"decay_rate should be <= 0 but is: {decay_rate}")
        check_hyper(weight_decay, "weight_decay")
        check_ge(weight_decay, 0.0, "weight_decay should be >= 0 but is: {}")
        self = cls.__new__(cls)
        self._configure(
            flavour="transformers", lr=lr, beta2_decay=decay_rate, eps1=eps1, eps2=eps2,
            d=clip_threshold, weight_decay=weight_decay, beta1=beta1,
            relative_step=relative_step, scale_parameter=scale_parameter,
            warmup_init=warmup_init, **_extensions(extensions),
        )
        return self

    @classmethod
    def paper(cls, **extensions: Any) -> "Adafactor":
        """The Adafactor paper's recommended setting (Shazeer & Stern 2018, Alg. 4 + Sec. 9).

        No warm-up, no first moment (``beta1=None``), relative step
        ``rho_t = min(1e-2, 1/sqrt(t))``, parameter-scaled steps (``eps2 = 1e-3``),
        ``beta2_t = 1 - t^-0.8``, ``eps1 = 1e-30`` added to ``g^2``, update clipping at
        ``d = 1``. Equal to ``transformers``' Adafactor with its defaults.
        Also reachable by name: ``get("adafactor_transformers")`` with its defaults.

        Args:
            **extensions: ``maximize``, ``factored``, ``min_dim_size_to_factor``,
                ``grad_clip_norm``, ``grad_clip_value``.

        Example:
            >>> from metaopt.optim import Adafactor
            >>> Adafactor.paper()
            Adafactor(flavour='transformers', lr=None, beta2_decay=-0.8, eps=(1e-30, 0.001), d=1.0, weight_decay=0.0, beta1=None, relative_step=True, scale_parameter=True, warmup_init=False)
        """
        return cls.from_transformers(**extensions)

    def _configure(
        self, *, flavour: str, lr: Any, beta2_decay: float, eps1: Optional[float], eps2: float,
        d: float, weight_decay: Any, beta1: Optional[float], relative_step: bool,
        scale_parameter: bool, warmup_init: bool, maximize: bool = False, factored: bool = True,
        min_dim_size_to_factor: Optional[int] = None, grad_clip_norm: Optional[float] = None,
        grad_clip_value: Optional[float] = None,
    ) -> None:
        if beta1 is not None:
            check_hyper(beta1, "beta1")
            if is_number(beta1) and not 0.0 <= beta1 < 1.0:
                raise ValueError(f"beta1 should be in [0, 1) or None but is: {beta1}")
        if min_dim_size_to_factor is not None and (
            not isinstance(min_dim_size_to_factor, int) or min_dim_size_to_factor < 1
        ):
            raise ValueError(
                f"min_dim_size_to_factor should be None or an int >= 1 but is: {min_dim_size_to_factor!r}"
            )
        for name, v in (("grad_clip_norm", grad_clip_norm), ("grad_clip_value", grad_clip_value)):
            if v is not None:
                check_hyper(v, name)
                if is_number(v) and not v > 0:
                    raise ValueError(f"{name} should be > 0 or None but is: {v}")
        self.flavour = flavour
        # The two references differ in four places; each is one switch, decided here once
        # (the step reads these, never the flavour name):
        torch_rule = flavour == "torch"
        # eps1 floors mean(R) and V (torch) or is added to g^2 (transformers)
        self._eps_inside = not torch_rule
        # half-precision params are updated in float32 (transformers) or in their dtype
        self._half_in_float32 = not torch_rule
        # weight decay p (1 - lr wd) (torch) or p (1 - wd alpha_t) (transformers)
        self._decay_by_step_size = not torch_rule
        # step size rho_t: min(lr, 1/sqrt t) (torch), min(1e-2, 1/sqrt t) (transformers'
        # relative step), min(1e-6 t, 1/sqrt t) (its warm-up), or lr (relative_step=False)
        self._rho_rule = "min_lr" if torch_rule else "fixed" if not relative_step else "warmup" if warmup_init else "relative"
        self.lr = lr
        self.beta2_decay = float(beta2_decay)
        self.eps = (eps1, eps2)
        self.d = d
        self.weight_decay = weight_decay
        self.beta1 = beta1
        self.relative_step = relative_step
        self.scale_parameter = scale_parameter
        self.warmup_init = warmup_init
        self.maximize = bool(maximize)
        self.factored = bool(factored)
        self.min_dim_size_to_factor = min_dim_size_to_factor
        self.grad_clip_norm = grad_clip_norm
        self.grad_clip_value = grad_clip_value
        self._use_wd = not (is_number(weight_decay) and weight_decay == 0)

    def __repr__(self) -> str:
        args = (
            f"flavour={self.flavour!r}, lr={self.lr}, beta2_decay={self.beta2_decay}, "
            f"eps={self.eps}, d={self.d}, weight_decay={self.weight_decay}"
        )
        if self.flavour == "transformers" or self.beta1 is not None:
            args += f", beta1={self.beta1}"
        if self.flavour == "transformers":
            args += (
                f", relative_step={self.relative_step}, scale_parameter={self.scale_parameter}, "
                f"warmup_init={self.warmup_init}"
            )
        for name in ("maximize", "factored", "min_dim_size_to_factor", "grad_clip_norm", "grad_clip_value"):
            value, default = getattr(self, name), {"factored": True}.get(name, None if "_" in name else False)
            if value != default:
                args += f", {name}={value}"
        return f"Adafactor({args})"

    def as_chain(self) -> Chained:
        """The same rule as a chain of :mod:`~metaopt.optim.transforms` (optax's shape).

        ``step`` fuses update clipping, parameter scaling and the relative step into one
        batched scale per param (fewer kernels: the inner loop's cost); this chain is the
        readable specification it is tested against (equal to 1e-12 in float64).

        Example:
            >>> import torch
            >>> opt = Adafactor(lr=0.1, weight_decay=0.1)
            >>> p, g = {"w": torch.randn(3, 4, dtype=torch.float64)}, {"w": torch.randn(3, 4, dtype=torch.float64)}
            >>> ref = opt.as_chain()
            >>> torch.allclose(opt.step(p, g, opt.init(p))[0]["w"], ref.step(p, g, ref.init(p))[0]["w"], rtol=1e-12)
            True
        """
        torch_rule = not self._eps_inside
        eps1, eps2 = self.eps
        tx = [T.scale(-1.0)] if self.maximize else []
        if self.grad_clip_value is not None:
            tx.append(T.clip(self.grad_clip_value))
        if self.grad_clip_norm is not None:
            tx.append(T.clip_by_global_norm(self.grad_clip_norm))
        tx += [
            T.scale_by_factored_rms(self.beta2_decay, eps1, eps_inside=not torch_rule, factored=self.factored,
                                    min_dim_size_to_factor=self.min_dim_size_to_factor),
            T.clip_by_block_rms(self.d),
        ]
        if self.scale_parameter:
            tx.append(T.scale_by_param_block_rms(eps2))
        tx.append(self._scale_by_step_size())
        if self.beta1 is not None:
            tx.append(T.ema(self.beta1))
        tx.append(T.scale(-1.0))
        if self._use_wd:
            tx.append(self._hf_decay() if self._decay_by_step_size else T.add_decoupled_weight_decay(self.lr, self.weight_decay))
        return Chained(T.chain(*tx))

    def _scale_by_step_size(self) -> T.GradientTransformation:
        """``u = rho_t u`` (torch: ``min(lr, 1/sqrt(t))``; transformers: see ``_step_scalars``)."""

        def update(updates, state, params):
            rho = {}
            for u in updates.values():
                if u.dtype not in rho:
                    rho[u.dtype] = self._step_scalars(state.count, u.dtype)[1]
            return {k: u * rho[u.dtype] for k, u in updates.items()}, T.CountState(state.count + 1)

        return T.GradientTransformation(lambda params: T.CountState(T._count(params)), update)

    def _hf_decay(self) -> T.GradientTransformation:
        """transformers' decay ``p -= weight_decay * alpha_t * p``, ``alpha_t = rho_t max(eps2, RMS(p))``."""

        def update(updates, state, params):
            out = {}
            for k, u in updates.items():
                alpha = self._step_scalars(state.count, u.dtype)[1]
                if self.scale_parameter:
                    alpha = alpha * torch.clamp(T._rms(params[k]), min=self.eps[1])
                out[k] = u - (self.weight_decay * alpha) * params[k]
            return out, T.CountState(state.count + 1)

        return T.GradientTransformation(lambda params: T.CountState(T._count(params)), update)

    # ----------------------------------------------------------------------------------
    # Pieces
    # ----------------------------------------------------------------------------------
    def factored_dims(self, shape: torch.Size) -> Optional[tuple[int, int]]:
        """The two dims ``(a, b)`` (``a < b``) whose second moment is factored, or ``None``.

        Reference rule: the last two dims of any param with ndim >= 2. Optax rule
        (``min_dim_size_to_factor`` set): the two largest dims, if both are large enough
        (ties go to the later dim, so square matrices factor like the reference).
        """
        if not self.factored or len(shape) < 2:
            return None
        if self.min_dim_size_to_factor is None:
            return len(shape) - 2, len(shape) - 1
        order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
        a, b = sorted(order[-2:])
        if min(shape[a], shape[b]) < self.min_dim_size_to_factor:
            return None
        return a, b

    def _compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # transformers updates half-precision params in float32.
        return torch.float32 if self._half_in_float32 and dtype in _HALF else dtype

    def init(self, params: Params) -> AdafactorState:
        """Zero second moments: ``(..., n, 1)`` and ``(..., 1, m)`` per factored param."""
        row, col, variance, exp_avg = {}, {}, {}, {}
        count = None
        for k, p in params.items():
            if not torch.is_floating_point(p):
                raise ValueError(f"params[{k!r}] must be a floating-point tensor but has dtype {p.dtype}")
            dtype = self._compute_dtype(p.dtype)
            dims = self.factored_dims(p.shape)
            if dims is None:
                variance[k] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            else:
                a, b = dims
                row_shape, col_shape = list(p.shape), list(p.shape)
                row_shape[b] = 1
                col_shape[a] = 1
                row[k] = p.new_zeros(row_shape, dtype=dtype)
                col[k] = p.new_zeros(col_shape, dtype=dtype)
            if self.beta1 is not None:
                exp_avg[k] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            if count is None:
                count = torch.zeros((), dtype=torch.int64, device=p.device)
        if count is None:
            count = torch.zeros((), dtype=torch.int64)
        return AdafactorState(count, row, col, variance, exp_avg)

    def _clip_grads(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.grad_clip_value is not None:
            v = self.grad_clip_value
            grads = {k: g.clamp(-v, v) for k, g in grads.items()}
        if self.grad_clip_norm is not None and grads:
            # norms in the grads' dtype (float32 for half precision), as clip_grad_norm_
            dtype = torch.promote_types(torch.float32, next(iter(grads.values())).dtype)
            norms = torch.stack([torch.linalg.vector_norm(g).to(dtype) for g in grads.values()])
            total = torch.linalg.vector_norm(norms)
            coef = torch.clamp(self.grad_clip_norm / (total + 1e-6), max=1.0)  # (,)
            grads = {k: g * coef.to(g.dtype) for k, g in grads.items()}
        return grads

    def _step_scalars(self, count: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``w_t = t^beta2_decay`` and the step size ``rho_t`` (0-dim tensors of ``dtype``)."""
        t = (count + 1).to(dtype)
        w = torch.pow(t, self.beta2_decay)
        inv_sqrt_t = torch.rsqrt(t)
        lr = self._lr_now(count, t)
        if self._rho_rule == "min_lr":
            rho = _minimum(inv_sqrt_t, lr)
        elif self._rho_rule == "fixed":
            rho = lr if isinstance(lr, Tensor) else torch.full_like(t, lr)
        elif self._rho_rule == "warmup":
            rho = torch.minimum(t * 1e-6, inv_sqrt_t)
        else:  # "relative"
            rho = torch.clamp(inv_sqrt_t, max=1e-2)
        return w, rho

    def step(self, params: Params, grads: Grads, state: AdafactorState) -> tuple[Params, AdafactorState]:
        """One Adafactor step, out of place. See the class docstring for the rule."""
        check_inputs(params, grads)
        floor = not self._eps_inside  # torch: floors on mean(R) and V; transformers: eps1 in g^2
        eps1 = self.eps[0]
        grads = dict(grads)
        for k, g in grads.items():
            dtype = self._compute_dtype(g.dtype)
            if dtype != g.dtype:
                grads[k] = g.to(dtype)
        grads = self._clip_grads(grads)

        scalars: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        new_row, new_col, new_var = {}, {}, {}
        updates: dict[str, Tensor] = {}  # normalised update U per param (before clipping)
        for k, g in grads.items():
            dtype = g.dtype
            if dtype not in scalars:
                scalars[dtype] = self._step_scalars(state.count, dtype)
            w, _ = scalars[dtype]
            e1 = torch.finfo(dtype).eps if eps1 is None else eps1
            g2 = torch.square(g)
            if not floor:
                g2 = g2 + e1  # transformers: eps1 inside the averages
            if k in state.row:
                dims = self.factored_dims(g.shape)
                if dims is None:
                    raise ValueError(
                        f"state.row has an entry for {k!r} but a param of shape {tuple(g.shape)} is not "
                        "factored; pass the state this optimizer's init made"
                    )
                a, b = dims
                r = torch.lerp(state.row[k], _mean(g2, b), w)  # (..., n, 1)
                c = torch.lerp(state.col[k], _mean(g2, a), w)  # (..., 1, m)
                new_row[k], new_col[k] = r, c
                r_mean = _mean(r, a)  # (..., 1, 1)
                if not floor:
                    # transformers' order: rsqrt of each factor, then the product. With eps1
                    # = 1e-30 a dead row times a dead column (~1e-30 * 1e-30) underflows to
                    # 0 in float32, and rsqrt(0) * 0 would be NaN; each factor stays finite.
                    updates[k] = factor_rsqrt(r / r_mean) * factor_rsqrt(c) * g  # (..., n, m)
                    continue
                v = (r / r_mean.clamp(min=e1)) * c  # (..., n, m) = R C / mean(R)
            else:
                v = torch.lerp(state.variance[k], g2, w)
                new_var[k] = v
            if floor:
                v = v.clamp(min=e1 * e1)
            updates[k] = torch.rsqrt(v) * g

        new_params, new_exp_avg = self._apply(params, updates, state, scalars)
        return new_params, AdafactorState(state.count + 1, new_row, new_col, new_var, new_exp_avg)

    def _apply(
        self, params: Params, updates: dict[str, Tensor], state: AdafactorState,
        scalars: dict[torch.dtype, tuple[Tensor, Tensor]],
    ) -> tuple[Params, dict[str, Tensor]]:
        """Update clipping, parameter scaling, momentum, weight decay and the final step.

        ``alpha_t U / max(1, RMS(U)/d)`` with ``alpha_t = max(eps2, RMS(p)) rho_t`` equals
        ``max(|p|, eps2 sqrt(N)) / max(|U|, d sqrt(N)) * (rho_t d)`` (2-norms, ``N`` the
        numel); the norms of all params of one dtype are stacked so that formula runs once.
        """
        eps2, d = self.eps[1], self.d
        sign = 1.0 if self.maximize else -1.0  # maximize ascends: p + step
        new_params: Params = {}
        new_exp_avg: dict[str, Tensor] = {}
        by_dtype: dict[torch.dtype, list[str]] = {}
        for k, u in updates.items():
            by_dtype.setdefault(u.dtype, []).append(k)
        for dtype, keys in by_dtype.items():
            _, rho = scalars[dtype]
            sqrt_n = [math.sqrt(updates[k].numel()) for k in keys]
            p32 = {k: params[k].to(dtype) for k in keys}  # no-op unless half (transformers)
            norm_u = torch.stack([torch.linalg.vector_norm(updates[k]) for k in keys])  # (P,)
            floor_u = self._const([d * s for s in sqrt_n], norm_u)
            scale = (rho * d) / torch.maximum(norm_u, floor_u)  # (P,)
            if self.scale_parameter:
                norm_p = torch.stack([torch.linalg.vector_norm(p32[k]) for k in keys])
                floor_p = self._const([eps2 * s for s in sqrt_n], norm_u)
                p_scale = torch.maximum(norm_p, floor_p)  # max(eps2, RMS(p)) sqrt(N)
            else:
                p_scale = self._const(sqrt_n, norm_u)
            scale = scale * p_scale
            if self._use_wd:
                decay = self._decay(p_scale, rho, sqrt_n, state.count)  # (P,) or scalar multiplier of p
            for i, (k, s) in enumerate(zip(keys, scale.unbind(0))):
                p = p32[k]
                if self._use_wd:
                    p = p * (decay if not isinstance(decay, Tensor) or decay.dim() == 0 else decay[i])
                if self.beta1 is None:
                    new_p = torch.addcmul(p, updates[k], s, value=sign)
                else:
                    m = torch.lerp(state.exp_avg[k], updates[k] * s, 1.0 - self.beta1)
                    new_exp_avg[k] = m
                    new_p = p + sign * m
                new_params[k] = new_p.to(params[k].dtype)
        return new_params, new_exp_avg

    def _const(self, values: list[float], like: Tensor) -> Tensor:
        """A constant vector, cached per (values, dtype, device): building it from a Python
        list every step would be a host-to-device copy on accelerators."""
        key = (tuple(values), like.dtype, like.device)
        cache = self.__dict__.setdefault("_consts", {})
        out = cache.get(key)
        if out is None:
            out = cache[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
        return out

    def _lr_now(self, count: Tensor, like: Tensor) -> Any:
        """``lr`` at this step (a schedule is called with the count), 0-d, in ``like``'s dtype."""
        return lr_at(self.lr, "", count, like)

    def _decay(self, p_scale: Tensor, rho: Tensor, sqrt_n: list[float], count: Tensor) -> Any:
        """Multiplier of ``p`` for weight decay: ``1 - lr wd`` (torch), ``1 - wd alpha_t`` (HF)."""
        wd = self.weight_decay
        if not self._decay_by_step_size:
            # lr and wd in the params' dtype (a float32 tensor lr with float64 params would
            # otherwise round 1 - lr wd to float32); a (1,) lr is viewed 0-d.
            return 1.0 - self._lr_now(count, p_scale) * cast_hyper(wd, p_scale)
        inv_sqrt_n = self._const([1.0 / s for s in sqrt_n], p_scale)
        alpha = p_scale * inv_sqrt_n * rho if self.scale_parameter else rho
        return 1.0 - wd * alpha


_EXTENSIONS = ("maximize", "factored", "min_dim_size_to_factor", "grad_clip_norm", "grad_clip_value")


def _extensions(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(_EXTENSIONS))
    if unknown:
        raise ValueError(f"Unknown Adafactor option(s): {unknown}; allowed extensions: {list(_EXTENSIONS)}")
    return kwargs


def _mean(x: Tensor, dim: int) -> Tensor:
    # A mean over a size-1 dim is the identity: skip the kernel (e.g. (40, 1) weights).
    return x if x.shape[dim] == 1 else x.mean(dim, keepdim=True)


def _minimum(x: Tensor, lr: Any) -> Tensor:
    if isinstance(lr, Tensor):
        return torch.minimum(x, lr.to(x.dtype))
    return torch.clamp(x, max=lr)


def _check_eps(eps: Any) -> tuple[Optional[float], float]:
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"eps should be a pair (eps1, eps2) but is: {eps!r}")
    eps1, eps2 = eps
    if eps1 is not None:
        check_hyper(eps1, "eps[0]")
    check_hyper(eps2, "eps[1]")
    return eps1, eps2


# For optim.get's check. Any: mypy does not model a bound classmethod's __func__.
cast(Any, Adafactor.from_transformers).__func__.extension_kwargs = _EXTENSIONS
