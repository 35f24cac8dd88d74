"""The MAML engine: adapt a model to each task with a functional inner optimizer and return
the query loss whose gradient is the meta-gradient (Finn et al., 2017).

The model is never cloned or modified: it is run at other parameters with
``torch.func.functional_call(model, (params, buffers), (x,), strict=True)``, and the inner
optimizer computes new parameter dicts out of place, so autograd sees the whole inner loop.

Example:
    >>> import torch
    >>> from metaopt.maml import MAML          # also metaopt.MAML
    >>> from metaopt.models import MLP
    >>> from metaopt.optim import SGD
    >>> from metaopt.tasks.base import TaskBatch
    >>> model = MLP(1, (8,), 1)
    >>> maml = MAML(model, SGD(lr=0.01), inner_steps=1, loss_fn=torch.nn.functional.mse_loss)
    >>> outer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    >>> batch = TaskBatch(support=(torch.randn(4, 10, 1), torch.randn(4, 10, 1)),
    ...                   query=(torch.randn(4, 10, 1), torch.randn(4, 10, 1)))
    >>> out = maml.meta_loss(batch)
    >>> out.loss.backward(); outer.step()
    >>> out.query_loss.shape, out.accuracy is None
    (torch.Size([4]), True)

Buffers and batch norm:
    Normalisation layers use batch statistics in every engine call (MAML's transductive
    setting), whatever ``model.training`` is: for the duration of the call their
    ``training`` flag is set (other layers such as dropout keep the model's mode). Each
    forward receives fresh copies of the model's buffers, so BatchNorm running statistics
    (and ``num_batches_tracked``) of the model are never changed by ``adapt``,
    ``meta_loss`` or ``functional_forward``. ``batch_stats=False`` runs the model in its own
    mode instead (a BatchNorm in eval mode then uses the running statistics as they are).

Order:
    ``first_order=False``: the meta-gradient flows through every inner step, including the
    inner gradients (second-order terms) and the inner optimizer's state.
    ``first_order=True``: inner gradients are computed at detached parameters and enter the
    update as constants; the update is still differentiated with respect to the parameters
    and to learnable hyperparameters. For plain SGD this is exactly FOMAML: the meta-gradient
    is the query-loss gradient at the adapted parameters. No second-order graph is built.
    Evaluation (``train=False``) builds no graph at all and returns detached values.

Vectorised path:
    ``vectorize=True`` adapts all tasks of a meta-batch at once with ``torch.func.vmap``
    (``functional_call`` and ``torch.func.grad`` inside the map); the meta-parameters and
    learnable hyperparameters are shared (not mapped), inner-optimizer state is mapped.
    Results equal the per-task loop (within 1e-10 in float64). ``"auto"`` applies
    :func:`default_vectorize`: vmap only for models whose every module is in the tested
    table of layers exact under vmap, and then only where it is faster.

Exactness (see ``docs/engine-support.md`` for the measured table):
    Around its own forwards the engine replaces torch functions whose higher derivatives
    are wrong by elementary compositions with the same values: ``F.layer_norm``,
    ``F.instance_norm`` and ``F.batch_norm`` under vmap (so ``nn.LayerNorm``,
    ``nn.InstanceNorm*``, ``nn.BatchNorm*`` vectorise exactly), and ``torch._weight_norm``
    everywhere (torch's own double backward is wrong). When it builds a graph it runs
    attention with the math kernel (the default CPU kernel has no double backward), so
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` meta-train at second order.
    ``nn.LSTM``/``nn.GRU``/``nn.RNN`` and ``spectral_norm`` are wrong or fail under vmap:
    ``"auto"`` uses the loop for them and ``vectorize=True`` raises ``ValueError`` naming
    the module. :func:`metaopt.verify` checks any model against finite differences.

Randomness:
    Dropout draws fresh masks per task: the loop draws them task after task from the global
    stream, vmap draws them batched (``randomness="different"``), so the two paths give
    different (equally valid) masks under the same seed. Each engine call runs the model
    exactly once per inner step and once for the query (no hidden probe forward), and the
    ``before=True`` evaluation runs on a forked random stream: results under a fixed seed
    are the same with and without ``before``, first call or later.

Checked inputs:
    The stock classification losses (``F.cross_entropy``, ``F.nll_loss`` and their modules)
    refuse float targets unless they are class probabilities shaped like the output with
    >= 2 classes (regression targets would give a loss of exactly 0); the stock regression
    losses (``F.mse_loss``, ``F.l1_loss``, ``F.smooth_l1_loss``, ``F.huber_loss`` and their
    modules) refuse outputs and targets of different shapes (torch would broadcast them); a
    float input of shape ``(N, 1)`` is refused as a missing task dimension. A user's own
    ``loss_fn`` is not inspected. An inner optimizer that changes the parameters in place
    raises ``RuntimeError`` (version counters); a write through ``.data`` bypasses those
    counters and is caught by :func:`metaopt.verify` (a value comparison, too costly here).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaopt._checks import check_loss_inputs, check_task_dim, in_transform, unused
from metaopt._exact_ops import ModelInfo, engine_context, inspect_model, needs_exact_ops
from metaopt.models import BatchNorm
from metaopt.precision import full_precision, loss_input, vmap_honours_autocast
from metaopt.remat import check_checkpoint_every, checkpointed_unroll
from metaopt.tasks.base import TaskBatch, as_task_batch
from metaopt.types import Buffers, Params

__all__ = ["MAML", "MetaLossOutput", "default_vectorize", "has_torch_batchnorm"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Vectorize = Union[bool, Literal["auto"]]

# Layers whose batch statistics MAML uses (forced into training mode when batch_stats=True).
_NORM_TYPES = (nn.modules.batchnorm._NormBase, BatchNorm)


class MetaLossOutput(NamedTuple):
    """What :meth:`MAML.meta_loss` returns. Per-task tensors have shape ``(tasks,)``.

    Attributes:
        loss: scalar, mean over tasks of the query loss after adaptation; differentiable
            with respect to ``maml.parameters()`` when training (detached in evaluation).
        query_loss: query loss of each task after adaptation (same graph as ``loss``).
        query_loss_before: query loss of each task at the meta-parameters (no adaptation),
            detached; ``None`` when ``meta_loss(..., before=False)``.
        accuracy: fraction of query predictions ``output.argmax(1) == target`` after
            adaptation, detached; ``None`` unless the targets are integer class indices and
            the output has one more dimension than the targets (classification).
        accuracy_before: the same at the meta-parameters; ``None`` when not classification
            or ``before=False``.
        inner_steps: the number of inner steps used.
    """

    loss: Tensor
    query_loss: Tensor
    query_loss_before: Tensor | None
    accuracy: Tensor | None
    accuracy_before: Tensor | None
    inner_steps: int


def has_torch_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` contains a ``torch.nn.BatchNorm1d/2d/3d`` (or SyncBatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def default_vectorize(model: nn.Module, device: torch.device | str) -> bool:
    """The rule ``vectorize="auto"`` applies: is ``vmap`` over tasks exact and faster?

    Exactness first: only when every module of the model is in the engine's tested table of
    layers exact to second order under ``vmap`` (a module without parameters or buffers of
    its own, such as a user's container, is judged by its submodules); any other module
    (``nn.LSTM``, ``spectral_norm``, a layer of unknown provenance holding parameters) means
    the per-task loop, which is exact for them. Then speed:

    - always on CUDA (one batched kernel per layer instead of one per task);
    - on CPU only for models without convolutions (MLP-sized models gain from batching the
      small matmuls; batched convolutions under vmap are slower than the loop on CPU).

    Example:
        >>> from torch import nn
        >>> from metaopt.models import MLP, Conv4
        >>> default_vectorize(MLP(), "cpu"), default_vectorize(Conv4(5), "cpu")
        (True, False)
        >>> default_vectorize(nn.LSTM(2, 3), "cuda")
        False
    """
    return _vectorize_rule(inspect_model(model), device)


def _refuse_wrong(info: ModelInfo) -> None:
    if info.support == "wrong":
        raise ValueError(
            f"vectorize=True cannot be used with a model containing {info.what}: under "
            "torch.func.vmap its meta-gradient is wrong or fails in torch. Use "
            "vectorize=False (the per-task loop is exact) or vectorize='auto'"
        )


def _vectorize_rule(info: ModelInfo, device: torch.device | str) -> bool:
    if info.support != "exact":
        return False
    return torch.device(device).type == "cuda" or not info.conv


def _check_int(value: Any, name: str, *, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= 0 but is {type(value).__name__}: {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0 but is: {value}")


def _check_versions(params: Params, versions: list[int]) -> None:
    if versions != [p._version for p in params.values()]:
        raise RuntimeError(
            "the inner optimizer modified the model's parameters in place; step(params, grads, "
            "state) must return new tensors and leave its inputs unchanged"
        )


def _walk_hparams(obj: Any, path: str, out: dict[str, nn.Parameter], seen: set[int], depth: int) -> None:
    """Collect the ``nn.Parameter``s reachable from an inner optimizer's attributes (tensors,
    dicts/lists/tuples of them, nested objects such as a wrapped optimizer, modules)."""
    if isinstance(obj, nn.Parameter):
        out.setdefault(path, obj)
        return
    if depth > 4 or id(obj) in seen or isinstance(obj, (Tensor, str, bytes, int, float, type)):
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        items = list(obj.named_parameters())
    elif isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, (types.FunctionType, types.MethodType, types.ModuleType)):
        items = list(vars(obj).items())
    else:
        return
    for k, v in items:
        _walk_hparams(v, f"{path}/{k}" if path else str(k), out, seen, depth + 1)


class MAML(nn.Module):
    """Model-agnostic meta-learning over any ``nn.Module`` and any functional inner optimizer.

    ``MAML`` is an ``nn.Module`` holding ``model`` as a submodule and the inner optimizer's
    learnable hyperparameters (every ``nn.Parameter`` found in its attributes, in dicts or
    lists of them — e.g. ``SGD(lr=nn.Parameter(...))``, :class:`metaopt.optim.learned.MetaSGD`)
    in ``inner_hparams``, so ``maml.parameters()`` is what the outer optimizer trains and
    ``maml.state_dict()`` checkpoints both. An inner optimizer that is itself an
    ``nn.Module`` is registered as the submodule ``inner_optimizer``.

    For each task the inner optimizer's state is re-initialised (``init``), then ``steps``
    times: support loss at the current params, its gradient, ``step``. The meta-loss is the
    query loss at the adapted params, averaged over tasks.

    Args:
        model: any ``nn.Module``; its parameters that require grad are adapted in the inner
            loop and meta-learned; parameters with ``requires_grad=False`` are held fixed.
        inner_optimizer: any object with ``init(params) -> state`` and
            ``step(params, grads, state) -> (params, state)``; default ``SGD(lr=0.4)``.
        inner_steps: inner steps when training (>= 0).
        first_order: first-order MAML (see the module docstring, "Order").
        loss_fn: ``loss_fn(output, target) -> scalar tensor`` for support and query.
        eval_inner_steps: inner steps when evaluating; default ``inner_steps``.
        allow_unused: treat the gradient of a parameter that the support loss does not use
            as zero; otherwise such a parameter raises ``ValueError``.
        vectorize: ``True`` (vmap over tasks), ``False`` (loop over tasks) or ``"auto"``
            (:func:`default_vectorize` for the model and the batch's device: vmap only where
            exact, see the module docstring).
        batch_stats: normalisation layers use batch statistics in every call (default,
            MAML's transductive setting); ``False`` runs the model in its own mode.
        chunk_size: with vmap, map this many tasks at a time (bounds memory); ``None``: all.
        checkpoint_every: second order: recompute the inner loop in the meta-backward in
            checkpointed segments of this many steps (memory sublinear in the inner steps,
            same meta-gradient; :mod:`metaopt.remat`); per-task loop only. ``None``: off.

    Raises:
        TypeError / ValueError: for a model that is not an ``nn.Module``, an inner optimizer
            without ``init``/``step``, a non-int or negative step count, an unknown
            ``vectorize``, or ``vectorize=True`` on a model with a module known wrong under
            vmap (``nn.LSTM``/``nn.GRU``/``nn.RNN`` and their cells, ``spectral_norm``),
            naming it.

    Reference:
        Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks", ICML 2017.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: Any = None,
        inner_steps: int = 1,
        first_order: bool = False,
        loss_fn: LossFn = F.cross_entropy,
        *,
        eval_inner_steps: int | None = None,
        allow_unused: bool = False,
        vectorize: Vectorize = "auto",
        batch_stats: bool = True,
        chunk_size: int | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module but is {type(model).__name__}")
        if inner_optimizer is None:
            from metaopt.optim import SGD

            inner_optimizer = SGD(lr=0.4)
        if not (callable(getattr(inner_optimizer, "init", None)) and callable(getattr(inner_optimizer, "step", None))):
            raise TypeError(
                "inner_optimizer must have init(params) -> state and step(params, grads, state) "
                f"-> (params, state) methods (e.g. metaopt.optim.SGD) but is {type(inner_optimizer).__name__}"
            )
        _check_int(inner_steps, "inner_steps")
        _check_int(eval_inner_steps, "eval_inner_steps", allow_none=True)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, target) -> scalar but is {loss_fn!r}")
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"vectorize must be True, False or 'auto' but is: {vectorize!r}")
        if vectorize is True:
            _refuse_wrong(inspect_model(model))
        if chunk_size is not None:
            _check_int(chunk_size, "chunk_size")
            if chunk_size == 0:
                raise ValueError("chunk_size must be None or an int >= 1 but is: 0")
        self.model = model
        self.inner_optimizer = inner_optimizer  # registered as a submodule if it is one
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = bool(first_order)
        self.loss_fn = loss_fn
        self.allow_unused = bool(allow_unused)
        self.vectorize = vectorize
        self.batch_stats = bool(batch_stats)
        self.chunk_size = chunk_size
        check_checkpoint_every(checkpoint_every)
        if checkpoint_every is not None and vectorize is True:
            raise ValueError("checkpoint_every needs the per-task loop (vectorize=False or 'auto') but "
                             "vectorize is: True")
        self.checkpoint_every = checkpoint_every
        self.inner_hparams = nn.ParameterDict()
        if not isinstance(inner_optimizer, nn.Module):
            found: dict[str, nn.Parameter] = {}
            _walk_hparams(inner_optimizer, "", found, set(), 0)
            model_ids = {id(p) for p in model.parameters()}
            for path, p in found.items():
                if id(p) in model_ids:
                    continue
                key = path.replace(".", "-")  # parameter names may not contain dots
                if key in self.inner_hparams:
                    raise ValueError(f"two inner-optimizer hyperparameters map to the name {key!r}")
                self.inner_hparams[key] = p
        self._info_key: tuple | None = None  # cache of the model's inspection (see _info)
        self._info_cache: ModelInfo | None = None

    def extra_repr(self) -> str:
        return (
            f"inner_steps={self.inner_steps}, eval_inner_steps={self.eval_inner_steps}, "
            f"first_order={self.first_order}, vectorize={self.vectorize!r}"
        )

    # ------------------------------------------------------------------ model evaluation

    @contextlib.contextmanager
    def _norm_mode(self) -> Iterator[None]:
        """Normalisation layers in training mode (batch statistics) for the duration."""
        if not self.batch_stats:
            yield
            return
        flipped = [m for m in self.model.modules() if isinstance(m, _NORM_TYPES) and not m.training]
        for m in flipped:
            m.training = True
        try:
            yield
        finally:
            for m in flipped:
                m.training = False

    def _split_params(self) -> tuple[Params, Params]:
        """(adapted, fixed): parameters that require grad, and the others (detached)."""
        adapted: Params = {}
        fixed: Params = {}
        for k, p in self.model.named_parameters():
            if p.requires_grad:
                adapted[k] = p
            else:
                fixed[k] = p.detach()
        return adapted, fixed

    def _call(self, params: Params, fixed: Params, buffers: Buffers, x: Tensor) -> Tensor:
        # Fresh buffer copies per call: training-mode BatchNorm updates running stats in
        # place in whatever tensors functional_call hands it; the model's stay untouched.
        bufs = {k: b.clone() for k, b in buffers.items()}
        full = {**fixed, **params} if fixed else params
        return functional_call(self.model, (full, bufs), (x,), strict=True)

    def _loss(self, params: Params, fixed: Params, buffers: Buffers, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = self._call(params, fixed, buffers, x)
        check_loss_inputs(self.loss_fn, out, y)
        with full_precision(out.device.type):  # under autocast: 16-bit forward, float32 loss
            loss = self.loss_fn(loss_input(out), y)
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn must return a scalar tensor but returned {type(loss).__name__}")
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar (0-dim) tensor but returned shape {tuple(loss.shape)}; "
                "use reduction='mean' or 'sum'"
            )
        return loss, out

    @staticmethod
    def _accuracy(out: Tensor, y: Tensor) -> Tensor:
        return (out.argmax(1) == y).to(out.dtype).mean()

    def functional_forward(self, params: Params, x: Tensor) -> Tensor:
        """The model at ``params`` (e.g. from :meth:`adapt`) on ``x``; buffers are copies.

        ``params`` must hold every parameter of the model (``strict=True``), as ``adapt``
        returns. Normalisation layers use batch statistics (see ``batch_stats``).
        """
        with self._norm_mode(), self._engine(torch.is_grad_enabled(), vectorized=in_transform(x)):
            return functional_call(
                self.model, (params, {k: b.clone() for k, b in self.model.named_buffers()}), (x,), strict=True
            )

    # ------------------------------------------------------------------ inner loop

    def _engine(self, graph: bool, vectorized: bool, info: ModelInfo | None = None) -> contextlib.AbstractContextManager:
        """Exact replacements for ops with wrong higher derivatives, and the math attention
        kernel when a graph is built (see :mod:`metaopt._exact_ops`)."""
        info = info or self._info()
        # A plain model (linear/conv/pointwise layers only) cannot reach attention.
        return engine_context(needs_exact_ops(info, vectorized), graph and not info.plain)

    def _info(self) -> ModelInfo:
        """:func:`metaopt._exact_ops.inspect_model`, recomputed only when the model's
        modules or hooks change (a parametrization added after construction, ...)."""
        key = tuple((id(m), len(m._forward_pre_hooks)) for m in self.model.modules())
        if self._info_key != key or self._info_cache is None:
            self._info_key, self._info_cache = key, inspect_model(self.model)
        return self._info_cache

    def _steps(self, train: bool, steps: int | None) -> int:
        if steps is None:
            return self.inner_steps if train else self.eval_inner_steps
        _check_int(steps, "steps")
        return steps

    def _mode(self, train: bool) -> str:
        """"second" / "first": differentiable inner loop; "none": no graph (evaluation)."""
        if not train or not torch.is_grad_enabled():
            return "none"
        return "first" if self.first_order else "second"

    def _fill_unused(self, params: Params, grads: Sequence[Tensor | None]) -> dict[str, Tensor]:
        missing = [k for k, g in zip(params, grads) if g is None]
        if missing and not self.allow_unused:
            raise ValueError(
                f"parameters {missing} received no gradient from the support loss (not used by the "
                "model's forward); pass allow_unused=True to MAML to treat their gradient as zero, "
                "or set requires_grad=False on them to hold them fixed"
            )
        return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}

    def _inner_grads(self, params: Params, fixed: Params, buffers: Buffers, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Support-loss gradient with its graph (second order), unused parameters filled."""
        loss, _ = self._loss(params, fixed, buffers, x, y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        return self._fill_unused(params, grads)

    def _adapt_one(
        self, params0: Params, fixed: Params, buffers: Buffers, x: Tensor, y: Tensor, steps: int, mode: str
    ) -> Params:
        opt = self.inner_optimizer
        params = params0 if mode != "none" else {k: p.detach() for k, p in params0.items()}
        state = opt.init(params)
        if mode == "second" and self.checkpoint_every:  # metaopt.remat: recompute in the backward
            step = lambda p, s: opt.step(p, self._inner_grads(p, fixed, buffers, x, y), s)  # noqa: E731
            extras = [p for p in self.parameters() if all(p is not q for q in params.values())]  # hparams
            return checkpointed_unroll(step, params, state, steps, self.checkpoint_every, extras)[0]
        for _ in range(steps):
            if mode == "second":
                g = self._inner_grads(params, fixed, buffers, x, y)
            else:  # gradient at detached params: a constant for the outer graph
                detached = {k: p.detach().requires_grad_() for k, p in params.items()}
                with torch.enable_grad():
                    loss, _ = self._loss(detached, fixed, buffers, x, y)
                    grads = torch.autograd.grad(loss, list(detached.values()), allow_unused=True)
                g = self._fill_unused(params, grads)
            if mode == "none":
                with torch.no_grad():
                    params, state = opt.step(params, g, state)
            else:
                params, state = opt.step(params, g, state)
        return params

    def adapt(self, x: Tensor, y: Tensor, *, steps: int | None = None, train: bool | None = None) -> Params:
        """Adapt the model to one task's support set; return the adapted parameters.

        Args:
            x: support inputs of one task ``(examples, ...)`` (no task dimension).
            y: support targets ``(examples, ...)``.
            steps: inner steps; default ``inner_steps`` when training, else ``eval_inner_steps``.
            train: training (differentiable, second or first order) or evaluation (no graph,
                detached result); default ``self.training``.

        Returns:
            ``{name: Tensor}`` for every model parameter (fixed ones included), ready for
            :meth:`functional_forward`. The model itself is not modified.
        """
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"x and y must be tensors but are {type(x).__name__} and {type(y).__name__}")
        if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same number of examples "
                "in their first dimension"
            )
        train = self.training if train is None else bool(train)
        n = self._steps(train, steps)
        params0, fixed = self._split_params()
        buffers = dict(self.model.named_buffers())
        versions = [p._version for p in params0.values()]
        mode = self._mode(train)
        # The inner loop in float32 under autocast (metaopt.precision).
        with self._norm_mode(), self._engine(mode != "none", vectorized=False), full_precision(x.device.type):
            params = self._adapt_one(params0, fixed, buffers, x, y, n, mode)
        _check_versions(params0, versions)
        return {**fixed, **params}

    # ------------------------------------------------------------------ meta-loss

    def meta_loss(
        self,
        batch: TaskBatch | dict[str, Any],
        *,
        train: bool | None = None,
        steps: int | None = None,
        before: bool = True,
        backward: bool = False,
        loss_scale: float | Tensor | None = None,
    ) -> MetaLossOutput:
        """Adapt to every task's support set and return the query losses.

        Args:
            batch: a :class:`metaopt.tasks.base.TaskBatch` or a torchmeta-style dict
                ``{"train": (x, y), "test": (x, y)}``, task dimension first.
            train: ``True``: differentiable (``out.loss.backward()`` gives the meta-gradient);
                ``False``: evaluation, no graph, ``eval_inner_steps``; default ``self.training``.
                Under ``torch.no_grad()`` no graph is built either way.
            steps: override the number of inner steps.
            before: also compute the query loss/accuracy at the meta-parameters (one extra
                forward per task without grad).
            backward: accumulate the meta-gradient of ``loss`` into ``.grad`` here, task by
                task on the per-task loop, so that only one task's graph is alive at a time
                (peak memory of one task instead of the whole meta-batch; same gradient).
                The returned losses are then detached: do not call ``.backward()`` on them.
                Only for ``train=True``.
            loss_scale: with ``backward``, backpropagate ``loss_scale * loss`` (the scale of a
                ``torch.amp.GradScaler``, for float16: ``scaler.scale(torch.ones(()))``); the
                returned losses are unscaled. The caller unscales the gradients
                (:func:`metaopt.loop.meta_step` does, given the scaler).

        Returns:
            :class:`MetaLossOutput`.

        Raises:
            TypeError / ValueError: for a malformed batch (shapes named in the message), a
                missing task dimension, a stock loss given targets it would silently
                mis-read (see "Checked inputs" in the module docstring), a non-scalar loss, a
                bad ``steps``, or an unused parameter.
        """
        b = as_task_batch(batch)
        (xs, ys), (xq, yq) = b.support, b.query
        check_task_dim(xs, "support")
        check_task_dim(xq, "query")
        if xs.shape[2:] != xq.shape[2:]:
            raise ValueError(
                f"support inputs {tuple(xs.shape)} and query inputs {tuple(xq.shape)} must have the "
                "same per-example shape (dims after (tasks, examples))"
            )
        if ys.shape[2:] != yq.shape[2:] or ys.dtype != yq.dtype:
            raise ValueError(
                f"support targets {tuple(ys.shape)} {ys.dtype} and query targets {tuple(yq.shape)} "
                f"{yq.dtype} must have the same per-example shape and dtype"
            )
        train = self.training if train is None else bool(train)
        if backward and not train:
            raise ValueError("meta_loss(backward=True) needs train=True: evaluation builds no graph")
        if loss_scale is not None and not backward:
            raise ValueError("meta_loss(loss_scale=...) needs backward=True: it scales the backward pass "
                             "that meta_loss runs itself (else scale out.loss yourself)")
        n = self._steps(train, steps)
        mode = self._mode(train)
        backward = backward and torch.is_grad_enabled()
        classify = not (torch.is_floating_point(yq) or torch.is_complex(yq) or yq.dtype == torch.bool)
        params0, fixed = self._split_params()
        buffers = dict(self.model.named_buffers())
        versions = [p._version for p in params0.values()]
        info = self._info()
        vmap = self._use_vmap(xs.device, info)
        # Math attention kernel for any inner step: flash's backward has no batching rule.
        with self._norm_mode(), self._engine(mode != "none" or vmap, vectorized=vmap, info=info):
            if vmap:
                res = self._meta_loss_vmap(params0, fixed, buffers, b, n, mode, classify, before)
                if backward:  # all tasks share one vmapped graph: one backward for all
                    mean = res["loss"].mean()
                    (mean if loss_scale is None else mean * loss_scale).backward()
                    res["loss"] = res["loss"].detach()
            else:
                res = self._meta_loss_loop(params0, fixed, buffers, b, n, mode, classify, before, backward,
                                           loss_scale)
        _check_versions(params0, versions)
        loss_t = res["loss"]
        return MetaLossOutput(
            loss=loss_t.mean(),
            query_loss=loss_t,
            query_loss_before=res.get("loss0"),
            accuracy=res.get("acc"),
            accuracy_before=res.get("acc0"),
            inner_steps=n,
        )

    def _use_vmap(self, device: torch.device, info: ModelInfo | None = None) -> bool:
        info = info or self._info()
        if not vmap_honours_autocast(device.type):  # metaopt.precision: vmap would compute in float32
            if self.vectorize is True:
                raise ValueError(f"vectorize=True under torch.autocast({device.type!r}): autocast has no effect "
                                 "inside torch.func.vmap in this torch; use vectorize='auto' or False")
            return False
        if self.checkpoint_every is not None and self.vectorize == "auto":
            return False
        if self.vectorize == "auto":
            return _vectorize_rule(info, device)
        if self.vectorize:
            _refuse_wrong(info)  # e.g. spectral_norm added after construction
        return bool(self.vectorize)

    def _meta_loss_loop(
        self, params0: Params, fixed: Params, buffers: Buffers, b: TaskBatch, n: int, mode: str,
        classify: bool, before: bool, backward: bool = False, loss_scale: float | Tensor | None = None,
    ) -> dict[str, Tensor]:
        (xs, ys), (xq, yq) = b.support, b.query
        losses, accs, befores = [], [], []
        scale: float | Tensor = 1.0 / b.num_tasks  # d(mean over tasks)/d(task loss)
        if loss_scale is not None:
            scale = loss_scale * scale
        grad_ctx = torch.no_grad if mode == "none" else contextlib.nullcontext
        for i in range(b.num_tasks):
            with full_precision(xs.device.type):  # the inner loop in float32 (metaopt.precision)
                params = self._adapt_one(params0, fixed, buffers, xs[i], ys[i], n, mode)
            with grad_ctx():
                loss, out = self._loss(params, fixed, buffers, xq[i], yq[i])
            if backward:  # free this task's graph now; .grad accumulates the mean's gradient
                (loss * scale).backward()
                loss, out = loss.detach(), out.detach()
            losses.append(loss)
            if classify:
                with torch.no_grad():
                    accs.append(self._accuracy(out, yq[i]))
            if before:
                befores.append(self._before_one(params0, fixed, buffers, xq[i], yq[i], classify))
        res = {"loss": torch.stack(losses)}
        if classify:
            res["acc"] = torch.stack(accs)
        for k in befores[0] if befores else ():
            res[k] = torch.stack([r[k] for r in befores])
        return res

    @staticmethod
    def _fork(device: torch.device) -> contextlib.AbstractContextManager:
        cuda = device.type != "cpu"
        return torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type if cuda else "cuda")

    def _before_one(
        self, params0: Params, fixed: Params, bufs: Buffers, xq_i: Tensor, yq_i: Tensor, classify: bool
    ) -> dict[str, Tensor]:
        """Query loss/accuracy of one task at the meta-parameters, without grad, on a forked
        random stream: dropout here draws its own masks and leaves the training stream (and
        so the adapted results under a fixed seed) exactly as without ``before``."""
        with torch.no_grad(), self._fork(xq_i.device):
            loss0, out0 = self._loss({k: p.detach() for k, p in params0.items()}, fixed, bufs, xq_i, yq_i)
            return {"loss0": loss0, "acc0": self._accuracy(out0, yq_i)} if classify else {"loss0": loss0}

    def _meta_loss_vmap(
        self, params0: Params, fixed: Params, buffers: Buffers, b: TaskBatch, n: int, mode: str,
        classify: bool, before: bool,
    ) -> dict[str, Tensor]:
        (xs, ys), (xq, yq) = b.support, b.query
        T = b.num_tasks
        if mode == "none":
            params0 = {k: p.detach() for k, p in params0.items()}
        opt = self.inner_optimizer
        # torch.func.grad silently returns zeros for unused inputs: the first support loss's
        # graph is walked instead (no extra forward, no random numbers drawn).
        pending = [n > 0 and not self.allow_unused]

        def support_loss(params: Params, bufs: Buffers, x: Tensor, y: Tensor) -> Tensor:
            loss = self._loss(params, fixed, bufs, x, y)[0]
            if pending[0]:
                pending[0] = False
                missing = set(unused(loss, params))
                self._fill_unused(params, [None if k in missing else p for k, p in params.items()])
            return loss

        grad_fn = torch.func.grad(support_loss)

        def task(xs_i: Tensor, ys_i: Tensor, xq_i: Tensor, yq_i: Tensor, bufs: Buffers) -> dict[str, Tensor]:
            # params0 is captured, not mapped: the first step runs the shared weights on
            # this task's data, and only the updated params carry a task dimension.
            params = params0
            state = opt.init(params)
            with full_precision(xs_i.device.type):  # the inner loop in float32 (metaopt.precision)
                for _ in range(n):
                    at = params if mode == "second" else {k: p.detach() for k, p in params.items()}
                    grads = grad_fn(at, bufs, xs_i, ys_i)
                    params, state = opt.step(params, grads, state)
            loss, out = self._loss(params, fixed, bufs, xq_i, yq_i)
            res = {"loss": loss}
            if classify:
                with torch.no_grad():
                    res["acc"] = self._accuracy(out, yq_i)
            if before:
                res.update(self._before_one(params0, fixed, bufs, xq_i, yq_i, classify))
            return res

        # Buffers mapped as expanded views (no copy); each forward clones its own per task.
        bufs = {k: v.expand(T, *v.shape) for k, v in buffers.items()}
        mapped = torch.func.vmap(task, in_dims=(0, 0, 0, 0, 0), randomness="different", chunk_size=self.chunk_size)
        ctx = torch.no_grad() if mode == "none" else contextlib.nullcontext()
        with ctx:
            return mapped(xs, ys, xq, yq, bufs)
