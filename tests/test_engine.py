"""The streaming engine against brute-force references, and its promises about the forward passes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import transforms as T
from models import rot90_equivariant_cnn, small_cnn
from reference import activation_matrix, measures as ref_measures, safe_divide as ref_safe_divide

pytestmark = pytest.mark.usefixtures("kernels")  # every test with the eager and the compiled updates

N = 11
CHUNKS = [1, 3, N + 5]


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(1)
    return torch.randn(N, 3, 12, 12)


def _brute_force(model, images, tset, layers, undo=None):
    def one(x, t):
        return tset.apply_one(x, t) if t < len(tset) else None

    return activation_matrix(model, images, one, layers, undo)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("tset", [T.rotations(5), T.product(T.scalings([0.8, 1.1]), T.translations([(0.1, 0), (0, -0.2)]))],
                         ids=["rotations", "scale-x-translate"])
def test_invariance_equals_brute_force(probe, chunk, tset):
    model = small_cnn()
    layers = ["0", "1", "3", "4", "6", "9", "11"]
    A = _brute_force(model, probe, tset, layers)
    result = tm.measure(model, probe, tset, measures=("invariance",), batch_size=chunk, dedupe_batchnorm=False)
    assert result.layers == ["0", "1", "2", "3", "4", "5", "6", "9", "10", "11"]  # execution order, no Flatten/Dropout
    for layer in layers:
        for per in ("element", "channel"):
            ref = ref_measures(A[layer], per)
            for name, key in (("tvi", "tv"), ("svi", "sv"), ("nvi", "nv")):
                got = result.get(name, layer, per=per)
                expected = ref[key]
                assert got.shape == expected.shape
                np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7, err_msg=f"{name} {layer} {per}")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_same_equivariance_equals_brute_force_rot90(probe, chunk):
    model = small_cnn()
    tset = T.rot90()
    layers = ["0", "1", "2", "3", "6"]

    def undo(feature_map, t):  # independent of the library: torch.rot90 back by t quarter turns
        return torch.rot90(feature_map, -t, dims=(2, 3))

    A = _brute_force(model, probe, tset, layers, undo)
    result = tm.measure(model, probe, tset, measures=("same_equivariance",), batch_size=chunk)
    assert "9" not in result.layers_of("nvse")  # 1-D layers are skipped, not an error
    with pytest.raises(KeyError, match="no \\[C, H, W\\] feature maps"):
        result.get("nvse", "9")
    for layer in layers:
        for per in ("element", "channel"):
            ref = ref_measures(A[layer], per)
            for name, key in (("tvse", "tv"), ("svse", "sv"), ("nvse", "nv")):
                np.testing.assert_allclose(result.get(name, layer, per=per), ref[key], rtol=2e-5, atol=1e-7)


def test_same_equivariance_equals_brute_force_interpolated(probe):
    """Rotations by arbitrary angles: the reference undoes them with its own affine_grid per feature map."""
    model = small_cnn()
    angles = [0.0, 30.0, 135.0]
    tset = T.rotations(angles)

    def undo(feature_map, t):
        a = math.radians(angles[t])  # sampling matrix of the forward rotation (square maps)
        theta = torch.tensor([[[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]]])
        grid = torch.nn.functional.affine_grid(theta, list(feature_map.shape), align_corners=False)
        return torch.nn.functional.grid_sample(feature_map, grid.float(), padding_mode="border", align_corners=False)

    A = _brute_force(model, probe, tset, ["0", "3"], undo)
    result = tm.measure(model, probe, tset, measures=("same_equivariance",), batch_size=4)
    for layer in ("0", "3"):
        ref = ref_measures(A[layer], "channel")
        np.testing.assert_allclose(result.get("nvse", layer), ref["nv"], rtol=1e-4, atol=1e-6)


def test_dead_and_infinite_units():
    """Integer-valued probe, weights and exact rot90: SV is exactly 0 on identical samples."""
    conv = nn.Conv2d(1, 3, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # sees a rotated corner: varies with the transformation
        conv.bias.copy_(torch.tensor([0.0, 1.0, -100.0]))  # channel 1 is constant, channel 2 dead after the ReLU
    model = nn.Sequential(conv, nn.ReLU())
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 0, 0] = 2.0
    image[0, 0, 2, 2] = 3.0
    probe = image.repeat(6, 1, 1, 1)  # identical samples: the sample variance is exactly zero
    for chunk in (1, 4):
        result = tm.measure(model, probe, T.rot90(), measures=("invariance",), batch_size=chunk)
        nvi = result.get("nvi", "1")
        assert np.isinf(nvi[0]) and nvi[0] > 0
        assert nvi[1] == 1.0 and nvi[2] == 1.0
        assert result.get("svi", "1")[2] == 0 and result.get("tvi", "1")[2] == 0
        # layer means are over finite live units: channel 0 is inf and 1, 2 are dead, so none is left
        assert np.isnan(result.layer_means("nvi")["1"])
        assert result.layer_means("tvi")["1"] == result.get("tvi", "1")[0]  # the one live unit's
        assert result.layer_means("nvi", include_dead=True)["1"] == 1.0  # tmeasures' mean: finite units
        np.testing.assert_array_equal(result.group_dead("tvi", "1"), [False, True, True])


def test_layer_means_leave_dead_units_out():
    """A ReLU layer where some channels never fire: their nvi is 0 / 0 = 1 (tmeasures), which the layer mean
    leaves out by default and counts with include_dead=True."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        conv.bias[2:] = -1e3  # channels 2 and 3 never fire after the ReLU
    model = nn.Sequential(conv, nn.ReLU())
    result = tm.measure(model, torch.rand(8, 1, 6, 6), T.rot90(), measures=("invariance",))
    nvi = result.get("nvi", "1")
    np.testing.assert_array_equal(result.dead("nvi", "1"), [False, False, True, True])
    assert result.layer_means("nvi")["1"] == pytest.approx(nvi[:2].mean())
    assert result.layer_means("nvi", include_dead=True)["1"] == pytest.approx(nvi.mean())
    assert result.layer_means("svi")["1"] == pytest.approx(result.get("svi", "1")[:2].mean())


