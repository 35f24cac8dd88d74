"""The run directory on disk: atomic writes, checkpoints, ``metrics.csv`` and TensorBoard.

Layout of a run directory (written by rank 0 only)::

    config.yaml            the resolved config
    metrics.csv            one row per logged iteration (RunLogger)
    checkpoints/last.pt    everything needed to continue bit for bit (save_checkpoint)
    results.json           final test results (write_json; strict JSON, null where not finite)
    eval_*.json            results of ``metaopt eval`` (never results.json)
    .lock                  held by the process training in the directory (lock_run_dir)
    plots/*.png            learning curves (metaopt.plots, needs the ``plot`` extra)
    events.out.tfevents.*  TensorBoard scalars (needs the ``tensorboard`` extra)

Every file is written atomically by :func:`atomic_write` (a temporary file in the same
folder, flushed and fsynced, then ``os.replace``): a crash or a full disk in the middle of a
write leaves the previous file intact, never half a file; the next run removes the
temporary files of killed writes (:func:`remove_stale_temporaries`). Checkpoints carry a
sha256 of their tensors (:func:`tensor_checksum`), checked on load.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> p = write_json(d / "results.json", {"mean": 0.5})
    >>> p.read_text()
    '{\\n  "mean": 0.5\\n}\\n'
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "METRIC_COLUMNS",
    "RunDirLocked",
    "RunLogger",
    "atomic_write",
    "json_safe",
    "load_checkpoint",
    "lock_run_dir",
    "remove_stale_temporaries",
    "save_checkpoint",
    "tensor_checksum",
    "write_json",
]

CHECKPOINT_FORMAT = "metaopt-checkpoint"
CHECKPOINT_VERSION = 1
METRIC_COLUMNS = ["iteration", "meta_loss", "loss_before", "accuracy", "accuracy_before",
                  "val_metric", "val_ci95", "val_before", "elapsed_s"]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the run."""


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock (see :func:`lock_run_dir`)."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any] | bytes | str, *, mode: int = 0o644) -> Path:
    """Write ``path`` atomically: ``write(f)`` (or the bytes/text given) into a temporary
    file in the same folder, flush and fsync it, then ``os.replace`` it onto ``path``.

    The one implementation every writer in metaopt uses (checkpoints, JSON, CSV, config,
    the Omniglot cache and downloads). A failed write removes the temporary file and leaves
    the old ``path`` untouched. ``mode``: the file's permissions (``mkstemp`` makes 0600; a
    shared cache or run directory should be readable by others).

    Example:
        >>> import tempfile, pathlib
        >>> p = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "a.txt", "hello")
        >>> p.read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, str):
                f.write(write.encode())
            elif isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def json_safe(data: Any) -> Any:
    """``data`` with every non-finite float replaced by ``None`` (strict JSON has no NaN).

    Example:
        >>> json_safe({"mean": float("nan"), "xs": [1.0, float("inf")]})
        {'mean': None, 'xs': [1.0, None]}
    """
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Mapping):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented, strict JSON (NaN/inf become ``null``: ``allow_nan=False``
    would otherwise refuse them, and bare ``NaN`` is not JSON), atomically."""
    return atomic_write(path, json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` (and its
    ``checkpoints/``) when a process was killed mid-write. Call it only while holding the
    run directory's lock (:func:`lock_run_dir`): a live writer's temporary file looks the same.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / ".last.pt.x1.tmp").write_bytes(b"half")
        >>> [p.name for p in remove_stale_temporaries(d)]
        ['.last.pt.x1.tmp']
    """
    removed = []
    for sub in (Path(folder), Path(folder) / "checkpoints"):
        if not sub.is_dir():
            continue
        for p in sorted(sub.glob(".*.tmp")):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``run_dir/.lock`` (which records the holder's
    pid) for the duration of the block; the kernel releases it when the process dies, so a
    killed run never leaves a stale lock. No-op where ``fcntl`` does not exist (Windows).

    Raises:
        RunDirLocked: another live process holds the lock; the message names the directory
            and that process's pid.

    Example:
        >>> import tempfile
        >>> with lock_run_dir(tempfile.mkdtemp()) as lock:
        ...     lock.name
        '.lock'
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield Path(run_dir) / ".lock"
        return
    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirLocked(f"run directory {run_dir} is in use by another metaopt process (pid {holder}); "
                               "wait for it to finish, stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# ============================================================================ checkpoints


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in nested dicts/lists, in insertion order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def tensor_checksum(state: Mapping[str, Any]) -> str:
    """sha256 over every tensor of ``state`` (its path, dtype, shape and bytes) in
    insertion order, the ``"checksum"`` entry excluded. ``torch.load`` checks a file's
    structure but not its tensor data: one flipped byte in a weight loads silently.

    Example:
        >>> a = tensor_checksum({"w": torch.zeros(2)})
        >>> a == tensor_checksum({"w": torch.zeros(2)}), a == tensor_checksum({"w": torch.ones(2)})
        (True, False)
    """
    h = hashlib.sha256()
    for name, t in _tensors({k: v for k, v in state.items() if k != "checksum"}):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save``, atomically (see :func:`atomic_write`), with a
    ``"checksum"`` entry (:func:`tensor_checksum`) that :func:`load_checkpoint` verifies.

    Example:
        >>> import tempfile, pathlib
        >>> p = save_checkpoint({"format": CHECKPOINT_FORMAT, "model": {}, "iteration": 0, "outer": {},
        ...                      "rng": {}, "config": ""}, pathlib.Path(tempfile.mkdtemp()) / "last.pt")
        >>> load_checkpoint(p)["iteration"]
        0
    """
    state = {**state, "checksum": tensor_checksum(state)}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and verify its checksum.

    Raises:
        CheckpointError: missing file, or one that is corrupt / not a metaopt checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # Only torch's first line, cut before its advice to retry with weights_only=False:
        # that would run arbitrary code from a file we could not read as data.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split("weights_only")[0].split(" Re-running")[0].rstrip(" .,(")
        raise CheckpointError(
            f"checkpoint {path} is unreadable, corrupt or not a metaopt checkpoint ({type(e).__name__}: "
            f"{first[:160]}); restore a good copy or delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a metaopt checkpoint (no 'format: {CHECKPOINT_FORMAT}' entry)")
    missing = [k for k in ("model", "iteration", "outer", "rng", "config") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if "checksum" in state and state["checksum"] != tensor_checksum(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensor data fails the sha256 checksum stored in it "
                              "(a damaged disk or copy); restore a good copy or delete it to start over")
    return state


# ============================================================================ logs


def _summary_writer(run_dir: Path, purge_step: int | None) -> Any:
    """A TensorBoard ``SummaryWriter``, or ``None`` (with one line on stderr) when the
    ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("metaopt: TensorBoard logging skipped: the tensorboard package is not installed "
              "(pip install 'metaopt[tensorboard]')", file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir), purge_step=purge_step)


class RunLogger:
    """``metrics.csv`` (one row per logged iteration) and TensorBoard scalars.

    On resume, rows after the checkpoint's iteration are dropped (they belong to the
    interrupted tail), so the file reads as one uninterrupted run.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> log = RunLogger(d, tensorboard=False)
        >>> log.log({"iteration": 1, "meta_loss": 0.5}); log.close()
        >>> (d / "metrics.csv").read_text().splitlines()[1]
        '1,0.5,,,,,,,'
    """

    def __init__(self, run_dir: Path, extra_columns: Sequence[str] = (), *, tensorboard: bool = True,
                 resume_from: int | None = None) -> None:
        self.path = run_dir / "metrics.csv"
        self.columns = METRIC_COLUMNS + list(extra_columns)
        kept: list[dict[str, str]] = []
        if resume_from is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("iteration") and int(r["iteration"]) <= resume_from]

        def header_and_kept(f: IO[bytes]) -> None:
            import io

            text = io.TextIOWrapper(f, newline="", write_through=True)
            w = csv.DictWriter(text, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept)
            text.detach()  # leave the binary file open for atomic_write to fsync

        atomic_write(self.path, header_and_kept)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, self.columns, extrasaction="ignore")
        self.tensorboard = _summary_writer(run_dir, (resume_from + 1) if resume_from else None) if tensorboard else None

    def log(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` (column -> value; NaN becomes an empty cell) and its finite
        numbers as TensorBoard scalars at step ``row["iteration"]``."""
        self._csv.writerow({k: _fmt(v) for k, v in row.items()})
        self._file.flush()
        if self.tensorboard is not None:
            it = int(row["iteration"])
            for k, v in row.items():
                if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tensorboard.add_scalar(_tb_name(k), v, it)

    def scalar(self, name: str, value: float, iteration: int) -> None:
        """One TensorBoard scalar outside ``metrics.csv`` (e.g. the final test metric)."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(name, value, iteration)

    def close(self) -> None:
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.flush()
            self.tensorboard.close()


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
