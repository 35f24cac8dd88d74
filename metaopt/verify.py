"""Check a model and inner optimizer with the MAML engine before trusting a training run.

:func:`verify` measures three things on one batch:

(a) the meta-gradient against central finite differences, on a float64 deep copy, along
    random unit directions ``d`` in parameter space: autograd's ``<grad, d>`` against
    ``(L(theta + eps d) - L(theta - eps d)) / 2 eps``; the error is reported relative to
    ``|grad|`` (a directional derivative may be ~0, the gradient's norm is the scale). This
    catches bugs below the engine, such as a torch kernel with a wrong double backward.
(b) the vectorised path (``torch.func.vmap`` over tasks) against the per-task loop, on the
    same copy, or why the engine refuses ``vmap`` for this model.
(c) the model's parameters and buffers, compared value by value before and after a
    ``meta_loss`` and its gradient on the user's own ``maml``: catches an inner optimizer
    that writes through ``.data`` (invisible to the engine's version-counter check).

Randomness: every evaluation runs on a forked random stream seeded with ``seed``, so the
caller's stream is untouched and dropout draws the same masks in each evaluation of (a):
the finite differences then differentiate one fixed-mask function, which is sound. The
loop and ``vmap`` draw different masks by design (``vmap(randomness="different")``), so (b)
runs with dropout modules (``nn.Dropout*``) in eval mode. Randomness of other kinds in the
model's forward (``torch.rand`` in a user's layer) shows up as a mismatch in (b).

Example:
    >>> import torch
    >>> import metaopt
    >>> from metaopt.models import MLP
    >>> from metaopt.tasks.base import TaskBatch
    >>> g = torch.Generator().manual_seed(0)
    >>> batch = TaskBatch(support=(torch.randn(2, 5, 1, generator=g), torch.randn(2, 5, 1, generator=g)),
    ...                   query=(torch.randn(2, 5, 1, generator=g), torch.randn(2, 5, 1, generator=g)))
    >>> maml = metaopt.MAML(MLP(1, (8,), 1), metaopt.optim.SGD(lr=0.1), inner_steps=2,
    ...                     loss_fn=torch.nn.functional.mse_loss)
    >>> report = metaopt.verify(maml, batch)
    >>> report.ok, report.fd_error < 1e-6
    (True, True)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaopt._exact_ops import vmap_support
from metaopt.maml import MAML
from metaopt.tasks.base import TaskBatch, as_task_batch

__all__ = ["VerifyReport", "verify"]


@dataclass
class VerifyReport:
    """What :func:`verify` measured. ``str(report)`` is a table.

    Attributes:
        ok: every check passed.
        fd_error: max over directions of ``|autograd - finite difference| / |grad|``.
        fd_directions: number of random directions.
        fd_ok: ``fd_error`` within tolerance.
        vmap_error: max ``|vmap - loop| / max|loop|`` over meta-gradient entries and
            per-task losses; ``None`` when not compared.
        vmap_status: ``"compared"``, ``"refused: ..."`` (engine refuses vmap for this model)
            or ``"failed: ..."`` (vmap raised).
        vmap_used: whether the checked ``maml`` uses vmap on this batch's device (a vmap
            mismatch fails ``ok`` only then).
        changed: names of parameters/buffers whose values ``meta_loss`` changed, or the
            engine's own error message when it detected an in-place write.
        notes: remarks (first order checked at second order, ...).
        vmap_ok: the vmap check passed (or did not apply to this setting).
    """

    ok: bool
    fd_error: float
    fd_directions: int
    fd_ok: bool
    vmap_error: float | None
    vmap_status: str
    vmap_used: bool
    changed: list[str]
    notes: list[str] = field(default_factory=list)
    vmap_ok: bool = True

    def __str__(self) -> str:
        vm = "-" if self.vmap_error is None else f"{self.vmap_error:.2e}"
        vm_ok = self.vmap_status != "compared" or self.vmap_ok
        rows = [
            ("check", "measured", "result"),
            (f"meta-gradient vs finite differences ({self.fd_directions} dirs)", f"{self.fd_error:.2e}",
             "ok" if self.fd_ok else "WRONG"),
            ("vmap vs loop" + ("" if self.vmap_used else " (not used by this setting)"),
             vm if self.vmap_status == "compared" else self.vmap_status, "ok" if vm_ok else "WRONG"),
            ("model parameters and buffers unchanged", ", ".join(self.changed) or "unchanged",
             "ok" if not self.changed else "CHANGED"),
        ]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in rows]
        lines.insert(1, "-" * (sum(w) + 4 + max(len(r[2]) for r in rows) - w[2]))
        lines.append(f"ok: {self.ok}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


class _Seeded:
    """Fork the random stream(s) of ``device`` and seed them: the caller's stream is left as
    it was, and every evaluation draws the same numbers."""

    def __init__(self, seed: int, device: torch.device) -> None:
        cuda = device.type != "cpu"
        self.fork = torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type if cuda else "cuda")
        self.seed = seed

    def __enter__(self) -> None:
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self.fork.__exit__(*exc)  # type: ignore[arg-type]


def _to64(batch: TaskBatch) -> TaskBatch:
    def f(t: Tensor) -> Tensor:
        return t.double() if t.is_floating_point() else t

    return TaskBatch(support=tuple(map(f, batch.support)), query=tuple(map(f, batch.query)))  # type: ignore[arg-type]


def _loss_and_grads(maml: MAML, batch: TaskBatch, params: Sequence[Tensor], seed: int) -> tuple[Tensor, list[Tensor]]:
    with _Seeded(seed, batch.support[0].device):
        out = maml.meta_loss(batch, train=True, before=False)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return out.query_loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _value(maml: MAML, batch: TaskBatch, seed: int) -> Tensor:
    # With grad enabled: exactly the code path whose gradient is checked.
    with _Seeded(seed, batch.support[0].device):
        return maml.meta_loss(batch, train=True, before=False).loss.detach()


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def verify(
    maml: MAML,
    batch: TaskBatch | dict[str, Any],
    *,
    directions: int = 4,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-10,
    seed: int = 0,
) -> VerifyReport:
    """Check ``maml`` (its model, inner optimizer and settings) on ``batch``.

    Args:
        maml: the :class:`metaopt.MAML` to check; it is left as it was (checks (a) and (b)
            run on a float64 deep copy; (c) runs ``meta_loss`` on it, compares its state and
            restores it if an inner optimizer wrote into it).
        batch: a batch as for :meth:`MAML.meta_loss`; a small one (2 tasks) is enough.
        directions: random directions for the finite-difference check (>= 1).
        eps: finite-difference step in float64 (> 0); the truncation error is O(eps^2).
        rtol: tolerance of (a) relative to ``|grad|`` and of (b) relative to ``max|loop|``.
        atol: absolute floor added to the tolerance (for a zero meta-gradient).
        seed: seeds the directions (an explicit ``torch.Generator``) and the forked random
            stream of every evaluation (dropout).

    Returns:
        :class:`VerifyReport`. ``first_order=True`` is checked at second order (FOMAML's
        update is not the gradient of anything; the ops it runs are the same).

    Raises:
        TypeError / ValueError: for a ``maml`` that is not a :class:`MAML` or bad settings.
    """
    if not isinstance(maml, MAML):
        raise TypeError(f"maml must be a metaopt.MAML but is {type(maml).__name__}")
    if not isinstance(directions, int) or isinstance(directions, bool) or directions < 1:
        raise ValueError(f"directions should be an int >= 1 but is: {directions!r}")
    if not eps > 0:
        raise ValueError(f"eps should be > 0 but is: {eps}")
    if not rtol >= 0 or not atol >= 0:
        raise ValueError(f"rtol and atol should be >= 0 but are: {rtol}, {atol}")
    b = as_task_batch(batch)
    device = b.support[0].device
    notes: list[str] = []

    # (c) The user's own model: values before and after a meta-loss and its gradient.
    before = _state(maml)
    changed: list[str] = []
    params = [p for p in maml.parameters() if p.requires_grad]
    try:
        _loss_and_grads(maml, b, params, seed)
    except RuntimeError as err:  # the engine's own in-place check
        if "in place" not in str(err):
            raise
        changed.append(str(err).split(";")[0])
    after = _state(maml)
    changed += [k for k in before if not torch.equal(before[k], after[k])]
    if changed:  # put the user's model back as it was
        with torch.no_grad():
            for k, t in [*maml.named_parameters(), *maml.named_buffers()]:
                t.copy_(before[k])

    # (a) Finite differences on a float64 copy, at second order.
    m64 = copy.deepcopy(maml).double()
    if m64.first_order:
        m64.first_order = False
        notes.append("first_order=True: checked at second order (same ops; FOMAML is not a gradient)")
    b64 = _to64(b)
    p64 = [p for p in m64.parameters() if p.requires_grad]
    _, grads = _loss_and_grads(m64, b64, p64, seed)
    gnorm = math.sqrt(sum(float(g.square().sum()) for g in grads))
    gen = torch.Generator().manual_seed(seed)
    saved = [p.detach().clone() for p in p64]
    fd_error, fd_ok = 0.0, True
    for _ in range(directions):
        d = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device) for p in p64]
        norm = math.sqrt(sum(float(t.square().sum()) for t in d))
        d = [t / norm for t in d]
        ad = float(sum((g * t).sum() for g, t in zip(grads, d)))
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, t in zip(p64, d):
                    p.add_(t, alpha=sign * eps)
            values.append(float(_value(m64, b64, seed)))
            with torch.no_grad():
                for p, s in zip(p64, saved):
                    p.copy_(s)
        fd_err = abs(ad - (values[0] - values[1]) / (2 * eps))
        fd_ok = fd_ok and fd_err <= atol + rtol * gnorm
        fd_error = max(fd_error, fd_err / gnorm if gnorm > 0 else fd_err)

    # (b) vmap against the loop on the same copy, dropout off (masks differ by design).
    vmap_used = m64._use_vmap(device)
    support, what = vmap_support(m64.model)  # the table's verdict, whatever the setting
    vmap_error, vmap_ok = None, True
    if support == "wrong":
        status = f"refused: {what} (wrong under vmap; the engine uses the loop)"
    else:
        for m in m64.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        res = {}
        try:
            for vec in (False, True):
                m64.vectorize = vec
                res[vec] = _loss_and_grads(m64, b64, p64, seed)
            status = "compared"
        except Exception as err:  # noqa: BLE001 - any failure under vmap is the finding
            status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            vmap_ok = not vmap_used
        if status == "compared":
            (l0, g0), (l1, g1) = res[False], res[True]
            a = torch.cat([l0.flatten(), *(g.flatten() for g in g0)])
            c = torch.cat([l1.flatten(), *(g.flatten() for g in g1)])
            scale = float(a.abs().max())
            diff = float((a - c).abs().max())
            vmap_error = diff / scale if scale > 0 else diff
            vmap_ok = diff <= atol + rtol * scale or not vmap_used
            if not diff <= atol + rtol * scale and not vmap_used:
                notes.append("vmap differs from the loop; this setting uses the loop (exact): keep vectorize=False")
        if support == "unknown":
            notes.append(f"{what} is outside the engine's tested table: vectorize='auto' uses the loop")
    ok = fd_ok and vmap_ok and not changed
    return VerifyReport(
        ok=ok, fd_error=fd_error, fd_directions=directions, fd_ok=fd_ok, vmap_error=vmap_error,
        vmap_status=status, vmap_used=vmap_used, changed=changed, notes=notes, vmap_ok=vmap_ok,
    )
