"""Summary statistics for reported numbers: means with Student-t confidence intervals and
paired differences.

Every interval metaopt reports (over evaluation tasks, over seeds, between optimizers) comes
from here, so that one rule holds everywhere: the half-width of a two-sided ``confidence``
interval of the mean of ``n`` values is ``t(n-1) * s / sqrt(n)``, with ``s`` the sample
standard deviation (``ddof=1``) and ``t(n-1)`` the Student-t quantile with ``n - 1`` degrees
of freedom. With one value there is no interval (``None``). For 600 evaluation tasks this is
within 0.2% of the normal-approximation ``1.96 * s / sqrt(n)``; for 3 seeds it is 2.2x wider,
which is the point.

Example:
    >>> from metaopt.stats import mean_ci, paired_difference
    >>> s = mean_ci([0.40, 0.42, 0.47])
    >>> round(s.mean, 4), round(s.ci95, 4), s.n
    (0.43, 0.0896, 3)
    >>> mean_ci([0.5]).ci95 is None
    True
    >>> d = paired_difference([0.9, 0.8, 0.7], [0.85, 0.8, 0.6])   # a - b, pairwise
    >>> round(d.mean, 4), round(d.ci95, 4)
    (0.05, 0.1242)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["Summary", "mean_ci", "paired_difference", "t_quantile"]


class Summary(NamedTuple):
    """Mean of ``n`` values, its ``confidence`` interval half-width and the sample std.

    ``ci95`` is ``None`` when ``n < 2`` (no interval can be estimated from one value); the
    name is kept for the default 95% interval that every report uses.
    """

    mean: float
    ci95: float | None
    std: float | None
    n: int


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t quantile: ``P(|T| <= q) = confidence`` for ``T ~ t(df)``.

    Example:
        >>> round(t_quantile(1), 3), round(t_quantile(2), 3), round(t_quantile(599), 3)
        (12.706, 4.303, 1.964)
    """
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1 but is: {df!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) but is: {confidence!r}")
    from scipy.stats import t  # imported here: only reports need it

    return float(t.ppf(0.5 + confidence / 2.0, df))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean and Student-t interval half-width of ``values`` (see the module docstring).

    Raises:
        ValueError: for no values or a non-finite value (name the value; a diverged run
            must be reported as such, not averaged).
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci needs at least one value but got none")
    bad = [v for v in xs if not math.isfinite(v)]
    if bad:
        raise ValueError(f"mean_ci needs finite values but got {bad[0]!r} among {len(xs)} values")
    n = len(xs)
    m = math.fsum(xs) / n
    if n < 2:
        return Summary(m, None, None, n)
    s = math.sqrt(math.fsum((v - m) ** 2 for v in xs) / (n - 1))
    return Summary(m, t_quantile(n - 1, confidence) * s / math.sqrt(n), s, n)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean of ``a[i] - b[i]`` with its Student-t interval: for two methods evaluated on the
    same items (test tasks, seeds), the paired interval removes the item-to-item variance that
    unpaired intervals count twice.

    Raises:
        ValueError: when ``a`` and ``b`` have different lengths.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values must have the same length but have {len(a)} and {len(b)}")
    return mean_ci([float(x) - float(y) for x, y in zip(a, b)], confidence)
