"""Transformation sets: conventions, exactness, inverses, batching, ids and errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tm_tensorboard import transforms as T


def smooth_image(b=2, c=3, h=32, w=32):
    """A smooth image so that interpolation errors are small in the interior."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([torch.sin(2 * x + k) * torch.cos(3 * y - k) for k in range(c)])
    return (base.unsqueeze(0) * torch.arange(1, b + 1).view(b, 1, 1, 1)).contiguous()


def test_rotation_90_matches_torch_rot90():
    x = torch.randn(3, 2, 9, 9)
    for k, angle in ((1, 90), (2, 180), (3, 270), (-1, -90)):
        out = T.rotations([angle]).apply(x)
        torch.testing.assert_close(out, torch.rot90(x, k, dims=(2, 3)), rtol=0, atol=1e-6)


def test_interpolated_rotation_near_90_agrees_with_rot90():
    """An angle that is not snapped to the exact path goes through grid_sample: float32 rounding only."""
    x = torch.randn(2, 2, 8, 8)
    out = T.rotations([90.0 + 1e-9]).apply(x)
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(2, 3)), rtol=1e-5, atol=1e-5)


def test_rotation_direction_is_counter_clockwise_as_displayed():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 4] = 1  # top-right corner
    out = T.rotations([90]).apply(x)
    assert out[0, 0, 0, 0] == 1  # moves to the top-left corner


def test_rot90_and_flips_are_exact_and_exactly_inverted():
    x = torch.randn(4, 3, 7, 7)
    for tset in (T.rot90(), T.flips(), T.product(T.rot90(), T.flips())):
        y = tset.apply(x)
        assert y.shape == (4 * len(tset), 3, 7, 7)
        for t in range(len(tset)):
            assert torch.equal(tset.apply_one(x, t), y.view(4, len(tset), 3, 7, 7)[:, t])
        assert torch.equal(tset.invert(y), x.repeat_interleave(len(tset), dim=0))
        assert torch.equal(tset.invert_features(y), x.repeat_interleave(len(tset), dim=0))
    flipped = T.flips(vertical=False).apply_one(x, 1)
    assert torch.equal(flipped, torch.flip(x, dims=(3,)))


