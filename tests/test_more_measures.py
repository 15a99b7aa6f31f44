"""Equivariance error with feature actions, Goodfellow invariance, ANOVA and the noise floor."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import actions
from tm_tensorboard import transforms as T
from tm_tensorboard.examples.models import P4CNN, P4LiftingConv2d
from tm_tensorboard.measures import safe_divide
from models import small_cnn
from reference import activation_matrix, channel

pytestmark = pytest.mark.usefixtures("kernels")  # every test with the eager and the compiled updates

N = 11
CHUNKS = [1, 4, N + 3]


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(11)
    return torch.randn(N, 3, 12, 12)


def brute(model, images, tset, layers, undo=None):
    return activation_matrix(model, images, lambda x, t: tset.apply_one(x, t) if t < len(tset) else None, layers, undo)


def ee_reference(A: np.ndarray, identity: int, per: str) -> np.ndarray:
    """A [N, T, *shape] of g⁻¹ψ(φ(g x)); the identity column is ψ(φ(x))."""
    reference = A[:, identity]
    others = [t for t in range(A.shape[1]) if t != identity]
    mse = ((A[:, others] - reference[:, None]) ** 2).mean(axis=(0, 1))
    var2 = 2 * reference.var(axis=0, ddof=1)
    if per == "channel":
        mse, var2 = channel(mse), channel(var2)
    return safe_divide(mse, var2)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_equivariance_error_identity_action_equals_brute_force(probe, chunk):
    model = small_cnn()
    tset = T.rot90()
    A = brute(model, probe, tset, ["0", "3", "4", "5"], undo=lambda fm, t: torch.rot90(fm, -t, dims=(2, 3)))
    result = tm.measure(model, probe, tset, measures=("equivariance_error",), batch_size=chunk)
    assert result.layers_of("ee") == ["0", "1", "2", "3", "4", "5", "6"]
    assert result.derived == {"4": "3"}  # the BatchNorm "4" of "3": derived from its states, not measured
    for layer in ("0", "3", "4", "5"):
        for per in ("element", "channel"):
            # float32 forward passes of different batch sizes round differently; tiny variances magnify it
            np.testing.assert_allclose(result.get("ee", layer, per=per), ee_reference(A[layer], 0, per), rtol=1e-4, atol=1e-9)


class _ChannelMajor(actions.FeatureAction):
    """The identity action under another class, with undo overridden (to itself): the equivariance error then
    takes its channel-major path (maps moved back and laid out [C, h, w] again), as cyclic_shift does."""

    def undo(self, y, transformations, compiled=False, scratch=None):
        return super().undo(y, transformations, compiled, scratch)


@pytest.mark.parametrize("disk", [False, True])
def test_equivariance_error_pixel_major_equals_channel_major(disk):
    """Non-square maps under interpolated rotations: the pixel-major path (the identity action) gives the
    channel-major path's values and standard errors, per element and per channel, NaN outside the disk
    where it has them, up to float summation order (units summed in another order of tiles and vectors)."""
    model, images = small_cnn(), torch.rand(32, 3, 10, 14, generator=torch.Generator().manual_seed(3))
    tset = T.rotations([0, 30, 60, 90], padding="zeros")
    def run(action):
        return tm.measure(model, images, tset, measures=("equivariance_error",), actions=action, batch_size=5,
                          disk=disk, error_bars=2)

    pixel_major, channel_major = run(actions.identity()), run(_ChannelMajor())
    assert pixel_major.layers_of("ee") == channel_major.layers_of("ee") != []
    for layer in pixel_major.layers_of("ee"):
        for measure in ("ee", "ee_t"):
            for per in ("element", "channel"):
                np.testing.assert_allclose(pixel_major.get(measure, layer, per=per),
                                           channel_major.get(measure, layer, per=per), rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(pixel_major.stderr(measure, layer), channel_major.stderr(measure, layer),
                                       rtol=1e-5, atol=1e-12)


def test_same_equivariance_and_the_equivariance_error_move_the_maps_back_once(probe, monkeypatch):
    """Measured together, in either order, the maps are moved back once per spatial layer and chunk for both
    (same-equivariance updates first); each group's numbers are what it measures alone."""
    model, tset = small_cnn(), T.rotations([0, 30, 60], padding="zeros")
    calls = []
    moved_back = T.TransformationSet.invert_features_pixel_major
    monkeypatch.setattr(T.TransformationSet, "invert_features_pixel_major",
                        lambda self, *a, **k: calls.append(1) or moved_back(self, *a, **k))
    def run(*groups):
        calls.clear()
        return tm.measure(model, probe, tset, measures=groups, batch_size=4, error_bars=False), len(calls)

    (both, moves), (reversed_, reversed_moves) = run("same_equivariance", "equivariance_error"), \
        run("equivariance_error", "same_equivariance")
    (same, same_moves), (errors, _) = run("same_equivariance"), run("equivariance_error")
    assert moves == same_moves == len(both.layers_of("nvse")) * math.ceil(N / 4) > 0
    assert reversed_moves == moves
    for result in (both, reversed_):
        for layer in both.layers_of("nvse"):
            np.testing.assert_array_equal(result.get("nvse", layer), same.get("nvse", layer))
            np.testing.assert_array_equal(result.get("ee_t", layer, per="element"),
                                          errors.get("ee_t", layer, per="element"))


