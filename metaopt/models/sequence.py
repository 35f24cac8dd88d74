"""Sequence models: a small :class:`TransformerClassifier` and an :class:`LSTMRegressor`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaopt.models.layers import _check_positive_int, _check_probability

__all__ = ["TransformerClassifier", "LSTMRegressor"]


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
