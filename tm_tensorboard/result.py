"""The result of one measurement: per-unit values of every measure for every observed layer."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .capture import LayerInfo
from .measures import (
    MEASURE_GROUPS,
    PER_TRANSFORMATION_COMPONENTS,
    SPECS,
    evaluate,
    finite_mean,
    finite_row_means,
    group_of,
    per_channel,
    ratio_measure,
    split_components,
)
from .shards import standard_error
from .transforms import TransformationSet

__all__ = ["MeasureResult"]

PER = ("channel", "element")


class MeasureResult:
    """Per-unit measures of one measurement, in network order.

    ``get("nvi", "conv1")`` gives one value per channel (components such as TV and SV are averaged over
    positions separately, then divided: tmeasures' AverageFeatureMaps; a token layer's [tokens, D] over
    tokens); ``per="element"`` gives the full unit shape (for the same-equivariance and equivariance error
    of a token layer, the [D, h, w] maps of its ``patch_grid`` action). With ``stratified=True`` values are
    the mean of the per-class results; ``label=k`` gives class k's. Per-transformation measures (ie_t,
    ee_t) have one row per transformation of ``transformations``: [T, channels] or [T, *unit_shape].
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
        shards: dict[str, dict[str, np.ndarray]] | None = None,
        derived: dict[str, str] | None = None,
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
        # group -> layer -> float64 [K, classes, components, channels]: the components without each shard
        self._shards = shards or {}
        self._derived = dict(derived or {})

    @property
    def derived(self) -> dict[str, str]:
        """{BatchNorm layer: the layer whose measures gave its own} for the eval-mode BatchNorms measured from
        their inputs' states instead of their outputs (``dedupe_batchnorm``, ``derived.py``): equal up to the
        float rounding of the BatchNorm's output, which measuring it directly adds."""
        return dict(self._derived)

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
        if per == "element" and info.positions is not None:
            raise ValueError(f"layer {layer!r} was measured on {info.positions} sampled positions per channel "
                             "(positions=): it has per-channel values only; measure without positions= for elements")
        names, values = found
        if label is not None:
            if not self.stratified or label not in self.classes:
                raise KeyError(f"no per-class result for label {label!r}; classes: {self.classes}")
            values = values[self.classes.index(label) : self.classes.index(label) + 1]
        masked = group in self._masked
        # Values shaped as a token layer's output are [tokens, D]; its feature maps (same-equivariance, the
        # equivariance error) are [D, h, w], channels first, as every other layer's values are.
        axis = info.channel_axis if values.shape[2:] == info.unit_shape else 0

        def reduce(name: str, c: np.ndarray) -> np.ndarray:
            if per == "element":
                return c
            if name in PER_TRANSFORMATION_COMPONENTS:  # [T, *shape]: each transformation's row on its own
                return np.stack([per_channel(row, masked, axis) for row in c])
            return per_channel(c, masked, axis)

        T = len(self.transformations)
        return [{name: reduce(name, c) for name, c in split_components(names, per_class, T).items()}
                for per_class in values]

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
        """The dead units of ``measure``'s group: 0 / 0 in its ratio measure (for tvi and svi, those of nvi);
        for a per-transformation measure its own 0 / 0 entries, [T, units] (no sample variance and no
        difference under that transformation: the identity's entry of every unit without sample variance)."""
        group = group_of(measure)
        ratio = measure if SPECS[measure].per_transformation else ratio_measure(group)
        if ratio is None:
            return np.zeros(self.get(measure, layer, per, label).shape, dtype=bool)
        return self.dead(ratio, layer, per, label)

    def layer_mean(
        self, measure: str, layer: str, per: str = "channel", label: int | None = None, include_dead: bool = False
    ) -> float | np.ndarray:
        """The mean of ``measure`` over the layer's finite live units; for a per-transformation measure
        (ie_t, ee_t) float64 [T], the mean for each transformation.

        Dead units (no variance at all, ``group_dead``) are 1 in ratio measures by tmeasures' convention,
        which would pull a layer with many of them towards 1; ``include_dead=True`` counts them anyway,
        as tmeasures' layer means do. NaN for a layer without live units. (Per transformation, a unit
        without sample variance is dead or inf in every row: each row's mean is over the units with it.)
        """
        values = self.get(measure, layer, per, label)
        dead = None if include_dead else self.group_dead(measure, layer, per, label)
        return (finite_row_means if SPECS[measure].per_transformation else finite_mean)(values, dead)

    def layer_means(
        self, measure: str, per: str = "channel", label: int | None = None, include_dead: bool = False
    ) -> dict[str, float] | dict[str, np.ndarray]:
        """{layer: ``layer_mean``} in network order: floats, or float64 [T] for a per-transformation measure."""
        return {layer: self.layer_mean(measure, layer, per, label, include_dead) for layer in self.layers_of(measure)}

    @property
    def shards(self) -> int:
        """The probe's error-bar shards (0: no error bars; too small a probe, or ``error_bars=False``)."""
        return next((len(v) for layers in self._shards.values() for v in layers.values()), 0)

    def has_error_bars(self, measure: str) -> bool:
        """Whether ``stderr`` has values for ``measure`` (its group was measured in shards)."""
        return bool(self._shards.get(group_of(measure)))

    def _replicates(self, measure: str, layer: str, label: int | None) -> np.ndarray:
        """[K, channels] ([K, T, channels] per transformation): ``measure`` per channel as the probe without each
        shard measured it (stratified: the mean of its per-class values)."""
        group = group_of(measure)
        self._class_components(measure, layer, "channel", label)  # KeyError / ValueError as get() gives them
        found = self._shards.get(group, {}).get(layer)
        if found is None:
            why = "error_bars=False or a probe under two shards of samples" if not self._shards else "its group has none"
            raise KeyError(f"no standard error for {measure} of layer {layer!r}: {why}")
        names = next(iter(self._components[group].values()))[0]  # (a group's components, the same in each layer)
        if label is not None:
            found = found[:, self.classes.index(label) : self.classes.index(label) + 1]
        spec = SPECS[measure]
        # every shard and class at once: the components' axis first, as split_components takes them
        values = evaluate(spec, split_components(names, np.moveaxis(found, 2, 0), len(self.transformations)))
        if spec.per_transformation:  # [T, K, classes, channels]
            values = np.moveaxis(values, 0, 2)
        return values.mean(axis=1)

    def stderr(self, measure: str, layer: str, per: str = "layer", label: int | None = None,
               include_dead: bool = False) -> float | np.ndarray:
        """Jackknife standard error of ``measure`` over the probe's shards (``shards.py``): of the layer mean as
        ``layer_mean`` takes it ([T] for a per-transformation measure), or (``per="channel"``) of each
        channel's value."""
        values = self._replicates(measure, layer, label)
        if per == "channel":
            return standard_error(values)
        if per != "layer":
            raise ValueError(f"per must be 'layer' or 'channel' for a standard error; got {per!r}")
        dead = None if include_dead else self.group_dead(measure, layer, "channel", label)
        if SPECS[measure].per_transformation:
            return standard_error(finite_row_means(values, dead, rows=2))
        return float(standard_error(finite_row_means(values, dead)))

    def layer_stderrs(self, measure: str, label: int | None = None,
                      include_dead: bool = False) -> dict[str, float] | dict[str, np.ndarray]:
        """{layer: standard error of its mean}, in network order (``stderr`` of every layer)."""
        return {layer: self.stderr(measure, layer, label=label, include_dead=include_dead)
                for layer in self.layers_of(measure)}

    def __repr__(self) -> str:
        return (
            f"MeasureResult({len(self._layers)} layers, measures={self.measures}, N={self.num_samples}, "
            f"T={len(self.transformations)}{', stratified' if self.stratified else ''})"
        )
