"""Per-channel measures from a fixed random subset of K positions per channel (``measure(positions=K)``).

The streaming states are per element (a mean and an M2 per transformation and element for invariance),
which is what limits ImageNet-sized models; per-channel values only need an estimate of each channel's
mean components. So on a layer with more than K positions per channel (feature maps [C, H, W] or [C, L],
token outputs [tokens, D]) each channel keeps the states of K positions drawn once without replacement,
and the measures gather the activation to those [C, K] positions inside the hook, before their update
(one ``index_select`` with an index made once on the activation's device: nothing read back to the host).
Same-equivariance moves back only the sampled positions of each feature map (``grid_sample`` at those
points: the same values as moving the whole map back eagerly, then gathering,
``TransformationSet.invert_features_at``; the compiled whole-map warp differs from it by float
rounding). Layers with at most K positions per channel are measured on all of them, exactly.

The positions depend only on the layer's name, its shape and ``positions_seed``: every chunk, shard, rank
and Monitor step measures the same ones (drawn with a private ``torch.Generator``: the global RNG is
untouched).

The error this adds. For one channel with P positions, per-position components a_p, b_p (e.g. TV and SV)
and a simple random sample of K of them, each sampled mean ā_K is unbiased for the channel's ā, with
standard error sd(a) / √K · √((P − K) / (P − 1)), sd over the P positions (denominator P) and the
finite-population correction. A ratio measure (nvi = TV / SV per channel) is the ratio estimator
R_K = ā_K / b̄_K of R = ā / b̄: biased by O(1/K) only (≈ (1 − K/P) / K · (R·S_b² − S_ab) / b̄², Cochran),
with standard error (delta method) sd(a − R·b) / b̄ / √K · √((P − K) / (P − 1)). ``standard_error``
computes both from per-position values. Channels draw independently. This is the error of the positions'
choice on a given probe; the probe's own sampling error is what ``error_bars=`` estimates (with the same
positions in every shard).

Supported groups (``SAMPLED``): invariance, same_equivariance, per_transformation, goodfellow: per element,
what they stream depends on that element alone. Not the equivariance error (its feature actions and the
central disk act on whole maps), ANOVA (its Bonferroni correction counts the layer's units) or the Lie
derivatives (the generator differentiates whole maps): ValueError.
"""
from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch

from .capture import LayerInfo
from .layer_measures import (
    GROUPS,
    Chunk,
    GoodfellowMeasure,
    InvarianceErrorMeasure,
    LayerMeasure,
    MeasureOptions,
    SameEquivarianceMeasure,
    VarianceMeasure,
)
from .transforms import TransformationSet

__all__ = ["AUTO", "AUTO_POSITIONS", "SAMPLED", "check_positions", "sampled_positions", "sample_positions",
           "build_measure", "standard_error"]

AUTO = "auto"  # positions="auto": all of them, or the most of AUTO_POSITIONS that fit memory_budget in one pass
AUTO_POSITIONS = (4096, 2048, 1024, 512, 256, 128, 64, 32, 16)


