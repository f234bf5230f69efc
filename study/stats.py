"""Paired statistics of the study: per-seed differences, Student-t 95 % confidence intervals and the verdict rule.

The cells of one seed share the data order and the augmentation draws (train.py seeds both from ``--seed``), so
the comparison of two norms at one batch size is paired by seed: d_s = mAP(GN, s) - mAP(BN, s). Its mean and a
two-sided 95 % interval ``mean ± t(0.975, n-1) · sd / sqrt(n)`` say what the seeds support; the verdict names a
winner only when the interval excludes 0. The same applies to a norm's own trend between two batch sizes.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

# Two-sided 95 % quantiles t(0.975, df) of Student's t distribution for df = 1..30 (standard table values).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """t(0.975, df); beyond the table the Cornish-Fisher expansion around z = 1.95996 (error < 1e-3 at df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Interval:
    """Mean of n paired differences with its 95 % t interval (half-width NaN when n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_interval(values: Iterable[float]) -> Interval:
    """The mean of ``values`` and the half-width of its two-sided 95 % Student-t interval."""
    v = [float(x) for x in values if not math.isnan(float(x))]
    if not v:
        return Interval(math.nan, math.nan, 0)
    if len(v) == 1:
        return Interval(v[0], math.nan, 1)
    return Interval(statistics.fmean(v), t975(len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v)), len(v))


def row_key(row: dict[str, Any]) -> tuple[str, int, int]:
    """(norm in lower case, batch size, seed) of a study.csv row: the same key as ``Cell.key``."""
    return str(row["norm"]).lower(), int(row["batch_size"]), int(row["seed"])


def paired_differences(rows: Iterable[dict[str, Any]], a: tuple[str, int], b: tuple[str, int],
                       metric: str = "mAP50-95") -> dict[int, float]:
    """{seed: metric(a) - metric(b)} over the seeds where both (norm, batch) cells finished with a value."""
    by: dict[tuple[str, int, int], float] = {}
    for r in rows:
        by[row_key(r)] = float(r[metric])
    seeds = sorted({s for (_, _, s) in by})
    out = {}
    for s in seeds:
        x, y = by.get((a[0].lower(), a[1], s)), by.get((b[0].lower(), b[1], s))
        if x is not None and y is not None and not (math.isnan(x) or math.isnan(y)):
            out[s] = x - y
    return out


def verdict(iv: Interval, a: str, b: str) -> str:
    """'<a> better' / '<b> better' when the interval excludes 0, else 'no difference detected' (also for n < 2)."""
    if iv.n < 2 or math.isnan(iv.half_width):
        return "no interval (fewer than 2 seeds)"
    if iv.low > 0:
        return f"{a} better"
    if iv.high < 0:
        return f"{b} better"
    return "no difference detected"
