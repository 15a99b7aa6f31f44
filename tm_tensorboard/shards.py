"""Error bars from the probe itself: K interleaved shards and the delete-a-shard jackknife.

Sample n of the probe belongs to shard n mod K (interleaved, so a probe sorted by class gives every shard
every class). The probe is streamed shard after shard, and each shard's streaming states are kept apart
(no extra forward). At the end they merge into the whole probe's states (Chan's formula: the result is
exactly the one-pass result), and each shard's states become the whole probe's *without* that shard
(``leave_out``, the inverse merge; the variance groups compute their replicates from the whole probe's and
the shards' states directly: ``moments_without``, ``sum_without``). Every measure is computed from those
K leave-one-out states: its replicates v_(k). The standard error of a value v (a unit's measure, a layer
mean) is the delete-a-group jackknife √((K − 1)/K · Σ_k (v_(k) − v̄)²).

Why the jackknife and not random groups (the spread of the K shards measured alone, over √K): the
measures are non-linear in the samples (SV is a standard deviation, NV a ratio, a layer mean skips dead
units), and a replicate of (K − 1)/K of the probe behaves like the whole probe where a shard of N/K samples
does not: a sparse ReLU channel that fires in a few samples is dead (0 / 0) in some shards, never in a
replicate. On the example SimpleCNN random groups reported 0.3 to 17 times the spread over independent
probes on ReLU layers (benchmarks/README.md). The price is memory: K sets of states instead of one while
streaming, and the whole probe's merged from them at the end (into shard 0's memory where the replicates'
CPU kernels finalize, else one more set).
"""
from __future__ import annotations

import numpy as np
import torch

from .fused import fused
from .statistics import SampleMoments, StreamingState

__all__ = ["DEFAULT_SHARDS", "MIN_SHARD_SAMPLES", "AUTOMATIC_ERROR_BAR_BYTES", "ROUNDING", "shard_count", "interleave",
           "standard_error", "channel_means", "merge_into", "leave_out", "moments_without", "sum_without"]

DEFAULT_SHARDS = 8
MIN_SHARD_SAMPLES = 16
AUTOMATIC_ERROR_BAR_BYTES = 2 * 10**9  # the most memory error bars take unasked (error_bars=None)
ROUNDING = 64  # ulps of the whole probe's state within which the state without a shard is taken as 0


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


def standard_error(replicates: np.ndarray) -> np.ndarray:
    """Delete-a-group jackknife standard error over axis 0 (the K replicates, each the probe without one
    shard): √((K − 1) / K · Σ_k (v_k − v̄)²) over the finite replicates; NaN where fewer than two are."""
    values = np.asarray(replicates, dtype=np.float64)
    finite = np.isfinite(values)
    k = finite.sum(axis=0)
    safe = np.where(finite, values, 0.0)
    mean = safe.sum(axis=0) / np.maximum(k, 1)
    squares = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(squares * (k - 1) / k)
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


def merge_into(total: StreamingState, shards: list[StreamingState], compiled: bool) -> None:
    """Merge every shard's state into the total of the same kind (``StreamingState.merge``, shard after
    shard), in one fused call: per layer, a constant number of kernels whatever K."""
    if isinstance(total, SampleMoments):
        _merge_moments(compiled, total.mean, total.m2, total.count, [s.mean for s in shards], [s.m2 for s in shards],
                       [s.count for s in shards])
    else:
        _merge_sums(compiled, total.total, total.count, [s.total for s in shards], [s.count for s in shards])


@fused
def _merge_moments(mean, m2, count, shard_means, shard_m2s, shard_counts, scratch=None):
    """Chan's merge of each shard's (mean, M2, count) into the total's, in turn."""
    for shard_mean, shard_m2, shard_count in zip(shard_means, shard_m2s, shard_counts):
        n_a, n_b = count.to(mean.dtype), shard_count.to(mean.dtype)
        n = (n_a + n_b).clamp_min(1)
        delta = shard_mean - mean
        mean.add_(delta * (n_b / n))
        m2.add_(shard_m2 + delta.square() * (n_a * n_b / n))
        count.add_(shard_count)


