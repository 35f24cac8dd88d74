"""Meta-training runs: the :class:`Trainer` and the entry points ``train``, ``resume`` and
``evaluate_run``.

From Python::

    from metaopt.train import Trainer, train
    results = train("configs/sinusoid.yaml", "runs/sine", overrides=["train.iterations=500"])
    # or: Trainer(config, out_dir).fit()
    # or, with your own data: Trainer(config, data=my_loader, model=my_model).fit()

One meta-iteration takes the next meta-batch, adapts to each support set with the inner
optimizer, backpropagates the mean query loss and takes one outer step. The pieces live in
one module each, and depend one way: :mod:`metaopt.build` (config -> objects),
:mod:`metaopt.loop` (:func:`~metaopt.loop.meta_step`, :func:`~metaopt.loop.evaluate`, the
batch streams), :mod:`metaopt.rundir` (checkpoints, ``metrics.csv``, atomic writes) and
:mod:`metaopt.distributed` (the collective under ``torchrun``); this module wires them.

Run directory (``out_dir``): ``config.yaml`` (resolved), ``metrics.csv``,
``checkpoints/last.pt``, ``results.json``, ``plots/*.png`` (``plot`` extra) and TensorBoard
event files (``tensorboard`` extra). With ``out_dir=None`` nothing is written.

Reproducibility: every random draw comes from explicit generators: model initialisation
from ``train.seed`` (inside :func:`torch.random.fork_rng`, so the caller's global RNG is
untouched), training tasks from a ``torch.Generator`` seeded with ``train.seed`` whose state
is checkpointed; validation and test tasks from fixed seeds that do not depend on
``train.seed`` (so runs with different seeds are tested on the same tasks). On CPU a run
resumed from a checkpoint equals the uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from metaopt import config as config_mod
from metaopt import distributed as dist_mod
from metaopt.build import (build_maml, build_model, build_outer, build_tasks, has_splits, outer_param_groups,
                           resolve_device)
from metaopt.checks import check_choice, check_int
from metaopt.config import Config, ConfigError
from metaopt.loop import (
    LOCAL, Collective, CycledBatches, EvalResult, NonFiniteLossError, SampledBatches, StepStats, evaluate,
    meta_step,
)
from metaopt.precision import precision_context
from metaopt.stopping import StopGuard, TrainingInterrupted
from metaopt.rundir import (
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, RunDirLocked, RunLogger, atomic_write, load_checkpoint,
    lock_run_dir, remove_stale_temporaries, save_checkpoint, write_json,
)
from metaopt.tasks.base import eval_batches, generator_device, task_loss

__all__ = [
    "RESUMABLE_KEYS",
    "CheckpointError",
    "ConfigError",
    "EvalResult",
    "NonFiniteLossError",
    "RunDirLocked",
    "RunLogger",
    "StepStats",
    "Trainer",
    "TrainingInterrupted",
    "evaluate",
    "evaluate_run",
    "load_checkpoint",
    "make_resumed_trainer",
    "meta_step",
    "resume",
    "save_checkpoint",
    "train",
    "write_json",
]

VAL_SEED = 20170309  # fixed seeds of the held-out tasks, independent of train.seed
TEST_SEED = 1234
PLOT_SEED = 7

#: Keys that may differ when resuming (they do not change the computation).
RESUMABLE_KEYS = frozenset(
    f"train.{k}"
    for k in (
        "iterations", "checkpoint_every", "eval_every", "eval_tasks", "test_tasks", "eval_batch_size",
        "log_every", "device", "tensorboard", "plots", "progress", "threads",
    )
)

#: Models with fewer parameters than this train on one CPU thread by default
#: (``train.threads: null``): their ops are too small to split, and extra threads only add
#: synchronisation (sinusoid MLP on a 2-core machine under load: 11 ms/iteration on one
#: thread, 600 ms on two).
SMALL_MODEL_PARAMS = 100_000
# torch's own default (physical cores, or $OMP_NUM_THREADS), read before any Trainer sets it.
_TORCH_THREADS = torch.get_num_threads()


def _default_threads(model: nn.Module) -> int:
    """``train.threads: null``: 1 for small models (see :data:`SMALL_MODEL_PARAMS`), else
    torch's default capped by the cores not already busy (load average), at least 1: on a
    loaded machine torch's default oversubscribes the cores and runs 20-100x slower."""
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        return 1
    try:
        free = (os.cpu_count() or 1) - round(os.getloadavg()[0])
    except OSError:  # pragma: no cover - no load average on this platform
        free = _TORCH_THREADS
    return max(1, min(_TORCH_THREADS, free))


