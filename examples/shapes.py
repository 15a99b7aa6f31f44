"""A download-free image dataset whose classes are orientation-sensitive glyphs, for the rotation demo.

``make_shapes`` draws one glyph per image from line strokes, with random position, size, aspect, stroke
thickness, brightness and pixel noise. The five classes (``CLASSES``) are the letters L, T, U, F and an
arrow, drawn upright; no glyph maps onto another by any rotation, so a class is decided by shape alone.
Every glyph changes appearance when rotated (none has 90° symmetry), so a CNN trained on upright glyphs is
not rotation invariant, one trained on ``rotate=True`` data can learn to be, and a p4 network is invariant
to 90° rotations by construction.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["CLASSES", "make_shapes"]

CLASSES = ("L", "T", "U", "F", "arrow")

# Strokes (x0, y0, x1, y1) of each upright glyph in a [-0.5, 0.5]² box; x points right, y points down.
# Glyphs with fewer strokes repeat one, so every class has the same number and drawing stays vectorized.
_STROKES = np.array(
    [
        [(-0.3, -0.5, -0.3, 0.5), (-0.3, 0.5, 0.4, 0.5), (-0.3, 0.5, 0.4, 0.5)],  # L
        [(-0.5, -0.5, 0.5, -0.5), (0.0, -0.5, 0.0, 0.5), (0.0, -0.5, 0.0, 0.5)],  # T
        [(-0.4, -0.5, -0.4, 0.5), (-0.4, 0.5, 0.4, 0.5), (0.4, 0.5, 0.4, -0.5)],  # U
        [(-0.3, -0.5, -0.3, 0.5), (-0.3, -0.5, 0.4, -0.5), (-0.3, 0.0, 0.25, 0.0)],  # F
        [(0.0, 0.5, 0.0, -0.5), (0.0, -0.5, -0.35, -0.15), (0.0, -0.5, 0.35, -0.15)],  # arrow pointing up
    ],
    dtype=np.float32,
)


def make_shapes(n: int, size: int = 32, seed: int = 0, rotate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` glyph images [n, 1, size, size] float32 in [0, 1] and their labels int64 [n] (indices into
    ``CLASSES``, balanced: class counts differ by at most one).

    The same ``seed`` gives the same images; ``rotate=True`` gives the same glyphs, jitter and noise, each
    rotated about its centre by an angle drawn uniformly from [0°, 360°).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels for the glyphs to be legible; got {size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    scale = rng.uniform(0.95, 1.25, (n, 1)) * rng.uniform(0.9, 1.1, (n, 2))  # per-axis size in [-1, 1] units
    angle = rng.uniform(0.0, 2 * np.pi, n)
    shift = rng.uniform(-0.08, 0.08, (n, 2))
    half_width = rng.uniform(0.06, 0.10, n).astype(np.float32)  # stroke half-thickness in [-1, 1] units
    brightness = rng.uniform(0.7, 1.0, n).astype(np.float32)
    noise = rng.normal(0.0, 0.05, (n, size, size)).astype(np.float32)
    if not rotate:
        angle = np.zeros(n)

    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

    def place(points: np.ndarray) -> np.ndarray:
        """Glyph-box points [n, 2] → image coordinates: scale, rotate counter-clockwise as displayed, shift."""
        x, y = points[:, :1] * scale[:, :1], points[:, 1:] * scale[:, 1:]
        return np.concatenate([x * cos + y * sin, y * cos - x * sin], axis=1) + shift

    strokes = _STROKES[labels]  # [n, strokes, 4]
    pixel = 2.0 / size
    centres = (np.arange(size, dtype=np.float32) + 0.5) * pixel - 1.0
    ink = np.zeros((n, size, size), dtype=np.float32)
    for k in range(strokes.shape[1]):
        start, end = place(strokes[:, k, :2]), place(strokes[:, k, 2:])
        distance = _distance_to_segments(centres, start.astype(np.float32), end.astype(np.float32))
        # coverage of the pixel by the stroke, with an antialiased edge one pixel wide
        coverage = (half_width[:, None, None] - distance) * np.float32(1 / pixel) + np.float32(0.5)
        np.maximum(ink, np.clip(coverage, 0.0, 1.0), out=ink)
    images = np.clip(ink * brightness[:, None, None] + noise, 0.0, 1.0)
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64))


def _distance_to_segments(centres: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance [n, size, size] from each pixel centre (x = column, y = row) to image i's segment start[i]–end[i]."""
    direction = end - start
    length2 = np.maximum((direction**2).sum(axis=1), 1e-12)[:, None, None]
    dx = centres[None, None, :] - start[:, 0, None, None]  # [n, 1, size]: varies along columns
    dy = centres[None, :, None] - start[:, 1, None, None]  # [n, size, 1]: varies along rows
    along = np.clip((dx * direction[:, 0, None, None] + dy * direction[:, 1, None, None]) / length2, 0.0, 1.0)
    return np.hypot(dx - along * direction[:, 0, None, None], dy - along * direction[:, 1, None, None])
