"""Small statistics for comparing methods over seeds: mean and standard error, Welch's 95%
interval of a difference of means, the paired interval over shared seeds, and linear
interpolation of a curve at a common x.

Pure Python (scipy only for the t quantile); knows nothing of runs, MLflow or reports.
"""
from __future__ import annotations

import math


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); SE is nan for one value."""
    if not values:
        raise ValueError("mean_se of no values")
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def _t_interval(mean: float, se: float, df: float, level: float) -> dict[str, float]:
    """``mean`` +- the t quantile at ``df`` times ``se``, and the minimum detectable effect: the
    smallest true difference this ``se`` would find with 80% power at this level. A zero ``se``
    gives a zero-width interval and an mde of 0."""
    from scipy.stats import t as student_t

    if se == 0:
        return {"mean": mean, "ci95_low": mean, "ci95_high": mean, "mde": 0.0}
    q = student_t.ppf(0.5 + level / 2, df)
    return {"mean": mean, "ci95_low": mean - q * se, "ci95_high": mean + q * se,
            "mde": (q + student_t.ppf(0.8, df)) * se}


def welch_diff(a: list[float], b: list[float], level: float = 0.95) -> dict[str, float]:
    """mean(a) - mean(b) with Welch's t interval (unequal variances, Welch-Satterthwaite df).

    ``mde``: the minimum detectable effect, the smallest true difference that this many seeds
    with this spread would find with 80% power. Needs two values on each side; returns nan
    bounds otherwise, and a zero-width interval when
    both sides have no spread.
    """
    ma, sa = mean_se(a)
    mb, sb = mean_se(b)
    diff = ma - mb
    if len(a) < 2 or len(b) < 2:
        return {"mean": diff, "ci95_low": math.nan, "ci95_high": math.nan, "df": math.nan,
                "mde": math.nan}
    se2 = sa ** 2 + sb ** 2
    if se2 == 0:
        return {**_t_interval(diff, 0.0, math.inf, level), "df": math.inf}
    df = se2 ** 2 / (sa ** 4 / (len(a) - 1) + sb ** 4 / (len(b) - 1))
    return {**_t_interval(diff, math.sqrt(se2), df, level), "df": df}


def paired_diff(a: dict[int, float], b: dict[int, float], level: float = 0.95
                ) -> dict[str, float]:
    """mean(a[s] - b[s]) over the seeds ``s`` both hold, with the paired t interval (n - 1 df).

    Seeds are paired by design (same seed: same warm-up checkpoint, prompt order and
    evaluation draws), so what a seed does to both methods cancels: the interval is narrower
    than Welch's when the two methods' accuracies move together over seeds. ``n_pairs``: the
    shared seeds; ``mde`` as in :func:`welch_diff`. Needs two shared seeds; nan bounds otherwise.
    """
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if len(diffs) < 2:
        mean = diffs[0] if diffs else math.nan
        return {"mean": mean, "ci95_low": math.nan, "ci95_high": math.nan, "n_pairs": len(diffs),
                "mde": math.nan}
    mean, se = mean_se(diffs)
    return {**_t_interval(mean, se, len(diffs) - 1, level), "n_pairs": len(diffs)}


def interp(xs: list[float], ys: list[float], x: float) -> float:
    """y at ``x`` on the piecewise-linear curve through (xs, ys) (xs increasing); nan outside."""
    if not xs or x < xs[0] or x > xs[-1]:
        return math.nan
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]