def check_positions(positions: int | str | None, seed: int, groups: list[str]) -> None:
    """ValueError unless ``positions`` is None, AUTO or an int >= 1, ``seed`` an int, and every measure group
    in ``groups`` can be measured on sampled positions."""
    if positions is None:
        return
    if positions != AUTO and (not isinstance(positions, int) or isinstance(positions, bool) or positions < 1):
        raise ValueError(f"positions must be None (all positions), an int >= 1 (positions sampled per channel) or "
                         f"'auto' (sampled only where memory_budget needs it), got {positions!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"positions_seed must be an int, got {seed!r}")
    unsupported = [g for g in groups if g not in SAMPLED]
    if unsupported:
        raise ValueError(
            f"positions= cannot measure {', '.join(unsupported)}: only {', '.join(SAMPLED)} are measured on sampled "
            "positions (the equivariance error and the Lie derivatives act on whole feature maps, ANOVA's Bonferroni "
            "correction counts every unit); measure those in a measurement without positions="
        )


def sampled_positions(unit_shape: tuple[int, ...], tokens: bool, positions: int | None) -> int | None:
    """K if a layer of this shape is measured on K sampled positions per channel, None if on all of them
    (``positions`` None, a layer without positions, or at most K positions per channel)."""
    if positions is None or len(unit_shape) < 2:
        return None
    channels = unit_shape[-1] if tokens else unit_shape[0]
    return positions if math.prod(unit_shape) // channels > positions else None


@functools.lru_cache(maxsize=256)
def sample_positions(name: str, channels: int, count: int, k: int, seed: int) -> torch.Tensor:
    """[channels, k] int64 on the host: each channel's k positions among ``count``, drawn without
    replacement, sorted; a function of the layer's name, the shape and ``seed`` alone."""
    key = int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") >> 1
    generator = torch.Generator().manual_seed(key)
    return torch.rand(channels, count, generator=generator).argsort(dim=1)[:, :k].sort(dim=1).values


class _Sampled(LayerMeasure):
    """A measure group's states on the layer's sampled positions: units [C, K], channels first."""

    pairs = False  # (their updates gather the positions first)

    def __init__(self, info: LayerInfo, transformations: TransformationSet, num_classes: int,
                 device: torch.device, options: MeasureOptions):
        full = super().feature_shape(info)  # what the group measures per element: the output or its maps
        channels_last = info.tokens and full == info.unit_shape
        channels = full[-1] if channels_last else full[0]
        count = math.prod(full) // channels
        picked = sample_positions(info.name, channels, count, min(info.positions, count), options.positions_seed)
        flat = picked * channels + torch.arange(channels).unsqueeze(1) if channels_last \
            else picked + count * torch.arange(channels).unsqueeze(1)
        self.sampled_shape = tuple(picked.shape)
        self.picked = picked.to(device)
        self.index = flat.reshape(-1).to(device)
        super().__init__(info, transformations, num_classes, device, options)

    def feature_shape(self, info: LayerInfo) -> tuple[int, ...]:
        return self.sampled_shape

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Rows [r, *full shape] at the sampled positions: [r, C·K], channel-major."""
        return values.reshape(values.shape[0], -1).index_select(1, self.index)


class _GatherFirst(_Sampled):
    """The group's update on the activation gathered to the sampled positions."""

    def update(self, phase: str, activation: torch.Tensor, chunk: Chunk) -> None:
        super().update(phase, self.gather(activation), chunk)


class _SampledVariance(_GatherFirst, VarianceMeasure):
    pass


class _SampledInvarianceError(_GatherFirst, InvarianceErrorMeasure):
    pass


class _SampledGoodfellow(_GatherFirst, GoodfellowMeasure):
    pass


class _SampledSameEquivariance(_Sampled, SameEquivarianceMeasure):
    """Feature maps moved back by the inverse transformation at the sampled positions only (the same
    values as moving the whole maps back eagerly, then gathering), channel-major."""

    pixel_major = False

    def values(self, activation: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        return self.transformations.invert_features_at(self.maps(activation), self.picked)


SAMPLED: dict[str, type[LayerMeasure]] = {
    m.group: m for m in (_SampledVariance, _SampledSameEquivariance, _SampledInvarianceError, _SampledGoodfellow)
}


def build_measure(group: str, info: LayerInfo, transformations: TransformationSet, num_classes: int,
                  device: torch.device, options: MeasureOptions) -> LayerMeasure:
    """The measure group's states on the layer: on its sampled positions when ``info.positions`` says so."""
    kind = GROUPS[group] if info.positions is None else SAMPLED[group]
    return kind(info, transformations, num_classes, device, options)


def standard_error(a: np.ndarray, k: int, b: np.ndarray | None = None) -> np.ndarray:
    """The stated standard error of a channel's value from k of its positions, from per-position
    components [C, P]: of the mean of ``a``, or (with ``b``) of the ratio of means ā / b̄ (delta method)."""
    a = np.asarray(a, dtype=np.float64)
    count = a.shape[-1]
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        ratio = a.mean(axis=-1, keepdims=True) / b.mean(axis=-1, keepdims=True)
        a = (a - ratio * b) / b.mean(axis=-1, keepdims=True)
    correction = math.sqrt((count - k) / (count - 1)) if count > 1 else 0.0
    return a.std(axis=-1) / math.sqrt(k) * correction
