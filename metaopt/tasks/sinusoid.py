"""Sinusoid regression tasks of Finn et al. (2017), "Model-Agnostic Meta-Learning".

Each task is ``y = A * sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``, as in the paper (section 5.1) and in
``cbfinn/maml``'s ``data_generator.generate_sinusoid_batch``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from metaopt.tasks.base import TaskBatch

__all__ = ["Sinusoid", "SinusoidParams"]

EVAL_SEED = 1234
"""Seed of :meth:`Sinusoid.eval_set`'s default fixed evaluation tasks."""


class SinusoidParams(NamedTuple):
    """The parameters of a batch of sinusoid tasks, each of shape ``(tasks,)``."""

    amplitude: Tensor
    phase: Tensor


def _check_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must be finite with low <= high, got {value!r}")
    return lo, hi


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Sinusoid:
    """Distribution over sinusoid regression tasks.

    Args:
        shots: support points per task.
        queries: query points per task.
        amplitude: ``(low, high)`` of the uniform amplitude ``A``.
        phase: ``(low, high)`` of the uniform phase ``phi``.
        x_range: ``(low, high)`` of the uniform inputs ``x``.
        device: default device of the returned tensors.
        dtype: default floating dtype of the returned tensors.

    Targets are ``A * sin(x - phi)``. Support and query points of one task are
    independent draws from ``x_range``. Randomness comes only from the generator given
    to :meth:`sample`; the draws happen on the generator's device and the batch is then
    moved to ``device``, so a CPU generator gives the same tasks on every device.

    Example:
        >>> import torch
        >>> tasks = Sinusoid(shots=10, queries=10)
        >>> batch = tasks.sample(25, generator=torch.Generator().manual_seed(0))
        >>> batch.support[0].shape, batch.query[1].shape
        (torch.Size([25, 10, 1]), torch.Size([25, 10, 1]))

    Differences from the reference: MAML draws ``2K`` points per task and splits them
    into support and query; here ``shots`` and ``queries`` are set separately.
    """

    models = ("mlp",)
    """Models that fit these tasks (the first is ``model.name: auto``)."""

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shots = _check_count("shots", shots)
        self.queries = _check_count("queries", queries)
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.device = torch.device(device)
        self.dtype = dtype

    def __repr__(self) -> str:
        return (
            f"Sinusoid(shots={self.shots}, queries={self.queries}, amplitude={self.amplitude}, "
            f"phase={self.phase}, x_range={self.x_range})"
        )

    @staticmethod
    def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], g: torch.Generator,
                 dtype: torch.dtype) -> Tensor:
        lo, hi = bounds
        return torch.rand(shape, generator=g, device=g.device, dtype=dtype) * (hi - lo) + lo

    def sample_params(self, num_tasks: int, generator: torch.Generator, *,
                      dtype: torch.dtype | None = None) -> SinusoidParams:
        """Draw ``num_tasks`` amplitudes and phases (on the generator's device)."""
        _check_count("num_tasks", num_tasks)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        dtype = dtype or self.dtype
        amplitude = self._uniform((num_tasks,), self.amplitude, generator, dtype)
        phase = self._uniform((num_tasks,), self.phase, generator, dtype)
        return SinusoidParams(amplitude, phase)

    def batch_for(self, params: SinusoidParams, generator: torch.Generator, *,
                  device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> TaskBatch:
        """Draw support and query inputs for the tasks ``params`` and build the batch."""
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else self.device
        n = params.amplitude.shape[0]
        amp = params.amplitude.to(generator.device, dtype)[:, None, None]  # (tasks, 1, 1)
        phase = params.phase.to(generator.device, dtype)[:, None, None]
        xs = self._uniform((n, self.shots, 1), self.x_range, generator, dtype)   # (tasks, shots, 1)
        xq = self._uniform((n, self.queries, 1), self.x_range, generator, dtype)  # (tasks, queries, 1)
        ys, yq = amp * torch.sin(xs - phase), amp * torch.sin(xq - phase)
        return TaskBatch(support=(xs, ys), query=(xq, yq)).to(device)

    def sample(self, num_tasks: int, generator: torch.Generator, *,
               device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> TaskBatch:
        """A meta-batch of ``num_tasks`` tasks.

        Args:
            num_tasks: tasks in the batch.
            generator: the only source of randomness.
            device: device of the batch (default: the constructor's).
            dtype: floating dtype of the batch (default: the constructor's).

        Returns:
            ``TaskBatch`` with inputs and targets of shape ``(tasks, shots, 1)`` (support)
            and ``(tasks, queries, 1)`` (query).
        """
        params = self.sample_params(num_tasks, generator, dtype=dtype)
        return self.batch_for(params, generator, device=device, dtype=dtype)

    def eval_set(self, n: int = 600, seed: int = EVAL_SEED, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> TaskBatch:
        """A fixed evaluation set of ``n`` tasks, drawn on the CPU from ``seed``.

        The same ``(n, seed)`` gives the same tasks on every device and in every process.
        """
        g = torch.Generator(device="cpu").manual_seed(seed)
        return self.sample(n, g, device=device, dtype=dtype)

    def model_args(self) -> dict[str, Any]:
        """The data-dependent model arguments: one input and one output feature."""
        return {"in_features": 1, "out_features": 1}

    def curves(self, predict: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]], tasks: int = 3,
               points: int = 200, seed: int = 7, device: torch.device | str | None = None) -> list[dict[str, Any]]:
        """True sine, support points and predictions before/after adaptation for ``tasks``
        tasks drawn from ``seed`` (what :func:`metaopt.plots.sinusoid_fits` draws).

        Args:
            predict: ``predict(support_x, support_y, x) -> (before, after)``, the model's
                predictions at ``x`` (``(points, 1)``) at the meta-parameters and after
                adapting to the support set (``(shots, 1)`` each).

        Example:
            >>> import torch
            >>> c = Sinusoid(shots=5).curves(lambda sx, sy, x: (0 * x, 0 * x), tasks=1, points=3)
            >>> len(c[0]["x"]), len(c[0]["support_x"])
            (3, 5)
        """
        g = torch.Generator().manual_seed(seed)
        params = self.sample_params(tasks, g)
        batch = self.batch_for(params, g, device=device)
        x = torch.linspace(*self.x_range, points, device=device)[:, None]  # (points, 1)
        out = []
        for i in range(tasks):
            before, after = predict(batch.support[0][i], batch.support[1][i], x)
            amp, phase = float(params.amplitude[i]), float(params.phase[i])
            out.append({
                "x": x[:, 0].cpu().tolist(),
                "true": (amp * torch.sin(x[:, 0].cpu() - phase)).tolist(),
                "before": before[:, 0].detach().cpu().tolist(),
                "after": after[:, 0].detach().cpu().tolist(),
                "support_x": batch.support[0][i, :, 0].cpu().tolist(),
                "support_y": batch.support[1][i, :, 0].cpu().tolist(),
            })
        return out
