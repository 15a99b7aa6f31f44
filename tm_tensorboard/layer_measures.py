"""The streaming state of each measure group on one activation, and how it is finalized.

A ``LayerMeasure`` is updated inside the forward hook with the activation of a chunk ([b·T, *unit_shape]
in sample-major order) and keeps one set of streaming states per class (one class unless stratified).
Each group's per-chunk update is one fused function of the activation and its states' tensors
(``fused.py``): one compiled region per layer and chunk, or a constant handful of eager ops. Most groups
need one pass over the transformed probe; Goodfellow's thresholds need the untransformed probe first, and
each Lie derivative one pass with forward-mode tangents (``lie.py``), so a group declares the passes
(*phases*) it takes part in. ``compute`` returns the per-element components of the group, e.g. (tv, sv),
from which ``measures.evaluate`` makes the measures.
"""
from __future__ import annotations

import math
import statistics as pystats
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad

from . import heap, kept_states, native
from .actions import FeatureAction, identity
from .capture import LayerInfo
from .f_distribution import f_critical_value
from .fused import fused
from .lie import GENERATORS, Generator, TangentError, along_flow
from .shards import channel_means, leave_out, merge_into, moments_without, sum_without
from .statistics import (
    SampleMoments,
    SampleSum,
    Scratch,
    StreamingState,
    state_dtype,
    fold_moments,
    fold_spread,
    fold_sum,
    mean_of_sum,
    unbiased_var,
)
from .transforms import TransformationSet

__all__ = ["MeasureOptions", "Chunk", "LayerMeasure", "GROUPS", "UNTRANSFORMED_PHASES", "LIE_PHASES", "TRANSFORMED",
           "update_together"]

TRANSFORMED = "transformed"
# The most samples one update folds in at once: the statistics over samples are reductions over the
# outermost dimension, and a compiled kernel reads one stream per sample in its innermost loop; beyond ~16
# streams the CPU's prefetchers lose them (benchmarks/bench_blocks.py: a [64, 16, 32768] chunk took 33 ms in
# one update, 21 ms in blocks of 16; its squared differences 33 ms, 12 ms in blocks of 8). Any blocking
# gives the same states up to rounding (Chan's merge).
SAMPLE_BLOCK = 16
DIFFERENCE_BLOCK = 8  # the same for squared differences from the untransformed sample: two streams per sample
BLOCKED_BYTES = 2**20  # chunks of fewer bytes are folded in at once (in cache: the streams cost nothing)
# Chunks of at most this many samples are folded in by pairs on CPU (``Chunk.hold``): a chunk of 4 samples
# reads and writes its layer's float64 states (32 bytes per transformation and unit) for 16 bytes of
# activations, and a pair halves that traffic (benchmarks/README.md, "Pairs of chunks").
PAIRED_SAMPLES = 4
UNTRANSFORMED_PHASES = ("thresholds", "global")  # passes over the untransformed probe, in order
LIE_PHASES = tuple(GENERATORS)  # one forward-mode pass over the untransformed probe per generator


@dataclass
class MeasureOptions:
    """Settings of the measures that have any."""

    actions: Callable[[str], FeatureAction] = field(default=lambda layer: identity())
    disk: bool = False  # equivariance error: only positions inside the central disk
    alpha: float = 0.01  # ANOVA significance level, Bonferroni-corrected over each layer's units
    firing_quantile: float = 0.99  # Goodfellow: threshold = mean + std · Φ⁻¹(quantile)
    state_dtype: torch.dtype = torch.float64  # of the streaming states (statistics.state_dtype)
    positions_seed: int = 0  # which positions a layer sampled with LayerInfo.positions keeps (positions.py)


@dataclass
class Chunk:
    """What the hooks need to know about the chunk being forwarded."""

    size: int
    groups: list[tuple[int, torch.Tensor | None]]  # (class state index, row indices on the device or None)
    scratch: Scratch = field(default_factory=Scratch)  # shared work buffer of the eager updates
    compiled: bool | str = False  # run the fused updates compiled (True), eagerly (False) or fused.NATIVE
    image_size: tuple[int, int] | None = None  # (H, W) of the probe's images (the Lie translations' pixels)
    # The layer's maps and their moved-back rows (pixel-major) as same-equivariance made them, for the
    # equivariance error of the same maps after it (one warp for both); cleared after every layer's update.
    moved_back: tuple[torch.Tensor, torch.Tensor] | None = None
    # The first chunk of a pair: a layer whose measures all fold pairs (``LayerMeasure.pairs``) keeps its
    # output for the next chunk's update, which folds both in one call of its kernel (``engine._Observer``);
    # ``pairing``: this pass pairs its chunks (its layers' outputs are watched first, to learn which may be kept).
    hold: bool = False
    pairing: bool = False

    def rows(self, values: torch.Tensor, block: int = SAMPLE_BLOCK):
        """(class index, a block of the chunk's samples of that class) pairs of values [b·T, ...] or
        [b, ...]: all of them as they are, or the class's samples as [b_k, T·units]; on CPU beyond
        BLOCKED_BYTES, in blocks of at most ``block`` samples (views, sample-major)."""
        for k, rows in self.groups:
            selected = values if rows is None else values.reshape(self.size, -1).index_select(0, rows)
            samples = self.size if rows is None else rows.shape[0]
            if (samples <= block or selected.numel() * selected.element_size() <= BLOCKED_BYTES
                    or selected.device.type != "cpu"):  # a GPU keeps its updates at a constant count of kernels
                yield k, selected
                continue
            per_sample = selected.shape[0] // samples
            for start in range(0, samples, block):
                yield k, selected[start * per_sample: (start + block) * per_sample]


