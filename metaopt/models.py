"""The model zoo, as plain ``nn.Module``s: the MAML paper's :class:`MLP` (sinusoid
regression) and :class:`Conv4` (Omniglot), the few-shot backbone :class:`ResNet12`, a small
:class:`TransformerClassifier` and an :class:`LSTMRegressor` for sequence tasks, the
hand-written :class:`BatchNorm` that the conv nets use, and a registry that builds any of
them by name for configs (:func:`get`, :func:`names`, :func:`register`).

Nothing here knows about meta-learning: :class:`metaopt.MAML` runs any ``nn.Module`` at
other parameters with :func:`torch.func.functional_call`.

Example:
    >>> import torch
    >>> from metaopt import models
    >>> models.names()
    ['conv4', 'lstm', 'mlp', 'resnet12', 'transformer']
    >>> net = models.get("resnet12", ways=5, width=0.25)
    >>> net(torch.zeros(2, 1, 28, 28)).shape   # (examples, ways)
    torch.Size([2, 5])

Why a hand-written batch norm: under :func:`torch.func.vmap`, second-order gradients
through ``torch.nn.functional.batch_norm`` are wrong in torch 2.13 (about 6e-3 relative
error, in float64 too), so the vectorised MAML path cannot use ``nn.BatchNorm2d``.
:class:`BatchNorm` computes the same function with :func:`batch_norm`, written from
elementary ops (mean, biased variance, ``rsqrt``) whose derivatives of every order are
exact under ``vmap``, whenever it runs inside a ``torch.func`` transform; on plain tensors
(the per-task loop) it calls torch's kernel, exact there and faster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt._registry import Registry

__all__ = [
    "BatchNorm", "MLP", "Conv4", "ResNet12", "ResBlock12", "TransformerClassifier", "LSTMRegressor",
    "batch_norm", "max_pool2x2", "drop_block", "get", "names", "register", "unregister", "factory",
]


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


# ----------------------------------------------------------------------------- ResNet-12


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


class ResBlock12(nn.Module):
    """One ResNet-12 block: 3x (conv 3x3 -> :class:`BatchNorm` -> LeakyReLU(0.1)), the last
    activation after adding a (conv 1x1 -> BatchNorm) shortcut, then a 2x2 max-pool.

    ``(N, in_channels, H, W) -> (N, out_channels, H // 2, W // 2)``. Convolutions have no
    bias (each is followed by a batch norm, whose shift makes a bias redundant), as in
    MetaOptNet. The final LeakyReLU runs after the max-pool: the same function and the same
    derivatives of every order (LeakyReLU is strictly increasing, so it commutes with max
    and the pool picks the same entry), on a quarter of the elements.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        drop_rate: dropout (or DropBlock) rate after the pool, in training mode only.
        dropblock_size: DropBlock's block side; 0 uses plain dropout.
        track_running_stats: running-statistics buffers in the batch norms.

    Example:
        >>> import torch
        >>> ResBlock12(3, 8)(torch.zeros(2, 3, 28, 28)).shape   # (N, C_out, H // 2, W // 2)
        torch.Size([2, 8, 14, 14])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        drop_rate: float = 0.0,
        dropblock_size: int = 0,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        bn = {"track_running_stats": track_running_stats}
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = BatchNorm(out_channels, **bn)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm(out_channels, **bn)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = BatchNorm(out_channels, **bn)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), BatchNorm(out_channels, **bn)
        )
        self.drop_rate = drop_rate
        self.dropblock_size = dropblock_size  # 0: plain dropout

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)  # (N, C_out, H, W)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out)) + self.shortcut(x)
        out = F.leaky_relu(max_pool2x2(out), 0.1)  # (N, C_out, H // 2, W // 2)
        if self.drop_rate > 0.0:
            if self.dropblock_size > 0:
                out = drop_block(out, self.drop_rate, self.dropblock_size, self.training)
            else:
                out = F.dropout(out, self.drop_rate, self.training)
        return out


