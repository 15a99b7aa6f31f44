"""Names and definitions of the measures, and how per-element components become per-unit values.

Every measure is computed from per-element *components* of one measure group (e.g. the invariance group
streams TV and SV): a plain measure is one component, a ratio measure divides two with ``safe_divide``.
Per channel, components are averaged over positions separately and then divided (tmeasures'
AverageFeatureMaps), so ratios of channel means, not means of ratios. A per-transformation component
(``mse_t``) has one row per transformation, so its measures (ie_t, ee_t) are [T, units].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MeasureSpec",
    "SPECS",
    "PER_TRANSFORMATION_COMPONENTS",
    "MEASURE_GROUPS",
    "DEFINITIONS",
    "group_of",
    "safe_divide",
    "per_channel",
    "finite_mean",
    "finite_row_means",
    "ratio_measure",
    "evaluate",
    "split_components",
]

# Components with one row per transformation: T rows among a group's stacked components, [T, *shape].
PER_TRANSFORMATION_COMPONENTS = ("mse_t",)


@dataclass(frozen=True)
class MeasureSpec:
    name: str
    group: str
    components: tuple[str, ...]  # one: the value itself; two: numerator / denominator (safe_divide)
    description: str

    @property
    def is_ratio(self) -> bool:
        return len(self.components) == 2

    @property
    def per_transformation(self) -> bool:
        """Values [T, units]: one row per transformation, in the set's order."""
        return any(c in PER_TRANSFORMATION_COMPONENTS for c in self.components)


# The Lie derivative's families (lie.py's generators): name, what g_t does, the unit of t.
_LIE_FAMILIES = (
    ("rotation", "rotation", "radians"),
    ("translation_x", "translation along x", "input pixels"),
    ("translation_y", "translation along y", "input pixels"),
    ("scale", "scaling by e^t", "e-folds"),
    ("brightness", "brightness + t", "intensity units"),
)

_SPECS = [
    MeasureSpec("tvi", "invariance", ("tv",), "transformation variance: mean over samples of the std over transformations"),
    MeasureSpec("svi", "invariance", ("sv",), "sample variance: mean over transformations of the std over samples"),
    MeasureSpec("nvi", "invariance", ("tv", "sv"),
                "normalized variance (invariance): tvi / svi; 0 = invariant, ~1 = varies as much as across samples"),
    MeasureSpec("tvse", "same_equivariance", ("tv",), "transformation variance of inverse-transformed feature maps"),
    MeasureSpec("svse", "same_equivariance", ("sv",), "sample variance of inverse-transformed feature maps"),
    MeasureSpec("nvse", "same_equivariance", ("tv", "sv"),
                "normalized variance of inverse-transformed feature maps (same-equivariance); 0 = same-equivariant"),
    MeasureSpec("ee", "equivariance_error", ("mse", "var2"),
                "equivariance error: mean (psi(f(x)) - g^-1 psi(f(g x)))^2 over samples and transformations / "
                "(2 * sample variance of psi(f(x))); 0 = equivariant under the layer's feature action, ~1 = as "
                "different as two random samples"),
    MeasureSpec("ee_t", "equivariance_error", ("mse_t", "var2"),
                "equivariance error per transformation g: mean (psi(f(x)) - g^-1 psi(f(g x)))^2 over samples / "
                "(2 * sample variance of psi(f(x))), one row per transformation; its mean over g != identity is ee, "
                "the identity's row is 0"),
    MeasureSpec("ie_t", "per_transformation", ("mse_t", "var2"),
                "invariance error per transformation g: mean (f(g x) - f(x))^2 over samples / (2 * sample variance "
                "of f(x)), one row per transformation; 0 = invariant to g, ~1 = as different as two random "
                "samples; the identity's row is 0"),
    *(MeasureSpec(f"lie_{name}", f"lie_{name}", ("lsq", "var2"),
                  f"Lie derivative under {what}, t in {unit}: mean over samples of L^2, L = d/dt g_t^-1 psi(f(g_t x)) "
                  "at t = 0, over 2 * the sample variance of psi(f(x)); g_t^-1 moves feature maps back "
                  "(equivariance), other outputs not (invariance); 0 = equivariant / invariant; the limit of central "
                  "differences of the transformations at +-t")
      for name, what, unit in _LIE_FAMILIES),
    MeasureSpec("gfl", "goodfellow", ("local",), "local firing rate: fraction of transformed inputs above the unit's threshold"),
    MeasureSpec("gfg", "goodfellow", ("global",), "global firing rate: fraction of untransformed inputs above the threshold"),
    MeasureSpec("gf", "goodfellow", ("local", "global"),
                "Goodfellow invariance: local / global firing rate; threshold = mean + std * z(0.99) on untransformed inputs"),
    MeasureSpec("anova_f", "anova", ("f",), "one-way ANOVA F statistic over transformation groups"),
    MeasureSpec("anova", "anova", ("reject",),
                "fraction of units whose ANOVA rejects 'the transformation has no effect' at level alpha, Bonferroni-"
                "corrected over the layer's units"),
]

