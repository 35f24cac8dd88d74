"""Mixed precision for meta-training: one context manager per precision name, and the rule
the MAML engine follows under ``torch.autocast``.

``precision_context(precision, device)`` is what a training loop wraps its meta-step in:

- ``"fp32"``: nothing changes.
- ``"bf16"`` / ``"fp16"``: ``torch.autocast(device.type, dtype=bfloat16 / float16)``.
  Parameters, inner gradients, the inner optimizer's state and update, and the losses
  stay float32 (see "Policy" below); convolutions and matmuls run in 16 bits.
- ``"tf32"``: on CUDA, float32 tensors whose matmuls and cuDNN convolutions may use
  TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32`` set, and restored on exit). On CPU there is no TF32:
  the context is plain float32.

Policy (decided by measurement, ``python experiments/bench_precision.py``: meta-gradient
cosine and relative error per layer against float64 on Omniglot 5-way 1-shot, Conv4):
under an active autocast, the engine (:class:`metaopt.MAML`) runs

- the model's forward under the caller's autocast (16-bit convolutions and matmuls);
- the model's output cast to float32 (:func:`loss_input`) and the loss computed in
  float32 with autocast off, so that a user's loss function never runs in 16 bits;
- the inner optimizer's ``step`` with autocast off (:func:`full_precision`), on the
  float32 parameters and the float32 inner gradients that autograd returns for them.

vmap: in torch 2.13 (CPU) ``torch.autocast`` has no effect inside ``torch.func.vmap``
(``F.linear`` and ``F.conv2d`` stay float32, even with autocast entered inside the mapped
function).
:func:`vmap_honours_autocast` probes this once per device type and dtype; under an autocast
that vmap would ignore, ``MAML(vectorize="auto")`` takes the per-task loop and
``vectorize=True`` raises, rather than silently computing in float32.

Normalisation statistics: ``metaopt.models.BatchNorm`` calls ``F.batch_norm``, which
accumulates its statistics in float32 for 16-bit inputs on CPU and CUDA.

fp16 and loss scaling: float16 has 5 exponent bits; gradients below about 6e-8 flush to
zero. Under the engine's policy the inner loop never runs in 16 bits, so the inner
gradients need no scaling (measured on 2 real Omniglot tasks: fp16 meta-gradient cosine
0.99998 to float64 with no scale; results/precision_fidelity_o1_fp16.md). The outer
gradient flows back through the 16-bit query forward and is loss-scaled: with
``train.precision: fp16`` the trainer keeps a ``torch.amp.GradScaler`` (in its checkpoint)
and :func:`metaopt.loop.meta_step` backpropagates at the scale (``MAML.meta_loss(...,
loss_scale=)``), unscales before clipping, and skips the outer step on overflow. Without
it a small loss's meta-gradient can flush to zero entirely (tests/test_precision.py).
bfloat16 has float32's range and needs no scaling at all.

Example:
    >>> import torch
    >>> from metaopt.precision import precision_context
    >>> with precision_context("bf16", "cpu"):
    ...     y = torch.nn.Linear(4, 2)(torch.randn(3, 4))
    >>> y.dtype
    torch.bfloat16
    >>> with precision_context("fp32", "cpu"):
    ...     y = torch.nn.Linear(4, 2)(torch.randn(3, 4))
    >>> y.dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import ContextManager

import torch
from torch import Tensor

__all__ = ["PRECISIONS", "precision_context", "autocast_dtype", "loss_input", "full_precision",
           "vmap_honours_autocast"]

#: The precision names a config or ``metaopt bench --precision`` accepts.
PRECISIONS = ("fp32", "bf16", "fp16", "tf32")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check(precision: str, device: torch.device | str) -> torch.device:
    if precision not in PRECISIONS:
        raise ValueError(f"precision should be one of {', '.join(PRECISIONS)} but is: {precision!r}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device should be a torch device such as 'cpu' or 'cuda' but is: {device!r}") from e


@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    # cuDNN's flags go through its own flags() context manager (with every other flag at its
    # current value): direct assignment is refused once torch.backends.disable_global_flags()
    # has run, as torch's own test utilities do on import.
    cudnn = torch.backends.cudnn
    current = {n: getattr(cudnn, n) for n in inspect.signature(cudnn.flags).parameters
               if getattr(cudnn, n, None) is not None}
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with cudnn.flags(**{**current, "allow_tf32": True}):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def precision_context(precision: str, device: torch.device | str) -> ContextManager[None]:
    """A context manager that runs the code inside it at ``precision`` on ``device``.

    Args:
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"tf32"`` (see the module docstring).
        device: the device the model runs on (``"cpu"``, ``"cuda"``, ``torch.device``).

    Returns:
        A context manager; ``fp32`` (and ``tf32`` off CUDA) is a no-op.

    Raises:
        ValueError: an unknown precision or device, naming the value.

    Example:
        >>> import torch
        >>> with precision_context("bf16", "cpu"):
        ...     torch.is_autocast_enabled("cpu")
        True
        >>> precision_context("fp8", "cpu")
        Traceback (most recent call last):
        ...
        ValueError: precision should be one of fp32, bf16, fp16, tf32 but is: 'fp8'
    """
    dev = _check(precision, device)
    if precision in _DTYPES:
        return torch.autocast(dev.type, dtype=_DTYPES[precision])
    if precision == "tf32" and dev.type == "cuda":
        return _tf32()
    return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` now, or ``None`` when it is off.

    Example:
        >>> import torch
        >>> autocast_dtype("cpu") is None
        True
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_dtype("cpu")
        torch.bfloat16
    """
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def loss_input(out: Tensor) -> Tensor:
    """``out`` cast to float32 when autocast made it a 16-bit tensor (the engine computes
    losses in float32); any other tensor is returned as it is. Differentiable.

    Example:
        >>> import torch
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     loss_input(torch.ones(2, dtype=torch.bfloat16)).dtype
        torch.float32
        >>> loss_input(torch.ones(2, dtype=torch.float64)).dtype
        torch.float64
    """
    if out.dtype in (torch.float16, torch.bfloat16) and autocast_dtype(out.device.type) is not None:
        return out.float()
    return out


