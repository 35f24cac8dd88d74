"""Adafactor inside ``higher``: differentiable ``torch.optim.Adafactor`` and transformers' Adafactor.

``higher.innerloop_ctx`` maps each ``torch.optim`` optimizer to a differentiable twin and
raises ``ValueError("Optimizer type ... not supported by higher yet")`` for the ones it
does not know, Adafactor included. Importing this module registers twins with
``higher.register_optim`` for ``torch.optim.Adafactor`` and, when transformers is
installed, ``transformers.optimization.Adafactor``, so existing higher code runs unchanged
(transformers is not imported for this: its twin is registered as soon as higher looks up an
optimizer type it does not know while ``transformers.optimization`` is loaded, see
:func:`register`)::

    import higher
    import metaopt.integrations.higher  # noqa: F401  (registers Adafactor with higher)

    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(loss_fn(fmodel(xs), ys))
        loss_fn(fmodel(xq), yq).backward()  # meta-gradient in model.parameters()

There is one implementation of the maths: each step calls
:meth:`metaopt.optim.Adafactor.step` (built with :class:`metaopt.optim.Adafactor` or
:meth:`metaopt.optim.Adafactor.from_transformers` from the parameter group's
hyperparameters), once per parameter group, so higher and :class:`metaopt.MAML` give the
same meta-gradients and the inner steps equal the reference optimizer's ``step()``.

Behaviour, by the reference optimizer's rules:

* **Parameter groups**: each group keeps its own hyperparameters (``lr``, ``eps``,
  ``weight_decay``, ``d`` / ``clip_threshold``, ...), read afresh at every step.
* **Parameters without a gradient** (``requires_grad=False``, or unused by the loss) are
  skipped and their step counter does not advance, as ``torch.optim`` skips ``p.grad is None``.
* **Existing state**: higher copies the optimizer's state (detached) when the context is
  entered; it is converted once, so the first differentiable step continues from step
  ``t + 1`` exactly as ``opt.step()`` would. transformers' ``RMS`` entry is recomputed,
  not read. The state is *not* written back to the torch optimizer (higher never does).
* **override**: ``innerloop_ctx(..., override={"lr": [torch.tensor(1e-2, requires_grad=True)]})``
  replaces hyperparameters (one value for every group, or one per group); tensors
  requiring grad receive meta-gradients through every step. transformers' relative-step
  mode has no ``lr``: override ``relative_step=[False]`` together with ``lr`` (otherwise
  ``ValueError``, as transformers' own constructor).
* ``track_higher_grads=False`` and ``grad_callback`` work as for higher's own optimizers.

State layout (``diffopt.state[group][param_index]``): a dict with ``"step"`` (0-dim int64
tensor) and the per-parameter entries of :class:`metaopt.optim.AdafactorState`
(``"row"`` ``(..., n, 1)`` / ``"col"`` ``(..., 1, m)`` for parameters with two or more
dims, ``"variance"`` otherwise, ``"exp_avg"`` with transformers' ``beta1``). Parameters of
a group that share a step count (normally all of them) are stepped by one call.

Differences from the reference optimizers: the step counter is an int64 tensor;
``torch.optim.Adafactor``'s ``foreach`` is ignored; subclasses of the two optimizers are not
registered automatically (``higher.register_optim(MyAdafactor, DifferentiableAdafactor)``).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import higher as _higher
import higher.optim as _higher_optim
import torch
from higher.optim import DifferentiableOptimizer
from torch import Tensor

from metaopt.optim.adafactor import Adafactor, AdafactorState

_STATE_KEYS = ("row", "col", "variance", "exp_avg")


class _DifferentiableAdafactorBase(DifferentiableOptimizer):
    """Shared by both twins: state conversion, grouping by step count, the step itself."""

    #: parameter-group keys that configure the optimizer (the cache key of a built one).
    _HYPER_KEYS: tuple[str, ...] = ()

    def __init__(self, other: torch.optim.Optimizer, reference_params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(other, reference_params, *args, **kwargs)
        # Python-side step counts, one per parameter, to group params without a host sync.
        self._steps: list[list[int]] = [[0] * len(g["params"]) for g in self.param_groups]
        self._built: list[Optional[tuple[tuple[Any, ...], Adafactor]]] = [None] * len(self.param_groups)
        for gi, group_state in enumerate(self.state):
            for pi in list(group_state):
                old = group_state[pi]
                if not old:
                    del group_state[pi]
                    continue
                new = self._import_state(old)
                group_state[pi] = new
                self._steps[gi][pi] = int(new["step"])  # one sync per parameter, at entry only

    # ------------------------------------------------------------------ per flavour

    def _build(self, group: dict[str, Any]) -> Adafactor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _import_state(self, state: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def functional_optimizer(self, group_index: int = 0) -> Adafactor:
        """The :class:`metaopt.optim.Adafactor` that steps group ``group_index`` now."""
        group = self.param_groups[group_index]
        key = tuple((k, _cache_key(group.get(k))) for k in self._HYPER_KEYS)
        built = self._built[group_index]
        if built is None or built[0] != key:
            built = self._built[group_index] = (key, self._build(group))
        return built[1]

    def _update(self, grouped_grads: list[list[Optional[Tensor]]], **kwargs: Any) -> None:
        for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            opt = self.functional_optimizer(gi)
            buckets: dict[int, list[int]] = {}  # step count -> param indices (usually one bucket)
            for pi, g in enumerate(grads):
                if g is not None:  # torch.optim skips p.grad is None; so does its step counter
                    buckets.setdefault(self._steps[gi][pi], []).append(pi)
            for count, idx in buckets.items():
                params = {str(pi): group["params"][pi] for pi in idx}
                grads_i = {str(pi): g for pi in idx if (g := grads[pi]) is not None}  # all, by bucketing
                state = self._gather(gi, idx, opt, params)
                new_params, new_state = opt.step(params, grads_i, state)
                for pi in idx:
                    k = str(pi)
                    group["params"][pi] = new_params[k]
                    entry = {"step": new_state.count}
                    for name in _STATE_KEYS:
                        part = getattr(new_state, name)
                        if k in part:
                            entry[name] = part[k]
                    self.state[gi][pi] = entry
                    self._steps[gi][pi] = count + 1

    def _gather(self, gi: int, idx: list[int], opt: Adafactor, params: dict[str, Tensor]) -> AdafactorState:
        """One :class:`AdafactorState` for params ``idx`` of group ``gi`` (all at one step count)."""
        stored = {str(pi): self.state[gi][pi] for pi in idx if self.state[gi].get(pi)}
        missing = {k: p for k, p in params.items() if k not in stored}
        fresh = opt.init(missing) if missing else None
        parts: dict[str, dict[str, Tensor]] = {name: {} for name in _STATE_KEYS}
        for k in params:
            if k in stored:
                for name in _STATE_KEYS:
                    if name in stored[k]:
                        parts[name][k] = stored[k][name]
            else:
                for name in _STATE_KEYS:
                    part = getattr(fresh, name)
                    if k in part:
                        parts[name][k] = part[k]
        if stored:
            count = next(iter(stored.values()))["step"]
        elif fresh is not None:
            count = fresh.count
        else:
            raise ValueError(f"no params to gather for group {gi}: idx is empty")
        return AdafactorState(count, parts["row"], parts["col"], parts["variance"], parts["exp_avg"])


class DifferentiableAdafactor(_DifferentiableAdafactorBase):
    """Differentiable ``torch.optim.Adafactor`` for higher, stepping with :class:`metaopt.optim.Adafactor`.

    Built by ``higher.innerloop_ctx`` / ``higher.get_diff_optim`` once this module is
    imported; see the module docstring for groups, existing state and ``override``.

    Example:
        >>> import torch, higher
        >>> import metaopt.integrations.higher  # registers the twin
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     _ = diffopt.step(fmodel(torch.ones(4, 3)).pow(2).mean())
        ...     fmodel(torch.ones(4, 3)).mean().backward()
        >>> type(diffopt).__name__, model.weight.grad.shape
        ('DifferentiableAdafactor', torch.Size([1, 3]))
    """

    _HYPER_KEYS = ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize")

    def _build(self, group: dict[str, Any]) -> Adafactor:
        return Adafactor(
            lr=group["lr"], beta2_decay=group["beta2_decay"], eps=tuple(group["eps"]), d=group["d"],
            weight_decay=group["weight_decay"], maximize=bool(group.get("maximize", False)),
        )

    def _import_state(self, state: dict[str, Any]) -> dict[str, Any]:
        # torch: step (float32 0-dim), row_var (..., n, 1), col_var (..., 1, m) | variance.
        step = state["step"]
        step = step.to(torch.int64) if isinstance(step, Tensor) else torch.tensor(int(step))
        out: dict[str, Any] = {"step": step}
        if "row_var" in state:
            out["row"], out["col"] = state["row_var"], state["col_var"]
        else:
            out["variance"] = state["variance"]
        return out


class DifferentiableTransformersAdafactor(_DifferentiableAdafactorBase):
    """Differentiable ``transformers.optimization.Adafactor`` for higher.

    Steps with :meth:`metaopt.optim.Adafactor.from_transformers` built from each group's
    ``lr``, ``eps``, ``clip_threshold``, ``decay_rate``, ``beta1``, ``weight_decay``,
    ``scale_parameter``, ``relative_step`` and ``warmup_init``. float16/bfloat16 params
    are updated in float32, like transformers.

    Example:
        >>> import torch, higher
        >>> from transformers.optimization import Adafactor as HFAdafactor
        >>> import metaopt.integrations.higher
        >>> model = torch.nn.Linear(3, 1)
        >>> with higher.innerloop_ctx(model, HFAdafactor(model.parameters()), copy_initial_weights=False) as (f, d):
        ...     _ = d.step(f(torch.ones(4, 3)).pow(2).mean())
        >>> type(d).__name__
        'DifferentiableTransformersAdafactor'
    """

    _HYPER_KEYS = (
        "lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay",
        "scale_parameter", "relative_step", "warmup_init",
    )

    def _build(self, group: dict[str, Any]) -> Adafactor:
        return Adafactor.from_transformers(
            lr=group["lr"], eps=tuple(group["eps"]), clip_threshold=group["clip_threshold"],
            decay_rate=group["decay_rate"], beta1=group["beta1"], weight_decay=group["weight_decay"],
            scale_parameter=group["scale_parameter"], relative_step=group["relative_step"],
            warmup_init=group["warmup_init"],
        )

    def _import_state(self, state: dict[str, Any]) -> dict[str, Any]:
        # transformers: step (int), exp_avg_sq_row (..., n), exp_avg_sq_col (..., m) |
        # exp_avg_sq, exp_avg (with beta1), RMS (recomputed at each step: dropped).
        tensors = [v for v in state.values() if isinstance(v, Tensor)]
        device = tensors[0].device if tensors else None
        step = state["step"]
        step = step.to(torch.int64) if isinstance(step, Tensor) else torch.tensor(int(step), device=device)
        out: dict[str, Any] = {"step": step}
        if "exp_avg_sq_row" in state:
            out["row"] = state["exp_avg_sq_row"].unsqueeze(-1)
            out["col"] = state["exp_avg_sq_col"].unsqueeze(-2)
        else:
            out["variance"] = state["exp_avg_sq"]
        if "exp_avg" in state:
            out["exp_avg"] = state["exp_avg"]
        return out


def _cache_key(v: Any) -> Any:
    """Hashable stand-in for a hyperparameter: tensors by identity (they may require grad)."""
    if isinstance(v, Tensor):
        return ("tensor", id(v))
    if isinstance(v, (list, tuple)):
        return tuple(_cache_key(x) for x in v)
    return v


def transformers_adafactor_class() -> Optional[type]:
    """``transformers.optimization.Adafactor``, or ``None`` when transformers is not installed."""
    try:
        from transformers.optimization import Adafactor as HFAdafactor
    except ImportError:
        return None
    return HFAdafactor


def _loaded_transformers_adafactor() -> Optional[type]:
    """``transformers.optimization.Adafactor`` if that module is loaded already (never imports it)."""
    hf = getattr(sys.modules.get("transformers.optimization"), "Adafactor", None)
    return hf if isinstance(hf, type) else None


class _LazyOptMapping(dict):  # type: ignore[type-arg]
    """higher's ``optim._opt_mapping`` (optimizer type -> twin), registering transformers' twin late.

    higher keys its table by the optimizer class, and transformers' class exists only once
    ``transformers.optimization`` is imported (about 3 s). So instead of importing it, a lookup
    that misses (``type(opt) in table``, ``table[type(opt)]``) first registers the twin if that
    module has been loaded since; an instance of transformers' Adafactor implies it has.
    """

    _metaopt_lazy = True

    def _add_late(self, key: Any) -> bool:
        hf = _loaded_transformers_adafactor()
        if hf is not None:
            self.setdefault(hf, DifferentiableTransformersAdafactor)  # keeps a user's own twin
        return dict.__contains__(self, key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or self._add_late(key)

    def __missing__(self, key: Any) -> Any:
        if self._add_late(key):
            return dict.__getitem__(self, key)
        raise KeyError(key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default


def _install() -> dict[type, type]:
    """Register the torch twin and the late transformers hook; returns what is registered now."""
    if not getattr(type(_higher_optim._opt_mapping), "_metaopt_lazy", False):
        _higher_optim._opt_mapping = _LazyOptMapping(_higher_optim._opt_mapping)
    done: dict[type, type] = {torch.optim.Adafactor: DifferentiableAdafactor}
    hf = _loaded_transformers_adafactor()
    if hf is not None:
        done[hf] = DifferentiableTransformersAdafactor
    for optim_type, twin in done.items():
        _higher.register_optim(optim_type, twin)
    return done


def register() -> dict[type, type]:
    """Register the differentiable twins with ``higher.register_optim`` (idempotent).

    Importing this module registers ``torch.optim.Adafactor``'s twin, and transformers' as soon
    as higher looks up an optimizer type it does not know once ``transformers.optimization``
    is loaded, without importing transformers itself. Calling this registers both now
    (importing transformers when installed). Returns ``{optimizer class: twin class}`` for
    what was registered (transformers' Adafactor only when transformers is installed).

    Example:
        >>> import torch
        >>> from metaopt.integrations.higher import register, DifferentiableAdafactor
        >>> register()[torch.optim.Adafactor] is DifferentiableAdafactor
        True
    """
    transformers_adafactor_class()  # imports transformers.optimization when installed ...
    return _install()  # ... so this registers its twin together with torch's


_install()


def __getattr__(name: str) -> Any:
    # ``REGISTERED`` (what :func:`register` returns) is computed on first access, as it
    # imports transformers when installed; importing this module does not.
    if name == "REGISTERED":
        registered = globals()["REGISTERED"] = register()
        return registered
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DifferentiableAdafactor",
    "DifferentiableTransformersAdafactor",
    "REGISTERED",
    "register",
    "transformers_adafactor_class",
]
