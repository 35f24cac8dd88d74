"""Models of the MAML paper as plain ``nn.Module``s: :class:`MLP` (sinusoid regression) and
:class:`Conv4` (Omniglot), plus the hand-written :class:`BatchNorm` that Conv4 uses.

Nothing here knows about meta-learning: :class:`metaopt.MAML` runs any ``nn.Module`` at
other parameters with :func:`torch.func.functional_call`.

Why a hand-written batch norm: under :func:`torch.func.vmap`, second-order gradients
through ``torch.nn.functional.batch_norm`` are wrong in torch 2.13 (about 6e-3 relative
error, in float64 too), so the vectorised MAML path cannot use ``nn.BatchNorm2d``.
:class:`BatchNorm` computes the same function with :func:`batch_norm`, written from
elementary ops (mean, biased variance, ``rsqrt``) whose derivatives of every order are
exact under ``vmap``, whenever it runs inside a ``torch.func`` transform; on plain tensors
(the per-task loop) it calls torch's kernel, exact there and faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchNorm", "MLP", "Conv4", "batch_norm", "max_pool2x2"]


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
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))
            self.register_buffer("running_var", torch.ones(num_features, **kw))

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
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        if not any(_functorch_wrapped(t) for t in (x, weight, bias)):
            # Plain autograd (MAML's per-task loop): torch's fused kernel is exact to every
            # order here, faster, and saves less for backward. Updates running stats in place.
            return F.batch_norm(x, *running, weight, bias, use_batch, self.momentum, self.eps)
        # Under torch.func transforms (vmap): elementary ops only.
        return batch_norm(x, *running, weight, bias, use_batch, self.momentum, self.eps)


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


class MLP(nn.Module):
    """Fully connected ReLU network, ``in -> hidden... -> out`` (Finn et al. 2017, sinusoid).

    Parameters are named ``net.0.weight``, ``net.0.bias``, ``net.2.weight``, ... (an
    ``nn.Sequential`` of Linear/ReLU).

    Args:
        in_features: input size (1 for sinusoid).
        hidden: sizes of the hidden layers ((40, 40) in the paper).
        out_features: output size (1 for sinusoid).

    Example:
        >>> import torch
        >>> MLP()(torch.zeros(10, 1)).shape
        torch.Size([10, 1])
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        for s in sizes:
            if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
                raise ValueError(f"MLP layer sizes must be positive ints but got {sizes}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvBlock(nn.Module):
    """conv 3x3 (pad 1) -> :class:`BatchNorm` -> ReLU -> 2x2 max-pool (floor).

    Computed as max-pool then ReLU: the same function (ReLU is monotone, so it commutes
    with max) with the same derivatives of every order (a window whose max is <= 0 gets a
    zero gradient either way; otherwise both pick the same first maximal entry), but ReLU
    and its backward touch a quarter of the elements. The pool is :func:`max_pool2x2`
    (``F.max_pool2d(x, 2)`` with a faster CPU kernel).
    """

    def __init__(self, in_channels: int, out_channels: int, track_running_stats: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = BatchNorm(out_channels, track_running_stats=track_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(max_pool2x2(self.norm(self.conv(x))))  # (N, C, H//2, W//2)


class Conv4(nn.Module):
    """MAML's Omniglot/miniImageNet conv net: 4 conv blocks and a linear head.

    Each block is conv 3x3 pad 1 -> batch norm on batch statistics (affine, no running
    stats by default, like MAML) -> ReLU -> 2x2 max-pool; 28x28 inputs end as 1x1x64
    features. Shapes for Omniglot: ``(N, 1, 28, 28) -> (N, 64, 1, 1) -> (N, ways)``.

    Parameters are named ``features.{0..3}.conv.{weight,bias}``,
    ``features.{0..3}.norm.{weight,bias}``, ``head.{weight,bias}``.

    Args:
        ways: number of classes (output size).
        in_channels: input channels (1 for Omniglot, 3 for miniImageNet).
        hidden: filters per block (64 in the paper; 32 for miniImageNet).
        image_size: input height = width (28 for Omniglot, 84 for miniImageNet); the
            head's input size is ``hidden * (image_size // 16) ** 2``.
        track_running_stats: give the batch norms running-statistics buffers (default
            ``False``; see :class:`BatchNorm`).

    Example:
        >>> import torch
        >>> Conv4(ways=5)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 1,
        hidden: int = 64,
        *,
        image_size: int = 28,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("ways", ways), ("in_channels", in_channels), ("hidden", hidden)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int but is: {v!r}")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16 (four 2x2 max-pools) but is: {image_size!r}")
        chans = [in_channels, hidden, hidden, hidden, hidden]
        self.features = nn.Sequential(
            *(ConvBlock(a, b, track_running_stats) for a, b in zip(chans[:-1], chans[1:]))
        )
        side = image_size
        for _ in range(4):
            side //= 2
        self.head = nn.Linear(hidden * side * side, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))  # (N, hidden*side*side) -> (N, ways)
