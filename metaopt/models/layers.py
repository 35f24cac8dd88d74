"""Layers the zoo's conv nets share: :class:`BatchNorm` (exact under ``torch.func.vmap`` to every
order, see :mod:`metaopt.models`), :func:`max_pool2x2` (torch's channels-last CPU kernel with
the same values and derivatives) and :func:`drop_block` (DropBlock regularisation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchNorm", "batch_norm", "max_pool2x2", "drop_block"]


class BatchNorm(nn.Module):
    """Batch normalisation over all dimensions but the channel dimension (dim 1).

    Equal to ``nn.BatchNorm1d/2d/3d`` (batch statistics, biased variance for normalising).
    Under :func:`torch.func` transforms (``vmap``, ``grad``) it is computed from elementary
    ops, so its higher-order gradients are exact under ``vmap``; on plain tensors it calls
    ``F.batch_norm`` (torch's kernel: exact there, faster, less memory). Works for inputs
    ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...

    Update rule, with statistics over ``(N, *spatial)`` per channel::

        mean = x.mean(); var = ((x - mean) ** 2).mean()       # biased
        y = (x - mean) / sqrt(var + eps) * weight + bias       # weight/bias when affine

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance, as in torch (1e-5).
        momentum: running-statistics momentum, as in torch (only with tracking).
        affine: learn a per-channel scale ``weight`` (ones) and shift ``bias`` (zeros).
        track_running_stats: keep ``running_mean``/``running_var`` buffers, updated in
            training mode (unbiased variance, like torch) and used in eval mode. Default
            ``False``: batch statistics always, as in MAML (transductive), and no buffers.

    Example:
        >>> import torch
        >>> bn = BatchNorm(3)
        >>> y = bn(torch.randn(8, 3, 5, 5))
        >>> y.shape
        torch.Size([8, 3, 5, 5])

    Reference:
        Ioffe & Szegedy, 2015; ``torch.nn.BatchNorm2d``.

    Differences from the reference:
        ``momentum=None`` (cumulative average) and ``num_batches_tracked`` are not
        supported; in eval mode without tracking, batch statistics are used (like torch).
    """

    # Buffers, registered only with track_running_stats (annotations only: no class attribute).
    running_mean: Tensor
    running_var: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int but is: {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps should be > 0 but is: {eps}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum should be in [0, 1] but is: {momentum}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm({self.num_features}) expects input (N, {self.num_features}, ...) "
                f"but got shape {tuple(x.shape)}"
            )
        use_batch = self.training or not self.track_running_stats
        mean: Tensor | None = None
        var: Tensor | None = None
        if self.track_running_stats:
            mean, var = self.running_mean, self.running_var
        weight: Tensor | None = None
        bias: Tensor | None = None
        if self.affine:
            weight, bias = self.weight, self.bias
        if not any(_functorch_wrapped(t) for t in (x, weight, bias)):
            # Plain autograd (MAML's per-task loop): torch's fused kernel is exact to every
            # order here, faster, and saves less for backward. Updates running stats in place.
            return F.batch_norm(x, mean, var, weight, bias, use_batch, self.momentum, self.eps)
        # Under torch.func transforms (vmap): elementary ops only.
        return batch_norm(x, mean, var, weight, bias, use_batch, self.momentum, self.eps)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` (same arguments) written with elementary ops: mean, biased variance,
    ``rsqrt``. Its derivatives of every order are exact under :func:`torch.func.vmap`.

    In training mode with running stats, they are updated in place (unbiased variance),
    like torch. ``x`` is ``(N, C, *spatial)``; statistics are over ``(N, *spatial)``.
    """
    C = x.shape[1]
    dims = [0, *range(2, x.dim())]  # every dim but channels
    shape = [1, C] + [1] * (x.dim() - 2)  # broadcast per channel
    if training or running_mean is None:
        mean = x.mean(dims, keepdim=True)
        xc = x - mean
        var = xc.square().mean(dims, keepdim=True)  # biased, as torch normalises
        if training and running_mean is not None and running_var is not None:
            n = x.numel() // C
            with torch.no_grad():
                unbiased = var.reshape(-1) * (n / max(n - 1, 1))
                # In place, like torch; MAML passes copies of buffers, never the model's.
                running_mean.mul_(1 - momentum).add_(mean.reshape(-1), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    else:
        if running_var is None:
            raise ValueError("batch_norm: running_mean is given but running_var is None; pass both")
        xc = x - running_mean.reshape(shape)
        var = running_var.reshape(shape)
    scale = torch.rsqrt(var + eps)  # (1, C, 1, ...): per channel, small
    if weight is not None:
        scale = scale * weight.reshape(shape)
    if bias is not None:
        # One full-size tensor (xc) saved for backward instead of two.
        return torch.addcmul(bias.reshape(shape), xc, scale)
    return xc * scale


def _functorch_wrapped(t: Tensor | None) -> bool:
    """True inside torch.func transforms (vmap/grad), where F.batch_norm's second-order
    gradients are wrong in torch 2.13."""
    return t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)


class _MaxPool2x2CPU(torch.autograd.Function):
    """2x2 max-pool of a contiguous NCHW CPU tensor, computed by torch's channels-last kernel.

    Why: on CPU, torch's NCHW max-pool kernel is scalar; the channels-last one is vectorised
    over channels. For the query pass of an O1 task (75 x 64 x 28 x 28) forward takes 24 ms
    NCHW and 9 ms through here, layout copies included. Forward returns the values and the
    indices (flat ``h * W + w`` per plane, the same numbers in both layouts, first maximum
    in row-major window order on ties), both NCHW-contiguous; backward is
    ``max_pool2d_with_indices_backward`` on NCHW, exactly torch's own backward, so every
    derivative order (MAML's double backward included) is torch's.
    """

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        y, idx = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2, return_indices=True)
        return y.contiguous(), idx.contiguous()  # (N, C, H//2, W//2) each

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: tuple[Tensor, Tensor]) -> None:
        ctx.save_for_backward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor) -> Tensor:  # type: ignore[override]
        x, idx = ctx.saved_tensors
        # A differentiable aten op (its derivative is a gather by idx), so create_graph works.
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