def test_safe_divide_matches_reference():
    from tm_tensorboard.measures import safe_divide

    x = np.array([1.0, 0.0, 2.0, -1.0, 0.5])
    y = np.array([2.0, 0.0, 0.0, 0.0, 0.25])
    np.testing.assert_array_equal(safe_divide(x, y), ref_safe_divide(x, y))


def test_rot90_equivariant_model():
    torch.manual_seed(3)
    probe = torch.randn(24, 3, 16, 16)
    model = rot90_equivariant_cnn()
    result = tm.measure(model, probe, T.rot90(), batch_size=7)
    for layer in ("4", "6"):  # global pooling and the linear layer after it: invariant
        nvi = result.get("nvi", layer)
        assert np.all(np.isfinite(nvi)) and nvi.max() < 1e-5, (layer, nvi)
    for layer in ("0", "1", "2", "3"):  # equivariant convolutions: nvse ~ 0 while nvi is far from 0
        nvse, nvi = result.get("nvse", layer), result.get("nvi", layer)
        live = result.get("svi", layer) > 0
        assert nvse[live].max() < 1e-5, (layer, nvse)
        assert nvi[live].min() > 0.1, (layer, nvi)


def test_each_image_forwarded_once_in_ceil_n_over_chunk_calls(probe):
    model = small_cnn()
    tset = T.rotations(4)
    calls, images = [], []
    handle = model.register_forward_hook(lambda m, i, o: (calls.append(1), images.append(i[0].shape[0])))
    for chunk in CHUNKS:
        calls.clear(), images.clear()
        tm.measure(model, probe, tset, batch_size=chunk, dedupe_batchnorm=False)
        assert len(calls) == math.ceil(N / chunk)
        assert sum(images) == N * len(tset)
        calls.clear(), images.clear()
        tm.measure(model, probe, tset, batch_size=chunk)  # the default first finds the BatchNorm "4" to leave out
        assert len(calls) == math.ceil(N / chunk) + 1  # in a discovery pass on one probe sample
        assert sum(images) == (N + 1) * len(tset)
    handle.remove()