SPECS: dict[str, MeasureSpec] = {s.name: s for s in _SPECS}

# What users ask for (measures=...) -> the per-unit measures it yields, in order.
MEASURE_GROUPS: dict[str, tuple[str, ...]] = {
    **{g: tuple(s.name for s in _SPECS if s.group == g) for g in dict.fromkeys(s.group for s in _SPECS)},
    "accuracy": (),
}

DEFINITIONS: dict[str, str] = {
    **{s.name: s.description for s in _SPECS},
    "accuracy": "top-1 accuracy of the model output for each transformation",
}


def group_of(measure: str) -> str:
    """The group a per-unit measure belongs to; ValueError listing the valid names otherwise."""
    if measure not in SPECS:
        raise ValueError(f"unknown measure {measure!r}; valid measures: {', '.join(SPECS)}")
    return SPECS[measure].group


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


def per_channel(values: np.ndarray, masked: bool = False, channel_axis: int = 0) -> np.ndarray:
    """Average per-element values of one sample's units [C, ...] over everything but the channel axis
    (``channel_axis=-1``: token values [tokens, D], averaged over tokens).

    ``masked``: positions holding NaN were excluded (the equivariance error's central disk) and are skipped.
    """
    if values.ndim == 0:
        return values.reshape(1)
    if values.ndim == 1:
        return values
    flat = np.moveaxis(values, channel_axis, 0).reshape(values.shape[channel_axis], -1)
    return np.nanmean(flat, axis=1) if masked else flat.mean(axis=1)


def evaluate(spec: MeasureSpec, components: dict[str, np.ndarray]) -> np.ndarray:
    """The measure from its (already reduced) components."""
    if spec.is_ratio:
        return safe_divide(components[spec.components[0]], components[spec.components[1]])
    return components[spec.components[0]]


def finite_mean(values: np.ndarray, dead: np.ndarray | None = None) -> float:
    """Mean over finite values, leaving out ``dead`` units if given (NaN if none are left): per-layer
    averages skip inf and NaN units, and by default units without any variance."""
    keep = np.isfinite(values) if dead is None else np.isfinite(values) & ~dead
    return float(values[keep].mean()) if keep.any() else float("nan")


def finite_row_means(values: np.ndarray, dead: np.ndarray | None = None, rows: int = 1) -> np.ndarray:
    """``finite_mean`` of each row of ``values``, its first ``rows`` axes the rows and the rest a layer's units
    (``dead``: broadcast against ``values``), all rows at once: a per-transformation measure's layer mean for
    each transformation ([T, ...]: float64 [T]), or each error-bar replicate's ([K, ...], [K, T, ...])."""
    shape = values.shape[:rows]
    flat = values.reshape(*shape, -1)
    keep = np.isfinite(flat)
    if dead is not None:
        keep &= ~np.broadcast_to(dead, values.shape).reshape(*shape, -1)
    with np.errstate(invalid="ignore", divide="ignore"):  # no unit left: 0 / 0, NaN
        return np.where(keep, flat, 0.0).sum(axis=-1) / keep.sum(axis=-1)


def ratio_measure(group: str) -> str | None:
    """The group's per-unit ratio measure (nvi, nvse, ...), whose 0 / 0 units are the group's dead units."""
    return next((m for m in MEASURE_GROUPS[group] if SPECS[m].is_ratio and not SPECS[m].per_transformation), None)


def split_components(names: tuple[str, ...], rows: np.ndarray, T: int) -> dict[str, np.ndarray]:
    """{component: values} of a group's components stacked along axis 0 of ``rows`` in the order of
    ``names``: T rows [T, ...] for a per-transformation component, one row [...] for any other."""
    out, start = {}, 0
    for name in names:
        if name in PER_TRANSFORMATION_COMPONENTS:
            out[name], start = rows[start : start + T], start + T
        else:
            out[name], start = rows[start], start + 1
    return out