#: Below this many elements the layout copies cost more than the faster kernel saves.
_CHANNELS_LAST_POOL_MIN_NUMEL = 32768


def max_pool2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)``: the same values and the same derivatives of every order
    (ties go to the first maximum in row-major window order, as in torch), faster on CPU.

    On a large contiguous NCHW CPU tensor outside ``torch.func`` transforms, the pooling
    runs in torch's vectorised channels-last kernel (1.7-2.4x faster forward and backward
    on Conv4's 28x28 and 14x14 layers); otherwise it is ``F.max_pool2d(x, 2)``.

    Example:
        >>> import torch
        >>> x = torch.randn(8, 64, 28, 28, requires_grad=True)
        >>> torch.equal(max_pool2x2(x), F.max_pool2d(x, 2))
        True
    """
    if (
        x.device.type != "cpu"
        or x.dim() != 4
        or not x.is_floating_point()
        or x.numel() < _CHANNELS_LAST_POOL_MIN_NUMEL
        or not x.is_contiguous()
        or _functorch_wrapped(x)
    ):
        return F.max_pool2d(x, 2)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2).contiguous()
    return _MaxPool2x2CPU.apply(x)[0]



def _check_positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int but is: {v!r}")


def _check_probability(name: str, v: Any) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name} should be in [0, 1) but is: {v!r}")


def drop_block(x: Tensor, p: float, block_size: int, training: bool = True) -> Tensor:
    """DropBlock (Ghiasi et al. 2018): zero random ``block_size`` x ``block_size`` squares of
    each feature map, rescaling the rest so the expected sum is kept.

    As in MetaOptNet/learn2learn's ResNet-12: block seeds are Bernoulli(``gamma``) over the
    ``(H - b + 1) x (W - b + 1)`` positions where a whole block fits, with
    ``gamma = p / b**2 * H * W / ((H - b + 1) * (W - b + 1))`` so that about a fraction
    ``p`` of the units is dropped; the output is ``x * mask * mask.numel() / mask.sum()``.
    ``b`` is clipped to the feature map's size. Identity when not ``training`` or ``p == 0``.
    Draws from torch's global generator (under ``vmap`` use ``randomness="different"``, as
    :class:`metaopt.MAML` does).

    Args:
        x: ``(N, C, H, W)``.
        p: fraction of units to drop, in [0, 1).
        block_size: side ``b`` of the dropped squares (>= 1).
        training: drop only when true.

    Example:
        >>> import torch
        >>> x = torch.ones(2, 3, 8, 8)
        >>> torch.equal(drop_block(x, 0.3, 3, training=False), x)
        True
        >>> drop_block(x, 0.3, 3).shape
        torch.Size([2, 3, 8, 8])
    """
    if not training or p == 0.0:
        return x
    N, C, H, W = x.shape
    b = min(block_size, H, W)
    gamma = p / b**2 * (H * W) / ((H - b + 1) * (W - b + 1))
    seeds = torch.bernoulli(torch.full((N, C, H - b + 1, W - b + 1), min(gamma, 1.0), dtype=x.dtype, device=x.device))
    # A seed at (i, j) covers [i, i + b) x [j, j + b): pad by b - 1 on every side and take
    # the b x b max (stride 1), which is (H, W) again.
    blocks = F.max_pool2d(F.pad(seeds, (b - 1, b - 1, b - 1, b - 1)), b, stride=1)
    mask = 1.0 - blocks  # (N, C, H, W), no gradient: a constant for autograd
    return x * mask * (mask.numel() / mask.sum().clamp_min(1.0))