class LayerMeasure:
    """Base: one measure group's states on one activation, one set per class."""

    group = ""
    components: tuple[str, ...] = ()
    phases: tuple[str, ...] = (TRANSFORMED,)
    uses_actions = False  # reads the layers' feature actions (recorded in the run configuration)
    needs_identity = False  # compares with the untransformed input: the set must hold the identity
    shardable = True  # error bars: finalized per shard of the probe (one pass, nothing read on the host)
    masked = False  # components are NaN by definition at excluded positions
    pairs = False  # ``update_pair`` folds two chunks in one update (else one after the other)
    pixel_major = False  # the states hold a map's units in (h, w, C) order, put back in (C, h, w) when finalized
    _order_chosen = False
    _merged_replicates: list[torch.Tensor | None] | None = None  # each class's, where a kernel took them merging

    def __init__(self, info: LayerInfo, transformations: TransformationSet, num_classes: int,
                 device: torch.device, options: MeasureOptions):
        self.info = info
        self.transformations = transformations
        self.T = len(transformations)
        self.options = options
        self.unit_shape = self.feature_shape(info)  # shape of the components per element
        self.units = math.prod(self.unit_shape)
        self.device = device
        self.per_class = [self.new_states() for _ in range(num_classes)]  # the states being updated
        self.shard_states: list[list[dict[str, StreamingState]]] = []  # with shards: each closed one's, per class
        self._reserved: list[list[dict[str, StreamingState]]] = []  # zero states for the shards still to come
        self._combined = False  # the shards' states merged into per_class (the whole probe's)

    @staticmethod
    def applies(info: LayerInfo) -> bool:
        return True

    def feature_shape(self, info: LayerInfo) -> tuple[int, ...]:
        return info.unit_shape

    def make_states(self, device: torch.device) -> dict[str, StreamingState]:
        raise NotImplementedError

    def as_it_lies(self, activation: torch.Tensor) -> torch.Tensor:
        """The activation [b·T, *units] in the states' order of units: maps that lie channels-last in memory (a
        channels-last model's) as they lie, in (h, w, C) order, a view (laid out channel-major, every chunk
        cost a copy of itself, and per_transformation's compiled graph failed on the maps as they lay); the
        first chunk chooses the order, and every rank's model lies the same way (states merge unit by unit)."""
        if not self._order_chosen:
            self.pixel_major, self._order_chosen = native.lies_channels_last(activation), True
        if self.pixel_major:
            return activation.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return activation

    def _in_layer_order(self, values: torch.Tensor) -> torch.Tensor:
        """Per-unit values [..., units] in the states' order of units, in the layer's."""
        return _channels_first(values, self.unit_shape) if self.pixel_major else values

    def new_states(self) -> dict[str, StreamingState]:
        """``make_states`` on this measure's device, in ``options.state_dtype``."""
        with state_dtype(self.options.state_dtype):
            return self.make_states(self.device)

    def states(self, phase: str) -> list[list[StreamingState]]:
        """Per class, the states a phase updates (merged across ranks after the phase)."""
        return [list(states.values()) for states in self.per_class]

    def update(self, phase: str, activation: torch.Tensor, chunk: Chunk) -> None:
        raise NotImplementedError

    def update_pair(self, phase: str, held: torch.Tensor, held_chunk: Chunk, activation: torch.Tensor,
                    chunk: Chunk) -> None:
        """Update with two chunks: ``held``, the output of the chunk before (``held_chunk``), kept for this one
        (``Chunk.hold``), then ``activation``. Where the measure ``pairs``, by one CPU kernel call that reads and
        writes the states once for both (one class: the engine pairs chunks only then); else, or where the kernel
        does not take them, one after the other."""
        self.update(phase, held, held_chunk)
        self.update(phase, activation, chunk)

    def finish(self, phase: str) -> None:
        """Called after a phase (and its cross-rank merge)."""

    def compute_class(self, states: dict[str, StreamingState], compiled: bool) -> torch.Tensor:
        """[components, units] float64 on the device."""
        raise NotImplementedError

    def final_states(self, compiled: bool = False) -> list[dict[str, StreamingState]]:
        """Per class, the states of the whole probe (with shards: all of them merged, once). ``compiled``, by the
        measure's replicates' kernel where it has one that applies: it merges them into shard 0's states, which
        it has read for that shard's replicate by then, and takes the class's replicates from the rows it
        merged while they are in cache (``_merge_and_replicate``); elsewhere into new zero states."""
        if self.shard_states and not self._combined:
            self._merged_replicates, totals = [], []
            for k, total in enumerate(self.shard_states[0]):
                values = self._merge_and_replicate(k, total) if compiled else None
                if values is None:
                    with heap.mapped_apart():  # (as the shards' own: given back to the system when freed)
                        total = self.new_states()  # (shard 0's states stay: the replicates leave each shard out)
                    for name, state in total.items():
                        merge_into(state, [shard[k][name] for shard in self.shard_states], compiled)
                totals.append(total)
                self._merged_replicates.append(values)
            self.per_class = totals
            self._combined = True
        return self.per_class

    def compute(self, compiled: bool = False) -> torch.Tensor:
        """[classes, components, units] float64 on the device (``compiled``: with the fused kernels), of the
        whole probe."""
        return self._compute(self.final_states(compiled), compiled)

    def _compute(self, per_class: list[dict[str, StreamingState]], compiled: bool) -> torch.Tensor:
        values = [self.compute_class(states, compiled) for states in per_class]
        return values[0].unsqueeze(0) if len(values) == 1 else torch.stack(values)

    def reserve_shards(self, shards: int) -> None:
        """Allocate now the states of the shards to come after the first (which streams into ``per_class``),
        so that nothing is allocated between chunks: states allocated at a shard's end take the memory the
        activations were recycling, which then comes fresh from the system, page fault by page fault, every
        chunk after (measured on the reference case at batch_size=4: 0.3 M page faults, +20 % time). One block
        for all of them: big ones are mapped apart from the heap the activations use. K sets in all: the whole
        probe's take shard 0's memory where a kernel finalizes (``final_states``), else come at the end."""
        if self._reserved or self.shard_states:
            return
        first = next(iter(self.per_class[0].values())).tensors()[0]
        size = sum(state.numel() for states in self.per_class for state in states.values())
        later = shards - 1
        block, offset = kept_states.zeros((later * size,), first.dtype, first.device), 0
        counts = iter(torch.zeros(later * len(self.per_class) * len(self.per_class[0]), dtype=torch.int64,
                                  device=first.device).unbind())
        for _ in range(later):
            shard = []
            for states in self.per_class:
                carved = {}
                for name, state in states.items():
                    carved[name], offset = state.carve(block, next(counts), offset)
                shard.append(carved)
            self._reserved.append(shard)

    def close_shard(self) -> None:
        """End a shard of the probe: keep its states apart for the jackknife and start the next shard's (after
        the last, none: ``final_states`` makes the whole probe's)."""
        self.shard_states.append(self.per_class)
        self.per_class = self._reserved.pop() if self._reserved else []  # (reserve_shards: before the first chunk)

    def replicates(self, compiled: bool = False) -> torch.Tensor | None:
        """The delete-a-shard jackknife replicates, [K, classes, components, channels] float64 on the device:
        replicate k is what the probe without shard k measures, per channel (``shards.py``); None without
        shards."""
        if not self.shard_states:
            return None
        values = self._replicate_values(compiled)  # [K, classes, components, units]
        self.shard_states = []  # replicates now, not shards: computed once
        axis = self.info.channel_axis if self.unit_shape == self.info.unit_shape else 0
        values = values.reshape(*values.shape[:-1], *self.unit_shape)  # [..., units] -> [..., *unit_shape]
        return channel_means(values, self.unit_shape, axis, self.masked)

    def _replicate_values(self, compiled: bool) -> torch.Tensor:
        """Per unit, in the layer's order, the replicates' components: [K, classes, components, units]."""
        totals = self.final_states(compiled)
        merged, self._merged_replicates = self._merged_replicates or [None] * len(totals), None
        return torch.stack([values if values is not None else self._class_replicates(k, total, compiled)
                            for k, (values, total) in enumerate(zip(merged, totals))], dim=1)

    def _merge_and_replicate(self, k: int, total: dict[str, StreamingState]) -> torch.Tensor | None:
        """Class k's replicates [K, components, units] by a CPU kernel that merges the shards' states into
        ``total`` (shard 0's, read by then) in the same pass; None (nothing done: shard 0's states as they were)
        where the measure has none or it does not apply."""
        return None

    def _sum_and_moments(self, k: int, total: dict[str, StreamingState], sums: str, moments: str) -> tuple:
        """The states a replicates' kernel or fused function takes: the whole probe's (``total``) sum state
        ``sums`` and moments state ``moments`` (a sum over samples, its count, a mean, an m2, their count),
        then the same five of class k's shards, each as a list over the shards."""
        whole, *shards = [(s[sums].total, s[sums].count, s[moments].mean, s[moments].m2, s[moments].count)
                          for s in [total] + [shard[k] for shard in self.shard_states]]
        return (*whole, *[list(column) for column in zip(*shards)])

    def _class_replicates(self, k: int, total: dict[str, StreamingState], compiled: bool) -> torch.Tensor:
        """Class k's replicates [K, components, units] from the whole probe's states ``total``: each shard's
        states become its replicate's in place (the whole probe's minus the shard's)."""
        for name, state in total.items():
            leave_out(state, [shard[k][name] for shard in self.shard_states], compiled)
        return torch.stack([self.compute_class(shard[k], compiled) for shard in self.shard_states])

    def nonfinite(self) -> torch.Tensor:
        """The sum of the states' absolute values, [1] on the device in the states' dtype, read with the
        results when finalizing: NaN if a state holds NaN, inf if one holds ±inf. Each state's L1 norm in
        place (one multi-tensor op, then two): concatenating the states first copied them all, seconds and
        the states' size again in memory on a large model."""
        tensors = [t for states in self.final_states() for s in states.values() for t in s.tensors()]
        return torch.stack(torch._foreach_norm(tensors, 1)).sum().reshape(1)


