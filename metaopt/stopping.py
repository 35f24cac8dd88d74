"""How a training run stops when asked: the first Ctrl-C (SIGINT) or SIGTERM is a flag the
training loop checks between iterations, so the run saves a checkpoint of its last finished
iteration and raises :class:`TrainingInterrupted`; a second signal raises at once, except
while a checkpoint is being written (:meth:`StopGuard.deferred`).

Example:
    >>> import signal
    >>> guard = StopGuard()
    >>> guard._handle(signal.SIGINT, None)   # what a delivered Ctrl-C does
    >>> guard.hit
    True
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training; a checkpoint of the last finished iteration was
    written. ``signum``: the signal (``signal.SIGINT`` or ``signal.SIGTERM``)."""

    def __init__(self, iteration: int, checkpoint: Path | None, signum: int = signal.SIGINT) -> None:
        where = f"; checkpoint saved to {checkpoint}" if checkpoint is not None else ""
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        super().__init__(f"interrupted ({name}) after iteration {iteration}{where}")
        self.iteration = iteration
        self.checkpoint = checkpoint
        self.signum = signum

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable, so a worker of `metaopt compare --jobs N` can send it back: the default
        # (cls(*self.args)) fails in the parent, which then calls the pool broken and SIGTERMs
        # the other workers in the middle of their own checkpoint saves.
        return type(self), (self.iteration, self.checkpoint, self.signum)


class StopGuard:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM (what schedulers such as Slurm and
    Kubernetes send before killing a job) into a flag checked between iterations, so the run
    checkpoints its last finished iteration and exits; a second signal raises at once,
    except inside :meth:`deferred` (a checkpoint being written), where it raises as soon as
    the write is done: a checkpoint is never cut off half-way. A signal the process ignores
    (SIGINT of a background job started by a non-interactive shell) stays ignored: stop such
    a job with SIGTERM."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._deferring = False
        self._pending = False

    @property
    def hit(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                # An ignored signal stays ignored: a non-interactive shell starts a background
                # job (`cmd &` in a script) with SIGINT ignored so that a Ctrl-C of the script
                # leaves it running. Taking it over only inside the loop stopped such a job on
                # a SIGINT that landed in the loop and dropped one that landed in an evaluation.
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.hit:
            self.signum = signum
        elif self._deferring:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A second signal inside this block raises when the block ends, not in it."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


__all__ = ["StopGuard", "TrainingInterrupted"]
