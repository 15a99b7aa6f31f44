"""Upper quantiles of the F distribution (ANOVA critical values) without SciPy.

The survival function is a regularized incomplete beta function, evaluated with its continued fraction
(modified Lentz); the quantile is found by bisection in log space, which is robust far in the tail where
Bonferroni-corrected levels (α / units) live.
"""
from __future__ import annotations

import math

__all__ = ["f_survival", "f_critical_value"]


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                          -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def f_survival(f: float, d1: float, d2: float) -> float:
    """P(F > f) for F with (d1, d2) degrees of freedom."""
    if f <= 0:
        return 1.0
    return _regularized_beta(d2 / 2.0, d1 / 2.0, d2 / (d2 + d1 * f))


def f_critical_value(alpha: float, d1: float, d2: float) -> float:
    """The f with P(F > f) = alpha."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if d1 <= 0 or d2 <= 0:
        raise ValueError(f"degrees of freedom must be positive, got ({d1}, {d2})")
    lo, hi = -30.0, 30.0  # log(f)
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if f_survival(math.exp(mid), d1, d2) > alpha:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2.0)