def _variance_values(spread_total, spread_count, m2, count):
    """[TV, SV]: the mean over samples of their spread; the mean over transformations of the std over samples
    (the root taken in place: eagerly one [T, units] temporary, not two)."""
    return torch.stack([mean_of_sum(spread_total, spread_count), unbiased_var(m2, count).sqrt_().mean(dim=0)])


@fused
def _variance_compute(spread_total, spread_count, m2, count, scratch=None):
    """[TV, SV] of the states (``_variance_values``)."""
    return _variance_values(spread_total, spread_count, m2, count)


@fused(native=native.variance_replicates)
def _variance_replicates(spread_total, spread_count, mean, m2, count, shard_totals, shard_spread_counts,
                         shard_means, shard_m2s, shard_counts, out, scratch=None):
    """``out`` [K, 2, units] := [TV, SV] of the whole probe without each shard (the jackknife's replicates),
    from the whole probe's and the shards' states, which stay as they are (``shards.leave_out`` without
    writing)."""
    for k, (shard_total, shard_spread_count, shard_mean, shard_m2, shard_count) in enumerate(zip(
            shard_totals, shard_spread_counts, shard_means, shard_m2s, shard_counts)):
        rest_total, rest_spread_count = sum_without(spread_total, spread_count, shard_total, shard_spread_count)
        _, rest_m2, rest_count = moments_without(mean, m2, count, shard_mean, shard_m2, shard_count)
        out[k].copy_(_variance_values(rest_total, rest_spread_count, rest_m2, rest_count))