def cyclic_undo(k):
    def undo(fm, t):  # independent of the library: rotate back, then roll each group of k channels back by t
        back = torch.rot90(fm, -t, dims=(2, 3))
        return back.unflatten(1, (-1, k)).roll(-t, dims=2).flatten(1, 2)

    return undo


@pytest.mark.parametrize("chunk", [1, 5])
def test_cyclic_shift_on_p4cnn_is_zero_identity_is_not(probe, chunk):
    torch.manual_seed(0)
    model = P4CNN(3, 5, width=0.5).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, shared across orientations
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    tset = T.rot90()
    group_layers = [f"features.{i}" for i in range(len(model.features))]
    shifted = tm.measure(model, probe, tset, measures=("equivariance_error",), batch_size=chunk,
                         actions={"features.*": actions.cyclic_shift(4)})
    plain = tm.measure(model, probe, tset, measures=("equivariance_error",), batch_size=chunk,
                       dedupe_batchnorm=False)  # the BatchNorms too (the cyclic shift keeps them anyway)
    for layer in group_layers:
        live = shifted.get("ee", layer) < 1.0  # dead channels are 0 / 0 = 1
        assert live.any() and shifted.get("ee", layer)[live].max() < 1e-6, layer
        assert plain.get("ee", layer).mean() > 0.1, layer
    for layer in ("orientation_pool", "spatial_pool"):  # after pooling over the group, plain equivariance
        assert plain.get("ee", layer)[plain.get("ee", layer) < 1].max() < 1e-6
    A = brute(model, probe, tset, ["features.3"], undo=cyclic_undo(4))
    np.testing.assert_allclose(shifted.get("ee", "features.3", per="element"), ee_reference(A["features.3"], 0, "element"),
                               rtol=1e-4, atol=1e-9)


def test_orientation_pooling_on_an_implicit_equivariance_layer(probe):
    """A conv whose output channels come in groups of 4 rotated copies of one filter (the IEN setting):
    max over each group is rot90-equivariant, the raw channels are not."""
    torch.manual_seed(2)
    lifting = P4LiftingConv2d(3, 6)
    model = nn.Sequential(lifting, nn.ReLU())
    pooled = tm.measure(model, probe, T.rot90(), measures=("equivariance_error",),
                        actions=actions.orientation_pooling(4))
    plain = tm.measure(model, probe, T.rot90(), measures=("equivariance_error",))
    assert pooled.get("ee", "0").shape == (6,)  # 24 channels pooled to 6
    assert pooled.get("ee", "0").max() < 1e-6 and pooled.get("ee", "1").max() < 1e-6
    assert plain.get("ee", "0").min() > 0.1


