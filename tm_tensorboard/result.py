"""The result of one measurement: per-unit values of every measure for every observed layer."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .capture import LayerInfo
from .measures import MEASURE_GROUPS, finite_mean, group_of, per_channel, safe_divide
from .transforms import TransformationSet

__all__ = ["MeasureResult"]

PER = ("channel", "element")


class MeasureResult:
    """Per-unit measures of one measurement, in network order.

    ``get("nvi", "conv1")`` gives one value per channel (tmeasures' AverageFeatureMaps: TV and SV are
    averaged over positions separately, then divided); ``per="element"`` gives the full unit shape.
    With ``stratified=True`` values are the mean of the per-class results; ``label=k`` gives class k's.
    """

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        transformations: TransformationSet,
        num_samples: int,
        variances: dict[str, dict[str, np.ndarray]],
        accuracy: np.ndarray | None = None,
        classes: Sequence[int] | None = None,
    ):
        self._layers = {info.name: info for info in layers}
        self.transformations = transformations
        self.num_samples = num_samples
        self._variances = variances  # group -> layer -> [classes, 2 (TV, SV), *unit_shape] float64
        self.accuracy = accuracy
        self.classes = list(classes) if classes is not None else None

    @property
    def layers(self) -> list[str]:
        """Observed activations in network (execution) order."""
        return list(self._layers)

    @property
    def stratified(self) -> bool:
        return self.classes is not None

    @property
    def groups(self) -> list[str]:
        """Measure groups in this result, e.g. ["invariance", "same_equivariance"]."""
        return list(self._variances)

    @property
    def measures(self) -> list[str]:
        """Per-unit measures available in this result."""
        return [m for group in self._variances for m in MEASURE_GROUPS[group]]

    def layer_info(self, layer: str) -> LayerInfo:
        if layer not in self._layers:
            raise KeyError(f"unknown layer {layer!r}; layers: {', '.join(self._layers)}")
        return self._layers[layer]

    def layers_of(self, measure: str) -> list[str]:
        """Layers that have values for ``measure`` (same-equivariance skips layers without feature maps)."""
        group = group_of(measure)
        return [name for name in self._layers if name in self._variances.get(group, {})]

    def get(self, measure: str, layer: str, per: str = "channel", label: int | None = None) -> np.ndarray:
        """Values of ``measure`` for every unit of ``layer``: per channel, or per element (unit shape)."""
        group = group_of(measure)
        if group not in self._variances:
            raise KeyError(f"{measure} was not measured; measured: {', '.join(self.measures) or 'none'}")
        info = self.layer_info(layer)
        stats = self._variances[group].get(layer)
        if stats is None:
            raise KeyError(
                f"{measure} is not defined for layer {layer!r}: its output {list(info.unit_shape)} has no "
                "[C, H, W] feature maps to inverse-transform"
            )
        if per not in PER:
            raise ValueError(f"per must be one of {', '.join(PER)}; got {per!r}")
        if label is not None:
            if not self.stratified or label not in self.classes:
                raise KeyError(f"no per-class result for label {label!r}; classes: {self.classes}")
            stats = stats[self.classes.index(label) : self.classes.index(label) + 1]
        reduce = per_channel if per == "channel" else (lambda v: v)
        kind = measure[:2]  # tv, sv or nv
        values = []
        for tv_sv in stats:
            tv, sv = reduce(tv_sv[0]), reduce(tv_sv[1])
            values.append(tv if kind == "tv" else sv if kind == "sv" else safe_divide(tv, sv))
        return np.mean(values, axis=0) if len(values) > 1 else values[0]

    def layer_means(self, measure: str, per: str = "channel", label: int | None = None) -> dict[str, float]:
        """{layer: mean of ``measure`` over the layer's finite units}, in network order."""
        return {layer: finite_mean(self.get(measure, layer, per, label)) for layer in self.layers_of(measure)}

    def __repr__(self) -> str:
        return (
            f"MeasureResult({len(self._layers)} layers, measures={self.measures}, N={self.num_samples}, "
            f"T={len(self.transformations)}{', stratified' if self.stratified else ''})"
        )