@fused(native=native.variance_update)
def _variance_update(output, T, spread_total, spread_count, mean, m2, count, scratch=None):
    """Samples' std over transformations (TV) and per-transformation moments over samples (SV)."""
    x = output.reshape(-1, T, mean.shape[-1])  # [b, T, units]
    fold_spread(x, spread_total, spread_count, scratch)
    fold_moments(x, mean, m2, count, scratch)


class VarianceMeasure(LayerMeasure):
    """Invariance: TV (mean over samples of std over transformations), SV (mean over t of std over samples)."""

    group = "invariance"
    components = ("tv", "sv")
    pairs = True

    def make_states(self, device):
        # spread: the sum over samples of each one's std over transformations
        return {"spread": SampleSum((self.units,), device), "moments": SampleMoments((self.T, self.units), device)}

    def values(self, activation: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """What the states stream, [b·T, *units] in the states' order of units."""
        return self.as_it_lies(activation)

    def update(self, phase, activation, chunk):
        for k, rows in chunk.rows(self.values(activation, chunk)):
            _variance_update(chunk.compiled, rows, self.T, *self._kernel_states(k), scratch=chunk.scratch)

    def _kernel_states(self, k: int = 0) -> tuple[torch.Tensor, ...]:
        """Class k's states as the update kernels take them: spread total and count, mean, m2, count."""
        spread, moments = self.per_class[k]["spread"], self.per_class[k]["moments"]
        return spread.total, spread.count, moments.mean, moments.m2, moments.count

    def update_pair(self, phase, held, held_chunk, activation, chunk):
        if not self._fold_pair(self.as_it_lies(held), self.as_it_lies(activation)):
            super().update_pair(phase, held, held_chunk, activation, chunk)

    def _fold_pair(self, held: torch.Tensor, rows: torch.Tensor) -> bool:
        """The rows of two chunks, ``held`` then ``rows``, folded into the states by one call of the CPU kernel
        (as two calls would fold them: the same numbers); False where it does not take them (nothing done)."""
        return native.variance_update(rows, self.T, *self._kernel_states(), held=held)

    def compute_class(self, states, compiled):
        spread, moments = states["spread"], states["moments"]
        return self._in_layer_order(_variance_compute(compiled, spread.total, spread.count, moments.m2, moments.count))

    def _merge_and_replicate(self, k, total):
        """The replicates' CPU kernel: the shards' states read once for the merge and the replicates (the
        merge, the replicates and the rest of finalizing took 0.11 s a measurement on the reference case with
        the default measures at batch_size=16, against a ~1 s forward floor)."""
        values, arguments = self._replicates_arguments(k, total)
        return values if native.variance_replicates(*arguments, merge=True) else None

    def _class_replicates(self, k, total, compiled):
        """In one fused call from the whole probe's and the shards' states (the shards' states are not turned
        into the replicates' first, nor each computed on its own: on ResNet18Style with the default measures
        the finalizing took 0.46 s of a 0.6 s forward floor, most of it one call per shard and state)."""
        values, arguments = self._replicates_arguments(k, total)
        _variance_replicates(compiled, *arguments)
        return values

    def _replicates_arguments(self, k: int, total: dict[str, StreamingState]) -> tuple[torch.Tensor, tuple]:
        """Class k's replicates [K, 2, units] to fill (in the states' order of units) and the arguments of
        the calls that fill them: the whole probe's states ``total``, the shards', the replicates."""
        values = total["moments"].mean.new_empty((len(self.shard_states), 2, self.units))
        return values, (*self._sum_and_moments(k, total, "spread", "moments"), values)

    def _replicate_values(self, compiled):
        return self._in_layer_order(super()._replicate_values(compiled))  # [K, classes, 2, units]


class SameEquivarianceMeasure(VarianceMeasure):
    """The variance measures on t⁻¹(φ(t(x))): feature maps moved back by the inverse transformation (a
    token layer's maps are those its feature action lays out: ``actions.patch_grid``). The maps are moved
    back and streamed pixel-major (``warps.py``: the layout the inverse warp reads fast), so the states
    hold the units in (h, w, C) order, put back in (C, h, w) order when finalized."""

    group = "same_equivariance"
    pixel_major = True

    def __init__(self, info, transformations, num_classes, device, options):
        self.maps = options.actions(info.name).maps
        super().__init__(info, transformations, num_classes, device, options)

    @staticmethod
    def applies(info):
        return info.is_spatial

    def feature_shape(self, info):
        return info.map_shape

    def values(self, activation, chunk):
        maps = self.maps(activation)
        moved = self.transformations.invert_features_pixel_major(maps, chunk.compiled, chunk.scratch)
        chunk.moved_back = (maps, moved)
        return moved

    def update_pair(self, phase, held, held_chunk, activation, chunk):
        """Both chunks' maps moved back by the warp's CPU kernel into one buffer, one after the other, and folded
        in from there by one call (the held chunk's maps read from memory now, not from cache before)."""
        first, second = self.maps(held), self.maps(activation)
        held_samples, channels, height, width = first.shape[0] // self.T, *first.shape[1:]
        shape = (held_samples + second.shape[0] // self.T, self.T * height * width, channels)
        moved = chunk.scratch.get("moved pair", shape, first.dtype, first.device)
        kept, rows = moved[:held_samples], moved[held_samples:]
        if not (self.transformations.move_back_into(first, kept, chunk.scratch)
                and self.transformations.move_back_into(second, rows, chunk.scratch)
                and self._fold_pair(kept, rows)):  # one chunk after the other (not invariance's pair: not its rows)
            LayerMeasure.update_pair(self, phase, held, held_chunk, activation, chunk)


def _channels_first(values: torch.Tensor, unit_shape: tuple[int, int, int]) -> torch.Tensor:
    """Per-unit values [..., h·w·C] of maps streamed pixel-major, in the layer's (C, h, w) order."""
    channels, height, width = unit_shape
    return values.reshape(-1, height, width, channels).permute(0, 3, 1, 2).reshape(values.shape)


def _fold_errors(moved, reference, squared_total, squared_count, mean, m2, count, scratch):
    """Fold in the squared differences of moved [b, T, units] from reference [b, units], summed over
    samples per (transformation, unit), and the moments of reference. (Never writes into either: they
    may be the activation itself, which later layers still read.)"""
    if scratch is None:
        squared = (moved - reference.unsqueeze(1)).square()
    else:
        squared = torch.sub(moved, reference.unsqueeze(1), out=scratch.like(moved, "squared")).square_()
    fold_sum(squared, squared_total, squared_count, scratch)
    fold_moments(reference, mean, m2, count, scratch)


@fused(native=native.moved_errors_update)
def _equivariance_error_update(back, psi, T, identity, squared_total, squared_count, mean, m2, count, scratch=None):
    """Squared differences of every moved-back transformed feature from the untransformed one, and the
    moments of the untransformed features."""
    units = mean.shape[-1]
    reference = psi.reshape(-1, T, units)[:, identity]  # [b, units]
    _fold_errors(back.reshape(-1, T, units), reference, squared_total, squared_count, mean, m2, count, scratch)


@fused
def _equivariance_error_compute(squared_total, squared_count, m2, count, keep, transformed, inside, scratch=None):
    """[MSE, 2·var, MSE of each transformation (T rows)]: the mean squared difference over samples and the
    transformations ``keep`` (all but the identity), twice the sample variance of the untransformed
    features, and the mean squared difference over samples of each transformation, the identity's 0 by
    definition (``transformed`` zeroes it: moving interpolated maps back by the identity rounds); NaN
    outside ``inside``."""
    mse_t = mean_of_sum(squared_total, squared_count) * transformed.unsqueeze(1)
    mse = mse_t.index_select(0, keep).mean(dim=0)
    values = torch.cat([torch.stack([mse, 2 * unbiased_var(m2, count)]), mse_t])
    return torch.where(inside, values, float("nan"))


class EquivarianceErrorMeasure(LayerMeasure):
    """E = mean over samples, transformations ≠ identity and positions of (ψ(φ(x)) − g⁻¹ψ(φ(g x)))²,
    normalized by 2 · the sample variance of ψ(φ(x)) (what two random samples would give); and E_t, the
    same for each transformation g_t alone (``mse_t``: one row per transformation).

    Where g⁻¹ acts on positions only (every action but ``cyclic_shift``), the maps are moved back and
    streamed pixel-major, as same-equivariance streams them (``warps.py``: laying them out channel-major
    again took as long as the update on the reference case), with the identity's slot holding ψ(φ(x))
    itself; the states hold the units in (h, w, C) order, put back in (C, h, w) order when finalized."""

    group = "equivariance_error"
    components = ("mse", "var2", "mse_t")
    uses_actions = True
    needs_identity = True

    def __init__(self, info, transformations, num_classes, device, options):
        self.action = options.actions(info.name)
        self.action.check(info.map_shape[0], transformations)
        self.identity = transformations.identity_index
        super().__init__(info, transformations, num_classes, device, options)
        self.keep = torch.tensor([t for t in range(self.T) if t != self.identity], device=device)
        self.transformed = (torch.arange(self.T, device=device) != self.identity).to(torch.float64)
        everywhere = torch.ones(self.unit_shape, dtype=torch.bool, device=device)
        inside = _central_disk(self.unit_shape, device) if options.disk else everywhere
        self.pixel_major = type(self.action).undo is FeatureAction.undo
        self.inside = (inside.permute(1, 2, 0) if self.pixel_major else inside).reshape(-1)  # the states' order
        self.masked = options.disk

    @staticmethod
    def applies(info):
        return info.is_spatial

    def feature_shape(self, info):
        return tuple(self.action.psi(torch.empty((1, *info.unit_shape), device="meta")).shape[1:])

    def make_states(self, device):
        return {"squared": SampleSum((self.T, self.units), device), "reference": SampleMoments((self.units,), device)}

    def update(self, phase, activation, chunk):
        psi = self.action.psi(activation)
        if self.pixel_major:
            _fold_differences_from_identity(self, self._moved_back_pixel_major(psi, chunk), chunk)
            return
        back = self.action.undo(psi, self.transformations, chunk.compiled, chunk.scratch)
        blocks = zip(chunk.rows(back, DIFFERENCE_BLOCK), chunk.rows(psi, DIFFERENCE_BLOCK))  # back: psi's shape
        for (k, back_rows), (_, psi_rows) in blocks:
            squared, reference = self.per_class[k]["squared"], self.per_class[k]["reference"]
            _equivariance_error_update(
                chunk.compiled, back_rows, psi_rows, self.T, self.identity, squared.total, squared.count,
                reference.mean, reference.m2, reference.count, scratch=chunk.scratch,
            )

    def _moved_back_pixel_major(self, psi: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """ψ-maps [b·T, C, h, w] moved back, [b, T·h·w, C] pixel-major, the identity's maps ψ itself (moving
        interpolated maps back by the identity rounds): the rows ``_invariance_error_update`` compares. The
        same maps same-equivariance just moved back (the identity action) are taken as they are."""
        shared, chunk.moved_back = chunk.moved_back, None  # (its identity's slot is overwritten below)
        if shared is not None and shared[0] is psi:
            moved = shared[1]
        else:
            moved = self.transformations.invert_features_pixel_major(psi, chunk.compiled, chunk.scratch)
        channels, height, width = self.unit_shape
        if native.lies_channels_last(psi):  # pixel-major where they lie
            maps = psi.permute(0, 2, 3, 1).reshape(-1, self.T, height * width, channels)[:, self.identity]
        else:
            maps = psi.reshape(-1, self.T, channels, height * width)[:, self.identity].transpose(1, 2)
        moved.view(-1, self.T, height * width, channels)[:, self.identity].copy_(maps)
        return moved

    def compute_class(self, states, compiled):
        squared, reference = states["squared"], states["reference"]
        values = _equivariance_error_compute(
            compiled, squared.total, squared.count, reference.m2, reference.count, self.keep, self.transformed,
            self.inside,
        )
        return _channels_first(values, self.unit_shape) if self.pixel_major else values


@fused(native=native.errors_update)
def _invariance_error_update(output, T, identity, squared_total, squared_count, mean, m2, count, scratch=None):
    """Squared differences of every transformed input's activation from the untransformed one's, and the
    moments of the untransformed activations."""
    x = output.reshape(-1, T, mean.shape[-1])  # [b, T, units]
    _fold_errors(x, x[:, identity], squared_total, squared_count, mean, m2, count, scratch)


@fused
def _invariance_error_compute(squared_total, squared_count, m2, count, scratch=None):
    """[MSE of each transformation (T rows), 2·var]: per unit, the mean squared difference over samples
    and twice the sample variance of the untransformed activations."""
    return torch.cat([mean_of_sum(squared_total, squared_count), (2 * unbiased_var(m2, count)).unsqueeze(0)])


class InvarianceErrorMeasure(LayerMeasure):
    """Per transformation t: I_t = the mean over samples of (φ(t x) − φ(x))², per unit, normalized by
    2 · the sample variance of φ(x); on every layer (invariance: nothing is moved back)."""

    group = "per_transformation"
    components = ("mse_t", "var2")
    needs_identity = True
    pairs = True

    def __init__(self, info, transformations, num_classes, device, options):
        self.identity = transformations.identity_index
        super().__init__(info, transformations, num_classes, device, options)

    def make_states(self, device):
        return {"squared": SampleSum((self.T, self.units), device), "reference": SampleMoments((self.units,), device)}

    def update(self, phase, activation, chunk):
        _fold_differences_from_identity(self, self.as_it_lies(activation), chunk)

    def update_pair(self, phase, held, held_chunk, activation, chunk):
        if not native.errors_update(self.as_it_lies(activation), self.T, self.identity, *self._kernel_states(),
                                    held=self.as_it_lies(held)):
            super().update_pair(phase, held, held_chunk, activation, chunk)

    def _kernel_states(self, k: int = 0) -> tuple[torch.Tensor, ...]:
        """Class k's states as the update kernels take them: squared total and count, the untransformed rows'
        mean, m2, count."""
        squared, reference = self.per_class[k]["squared"], self.per_class[k]["reference"]
        return squared.total, squared.count, reference.mean, reference.m2, reference.count

    def compute_class(self, states, compiled):
        squared, reference = states["squared"], states["reference"]
        return self._in_layer_order(
            _invariance_error_compute(compiled, squared.total, squared.count, reference.m2, reference.count))

    def _merge_and_replicate(self, k, total):
        """The replicates' CPU kernel (``native.errors_replicates``): the shards' states read once for the merge
        and the replicates, where eagerly the merge, the leave-out and each shard's values were a pass each."""
        values = total["reference"].mean.new_empty((len(self.shard_states), self.T + 1, self.units))
        done = native.errors_replicates(*self._sum_and_moments(k, total, "squared", "reference"), values, merge=True)
        return self._in_layer_order(values) if done else None


def _fold_differences_from_identity(measure: LayerMeasure, values: torch.Tensor, chunk: Chunk) -> None:
    """Fold rows [b·T, ...] into ``measure``'s "squared" and "reference" states (per_transformation's, or the
    equivariance error's on maps moved back), each row against its sample's row of ``measure.identity``."""
    for k, rows in chunk.rows(values, DIFFERENCE_BLOCK):
        squared, reference = measure.per_class[k]["squared"], measure.per_class[k]["reference"]
        _invariance_error_update(
            chunk.compiled, rows, measure.T, measure.identity, squared.total, squared.count, reference.mean,
            reference.m2, reference.count, scratch=chunk.scratch,
        )


def update_together(measures: dict[str, LayerMeasure], phase: str, activation: torch.Tensor,
                    chunk: Chunk, held: torch.Tensor | None = None) -> tuple[str, ...]:
    """The groups of one layer updated at once, by one CPU kernel that reads the chunk once for both: invariance
    and per_transformation (``native.both_update``; their two kernels read it twice, ~0.15 s of a 1.4 s
    measurement on the reference case at batch_size=16); with ``held``, the output of the chunk before kept
    for this one (``Chunk.hold``), both chunks in one call. () where that does not apply (nothing done): each
    group updates alone."""
    invariance, errors = measures.get("invariance"), measures.get("per_transformation")
    if (phase != TRANSFORMED or not chunk.compiled or type(invariance) is not VarianceMeasure
            or type(errors) is not InvarianceErrorMeasure):
        return ()
    laid_out, _ = invariance.as_it_lies(activation), errors.as_it_lies(activation)  # (each chooses on its first chunk)
    if errors.pixel_major != invariance.pixel_major:
        return ()

    def fold_both(k: int, rows: torch.Tensor, before: torch.Tensor | None = None) -> bool:
        """Class k's states of both groups updated by the joint kernel (after ``before``); False: not taken."""
        return native.both_update(rows, invariance.T, errors.identity, *invariance._kernel_states(k),
                                  *errors._kernel_states(k), held=before)

    if held is not None:
        return ("invariance", "per_transformation") if fold_both(0, laid_out, invariance.as_it_lies(held)) else ()
    for block, (k, rows) in enumerate(chunk.rows(laid_out)):
        if fold_both(k, rows):
            continue
        if block == 0:  # the kernel does not take this chunk (it takes all of a chunk's blocks or none)
            return ()
        _fold_alone(invariance, errors, rows, (*invariance._kernel_states(k), *errors._kernel_states(k)), chunk)
    return ("invariance", "per_transformation")


def _fold_alone(invariance: LayerMeasure, errors: LayerMeasure | None, rows: torch.Tensor,
                states: tuple[torch.Tensor, ...], chunk: Chunk) -> None:
    """A block of rows folded into invariance's ``states`` (its five) and, with ``errors``, per_transformation's
    (the five after them) by each group's own update."""
    _variance_update(chunk.compiled, rows, invariance.T, *states[:5], scratch=chunk.scratch)
    if errors is not None:
        _invariance_error_update(chunk.compiled, rows, errors.T, errors.identity, *states[5:], scratch=chunk.scratch)


def update_with_relu(measures: dict[str, LayerMeasure], relu_measures: dict[str, LayerMeasure],
                     activation: torch.Tensor, relu_activation: torch.Tensor, chunk: Chunk) -> bool:
    """A layer's invariance (and per_transformation, by ``update_together``'s joint kernel), and the same groups of a
    ReLU that took ``activation`` (``relu_activation``, its output), by one kernel call per block that reads
    ``activation`` only (``relu_pairs.py``; one class, units as they lie). False where the kernel does not take
    the chunk (nothing done)."""
    invariance, errors = measures["invariance"], measures.get("per_transformation")
    relu_invariance, relu_errors = relu_measures["invariance"], relu_measures.get("per_transformation")
    mine = (*invariance._kernel_states(), *(errors._kernel_states() if errors is not None else ()))
    theirs = (*relu_invariance._kernel_states(), *(relu_errors._kernel_states() if relu_errors is not None else ()))
    for block, ((_, rows), (_, relu_rows)) in enumerate(zip(chunk.rows(activation), chunk.rows(relu_activation))):
        if (native.relu_update(rows, invariance.T, mine, theirs) if errors is None
                else native.relu_both_update(rows, invariance.T, errors.identity, mine, theirs)):
            continue
        if block == 0:  # (the kernel takes all of a chunk's blocks or none)
            return False
        _fold_alone(invariance, errors, rows, mine, chunk)
        _fold_alone(relu_invariance, relu_errors, relu_rows, theirs, chunk)
    return True


def _central_disk(unit_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Boolean [C, h, w]: positions whose centre lies within the disk inscribed in the feature map."""
    channels, h, w = unit_shape
    y = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h * 2 - 1
    x = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w * 2 - 1
    inside = (y.view(-1, 1) ** 2 + x.view(1, -1) ** 2) <= 1.0
    return inside.expand(channels, h, w)


@fused
def _lie_values(tangent, reference, wx, wy, zeros, scratch=None):
    """The Lie derivative on feature maps g_t moves: ψ's tangent minus the generator's derivative of ψ's
    maps (``lie.along_flow`` with the generator's weights). (A kernel of its own: compiled together with
    the reductions below, Inductor schedules it several times slower.)"""
    return along_flow(reference, wx, wy, zeros, start=tangent)


@fused
def _lie_update(lie, reference, squared_total, squared_count, mean, m2, count, scratch=None):
    """Squared Lie derivatives and the moments of the untransformed features, per sample. (Never writes
    into ``lie`` or ``reference``: either may be a forward-mode tangent or an output later layers still
    read.)"""
    units = mean.shape[-1]
    lie, reference = lie.reshape(-1, units), reference.reshape(-1, units)
    squared = lie.square() if scratch is None else torch.mul(lie, lie, out=scratch.like(lie, "squared"))
    fold_sum(squared, squared_total, squared_count, scratch)
    fold_moments(reference, mean, m2, count, scratch)


@fused
def _lie_compute(squared_total, squared_count, m2, count, scratch=None):
    """[mean squared Lie derivative, 2·var]: over samples, per unit."""
    return torch.stack([mean_of_sum(squared_total, squared_count), 2 * unbiased_var(m2, count)])


class LieDerivativeMeasure(LayerMeasure):
    """The Lie derivative of one generator g_t (``lie.py``): L = d/dt g_t⁻¹ ψ(φ(g_t x)) at t = 0, from one
    forward-mode pass (the tangent of ψ(φ(x)) along the input's tangent) minus the generator's own
    derivative of the feature maps ψ(φ(x)); on outputs without feature maps (and for brightness, which
    does not act on features) g_t⁻¹ is nothing and L is the tangent: invariance. Reported as the mean
    over samples of L², per unit, over 2 · the sample variance of ψ(φ(x)), the equivariance error's
    normalization: the limit of [g_t⁻¹ψ(φ(g_t x)) − g_₋t⁻¹ψ(φ(g_₋t x))]² / 4t² so normalized, as t → 0."""

    generator: Generator
    components = ("lsq", "var2")
    uses_actions = True

    def __init__(self, info, transformations, num_classes, device, options):
        self.action = options.actions(info.name) if info.is_spatial else identity()
        if type(self.action).undo is not FeatureAction.undo:
            raise ValueError(
                f"{self.group}: the feature action {self.action!r} moves channels by whole steps of a finite group, "
                "which has no infinitesimal generator; measure the Lie derivative of this layer with identity() or "
                "orientation_pooling(k) (in a measurement of its own)"
            )
        if info.is_spatial:
            self.action.check(info.map_shape[0], transformations)
        self.interpolation, self.padding = transformations.interpolation, transformations.padding
        super().__init__(info, transformations, num_classes, device, options)
        self.T = 1  # one (forward-mode) pass per sample
        self.moves = info.is_spatial and self.generator.geometric  # g_t acts on ψ's feature maps

    def feature_shape(self, info):
        if not info.is_spatial:
            return info.unit_shape
        return tuple(self.action.psi(torch.empty((1, *info.unit_shape), device="meta")).shape[1:])

    def make_states(self, device):
        return {"squared": SampleSum((self.units,), device), "reference": SampleMoments((self.units,), device)}

    def update(self, phase, activation, chunk):
        reference, tangent = forward_ad.unpack_dual(self.action.psi(activation))
        if tangent is None:
            raise TangentError(
                f"layer {self.info.name!r} ({self.info.module_type}) has no forward-mode tangent for {self.group}: its "
                "output does not depend differentiably on the input (a .detach(), .data, integer op or a custom "
                "autograd.Function without forward-mode support on the way); leave it out with layers="
            )
        lie = tangent
        if self.moves:
            weights = self.generator.weights(*self.unit_shape[-2:], chunk.image_size, self.interpolation,
                                             reference.device, reference.dtype)
            lie = _lie_values(chunk.compiled, tangent, reference, *weights, self.padding == "zeros")
        reference = self.as_it_lies(reference)  # (chooses the order: the layer's maps as they lie)
        for (k, lie_rows), (_, reference_rows) in zip(chunk.rows(self.as_it_lies(lie)), chunk.rows(reference)):
            squared, moments = self.per_class[k]["squared"], self.per_class[k]["reference"]
            _lie_update(
                chunk.compiled, lie_rows, reference_rows, squared.total, squared.count, moments.mean, moments.m2,
                moments.count, scratch=chunk.scratch,
            )

    def compute_class(self, states, compiled):
        squared, reference = states["squared"], states["reference"]
        return self._in_layer_order(_lie_compute(compiled, squared.total, squared.count, reference.m2, reference.count))


def _lie_measure(generator: Generator) -> type[LieDerivativeMeasure]:
    """The measure group of one generator; its forward-mode pass is a phase of the same name."""
    return type(f"LieDerivativeMeasure[{generator.name}]", (LieDerivativeMeasure,),
                {"generator": generator, "group": generator.group, "phases": (generator.group,)})


@fused
def _moments_update(output, mean, m2, count, scratch=None):
    """Moments over samples of activations [b·T, *unit_shape] (or [b, ...]) per (transformation, unit)."""
    fold_moments(output.reshape(-1, *mean.shape), mean, m2, count, scratch)


@fused
def _firing_update(output, T, thresholds, total, count, scratch=None):
    """Per sample, the fraction of its T inputs on which each unit fires above its threshold."""
    x = output.reshape(-1, T, thresholds.shape[-1])
    fold_sum((x > thresholds).to(x.dtype).mean(dim=1), total, count, scratch)


class GoodfellowMeasure(LayerMeasure):
    """Goodfellow et al.'s firing-rate invariance as in tmeasures: a unit fires above its threshold
    (mean + std · Φ⁻¹(0.99) over the untransformed probe); local = firing rate over transformed inputs,
    global = over untransformed ones; invariance = local / global."""

    group = "goodfellow"
    components = ("local", "global")
    phases = ("thresholds", "global", TRANSFORMED)
    shardable = False  # three passes, the thresholds from the whole probe

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
        for k, rows in chunk.rows(self.as_it_lies(activation)):
            if phase == "thresholds":
                moments = self.per_class[k]["moments"]
                _moments_update(chunk.compiled, rows, moments.mean, moments.m2, moments.count, scratch=chunk.scratch)
            else:
                rate = self.per_class[k][self._STATE_OF_PHASE[phase]]
                T = 1 if phase == "global" else self.T
                _firing_update(chunk.compiled, rows, T, self.thresholds[k], rate.total, rate.count, scratch=chunk.scratch)

    def compute_class(self, states, compiled):
        return self._in_layer_order(torch.stack([states["local"].mean(), states["global"].mean()]))


class AnovaMeasure(LayerMeasure):
    """One-way ANOVA per unit with the T transformations as groups: F = (SSB/(T−1)) / (SSW/(N·T−T)), and
    whether F exceeds the critical value at α / units (Bonferroni over the layer's units)."""

    group = "anova"
    components = ("f", "reject")
    shardable = False  # a test decision, not an estimate (and its critical value is computed on the host)

    def make_states(self, device):
        return {"moments": SampleMoments((self.T, self.units), device)}

    def update(self, phase, activation, chunk):
        for k, rows in chunk.rows(self.as_it_lies(activation)):
            moments = self.per_class[k]["moments"]
            _moments_update(chunk.compiled, rows, moments.mean, moments.m2, moments.count, scratch=chunk.scratch)

    def compute_class(self, states, compiled):
        moments = states["moments"]
        n, T = int(moments.count), self.T  # finalizing: reading the count back is fine
        # The group means' spread, from their offsets to the first group's mean: exactly 0 when the means
        # are equal (a constant unit), where the grand mean computed directly can round off them.
        offsets = moments.mean - moments.mean[0]
        between = n * (offsets - offsets.mean(dim=0)).square().sum(dim=0)
        within = moments.m2.sum(dim=0)
        f = (between / (T - 1)) / (within / (n * T - T))
        # A unit with no variance at all, within or between the groups (a position a ReLU always zeroes, a
        # constant channel), is 0 / 0. It shows no effect of the transformation: F = 0 (p = 1, not rejected),
        # so it counts as the invariant unit it is in its channel's mean and in the layer's rejected fraction
        # instead of making both NaN. (No within- but some between-group variance stays F = inf: the
        # transformation alone sets the value.)
        f = torch.where((between == 0) & (within == 0), 0.0, f)
        critical = f_critical_value(self.options.alpha / self.units, T - 1, n * T - T) if n > 1 else math.inf
        return self._in_layer_order(torch.stack([f, (f > critical).double()]))


GROUPS: dict[str, type[LayerMeasure]] = {
    m.group: m
    for m in (VarianceMeasure, SameEquivarianceMeasure, EquivarianceErrorMeasure, InvarianceErrorMeasure,
              GoodfellowMeasure, AnovaMeasure, *map(_lie_measure, GENERATORS.values()))
}
