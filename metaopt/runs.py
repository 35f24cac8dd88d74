"""Run directories that are reused only when they hold the run asked for.

A comparison or a study trains hundreds of runs and must survive being stopped and started
again; it must also never report a run of another config as this one (a changed
``inner.steps`` or ``train.iterations`` with the old numbers). :func:`run_config` decides per
run directory from its saved ``config.yaml`` (:func:`config_diff`): reuse, resume, extend,
re-run (the old directory kept) or refuse, naming the differing key. A run whose meta-loss
goes non-finite is recorded as diverged (``diverged.json``) instead of stopping everything.

:class:`RunPool` makes those calls one after another or several at a time in worker
processes (``metaopt compare --jobs N``).

:func:`validation_metric` and :func:`per_task_test_values` read a finished run's final
checkpoint on the fixed validation tasks (for tuning) and on the fixed test tasks, per task
(for paired differences).

Example:
    >>> from metaopt.config import resolve
    >>> config_diff(resolve({"train": {"progress": False}}), resolve({}))   # cosmetic: same run
    []
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from types import TracebackType
from typing import Any

from metaopt import config as config_mod
from metaopt.config import Config, ConfigError
from metaopt.loop import NonFiniteLossError
from metaopt.rundir import write_json
from metaopt.train import RESUMABLE_KEYS, Trainer, evaluate_run, make_resumed_trainer

#: Keys that do not change what a run computes (where it runs, where the data is read from,
#: what it draws and how often it saves); a finished run is reused across them. Every other
#: key is part of a run's identity.
COSMETIC_KEYS = frozenset({"train.device", "train.threads", "train.progress", "train.tensorboard", "train.plots",
                           "train.checkpoint_every", "task.root"})


def config_diff(saved: Mapping[str, Mapping[str, Any]], wanted: Mapping[str, Mapping[str, Any]], *,
                ignore: frozenset[str] = COSMETIC_KEYS) -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two resolved configs, as ``(key, saved, wanted)``;
    a key missing on one side shows ``"<unset>"`` there.

    Example:
        >>> from metaopt.config import resolve
        >>> config_diff(resolve({"inner": {"steps": 1}}), resolve({"inner": {"steps": 2}}))
        [('inner.eval_steps', 1, 2), ('inner.steps', 1, 2)]
    """
    out = []
    for s in sorted(set(saved) | set(wanted)):
        a, b = saved.get(s) or {}, wanted.get(s) or {}
        for k in sorted(set(a) | set(b)):
            key = f"{s}.{k}"
            va, vb = a.get(k, "<unset>"), b.get(k, "<unset>")
            if key not in ignore and va != vb:
                out.append((key, va, vb))
    return out


def _yaml_value(v: Any) -> str:
    # JSON is YAML: true/false/null/numbers/quoted strings read back as the same value.
    return json.dumps(list(v) if isinstance(v, tuple) else v)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _stale_dir(run_dir: Path) -> Path:
    k = 1
    while run_dir.with_name(f"{run_dir.name}.stale-{k}").exists():
        k += 1
    return run_dir.with_name(f"{run_dir.name}.stale-{k}")


def _describe_diff(diffs: Sequence[tuple[str, Any, Any]]) -> str:
    parts = [f"config key {k!r} is {old!r} there but {new!r} now" for k, old, new in diffs[:5]]
    return ", ".join(parts) + (f" (and {len(diffs) - 5} more keys)" if len(diffs) > 5 else "")


