"""Meta-training: the loop, evaluation with confidence intervals, checkpoints and logs.

From Python::

    from metaopt.train import Trainer, train
    results = train("configs/sinusoid.yaml", "runs/sine", overrides=["train.iterations=500"])
    # or: Trainer(config, out_dir).fit()
    # or, with your own data: Trainer(config, data=my_loader, model=my_model).fit()

One meta-iteration samples ``train.meta_batch_size`` tasks, adapts to each support set
with the inner optimizer, backpropagates the mean query loss and takes one outer step.

The pieces are small functions so that a distributed version can reuse them unchanged:
:func:`sample_batch` (sampling; a rank would take its slice with ``TaskBatch.split``),
:func:`meta_step` (forward, backward, outer step; the place to all-reduce gradients),
:func:`evaluate` (mean and 95% CI over tasks), and the I/O helpers
(:func:`save_checkpoint`, :func:`load_checkpoint`, :class:`RunLogger`), which only rank 0
calls. Under ``torchrun`` the trainer shards each meta-batch across processes: see
:mod:`metaopt.distributed`.

Run directory (``out_dir``): ``config.yaml`` (resolved), ``metrics.csv``,
``checkpoints/last.pt``, ``results.json``, ``plots/*.png`` and TensorBoard event files.
With ``out_dir=None`` nothing is written (training in memory).

Reproducibility: every random draw comes from explicit generators: model initialisation
from ``train.seed`` (inside :func:`torch.random.fork_rng`, so the caller's global RNG is
untouched), training tasks from a ``torch.Generator`` seeded with ``train.seed`` whose state
is checkpointed; validation and test tasks from fixed seeds that do not depend on
``train.seed`` (so runs with different seeds are tested on the same tasks). On CPU a run
resumed from a checkpoint equals the uninterrupted run bit for bit.

Several runs compared (inner optimizers over seeds) and the paper's settings reproduced:
:mod:`metaopt.compare`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt import config as config_mod
from metaopt.config import Config, ConfigError
from metaopt.tasks.base import TaskBatch, as_task_batch

CHECKPOINT_FORMAT = "metaopt-checkpoint"
CHECKPOINT_VERSION = 1
VAL_SEED = 20170309  # fixed seeds of the held-out tasks, independent of train.seed
TEST_SEED = 1234
PLOT_SEED = 7

#: Keys that may differ when resuming (they do not change the computation).
RESUMABLE_KEYS = frozenset(
    f"train.{k}"
    for k in (
        "iterations", "checkpoint_every", "eval_every", "eval_tasks", "test_tasks", "eval_batch_size",
        "log_every", "device", "tensorboard", "plots", "progress",
    )
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the run."""


class NonFiniteLossError(RuntimeError):
    """The meta-loss became NaN or infinite; ``iteration`` is the 1-based meta-iteration."""

    def __init__(self, iteration: int, value: float, checkpoint: Path | None) -> None:
        kept = (
            f"; the last good checkpoint is kept at {checkpoint}" if checkpoint is not None and checkpoint.exists()
            else ""
        )
        super().__init__(
            f"non-finite meta-loss ({value}) at iteration {iteration}; training stopped{kept}. "
            "Try a smaller inner.lr or outer.lr, or train.grad_clip"
        )
        self.iteration = iteration


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; a checkpoint of the last finished iteration was written."""

    def __init__(self, iteration: int, checkpoint: Path | None) -> None:
        where = f"; checkpoint saved to {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"interrupted after iteration {iteration}{where}")
        self.iteration = iteration
        self.checkpoint = checkpoint


# ============================================================================ building


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


def omniglot_root(root: str | None) -> str | None:
    """``task.root``, else ``$METAOPT_OMNIGLOT``, else ``../shared/data/omniglot`` beside the
    checkout, else ``None`` (the Omniglot class's own default, the cache folder)."""
    if root:
        return os.path.expanduser(root)
    env = os.environ.get("METAOPT_OMNIGLOT")
    if env:
        return env
    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
    return str(beside) if beside.is_dir() else None


def build_tasks(cfg: Config, split: str, device: torch.device) -> Any:
    """The task distribution of ``cfg["task"]`` for ``split`` ("train", "val" or "test")."""
    import metaopt.tasks as tasks_mod

    task = cfg["task"]
    try:
        if task["name"] == "sinusoid":
            return tasks_mod.get("sinusoid", shots=task["shots"], queries=task["queries"], device=device)
        return tasks_mod.get(
            "omniglot", root=omniglot_root(task["root"]), ways=task["ways"], shots=task["shots"],
            queries=task["queries"], split=split, device=device,
        )
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"task {task['name']!r} (split {split!r}): {e}") from None


