"""Moving feature maps back by the inverse transformations, as fixed taps in pixel-major layout.

``grid_sample`` reads feature maps [n, C, h, w] one channel's map at a time and gathers each output
pixel's source pixels with scalar loads: ~3 ns per value on these CPUs, more than the forward of a narrow
network. But the inverse warp of transformation t on an h×w map is the same for every sample and channel:
each output pixel is a weighted sum of k source pixels (k = 1 for pixel permutations, 4 bilinear, 16
bicubic), with weights and sources fixed by t, the map's size, the interpolation and the padding. So the
taps are computed once, in float64 and as ``grid_sample`` defines them (``align_corners=False``, every
padding mode), and applied to maps laid out pixel-major, [n, h·w, C]: every tap reads a contiguous row of
C channels, which vectorizes. Compiled, that layout change and the gather are two kernels: 5.5 ms
together on [256, 16, 32, 32] with the caches flushed, against 13.1 ms for ``grid_sample``
(``benchmarks/bench_warps.py``); on CPU one hand-written kernel does both in one pass
(``native.move_back``). They write into buffers the caller keeps (``Scratch``): a compiled
function's fresh outputs page-faulted on every call. Eagerly the taps are slower than ``grid_sample``
(one op per tap over the whole maps: 17 vs 8 ms), so the eager path keeps ``grid_sample``
(``TransformationSet.invert_features``).

The values are ``grid_sample``'s up to float rounding: its coordinates are computed in the features'
precision, the taps' in float64 (a coordinate within 1e-9 of a pixel centre is that centre, so exact
maps stay exact, and a set of pixel permutations is one tap of weight 1). As in ``grid_sample``, a tap of
weight 0 is still multiplied: where it reads inf or NaN, the output is NaN. (Masking such taps made the
compiled kernel twice as slow.)
"""
from __future__ import annotations

import numpy as np
import torch

from .fused import fused

__all__ = ["tap_table", "table_tensors", "pixel_major", "channel_major", "gather_taps"]

_SNAP = 1e-9  # a source coordinate this close to a pixel centre is the centre
_CUBIC_A = -0.75  # grid_sample's (and OpenCV's) cubic convolution coefficient


def _reflect(coordinate: np.ndarray, size: int) -> np.ndarray:
    """Reflect about the map's edges (−0.5 and size − 0.5), then clip into it: grid_sample's reflection
    padding with ``align_corners=False``."""
    distance = np.abs(coordinate + 0.5)
    extra = np.fmod(distance, size)
    flips = np.floor(distance / size)
    reflected = np.where(flips % 2 == 0, extra - 0.5, size - extra - 0.5)
    return np.clip(reflected, 0, size - 1)


def _pad(coordinate: np.ndarray, size: int, padding: str) -> np.ndarray:
    """A source coordinate moved inside the map as ``padding`` says (zeros: left as is)."""
    if padding == "border":
        return np.clip(coordinate, 0, size - 1)
    if padding == "reflection":
        return _reflect(coordinate, size)
    return coordinate


def _axis_taps(coordinate: np.ndarray, size: int, interpolation: str, padding: str) -> tuple[np.ndarray, np.ndarray]:
    """Per output coordinate along one axis, the source pixels and their weights, [..., k] each; a tap
    outside the map (zeros padding) gets weight 0 and the nearest pixel inside."""
    if interpolation == "bicubic":  # taps around the unpadded coordinate, each tap padded on its own
        start = np.floor(coordinate)
        t = coordinate - start
        a = _CUBIC_A
        weights = np.stack([
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        ], axis=-1)
        pixels = _pad(start[..., None] + np.arange(-1, 3), size, padding)
    else:
        coordinate = _pad(coordinate, size, padding)
        if interpolation == "nearest":
            pixels, weights = np.rint(coordinate)[..., None], np.ones(coordinate.shape + (1,))  # half to even, as grid_sample
        else:
            start = np.floor(coordinate)
            t = coordinate - start
            pixels, weights = start[..., None] + np.arange(2), np.stack([1 - t, t], axis=-1)
    inside = (pixels >= 0) & (pixels <= size - 1)
    return np.clip(pixels, 0, size - 1).astype(np.int64), np.where(inside, weights, 0.0)


