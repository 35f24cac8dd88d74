"""The convolutional and fully connected models: the MAML paper's :class:`MLP` (sinusoid) and
:class:`Conv4` (Omniglot), and the few-shot backbone :class:`ResNet12`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.models.layers import BatchNorm, _check_positive_int, _check_probability, drop_block, max_pool2x2

__all__ = ["MLP", "ConvBlock", "Conv4", "ResBlock12", "ResNet12"]


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
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = BatchNorm(out_channels, track_running_stats=track_running_stats)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm(out_channels, track_running_stats=track_running_stats)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = BatchNorm(out_channels, track_running_stats=track_running_stats)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            BatchNorm(out_channels, track_running_stats=track_running_stats),
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