def full_precision(device_type: str) -> ContextManager[None]:
    """Autocast off for ``device_type`` inside (a no-op when it is off already): where the
    engine computes losses and inner-optimizer steps.

    Example:
        >>> import torch
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision("cpu"):
        ...     torch.is_autocast_enabled("cpu")
        False
    """
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


_VMAP_AUTOCAST: dict[tuple[str, torch.dtype], bool] = {}


def vmap_honours_autocast(device_type: str) -> bool:
    """Whether ``F.linear`` and ``F.conv2d`` inside ``torch.func.vmap`` run in the active
    autocast dtype on ``device_type`` (probed once per device type and dtype on 1x1
    inputs; ``True`` when autocast is off: there is nothing to honour).

    Example:
        >>> import torch
        >>> vmap_honours_autocast("cpu")
        True
    """
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return True
    key = (device_type, dtype)
    if key not in _VMAP_AUTOCAST:
        # linear and conv2d: the layers models are made of (a plain mm is honoured in torch
        # 2.13 CPU while F.linear is not, so the probe uses the layers themselves).
        x, w = torch.ones(1, 1, 1, 1, 1, device=device_type), torch.ones(1, 1, 1, 1, device=device_type)
        with torch.no_grad():
            lin = torch.func.vmap(lambda a: torch.nn.functional.linear(a, w[0, 0]))(x[:, 0, 0])
            conv = torch.func.vmap(lambda a: torch.nn.functional.conv2d(a, w))(x)
        _VMAP_AUTOCAST[key] = lin.dtype == dtype and conv.dtype == dtype
    return _VMAP_AUTOCAST[key]
