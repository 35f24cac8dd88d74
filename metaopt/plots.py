"""PNG plots of runs (matplotlib, Agg backend: no display needed).

* :func:`learning_curves` - meta-loss before/after adaptation and validation metric
  (with its 95% CI) against meta-iteration, from a run's ``metrics.csv``.
* :func:`sinusoid_fits` - adapted predictions against the true sine for a few tasks.
* :func:`compare_curves` - a metric against meta-iteration, one line per inner optimizer,
  mean over seeds with a Student-t 95% CI band (:func:`metaopt.stats.mean_ci`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

from metaopt import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """Columns of a ``metrics.csv`` as float lists (empty cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k, []).append(float(v) if v not in ("", None) else math.nan)
            except ValueError:
                cols.setdefault(k, []).append(math.nan)
    return cols


def _series(cols: Mapping[str, list[float]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for x, y in zip(cols.get("iteration", []), cols.get(key, [])):
        if not math.isnan(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _smooth(ys: Sequence[float], w: int) -> list[float]:
    """Trailing moving average over ``w`` points (``w = 1``: unchanged)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _marker(xs: Sequence[float]) -> dict[str, Any]:
    """Markers on short series: a line through one point draws nothing."""
    return {"marker": "o", "ms": 3} if len(xs) <= 20 else {}


def learning_curves(metrics_csv: str | Path, out_png: str | Path, *, title: str = "", metric: str = "") -> Path:
    """Training meta-loss (before/after adaptation) and, when the run validated, the
    validation metric (a second panel; none rather than an empty one)."""
    cols = read_metrics(metrics_csv)
    xs, ys = _series(cols, "val_metric")
    fig, axes = plt.subplots(1, 2 if xs else 1, figsize=(11 if xs else 6, 4), squeeze=False)
    ax = axes[0][0]
    drawn = False
    for key, label in (("loss_before", "before adaptation"), ("meta_loss", "after adaptation (meta-loss)")):
        lx, ly = _series(cols, key)
        if lx:
            w = max(1, len(ly) // 50)
            ax.plot(lx, _smooth(ly, w), label=label + (f", mean of {w}" if w > 1 else ""), lw=1, **_marker(lx))
            drawn = True
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("query loss (train tasks)")
    if any(y > 0 for y in cols.get("loss_before", []) if not math.isnan(y)):
        ax.set_yscale("log")
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite training loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    if xs:
        ax = axes[0][1]
        _, cis = _series(cols, "val_ci95")
        ax.plot(xs, ys, marker="o", ms=3, label="after adaptation (eval steps)")
        if len(cis) == len(ys):
            ax.fill_between(xs, [y - c for y, c in zip(ys, cis)], [y + c for y, c in zip(ys, cis)], alpha=0.25)
        bx, by = _series(cols, "val_before")
        if bx:
            ax.plot(bx, by, ls="--", label="before adaptation", **_marker(bx))
        ax.legend()
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(f"validation {metric}".strip())
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_png)


def sinusoid_fits(curves: Sequence[Mapping[str, Any]], out_png: str | Path, *, title: str = "") -> Path:
    """One panel per task: true sine, support points, predictions before and after adaptation.

    Each curve: ``x`` (grid), ``true``, ``before``, ``after`` (lists of floats on the grid),
    ``support_x``, ``support_y``, and optionally ``steps``.
    """
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), squeeze=False)
    for ax, c in zip(axes[0], curves):
        ax.plot(c["x"], c["true"], "k-", lw=2, label="true sine")
        ax.plot(c["x"], c["before"], "--", color="tab:gray", label="meta-init (before)")
        ax.plot(c["x"], c["after"], "-", color="tab:red", label=f"after {c.get('steps', '')} steps".replace("  ", " "))
        ax.scatter(c["support_x"], c["support_y"], color="tab:blue", zorder=3, s=18, label="support")
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_png)


def compare_curves(
    runs: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]],
    out_png: str | Path,
    *,
    metric: str = "metric",
    title: str = "",
    ylabel: str | None = None,
) -> Path:
    """Mean over seeds with a 95% CI band, one line per inner optimizer.

    Args:
        runs: ``{label: [(iterations, values), ...]}``, one pair per seed. Seeds are
            aligned on the iterations they share.
        ylabel: the y-axis label; default ``"validation <metric>"``, or ``metric`` itself
            when it names its own data in parentheses (``"meta-loss (train)"``).
    """
    if ylabel is None:
        ylabel = metric if metric.endswith(")") else f"validation {metric}"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = 0
    for label, seeds in runs.items():
        common = sorted(set.intersection(*(set(xs) for xs, _ in seeds))) if seeds else []
        if not common:
            continue
        table = [[dict(zip(xs, ys))[x] for x in common] for xs, ys in seeds]
        mean, ci = [], []
        for j in range(len(common)):
            vals = [row[j] for row in table]
            m, c = mean_ci(vals)
            mean.append(m)
            ci.append(c)
        ax.plot(common, mean, marker="o", ms=3, label=f"{label} (n={len(seeds)})")
        ax.fill_between(common, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)], alpha=0.2)
        drawn += 1
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no iterations shared by the seeds", ha="center", va="center", transform=ax.transAxes)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out_png)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and Student-t 95% half-width of :func:`metaopt.stats.mean_ci`, for drawing:
    0 for one value (a band of no width), NaN for none or a non-finite value."""
    xs = [float(v) for v in values]
    if not xs or not all(math.isfinite(v) for v in xs):
        return math.nan, math.nan
    s = stats.mean_ci(xs)
    return s.mean, 0.0 if s.ci95 is None else s.ci95


def _save(fig: Any, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["compare_curves", "learning_curves", "mean_ci", "read_metrics", "sinusoid_fits"]
