"""The implementations the benchmark compares, each computing the same meta-gradient.

Every implementation turns ``(model, case)`` into ``meta_backward(batch)``: adapt every task
of the meta-batch with the case's inner optimizer and order, and accumulate the gradient of
the mean query loss into ``model``'s ``.grad``. The harness adds ``zero_grad`` and the outer
step. Peers run in their documented MAML style (per-task loop, ``backward`` per task, as
in their own MAML examples); :func:`metaopt.bench.check.check_meta_gradients` verifies in
float64 that every one matches the plain PyTorch loop.

A peer that cannot be imported reports the reason (:meth:`Impl.unavailable`); a peer
without a differentiable Adafactor reports ``n/a`` for the Adafactor cases
(:meth:`Impl.unsupported`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaopt.bench.workloads import Case, make_inner
from metaopt.tasks.base import TaskBatch

__all__ = ["Impl", "IMPLS", "get_impls", "MetaBackward"]

MetaBackward = Callable[[TaskBatch], None]
NO_ADAFACTOR = "n/a (no differentiable Adafactor)"


def _error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[-1] if msg else ''}".strip()


class Impl:
    """One row of the table."""

    key = ""
    name = ""
    is_metaopt = False
    note = ""  # extra information for the table (e.g. how a peer was loaded)

    def unavailable(self) -> str | None:
        """``None`` when usable, else why not (import error, ...)."""
        return None

    def unsupported(self, case: Case) -> str | None:
        """``None`` when the case can run, else the table's ``n/a`` text."""
        return None if case.inner == "sgd" else NO_ADAFACTOR

    def build(self, model: nn.Module, case: Case) -> MetaBackward:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------
# metaopt
# ---------------------------------------------------------------------------------------


class Metaopt(Impl):
    is_metaopt = True

    def __init__(self, vectorize: bool) -> None:
        self.vectorize = vectorize
        self.key = "metaopt-vmap" if vectorize else "metaopt-loop"
        self.name = "metaopt vectorised" if vectorize else "metaopt per-task loop"

    def unavailable(self) -> str | None:
        try:
            importlib.import_module("metaopt.maml")
            importlib.import_module("metaopt.optim")
        except Exception as e:  # noqa: BLE001 - the reason goes into the table
            return f"cannot import metaopt.maml / metaopt.optim: {_error(e)}"
        return None

    def unsupported(self, case: Case) -> str | None:
        if case.checkpoint_every and self.vectorize:
            return "n/a (checkpoint_every: per-task loop only)"
        return None

    def build(self, model: nn.Module, case: Case) -> MetaBackward:
        from metaopt.maml import MAML
        from metaopt.precision import precision_context

        w = case.workload
        maml = MAML(model, make_inner(case.inner, w.inner_lr), inner_steps=w.inner_steps,
                    first_order=case.first_order, loss_fn=w.loss_fn, vectorize=self.vectorize,
                    checkpoint_every=case.checkpoint_every)
        device = next(model.parameters()).device
        if self.vectorize and case.precision in ("bf16", "fp16"):
            from metaopt.precision import vmap_honours_autocast

            with precision_context(case.precision, device):
                if not vmap_honours_autocast(device.type):
                    raise NotImplementedError("n/a (torch.autocast has no effect under torch.func.vmap in this "
                                              "torch; metaopt takes the per-task loop)")

        def meta_backward(batch: TaskBatch) -> None:
            # The lean recipe: one task's graph alive at a time (peers do the same).
            # before=False: no extra forward at the meta-parameters (peers don't do one).
            with precision_context(case.precision, device):
                maml.meta_loss(batch, before=False, backward=True)

        return meta_backward


# ---------------------------------------------------------------------------------------
# plain PyTorch: the reference
# ---------------------------------------------------------------------------------------