def run_config(cfg: Config, run_dir: str | Path, *, device: str | None = None, rerun: bool = True,
               retry_diverged: bool = False, log: Callable[[str], None] | None = None,
               message: str = "") -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``, or reuse what is there when it is the same run.

    * same config (:func:`config_diff` of the saved ``config.yaml``, ignoring
      :data:`COSMETIC_KEYS`), finished: its ``results.json`` is read;
    * same config, interrupted (a checkpoint, no results for ``train.iterations``): resumed;
    * only ``train.iterations`` grew: the run is extended from its last checkpoint (resuming
      continues the same random streams, so this equals a fresh run of the longer schedule);
    * anything else: with ``rerun`` the old directory is moved to ``RUN_DIR.stale-K`` and the
      run trained afresh; without, :class:`~metaopt.config.ConfigError` names the differing key.

    A non-finite meta-loss does not stop a comparison: the run is recorded as diverged
    (``diverged.json``: iteration and value) and reported by name. Re-running reuses that
    record (the same config diverges the same way); ``retry_diverged`` trains it afresh instead,
    the old directory kept as ``RUN_DIR.stale-K``: for a run that diverged because of a bug
    since fixed, or after a change of code the config does not record.

    Returns:
        ``{"run_dir", "status": "ok" | "diverged", "results": results.json or None,
        "diverged": {"iteration", "value"} or None}``.

    Raises:
        ConfigError: ``run_dir`` holds another config and ``rerun`` is False.
    """
    run_dir = Path(run_dir)
    done = finished_run(cfg, run_dir)
    if done is not None and not (retry_diverged and done["status"] == "diverged" and done["results"] is None):
        return done
    saved_path = run_dir / "config.yaml"
    resume_iterations: int | None = None
    if saved_path.is_file():
        diffs = config_diff(config_mod.load(saved_path), cfg)
        ckpt = run_dir / "checkpoints" / "last.pt"
        diverged = _read_json(run_dir / "diverged.json")
        if not diffs:
            if diverged is not None:  # retry_diverged
                stale = _stale_dir(run_dir)
                run_dir.rename(stale)
                if log:
                    log(f"[compare] {run_dir}: diverged at iteration {diverged.get('iteration')} before; "
                        f"retrying (old run moved to {stale})")
            elif ckpt.is_file():
                resume_iterations = cfg["train"]["iterations"]
        elif ([d[0] for d in diffs] == ["train.iterations"] and diverged is None and ckpt.is_file()
              and cfg["train"]["iterations"] > diffs[0][1]):
            resume_iterations = cfg["train"]["iterations"]
        else:
            if not rerun:
                raise ConfigError(f"{run_dir} holds a run of another config: {_describe_diff(diffs)}; "
                                  "re-run without --no-rerun to replace it (the old run is kept)")
            stale = _stale_dir(run_dir)
            run_dir.rename(stale)
            if log:
                log(f"[compare] {run_dir}: {_describe_diff(diffs)}; moved the old run to {stale}")
    try:
        if resume_iterations is not None:
            keep = [f"train.{k}={_yaml_value(cfg['train'][k])}" for k in ("iterations", "progress", "tensorboard",
                                                                          "plots", "checkpoint_every")]
            assert all(o.split("=")[0] in RESUMABLE_KEYS for o in keep)
            if log:
                log(f"{message} (resuming from {run_dir / 'checkpoints' / 'last.pt'})")
            results = make_resumed_trainer(run_dir, overrides=keep, device=device).fit()
        else:
            if log:
                log(message or f"[compare] training {run_dir}")
            results = Trainer(cfg, run_dir, device=device).fit()
    except NonFiniteLossError as e:
        value = getattr(e, "value", None)
        info = {"iteration": e.iteration, "value": None if value is None else repr(value), "message": str(e)}
        write_json(run_dir / "diverged.json", info)
        return {"run_dir": str(run_dir), "status": "diverged", "results": None, "diverged": info}
    return _record(run_dir, results)


def finished_run(cfg: Config, run_dir: str | Path) -> dict[str, Any] | None:
    """:func:`run_config`'s record of ``run_dir`` when it holds ``cfg``'s run, finished (its
    results for ``train.iterations``) or recorded as diverged; ``None`` otherwise. Trains
    nothing: a report of the runs that exist (``experiments/study.py --report``)."""
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file() or config_diff(config_mod.load(saved_path), cfg):
        return None
    diverged = _read_json(run_dir / "diverged.json")
    if diverged is not None:
        return {"run_dir": str(run_dir), "status": "diverged", "results": None, "diverged": diverged}
    results = _read_json(run_dir / "results.json")
    if results is not None and results.get("iteration") == cfg["train"]["iterations"]:
        return _record(run_dir, results)
    return None


def _record(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    mean = results.get("mean")
    if mean is not None and not math.isfinite(mean):  # finite loss, non-finite test metric
        info = {"iteration": results.get("iteration"), "value": repr(mean), "where": "test metric"}
        return {"run_dir": str(run_dir), "status": "diverged", "results": results, "diverged": info}
    return {"run_dir": str(run_dir), "status": "ok", "results": results, "diverged": None}


def _stderr(message: str) -> None:  # a worker's log (module level: it is pickled)
    print(message, file=sys.stderr, flush=True)


#: How long :meth:`RunPool.result` blocks at a time before letting a pending signal handler run.
_WAIT_SLICE_S = 0.5

# A worker process's state, for its SIGINT handler (module level: set in each worker).
_worker_running = False  # a run is being set up or trained here
_worker_stopping = False  # the parent has interrupted this worker


def _worker_init() -> None:
    """Worker initializer. Its own process group: a terminal's Ctrl-C goes to the parent
    only, which then interrupts each worker exactly once (a run stops on its first SIGINT
    after saving a checkpoint, but at once on a second). And a SIGINT handler for the times
    the trainer's own is not installed (:func:`_worker_sigint`)."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, _worker_sigint)