def test_sample_major_layout():
    x = torch.randn(3, 1, 6, 6)
    tset = T.rotations([0, 90, 180])
    y = tset.apply(x)
    for i in range(3):
        for t, k in enumerate((0, 1, 2)):
            torch.testing.assert_close(y[i * 3 + t], torch.rot90(x[i], k, dims=(1, 2)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "tset",
    [
        T.rotations(8),
        T.translations([(0.1, 0.0), (-0.05, 0.1)]),
        T.scalings([0.9, (1.1, 0.95)]),
        T.product(T.rotations([0, 30]), T.scalings([1.0, 1.2]), T.translations([(0.0, 0.05)])),
    ],
    ids=["rotations", "translations", "scalings", "product"],
)
def test_interpolated_inverse_undoes_transformation(tset):
    x = smooth_image(h=48, w=48)
    # The composed maps are exact inverses of each other ...
    for t in tset:
        m = t.matrix(48, 48)
        np.testing.assert_allclose(np.linalg.inv(np.linalg.inv(m)) @ np.linalg.inv(m), np.eye(3), atol=1e-12)
    # ... and on a smooth image the round trip is close away from the borders (interpolation only).
    y = tset.invert(tset.apply(x)).view(2, len(tset), 3, 48, 48)
    interior = (slice(None), slice(None), slice(None), slice(14, 34), slice(14, 34))
    err = (y - x.unsqueeze(1))[interior].abs().max()
    assert err < 0.06, err


def test_inverse_on_feature_maps_of_another_size():
    """The same set undoes itself on smaller feature maps (fractions of the size, not pixels)."""
    tset = T.product(T.rotations([0, 90, 45]), T.translations([(0.25, 0.0)]))
    fm = smooth_image(b=1, c=4, h=16, w=16)
    moved = tset.apply(fm)
    back = tset.invert_features(moved)
    assert back.shape == moved.shape
    # translation by 0.25 of 16 px = 4 px: the content moved right by 4 pixels
    shifted = T.translations([(0.25, 0.0)]).apply(fm)
    torch.testing.assert_close(shifted[0, :, :, 6:], fm[0, :, :, 2:12], rtol=0, atol=1e-5)


@pytest.mark.parametrize("tset", [
    T.rotations(5), T.rot90(), T.translations(0.1), T.scalings([0.8, 1.25]), T.flips(), T.brightness([0.9, 1.1]),
    T.product(T.rotations([0, 30]), T.scalings([0.9, 1.1])),
    T.rotations(3, interpolation="nearest", padding="zeros"),
    T.rotations(3, interpolation="bicubic", padding="reflection"),
], ids=lambda s: s.spec[:24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_at_some_positions_is_the_whole_inverse_there(tset, dtype):
    """Moving back only each channel's sampled positions (positions=K) gives the whole maps' inverse at
    them, bit for bit: the same source coordinates, interpolated the same way."""
    generator = torch.Generator().manual_seed(3)
    for height, width in ((9, 9), (6, 10)) if not tset.require_square else ((9, 9),):
        b, channels, k = 3, 4, 7
        y = torch.randn(b * len(tset), channels, height, width, dtype=dtype, generator=generator)
        picked = torch.rand(channels, height * width, generator=generator).argsort(1)[:, :k].sort(1).values
        whole = tset.invert_features(y).reshape(b * len(tset), channels, height * width)
        expected = whole.gather(2, picked.expand(b * len(tset), channels, k)).reshape(b * len(tset), -1)
        assert torch.equal(tset.invert_features_at(y, picked), expected)


def test_non_square_rotation_is_isotropic_in_pixels():
    x = torch.zeros(1, 1, 21, 41)
    x[0, 0, 10, 30] = 1.0  # 10 px right of the centre
    out = T.rotations([90], interpolation="nearest").apply(x)
    r, c = np.unravel_index(out[0, 0].argmax().item(), (21, 41))
    assert (r, c) == (0, 20)  # 10 px above the centre


def test_photometric_exact_inverse_and_identity_on_features():
    x = torch.rand(3, 3, 8, 8)
    tset = T.product(T.brightness([-0.2, 0.0, 0.3]), T.contrast([0.5, 1.5]))
    y = tset.apply(x)
    torch.testing.assert_close(tset.invert(y), x.repeat_interleave(len(tset), 0), rtol=1e-5, atol=1e-6)
    assert tset.invert_features(y) is y and not tset.is_spatial
    assert tset.labels[1] == "brightness -0.2 · contrast ×1.5"
    one = T.contrast([2.0]).apply(x)
    torch.testing.assert_close(one.mean(dim=(2, 3)), x.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


def test_labels_ids_and_parameters():
    r = T.rotations(4)
    assert r.labels == ["rotation 0°", "rotation 90°", "rotation 180°", "rotation 270°"]
    assert r.id == "rotations(0,90,180,270);interpolation=bilinear;padding=border"
    assert T.rotations(4).id == r.id  # stable
    assert T.rotations(4, interpolation="nearest").id != r.id
    assert T.translations(0.1).labels[0] == "translation (-0.1, -0.1)" and len(T.translations(0.1)) == 9
    assert T.flips().labels == ["identity", "flip horizontal", "flip vertical"]
    p = T.product(T.rot90(), T.flips(vertical=False))
    assert len(p) == 8 and p.labels[5] == "rotation 180° · flip horizontal"
    d = p.as_dict()
    assert d["transformations"][5]["ops"] == [
        {"op": "rotate", "degrees": 180.0},
        {"op": "flip", "axis": "horizontal"},
    ]
    assert r.with_options(padding="zeros").padding == "zeros"


def test_batched_on_device_in_one_call(monkeypatch):
    calls = []
    original = torch.nn.functional.grid_sample
    monkeypatch.setattr(torch.nn.functional, "grid_sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    T.rotations(16).apply(torch.randn(5, 3, 10, 10))
    assert len(calls) == 1


def test_meta_device():
    x = torch.empty(4, 3, 16, 16, device="meta")
    for tset in (T.rotations(3), T.rot90(), T.brightness([0.0, 0.1])):
        y = tset.apply(x)
        assert y.device.type == "meta" and y.shape == (4 * len(tset), 3, 16, 16)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        T.rotations(4).apply(torch.randn(5, 10))
    with pytest.raises(ValueError, match="square"):
        T.rot90().apply(torch.randn(2, 1, 8, 10))
    with pytest.raises(ValueError, match="interpolation"):
        T.rotations(4, interpolation="cubic")
    with pytest.raises(ValueError, match="padding"):
        T.rotations(4, padding="wrap")
    with pytest.raises(ValueError, match="> 0"):
        T.scalings([0.0])
    with pytest.raises(ValueError, match="at least two"):
        T.product(T.rot90())
    with pytest.raises(TypeError, match="int n"):
        T.rotations(16.0)
    assert not math.isnan(T.rotations([1e-9]).apply(torch.ones(1, 1, 4, 4)).sum().item())
