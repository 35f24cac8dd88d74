"""Exact higher-order derivatives for the MAML engine: elementary-op normalisation, a safe
attention kernel, and the table of layers known exact (or wrong) under ``torch.func.vmap``.

Why this exists (measured in torch 2.13, float64, two inner steps, meta-gradient against
central finite differences):

- ``F.layer_norm``, ``F.instance_norm`` and ``F.batch_norm`` give wrong second-order
  gradients under ``vmap`` (relative errors 7e-3 to 1.3), silently; per task (no vmap) they
  are exact.
- ``torch._weight_norm`` (behind ``nn.utils.parametrizations.weight_norm``) has a wrong
  double backward everywhere (its fused kernel fails ``gradgradcheck``): 3e-2 off, silently.
- The default CPU attention kernel has no double backward (``nn.MultiheadAttention`` raises
  "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
  implemented"); the math kernel is exact.
- ``nn.LSTM``/``nn.GRU``/``nn.RNN`` and their cells fail under ``vmap`` (broadcast
  RuntimeError) and ``spectral_norm`` has no batching rule; per task they are exact.

:class:`ExactOps` is a ``TorchFunctionMode`` the engine enters only around its own forwards:
it replaces those functions by compositions of elementary ops with the same values (equal to
~1e-15 in float64), whose derivatives of every order are autograd's own. Users' models need
no change. :func:`vmap_support` classifies a model for ``vectorize``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> ln = nn.LayerNorm(4).double()
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> with ExactOps(replace_norms=True):
    ...     y = ln(x)
    >>> bool((y - ln(x)).abs().max() < 1e-12)
    True
    >>> vmap_support(nn.LSTM(2, 3))
    ('wrong', 'LSTM')
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations as _pz
from torch.nn.utils import parametrize as _parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as _OldSpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _OldWeightNorm
from torch.overrides import TorchFunctionMode

from metaopt import models
from metaopt.models import BatchNorm, batch_norm

__all__ = ["ExactOps", "ModelInfo", "engine_context", "inspect_model", "needs_exact_ops", "vmap_support"]


# ---------------------------------------------------------------- elementary implementations


def layer_norm(
    input: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` from mean, biased variance and ``rsqrt`` over the last dims."""
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-n, 0))
    xc = input - input.mean(dims, keepdim=True)
    y = xc * torch.rsqrt(xc.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def instance_norm(
    input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
    momentum: float = 0.1, eps: float = 1e-5,
) -> Tensor:
    """``F.instance_norm``: input ``(N, C, *spatial)``, statistics per (example, channel)
    over the spatial dims; running stats (when given) updated in place like torch: the mean
    over examples of each instance's mean and unbiased variance."""
    C = input.shape[1]
    shape = [1, C] + [1] * (input.dim() - 2)  # broadcast per channel
    if use_input_stats or running_mean is None:
        dims = tuple(range(2, input.dim()))
        mean = input.mean(dims, keepdim=True)  # (N, C, 1, ...)
        xc = input - mean
        var = xc.square().mean(dims, keepdim=True)  # biased, as torch normalises
        if use_input_stats and running_mean is not None and running_var is not None:
            n = input[0, 0].numel()
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.mean(0).reshape(-1), alpha=momentum)
                unbiased = var.mean(0).reshape(-1) * (n / max(n - 1, 1))
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    else:
        if running_var is None:  # torch's F.instance_norm raises for this too
            raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
        xc = input - running_mean.reshape(shape)
        var = running_var.reshape(shape)
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm``: ``v * g / ||v||`` with the norm over every dim but ``dim``
    (over the whole tensor when ``dim == -1``, torch's convention)."""
    if dim == -1:
        norm = v.square().sum().sqrt()
    else:
        dims = [d for d in range(v.dim()) if d != dim % v.dim()]
        norm = v.square().sum(dims, keepdim=True).sqrt()
    return v * (g / norm)


def _bound(fn: Callable[..., Any], impl: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Call ``impl`` with ``fn``'s arguments bound by name (callers use both styles)."""
    sig = inspect.signature(fn)

    def call(*args: Any, **kwargs: Any) -> Tensor:
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        return impl(*b.arguments.values())

    return call


_NORMS: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.layer_norm: _bound(F.layer_norm, layer_norm),
    F.instance_norm: _bound(F.instance_norm, instance_norm),
    F.batch_norm: _bound(F.batch_norm, batch_norm),
}


def _weight_norm_call(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    return weight_norm(v, g, dim)


def _wrapped(args: Any) -> bool:
    """True when a tensor argument lives inside a torch.func transform (vmap/grad)."""
    return any(isinstance(a, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(a) for a in args)


class ExactOps(TorchFunctionMode):
    """Replace functions with wrong higher derivatives by elementary compositions.

    ``torch._weight_norm`` is always replaced (wrong double backward everywhere). With
    ``replace_norms=True``, ``F.layer_norm`` / ``F.instance_norm`` / ``F.batch_norm`` are
    replaced when called on tensors inside a ``torch.func`` transform (wrong under vmap,
    exact and faster as torch's kernels otherwise).

    Args:
        replace_norms: also replace the normalisation functions under torch.func transforms.
    """

    def __init__(self, replace_norms: bool = False) -> None:
        super().__init__()
        self.replace_norms = replace_norms

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            return _weight_norm_call(*args, **kwargs)
        if self.replace_norms:
            impl = _NORMS.get(func)
            if impl is not None and (_wrapped(args) or _wrapped(kwargs.values())):
                return impl(*args, **kwargs)
        return func(*args, **kwargs)


# ---------------------------------------------------------------- what vmap can be trusted with

# Exact to second order under vmap once ExactOps is active (tests/test_layer_matrix.py).
# Not listed though exact: nn.Bilinear (torch has no batching rule for it; vmap falls back
# to a per-task loop, so "auto" might as well use the engine's loop).
_EXACT = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict,
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Linear, nn.Embedding,
    nn.modules.conv._ConvNd,  # Conv1d/2d/3d, ConvTranspose1d/2d/3d
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.Hardtanh,
    nn.Softsign, nn.Tanhshrink,
    nn.modules.dropout._DropoutNd,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, BatchNorm,
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder,
    _parametrize.ParametrizationList, _pz._WeightNorm,
)
# Models on which no replacement is ever needed (plain matmuls, convs, pointwise ops):
# the engine then skips ExactOps and its per-call Python overhead.
_PLAIN = tuple(t for t in _EXACT if t not in (
    nn.LayerNorm, nn.modules.batchnorm._NormBase, nn.MultiheadAttention, nn.TransformerEncoderLayer,
    nn.TransformerEncoder, _parametrize.ParametrizationList, _pz._WeightNorm,
)) + (models.MLP, models.Conv4, models.ConvBlock)


class ModelInfo(NamedTuple):
    """What the engine needs to know about a model (one walk over its modules).

    Attributes:
        support: ``"exact"``, ``"wrong"`` or ``"unknown"`` under vmap (see :func:`vmap_support`).
        what: the module behind ``"wrong"``/``"unknown"`` (class and name), else ``""``.
        plain: only layers that never need :class:`ExactOps` (linear, conv, pointwise).
        weight_norm: a weight-norm parametrization or hook is present.
        conv: a convolution is present (vmap is slower than the loop for them on CPU).
    """

    support: str
    what: str
    plain: bool
    weight_norm: bool
    conv: bool


def inspect_model(model: nn.Module) -> ModelInfo:
    """Classify every module of ``model`` once (see :func:`vmap_support`)."""
    wrong, unknown, plain, wn, conv = "", "", True, False, False
    for name, m in model.named_modules():
        label = type(m).__name__ + (f" ({name})" if name else "")
        hooks = m._forward_pre_hooks.values()
        if any(isinstance(h, _OldWeightNorm) for h in hooks) or isinstance(m, _pz._WeightNorm):
            wn = True
        conv = conv or isinstance(m, nn.modules.conv._ConvNd)
        plain = plain and isinstance(m, _PLAIN)
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):  # broadcast RuntimeError under vmap
            wrong = wrong or label
        elif isinstance(m, _pz._SpectralNorm) or any(isinstance(h, _OldSpectralNorm) for h in hooks):
            wrong = wrong or f"spectral_norm on {label}"
        elif isinstance(m, _EXACT) or isinstance(getattr(m, "parametrizations", None), nn.ModuleDict):
            continue  # in the table (parametrization modules are judged on their own)
        elif (m._parameters or m._buffers) and not unknown:
            unknown = label
    support, what = ("wrong", wrong) if wrong else ("unknown", unknown) if unknown else ("exact", "")
    return ModelInfo(support, what, plain and not wn, wn, conv)


def vmap_support(model: nn.Module) -> tuple[str, str]:
    """Classify ``model`` for the vectorised path: ``("exact", "")``, ``("wrong", what)`` for a
    module known wrong or failing under ``vmap`` (RNNs, spectral norm), or
    ``("unknown", what)`` for a module with its own parameters or buffers that is not in the
    tested table (its forward may call anything). A module without parameters or buffers of
    its own (a user's container) is judged by its submodules."""
    info = inspect_model(model)
    return info.support, info.what


def needs_exact_ops(info: ModelInfo, vectorized: bool) -> bool | None:
    """``None``: no replacement needed; ``False``/``True``: enter :class:`ExactOps` with
    ``replace_norms`` off/on. The loop only needs ``torch._weight_norm`` replaced."""
    if not vectorized:
        return False if info.weight_norm else None
    return None if info.plain else True


@contextlib.contextmanager
def engine_context(exact: bool | None, graph: bool) -> Iterator[None]:
    """Around the engine's forwards: :class:`ExactOps` (``exact`` from
    :func:`needs_exact_ops`) and, when a graph is built, the math attention kernel (the only
    one on every device whose double backward exists)."""
    with contextlib.ExitStack() as stack:
        if graph:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if exact is not None:
            stack.enter_context(ExactOps(replace_norms=exact))
        yield
