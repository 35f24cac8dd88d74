"""Argument checks with torch.optim's messages: one line naming the value and the rule.

``check_int("train.iterations", 0, least=1)`` raises
``ValueError("train.iterations should be an int >= 1 but is: 0")``; config, trainer and
command line all check their inputs here, so every message reads the same way.

:class:`ConfigError` (a ``ValueError``) is the error of a config or command line that
cannot be used; :mod:`metaopt.config` re-exports it.

Example:
    >>> check_int("train.iterations", 5, least=1)
    5
    >>> check_int("train.iterations", 0, least=1)
    Traceback (most recent call last):
    ...
    ValueError: train.iterations should be an int >= 1 but is: 0
    >>> check_choice("train.precision", "fp8", ("fp32", "bf16"), error=ConfigError)
    Traceback (most recent call last):
    ...
    metaopt.checks.ConfigError: train.precision should be one of fp32, bf16 but is: 'fp8'
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["ConfigError", "check_choice", "check_float", "check_int", "check_keys"]


class ConfigError(ValueError):
    """A config or command line that cannot be used; the message names the key and the problem."""


def check_int(name: str, value: Any, *, least: int | None = None, error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int (not a bool) ``>= least``, else ``error`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        rule = f"an int >= {least}" if least is not None else "an int"
        raise error(f"{name} should be {rule} but is: {value!r}")
    return value


def check_float(name: str, value: Any, *, least: float | None = None, error: type[Exception] = ValueError) -> float:
    """``float(value)`` if it is a finite real number ``>= least``, else ``error`` naming it."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (least is not None and value < least):
        rule = f"a finite number >= {least:g}" if least is not None else "a finite number"
        raise error(f"{name} should be {rule} but is: {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any], *, error: type[Exception] = ValueError) -> Any:
    """``value`` if it is one of ``choices``, else ``error`` listing them."""
    if value not in choices:
        raise error(f"{name} should be one of {', '.join(map(str, choices))} but is: {value!r}")
    return value


def check_keys(section: str, given: Sequence[str], allowed: Sequence[str], what: str,
               *, error: type[Exception] = ValueError) -> None:
    """Every key of ``given`` in ``allowed``, else ``error`` naming the first unknown key
    and listing the allowed ones (``what``: whose keys, e.g. "inner optimizer 'adam'")."""
    for key in given:
        if key not in allowed:
            raise error(f"unknown config key '{section}.{key}' for {what}; allowed keys: {', '.join(sorted(allowed))}")