def build_model(cfg: Config) -> nn.Module:
    """MLP (1 -> hidden_sizes -> 1) for sinusoid, Conv4(ways, hidden=filters) for Omniglot,
    initialised from ``train.seed`` without touching the global RNG."""
    from metaopt.models import MLP, Conv4

    m = cfg["model"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["train"]["seed"])
        if m["name"] == "mlp":
            return MLP(1, tuple(m["hidden_sizes"]), 1)
        return Conv4(cfg["task"]["ways"], 1, m["filters"])


def build_inner(cfg: Config) -> Any:
    """The inner optimizer of ``cfg["inner"]``; with ``learn_lr`` its lr is an ``nn.Parameter``
    (which :class:`metaopt.MAML` registers, so the outer optimizer trains it)."""
    from metaopt import optim

    inner = dict(cfg["inner"])
    name = inner.pop("name")
    learn = inner.pop("learn_lr")
    for key in ("steps", "eval_steps", "first_order"):
        inner.pop(key)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in inner.items()}
    if kwargs.get("lr") is None:
        kwargs.pop("lr", None)
        if learn:
            raise ConfigError("config key 'inner.learn_lr' needs an explicit inner.lr to start from")
    elif learn:
        kwargs["lr"] = nn.Parameter(torch.tensor(float(kwargs["lr"])))
    try:
        return optim.get(name, **kwargs)
    except ValueError as e:
        raise ConfigError(f"config section 'inner': {e}") from None


def build_maml(cfg: Config, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> nn.Module:
    from metaopt.maml import MAML

    inner = cfg["inner"]
    return MAML(
        model, build_inner(cfg), inner["steps"], inner["first_order"], loss_fn,
        eval_inner_steps=inner["eval_steps"],
    )


def build_outer(cfg: Config, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    from metaopt.outer import build_outer_optimizer

    try:
        return build_outer_optimizer(cfg["outer"], params)
    except ValueError as e:
        raise ConfigError(f"config section 'outer': {e}") from None


# ============================================================================ the loop pieces


@dataclass
class StepStats:
    """What one meta-iteration reports (Python floats; NaN where not measured)."""

    meta_loss: float
    loss_before: float = math.nan
    accuracy: float = math.nan
    accuracy_before: float = math.nan


@dataclass
class EvalResult:
    """Evaluation over ``tasks`` held-out tasks: per-task values -> mean and 95% CI.

    ``metric`` is ``"mse"`` (regression; lower is better) or ``"accuracy"`` (fraction
    correct). ``ci95 = 1.96 * std / sqrt(tasks)`` with the population std, as in MAML's code.
    """

    metric: str
    mean: float
    ci95: float
    std: float
    tasks: int
    inner_steps: int
    before_mean: float
    before_ci95: float
    loss_mean: float
    split: str = "val"
    values: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        if self.metric == "accuracy":
            return (f"{self.split} accuracy {100 * self.mean:.2f}% ± {100 * self.ci95:.2f}% "
                    f"({self.tasks} tasks, {self.inner_steps} inner steps; before adaptation "
                    f"{100 * self.before_mean:.2f}%)")
        return (f"{self.split} MSE {self.mean:.4f} ± {self.ci95:.4f} ({self.tasks} tasks, "
                f"{self.inner_steps} inner steps; before adaptation {self.before_mean:.4f})")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("values")
        d["before"] = {"mean": d.pop("before_mean"), "ci95": d.pop("before_ci95")}
        d["query_loss"] = d.pop("loss_mean")
        return d


def mean_ci95(values: Tensor) -> tuple[float, float, float]:
    """(mean, 1.96 * std / sqrt(n), std) of a 1-D tensor (population std, as MAML's code)."""
    v = values.detach().double().cpu()
    n = v.numel()
    std = float(v.std(unbiased=False)) if n > 1 else 0.0
    return float(v.mean()), 1.96 * std / math.sqrt(n), std


def sample_batch(source: Any, n: int, generator: torch.Generator, device: torch.device) -> TaskBatch:
    """``n`` tasks from a task distribution, on ``device``."""
    return source.sample(n, generator).to(device)


def meta_step(
    maml: nn.Module,
    outer: torch.optim.Optimizer,
    batch: TaskBatch,
    *,
    grad_clip: float | None = None,
    stats: bool = True,
    iteration: int = 0,
    checkpoint: Path | None = None,
    sync: Any = None,
) -> StepStats:
    """One meta-iteration: adapt to every task, mean query loss, backward, outer step.

    ``sync``: a :class:`metaopt.distributed.DistributedContext` when ``batch`` is this rank's
    shard; the loss/stats become means over all ranks' tasks and the gradients are
    all-reduced (weighted by tasks) before clipping and the outer step.

    Raises:
        NonFiniteLossError: the meta-loss is NaN/inf (checked before the outer step, so the
            parameters stay finite).
    """
    outer.zero_grad(set_to_none=True)
    # backward=True: the engine backpropagates task by task, so only one task's graph is
    # alive at a time (Conv4 O1 on CPU: ~1.9 GB -> one task's worth); same meta-gradient.
    out = maml.meta_loss(batch, train=True, before=stats, backward=True)
    parts = [out.loss] + ([out.query_loss_before, out.accuracy, out.accuracy_before] if stats else [])
    means: list[Any] = [math.nan if t is None else t.detach().mean() for t in parts]
    if sync is not None:
        # One all-reduce: .grad := gradient of the mean over all ranks' tasks, and the means
        # over all ranks' tasks (so every rank stops together on a non-finite loss).
        means = sync.all_reduce_grads(maml.parameters(), int(out.query_loss.shape[0]), means=means)
    values = _host_floats(means)  # the one host sync of the step
    if not math.isfinite(values[0]):
        raise NonFiniteLossError(iteration, values[0], checkpoint)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in maml.parameters() if p.grad is not None], grad_clip)
    outer.step()
    return StepStats(*values)


