"""The streaming state of each measure group on one activation, and how it is finalized.

A ``LayerMeasure`` is updated inside the forward hook with the activation of a chunk ([b·T, *unit_shape]
in sample-major order) and keeps one set of streaming states per class (one class unless stratified).
Most groups need one pass over the transformed probe; Goodfellow's thresholds need the untransformed
probe first, so a group declares the passes (*phases*) it takes part in. ``compute`` returns the
per-element components of the group, e.g. (tv, sv), from which ``measures.evaluate`` makes the measures.
"""
from __future__ import annotations

import math
import statistics as pystats
from dataclasses import dataclass, field
from typing import Callable

import torch

from .actions import FeatureAction, identity
from .capture import LayerInfo
from .f_distribution import f_critical_value
from .statistics import SampleMoments, SampleSum, Scratch, StreamingState, TransformationSpread
from .transforms import TransformationSet

__all__ = ["MeasureOptions", "Chunk", "LayerMeasure", "GROUPS", "UNTRANSFORMED_PHASES", "TRANSFORMED"]

TRANSFORMED = "transformed"
UNTRANSFORMED_PHASES = ("thresholds", "global")  # passes over the untransformed probe, in order


@dataclass
class MeasureOptions:
    """Settings of the measures that have any."""

    actions: Callable[[str], FeatureAction] = field(default=lambda layer: identity())
    disk: bool = False  # equivariance error: only positions inside the central disk
    alpha: float = 0.01  # ANOVA significance level, Bonferroni-corrected over each layer's units
    firing_quantile: float = 0.99  # Goodfellow: threshold = mean + std · Φ⁻¹(quantile)


@dataclass
class Chunk:
    """What the hooks need to know about the chunk being forwarded."""

    size: int
    groups: list[tuple[int, torch.Tensor | None]]  # (class state index, row indices on the device or None)
    scratch: Scratch = field(default_factory=Scratch)  # shared work buffer of the states' updates

    def rows(self, values: torch.Tensor):
        """(class index, the chunk's rows of that class) pairs of values [b, ...]."""
        for k, rows in self.groups:
            yield k, values if rows is None else values.index_select(0, rows)


class LayerMeasure:
    """Base: one measure group's states on one activation, one set per class."""

    group = ""
    components: tuple[str, ...] = ()
    phases: tuple[str, ...] = (TRANSFORMED,)

    def __init__(self, info: LayerInfo, transformations: TransformationSet, num_classes: int,
                 device: torch.device, options: MeasureOptions):
        self.info = info
        self.transformations = transformations
        self.T = len(transformations)
        self.options = options
        self.unit_shape = self.feature_shape(info)  # shape of the components per element
        self.units = math.prod(self.unit_shape)
        self.per_class = [self.make_states(device) for _ in range(num_classes)]

    @staticmethod
    def applies(info: LayerInfo) -> bool:
        return True

    def feature_shape(self, info: LayerInfo) -> tuple[int, ...]:
        return info.unit_shape

    def make_states(self, device: torch.device) -> dict[str, StreamingState]:
        raise NotImplementedError

    def states(self, phase: str) -> list[list[StreamingState]]:
        """Per class, the states a phase updates (merged across ranks after the phase)."""
        return [list(states.values()) for states in self.per_class]

    def update(self, phase: str, activation: torch.Tensor, chunk: Chunk) -> None:
        raise NotImplementedError

    def finish(self, phase: str) -> None:
        """Called after a phase (and its cross-rank merge)."""

    def compute_class(self, states: dict[str, StreamingState]) -> list[torch.Tensor]:
        raise NotImplementedError

    def compute(self) -> torch.Tensor:
        """[classes, components, units] float64 on the device."""
        return torch.stack([torch.stack(self.compute_class(states)) for states in self.per_class])


class VarianceMeasure(LayerMeasure):
    """Invariance: TV (mean over samples of std over transformations), SV (mean over t of std over samples)."""

    group = "invariance"
    components = ("tv", "sv")

    def make_states(self, device):
        return {"spread": TransformationSpread((self.units,), device), "moments": SampleMoments((self.T, self.units), device)}

    def values(self, activation: torch.Tensor) -> torch.Tensor:
        return activation

    def update(self, phase, activation, chunk):
        values = self.values(activation).reshape(chunk.size, self.T, self.units)
        for k, rows in chunk.rows(values):
            self.per_class[k]["spread"].update(rows, chunk.scratch)
            self.per_class[k]["moments"].update(rows, chunk.scratch)

    def compute_class(self, states):
        return [states["spread"].mean(), states["moments"].std().mean(dim=0)]


class SameEquivarianceMeasure(VarianceMeasure):
    """The variance measures on t⁻¹(φ(t(x))): feature maps moved back by the inverse transformation."""

    group = "same_equivariance"

    @staticmethod
    def applies(info):
        return info.is_spatial

    def values(self, activation):
        return self.transformations.invert_features(activation)