class ResNet12(nn.Module):
    """ResNet-12, the few-shot backbone of TADAM and MetaOptNet, with a linear head.

    Four :class:`ResBlock12` blocks of ``(64, 160, 320, 640)`` channels times ``width``
    (each: 3x conv 3x3 -> batch norm -> LeakyReLU(0.1) with a 1x1-conv + batch-norm
    shortcut, then a 2x2 max-pool), a global average pool and a linear head. Shapes::

        Omniglot:     (N, 1, 28, 28) -> (N, 640w, 1, 1) -> (N, 640w) -> (N, ways)
        miniImageNet: (N, 3, 84, 84) -> (N, 640w, 5, 5) -> (N, 640w) -> (N, ways)

    At ``width=1`` with 3 input channels and a 5-way head it has 12,427,525 parameters
    (12,424,320 in the blocks, as MetaOptNet's and learn2learn's ResNet12; 3,205 in the head).

    The batch norms are :class:`BatchNorm` (batch statistics, no running stats by default,
    like :class:`Conv4`), so second-order MAML is exact on both the per-task loop and the
    ``vmap`` path; the pools are :func:`max_pool2x2`. Parameters are named
    ``blocks.{0..3}.conv{1,2,3}.weight``, ``blocks.{0..3}.bn{1,2,3}.{weight,bias}``,
    ``blocks.{0..3}.shortcut.{0,1}...``, ``head.{weight,bias}``.

    Args:
        ways: number of classes (output size).
        in_channels: input channels (1 for Omniglot, 3 for miniImageNet).
        width: channel multiplier; block ``i`` has ``max(1, round(c_i * width))`` channels
            (``width=0.25`` gives 16-40-80-160, small enough for CPU tests).
        drop_rate: regularisation after each block, off by default: dropout in blocks 1-2
            and :func:`drop_block` in blocks 3-4 (MetaOptNet uses 0.1); only in training
            mode (``MAML`` keeps the model's mode for dropout).
        dropblock_size: DropBlock's block side in blocks 3-4 (5 in MetaOptNet); 0 uses
            plain dropout there too.
        track_running_stats: give the batch norms running-statistics buffers (default
            ``False``; see :class:`BatchNorm`).

    Example:
        >>> import torch
        >>> net = ResNet12(ways=5, in_channels=3, width=0.25)
        >>> x = torch.zeros(4, 3, 84, 84)         # (examples, channels, height, width)
        >>> net(x).shape                            # (examples, ways)
        torch.Size([4, 5])
        >>> sum(p.numel() for p in ResNet12(5, in_channels=3).parameters())
        12427525

    Reference:
        Oreshkin, Rodriguez & Lacoste, "TADAM", NeurIPS 2018; Lee et al., "Meta-Learning
        with Differentiable Convex Optimization" (MetaOptNet), CVPR 2019; learn2learn's
        ``ResNet12``.

    Differences from the reference:
        Batch statistics always (MAML's transductive setting; MetaOptNet's BatchNorm2d
        tracks running stats). Global average pooling for any input size (MetaOptNet:
        ``AvgPool2d(5)``, i.e. 84x84 inputs only). DropBlock's rate is constant, not
        ramped up over training, and there is no dropout before the head.
    """

    #: Channels of the four blocks at ``width=1``.
    CHANNELS = (64, 160, 320, 640)

    def __init__(
        self,
        ways: int,
        in_channels: int = 1,
        width: float = 1.0,
        *,
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("ways", ways)
        _check_positive_int("in_channels", in_channels)
        if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
            raise ValueError(f"width should be > 0 but is: {width!r}")
        _check_probability("drop_rate", drop_rate)
        if not isinstance(dropblock_size, int) or isinstance(dropblock_size, bool) or dropblock_size < 0:
            raise ValueError(f"dropblock_size must be an int >= 0 but is: {dropblock_size!r}")
        chans = [in_channels] + [max(1, round(c * width)) for c in self.CHANNELS]
        self.blocks = nn.Sequential(
            *(
                ResBlock12(
                    a, b, drop_rate=drop_rate, dropblock_size=dropblock_size if i >= 2 else 0,
                    track_running_stats=track_running_stats,
                )
                for i, (a, b) in enumerate(zip(chans[:-1], chans[1:]))
            )
        )
        self.head = nn.Linear(chans[-1], ways)
        for m in self.blocks.modules():
            if isinstance(m, nn.Conv2d):  # MetaOptNet's init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] < 16 or x.shape[-2] < 16:
            raise ValueError(
                f"ResNet12 expects images (N, C, H, W) with H, W >= 16 (four 2x2 max-pools) "
                f"but got shape {tuple(x.shape)}"
            )
        feats = self.blocks(x)  # (N, 640w, H // 16, W // 16)
        return self.head(feats.mean((2, 3)))  # global average pool -> (N, ways)


# ----------------------------------------------------------------------------- sequence models


class TransformerClassifier(nn.Module):
    """A small transformer-encoder classifier for sequence few-shot tasks.

    Tokens (``vocab_size``) or feature vectors (``input_dim``) are embedded to ``d_model``,
    a learned positional embedding is added, ``num_layers`` ``nn.TransformerEncoderLayer``
    (``batch_first=True``, post-norm, ReLU) run, the outputs are mean-pooled over the
    sequence and a linear head gives the logits. Shapes::

        tokens   (N, L) int64          -> (N, L, d_model) -> (N, d_model) -> (N, num_classes)
        features (N, L, input_dim) float -> (N, L, d_model) -> ...

    Give exactly one of ``vocab_size`` and ``input_dim``. Parameters are named
    ``embed.weight`` (``embed.bias`` for features), ``pos``, ``encoder.layers.{i}...``
    (torch's names), ``head.{weight,bias}``.

    Args:
        num_classes: output size (ways).
        vocab_size: number of token ids, for ``(N, L)`` integer inputs.
        input_dim: feature size, for ``(N, L, input_dim)`` float inputs.
        d_model: model width.
        nhead: attention heads (must divide ``d_model``).
        num_layers: encoder layers.
        max_len: longest sequence accepted (rows of the positional embedding).
        dim_feedforward: hidden size of each layer's MLP; default ``4 * d_model``.
        dropout: dropout inside the encoder layers; default 0 (torch's default is 0.1),
            so that adaptation is deterministic.

    Example:
        >>> import torch
        >>> net = TransformerClassifier(num_classes=5, vocab_size=20, d_model=16, nhead=2)
        >>> tokens = torch.randint(0, 20, (10, 7))        # (examples, seq)
        >>> net(tokens).shape                              # (examples, num_classes)
        torch.Size([10, 5])

    Note:
        Second-order MAML differentiates attention twice. On CPU, torch's default
        ``scaled_dot_product_attention`` kernel (flash attention) has no double backward:
        run the meta-loss and its backward under
        ``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])``. The encoder layers also hold
        ``nn.LayerNorm``, which the engine's ``vmap`` path must support; the per-task loop
        (``MAML(..., vectorize=False)``) is exact.
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int | None = None,
        input_dim: int | None = None,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        max_len: int = 128,
        *,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (vocab_size is None) == (input_dim is None):
            raise ValueError(
                f"give exactly one of vocab_size and input_dim but got vocab_size={vocab_size!r}, "
                f"input_dim={input_dim!r}"
            )
        for name, v in (("num_classes", num_classes), ("d_model", d_model), ("nhead", nhead),
                        ("num_layers", num_layers), ("max_len", max_len)):
            _check_positive_int(name, v)
        if d_model % nhead:
            raise ValueError(f"nhead must divide d_model={d_model} but is: {nhead}")
        if dim_feedforward is None:
            dim_feedforward = 4 * d_model
        _check_positive_int("dim_feedforward", dim_feedforward)
        _check_probability("dropout", dropout)
        self.tokens = vocab_size is not None
        if vocab_size is not None:
            _check_positive_int("vocab_size", vocab_size)
            self.embed: nn.Module = nn.Embedding(vocab_size, d_model)
        else:
            _check_positive_int("input_dim", input_dim)
            self.embed = nn.Linear(input_dim, d_model)  # type: ignore[arg-type]
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)  # (max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, batch_first=True
        )
        # enable_nested_tensor=False: no fast path that needs the model in eval mode anyway,
        # and no warning about it.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        want = 2 if self.tokens else 3
        if x.dim() != want or x.shape[1] > self.pos.shape[0]:
            shape = "(N, L) token ids" if self.tokens else "(N, L, input_dim) features"
            raise ValueError(
                f"TransformerClassifier expects {shape} with L <= max_len={self.pos.shape[0]} "
                f"but got shape {tuple(x.shape)}"
            )
        h = self.embed(x) + self.pos[: x.shape[1]]  # (N, L, d_model)
        h = self.encoder(h)  # (N, L, d_model)
        return self.head(h.mean(1))  # mean over the sequence -> (N, num_classes)


class LSTMRegressor(nn.Module):
    """An LSTM over each example's sequence, then a linear map of its last hidden state.

    ``(N, L, input_dim) -> nn.LSTM(batch_first=True) -> (N, L, hidden) -> last step
    (N, hidden) -> (N, output_dim)``: one prediction per sequence, e.g. the next value of a
    sinusoid from its first ``L`` samples. Parameters are named ``lstm.weight_ih_l0``, ...
    (torch's names) and ``head.{weight,bias}``.

    Args:
        input_dim: features per time step (1 for a scalar series).
        hidden: LSTM hidden size.
        output_dim: prediction size.
        num_layers: stacked LSTM layers.

    Example:
        >>> import torch
        >>> net = LSTMRegressor(input_dim=1, hidden=16, output_dim=1)
        >>> net(torch.zeros(10, 8, 1)).shape   # (examples, seq, features) -> (examples, 1)
        torch.Size([10, 1])

    Note:
        The MAML engine's ``vmap`` path must support ``nn.LSTM``; the per-task loop
        (``vectorize=False``) is exact.
    """

    def __init__(self, input_dim: int = 1, hidden: int = 40, output_dim: int = 1, num_layers: int = 1) -> None:
        super().__init__()
        for name, v in (("input_dim", input_dim), ("hidden", hidden), ("output_dim", output_dim),
                        ("num_layers", num_layers)):
            _check_positive_int(name, v)
        self.lstm = nn.LSTM(input_dim, hidden, num_layers, batch_first=True)
        self.head = nn.Linear(hidden, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[2] != self.lstm.input_size:
            raise ValueError(
                f"LSTMRegressor expects (N, L, {self.lstm.input_size}) sequences but got shape {tuple(x.shape)}"
            )
        out, _ = self.lstm(x)  # (N, L, hidden)
        return self.head(out[:, -1])  # last step -> (N, output_dim)


# ----------------------------------------------------------------------------- registry


def _builtins(reg: Registry[nn.Module]) -> None:
    reg.register("mlp", MLP)
    reg.register("conv4", Conv4)
    reg.register("resnet12", ResNet12)
    reg.register("transformer", TransformerClassifier)
    reg.register("lstm", LSTMRegressor)


_MODELS: Registry[nn.Module] = Registry("model", _builtins)


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``factory(**kwargs) -> nn.Module`` under ``name`` (lower case), replacing
    any model of that name.

    Example:
        >>> from torch import nn
        >>> register("tiny_linear", lambda ways=5: nn.Linear(4, ways))
        >>> get("tiny_linear", ways=3).out_features
        3
        >>> unregister("tiny_linear")
    """
    _MODELS.register(name, factory, replace=True)


def unregister(name: str) -> None:
    """Remove the model registered under ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    _MODELS.unregister(name)


def names() -> list[str]:
    """Sorted list of the registered model names.

    Example:
        >>> names()
        ['conv4', 'lstm', 'mlp', 'resnet12', 'transformer']
    """
    return _MODELS.names()


def factory(name: str) -> Callable[..., nn.Module]:
    """The factory (usually the class) registered under ``name`` (case-insensitive), not
    called; a config layer can read its signature to validate keys.

    Raises:
        ValueError: unknown name (the message lists the known ones).

    Example:
        >>> factory("ResNet12") is ResNet12
        True
    """
    return _MODELS.factory(name)


def get(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered under ``name`` with ``kwargs`` (the constructor's names).

    Args:
        name: one of :func:`names` (case-insensitive): ``"mlp"`` (:class:`MLP`), ``"conv4"``
            (:class:`Conv4`), ``"resnet12"`` (:class:`ResNet12`), ``"transformer"``
            (:class:`TransformerClassifier`), ``"lstm"`` (:class:`LSTMRegressor`).
        **kwargs: the model's constructor arguments.

    Raises:
        ValueError: unknown name (the message lists the known ones), an unknown keyword,
            or a bad value (raised by the constructor).

    Example:
        >>> get("conv4", ways=5, hidden=32).head
        Linear(in_features=32, out_features=5, bias=True)
        >>> get("vgg")
        Traceback (most recent call last):
        ValueError: Unknown model name: 'vgg'; known names: conv4, lstm, mlp, resnet12, transformer
    """
    return _MODELS.get(name, **kwargs)