def _worker_sigint(signum: int, frame: Any) -> None:
    """A run being set up stops at once; an idle worker only remembers the interrupt. An idle
    worker that died of it would make the executor call the pool broken and SIGTERM the
    other workers, cutting their runs off before they save; and one that lived on as if
    nothing happened would start a queued run after the Ctrl-C."""
    global _worker_stopping
    _worker_stopping = True
    if _worker_running:
        raise KeyboardInterrupt


def _worker_run(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_config` in a worker; refused once the worker has been interrupted."""
    global _worker_running, _worker_stopping
    _worker_running = True  # before the check: a SIGINT in between raises instead of being lost
    try:
        if _worker_stopping:
            raise KeyboardInterrupt("not started: the pool was interrupted")
        return run_config(*args, **kwargs)
    except KeyboardInterrupt:  # also the trainer's TrainingInterrupted: its handler took the SIGINT
        _worker_stopping = True
        raise
    finally:
        _worker_running = False


class RunPool:
    """:func:`run_config` calls, one after another (``jobs=1``) or ``jobs`` at a time in
    worker processes.

    :meth:`submit` queues a run (a no-op with ``jobs=1``); :meth:`result` returns its record,
    running it then if it was not queued. A run's outcome depends only on its config, so the
    records are the same either way; only the log differs (a worker logs to stderr when it
    starts training, and shows no progress bar). Workers are spawned processes, each with
    torch's default threads: on a CPU give each its share, e.g. ``OMP_NUM_THREADS=1`` and as
    many jobs as cores. Leaving the ``with`` block on an error or Ctrl-C interrupts the
    workers' runs (each saves its checkpoint, as a run does on SIGINT) and drops the queued
    ones.

    Example:
        >>> with RunPool(jobs=1) as pool:
        ...     pool.parallel
        False
    """

    def __init__(self, jobs: int = 1, *, device: str | None = None, rerun: bool = True,
                 retry_diverged: bool = False, log: Callable[[str], None] | None = None) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"--jobs must be an int >= 1, got {jobs!r}")
        self._kwargs: dict[str, Any] = {"device": device, "rerun": rerun, "retry_diverged": retry_diverged}
        self._log = log
        self._futures: dict[str, Future[dict[str, Any]]] = {}
        self._pool = (ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_worker_init) if jobs > 1 else None)

    @property
    def parallel(self) -> bool:
        return self._pool is not None

    def submit(self, cfg: Config, run_dir: str | Path, message: str = "") -> None:
        """Queue ``run_config(cfg, run_dir)`` on a worker (once per directory)."""
        if self._pool is None or str(run_dir) in self._futures:
            return
        cfg = {**cfg, "train": {**cfg["train"], "progress": False}}  # bars of several workers would interleave
        self._futures[str(run_dir)] = self._pool.submit(
            _worker_run, cfg, run_dir, **self._kwargs, log=_stderr if self._log is not None else None, message=message)

    def result(self, cfg: Config, run_dir: str | Path, message: str = "") -> dict[str, Any]:
        """The record of ``run_config(cfg, run_dir)``: waited for, or run now."""
        if self._pool is None:
            return run_config(cfg, run_dir, **self._kwargs, log=self._log, message=message)
        self.submit(cfg, run_dir, message)
        future = self._futures.pop(str(run_dir))
        # Wait in short slices: Python runs signal handlers in the main thread only, and a
        # signal the kernel hands to another thread of this process (the executor's manager or
        # queue-feeder thread, e.g. while the main thread has a signal pending) does not wake a
        # main thread blocked without a timeout: Ctrl-C and SIGTERM would wait for the run to end.
        # (`wait`, not `result(timeout)`: a run's own TimeoutError must not read as "not yet".)
        while not future.done():
            futures_wait([future], timeout=_WAIT_SLICE_S)
        return future.result()

    def close(self, *, cancel: bool = False) -> None:
        """Wait for the workers; ``cancel``: interrupt the running runs, drop the queued ones."""
        if self._pool is None:
            return
        if cancel:  # SIGINT: each worker's run saves its checkpoint and stops
            for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGINT)
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        self._pool = None

    def __enter__(self) -> "RunPool":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(cancel=exc_type is not None)


def validation_metric(run_dir: str | Path, *, device: str | None = None) -> float:
    """Mean metric of ``run_dir``'s final checkpoint on its ``train.eval_tasks`` validation
    tasks (the fixed validation set). This, never the test metric, is what
    :func:`metaopt.compare.compare` tunes on.

    The run's own validation at its last iteration (``metrics.csv``) is that number (the
    trainer validates at the last iteration whenever ``train.eval_every > 0``); otherwise the
    checkpoint is evaluated on the same tasks by :func:`metaopt.train.evaluate_run` (which
    caches it in ``eval_val_<T>tasks.json``). NaN when that evaluation diverged (the
    tuning then counts the value as diverged).
    """
    run_dir = Path(run_dir)
    it = (_read_json(run_dir / "results.json") or {}).get("iteration")
    if it is not None and (run_dir / "metrics.csv").is_file():
        from metaopt.plots import read_metrics

        cols = read_metrics(run_dir / "metrics.csv")
        last = [v for x, v in zip(cols.get("iteration", []), cols.get("val_metric", [])) if x == it and not math.isnan(v)]
        if last:
            return float(last[-1])
    tasks = config_mod.load(run_dir / "config.yaml")["train"]["eval_tasks"]
    cached = _read_json(run_dir / f"eval_val_{tasks}tasks.json")
    if cached is not None and it is not None and cached.get("iteration") == it:
        return math.nan if cached.get("mean") is None else float(cached["mean"])
    mean = evaluate_run(run_dir, split="val", device=device)["mean"]
    return math.nan if mean is None else float(mean)  # None: the evaluation diverged


def per_task_test_values(run_dir: str | Path, *, device: str | None = None) -> list[float]:
    """Per-task test metric of ``run_dir``'s final checkpoint, task ``i`` being the same task
    in every run of a config (test tasks come from a fixed seed).

    Uses ``results.json``'s ``values`` when the run saved them; otherwise re-evaluates the
    checkpoint on the same test tasks (cached in ``results_test_values.json``) and checks
    that the mean equals the saved one.

    Raises:
        RuntimeError: the re-evaluation does not reproduce the saved test mean.
        FileNotFoundError: no saved values and no checkpoint to re-evaluate.
    """
    run_dir = Path(run_dir)
    res = _read_json(run_dir / "results.json") or {}
    if isinstance(res.get("values"), list):
        return [float(v) for v in res["values"]]
    cache = _read_json(run_dir / "results_test_values.json")
    if cache is not None and cache.get("iteration") == res.get("iteration") and cache.get("tasks") == res.get("tasks"):
        return [float(v) for v in cache["values"]]
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise FileNotFoundError(f"{run_dir}: no per-task test values saved and no checkpoint to re-evaluate")
    trainer = Trainer(run_dir / "config.yaml", run_dir, device=device, resume=True)
    ev = trainer.evaluate("test")
    assert ev is not None
    saved = res.get("mean")
    if saved is not None and abs(ev.mean - saved) > 1e-4 * max(1.0, abs(saved)):
        raise RuntimeError(f"re-evaluating {run_dir} gave test mean {ev.mean!r}, results.json says {saved!r}")
    write_json(run_dir / "results_test_values.json",
               {"iteration": trainer.iteration, "tasks": ev.tasks, "metric": ev.metric, "values": ev.values,
                "tasks_sha256": ev.tasks_sha256})
    return list(ev.values)


def test_tasks_sha256(run_dir: str | Path) -> str | None:
    """The hash of the test tasks ``run_dir``'s per-task values were measured on
    (:func:`metaopt.loop.tasks_fingerprint`), or ``None`` for a run older than the hash."""
    run_dir = Path(run_dir)
    for name in ("results.json", "results_test_values.json"):
        sha = (_read_json(run_dir / name) or {}).get("tasks_sha256")
        if sha:
            return str(sha)
    return None


__all__ = ["COSMETIC_KEYS", "RunPool", "config_diff", "finished_run", "per_task_test_values", "run_config",
           "test_tasks_sha256", "validation_metric"]