def _host_floats(values: Sequence[Tensor | float]) -> list[float]:
    """Python floats of 0-dim tensors (all on one device) and floats, with one device-to-host
    copy for all the tensors instead of one sync each."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    host = iter(torch.stack([t.to(torch.float64) for t in tensors]).tolist() if tensors else [])
    return [next(host) if isinstance(v, Tensor) else float(v) for v in values]


def task_chunks(source: Any, n: int, chunk: int, seed: int, device: torch.device) -> Iterator[TaskBatch]:
    """``n`` held-out tasks in chunks of ``chunk``, from a generator seeded with ``seed``
    (the same tasks at every call). Sinusoid uses its fixed ``eval_set``."""
    if hasattr(source, "eval_set"):  # Sinusoid: a fixed evaluation set drawn on the CPU
        full = source.eval_set(n, seed, device=device)
        for i in range(0, n, chunk):
            yield full.split(i, min(n, i + chunk))
        return
    dev = getattr(getattr(source, "images", None), "device", torch.device("cpu"))
    g = torch.Generator(device=dev).manual_seed(seed)
    done = 0
    while done < n:
        k = min(chunk, n - done)
        yield sample_batch(source, k, g, device)
        done += k


def evaluate(maml: nn.Module, batches: Iterable[Any], *, split: str = "val", device: torch.device | None = None) -> EvalResult:
    """Adapt to each held-out task (``eval_inner_steps``, no meta-graph) and aggregate.

    Args:
        maml: the :class:`metaopt.MAML` engine.
        batches: TaskBatches or torchmeta-style dicts (e.g. :func:`task_chunks`, a DataLoader).
        split: label for reports.
    """
    after, before, losses = [], [], []
    classify: bool | None = None
    for raw in batches:
        b = as_task_batch(raw)
        if device is not None:
            b = b.to(device)
        out = maml.meta_loss(b, train=False, before=True)
        classify = out.accuracy is not None
        after.append(out.accuracy if classify else out.query_loss)
        before.append(out.accuracy_before if classify else out.query_loss_before)
        losses.append(out.query_loss)
    if not after:
        raise ValueError(f"no {split} tasks to evaluate (empty data)")
    a, b0, lo = torch.cat(after), torch.cat(before), torch.cat(losses)
    mean, ci, std = mean_ci95(a)
    bm, bci, _ = mean_ci95(b0)
    return EvalResult(
        metric="accuracy" if classify else "mse", mean=mean, ci95=ci, std=std, tasks=a.numel(),
        inner_steps=int(getattr(maml, "eval_inner_steps", 0)), before_mean=bm, before_ci95=bci,
        loss_mean=float(lo.double().mean()), split=split, values=a.double().cpu().tolist(),
    )


# ============================================================================ I/O


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temp file in the same folder,
    flushed and fsynced, then ``os.replace``. A failed write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing file, or one that is corrupt / not a metaopt checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means an unusable file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a metaopt checkpoint ({type(e).__name__}: {first[:200]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a metaopt checkpoint (no 'format: {CHECKPOINT_FORMAT}' entry)")
    missing = [k for k in ("model", "iteration", "outer", "rng", "config") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return state


METRIC_COLUMNS = ["iteration", "meta_loss", "loss_before", "accuracy", "accuracy_before",
                  "val_metric", "val_ci95", "val_before", "elapsed_s"]


class RunLogger:
    """``metrics.csv`` (one row per logged iteration) and TensorBoard scalars.

    On resume, rows after the checkpoint's iteration are dropped (they belong to the
    interrupted tail), so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, extra_columns: Sequence[str] = (), *, tensorboard: bool = True,
                 resume_from: int | None = None) -> None:
        self.path = run_dir / "metrics.csv"
        self.columns = METRIC_COLUMNS + list(extra_columns)
        kept: list[dict[str, str]] = []
        if resume_from is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("iteration") and int(r["iteration"]) <= resume_from]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, self.columns, extrasaction="ignore")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(run_dir), purge_step=(resume_from + 1) if resume_from else None)

    def log(self, row: Mapping[str, Any]) -> None:
        self._csv.writerow({k: _fmt(v) for k, v in row.items()})
        self._file.flush()
        if self._tb is not None:
            it = int(row["iteration"])
            for k, v in row.items():
                if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(_tb_name(k), v, it)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def _tb_name(k: str) -> str:
    if k.startswith("val_"):
        return f"val/{k[4:]}"
    if k.startswith("hp_"):
        return f"inner/{k[3:]}"
    return f"train/{k}"


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


