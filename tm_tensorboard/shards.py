"""Error bars from the probe itself: K interleaved shards, each measured as an independent probe.

Sample n of the probe belongs to shard n mod K (interleaved, so a probe sorted by class gives every shard
every class). The probe is streamed shard after shard. When a shard ends, each measure finalizes its
states on their own (what that shard alone would measure, reduced per channel on the device) and then
merges them into the running total with Chan's formula and clears them: the full result is exactly the
one-pass result, and memory is two sets of states whatever K, not K sets.

The standard error of a value v (a unit's measure, a layer mean) is the *random-groups* estimate
sd_k(v_k) / √K over the K shard values. For a value linear in the samples (a mean of per-sample
quantities, TV) it is identical to the delete-a-group jackknife; for the non-linear measures (SV is a std,
NV a ratio) both rest on v being asymptotically linear (a variance ∝ 1/n), and random groups needs only
each shard's final values where the jackknife needs K leave-one-out states at once (K × the memory). Each
shard must have enough samples for its estimate to be in that regime: at least MIN_SHARD_SAMPLES. Where
it is not, e.g. a channel that fires in a few samples only, the shards' values scatter more than the whole
probe's would (a unit that did not vary at all in one shard's samples is 0 / 0 there, the dead units'
conventional 1). Measured on the example SimpleCNN with random images (benchmarks/README.md), the reported
error of a ReLU layer's mean was 0.3 to 17 times the spread over independent probes, while it
matched on the first convolution: so error bars are opt-in (``error_bars=``) until a
better-behaved estimator (the delete-a-group jackknife, K sets of states) replaces this one.
"""
from __future__ import annotations

import numpy as np
import torch

from .fused import fused
from .statistics import F64, SampleMoments, StreamingState

__all__ = ["DEFAULT_SHARDS", "MIN_SHARD_SAMPLES", "shard_count", "interleave", "standard_error", "channel_means",
           "absorb"]

DEFAULT_SHARDS = 8
MIN_SHARD_SAMPLES = 16


def shard_count(requested: int, probe_size: int) -> int:
    """Shards a probe of ``probe_size`` samples is split into for ``requested`` shards (1: no error bars):
    fewer when shards would have under MIN_SHARD_SAMPLES samples."""
    return max(1, min(requested, probe_size // MIN_SHARD_SAMPLES))


def interleave(probe_size: int, shards: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The probe's sample order with shard n mod K's samples together, and each shard's [lo, hi) in it."""
    order = torch.cat([torch.arange(k, probe_size, shards) for k in range(shards)])
    sizes = [len(range(k, probe_size, shards)) for k in range(shards)]
    bounds, lo = [], 0
    for size in sizes:
        bounds.append((lo, lo + size))
        lo += size
    return order, bounds


def standard_error(values: np.ndarray) -> np.ndarray:
    """Random-groups standard error over axis 0 (the shards): sd (ddof 1) / √K over the finite shard
    values; NaN where fewer than two are finite."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    k = finite.sum(axis=0)
    safe = np.where(finite, values, 0.0)
    mean = safe.sum(axis=0) / np.maximum(k, 1)
    squares = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(squares / (k - 1) / k)
    return np.where(k >= 2, se, np.nan)


def channel_means(values: torch.Tensor, unit_shape: tuple[int, ...], channel_axis: int, masked: bool) -> torch.Tensor:
    """Per-element components [..., *unit_shape] averaged per channel on the device, as
    ``measures.per_channel`` does on the host: [..., C] (``masked``: NaN positions are skipped)."""
    if len(unit_shape) <= 1:
        return values.reshape(*values.shape[: values.dim() - len(unit_shape)], -1)
    lead = values.dim() - len(unit_shape)
    moved = values.movedim(lead + (channel_axis % len(unit_shape)), lead)
    flat = moved.reshape(*moved.shape[: lead + 1], -1)
    return flat.nanmean(dim=-1) if masked else flat.mean(dim=-1)


def absorb(state: StreamingState, into: StreamingState, compiled: bool) -> None:
    """Merge a shard's state into the total of the same kind and clear it (one fused update)."""
    if isinstance(state, SampleMoments):
        _absorb_moments(compiled, state.mean, state.m2, state.count, into.mean, into.m2, into.count)
    else:
        _absorb_sum(compiled, state.total, state.count, into.total, into.count)


@fused
def _absorb_moments(mean, m2, count, into_mean, into_m2, into_count, scratch=None):
    """Chan's merge of a shard's (mean, M2, count) into the total's, then clear the shard's."""
    n_a, n_b = into_count.to(F64), count.to(F64)
    n = (n_a + n_b).clamp_min(1)
    delta = mean - into_mean
    into_mean.add_(delta * (n_b / n))
    into_m2.add_(m2 + delta.square() * (n_a * n_b / n))
    into_count.add_(count)
    mean.zero_()
    m2.zero_()
    count.zero_()


@fused
def _absorb_sum(total, count, into_total, into_count, scratch=None):
    """Add a shard's sum over samples into the total's, then clear the shard's."""
    into_total.add_(total)
    into_count.add_(count)
    total.zero_()
    count.zero_()
