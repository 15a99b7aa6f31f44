"""The inverse warps' taps (warps.py): grid_sample's values for every interpolation and padding, exact
maps exact, the compiled kernels' buffers reused, and same-equivariance compiled as eager."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tm_tensorboard as tm
from tm_tensorboard import transforms as T
from tm_tensorboard.statistics import Scratch
from models import small_cnn

SETS = {
    "rotations": lambda interpolation, padding: T.rotations(7, interpolation=interpolation, padding=padding),
    "scale-x-translate": lambda interpolation, padding: T.product(
        T.scalings([0.7, 1.3], interpolation=interpolation, padding=padding),
        T.translations([(0.13, -0.21)], interpolation=interpolation, padding=padding)),
}


def grid_sample_reference(tset: T.TransformationSet, y: torch.Tensor) -> torch.Tensor:
    """grid_sample in float64 on an affine_grid in float64 from the set's own sampling matrices."""
    n, _, height, width = y.shape
    matrices = tset._sampling_matrices(height, width, inverse=True)
    theta = torch.tensor(np.stack([m[:2] for m in matrices]), dtype=torch.float64)
    grid = F.affine_grid(theta, [len(matrices), 1, height, width], align_corners=False)
    return F.grid_sample(y.double(), grid.repeat(n // len(tset), 1, 1, 1), mode=tset.interpolation,
                         padding_mode=tset.padding, align_corners=False)


@pytest.mark.parametrize("interpolation,padding", list(itertools.product(T.INTERPOLATIONS, T.PADDINGS)))
@pytest.mark.parametrize("kind", list(SETS))
def test_taps_are_grid_samples_values(kind, interpolation, padding):
    """In float64 the compiled taps equal grid_sample to rounding, on square, odd, non-square and
    one-pixel-high maps (every padding's edge cases)."""
    tset = SETS[kind](interpolation, padding)
    generator = torch.Generator().manual_seed(0)
    for height, width in ((9, 9), (6, 10), (1, 5)):
        y = torch.randn(3 * len(tset), 4, height, width, dtype=torch.float64, generator=generator)
        expected = grid_sample_reference(tset, y)
        got = tset.invert_features(y, compiled=True)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        rows = tset.invert_features_pixel_major(y, compiled=True)  # [b, T·h·w, C]
        torch.testing.assert_close(rows.reshape(-1, height, width, 4).permute(0, 3, 1, 2), expected, rtol=0, atol=1e-12)


def test_float32_taps_are_grid_sample_up_to_rounding():
    """Both round each weight and each product in float32, differently: a few float32 ulps of the inputs'
    magnitude (2e-6 without a seed and |y| up to ~4.5 failed once in a while: 2.6e-6)."""
    tset = T.rotations(16)
    y = torch.randn(2 * 16, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    atol = 16 * torch.finfo(torch.float32).eps * y.abs().max().item()
    torch.testing.assert_close(tset.invert_features(y, compiled=True), tset.invert_features(y), rtol=0, atol=atol)


def test_pixel_permutations_are_one_exact_tap():
    """rot90 and flips: one tap of weight 1, the same values as the exact gather, bit for bit (inf too);
    in a set that also interpolates, an exact map's taps are its source with weight 1 and zeros."""
    for tset in (T.rot90(), T.flips()):
        sources, weights = tset.inverse_taps(6, 6, torch.device("cpu"), torch.float32)
        assert sources.shape[-1] == 1 and bool((weights == 1).all())
        y = torch.randn(3 * len(tset), 5, 6, 6)
        y[1, 2, 3, 4] = float("inf")
        rows = tset.invert_features_pixel_major(y, compiled=True)
        assert torch.equal(rows, tset.pixel_major(tset.invert_features(y)))
    sources, weights = T.rotations(8).inverse_taps(8, 8, torch.device("cpu"), torch.float64)
    quarter = weights.view(8, 64, -1)[2]  # 90°
    assert sources.shape[-1] == 4 and bool((quarter.max(dim=1).values == 1).all()) and int((quarter != 0).sum()) == 64


def test_scratch_gives_the_same_view_again():
    """Buffers asked again by name and shape are the same tensor (no op); another shape views the same
    memory; a larger request reallocates."""
    scratch = Scratch()
    a = scratch.get("x", (4, 6), torch.float32, torch.device("cpu"))
    assert scratch.get("x", (4, 6), torch.float32, torch.device("cpu")) is a
    b = scratch.get("x", (2, 12), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 12)
    c = scratch.get("x", (10, 10), torch.float32, torch.device("cpu"))
    assert c.numel() == 100 and scratch.get("x", (4, 6), torch.float32, torch.device("cpu")).data_ptr() == c.data_ptr()


@pytest.mark.parametrize("tset", [T.rotations(8), T.rotations(5, interpolation="bicubic", padding="zeros"), T.rot90()],
                         ids=lambda s: s.spec[:20])
def test_same_equivariance_compiled_equals_eager(tset):
    """The taps (compiled) and grid_sample (eager) give the same measures, per element and per channel.
    (Both stream pixel-major; test_engine's brute force checks the (C, h, w) order of either.)"""
    torch.manual_seed(0)
    model, probe = small_cnn().eval(), torch.randn(12, 3, 12, 12)
    results = [tm.measure(model, probe, tset, measures=("same_equivariance",), batch_size=5, compile=compiled,
                          error_bars=False) for compiled in (False, True)]
    for layer in results[0].layers_of("nvse"):
        for per in ("element", "channel"):
            np.testing.assert_allclose(results[1].get("nvse", layer, per=per), results[0].get("nvse", layer, per=per),
                                       rtol=1e-4, atol=1e-6, err_msg=f"{layer} {per}")
