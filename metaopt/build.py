"""From a resolved config to objects: task distributions, model, inner optimizer, MAML, outer.

Each builder reads one config section and asks a registry by name, so that a task, model or
optimizer registered by the user works from a config without a change here:

* ``task``  -> ``metaopt.tasks.get(task.name, **task kwargs)`` (see :func:`task_kwargs`);
* ``model`` -> :func:`model_factory` (``model.name``; ``auto`` is the task's default) with
  the task's data-dependent arguments (``model_args()``, e.g. ``ways``) and the section's keys;
* ``inner`` -> ``metaopt.optim.get(inner.name, **every other inner key)``, with ``learn_lr``
  the lr as learned ``nn.Parameter``s (see :func:`build_inner`);
* ``outer`` -> :func:`metaopt.outer.build_outer_optimizer`.

Example:
    >>> from metaopt.config import resolve
    >>> cfg = resolve({"model": {"hidden_sizes": [8]}})
    >>> tasks = build_tasks(cfg, "train", torch.device("cpu"))
    >>> model = build_model(cfg, tasks)
    >>> type(model).__name__, type(build_inner(cfg)).__name__
    ('MLP', 'SGD')
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from metaopt import optim
from metaopt import tasks as tasks_mod
from metaopt.checks import ConfigError
from metaopt.maml import MAML
from metaopt import models
from metaopt.models import MLP, Conv4
from metaopt.optim.learned import per_parameter_lr
from metaopt.outer import build_outer_optimizer
from metaopt.tasks.base import model_args

__all__ = [
    "INNER_OWN_KEYS",
    "LEARN_LR_MODES",
    "OUTER_OWN_KEYS",
    "accepted_kwargs",
    "build_inner",
    "build_maml",
    "build_model",
    "build_outer",
    "build_tasks",
    "has_splits",
    "learn_lr_mode",
    "model_factory",
    "model_names",
    "outer_optimizer_args",
    "outer_param_groups",
    "resolve_device",
    "task_kwargs",
]

#: Keys of the ``inner`` section that MAML reads; every other key goes to the optimizer.
INNER_OWN_KEYS = frozenset({"name", "steps", "eval_steps", "first_order", "learn_lr"})
#: Keys of the ``outer`` section that are not arguments of the optimizer's constructor
#: (``name`` and ``impl`` pick the class).
OUTER_OWN_KEYS = frozenset({"hparams_lr"})


def outer_optimizer_args(outer: Mapping[str, Any]) -> dict[str, Any]:
    """The ``outer`` section without the keys that are not the optimizer's (``OUTER_OWN_KEYS``):
    what :func:`metaopt.outer.build_outer_optimizer` takes."""
    return {k: v for k, v in outer.items() if k not in OUTER_OWN_KEYS}


def accepted_kwargs(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword names ``factory`` takes, or ``None`` when it takes ``**kwargs``.

    Example:
        >>> sorted(accepted_kwargs(lambda a, *, b=1: None))
        ['a', 'b']
    """
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
            names.add(p.name)
    return names


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is a ConfigError."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}: {e}") from None


# ============================================================================ tasks


def task_kwargs(task: Mapping[str, Any], split: str, device: torch.device) -> dict[str, Any]:
    """The constructor arguments of ``task.name`` from the ``task`` section: every key but
    ``name`` that the constructor takes and whose value is not null (null: the
    constructor's default), plus ``split`` and ``device`` when the constructor takes them.
    YAML lists become tuples."""
    factory = tasks_mod.factory(task["name"])
    accepted = accepted_kwargs(factory)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in task.items()
              if k != "name" and v is not None and (accepted is None or k in accepted)}  # (root: data tasks only)
    for key, value in (("split", split), ("device", device)):
        if accepted is None or key in accepted:
            kwargs.setdefault(key, value)
    return kwargs


def has_splits(name: str) -> bool:
    """Whether the task constructor registered as ``name`` takes a ``split`` argument (else
    one distribution serves every split, held-out tasks coming from fixed seeds)."""
    accepted = accepted_kwargs(tasks_mod.factory(name))
    return accepted is None or "split" in accepted


def build_tasks(cfg: Mapping[str, Any], split: str, device: torch.device) -> Any:
    """The task distribution of ``cfg["task"]`` for ``split`` ("train", "val" or "test").

    A constructor without a ``split`` argument gets the same arguments for every split (its
    held-out tasks then come from fixed seeds, see :func:`metaopt.tasks.eval_batches`).
    """
    task = cfg["task"]
    try:
        return tasks_mod.get(task["name"], **task_kwargs(task, split, device))
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(f"task {task['name']!r} (split {split!r}): {e}") from None