def _progress(batches: Iterable[Any], desc: str, total: int | None, enabled: bool) -> Iterable[Any]:
    """``batches`` under a transient tqdm bar on stderr (evaluations can take a minute)."""
    if not enabled:
        return batches
    return tqdm(batches, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


def _given(batches: Iterable[Any], n: int | None) -> Iterable[Any]:
    """The user's held-out batches (all of them: ``n`` applies to task distributions)."""
    return batches


def _resolve_config(config: str | Path | Mapping[str, Any] | None, overrides: Sequence[str]) -> Config:
    if config is None or isinstance(config, (str, Path)):
        return config_mod.load(config, list(overrides))
    return config_mod.resolve(config_mod.apply_overrides(config, list(overrides)))


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
        inner: use this inner optimizer instead of the config's ``inner`` section: an object
            with ``init``/``step`` (``metaopt.SGD(...)``, ``MetaSGD.from_model(model, 0.01)``)
            or a function ``model -> inner optimizer`` (for optimizers built per parameter of
            the config's model, e.g. ``lambda m: MetaSGD.from_model(m, 0.01)``). Its learned
            tensors (``nn.Parameter`` attributes) are meta-trained with the weights. The
            config's ``inner.steps``, ``first_order`` and ``eval_steps`` still apply.
        loss_fn: the task loss (default: the task's ``loss``, else MSE for float targets and
            cross-entropy for integer targets).
        resume: continue from ``out_dir/checkpoints/last.pt``.
        distributed: ``True`` (default): when started by ``torchrun`` (``WORLD_SIZE > 1``)
            or inside an initialised process group, shard each meta-batch across the ranks
            (see :mod:`metaopt.distributed`); ``False``: always one process.

    The CPU thread count follows ``train.threads`` (set with ``torch.set_num_threads``,
    process-wide, when training on the CPU).

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
        inner: Any = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        resume: bool = False,
        distributed: bool = True,
    ) -> None:
        self.cfg = _resolve_config(config, overrides)
        t = self.cfg["train"]
        if device is not None:
            t["device"] = str(device)
        self.device = resolve_device(t["device"])
        self.run_dir = Path(out_dir) if out_dir is not None else None
        self.sync: Collective = LOCAL  # a metaopt.distributed.DistributedContext under torchrun
        ctx = dist_mod.setup(self.cfg, self.device, run_dir=self.run_dir,
                             meta_batch_size=t["meta_batch_size"] if data is None else None) if distributed else None
        if ctx is not None:
            self.sync, self.device = ctx, ctx.device  # cuda:LOCAL_RANK on GPUs
        # The task distribution of the config, or none when the user brings batches; from
        # here on both are the same thing: a stream of training batches and held-out sets.
        self.train_tasks: Any = build_tasks(self.cfg, "train", self.device) if data is None else None
        self._eval_tasks: dict[str, Any] = {}
        if data is None and has_splits(self.cfg["task"]["name"]):
            # Build the held-out splits now: a config that cannot serve them (task.ways
            # larger than the val split's classes) fails before the run directory exists.
            for split in ("val", "test") if t["eval_every"] else ("test",):
                self._eval_tasks[split] = build_tasks(self.cfg, split, self.device)
        self.generator = torch.Generator(device=generator_device(self.train_tasks)).manual_seed(t["seed"])
        self.batches: SampledBatches | CycledBatches = (
            SampledBatches(self.train_tasks, t["meta_batch_size"], self.generator, self.device, self.sync)
            if data is None else CycledBatches(data, self.device, self.sync)
        )
        # split -> (number of tasks or None -> held-out batches); None: no such evaluation.
        self._held_out: dict[str, Callable[[int | None], Iterable[Any]] | None] = (
            {split: functools.partial(self._task_eval_batches, split) for split in ("val", "test")} if data is None
            else {split: (None if given is None else functools.partial(_given, given))
                  for split, given in (("val", val_data), ("test", test_data))}
        )
        self.model = (model if model is not None else build_model(self.cfg, self.train_tasks)).to(self.device)
        if inner is not None and not (hasattr(inner, "init") and hasattr(inner, "step")):
            if not callable(inner):
                raise TypeError(f"inner must be an inner optimizer (with init and step) or a function "
                                f"model -> inner optimizer, got {type(inner).__name__}")
            inner = inner(self.model)
        self.maml = build_maml(self.cfg, self.model, loss_fn or task_loss(self.train_tasks),
                               inner=inner).to(self.device)
        if ctx is not None:
            ctx.broadcast_parameters(self.maml)  # every rank starts from rank 0's weights
        self.outer = build_outer(self.cfg, outer_param_groups(self.cfg, self.maml))
        # float16's 5 exponent bits: the outer gradient through the 16-bit query forward is
        # loss-scaled (bfloat16 has float32's range; the inner loop runs in float32 anyway).
        self.scaler = torch.amp.GradScaler(self.device.type) if t["precision"] == "fp16" else None
        # What the config does not describe: runs with the user's objects record it, so
        # that the command line refuses to resume or evaluate them with the config's own.
        self.custom = {name: type(obj).__name__ if name != "loss_fn" else getattr(obj, "__name__", type(obj).__name__)
                       for name, obj in (("data", data), ("model", model), ("inner", inner), ("loss_fn", loss_fn))
                       if obj is not None}
        self.threads: int | None = None
        if self.device.type == "cpu":
            self.threads = t.get("threads") or _default_threads(self.model)
            torch.set_num_threads(self.threads)
        self.classification: bool | None = None  # decided by the first batch's targets
        self.iteration = 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        if resume:
            if self.run_dir is None:
                raise ConfigError("resume needs a run directory")
            self.load_state_dict(load_checkpoint(self.run_dir / "checkpoints" / "last.pt", self.device))

    # ------------------------------------------------------------------ helpers

    @property
    def is_main(self) -> bool:
        """True in a single process and on rank 0 (the only rank that writes files)."""
        return self.sync.is_main

    @property
    def data_batches(self) -> int:
        """Batches consumed from a user's ``data`` (0 when sampling from the config's tasks)."""
        return self.batches.consumed

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoints" / "last.pt" if self.run_dir is not None else None

    @property
    def metric(self) -> str:
        return "accuracy" if self.classification else "mse"

    def _precision(self) -> ContextManager[Any]:
        return precision_context(self.cfg["train"]["precision"], self.device)

    def _hparam_columns(self) -> list[str]:
        return [f"hp_{k}" for k in getattr(self.maml, "inner_hparams", {}).keys()]

    def _hparam_values(self) -> dict[str, float]:
        return {f"hp_{k}": float(p.detach().float().mean()) for k, p in getattr(self.maml, "inner_hparams", {}).items()}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, learnable inner hyperparameters,
        outer-optimizer state (and the float16 GradScaler's), RNG states, the iteration and the
        resolved config."""
        maml_extra = {k: v for k, v in self.maml.state_dict().items() if not k.startswith("model.")}
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "inner_hparams": maml_extra,
            "outer": self.outer.state_dict(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            "rng": {
                "tasks": self.generator.get_state(),
                "torch_cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "data_batches": self.batches.consumed,
            "elapsed": self.elapsed,
            "config": config_mod.dump(self.cfg),
            "custom": dict(self.custom),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            extra = state.get("inner_hparams", {})
            if extra:
                full = {**{f"model.{k}": v for k, v in state["model"].items()}, **extra}
                self.maml.load_state_dict(full)
            self.outer.load_state_dict(state["outer"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as e:
            # torch's first line is only "Error(s) in loading state_dict for X:"; the keys follow.
            detail = " ".join(str(e).split())
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            raise CheckpointError(f"checkpoint does not match this run's model/optimizer: {detail}") from None
        rng = state["rng"]
        self.generator.set_state(rng["tasks"].cpu())  # generator states are CPU byte tensors
        torch.set_rng_state(rng["torch_cpu"].cpu())
        if rng.get("cuda") and torch.cuda.is_available():
            with contextlib.suppress(RuntimeError):
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.iteration = int(state["iteration"])
        self.batches.consumed = int(state.get("data_batches", 0))
        self.elapsed = float(state.get("elapsed", 0.0))

    def save(self) -> Path | None:
        """Write ``checkpoints/last.pt`` (atomically); no-op without a run directory and
        on ranks other than 0."""
        if self.checkpoint_path is None or not self.is_main:
            return None
        return save_checkpoint(self.state_dict(), self.checkpoint_path)

    # ------------------------------------------------------------------ evaluation

    def _task_eval_batches(self, split: str, n: int | None) -> Iterable[Any]:
        """``n`` held-out tasks (default ``train.eval_tasks``/``test_tasks``) of the config's
        distribution for ``split``, from a fixed seed."""
        t = self.cfg["train"]
        if split not in self._eval_tasks:
            # A distribution without splits serves held-out tasks from fixed seeds.
            self._eval_tasks[split] = (build_tasks(self.cfg, split, self.device) if has_splits(self.cfg["task"]["name"])
                                       else self.train_tasks)
        count = n or (t["eval_tasks"] if split == "val" else t["test_tasks"])
        return eval_batches(self._eval_tasks[split], count, t["eval_batch_size"],
                            VAL_SEED if split == "val" else TEST_SEED, self.device)

    def evaluate(self, split: str = "test", tasks: int | None = None) -> EvalResult | None:
        """Mean and 95% CI of the post-adaptation metric on ``tasks`` held-out tasks
        (``None`` when ``data`` was given without batches for ``split``)."""
        held_out = self._held_out[split]
        if held_out is None:
            return None
        batches = held_out(tasks)
        t = self.cfg["train"]
        if self.train_tasks is not None:  # the config's tasks: count known in advance
            count = tasks or (t["eval_tasks"] if split == "val" else t["test_tasks"])
            total: int | None = -(-count // t["eval_batch_size"])
            desc = f"{split} ({count} tasks)"
        else:
            total, desc = (len(batches) if hasattr(batches, "__len__") else None), split  # type: ignore[arg-type]
        batches = _progress(batches, desc, total, bool(t["progress"]) and self.is_main)
        with self._precision():
            # The test tasks' hash: paired comparisons check that two runs saw the same tasks.
            return evaluate(self.maml, batches, split=split, device=self.device, sync=self.sync,
                            fingerprint=split == "test")

    def inner_lr(self) -> Any:
        """The inner learning rate as a number (the learned one with ``inner.learn_lr``)."""
        lr = self.cfg["inner"]["lr"]
        learned = getattr(self.maml, "inner_hparams", {}).get("lr")
        if learned is not None and learned.numel() == 1:
            return round(float(learned.detach()), 6)
        return lr

    # ------------------------------------------------------------------ fit

    def fit(self) -> dict[str, Any]:
        """Train to ``train.iterations``, then test; return the final results (also
        written to ``results.json``).

        Results whose evaluation diverged (NaN/inf on some tasks) hold ``None`` for those
        numbers and a ``"diverged"`` entry naming the metric, the tasks, the inner steps and lr.

        Raises:
            NonFiniteLossError: the meta-loss became NaN/inf (last good checkpoint kept).
            TrainingInterrupted: Ctrl-C or SIGTERM (a checkpoint of the last finished
                iteration is written).
            RunDirLocked: another process is training in the same run directory.
        """
        with contextlib.ExitStack() as stack:
            if self.run_dir is not None and self.is_main:
                # One writer per run directory, for the whole run; then the temporary files
                # of writes killed before us (a live writer's would look the same) can go.
                stack.enter_context(lock_run_dir(self.run_dir))
                remove_stale_temporaries(self.run_dir)
            try:
                return self._fit()
            except OSError as e:
                if e.filename is None and self.run_dir is not None:  # a failed write(): say where
                    e.filename = str(self.run_dir)
                raise

    def _fit(self) -> dict[str, Any]:
        t = self.cfg["train"]
        total = t["iterations"]
        logger = self._open_run()
        bar = tqdm(total=total, initial=min(self.iteration, total), disable=not t["progress"] or not self.is_main,
                   desc="meta-train", dynamic_ncols=True, file=sys.stderr)
        val: EvalResult | None = None
        try:
            if self.iteration == 0 and t["eval_every"] and (val := self.evaluate("val")) is not None:
                self._log(logger, {"iteration": 0, **self._val_row(val)})
            with StopGuard() as guard:
                while self.iteration < total:
                    started = time.perf_counter()
                    it = self.iteration + 1
                    log_now = it % t["log_every"] == 0 or it == total
                    batch = next(self.batches)
                    with self._precision():
                        stats = meta_step(self.maml, self.outer, batch, grad_clip=t["grad_clip"], stats=log_now,
                                          iteration=it, checkpoint=self.checkpoint_path, sync=self.sync,
                                          scaler=self.scaler)
                    if self.classification is None:
                        self.classification = not torch.is_floating_point(batch.query[1])
                    self.iteration = it
                    row: dict[str, Any] = {}
                    # Validate every eval_every iterations and at the last one (a short run
                    # still ends with a validation point).
                    if (t["eval_every"] and (it % t["eval_every"] == 0 or it == total)
                            and (new := self.evaluate("val")) is not None):
                        val = new
                        row.update(self._val_row(val))
                    self.elapsed += time.perf_counter() - started
                    if log_now or row:
                        row = {"iteration": it, **asdict(stats), **row, **self._hparam_values(),
                               "elapsed_s": round(self.elapsed, 3)}
                        self._log(logger, row)
                        bar.set_postfix(self._postfix(stats, val), refresh=False)
                    bar.update(1)
                    if t["checkpoint_every"] and it % t["checkpoint_every"] == 0 and it != total:
                        self._save_whole(guard)
                    if self.sync.any(guard.hit):
                        raise TrainingInterrupted(it, self._save_whole(guard), guard.signum or signal.SIGINT)
                saved = self._save_whole(guard)
                if self.sync.any(guard.hit):  # during the final save: written; the test evaluation is not
                    raise TrainingInterrupted(total, saved, guard.signum or signal.SIGINT)
            bar.close()
            return self._finish(logger)
        finally:
            bar.close()
            if logger is not None:
                logger.close()

    def _save_whole(self, guard: StopGuard) -> Path | None:
        # A second Ctrl-C/SIGTERM waits until the checkpoint is written (never half a file).
        with guard.deferred():
            return self.save()

    def _val_row(self, val: EvalResult) -> dict[str, Any]:
        ci = math.nan if val.ci95 is None else val.ci95
        # A diverged validation is written "nan" (pandas and metaopt.plots read it as NaN);
        # an empty cell means "not measured".
        mean = val.mean if math.isfinite(val.mean) else "nan"
        return {"val_metric": mean, "val_ci95": ci, "val_before": val.before_mean}

    def _postfix(self, s: StepStats, val: EvalResult | None) -> dict[str, str]:
        p = {"loss": f"{s.meta_loss:.4g}"}
        if not math.isnan(s.accuracy):
            p["acc"] = f"{100 * s.accuracy:.1f}%"
        if val is not None:
            p[f"val_{val.metric}"] = ("diverged" if val.diverged_tasks else
                                      f"{100 * val.mean:.1f}%" if val.metric == "accuracy" else f"{val.mean:.4g}")
        return p

    def _log(self, logger: RunLogger | None, row: dict[str, Any]) -> None:
        self.history.append(row)
        if logger is not None:
            logger.log(row)

    def _open_run(self) -> RunLogger | None:
        if self.run_dir is None or not self.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = config_mod.dump(self.cfg)
        if self.custom:  # the config does not describe what ran: say so where users look
            given = ", ".join(f"{k}={v}" for k, v in self.custom.items())
            text = (f"# started from Python with its own {given}: the task/model sections below do not\n"
                    "# describe them; resume or evaluate this run from Python with the same objects.\n" + text)
        atomic_write(self.run_dir / "config.yaml", text)
        return RunLogger(self.run_dir, self._hparam_columns(), tensorboard=self.cfg["train"]["tensorboard"],
                         resume_from=self.iteration if self.iteration else None)

    def _finish(self, logger: RunLogger | None) -> dict[str, Any]:
        test = self.evaluate("test")
        results: dict[str, Any] = {"iteration": self.iteration, "elapsed_s": round(self.elapsed, 3),
                                   "device": torch.device(self.device).type}
        if test is not None:
            results = {**test.to_json(self.inner_lr()), **results}
            if logger is not None:
                logger.scalar(f"test/{test.metric}", test.mean, self.iteration)
        else:
            results = {"metric": self.metric, "mean": None, "ci95": None, "tasks": 0, **results}
        if self.run_dir is not None and self.is_main:
            write_json(self.run_dir / "results.json", results)
            if test is not None:  # per-task values: paired comparisons need no checkpoint later
                write_json(self.run_dir / "results_test_values.json", {"iteration": self.iteration, "tasks": test.tasks,
                                                                       "metric": test.metric, "values": test.values,
                                                                       "tasks_sha256": test.tasks_sha256})
            if self.cfg["train"]["plots"]:
                self.plot(test)
        return results

    # ------------------------------------------------------------------ plots

    def plot(self, test: EvalResult | None = None) -> list[Path]:
        """``plots/learning_curves.png`` and, for tasks that draw their fits (``curves``,
        e.g. sinusoid), ``plots/<task>_fit.png``. Needs matplotlib (the ``plot`` extra);
        without it, one line on stderr and no plots."""
        try:
            from metaopt import plots  # matplotlib: optional
        except ImportError:
            print("metaopt: plots skipped: matplotlib is not installed (pip install 'metaopt[plot]')",
                  file=sys.stderr)
            return []
        assert self.run_dir is not None
        metric = test.metric if test is not None else self.metric
        out = [plots.learning_curves(self.run_dir / "metrics.csv", self.run_dir / "plots" / "learning_curves.png",
                                     title=self._title(test), metric=metric)]
        if hasattr(self.train_tasks, "curves"):
            curves = self.train_tasks.curves(self._predict, seed=PLOT_SEED, device=self.device)
            for c in curves:
                c["steps"] = self.maml.eval_inner_steps
            out.append(plots.sinusoid_fits(
                curves, self.run_dir / "plots" / f"{self.cfg['task']['name']}_fit.png",
                title=f"{self._title(None)}: adapted to {self.cfg['task'].get('shots')} points"))
        return out

    def _predict(self, support_x: Tensor, support_y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """The model's predictions at ``x`` before and after adapting to one support set."""
        adapted = self.maml.adapt(support_x, support_y, train=False)
        with torch.no_grad():
            after = self.maml.functional_forward(adapted, x)
            before = self.maml.functional_forward(dict(self.model.named_parameters()), x)
        return before, after

    def _title(self, test: EvalResult | None) -> str:
        c = self.cfg
        head = f"{c['task']['name']} | inner {c['inner']['name']} lr {c['inner']['lr']} | iter {self.iteration}"
        return f"{head} | {test.summary()}" if test is not None else head


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
    """The :class:`Trainer` of ``run_dir`` at its last checkpoint (see :func:`resume`)."""
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
    _check_from_config(run_dir, "resume")  # also fails early on a missing or corrupt checkpoint
    return Trainer(wanted, run_dir, device=device, resume=True)


def _check_from_config(run_dir: Path, what: str) -> None:
    """Refuse to ``what`` (resume/evaluate) from its config a run that was started from
    Python with its own data, model, inner optimizer or loss: the config would rebuild
    different ones."""
    custom = load_checkpoint(run_dir / "checkpoints" / "last.pt").get("custom") or {}
    if custom:
        given = ", ".join(f"{k} ({v})" for k, v in custom.items())
        raise ConfigError(
            f"cannot {what} {run_dir} from its config: it was started from Python with its own {given}, which "
            f"config.yaml does not describe; {what} it from Python with the same objects, e.g. "
            f"Trainer(config, {str(run_dir)!r}, data=..., model=..., inner=..., resume=True)"
        )


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
                 steps: int | None = None, device: str | None = None, write: bool = True,
                 progress: bool | None = None) -> dict[str, Any]:
    """Load ``run_dir``'s last checkpoint and evaluate it on ``tasks`` held-out tasks.

    ``steps`` overrides the inner steps (default ``inner.eval_steps``). Writes
    ``eval_<split>_<T>tasks[_<N>steps].json`` (never the training's ``results.json``) and
    returns the results (with ``"path"``, the file written; a diverged evaluation holds
    ``None`` and a ``"diverged"`` reason, see :meth:`Trainer.fit`). ``progress``: show a
    progress bar (default: the run's ``train.progress``).
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    if tasks is not None:
        check_int("--tasks", tasks, least=1, error=ConfigError)
    check_choice("--split", split, ("test", "val"), error=ConfigError)
    if steps is not None:
        check_int("--steps", steps, least=0, error=ConfigError)
    _check_from_config(run_dir, "evaluate")
    trainer = Trainer(cfg_path, run_dir, device=device, resume=True,
                      overrides=[] if progress is None else [f"train.progress={str(progress).lower()}"])
    if steps is not None:
        trainer.maml.eval_inner_steps = steps
    res = trainer.evaluate(split, tasks)
    assert res is not None  # a config's run always has held-out tasks
    out = {**res.to_json(trainer.inner_lr()), "iteration": trainer.iteration}
    if write and trainer.is_main:
        name = f"eval_{split}_{res.tasks}tasks" + (f"_{steps}steps" if steps is not None else "")
        out["path"] = str(write_json(run_dir / f"{name}.json", out))
    return out
