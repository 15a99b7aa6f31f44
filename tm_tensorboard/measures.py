"""Names and definitions of the measures (tmeasures 1.2.11 conventions), and how results are reduced."""
from __future__ import annotations

import numpy as np

__all__ = ["MEASURE_GROUPS", "DEFINITIONS", "group_of", "safe_divide", "per_channel", "finite_mean"]

# What users ask for (measures=...) -> the per-unit measures it yields.
MEASURE_GROUPS: dict[str, tuple[str, ...]] = {
    "invariance": ("tvi", "svi", "nvi"),
    "same_equivariance": ("tvse", "svse", "nvse"),
    "accuracy": (),
}

DEFINITIONS: dict[str, str] = {
    "tvi": "transformation variance: mean over samples of the std over transformations",
    "svi": "sample variance: mean over transformations of the std over samples",
    "nvi": "normalized variance (invariance): tvi / svi; 0 = invariant, ~1 = varies as much as across samples",
    "tvse": "transformation variance of inverse-transformed feature maps (same-equivariance)",
    "svse": "sample variance of inverse-transformed feature maps (same-equivariance)",
    "nvse": "normalized variance of inverse-transformed feature maps; 0 = same-equivariant",
    "accuracy": "top-1 accuracy of the model output for each transformation",
}


def group_of(measure: str) -> str:
    """The group a per-unit measure belongs to; ValueError listing the valid names otherwise."""
    for group, names in MEASURE_GROUPS.items():
        if measure in names:
            return group
    valid = [m for names in MEASURE_GROUPS.values() for m in names]
    raise ValueError(f"unknown measure {measure!r}; valid measures: {', '.join(valid)}")


def safe_divide(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x / y where y > 0; 1 where y <= 0 and x <= 0 (dead units); +inf where y <= 0 < x. NaN stays NaN."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    out = np.full(np.broadcast(x, y).shape, np.nan)
    positive = y > 0
    np.divide(x, y, out=out, where=positive)
    out[(y <= 0) & (x <= 0)] = 1.0
    out[(y <= 0) & (x > 0)] = np.inf
    return out


def per_channel(values: np.ndarray) -> np.ndarray:
    """Average per-element values of one sample's units [C, ...] over everything but the channel axis."""
    if values.ndim == 0:
        return values.reshape(1)
    if values.ndim == 1:
        return values
    return values.reshape(values.shape[0], -1).mean(axis=1)


def finite_mean(values: np.ndarray) -> float:
    """Mean over finite values (NaN if there are none): per-layer averages skip inf and NaN units."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