class _SigintGuard:
    """Turn the first Ctrl-C into a flag checked between iterations (a second one raises)."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> "_SigintGuard":
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ============================================================================ the trainer


class Trainer:
    """Meta-train a MAML model from a config; write a run directory.

    Args:
        config: a path to a YAML file, a (partial) config mapping, or ``None`` for the
            defaults; see :mod:`metaopt.config`.
        out_dir: the run directory; ``None`` writes nothing.
        overrides: ``--set`` items, e.g. ``["train.iterations=100"]``.
        device: overrides ``train.device`` (``"cpu"``, ``"cuda"``, ``"auto"``).
        data: instead of the config's task distribution, any iterable of batches
            (``TaskBatch`` or torchmeta-style ``{"train": (x, y), "test": (x, y)}``,
            task dimension first), e.g. your own DataLoader; it is cycled when exhausted.
            Each batch is one meta-iteration (``train.meta_batch_size`` is not used).
        val_data, test_data: finite iterables of batches for validation and the final
            test when ``data`` is given (none: that evaluation is skipped).
        model: use this ``nn.Module`` instead of the config's model.
        loss_fn: the task loss (default: MSE for sinusoid / float targets, cross-entropy
            for Omniglot / integer targets).
        resume: continue from ``out_dir/checkpoints/last.pt``.
        distributed: ``True`` (default): when started by ``torchrun`` (``WORLD_SIZE > 1``)
            or inside an initialised process group, shard each meta-batch across the ranks
            (see :mod:`metaopt.distributed`); ``False``: always one process.

    Example:
        >>> from metaopt.train import Trainer
        >>> t = Trainer({"train": {"iterations": 2, "eval_every": 0, "test_tasks": 4,
        ...                        "progress": False}})
        >>> t.fit()["metric"]
        'mse'
    """

    def __init__(
        self,
        config: str | Path | Mapping[str, Any] | None = None,
        out_dir: str | Path | None = None,
        *,
        overrides: Sequence[str] = (),
        device: str | torch.device | None = None,
        data: Iterable[Any] | None = None,
        val_data: Iterable[Any] | None = None,
        test_data: Iterable[Any] | None = None,
        model: nn.Module | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        resume: bool = False,
        distributed: bool = True,
    ) -> None:
        self.cfg = _resolve_config(config, overrides)
        if device is not None:
            self.cfg["train"]["device"] = str(device)
        self.device = resolve_device(self.cfg["train"]["device"])
        self.run_dir = Path(out_dir) if out_dir is not None else None
        self.dist: Any = None  # a metaopt.distributed.DistributedContext under torchrun
        if distributed:
            from metaopt import distributed as dist_mod

            self.dist = dist_mod.setup(self.cfg, self.device, run_dir=self.run_dir,
                                       meta_batch_size=self.cfg["train"]["meta_batch_size"] if data is None else None)
            if self.dist is not None:
                self.device = self.dist.device  # cuda:LOCAL_RANK on GPUs
        self.data, self.val_data, self.test_data = data, val_data, test_data
        tcfg = self.cfg["task"]
        if data is None:
            self.train_tasks = build_tasks(self.cfg, "train", self.device)
            self.classification = tcfg["name"] != "sinusoid"
        else:
            self.train_tasks = None
            self.classification = None  # decided from the first batch's targets
        self.model = (model if model is not None else build_model(self.cfg)).to(self.device)
        self._loss_fn = loss_fn
        self.maml = build_maml(self.cfg, self.model, self._task_loss).to(self.device)
        if self.dist is not None:
            self.dist.broadcast_parameters(self.maml)  # every rank starts from rank 0's weights
        self.outer = build_outer(self.cfg, self.maml.parameters())
        gen_device = getattr(getattr(self.train_tasks, "images", None), "device", torch.device("cpu"))
        self.generator = torch.Generator(device=gen_device).manual_seed(self.cfg["train"]["seed"])
        self.iteration = 0
        self.data_batches = 0  # batches consumed from `data` (for resuming)
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self._val_source: Any = None
        if resume:
            if self.run_dir is None:
                raise ConfigError("resume needs a run directory")
            self.load_state_dict(load_checkpoint(self.checkpoint_path, self.device))

    # ------------------------------------------------------------------ helpers

    @property
    def is_main(self) -> bool:
        """True in a single process and on rank 0 (the only rank that writes files)."""
        return self.dist is None or self.dist.is_main

    def _task_loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self._loss_fn is not None:
            return self._loss_fn(out, y)
        if torch.is_floating_point(y):
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoints" / "last.pt" if self.run_dir is not None else None

    @property
    def metric(self) -> str:
        return "accuracy" if self.classification else "mse"

    def _hparam_columns(self) -> list[str]:
        return [f"hp_{k}" for k in getattr(self.maml, "inner_hparams", {}).keys()]

    def _hparam_values(self) -> dict[str, float]:
        return {f"hp_{k}": float(p.detach().float().mean()) for k, p in getattr(self.maml, "inner_hparams", {}).items()}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, learnable inner hyperparameters,
        outer-optimizer state, RNG states, the iteration and the resolved config."""
        maml_extra = {k: v for k, v in self.maml.state_dict().items() if not k.startswith("model.")}
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "inner_hparams": maml_extra,
            "outer": self.outer.state_dict(),
            "rng": {
                "tasks": self.generator.get_state(),
                "torch_cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "data_batches": self.data_batches,
            "elapsed": self.elapsed,
            "config": config_mod.dump(self.cfg),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            extra = state.get("inner_hparams", {})
            if extra:
                full = {**{f"model.{k}": v for k, v in state["model"].items()}, **extra}
                self.maml.load_state_dict(full)
            self.outer.load_state_dict(state["outer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint does not match this run's model/optimizer: {str(e).splitlines()[0]}") from None
        rng = state["rng"]
        self.generator.set_state(rng["tasks"].cpu())  # generator states are CPU byte tensors
        torch.set_rng_state(rng["torch_cpu"].cpu())
        if rng.get("cuda") and torch.cuda.is_available():
            with contextlib.suppress(RuntimeError):
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.iteration = int(state["iteration"])
        self.data_batches = int(state.get("data_batches", 0))
        self.elapsed = float(state.get("elapsed", 0.0))

    def save(self) -> Path | None:
        """Write ``checkpoints/last.pt`` (atomically); no-op without a run directory and
        on ranks other than 0."""
        if self.checkpoint_path is None or not self.is_main:
            return None
        return save_checkpoint(self.state_dict(), self.checkpoint_path)

    # ------------------------------------------------------------------ batches

    def _batches(self) -> Iterator[TaskBatch]:
        """Training batches forever: from the task distribution, or cycling ``data``."""
        if self.data is None:
            n = self.cfg["train"]["meta_batch_size"]
            while True:
                batch = sample_batch(self.train_tasks, n, self.generator, self.device)
                # Distributed: every rank draws the full meta-batch and keeps its slice.
                yield self.dist.shard_batch(batch) if self.dist is not None else batch
        skip = self.data_batches
        while True:
            seen = 0
            for raw in self.data:
                if skip:
                    skip -= 1
                    continue
                seen += 1
                batch = as_task_batch(raw).to(self.device)
                yield self.dist.shard_batch(batch) if self.dist is not None else batch
            if seen == 0 and skip == 0:
                raise ValueError("the training data yielded no batches")

    def _eval_batches(self, split: str, n: int | None = None) -> Iterable[Any] | None:
        t = self.cfg["train"]
        if self.data is not None:
            return self.val_data if split == "val" else self.test_data
        if split == "val":
            if self._val_source is None:
                self._val_source = (
                    self.train_tasks if self.cfg["task"]["name"] == "sinusoid"
                    else build_tasks(self.cfg, "val", self.device)
                )
            return task_chunks(self._val_source, n or t["eval_tasks"], t["eval_batch_size"], VAL_SEED, self.device)
        source = (self.train_tasks if self.cfg["task"]["name"] == "sinusoid"
                  else build_tasks(self.cfg, "test", self.device))
        return task_chunks(source, n or t["test_tasks"], t["eval_batch_size"], TEST_SEED, self.device)

    def evaluate(self, split: str = "test", tasks: int | None = None) -> EvalResult | None:
        """Mean and 95% CI of the post-adaptation metric on ``tasks`` held-out tasks."""
        batches = self._eval_batches(split, tasks)
        if batches is None:
            return None
        if self.dist is not None:  # sharded; per-task metrics gathered from every rank
            return self.dist.evaluate(self.maml, batches, split=split, device=self.device)
        return evaluate(self.maml, batches, split=split, device=self.device)

    # ------------------------------------------------------------------ fit

    def fit(self) -> dict[str, Any]:
        """Train to ``train.iterations``, then test; return the final results (also
        written to ``results.json``).

        Raises:
            NonFiniteLossError: the meta-loss became NaN/inf (last good checkpoint kept).
            TrainingInterrupted: Ctrl-C (a checkpoint of the last finished iteration is written).
        """
        t = self.cfg["train"]
        total = t["iterations"]
        logger = self._open_run()
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(self.iteration, total), disable=not t["progress"] or not self.is_main,
                   desc="meta-train", dynamic_ncols=True, file=sys.stderr)
        batches = self._batches()
        val: EvalResult | None = None
        try:
            if self.iteration == 0 and t["eval_every"] and self._has_val():
                val = self.evaluate("val")
                self._log(logger, {"iteration": 0, **self._val_row(val)})
            with _SigintGuard() as guard:
                while self.iteration < total:
                    started = time.perf_counter()
                    it = self.iteration + 1
                    log_now = it % t["log_every"] == 0 or it == total
                    batch = next(batches)
                    stats = meta_step(self.maml, self.outer, batch, grad_clip=t["grad_clip"], stats=log_now,
                                      iteration=it, checkpoint=self.checkpoint_path, sync=self.dist)
                    if self.classification is None:
                        self.classification = not torch.is_floating_point(batch.query[1])
                    self.iteration = it
                    self.data_batches += self.data is not None
                    row: dict[str, Any] = {}
                    if t["eval_every"] and it % t["eval_every"] == 0 and self._has_val():
                        val = self.evaluate("val")
                        row.update(self._val_row(val))
                    self.elapsed += time.perf_counter() - started
                    if log_now or row:
                        row = {"iteration": it, **asdict(stats), **row, **self._hparam_values(),
                               "elapsed_s": round(self.elapsed, 3)}
                        self._log(logger, row)
                        bar.set_postfix(self._postfix(stats, val), refresh=False)
                    bar.update(1)
                    if t["checkpoint_every"] and it % t["checkpoint_every"] == 0 and it != total:
                        self.save()
                    if self.dist.any(guard.hit) if self.dist is not None else guard.hit:
                        raise TrainingInterrupted(it, self.save())
            bar.close()
            self.save()
            return self._finish(logger)
        finally:
            bar.close()
            if logger is not None:
                logger.close()

    def _has_val(self) -> bool:
        return self.data is None or self.val_data is not None

    def _val_row(self, val: EvalResult) -> dict[str, Any]:
        return {"val_metric": val.mean, "val_ci95": val.ci95, "val_before": val.before_mean}

    def _postfix(self, s: StepStats, val: EvalResult | None) -> dict[str, str]:
        p = {"loss": f"{s.meta_loss:.4g}"}
        if not math.isnan(s.accuracy):
            p["acc"] = f"{100 * s.accuracy:.1f}%"
        if val is not None:
            p[f"val_{val.metric}"] = f"{100 * val.mean:.1f}%" if val.metric == "accuracy" else f"{val.mean:.4g}"
        return p

    def _log(self, logger: RunLogger | None, row: dict[str, Any]) -> None:
        self.history.append(row)
        if logger is not None:
            logger.log(row)

    def _open_run(self) -> RunLogger | None:
        if self.run_dir is None or not self.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.save(self.cfg, self.run_dir / "config.yaml")
        return RunLogger(self.run_dir, self._hparam_columns(), tensorboard=self.cfg["train"]["tensorboard"],
                         resume_from=self.iteration if self.iteration else None)

    def _finish(self, logger: RunLogger | None) -> dict[str, Any]:
        test = self.evaluate("test")
        results: dict[str, Any] = {"iteration": self.iteration, "elapsed_s": round(self.elapsed, 3)}
        if test is not None:
            results = {**test.to_json(), **results}
            if logger is not None and logger._tb is not None:
                logger._tb.add_scalar(f"test/{test.metric}", test.mean, self.iteration)
        else:
            results = {"metric": self.metric, "mean": None, "ci95": None, "tasks": 0, **results}
        if self.run_dir is not None and self.is_main:
            write_json(self.run_dir / "results.json", results)
            if self.cfg["train"]["plots"]:
                self.plot(test)
        return results

    # ------------------------------------------------------------------ plots

    def plot(self, test: EvalResult | None = None) -> list[Path]:
        """``plots/learning_curves.png`` and, for sinusoid, ``plots/sinusoid_fit.png``."""
        from metaopt import plots

        assert self.run_dir is not None
        out = [plots.learning_curves(self.run_dir / "metrics.csv", self.run_dir / "plots" / "learning_curves.png",
                                     title=self._title(test), metric=self.metric)]
        if self.data is None and self.cfg["task"]["name"] == "sinusoid":
            out.append(plots.sinusoid_fits(self.sinusoid_curves(), self.run_dir / "plots" / "sinusoid_fit.png",
                                           title=f"{self._title(None)}: adapted to {self.cfg['task']['shots']} points"))
        return out

    def _title(self, test: EvalResult | None) -> str:
        c = self.cfg
        head = f"{c['task']['name']} | inner {c['inner']['name']} lr {c['inner']['lr']} | iter {self.iteration}"
        return f"{head} | {test.summary()}" if test is not None else head

    def sinusoid_curves(self, tasks: int = 3, points: int = 200) -> list[dict[str, Any]]:
        """True sine, support points and predictions before/after adaptation for a few tasks."""
        src = self.train_tasks
        g = torch.Generator().manual_seed(PLOT_SEED)
        params = src.sample_params(tasks, g)
        batch = src.batch_for(params, g, device=self.device)
        x = torch.linspace(*src.x_range, points, device=self.device)[:, None]  # (points, 1)
        curves = []
        for i in range(tasks):
            adapted = self.maml.adapt(batch.support[0][i], batch.support[1][i], train=False)
            with torch.no_grad():
                after = self.maml.functional_forward(adapted, x)
                before = self.maml.functional_forward(dict(self.model.named_parameters()), x)
            amp, phase = float(params.amplitude[i]), float(params.phase[i])
            curves.append({
                "x": x[:, 0].cpu().tolist(),
                "true": (amp * torch.sin(x[:, 0].cpu() - phase)).tolist(),
                "before": before[:, 0].cpu().tolist(),
                "after": after[:, 0].cpu().tolist(),
                "support_x": batch.support[0][i, :, 0].cpu().tolist(),
                "support_y": batch.support[1][i, :, 0].cpu().tolist(),
                "steps": self.maml.eval_inner_steps,
            })
        return curves


def _resolve_config(config: str | Path | Mapping[str, Any] | None, overrides: Sequence[str]) -> Config:
    if config is None or isinstance(config, (str, Path)):
        return config_mod.load(config, list(overrides))
    return config_mod.resolve(config_mod.apply_overrides(config, list(overrides)))


# ============================================================================ entry points


def train(
    config: str | Path | Mapping[str, Any] | None,
    out_dir: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    device: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train from ``config`` into ``out_dir`` and return the final test results.

    Example:
        >>> res = train(None, overrides=["train.iterations=2", "train.test_tasks=4",
        ...                              "train.eval_every=0", "train.progress=false"])
        >>> sorted(k for k in res if k in ("metric", "mean", "ci95", "tasks"))
        ['ci95', 'mean', 'metric', 'tasks']
    """
    return Trainer(config, out_dir, overrides=overrides, device=device, **kwargs).fit()


def resume(run_dir: str | Path, *, overrides: Sequence[str] = (), device: str | None = None,
           config: str | Path | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from ``checkpoints/last.pt`` to ``train.iterations``.

    ``overrides`` may change only :data:`RESUMABLE_KEYS` (e.g. ``train.iterations=20`` to
    extend the schedule); ``config``, when given, must resolve to the run's config up to those keys.
    """
    return make_resumed_trainer(run_dir, overrides=overrides, device=device, config=config).fit()


def make_resumed_trainer(run_dir: str | Path, *, overrides: Sequence[str] = (), device: str | None = None,
                         config: str | Path | None = None) -> Trainer:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    saved = config_mod.load(cfg_path)
    wanted = config_mod.load(cfg_path, list(overrides))
    if config is not None:
        other = config_mod.load(config, list(overrides))
        _check_same(wanted, other, f"--resume {run_dir} and {config}")
    _check_same(saved, wanted, "--set while resuming")
    ckpt = run_dir / "checkpoints" / "last.pt"
    load_checkpoint(ckpt)  # fail early with a clear message
    return Trainer(wanted, run_dir, device=device, resume=True)


def _check_same(a: Config, b: Config, what: str) -> None:
    for s in a:
        for k in sorted(set(a[s]) | set(b[s])):
            key = f"{s}.{k}"
            if key not in RESUMABLE_KEYS and a[s].get(k) != b[s].get(k):
                raise ConfigError(
                    f"{what}: config key {key!r} differs ({a[s].get(k)!r} vs {b[s].get(k)!r}); only "
                    f"{', '.join(sorted(RESUMABLE_KEYS))} may change when resuming"
                )


def evaluate_run(run_dir: str | Path, *, tasks: int | None = None, split: str = "test",
                 steps: int | None = None, device: str | None = None, write: bool = True) -> dict[str, Any]:
    """Load ``run_dir``'s last checkpoint and evaluate it on ``tasks`` held-out tasks.

    ``steps`` overrides the inner steps (default ``inner.eval_steps``). Writes
    ``results.json`` (test split, default steps), else ``results_<split>[_<N>steps].json``,
    and returns the results.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    trainer = Trainer(cfg_path, run_dir, device=device, resume=True)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"--steps must be an int >= 0, got {steps!r}")
        trainer.maml.eval_inner_steps = steps
    res = trainer.evaluate(split, tasks)
    assert res is not None
    out = {**res.to_json(), "iteration": trainer.iteration}
    if write and trainer.is_main:
        name = "results" if split == "test" and steps is None else f"results_{split}"
        name += f"_{steps}steps" if steps is not None else ""
        write_json(run_dir / f"{name}.json", out)
    return out


# ============================================================================ moved to metaopt.compare

# Comparing inner optimizers and reproducing the paper live in metaopt.compare (which imports
# this module); the old ``from metaopt.train import compare`` paths keep working, loaded on use.
_MOVED_TO_COMPARE = frozenset({
    "PAPER_SETTINGS", "compare", "markdown_table", "parse_inner_specs", "reproduce",
    "reproduction_markdown", "summarize_compare", "write_report", "_fmt_metric", "_inner_config", "_slug",
})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_COMPARE:
        import importlib

        return getattr(importlib.import_module("metaopt.compare"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "EvalResult",
    "NonFiniteLossError",
    "RunLogger",
    "StepStats",
    "Trainer",
    "TrainingInterrupted",
    "evaluate",
    "evaluate_run",
    "load_checkpoint",
    "mean_ci95",
    "meta_step",
    "resume",
    "sample_batch",
    "save_checkpoint",
    "task_chunks",
    "train",
    # re-exported from metaopt.compare (see __getattr__ above)
    "PAPER_SETTINGS",
    "compare",
    "reproduce",
    "reproduction_markdown",
    "write_report",
]
