"""The result of one measurement: per-unit values of every measure for every observed layer."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .capture import LayerInfo
from .measures import MEASURE_GROUPS, SPECS, evaluate, finite_mean, group_of, per_channel, ratio_measure
from .transforms import TransformationSet

__all__ = ["MeasureResult"]

PER = ("channel", "element")


class MeasureResult:
    """Per-unit measures of one measurement, in network order.

    ``get("nvi", "conv1")`` gives one value per channel (components such as TV and SV are averaged over
    positions separately, then divided: tmeasures' AverageFeatureMaps; a token layer's [tokens, D] over
    tokens); ``per="element"`` gives the full unit shape (for the same-equivariance and equivariance error
    of a token layer, the [D, h, w] maps of its ``patch_grid`` action). With ``stratified=True`` values are
    the mean of the per-class results; ``label=k`` gives class k's.
    """

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        transformations: TransformationSet,
        num_samples: int,
        components: dict[str, dict[str, tuple[tuple[str, ...], np.ndarray]]],
        accuracy: np.ndarray | None = None,
        classes: Sequence[int] | None = None,
        masked_groups: Sequence[str] = (),
    ):
        self._layers = {info.name: info for info in layers}
        self.transformations = transformations
        self.num_samples = num_samples
        # group -> layer -> (component names, float64 [classes, components, *shape])
        self._components = components
        self._masked = set(masked_groups)
        self._reduced: dict[tuple, list[dict[str, np.ndarray]]] = {}  # memo of _class_components
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
        return list(self._components)

    @property
    def measures(self) -> list[str]:
        """Per-unit measures available in this result."""
        return [m for group in self._components for m in MEASURE_GROUPS[group]]

    def layer_info(self, layer: str) -> LayerInfo:
        if layer not in self._layers:
            raise KeyError(f"unknown layer {layer!r}; layers: {', '.join(self._layers)}")
        return self._layers[layer]

    def layers_of(self, measure: str) -> list[str]:
        """Layers that have values for ``measure`` (equivariance measures skip layers without feature maps)."""
        group = group_of(measure)
        return [name for name in self._layers if name in self._components.get(group, {})]

    def _class_components(self, measure: str, layer: str, per: str, label: int | None) -> list[dict[str, np.ndarray]]:
        """Per class (or the one class asked for): {component: reduced values}; computed once per layer."""
        group = group_of(measure)
        key = (group, layer, per, label)
        if key not in self._reduced:
            self._reduced[key] = self._reduce(measure, group, layer, per, label)
        return self._reduced[key]

    def _reduce(self, measure: str, group: str, layer: str, per: str, label: int | None) -> list[dict[str, np.ndarray]]:
        if group not in self._components:
            raise KeyError(f"{measure} was not measured; measured: {', '.join(self.measures) or 'none'}")
        info = self.layer_info(layer)
        found = self._components[group].get(layer)
        if found is None:
            raise KeyError(
                f"{measure} is not defined for layer {layer!r}: its output {list(info.unit_shape)} has no "
                "[C, H, W] feature maps to transform back"
                + (" (token outputs get them from a patch_grid feature action: actions=)" if info.tokens else "")
            )
        if per not in PER:
            raise ValueError(f"per must be one of {', '.join(PER)}; got {per!r}")
        names, values = found
        if label is not None:
            if not self.stratified or label not in self.classes:
                raise KeyError(f"no per-class result for label {label!r}; classes: {self.classes}")
            values = values[self.classes.index(label) : self.classes.index(label) + 1]
        masked = group in self._masked
        # Values shaped as a token layer's output are [tokens, D]; its feature maps (same-equivariance, the
        # equivariance error) are [D, h, w], channels first, as every other layer's values are.
        axis = info.channel_axis if values.shape[2:] == info.unit_shape else 0
        reduce = (lambda v: per_channel(v, masked, axis)) if per == "channel" else (lambda v: v)
        return [{name: reduce(c) for name, c in zip(names, per_class)} for per_class in values]

    def get(self, measure: str, layer: str, per: str = "channel", label: int | None = None) -> np.ndarray:
        """Values of ``measure`` for every unit of ``layer``: per channel, or per element (unit shape)."""
        group_of(measure)  # ValueError naming the valid measures
        spec = SPECS[measure]
        values = [evaluate(spec, c) for c in self._class_components(measure, layer, per, label)]
        return np.mean(values, axis=0) if len(values) > 1 else values[0].copy()  # never the memoized array

    def dead(self, measure: str, layer: str, per: str = "channel", label: int | None = None) -> np.ndarray:
        """Units where a ratio measure is 0 / 0 (e.g. no variance at all: tv = sv = 0); all False otherwise.

        Stratified: dead in every class."""
        per_class = self._class_components(measure, layer, per, label)
        spec = SPECS[measure]
        if not spec.is_ratio:
            return np.zeros(per_class[0][spec.components[0]].shape, dtype=bool)
        num, den = spec.components
        return np.all([(c[num] <= 0) & (c[den] <= 0) for c in per_class], axis=0)

    def group_dead(self, measure: str, layer: str, per: str = "channel", label: int | None = None) -> np.ndarray:
        """The dead units of ``measure``'s group: 0 / 0 in its ratio measure (for tvi and svi, those of nvi)."""
        ratio = ratio_measure(group_of(measure))
        if ratio is None:
            return np.zeros(self.get(measure, layer, per, label).shape, dtype=bool)
        return self.dead(ratio, layer, per, label)

    def layer_means(
        self, measure: str, per: str = "channel", label: int | None = None, include_dead: bool = False
    ) -> dict[str, float]:
        """{layer: mean of ``measure`` over the layer's finite live units}, in network order.

        Dead units (no variance at all, ``group_dead``) are 1 in ratio measures by tmeasures' convention,
        which would pull a layer with many of them towards 1; ``include_dead=True`` counts them anyway,
        as tmeasures' layer means do. NaN for a layer without live units.
        """
        out = {}
        for layer in self.layers_of(measure):
            dead = None if include_dead else self.group_dead(measure, layer, per, label)
            out[layer] = finite_mean(self.get(measure, layer, per, label), dead)
        return out

    def __repr__(self) -> str:
        return (
            f"MeasureResult({len(self._layers)} layers, measures={self.measures}, N={self.num_samples}, "
            f"T={len(self.transformations)}{', stratified' if self.stratified else ''})"
        )