# ============================================================================ models


def _mlp(in_features: int = 1, out_features: int = 1, hidden_sizes: Iterable[int] = (40, 40)) -> nn.Module:
    return MLP(in_features, tuple(hidden_sizes), out_features)


def _conv4(ways: int, in_channels: int = 1, filters: int = 64) -> nn.Module:
    return Conv4(ways, in_channels, filters)


#: Config-facing adapters for the two original models (their config keys, ``hidden_sizes``
#: and ``filters``, predate the zoo's constructor names); every other name comes from
#: :func:`metaopt.models.get`'s registry (``resnet12``, ``transformer``, ``lstm``, and models
#: users register), built with its constructor's own argument names.
_ADAPTERS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "conv4": _conv4}


def model_names() -> list[str]:
    """The model names a config may use."""
    return sorted(set(_ADAPTERS) | set(models.names()))


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The constructor of the model called ``name`` (the one place that maps config names
    to model classes).

    Raises:
        ConfigError: unknown name, listing the known ones.
    """
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    if isinstance(name, str) and name.lower() in models.names():
        return models.factory(name)
    raise ConfigError(f"model.name should be one of {', '.join(model_names())} but is: {name!r}")


def build_model(cfg: Mapping[str, Any], task: Any = None) -> nn.Module:
    """``model.name`` built with the task's data-dependent arguments (``model_args()``) and
    the ``model`` section's keys that its constructor takes, initialised from
    ``train.seed`` without touching the global RNG."""
    section = dict(cfg["model"])
    factory = model_factory(section.pop("name"))
    accepted = accepted_kwargs(factory)
    kwargs = {k: v for k, v in section.items() if v is not None and (accepted is None or k in accepted)}
    # The data-dependent arguments: the task's own (model_args), else the task section's
    # keys the model takes (e.g. ``ways`` when training on the user's batches).
    kwargs.update({k: v for k, v in cfg["task"].items() if v is not None and accepted is not None and k in accepted})
    kwargs.update(model_args(task))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["train"]["seed"])
        try:
            return factory(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config section 'model' ({cfg['model']['name']}): {e}") from None


# ============================================================================ optimizers


#: ``inner.learn_lr`` values that meta-learn the inner lr (``true`` is ``scalar``): one
#: scalar rate; one rate per parameter tensor (per layer, as MAML++'s LSLR without the
#: per-step axis); one rate per weight (Meta-SGD, Li et al. 2017).
LEARN_LR_MODES = ("scalar", "per_layer", "per_element")


def learn_lr_mode(value: Any) -> str | None:
    """The canonical form of an ``inner.learn_lr`` value: ``None`` (off) or one of
    :data:`LEARN_LR_MODES` (``True`` is ``"scalar"``, kept for old configs and checkpoints).

    Raises:
        ConfigError: anything else, naming the value and the allowed ones.

    Example:
        >>> learn_lr_mode(True), learn_lr_mode(False), learn_lr_mode("per_layer")
        ('scalar', None, 'per_layer')
    """
    if value is True:
        return "scalar"
    if value is False or value is None:
        return None
    if isinstance(value, str) and value in LEARN_LR_MODES:
        return value
    raise ConfigError(f"inner.learn_lr should be one of false, true, {', '.join(LEARN_LR_MODES)} but is: {value!r}")


def build_inner(cfg: Mapping[str, Any], model: nn.Module | None = None) -> Any:
    """``metaopt.optim.get(inner.name, **every inner key but MAML's own)``.

    With ``inner.learn_lr`` the lr starts at ``inner.lr`` and is made of ``nn.Parameter``s,
    which :class:`metaopt.MAML` registers (so the outer optimizer trains them and
    checkpoints hold them): ``scalar`` (or ``true``) one 0-dim rate; ``per_layer`` a dict
    of 0-dim rates, one per parameter tensor of ``model``; ``per_element`` a dict of rates
    shaped like the parameters (Meta-SGD). See :func:`metaopt.optim.learned.per_parameter_lr`.

    Args:
        cfg: a resolved config (its ``inner`` section is read).
        model: the model to be adapted; needed by ``per_layer`` and ``per_element`` (the
            rates are keyed, shaped and typed like its parameters that require grad).

    Raises:
        ConfigError: learned rates without an explicit ``inner.lr`` to start from (e.g.
            transformers' relative step), per-layer rates without ``model``, or arguments
            the optimizer rejects.

    Example:
        >>> from metaopt.config import resolve
        >>> from metaopt.models import MLP
        >>> cfg = resolve({"inner": {"name": "adam", "lr": 0.01, "learn_lr": "per_layer"}})
        >>> opt = build_inner(cfg, MLP(1, (8,), 1))
        >>> sorted(opt.lr)                      # one learned rate per parameter tensor
        ['net.0.bias', 'net.0.weight', 'net.2.bias', 'net.2.weight']
        >>> opt.lr["net.0.weight"].shape, opt.lr["net.0.weight"].requires_grad
        (torch.Size([]), True)
    """
    inner = cfg["inner"]
    mode = learn_lr_mode(inner.get("learn_lr", False))
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in inner.items() if k not in INNER_OWN_KEYS}
    if kwargs.get("lr") is None:
        kwargs.pop("lr", None)
        if mode is not None:
            raise ConfigError("config key 'inner.learn_lr' needs an explicit inner.lr to start from")
    elif mode == "scalar":
        kwargs["lr"] = nn.Parameter(torch.tensor(float(inner["lr"])))
    elif mode is not None:
        if model is None:
            raise ConfigError(f"inner.learn_lr: {mode} needs the model its rates are keyed by: "
                              "build_inner(cfg, model)")
        kwargs["lr"] = per_parameter_lr(model, float(inner["lr"]),
                                        granularity="tensor" if mode == "per_layer" else "element")
    try:
        return optim.get(inner["name"], **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config section 'inner' ({inner['name']}): {e}") from None


def build_maml(cfg: Mapping[str, Any], model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
               inner: Any = None) -> MAML:
    """The MAML engine over ``model`` with the config's inner steps and the config's inner
    optimizer (or ``inner``, a user's one)."""
    c = cfg["inner"]
    return MAML(model, build_inner(cfg, model) if inner is None else inner, c["steps"], c["first_order"], loss_fn,
                eval_inner_steps=c["eval_steps"])


def outer_param_groups(cfg: Mapping[str, Any], maml: MAML) -> list[Tensor] | list[dict[str, Any]]:
    """What the outer optimizer trains: every parameter of ``maml`` (the model's weights and
    the inner optimizer's meta-learned hyperparameters, such as ``inner.learn_lr``'s rates).

    With ``outer.hparams_lr`` the hyperparameters form a second parameter group with that
    lr. One outer lr moves every parameter by about the same amount per step (Adam: about
    lr); an inner lr of 1e-3 (Adam, Adafactor) moved by 1e-3 per meta-iteration changes
    sign within a few of them, while SGD's 0.1 barely notices. Without ``hparams_lr``: one
    group, as before (checkpoints stay loadable).

    Example:
        >>> import torch
        >>> from metaopt.config import resolve
        >>> cfg = resolve({"inner": {"name": "adam", "lr": 0.001, "learn_lr": "per_layer"},
        ...                "outer": {"hparams_lr": 1e-5}})
        >>> maml = build_maml(cfg, torch.nn.Linear(1, 1), torch.nn.functional.mse_loss)
        >>> groups = outer_param_groups(cfg, maml)
        >>> [len(g["params"]) for g in groups], groups[1]["lr"]
        ([2, 2], 1e-05)
    """
    hp_lr = cfg["outer"].get("hparams_lr")
    params: list[Tensor] = list(maml.parameters())
    if hp_lr is None:
        return params
    model_ids = {id(p) for p in maml.model.parameters()}
    hparams = [p for p in params if id(p) not in model_ids]
    if not hparams:
        raise ConfigError(f"config key 'outer.hparams_lr' is {hp_lr!r} but the inner optimizer meta-learns "
                          "nothing: set inner.learn_lr, or leave outer.hparams_lr null")
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) in model_ids]},
                                    {"params": hparams, "lr": float(hp_lr)}]
    return groups


def build_outer(cfg: Mapping[str, Any], params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> torch.optim.Optimizer:
    """The outer (meta-) optimizer of ``cfg["outer"]`` over ``params`` (tensors or parameter
    groups, e.g. :func:`outer_param_groups`)."""
    try:
        return build_outer_optimizer(outer_optimizer_args(cfg["outer"]), params)
    except ValueError as e:
        raise ConfigError(f"config section 'outer': {e}") from None