def test_equivariance_error_disk_and_errors(probe):
    model = small_cnn()
    full = tm.measure(model, probe, T.rotations([0, 30, 60]), measures=("equivariance_error",))
    disk = tm.measure(model, probe, T.rotations([0, 30, 60]), measures=("equivariance_error",), disk=True)
    element = disk.get("ee", "0", per="element")
    assert np.isnan(element[:, 0, 0]).all() and np.isfinite(element[:, 6, 6]).all()  # corners are outside
    assert np.isfinite(disk.get("ee", "0")).all()
    assert (disk.get("ee", "0") < full.get("ee", "0")).mean() > 0.5  # border effects excluded
    with pytest.raises(ValueError, match="must include the identity"):
        tm.measure(model, probe, T.rotations([30, 60]), measures=("equivariance_error",))
    with pytest.raises(ValueError, match="layer '3': cyclic_shift.*multiples of 90°.*rotation 45°"):
        tm.measure(model, probe, T.rotations([0, 45]), measures=("equivariance_error",),
                   actions=actions.cyclic_shift(4), layers=["3"])
    with pytest.raises(ValueError, match="layer '0': cyclic_shift.*divisible by 4; the layer has 6"):
        tm.measure(model, probe, T.rot90(), measures=("equivariance_error",), actions=actions.cyclic_shift(4))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_goodfellow_equals_brute_force(probe, chunk):
    model = small_cnn()
    tset = T.rotations(4)
    layers = ["1", "5", "10"]
    A = brute(model, probe, tset, layers)
    U = brute(model, probe, T.flips(horizontal=False, vertical=True), layers)  # column 0: untransformed
    result = tm.measure(model, probe, tset, measures=("goodfellow",), batch_size=chunk)
    z = stats.norm.ppf(0.99)
    for layer in layers:
        untransformed = U[layer][:, 0]
        threshold = untransformed.mean(axis=0) + z * np.maximum(untransformed.std(axis=0, ddof=1), 1e-16)
        global_rate = (untransformed > threshold).mean(axis=0)
        local_rate = (A[layer] > threshold).mean(axis=(0, 1))
        for per in ("element", "channel"):
            g, l = (global_rate, local_rate) if per == "element" else (channel(global_rate), channel(local_rate))
            np.testing.assert_allclose(result.get("gfg", layer, per=per), g)
            np.testing.assert_allclose(result.get("gfl", layer, per=per), l)
            np.testing.assert_allclose(result.get("gf", layer, per=per), safe_divide(l, g))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_anova_equals_brute_force_and_scipy(probe, chunk):
    model = small_cnn()
    tset = T.rotations(5)
    layers = ["3", "9"]
    A = brute(model, probe, tset, layers)
    result = tm.measure(model, probe, tset, measures=("anova",), batch_size=chunk, alpha=0.01)
    for layer in layers:
        data = A[layer].reshape(N, len(tset), -1)
        f_scipy = np.array([stats.f_oneway(*[data[:, t, u] for t in range(len(tset))]).statistic
                            for u in range(data.shape[2])])
        np.testing.assert_allclose(result.get("anova_f", layer, per="element").reshape(-1), f_scipy, rtol=1e-5)
        m = data.shape[2]
        critical = stats.f.isf(0.01 / m, len(tset) - 1, N * len(tset) - len(tset))
        flagged = (f_scipy > critical).reshape(A[layer].shape[2:])
        np.testing.assert_array_equal(result.get("anova", layer, per="element"), flagged)
        np.testing.assert_allclose(result.get("anova", layer), channel(flagged.astype(float)))