class Plain(Impl):
    key = "plain"
    name = "plain PyTorch loop"
    note = "autograd.grad(create_graph) + manual SGD + functional_call"

    def build(self, model: nn.Module, case: Case) -> MetaBackward:
        w = case.workload
        loss_fn, lr, steps, create_graph = w.loss_fn, w.inner_lr, w.inner_steps, not case.first_order
        buffers = dict(model.named_buffers())

        def meta_backward(batch: TaskBatch) -> None:
            (xs, ys), (xq, yq) = batch
            T = xs.shape[0]
            params0: dict[str, Tensor] = dict(model.named_parameters())
            for t in range(T):
                params = params0
                for _ in range(steps):
                    loss = loss_fn(functional_call(model, (params, buffers), (xs[t],)), ys[t])
                    # First order: the gradient is a constant, the update is still p - lr*g.
                    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
                    params = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
                query = loss_fn(functional_call(model, (params, buffers), (xq[t],)), yq[t])
                (query / T).backward()

        return meta_backward


# ---------------------------------------------------------------------------------------
# higher
# ---------------------------------------------------------------------------------------


class Higher(Impl):
    key = "higher"
    name = "higher"
    note = "Adafactor rows: torch.optim.Adafactor through metaopt.integrations.higher"

    def unavailable(self) -> str | None:
        try:
            importlib.import_module("higher")
        except Exception as e:  # noqa: BLE001
            return f"not importable: {_error(e)}"
        return None

    def unsupported(self, case: Case) -> str | None:
        if case.inner == "sgd":
            return None
        try:
            importlib.import_module("metaopt.integrations.higher")
        except Exception as e:  # noqa: BLE001
            return f"{NO_ADAFACTOR}; metaopt.integrations.higher: {_error(e)}"
        return None

    def build(self, model: nn.Module, case: Case) -> MetaBackward:
        import higher

        w = case.workload
        loss_fn, steps = w.loss_fn, w.inner_steps
        if case.inner == "sgd":
            inner_opt: Any = torch.optim.SGD(model.parameters(), lr=w.inner_lr)
            override = None
        else:  # torch.optim.Adafactor, made differentiable by metaopt.integrations.higher
            importlib.import_module("metaopt.integrations.higher")  # registers the twin with higher
            inner_opt, override = torch.optim.Adafactor(model.parameters(), lr=w.inner_lr), None
        # higher computes inner grads with create_graph=track_higher_grads; first order
        # keeps the graph of the update (so the meta-gradient reaches the initial weights)
        # and detaches the gradient, the usual FOMAML recipe with higher.
        callback = (lambda gs: [g.detach() if g is not None else None for g in gs]) if case.first_order else None

        def meta_backward(batch: TaskBatch) -> None:
            (xs, ys), (xq, yq) = batch
            T = xs.shape[0]
            for t in range(T):
                with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                          override=override) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(loss_fn(fmodel(xs[t]), ys[t]), grad_callback=callback)
                    (loss_fn(fmodel(xq[t]), yq[t]) / T).backward()

        return meta_backward


# ---------------------------------------------------------------------------------------
# torchopt
# ---------------------------------------------------------------------------------------


class TorchOpt(Impl):
    key = "torchopt"
    name = "torchopt"
    note = "functional API: torchopt.sgd + apply_updates(inplace=False)"

    def unavailable(self) -> str | None:
        try:
            importlib.import_module("torchopt")
        except Exception as e:  # noqa: BLE001
            return f"not importable: {_error(e)}"
        return None

    def build(self, model: nn.Module, case: Case) -> MetaBackward:
        import torchopt

        w = case.workload
        loss_fn, steps, create_graph = w.loss_fn, w.inner_steps, not case.first_order
        opt = torchopt.sgd(lr=w.inner_lr)
        names = [k for k, _ in model.named_parameters()]
        buffers = dict(model.named_buffers())

        def meta_backward(batch: TaskBatch) -> None:
            (xs, ys), (xq, yq) = batch
            T = xs.shape[0]
            params0 = tuple(model.parameters())
            for t in range(T):
                params = params0
                state = opt.init(params)
                for _ in range(steps):
                    out = functional_call(model, (dict(zip(names, params)), buffers), (xs[t],))
                    grads = torch.autograd.grad(loss_fn(out, ys[t]), params, create_graph=create_graph)
                    updates, state = opt.update(grads, state, inplace=False)
                    params = torchopt.apply_updates(params, updates, inplace=False)
                out = functional_call(model, (dict(zip(names, params)), buffers), (xq[t],))
                (loss_fn(out, yq[t]) / T).backward()

        return meta_backward