def test_inplace_relu_does_not_change_measured_conv(probe):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    plain = tm.measure(nn.Sequential(conv, nn.ReLU()), probe, T.rotations(4))
    inplace = tm.measure(nn.Sequential(conv, nn.ReLU(inplace=True)), probe, T.rotations(4))
    for m in ("tvi", "svi", "nvi", "nvse"):
        np.testing.assert_array_equal(plain.get(m, "0"), inplace.get(m, "0"))
    assert np.any(plain.get("nvi", "0") != plain.get("nvi", "1"))


def test_shared_module_called_twice_gives_two_activations():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.relu = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv2(self.relu(self.conv1(x))))

    result = tm.measure(Twice(), torch.randn(5, 1, 9, 9), T.rotations(3))
    assert result.layers == ["conv1", "relu", "conv2", "relu#2"]
    assert result.layer_info("relu#2").unit_shape == (2, 5, 5)


def test_stratified_equals_per_class_brute_force():
    torch.manual_seed(2)
    images = torch.randn(13, 3, 10, 10)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    model = small_cnn()
    tset = T.rotations(3)
    A = _brute_force(model, images, tset, ["3", "9"])
    for chunk in (1, 4, 20):
        result = tm.measure(model, (images, labels), tset, measures=("invariance",), stratified=True, batch_size=chunk)
        assert result.classes == [0, 1, 2]
        for layer in ("3", "9"):
            per_class = [ref_measures(A[layer][(labels == k).numpy()], "channel") for k in range(3)]
            for k in range(3):
                np.testing.assert_allclose(result.get("nvi", layer, label=k), per_class[k]["nv"], rtol=2e-5)
            np.testing.assert_allclose(result.get("nvi", layer), np.mean([p["nv"] for p in per_class], axis=0), rtol=2e-5)
            np.testing.assert_allclose(result.get("svi", layer), np.mean([p["sv"] for p in per_class], axis=0), rtol=2e-5)


def test_accuracy_per_transformation():
    torch.manual_seed(4)
    images = torch.randn(9, 3, 8, 8)
    labels = torch.randint(0, 5, (9,))
    model = small_cnn().eval()
    tset = T.rotations(4)
    with torch.no_grad():
        expected = [
            (model(tset.apply_one(images, t)).argmax(1) == labels).double().mean().item() for t in range(len(tset))
        ]
    result = tm.measure(model, images, tset, measures=("accuracy",), labels=labels, batch_size=2)
    np.testing.assert_allclose(result.accuracy, expected)
    assert result.measures == []


def test_probe_forms_agree():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(5)
    images, labels = torch.randn(10, 3, 8, 8), torch.randint(0, 3, (10,))
    model = small_cnn()
    tset = T.rotations(3)
    base = tm.measure(model, images[:8], tset, measures=("invariance",))
    dataset = TensorDataset(images, labels)
    for probe in (dataset, DataLoader(dataset, batch_size=3), (images, labels), images.numpy()):
        result = tm.measure(model, probe, tset, measures=("invariance",), num_samples=8)
        np.testing.assert_allclose(result.get("nvi", "3"), base.get("nvi", "3"), rtol=1e-6)


def test_float64_model_and_activations():
    model = small_cnn().double()
    result = tm.measure(model, torch.randn(6, 3, 8, 8, dtype=torch.float64), T.flips())
    assert result.get("nvi", "0").dtype == np.float64