class EquivarianceErrorMeasure(LayerMeasure):
    """E = mean over samples, transformations ≠ identity and positions of (ψ(φ(x)) − g⁻¹ψ(φ(g x)))²,
    normalized by 2 · the sample variance of ψ(φ(x)) (what two random samples would give)."""

    group = "equivariance_error"
    components = ("mse", "var2")

    def __init__(self, info, transformations, num_classes, device, options):
        self.action = options.actions(info.name)
        self.action.check(info.unit_shape[0], transformations)
        self.identity = transformations.identity_index
        super().__init__(info, transformations, num_classes, device, options)

    @staticmethod
    def applies(info):
        return info.is_spatial

    def feature_shape(self, info):
        return tuple(self.action.psi(torch.empty((1, *info.unit_shape), device="meta")).shape[1:])

    def make_states(self, device):
        return {"squared": SampleSum((self.T, self.units), device), "reference": SampleMoments((self.units,), device)}

    def update(self, phase, activation, chunk):
        psi = self.action.psi(activation)
        back = self.action.undo(psi, self.transformations).reshape(chunk.size, self.T, self.units)
        reference = psi.reshape(chunk.size, self.T, self.units)[:, self.identity]
        difference = back.sub_(reference.unsqueeze(1)).square_()
        for k, rows in chunk.rows(difference):
            self.per_class[k]["squared"].update(rows)
        for k, rows in chunk.rows(reference):
            self.per_class[k]["reference"].update(rows, chunk.scratch)

    def compute_class(self, states):
        keep = [t for t in range(self.T) if t != self.identity]
        mse = states["squared"].mean()[keep].mean(dim=0)
        var2 = 2 * states["reference"].var()
        if self.options.disk:
            outside = ~_central_disk(self.unit_shape, mse.device).reshape(-1)
            mse, var2 = mse.masked_fill(outside, float("nan")), var2.masked_fill(outside, float("nan"))
        return [mse, var2]


def _central_disk(unit_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Boolean [C, h, w]: positions whose centre lies within the disk inscribed in the feature map."""
    channels, h, w = unit_shape
    y = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h * 2 - 1
    x = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w * 2 - 1
    inside = (y.view(-1, 1) ** 2 + x.view(1, -1) ** 2) <= 1.0
    return inside.expand(channels, h, w)


class GoodfellowMeasure(LayerMeasure):
    """Goodfellow et al.'s firing-rate invariance as in tmeasures: a unit fires above its threshold
    (mean + std · Φ⁻¹(0.99) over the untransformed probe); local = firing rate over transformed inputs,
    global = over untransformed ones; invariance = local / global."""

    group = "goodfellow"
    components = ("local", "global")
    phases = ("thresholds", "global", TRANSFORMED)

    _STATE_OF_PHASE = {"thresholds": "moments", "global": "global", TRANSFORMED: "local"}

    def make_states(self, device):
        return {
            "moments": SampleMoments((self.units,), device),
            "global": SampleSum((self.units,), device),
            "local": SampleSum((self.units,), device),
        }

    def states(self, phase):
        return [[states[self._STATE_OF_PHASE[phase]]] for states in self.per_class]

    def finish(self, phase):
        if phase == "thresholds":
            z = pystats.NormalDist().inv_cdf(self.options.firing_quantile)
            self.thresholds = [
                s["moments"].mean + z * s["moments"].std().nan_to_num(0.0).clamp_min(1e-16) for s in self.per_class
            ]

    def update(self, phase, activation, chunk):
        if phase == "thresholds":
            for k, rows in chunk.rows(activation.reshape(chunk.size, self.units)):
                self.per_class[k]["moments"].update(rows, chunk.scratch)
            return
        T = 1 if phase == "global" else self.T
        for k, rows in chunk.rows(activation.reshape(chunk.size, T, self.units)):
            fired = (rows > self.thresholds[k]).float().mean(dim=1)  # per sample: fraction of its T inputs
            self.per_class[k][self._STATE_OF_PHASE[phase]].update(fired)

    def compute_class(self, states):
        return [states["local"].mean(), states["global"].mean()]


class AnovaMeasure(LayerMeasure):
    """One-way ANOVA per unit with the T transformations as groups: F = (SSB/(T−1)) / (SSW/(N·T−T)), and
    whether F exceeds the critical value at α / units (Bonferroni over the layer's units)."""

    group = "anova"
    components = ("f", "reject")

    def make_states(self, device):
        return {"moments": SampleMoments((self.T, self.units), device)}

    def update(self, phase, activation, chunk):
        values = activation.reshape(chunk.size, self.T, self.units)
        for k, rows in chunk.rows(values):
            self.per_class[k]["moments"].update(rows, chunk.scratch)

    def compute_class(self, states):
        moments = states["moments"]
        n, T = moments.count, self.T
        between = n * (moments.mean - moments.mean.mean(dim=0)).square().sum(dim=0)
        within = moments.m2.sum(dim=0)
        f = (between / (T - 1)) / (within / (n * T - T))
        critical = f_critical_value(self.options.alpha / self.units, T - 1, n * T - T) if n > 1 else math.inf
        return [f, (f > critical).double()]


GROUPS: dict[str, type[LayerMeasure]] = {
    m.group: m
    for m in (VarianceMeasure, SameEquivarianceMeasure, EquivarianceErrorMeasure, GoodfellowMeasure, AnovaMeasure)
}