# ---------------------------------------------------------------------------------------
# learn2learn
# ---------------------------------------------------------------------------------------


def _load_l2l_maml() -> tuple[Any, str]:
    """``(learn2learn.algorithms.MAML, note)``.

    ``import learn2learn`` imports every subpackage (vision -> torchvision, gym, ...). When
    that fails (on a CPU-only torch, PyPI's torchvision is a CUDA build that cannot load),
    the MAML class is loaded from the installed files without the package ``__init__``:
    the code measured is learn2learn's own ``algorithms/maml.py`` and ``utils``, and the
    note says so.
    """
    try:
        import learn2learn

        return learn2learn.algorithms.MAML, ""
    except Exception as e:  # noqa: BLE001
        reason = _error(e)
    spec = importlib.util.find_spec("learn2learn")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(reason)
    root = list(spec.submodule_search_locations)[0]
    saved = {k: v for k, v in sys.modules.items() if k == "learn2learn" or k.startswith("learn2learn.")}
    for k in saved:
        del sys.modules[k]
    try:
        for name, path in (("learn2learn", root), ("learn2learn.algorithms", f"{root}/algorithms")):
            stub = types.ModuleType(name)
            stub.__path__ = [path]  # a namespace-like package: submodules import, __init__ doesn't run
            sys.modules[name] = stub
        maml = importlib.import_module("learn2learn.algorithms.maml").MAML
    finally:  # leave no stub behind: a later `import learn2learn` behaves as before
        for k in [k for k in sys.modules if k == "learn2learn" or k.startswith("learn2learn.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return maml, f"algorithms/maml.py loaded without the package __init__ (import learn2learn: {reason})"


class Learn2Learn(Impl):
    key = "learn2learn"
    name = "learn2learn"

    def __init__(self) -> None:
        self._maml: Any = None
        self._reason: str | None = None

    def unavailable(self) -> str | None:
        if self._maml is None and self._reason is None:
            try:
                self._maml, self.note = _load_l2l_maml()
            except Exception as e:  # noqa: BLE001
                self._reason = f"not importable: {_error(e)}"
        return self._reason

    def build(self, model: nn.Module, case: Case) -> MetaBackward:
        if self.unavailable():
            raise RuntimeError(self._reason)
        w = case.workload
        loss_fn, steps = w.loss_fn, w.inner_steps
        maml = self._maml(model, lr=w.inner_lr, first_order=case.first_order)

        def meta_backward(batch: TaskBatch) -> None:
            (xs, ys), (xq, yq) = batch
            T = xs.shape[0]
            for t in range(T):
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(loss_fn(learner(xs[t]), ys[t]))
                (loss_fn(learner(xq[t]), yq[t]) / T).backward()

        return meta_backward


# ---------------------------------------------------------------------------------------

IMPLS: dict[str, Callable[[], Impl]] = {
    "metaopt-vmap": lambda: Metaopt(vectorize=True),
    "metaopt-loop": lambda: Metaopt(vectorize=False),
    "higher": Higher,
    "torchopt": TorchOpt,
    "learn2learn": Learn2Learn,
    "plain": Plain,
}


def get_impls(keys: list[str] | None = None) -> list[Impl]:
    """Fresh implementation objects, in table order."""
    keys = list(IMPLS) if keys is None else keys
    unknown = [k for k in keys if k not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {', '.join(IMPLS)}")
    return [IMPLS[k]() for k in keys]
