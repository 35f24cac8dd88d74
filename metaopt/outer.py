"""The outer (meta-) optimizer: any ``torch.optim`` optimizer, built by name for configs.

``build_outer_optimizer("adam", params, lr=1e-3)`` or, from a config section,
``build_outer_optimizer({"name": "adafactor", "impl": "transformers", "lr": None}, params)``.

Names: ``adam``, ``adamw``, ``sgd`` (``torch.optim``) and ``adafactor`` with
``impl: torch`` (``torch.optim.Adafactor``) or ``impl: transformers``
(``transformers.optimization.Adafactor``). Every other key is passed to the constructor
(``weight_decay``, ``betas``, ``momentum``, ``scale_parameter``, ...); YAML lists become
tuples (``eps: [null, 0.001]``).

Adafactor caveats (read before comparing numbers across implementations):

* ``impl: transformers`` has two modes. **Relative step** (``lr: null``, transformers'
  default): the step size is ``min(1e-2, 1/sqrt(t))`` (or ``1e-6 * t`` with
  ``warmup_init``), so there is no learning rate to set; transformers refuses an explicit
  ``lr`` together with ``relative_step=True``, and so does this factory. **Explicit lr**
  (``lr: 0.001``): ``relative_step`` defaults to ``False`` here and, unless given,
  ``scale_parameter`` defaults to ``False`` too (transformers' documented recipe for using
  Adafactor like Adam: ``scale_parameter=False, relative_step=False, warmup_init=False``).
  With ``scale_parameter=True`` every step is multiplied by ``max(eps[1], RMS(param))``,
  so parameters initialised near zero (biases!) barely move: an ``lr`` tuned for Adam is
  then far too small.
* ``impl: torch`` (``torch.optim.Adafactor``) always scales by the parameter's RMS:
  the step is ``min(lr, 1/sqrt(t)) * max(eps[1], RMS(param))`` (``lr`` is a cap on the
  relative step, default 1e-2), it has no first moment; updates are clipped at RMS `d` (default 1.0).
  ``lr`` is required (a float; no relative-step mode without it).
* Both keep factored second moments only for parameters with 2 or more dimensions.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> opt = build_outer_optimizer("adamw", [w], lr=1e-3, weight_decay=0.01)
    >>> type(opt).__name__, opt.defaults["weight_decay"]
    ('AdamW', 0.01)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

NAMES = ("adam", "adamw", "sgd", "adafactor")
IMPLS = ("torch", "transformers")


def optimizer_class(name: str, impl: str = "torch") -> type[torch.optim.Optimizer]:
    """The optimizer class for ``name`` / ``impl``.

    Raises:
        ValueError: unknown name or impl, or transformers not installed for
            ``impl="transformers"``.
    """
    key = str(name).lower()
    if key not in NAMES:
        raise ValueError(f"unknown outer optimizer {name!r}; known: {', '.join(NAMES)}")
    if impl not in IMPLS:
        raise ValueError(f"unknown outer optimizer impl {impl!r}; known: {', '.join(IMPLS)}")
    if impl == "transformers":
        if key != "adafactor":
            raise ValueError(f"impl 'transformers' is only available for adafactor, not {name!r}")
        try:
            from transformers.optimization import Adafactor
        except ImportError as e:  # pragma: no cover - transformers is a test dependency
            raise ValueError(
                "outer adafactor with impl 'transformers' needs transformers (pip install 'metaopt[hf]')"
            ) from e
        return Adafactor
    return {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "adafactor": torch.optim.Adafactor,
    }[key]


def _tuples(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def build_outer_optimizer(
    cfg: str | Mapping[str, Any],
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the meta-optimizer over ``params``.

    Args:
        cfg: an optimizer name (``"adam"``, ``"adamw"``, ``"sgd"``, ``"adafactor"``) or a
            config mapping ``{"name": ..., "lr": ..., "impl": "torch"|"transformers", **extra}``.
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        **kwargs: constructor arguments; they override those in ``cfg``. ``impl`` picks the
            Adafactor implementation (default ``"torch"``).

    Returns:
        A ``torch.optim.Optimizer``.

    Raises:
        ValueError: unknown name/impl, an argument the constructor does not take, an
            invalid value (negative lr, ...), or ``lr`` given with transformers'
            ``relative_step=True``.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> opt = build_outer_optimizer({"name": "adafactor", "impl": "transformers", "lr": None}, [w])
        >>> opt.defaults["relative_step"], opt.defaults["scale_parameter"]
        (True, True)
    """
    spec: dict[str, Any] = {"name": cfg} if isinstance(cfg, str) else dict(cfg)
    spec.update(kwargs)
    name = str(spec.pop("name", "adam")).lower()
    impl = spec.pop("impl", "torch") or "torch"
    cls = optimizer_class(name, impl)
    args = {k: _tuples(v) for k, v in spec.items()}
    if "lr" in args and args["lr"] is None and not (name == "adafactor" and impl == "transformers"):
        del args["lr"]  # the class default
    if name == "adafactor" and impl == "transformers":
        lr = args.get("lr")
        if lr is None:
            args.setdefault("relative_step", True)
            if not args["relative_step"]:
                raise ValueError("transformers' Adafactor with relative_step=False needs an explicit lr")
        else:
            if args.get("relative_step", False):
                raise ValueError(
                    "transformers' Adafactor ignores lr in relative-step mode and refuses both: "
                    "set lr to null or relative_step to false"
                )
            args.setdefault("relative_step", False)
            args.setdefault("scale_parameter", False)
    try:
        return cls(params, **args)
    except TypeError as e:
        raise ValueError(f"invalid arguments for outer optimizer {name!r} ({impl}): {e}") from None


__all__ = ["IMPLS", "NAMES", "build_outer_optimizer", "optimizer_class"]