@fused
def _merge_sums(total, count, shard_totals, shard_counts, scratch=None):
    """Add each shard's sum over samples into the total's."""
    for shard_total, shard_count in zip(shard_totals, shard_counts):
        total.add_(shard_total)
        count.add_(shard_count)


def leave_out(total: StreamingState, shards: list[StreamingState], compiled: bool) -> None:
    """Turn each shard's state into the whole probe's without that shard (the inverse of Chan's merge),
    in one fused call: ``state`` := ``total`` − ``state``."""
    if isinstance(total, SampleMoments):
        _leave_out_moments(compiled, total.mean, total.m2, total.count, [s.mean for s in shards],
                           [s.m2 for s in shards], [s.count for s in shards])
    else:
        _leave_out_sums(compiled, total.total, total.count, [s.total for s in shards], [s.count for s in shards])


def moments_without(mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor, shard_mean: torch.Tensor,
                    shard_m2: torch.Tensor, shard_count: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, M2, count) of the total's samples without a shard's: n_r = n − n_k,
    μ_r = μ + n_k (μ − μ_k) / n_r, M2_r = M2 − M2_k − (μ_k − μ_r)² n_k n_r / n. What is left of M2 within
    the subtraction's rounding (ROUNDING ulps of M2) is 0: the rest of a unit that varied in this shard only
    (a channel firing in a few samples) is exactly constant, and would otherwise get a variance of noise."""
    n, n_k = count.to(mean.dtype), shard_count.to(mean.dtype)
    n_r = n - n_k
    rest_mean = (mean + (mean - shard_mean) * (n_k / n_r.clamp_min(1))) * (n_r > 0)
    delta = shard_mean - rest_mean
    rest_m2 = m2 - shard_m2 - delta.square() * (n_k * n_r / n.clamp_min(1))
    rest_m2 = torch.where(rest_m2 <= m2 * (ROUNDING * torch.finfo(m2.dtype).eps), 0.0, rest_m2)  # NaN stays
    return rest_mean, rest_m2, count - shard_count


def sum_without(total: torch.Tensor, count: torch.Tensor, shard_total: torch.Tensor, shard_count: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The total's sum over samples without a shard's, and its count (a rest within ROUNDING ulps of the
    total is 0, as for the moments; the sums are of non-negative quantities)."""
    rest = total - shard_total
    rest = torch.where(rest.abs() <= total.abs() * (ROUNDING * torch.finfo(total.dtype).eps), 0.0, rest)
    return rest, count - shard_count


@fused
def _leave_out_moments(mean, m2, count, shard_means, shard_m2s, shard_counts, scratch=None):
    """Each shard's (mean, M2, count) := the total's without it (``moments_without``'s arithmetic, in place:
    run eagerly, half the temporaries, the threshold once)."""
    threshold = m2 * (ROUNDING * torch.finfo(m2.dtype).eps)
    n = count.to(mean.dtype)
    for shard_mean, shard_m2, shard_count in zip(shard_means, shard_m2s, shard_counts):
        n_k = shard_count.to(mean.dtype)
        n_r = n - n_k
        rest_mean = torch.sub(mean, shard_mean).mul_(n_k / n_r.clamp_min(1)).add_(mean).mul_(n_r > 0)
        delta = shard_mean.sub_(rest_mean)  # the shard's mean is the rest's from here on (below)
        shard_m2.neg_().add_(m2).sub_(delta.square_().mul_(n_k * n_r / n.clamp_min(1)))
        shard_m2.masked_fill_(shard_m2 <= threshold, 0.0)  # NaN stays
        shard_mean.copy_(rest_mean)
        shard_count.sub_(count).neg_()


@fused
def _leave_out_sums(total, count, shard_totals, shard_counts, scratch=None):
    """Each shard's sum over samples := the total's without it (``sum_without``), in place: run eagerly,
    5 ops a shard, the threshold once, where ``sum_without`` took 7 and a copy (−(shard − total) is total − shard
    exactly)."""
    threshold = total.abs() * (ROUNDING * torch.finfo(total.dtype).eps)
    for shard_total, shard_count in zip(shard_totals, shard_counts):
        rest = shard_total.sub_(total).neg_()
        rest.masked_fill_(rest.abs() <= threshold, 0.0)  # NaN stays (the comparison is false)
        shard_count.sub_(count).neg_()