def test_anova_constant_units_have_f_zero(probe):
    """A unit with no variance within or between the transformation groups (always 0 after a ReLU, or a
    constant conv channel) shows no effect of the transformation: F = 0 and not rejected, not 0 / 0 = NaN
    spoiling its channel's mean, nor a rounding-error F = inf; and no warning blames NaN activations."""
    conv = nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, 0, 0] = 1.0  # channel 0 sees the zero padding alone in the first row and column
        conv.bias.copy_(torch.tensor([0.0, 0.1, -100.0]))  # channel 1 is 0.1 everywhere, channel 2 dead after the ReLU
    model = nn.Sequential(conv, nn.ReLU())
    tset = T.rotations(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the NaN warnings (compiling may warn otherwise)
        result = tm.measure(model, probe, tset, measures=("anova",))
    A = brute(model, probe, tset, ["1"])["1"].reshape(N, len(tset), 3, -1)
    alive = A[:, :, 0].std(axis=(0, 1)) > 0
    assert 0 < alive.sum() < alive.size  # channel 0 is 0 in its first row and column for every input
    f_scipy = np.array([stats.f_oneway(*A[:, :, 0, u].T).statistic for u in np.flatnonzero(alive)])
    for layer in ("0", "1"):
        f = result.get("anova_f", layer, per="element")
        np.testing.assert_array_equal(f[1:], 0)
        np.testing.assert_array_equal(result.get("anova", layer, per="element")[1:], 0)
        assert np.isfinite(result.get("anova_f", layer)).all()
    f = result.get("anova_f", "1", per="element")[0].reshape(-1)
    np.testing.assert_array_equal(f[~alive], 0)
    np.testing.assert_allclose(f[alive], f_scipy, rtol=1e-5)


def test_anova_bonferroni_flags_a_plausible_fraction():
    """Random weights and random images under small rotations: the corrected test flags some units, not all;
    tmeasures' inverted correction (critical value at the α/m quantile instead of 1 − α/m) flags ~all."""
    torch.manual_seed(5)
    images = torch.randn(64, 3, 16, 16)
    model = small_cnn(seed=9)
    tset = T.rotations([0, 2, 4, 6])
    result = tm.measure(model, images, tset, measures=("anova",), alpha=0.01)
    fractions, inverted = [], []
    for layer in result.layers:
        f = result.get("anova_f", layer, per="element").reshape(-1)
        flagged = result.get("anova", layer, per="element").reshape(-1)
        d1, d2 = len(tset) - 1, 64 * len(tset) - len(tset)
        np.testing.assert_array_equal(flagged, f > stats.f.isf(0.01 / f.size, d1, d2))
        fractions.append(flagged.mean())
        inverted.append((f > stats.f.ppf(0.99 / f.size, d1, d2)).mean())
    overall = float(np.mean(fractions))
    assert 0.02 < overall < 0.9, fractions
    assert np.mean(inverted) > 0.9 and np.mean(inverted) > overall + 0.05


def test_noise_floor_is_the_input_layer():
    torch.manual_seed(0)
    images = torch.randn(8, 3, 16, 16)
    model = small_cnn()
    exact = tm.measure(model, images, T.rot90(), noise_floor=True)
    assert exact.layers[0] == "input" and exact.layer_info("input").module_type == "Input"
    assert exact.get("nvse", "input").max() == 0  # exact rotations: no interpolation artifacts
    interpolated = tm.measure(model, images, T.rotations([0, 30, 45]), noise_floor=True)
    floor = interpolated.get("nvse", "input")
    assert (floor > 0.05).all()  # interpolation and border padding alone move the input this much
    assert interpolated.layers[1:] == tm.measure(model, images, T.rotations(3)).layers


def test_stratified_new_measures_are_means_of_per_class(probe):
    labels = torch.arange(N) % 2
    model = small_cnn()
    groups = ("equivariance_error", "goodfellow", "anova")
    both = tm.measure(model, (probe, labels), T.rot90(), measures=groups, stratified=True)
    for measure in ("ee", "gf", "anova_f"):
        per_class = []
        for k in (0, 1):
            alone = tm.measure(model, probe[labels == k], T.rot90(), measures=groups)
            np.testing.assert_allclose(both.get(measure, "3", label=k), alone.get(measure, "3"), rtol=1e-6)
            per_class.append(alone.get(measure, "3"))
        np.testing.assert_allclose(both.get(measure, "3"), np.mean(per_class, axis=0), rtol=1e-6)


def test_forward_passes_per_phase(probe):
    model = small_cnn()
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    tm.measure(model, probe, T.rotations(3), measures=("invariance", "goodfellow"), batch_size=4)
    handle.remove()
    # thresholds and global firing rate on the untransformed probe, then every image once per transformation
    assert calls == [4, 4, 3] * 2 + [12, 12, 9]
    assert sum(calls) == 2 * N + N * 3 and math.ceil(N / 4) == 3