@pytest.mark.parametrize("error_bars", [False, 2])
def test_a_channels_last_model_is_measured_where_its_maps_lie(error_bars):
    """``model.to(memory_format=torch.channels_last)``: its maps lie [n, h, w, C] in memory. Invariance streams
    them as they lie and same-equivariance moves them back from there: the brute force of that model, and the
    numbers of the same model laid out channel-major up to the convolutions' rounding."""
    torch.manual_seed(4)
    probe = torch.randn(33, 3, 12, 12)
    tset, layers = T.rot90(), ["0", "1", "2", "3", "5"]
    channel_major = small_cnn()
    model = small_cnn().to(memory_format=torch.channels_last)
    measures = ("invariance", "same_equivariance", "per_transformation", "equivariance_error")
    result = tm.measure(model, probe, tset, measures=measures, batch_size=5, error_bars=error_bars,
                        dedupe_batchnorm=False)
    A = _brute_force(model, probe, tset, layers)
    A_back = _brute_force(model, probe, tset, layers, lambda feature_map, t: torch.rot90(feature_map, -t, dims=(2, 3)))
    twin = tm.measure(channel_major, probe, tset, measures=measures, batch_size=5, error_bars=error_bars,
                      dedupe_batchnorm=False)
    for layer in layers:
        ref, ref_back = ref_measures(A[layer]), ref_measures(A_back[layer])
        for name, key in (("tvi", "tv"), ("svi", "sv"), ("nvi", "nv")):
            np.testing.assert_allclose(result.get(name, layer, per="element"), ref[key], rtol=2e-5, atol=1e-7)
            np.testing.assert_allclose(result.get(name[:2] + "se", layer, per="element"), ref_back[key], rtol=2e-5,
                                       atol=1e-7)
        for name in ("nvi", "nvse", "ie_t", "ee"):
            np.testing.assert_allclose(result.get(name, layer, per="element"), twin.get(name, layer, per="element"),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{name} {layer}")
            if error_bars:
                np.testing.assert_allclose(result.stderr(name, layer), twin.stderr(name, layer), rtol=1e-4, atol=1e-6)


def test_goodfellow_anova_and_lie_derivatives_of_a_channels_last_model_are_its_channel_major_twin_s():
    """Their states hold a channels-last layer's units in (h, w, C) order too (thresholds, firing rates, the
    ANOVA's moments, the squared Lie derivatives), put back when finalized."""
    torch.manual_seed(5)
    probe, tset = torch.randn(30, 3, 12, 12), T.rotations(4)
    measures = ("goodfellow", "anova", "lie_rotation", "lie_translation_x")
    ours = tm.measure(small_cnn().to(memory_format=torch.channels_last), probe, tset, measures=measures, batch_size=4)
    twin = tm.measure(small_cnn(), probe, tset, measures=measures, batch_size=4)
    for layer in ("0", "1", "3"):
        for name in ("gfl", "gfg", "anova_f", "anova", "lie_rotation", "lie_translation_x"):
            np.testing.assert_allclose(ours.get(name, layer, per="element"), twin.get(name, layer, per="element"),
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name} {layer}")


def test_a_channels_last_model_s_maps_are_not_copied_channel_major_each_chunk(kernels):
    """What a measurement copies per chunk (``aten`` copies counted in a dispatch mode, 12 chunks more against
    12) is no more for a channels-last model than for its twin laid out channel-major (its states are put in
    the layer's order once, when finalized)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if kernels == "graphs":
        pytest.skip("in a dispatch mode the compiled graphs run as eager ops, which the eager run counts")

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy):
                self.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(4)
    probe, tset = torch.randn(48, 3, 12, 12), T.rotations(4)
    measures = ("invariance", "same_equivariance", "per_transformation")  # the CPU kernels' groups: no graph
    if kernels == "eager":
        measures += ("goodfellow", "anova")
    per_chunk = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        model.to(memory_format=layout)
        counts = []
        for samples in (24, 48):
            tm.measure(model, probe[:samples], tset, measures=measures, batch_size=2, error_bars=False)
            with Copies() as copies:
                tm.measure(model, probe[:samples], tset, measures=measures, batch_size=2, error_bars=False)
            counts.append(copies.count)
        per_chunk[layout] = (counts[1] - counts[0]) / 12
    assert per_chunk[torch.channels_last] <= per_chunk[torch.contiguous_format], per_chunk
