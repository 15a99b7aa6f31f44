"""Transformation sets: batched, invertible image transformations with readable labels and a stable id.

A set holds T transformations. ``apply`` turns a batch [b, C, H, W] into the sample-major batch
[b·T, C, H, W] of every transformation of every sample in one batched call on the input's device;
``invert_features`` undoes the spatial part of transformation t on row i·T + t of feature maps of any
size (same-equivariance). Geometry is expressed as affine maps in TensorBoard-agnostic normalized
coordinates, so a set applies to images and to smaller feature maps alike; maps that are exact pixel
permutations (rot90, flips) use an exact gather instead of interpolation. Compiled, feature maps are
moved back by precomputed taps in pixel-major layout instead (``warps.py``: ~2.5× faster than
``grid_sample`` on CPU).

Conventions: positive angles rotate content counter-clockwise as displayed (``rotations([90])`` equals
``torch.rot90(x, 1, dims=(-2, -1))``), translations move content right/down by a fraction of the size,
scale factors > 1 enlarge content. Defaults match tmeasures: bilinear, ``align_corners=False``, border
padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product as _cartesian
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import fused, native, warps
from .statistics import Scratch

__all__ = [
    "Op",
    "Transformation",
    "TransformationSet",
    "rotations",
    "rot90",
    "translations",
    "scalings",
    "flips",
    "brightness",
    "contrast",
    "product",
]

INTERPOLATIONS = ("bilinear", "nearest", "bicubic")
PADDINGS = ("border", "zeros", "reflection")
_GEOMETRIC = ("rotate", "scale", "translate", "flip", "identity")
_PHOTOMETRIC = ("brightness", "contrast")


def _fmt(value: float) -> str:
    """Short, stable text for a number (ids and labels): 45, 22.5, 0.1, -0.125."""
    text = f"{value:.6g}"
    return "0" if text == "-0" else text


@dataclass(frozen=True)
class Op:
    """One primitive: ``rotate(deg)``, ``scale(sx, sy)``, ``translate(dx, dy)``, ``flip(axis)``,
    ``identity()``, ``brightness(delta)`` or ``contrast(factor)``."""

    kind: str
    params: tuple

    def matrix(self, height: int, width: int) -> np.ndarray:
        """Forward map of content in normalized coordinates ([-1, 1], x = column, y = row, y down)."""
        linear = np.eye(3)
        if self.kind == "rotate":
            theta = math.radians(self.params[0])
            c, s = math.cos(theta), math.sin(theta)
            # Counter-clockwise as displayed (y axis points down), isotropic in pixels.
            pixel = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
            to_pixel = np.diag([width / 2.0, height / 2.0, 1.0])
            linear = np.linalg.inv(to_pixel) @ pixel @ to_pixel
        elif self.kind == "scale":
            linear = np.diag([self.params[0], self.params[1], 1.0])
        elif self.kind == "translate":
            linear[0, 2], linear[1, 2] = 2.0 * self.params[0], 2.0 * self.params[1]
        elif self.kind == "flip":
            linear = np.diag([-1.0, 1.0, 1.0] if self.params[0] == "horizontal" else [1.0, -1.0, 1.0])
        # ("identity" keeps the unit matrix.) Snap rounding noise (cos 90° = 6e-17) so exact maps are recognised as exact.
        snapped = np.round(linear)
        return np.where(np.abs(linear - snapped) < 1e-12, snapped, linear)

    @property
    def label(self) -> str:
        p = self.params
        if self.kind == "rotate":
            return f"rotation {_fmt(p[0])}°"
        if self.kind == "scale":
            return f"scale {_fmt(p[0])}" if p[0] == p[1] else f"scale ({_fmt(p[0])}, {_fmt(p[1])})"
        if self.kind == "translate":
            return f"translation ({_fmt(p[0])}, {_fmt(p[1])})"
        if self.kind == "flip":
            return f"flip {p[0]}"
        if self.kind == "identity":
            return "identity"
        if self.kind == "brightness":
            return f"brightness {'+' if p[0] >= 0 else ''}{_fmt(p[0])}"
        return f"contrast ×{_fmt(p[0])}"

    @property
    def is_identity(self) -> bool:
        return {
            "rotate": lambda: self.params[0] % 360 == 0,
            "scale": lambda: self.params == (1.0, 1.0),
            "translate": lambda: self.params == (0.0, 0.0),
            "flip": lambda: False,
            "identity": lambda: True,
            "brightness": lambda: self.params[0] == 0,
            "contrast": lambda: self.params[0] == 1,
        }[self.kind]()

    def as_dict(self) -> dict:
        keys = {
            "rotate": ("degrees",),
            "scale": ("sx", "sy"),
            "translate": ("dx", "dy"),
            "flip": ("axis",),
            "identity": (),
            "brightness": ("delta",),
            "contrast": ("factor",),
        }[self.kind]
        return {"op": self.kind, **dict(zip(keys, self.params))}


@dataclass(frozen=True)
class Transformation:
    """One element of a set: photometric ops, then geometric ops, each in the given order."""

    ops: tuple[Op, ...]

    @property
    def label(self) -> str:
        visible = [op.label for op in self.ops if not op.is_identity]
        if visible:
            return " · ".join(visible)
        named = [op.label for op in self.ops if op.kind != "identity"]  # "rotation 0°" reads better
        return named[0] if named else "identity"

    def matrix(self, height: int, width: int) -> np.ndarray:
        """Composed forward map of the geometric ops (later ops act on the result of earlier ones)."""
        m = np.eye(3)
        for op in self.ops:
            if op.kind in _GEOMETRIC:
                m = op.matrix(height, width) @ m
        return m

    def photometric(self) -> tuple[float, float]:
        """(contrast factor, brightness delta) of the composed photometric ops: x -> m + c(x - m) + d."""
        factor, delta = 1.0, 0.0
        for op in self.ops:
            if op.kind == "contrast":  # around the current mean, so an earlier shift is kept
                factor *= op.params[0]
            elif op.kind == "brightness":
                delta += op.params[0]
        return factor, delta

    @property
    def is_identity(self) -> bool:
        return all(op.is_identity for op in self.ops)

    @property
    def rotation(self) -> float | None:
        """The rotation angle in degrees if the geometric part is a pure rotation (or nothing), else None."""
        if any(op.kind in ("scale", "translate", "flip") and not op.is_identity for op in self.ops):
            return None
        return sum(op.params[0] for op in self.ops if op.kind == "rotate") % 360

    def as_dict(self) -> dict:
        return {"label": self.label, "ops": [op.as_dict() for op in self.ops]}


def _exact_source_index(sampling: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """Flat source pixel for every output pixel if ``sampling`` maps pixel centres onto pixel centres."""
    lin, shift = sampling[:2, :2], sampling[:2, 2]
    if np.any(shift != 0) or not np.all(np.isin(lin, (-1.0, 0.0, 1.0))):
        return None
    if not np.all(np.abs(lin).sum(axis=0) == 1) or not np.all(np.abs(lin).sum(axis=1) == 1):
        return None
    if lin[0, 1] != 0 and height != width:
        return None
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    x = (2 * cols + 1) / width - 1
    y = (2 * rows + 1) / height - 1
    sx = lin[0, 0] * x + lin[0, 1] * y
    sy = lin[1, 0] * x + lin[1, 1] * y
    src_col = np.rint(((sx + 1) * width - 1) / 2).astype(np.int64)
    src_row = np.rint(((sy + 1) * height - 1) / 2).astype(np.int64)
    return (src_row * width + src_col).reshape(-1)


class TransformationSet(Sequence[Transformation]):
    """An ordered set of T transformations applied together to whole batches on the batch's device."""

    def __init__(
        self,
        transformations: Iterable[Transformation],
        spec: str,
        *,
        interpolation: str = "bilinear",
        padding: str = "border",
        require_square: bool = False,
    ):
        self._items = tuple(transformations)
        if not self._items:
            raise ValueError("a transformation set needs at least one transformation")
        self._spatial = any(op.kind in _GEOMETRIC and not op.is_identity for t in self._items for op in t.ops)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; allowed: {', '.join(INTERPOLATIONS)}")
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; allowed: {', '.join(PADDINGS)}")
        self.spec = spec
        self.interpolation = interpolation
        self.padding = padding
        self.require_square = require_square
        self._warp_cache: dict = {}
        self._batch_grids: dict = {}

    # -- sequence protocol and description -------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):  # type: ignore[override]
        return self._items[index]

    def __repr__(self) -> str:
        return f"TransformationSet({self.id!r}, T={len(self)})"

    @property
    def id(self) -> str:
        """Stable identifier written into the logs: what, how interpolated and padded."""
        return f"{self.spec};interpolation={self.interpolation};padding={self.padding}"

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self._items]

    @property
    def identity_index(self) -> int | None:
        """Index of the identity transformation in the set, if there is one."""
        return next((i for i, t in enumerate(self._items) if t.is_identity), None)

    @property
    def is_spatial(self) -> bool:
        """Whether some transformation moves pixels (known when made: asked at every layer and chunk)."""
        return self._spatial

    def interpolates(self, height: int, width: int) -> bool:
        """Whether some transformation of an image of this size is not a pixel permutation, so that pixels
        are interpolated and some come in from outside the image (filled in by ``padding``)."""
        if not self.is_spatial:
            return False
        return any(_exact_source_index(np.round(m, 12), height, width) is None
                   for m in self._sampling_matrices(height, width, inverse=False))

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "interpolation": self.interpolation,
            "padding": self.padding,
            "transformations": [t.as_dict() for t in self._items],
        }

    def with_options(self, *, interpolation: str | None = None, padding: str | None = None) -> "TransformationSet":
        """The same transformations with another interpolation or padding mode."""
        return TransformationSet(
            self._items,
            self.spec,
            interpolation=interpolation or self.interpolation,
            padding=padding or self.padding,
            require_square=self.require_square,
        )

    # -- application -------------------------------------------------------------------------------
    def check_input(self, shape: Sequence[int]) -> None:
        """Raise ValueError naming the problem if a batch of this shape cannot be transformed."""
        shape = tuple(shape)
        if self.is_spatial and len(shape) != 4:
            raise ValueError(
                f"spatial transformations ({self.spec}) need image batches shaped [N, C, H, W]; got shape {list(shape)}"
            )
        if self.require_square and shape[-1] != shape[-2]:
            raise ValueError(
                f"{self.spec} needs square images (H == W) so that every rotation is an exact pixel permutation; "
                f"got H×W = {shape[-2]}×{shape[-1]}. Use rotations([0, 90, 180, 270]) for interpolated "
                "rotations of non-square images."
            )
        if len(shape) < 2 or any(s < 1 for s in shape):
            raise ValueError(f"cannot transform a batch of shape {list(shape)}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """[b, C, H, W] -> [b·T, C, H, W]: row i·T + t is transformation t of sample i."""
        self.check_input(x.shape)
        b, T = x.shape[0], len(self)
        out = x.unsqueeze(1).expand(b, T, *x.shape[1:]).reshape(b * T, *x.shape[1:])
        out = self._photometric(out, inverse=False)
        return self._warp(out, inverse=False) if self.is_spatial else out

    def apply_one(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Transformation ``index`` applied to every sample of x ([b, C, H, W] -> same shape)."""
        return self.apply(x).view(x.shape[0], len(self), *x.shape[1:])[:, index]

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """Exact inverse of ``apply`` row by row: [b·T, C, H, W] -> [b·T, C, H, W] (images)."""
        out = self._warp(y, inverse=True) if self.is_spatial else y
        return self._photometric(out, inverse=True)

    def invert_features(self, y: torch.Tensor, compiled: bool = False, scratch: Scratch | None = None) -> torch.Tensor:
        """Undo the spatial part of transformation t on rows i·T + t of feature maps [b·T, C, h, w].

        Photometric parts have no action on feature maps, so for them this is the identity. Pixel
        permutations are an exact gather; interpolated maps go through ``grid_sample``, or ``compiled``
        through the fused kernels of their taps (``warps.py``: the same values up to float rounding, in
        ``scratch``'s buffers when given).
        """
        if not self.is_spatial:
            return y
        _, _, (kind, _) = self._rows_and_plan(y, inverse=True)
        if kind == "gather" or not compiled or (compiled is True and not fused.compile_available()):
            return self._warp(y, inverse=True)
        scratch = Scratch() if scratch is None else scratch
        n, channels, height, width = y.shape
        if self._moved_rows(y, scratch, compiled) is None:
            return self._warp(y, inverse=True)
        moved = scratch.get("moved", (n, height * width, channels), y.dtype, y.device)  # what it wrote, per row
        out = scratch.get("channel major", (n, channels, height, width), y.dtype, y.device)
        warps.channel_major(compiled, moved, out, scratch=scratch)
        return out

    def invert_features_pixel_major(self, y: torch.Tensor, compiled: bool = False,
                                    scratch: Scratch | None = None) -> torch.Tensor:
        """``invert_features(y)`` laid out pixel-major, [b, T·h·w, C] (``pixel_major``): moved there by the
        taps when ``compiled`` (the CPU kernel, or the compiled graphs when True), which is where they are fast."""
        scratch = Scratch() if scratch is None else scratch
        if self.is_spatial and (compiled is fused.NATIVE or (compiled and fused.compile_available())):
            moved = self._moved_rows(y, scratch, compiled)
            if moved is not None:
                return moved
        return self.pixel_major(self.invert_features(y), compiled, scratch)

    def _moved_rows(self, y: torch.Tensor, scratch: Scratch, compiled: bool | str) -> torch.Tensor | None:
        """The maps y [b·T, C, h, w] moved back by their taps, pixel-major [b, T·h·w, C]: in one pass by the
        CPU kernel where it applies (``native.move_back``), else by the compiled layout change and gather
        (``compiled`` True; else None)."""
        n, channels, height, width = y.shape
        out = scratch.get("moved", (self._samples(n), len(self) * height * width, channels), y.dtype, y.device)
        if self.move_back_into(y, out, scratch):
            return out
        if compiled is not True:
            return None
        sources, weights = self.inverse_taps(height, width, y.device, y.dtype)
        warps.gather_taps(True, self.pixel_major(y, True, scratch), sources, weights, out, scratch=scratch)
        return out

    def move_back_into(self, y: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> bool:
        """The maps y [b·T, C, h, w] moved back into ``out`` [b, T·h·w, C] pixel-major by the warp's CPU kernel
        (``native.move_back``), as ``invert_features_pixel_major`` moves them; False where it does not apply."""
        if not self.is_spatial:
            return False
        _, _, height, width = y.shape
        sources, weights = self.inverse_taps(height, width, y.device, y.dtype)

        def buffer(numel: int) -> torch.Tensor:
            return scratch.get("warp rows", (numel,), y.dtype, y.device)

        return native.move_back(y, sources, weights, out, buffer)

    def pixel_major(self, y: torch.Tensor, compiled: bool = False, scratch: Scratch | None = None) -> torch.Tensor:
        """Maps [b·T, C, h, w] as [b, T·h·w, C] (sample i's maps, transformation by transformation, pixel by
        pixel): the layout the inverse warp's taps read fast (``warps.py``), in ``scratch``'s buffer."""
        n, channels, height, width = y.shape
        b = self._samples(n)
        scratch = Scratch() if scratch is None else scratch
        warps.pixel_major(compiled, y, scratch.get("pixel major", (n, height * width, channels), y.dtype, y.device),
                          scratch=scratch)
        return scratch.get("pixel major", (b, len(self) * height * width, channels), y.dtype, y.device)

    def inverse_taps(self, height: int, width: int, device: torch.device, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The taps of the inverse warps on h×w maps (``warps.tap_table``): sources into a sample's T·h·w
        pixel-major rows and weights, [T·h·w, k] each; made once per size, device and dtype."""
        key = ("taps", height, width, device, dtype)
        taps = self._warp_cache.get(key)
        if taps is None:
            table = warps.tap_table(self._sampling_matrices(height, width, inverse=True), height, width,
                                    self.interpolation, self.padding)
            taps = self._warp_cache[key] = warps.table_tensors(*table, device, dtype)
        return taps

    def invert_features_at(self, y: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``invert_features(y)`` (eager) read only at ``positions`` ([C, K] flat h·w indices per channel, on
        y's device): [b·T, C·K], channel-major. Only those points are moved back (K / (h·w) of the warp),
        each from the same coordinates as the whole map's: the same values, bit for bit."""
        n, channels, height, width = y.shape
        count = positions.shape[1]
        if not self.is_spatial:
            offsets = torch.arange(channels, device=y.device).unsqueeze(1) * (height * width)
            return y.reshape(n, -1).index_select(1, (positions + offsets).reshape(-1))
        T = len(self)
        b, _, (kind, data) = self._rows_and_plan(y, inverse=True)
        if kind == "gather":  # data [T, h·w]: each output pixel's source pixel
            offsets = torch.arange(channels, device=y.device).repeat_interleave(count) * (height * width)
            source = data.index_select(1, positions.reshape(-1)) + offsets  # [T, C·K] into [C·h·w]
            index = source.unsqueeze(0).expand(b, T, channels * count)
            return y.reshape(b, T, channels * height * width).gather(2, index).view(n, channels * count)
        # one grid per (transformation, channel), the batch's samples as grid_sample's channels
        grid = data.reshape(T, height * width, 2).index_select(1, positions.reshape(-1))
        maps = y.view(b, T, channels, height, width).permute(1, 2, 0, 3, 4).reshape(T * channels, b, height, width)
        moved = F.grid_sample(maps, grid.view(T * channels, 1, count, 2), mode=self.interpolation,
                              padding_mode=self.padding, align_corners=False)
        return moved.view(T, channels, b, count).permute(2, 0, 1, 3).reshape(n, channels * count)

    def _photometric(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        factors, deltas = zip(*(t.photometric() for t in self._items))
        if all(f == 1 for f in factors) and all(d == 0 for d in deltas):
            return x
        T = len(self)
        view = x.reshape(-1, T, *x.shape[1:])
        shape = (1, T) + (1,) * (x.dim() - 1)
        c = torch.tensor(factors, dtype=x.dtype, device=x.device).view(shape)
        d = torch.tensor(deltas, dtype=x.dtype, device=x.device).view(shape)
        dims = tuple(range(3, view.dim()))  # per image and channel
        if not inverse:
            mean = view.mean(dim=dims, keepdim=True) if dims else view
            out = mean + c * (view - mean) + d
        else:
            shifted = view - d
            mean = shifted.mean(dim=dims, keepdim=True) if dims else shifted
            out = mean + (shifted - mean) / c
        return out.reshape(x.shape)

    def _sampling_matrices(self, height: int, width: int, inverse: bool) -> list[np.ndarray]:
        """Per transformation, the map from output to input coordinates (what grid_sample needs)."""
        forward = [t.matrix(height, width) for t in self._items]
        return forward if inverse else [np.linalg.inv(m) for m in forward]

    def _warp_plan(self, key: tuple, height: int, width: int, inverse: bool, device: torch.device,
                   dtype: torch.dtype):
        plan = self._warp_cache.get(key)
        if plan is None:
            mats = self._sampling_matrices(height, width, inverse)
            sources = [_exact_source_index(np.round(m, 12), height, width) for m in mats]
            if all(s is not None for s in sources):
                plan = ("gather", torch.as_tensor(np.stack(sources), device=device))
            else:
                theta = torch.tensor(np.stack([m[:2] for m in mats]), dtype=torch.float64)
                grid = F.affine_grid(theta, [len(mats), 1, height, width], align_corners=False)
                plan = ("grid", grid.to(device=device, dtype=dtype))
            self._warp_cache[key] = plan
        return plan

    def _warp(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"spatial transformations need [N, C, H, W] tensors; got shape {list(x.shape)}")
        T = len(self)
        n, channels, height, width = x.shape
        b, key, (kind, data) = self._rows_and_plan(x, inverse)
        if kind == "gather":
            flat = x.reshape(b, T, channels, height * width)
            index = data.view(1, T, 1, height * width).expand(b, T, channels, height * width)
            return flat.gather(3, index).view(n, channels, height, width)
        return F.grid_sample(x, self._batch_grid(key, data, b), mode=self.interpolation, padding_mode=self.padding,
                             align_corners=False)

    def _rows_and_plan(self, x: torch.Tensor, inverse: bool) -> tuple[int, tuple, tuple]:
        """For maps x [b·T, C, h, w]: b, the plan's key and the warp plan (ValueError unless whole T-groups)."""
        height, width = x.shape[-2:]
        key = (height, width, inverse, x.device, x.dtype)
        return self._samples(x.shape[0]), key, self._warp_plan(key, height, width, inverse, x.device, x.dtype)

    def _samples(self, rows: int) -> int:
        """The samples b of a batch of b·T rows (ValueError unless whole T-groups)."""
        if rows % len(self):
            raise ValueError(f"batch of {rows} rows is not a whole number of {len(self)}-transformation groups")
        return rows // len(self)

    def _batch_grid(self, key: tuple, grid: torch.Tensor, b: int) -> torch.Tensor:
        """The plan ``key``'s [T, h, w, 2] sampling grid repeated for b samples, kept for the next chunk of
        the same size (one op less per layer and chunk)."""
        per_plan = self._batch_grids.setdefault(b, {})
        if len(self._batch_grids) > 2:  # keep two chunk sizes: a measurement's and its last chunk's
            del self._batch_grids[next(iter(self._batch_grids))]
        if key not in per_plan:
            per_plan[key] = grid.repeat(b, 1, 1, 1)
        return per_plan[key]


# -- constructors ------------------------------------------------------------------------------------


def _set(ops_per_item: list[tuple[Op, ...]], spec: str, interpolation: str, padding: str, **kw) -> TransformationSet:
    return TransformationSet(
        [Transformation(ops) for ops in ops_per_item], spec, interpolation=interpolation, padding=padding, **kw
    )


def _floats(values: Iterable[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{what}: give at least one value")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what}: values must be finite, got {out}")
    return out


def rotations(
    angles: int | Sequence[float], *, interpolation: str = "bilinear", padding: str = "border"
) -> TransformationSet:
    """Rotations by the given angles in degrees, or ``rotations(n)``: n angles evenly spaced in [0°, 360°)."""
    if isinstance(angles, float):
        raise TypeError("rotations() takes an int n (evenly spaced angles) or a sequence of angles in degrees")
    if isinstance(angles, (int, np.integer)) and not isinstance(angles, bool):
        if angles < 1:
            raise ValueError(f"rotations(n) needs n >= 1, got {angles}")
        degrees = [360.0 * i / angles for i in range(int(angles))]
    else:
        degrees = _floats(angles, "rotations")
    spec = f"rotations({','.join(_fmt(d) for d in degrees)})"
    return _set([(Op("rotate", (d,)),) for d in degrees], spec, interpolation, padding)


def rot90() -> TransformationSet:
    """The exact group of four rotations by multiples of 90° (pixel permutations; needs square inputs)."""
    return _set(
        [(Op("rotate", (90.0 * k,)),) for k in range(4)], "rot90", "bilinear", "border", require_square=True
    )


def translations(
    offsets: float | Sequence[tuple[float, float]], *, interpolation: str = "bilinear", padding: str = "border"
) -> TransformationSet:
    """Translations by (dx, dy) fractions of the width and height; a number d gives the 3×3 grid {-d, 0, d}²."""
    if isinstance(offsets, (int, float)):
        d = float(offsets)
        pairs = [(dx, dy) for dy in (-d, 0.0, d) for dx in (-d, 0.0, d)]
    else:
        pairs = [(float(dx), float(dy)) for dx, dy in offsets]
        _floats([v for p in pairs for v in p], "translations")
    spec = "translations(" + ",".join(f"{_fmt(dx)}:{_fmt(dy)}" for dx, dy in pairs) + ")"
    return _set([(Op("translate", p),) for p in pairs], spec, interpolation, padding)


def scalings(
    factors: Sequence[float | tuple[float, float]], *, interpolation: str = "bilinear", padding: str = "border"
) -> TransformationSet:
    """Scalings by factors (> 1 enlarges content); a pair (sx, sy) scales the axes separately."""
    pairs = [(float(f), float(f)) if isinstance(f, (int, float)) else (float(f[0]), float(f[1])) for f in factors]
    values = _floats([v for p in pairs for v in p], "scalings")
    if any(v <= 0 for v in values):
        raise ValueError(f"scalings: factors must be > 0, got {values}")
    spec = "scalings(" + ",".join(_fmt(a) if a == b else f"{_fmt(a)}:{_fmt(b)}" for a, b in pairs) + ")"
    return _set([(Op("scale", p),) for p in pairs], spec, interpolation, padding)


def flips(horizontal: bool = True, vertical: bool = True) -> TransformationSet:
    """Identity plus the chosen mirror flips (exact pixel permutations)."""
    if not (horizontal or vertical):
        raise ValueError("flips: choose at least one of horizontal, vertical")
    items: list[tuple[Op, ...]] = [(Op("identity", ()),)]
    axes = [a for a, on in (("horizontal", horizontal), ("vertical", vertical)) if on]
    items += [(Op("flip", (a,)),) for a in axes]
    return _set(items, f"flips({','.join(axes)})", "bilinear", "border")


def brightness(deltas: Sequence[float]) -> TransformationSet:
    """Additive brightness changes x + delta (no clipping, so exactly invertible)."""
    values = _floats(deltas, "brightness")
    return _set([(Op("brightness", (d,)),) for d in values], f"brightness({','.join(map(_fmt, values))})",
                "bilinear", "border")


def contrast(factors: Sequence[float]) -> TransformationSet:
    """Contrast changes around each image channel's mean: m + factor·(x − m) (factor > 0)."""
    values = _floats(factors, "contrast")
    if any(v <= 0 for v in values):
        raise ValueError(f"contrast: factors must be > 0, got {values}")
    return _set([(Op("contrast", (c,)),) for c in values], f"contrast({','.join(map(_fmt, values))})",
                "bilinear", "border")


def product(*sets: TransformationSet, interpolation: str | None = None, padding: str | None = None) -> TransformationSet:
    """Cartesian product: every combination, the first set's transformation applied first.

    Geometric parts compose into one affine map, so a combination is interpolated once.
    """
    if len(sets) < 2:
        raise ValueError("product needs at least two transformation sets")
    items = [tuple(op for t in combo for op in t.ops) for combo in _cartesian(*sets)]
    spec = "product(" + ",".join(s.spec for s in sets) + ")"
    return _set(
        items,
        spec,
        interpolation or sets[0].interpolation,
        padding or sets[0].padding,
        require_square=any(s.require_square for s in sets),
    )