def tap_table(sampling: list[np.ndarray], height: int, width: int, interpolation: str, padding: str
              ) -> tuple[np.ndarray, np.ndarray]:
    """For T sampling matrices (output to source, normalized coordinates), the taps of every output pixel:
    source rows into a [T·h·w] stack of pixel-major maps (transformation t's map from row t·h·w on), and
    float64 weights, both [T, h·w, k]."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    x = ((2 * cols + 1) / width - 1).reshape(-1)
    y = ((2 * rows + 1) / height - 1).reshape(-1)
    sources, weights = [], []
    for t, m in enumerate(sampling):
        sx, sy = m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]
        ix, iy = ((sx + 1) * width - 1) / 2, ((sy + 1) * height - 1) / 2
        ix = np.where(np.abs(ix - np.rint(ix)) < _SNAP, np.rint(ix), ix)
        iy = np.where(np.abs(iy - np.rint(iy)) < _SNAP, np.rint(iy), iy)
        px, wx = _axis_taps(ix, width, interpolation, padding)  # [h·w, kx]
        py, wy = _axis_taps(iy, height, interpolation, padding)
        sources.append(t * height * width + (py[:, :, None] * width + px[:, None, :]).reshape(len(x), -1))
        weights.append((wy[:, :, None] * wx[:, None, :]).reshape(len(x), -1))
    sources, weights = np.stack(sources), np.stack(weights)
    if np.all(np.count_nonzero(weights, axis=-1) <= 1):  # pixel permutations (and pixels from outside): one tap
        first = weights.argmax(axis=-1)[..., None]
        sources, weights = np.take_along_axis(sources, first, -1), np.take_along_axis(weights, first, -1)
    return sources, weights


@fused
def pixel_major(maps, out, scratch=None):
    """Feature maps [n, C, h, w] written pixel-major into ``out`` [n, h·w, C]. (Outputs are buffers the
    caller keeps: a compiled function's own outputs are fresh allocations, which on CPU page-fault in anew
    each chunk: 0.33 M faults, a third of the warp's time, on ResNet18Style at width 0.25. The source is
    shaped as ``out`` by views: reshaping it, or viewing ``out``, made Inductor write a temporary too.)"""
    out.copy_(maps.flatten(2).transpose(1, 2))


@fused
def channel_major(rows, out, scratch=None):
    """Pixel-major maps [n, h·w, C] written into ``out`` [n, C, h, w]."""
    out.copy_(rows.transpose(1, 2).unflatten(2, out.shape[2:]))


@fused
def gather_taps(rows, sources, weights, out, scratch=None):
    """Pixel-major maps [b, T·h·w, C] moved by taps ([T·h·w, k] sources and weights) into ``out``: each
    output row the weighted sum of its k source rows, the taps in order. (One term per tap, k static:
    written as a reduction over k, Inductor's kernel was 60× slower. Fused into the measure's update
    instead, it needed a temporary as large: no faster, and page faults.)"""
    total = None
    for j in range(sources.shape[-1]):
        term = rows.index_select(1, sources[:, j]) * weights[:, j].view(1, -1, 1)
        total = term if total is None else total + term
    out.copy_(total)


def table_tensors(sources: np.ndarray, weights: np.ndarray, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The taps as tensors on the device: sources [T·h·w, k] int64, weights in the features' dtype."""
    k = sources.shape[-1]
    return (torch.as_tensor(sources.reshape(-1, k), device=device),
            torch.as_tensor(weights.reshape(-1, k), dtype=dtype, device=device))

