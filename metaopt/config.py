"""Experiment configs: plain YAML with five sections, checked key by key.

A config file holds the sections ``task``, ``model``, ``inner``, ``outer`` and ``train``.
Everything left out takes the default below (the sinusoid protocol of Finn et al. 2017 with
a short schedule), and a file may start from another one with ``base: other.yaml`` (a path
relative to the file) and override only what differs::

    # configs/sinusoid_5shot.yaml
    base: sinusoid.yaml
    task: {shots: 5, queries: 5}

Overrides from the command line (``--set inner.lr=0.05``) are applied last; their values are
read as YAML (``20`` is an int, ``true`` a bool, ``[40, 40]`` a list, ``null`` is None).

Unknown sections or keys and values of the wrong type are errors that name the key, e.g.
``train.iterations should be an int >= 0 but is: 'ten'``. Integers are accepted where
a float is expected, and so is a string that reads as a number (YAML 1.1 reads ``1e-3``
without a dot as a string). Files are read with :func:`yaml.safe_load` only.

Every section but ``train`` also accepts the constructor arguments of what it names:
``task`` those of the task distribution registered as ``task.name`` (``metaopt.tasks.register``
works from a config: ``task: {name: mytask, dim: 3}``), ``model`` those of the model,
``inner`` those of the inner optimizer (``inner.momentum`` for SGD, ``inner.betas`` for an
Adam-like one: every argument it takes), ``outer`` those of the outer optimizer
(``outer.weight_decay``, ``outer.scale_parameter`` for transformers' Adafactor, ...).
Anything the constructor does not take is rejected when the config is resolved, with the
allowed keys listed.

Example:
    >>> cfg = resolve({"inner": {"lr": 0.05}, "train": {"iterations": 10}})
    >>> cfg["inner"]["lr"], cfg["inner"]["steps"], cfg["outer"]["name"]
    (0.05, 1, 'adam')
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from metaopt import optim
from metaopt import outer as outer_mod
from metaopt import tasks as tasks_mod
from metaopt.build import (INNER_OWN_KEYS, accepted_kwargs, learn_lr_mode, model_factory, model_names,
                           outer_optimizer_args)
from metaopt.checks import ConfigError, check_choice, check_float, check_int, check_keys
from metaopt.rundir import atomic_write
from metaopt.tasks.base import default_models

Config = dict[str, dict[str, Any]]
SECTIONS = ("task", "model", "inner", "outer", "train")
PRECISIONS = ("fp32", "bf16", "fp16", "tf32")


@dataclass(frozen=True)
class Field:
    """One config key: its type(s), default and simple bounds."""

    kind: str  # "int", "float", "bool", "str", "list[int]", "any"
    default: Any
    nullable: bool = False
    min: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""


# Defaults: the sinusoid regression protocol of Finn et al. (2017) with a short schedule.
SCHEMA: dict[str, dict[str, Field]] = {
    "task": {
        "name": Field("str", "sinusoid", help="task distribution: sinusoid | omniglot | any metaopt.tasks.register name"),
        "shots": Field("int", 10, min=1, help="support examples per class (per task for sinusoid)"),
        "queries": Field("int", 10, min=1, help="query examples per class (per task for sinusoid)"),
        "ways": Field("int", None, nullable=True, min=1, help="classes per task (omniglot)"),
        "root": Field("str", None, nullable=True,
                      help="data folder (omniglot; ignored by tasks without data); null: $METAOPT_OMNIGLOT"),
    },
    "model": {
        "name": Field("str", "auto", help="auto: the task's default (mlp for sinusoid, conv4 for omniglot)"),
        "hidden_sizes": Field("list[int]", [40, 40], help="MLP hidden widths"),
        "filters": Field("int", 64, min=1, help="Conv4 channels per block"),
    },
    "inner": {
        "name": Field("str", "sgd", help="inner optimizer, see metaopt.optim.names()"),
        "lr": Field("float", 0.01, nullable=True, min=0.0, help="inner learning rate (null: the optimizer's own default)"),
        "steps": Field("int", 1, min=0, help="inner steps during meta-training"),
        "eval_steps": Field("int", None, nullable=True, min=0, help="inner steps at validation/test (null: steps)"),
        "first_order": Field("bool", False, help="first-order MAML"),
        "learn_lr": Field("bool|str", False,
                          help="meta-learn the inner lr, starting at inner.lr: false | true/scalar (one rate) | "
                               "per_layer (one per parameter tensor) | per_element (Meta-SGD)"),
    },
    "outer": {
        "name": Field("str", "adam", choices=("adam", "adamw", "sgd", "adafactor"),
                      help="meta-optimizer"),
        "lr": Field("float", 1e-3, nullable=True, min=0.0,
                    help="outer learning rate; null only for transformers' Adafactor (relative step)"),
        "impl": Field("str", "torch", choices=("torch", "transformers"),
                      help="adafactor implementation: torch.optim.Adafactor or transformers'"),
        "hparams_lr": Field("float", None, nullable=True, min=0.0,
                            help="outer lr of the meta-learned inner hyperparameters (inner.learn_lr's rates; "
                                 "null: outer.lr)"),
    },
    "train": {
        "iterations": Field("int", 5000, min=1, help="meta-iterations (paper: 70000 sinusoid, 60000 omniglot)"),
        "meta_batch_size": Field("int", 25, min=1, help="tasks per meta-iteration"),
        "seed": Field("int", 0, help="seed of the model init and of the training tasks (held-out tasks are fixed)"),
        "eval_every": Field("int", 500, min=0, help="validate every N iterations (0: never)"),
        "eval_tasks": Field("int", 100, min=1, help="held-out tasks per validation"),
        "test_tasks": Field("int", 600, min=1, help="tasks in the final test (mean and 95% CI)"),
        "eval_batch_size": Field("int", 100, min=1, help="tasks adapted at once during evaluation"),
        "checkpoint_every": Field("int", 500, min=0, help="checkpoint every N iterations (0: only at the end)"),
        "log_every": Field("int", 10, min=1, help="metrics.csv / TensorBoard row every N iterations"),
        "grad_clip": Field("float", None, nullable=True, min=0.0, help="clip the meta-gradient norm (null: off)"),
        "device": Field("str", "auto", choices=("auto", "cpu", "cuda"), help="where to train"),
        "tensorboard": Field("bool", True, help="write TensorBoard event files"),
        "plots": Field("bool", True, help="write plots/*.png at the end"),
        "progress": Field("bool", True, help="show a tqdm progress bar"),
        "precision": Field("str", "fp32", choices=PRECISIONS,
                           help="meta-step/evaluation arithmetic: fp32 | bf16 | fp16 (autocast) | tf32 (CUDA matmuls)"),
        "threads": Field("int", None, nullable=True, min=1,
                         help="CPU threads (null: 1 for models under 100k parameters, else torch's default "
                              "capped by the idle cores)"),
    },
}

# Keys of inner/outer that are not optimizer constructor arguments.
_INNER_OWN = set(SCHEMA["inner"])
_OUTER_OWN = set(SCHEMA["outer"])
# Task keys that a task without data files may ignore (shared overrides set them for all runs).
_TASK_IGNORABLE = {"root"}


def defaults() -> Config:
    """The default config (a fresh deep copy)."""
    return {s: {k: copy.deepcopy(f.default) for k, f in fields.items()} for s, fields in SCHEMA.items()}


# ----------------------------------------------------------------------------- reading


def read_yaml(path: str | Path, *, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, following ``base:`` includes (deep merge; lists are replaced).

    Raises:
        ConfigError: missing file, YAML syntax error, not a mapping, or an include cycle.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"config include cycle: {' -> '.join(str(p) for p in (*_seen, resolved))}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {path}: {' '.join(str(e).split())}") from None
    if data is None:
        raise ConfigError(f"{path} is empty; a config needs at least one section ({', '.join(SECTIONS)}) or "
                          "'base: other.yaml' (run 'metaopt config' to see the defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path, got {type(base).__name__}")
    parent = read_yaml(path.parent / base, _seen=(*_seen, resolved))
    return merge(parent, data)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (mappings merge, anything else replaces)."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str, flag: str = "--set") -> tuple[list[str], Any]:
    """``"inner.lr=0.05"`` -> ``(["inner", "lr"], 0.05)``; the value is read as YAML.
    ``flag`` is the option named in the error."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key):
        raise ConfigError(f"{flag} expects section.key=value (e.g. inner.lr=0.05), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``--set`` items (see :func:`parse_override`) to a raw config mapping."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:-1])} is not a section")
        node[keys[-1]] = value
    return out


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (or start from the defaults), apply ``--set`` overrides, validate.

    Example:
        >>> cfg = load(None, ["train.iterations=20"])
        >>> cfg["train"]["iterations"]
        20
    """
    data = read_yaml(path) if path is not None else {}
    return resolve(apply_overrides(data, overrides))


# ----------------------------------------------------------------------------- checking


def _check_value(key: str, f: Field, v: Any) -> Any:
    """``v`` converted to ``f.kind`` (int-valued floats to int, numeric strings to float) and
    checked against its bounds, else a one-line ``ConfigError`` in torch.optim's style."""
    if v is None:
        if f.nullable:
            return None
        raise ConfigError(f"{key} should not be null (expected {f.kind}) but is: None")
    if f.kind == "int":
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        v = check_int(key, v, least=None if f.min is None else int(f.min), error=ConfigError)
    elif f.kind == "float":
        if isinstance(v, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", v):
            v = float(v)
        v = check_float(key, v, least=f.min, error=ConfigError)
    elif f.kind in ("bool", "str") and not isinstance(v, bool if f.kind == "bool" else str):
        raise ConfigError(f"{key} should be a {f.kind} but is: {v!r}")
    elif f.kind == "list[int]":
        if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
            raise ConfigError(f"{key} should be a non-empty list of ints >= 1 but is: {v!r}")
    if f.choices is not None:
        check_choice(key, v, f.choices, error=ConfigError)
    return v


def resolve(data: Mapping[str, Any]) -> Config:
    """Merge ``data`` over the defaults and check every key; return the resolved config.

    Raises:
        ConfigError: unknown section or key, wrong type, value out of range, unknown
            optimizer, or an optimizer argument its constructor does not take.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    for section, body in data.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown config section {section!r}; known sections: {', '.join(SECTIONS)}")
        if body is not None and not isinstance(body, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping, got {type(body).__name__}")
    cfg = merge(defaults(), {s: dict(b or {}) for s, b in data.items()})
    for section, fields in SCHEMA.items():
        extra_ok = section != "train"  # constructor arguments, checked against the constructor below
        for key in list(cfg[section]):
            name = f"{section}.{key}"
            if key in fields:
                cfg[section][key] = _check_value(name, fields[key], cfg[section][key])
            elif not extra_ok:
                raise ConfigError(
                    f"unknown config key {name!r}; known keys of {section!r}: {', '.join(fields)}"
                )
    _check_task(cfg, set(data.get("task") or {}))
    _check_inner(cfg["inner"])
    _check_outer(cfg["outer"])
    return cfg


def _check_task(cfg: Config, given: set[str]) -> None:
    """The task's and model's constructor arguments; fills ``model.name: auto`` and
    ``inner.eval_steps: null``.

    Keys of the ``task`` section besides ``name`` go to the task's constructor
    (``metaopt.tasks.get``); a key the constructor does not take must be null (``root``
    may be set: a task without data files ignores it), and a default one (``shots``,
    ``queries``) becomes null. The model must be one the task
    declares (its ``models`` attribute; the first is ``auto``).
    """
    task, model = cfg["task"], cfg["model"]
    name = task["name"]
    try:
        factory = tasks_mod.factory(name)
    except ValueError:
        raise ConfigError(
            f"task.name should be one of {', '.join(tasks_mod.names())} (or a name registered "
            f"with metaopt.tasks.register) but is: {name!r}"
        ) from None
    accepted = accepted_kwargs(factory)
    if accepted is not None:
        for key in task:
            if key == "name" or key in accepted:
                continue
            if key in SCHEMA["task"] and (task[key] is None or key in _TASK_IGNORABLE):
                continue
            if key in SCHEMA["task"] and key not in given:  # a default this task does not take
                task[key] = None
                continue
            keys = sorted(accepted - {"split", "device"})
            raise ConfigError(f"config key 'task.{key}' is not used by task {name!r} (set it to null); "
                              f"its keys: {', '.join(keys)}")
    fits = default_models(factory)
    if model["name"] == "auto":
        model["name"] = fits[0]
    if hasattr(factory, "models") and model["name"] not in fits:
        raise ConfigError(f"config key 'model.name': task {name!r} needs model {' or '.join(map(repr, fits))}, "
                          f"got {model['name']!r}")
    try:
        build_model = model_factory(model["name"])
    except ConfigError:
        raise ConfigError(f"model.name should be one of auto, {', '.join(model_names())} "
                          f"but is: {model['name']!r}") from None
    _check_extra("model", model, set(SCHEMA["model"]), build_model, f"model {model['name']!r}")
    if cfg["inner"]["eval_steps"] is None:
        cfg["inner"]["eval_steps"] = cfg["inner"]["steps"]


def _check_extra(section: str, cfg: dict[str, Any], own: set[str], factory: Callable[..., Any], what: str) -> None:
    """Every key of ``cfg`` is one of the section's own keys or an argument of ``factory``
    (not checked when it takes ``**kwargs``; its constructor then rejects what it must)."""
    accepted = accepted_kwargs(factory)
    if accepted is not None:
        allowed = own | (accepted - {"params"})
        check_keys(section, list(cfg), sorted(allowed), what, error=ConfigError)


def _check_inner(inner: dict[str, Any]) -> None:
    name = inner["name"]
    if name.lower() not in optim.names():
        raise ConfigError(f"config key 'inner.name': unknown inner optimizer {name!r}; known: {', '.join(optim.names())}")
    factory = optim.factory(name)
    _check_extra("inner", inner, _INNER_OWN, factory, f"inner optimizer {name!r}")
    inner["learn_lr"] = learn_lr_mode(inner["learn_lr"]) or False  # true -> "scalar": one spelling each
    if inner["learn_lr"] and inner["lr"] is None:
        raise ConfigError("config key 'inner.learn_lr' needs an explicit inner.lr to start from")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in inner.items() if k not in _INNER_OWN}
    if inner["lr"] is not None:
        kwargs["lr"] = inner["lr"]
    try:  # the constructor validates the hyperparameters (negative momentum, ...)
        optim.get(name, **kwargs)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise ConfigError(f"config section 'inner' ({name}): {e}") from None
    mode = inner["learn_lr"]
    if mode in ("per_layer", "per_element"):  # the rates' form, on a stand-in (2, 3) weight
        rate = torch.full(() if mode == "per_layer" else (2, 3), float(inner["lr"]))
        try:
            optim.get(name, **{**kwargs, "lr": {"weight": rate}})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"inner.learn_lr: {mode} does not fit inner optimizer {name!r}: {e}") from None


def _check_outer(outer: dict[str, Any]) -> None:
    try:
        factory = outer_mod.optimizer_class(outer["name"], outer["impl"])
    except ValueError as e:
        raise ConfigError(f"config section 'outer': {e}") from None
    _check_extra("outer", outer, _OUTER_OWN, factory, f"outer optimizer {outer['name']!r} ({outer['impl']})")
    if outer["lr"] is None and not (outer["name"] == "adafactor" and outer["impl"] == "transformers"):
        raise ConfigError(
            "config key 'outer.lr': must not be null (only transformers' Adafactor has a relative-step mode "
            "without a learning rate)"
        )
    if outer["hparams_lr"] is not None and outer["lr"] is None:
        raise ConfigError("config key 'outer.hparams_lr' needs an outer lr: transformers' Adafactor in "
                          "relative-step mode (outer.lr null) has no lr to set per group")
    try:  # the constructor validates the hyperparameters (betas, eps, weight_decay, ...)
        outer_mod.build_outer_optimizer(outer_optimizer_args(outer), [torch.nn.Parameter(torch.zeros(2, 2))])
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise ConfigError(f"config section 'outer' ({outer['name']}, {outer['impl']}): {e}") from None


# ----------------------------------------------------------------------------- writing


def dump(cfg: Mapping[str, Any]) -> str:
    """YAML text of a config, sections in the canonical order."""
    ordered = {s: dict(cfg[s]) for s in SECTIONS if s in cfg}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None)


def save(cfg: Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved config as YAML (atomically, :func:`metaopt.rundir.atomic_write`)."""
    atomic_write(path, dump(cfg))


def describe() -> str:
    """A plain-text table of every key, its default and meaning (for ``--help``)."""
    lines = []
    for section, fields in SCHEMA.items():
        lines.append(f"{section}:")
        for key, f in fields.items():
            lines.append(f"  {key:<17} {f.kind:<9} default {f.default!r:<12} {f.help}")
    return "\n".join(lines)


__all__ = [
    "Config",
    "ConfigError",
    "SCHEMA",
    "SECTIONS",
    "apply_overrides",
    "defaults",
    "dump",
    "load",
    "merge",
    "parse_override",
    "read_yaml",
    "resolve",
    "save",
]
