"""From a chain of transforms to an inner optimizer: ``params + updates``.

:class:`Chained` wraps any :class:`~metaopt.optim.transforms.GradientTransformation` in the
engine's protocol (``init(params) -> state``, ``step(params, grads, state) -> (params,
state)``); the presets (:class:`~metaopt.optim.Adam`, :class:`~metaopt.optim.RMSprop`, ...)
are ``Chained`` subclasses whose constructors validate torch.optim's arguments and build the
chain. Users can build their own::

    opt = Chained(T.chain(T.clip_by_global_norm(1.0), T.scale_by_adam(), T.scale_by_learning_rate(1e-3)))
"""

from __future__ import annotations

from typing import Any, Optional

from metaopt.optim import transforms as T
from metaopt.optim._util import check_hyper, check_inputs, is_number
from metaopt.optim.transforms import GradientTransformation
from metaopt.types import Grads, Params

__all__ = ["Chained", "grad_clipping"]


class Chained:
    """An inner optimizer from a transform: ``updates, state = tx.update(grads, state, params)``,
    ``params = params + updates``.

    Args:
        transform: the update rule, ending with a learning-rate scaling (updates are added).
        grad_clip_norm: clip the gradients' global 2-norm to this first (``None``: off).
        grad_clip_value: clamp every gradient entry to ``[-v, v]`` first (``None``: off).

    Example:
        >>> import torch
        >>> from metaopt.optim import transforms as T
        >>> opt = Chained(T.chain(T.scale_by_sign(), T.scale_by_learning_rate(0.1)))  # signSGD
        >>> p = {"w": torch.tensor([1.0, 1.0])}
        >>> p, s = opt.step(p, {"w": torch.tensor([3.0, -0.5])}, opt.init(p))
        >>> p["w"]
        tensor([0.9000, 1.1000])
    """

    transform: GradientTransformation

    def __init__(
        self, transform: GradientTransformation, *, grad_clip_norm: Optional[float] = None,
        grad_clip_value: Optional[float] = None,
    ) -> None:
        if not isinstance(transform, GradientTransformation):
            raise TypeError(f"transform must be a GradientTransformation but is: {type(transform).__name__}")
        clip = grad_clipping(grad_clip_norm, grad_clip_value)
        self.grad_clip_norm, self.grad_clip_value = grad_clip_norm, grad_clip_value
        self.transform = T.chain(*clip, transform) if clip else transform

    def init(self, params: Params) -> Any:
        """The chain's initial state (zeros; one step counter per stateful piece)."""
        for k, p in params.items():
            if not p.is_floating_point():
                raise ValueError(f"params[{k!r}] must be a floating-point tensor but has dtype {p.dtype}")
        return self.transform.init(params)

    def step(self, params: Params, grads: Grads, state: Any) -> tuple[Params, Any]:
        """One step, out of place: ``params + update(grads)``."""
        check_inputs(params, grads)
        updates, state = self.transform.update(dict(grads), state, params)
        return {k: p + updates[k] for k, p in params.items()}, state

    def __repr__(self) -> str:
        keys = getattr(self, "_repr_keys", None)  # names of attributes (not copies: MAML walks attributes)
        if keys is None:
            return f"{type(self).__name__}(<transform>)"
        args = [f"{k}={getattr(self, k)!r}" for k in keys]
        args += [f"{k}={getattr(self, k)!r}" for k in ("grad_clip_norm", "grad_clip_value") if getattr(self, k, None) is not None]
        return f"{type(self).__name__}({', '.join(args)})"


def grad_clipping(grad_clip_norm: Optional[float], grad_clip_value: Optional[float]) -> list[GradientTransformation]:
    """The gradient-clipping pieces every preset accepts (keyword-only, beyond torch.optim):
    clamp each entry to ``[-grad_clip_value, grad_clip_value]``, then rescale all grads by
    ``min(1, grad_clip_norm / (||g|| + 1e-6))`` (``torch.nn.utils.clip_grad_norm_``).

    Example:
        >>> len(grad_clipping(1.0, None)), len(grad_clipping(None, None))
        (1, 0)
    """
    for name, v in (("grad_clip_norm", grad_clip_norm), ("grad_clip_value", grad_clip_value)):
        if v is not None:
            check_hyper(v, name)
            if is_number(v) and not v > 0:
                raise ValueError(f"{name} should be > 0 or None but is: {v}")
    out = []
    if grad_clip_value is not None:
        out.append(T.clip(grad_clip_value))
    if grad_clip_norm is not None:
        out.append(T.clip_by_global_norm(grad_clip_norm))
    return out
