"""The Lie derivative measure groups (lie_rotation, lie_translation_x / _y, lie_scale, lie_brightness).

They must be the derivative of the library's own transformations: equal to central finite differences
of ``transforms.py``'s warps (and of the inverse warps of feature maps) at small parameters, layer by
layer; 0 where a model is invariant by construction; mergeable across processes like every other state.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import lie
from tm_tensorboard.capture import Capture, select_modules
from tm_tensorboard.examples.models import P4CNN, STNCNN
from tm_tensorboard.measures import safe_divide
from models import small_cnn

GROUPS = tuple(lie.GENERATORS)
# Half a degree, and parameters that move pixels about as far (the rotation moves a corner of a 12 × 16
# image by 0.09 px): input pixels, e-folds of scale, intensity units.
SMALL = {"rotation": math.radians(0.5), "translation_x": 0.05, "translation_y": 0.05, "scale": 0.005,
         "brightness": 0.01}


def images(n: int, shape=(3, 12, 16), seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def outputs(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every default layer's output on ``batch`` (eval mode, no autograd)."""
    got = {}

    def keep(name, module, output):
        got[name] = output.clone()

    with torch.no_grad(), Capture(select_modules(model)[0], keep) as capture:
        capture.start_forward()
        model.eval()(batch)
    return got


def central_differences(model, x, generator, eps, interpolation="bilinear", padding="border"):
    """{layer: (mean over samples of L², 2 · sample variance)} per element, with L the central finite
    difference [g_ε⁻¹ φ(g_ε x) − g_₋ε⁻¹ φ(g_₋ε x)] / 2ε of the library's own transformations (and, on
    feature maps, its own inverse warps)."""
    moves = generator.transformations([eps, -eps], tuple(x.shape[-2:]), interpolation=interpolation, padding=padding)
    moved, reference = outputs(model, moves.apply(x)), outputs(model, x)
    out = {}
    for name, y in moved.items():
        if y.dim() == 4:
            y = moves.invert_features(y)
        y = y.view(len(x), 2, *y.shape[1:])
        lie_ = (y[:, 0] - y[:, 1]) / (2 * eps)
        out[name] = (lie_.square().mean(0).numpy(), 2 * reference[name].var(0).numpy())
    return out


def per_channel(squares: np.ndarray, var2: np.ndarray) -> np.ndarray:
    """Components averaged over positions, then divided (as the library's per-channel values)."""
    if squares.ndim > 1:
        squares, var2 = squares.reshape(len(squares), -1).mean(1), var2.reshape(len(var2), -1).mean(1)
    return safe_divide(squares, var2)


WARPS = [("bilinear", "border"), ("bicubic", "zeros"), ("bilinear", "reflection")]


@pytest.mark.parametrize("interpolation, padding", WARPS)
@pytest.mark.parametrize("group", GROUPS)
def test_input_tangent_is_the_derivative_of_the_library_warp(group, interpolation, padding):
    """d/dt g_t x at 0 equals [g_ε x − g_₋ε x] / 2ε of transforms.py at ε = 1e-6 (non-square images, every
    padding): the truncation error is O(ε × the displacement), below 1e-5 here."""
    generator, x = lie.GENERATORS[group], images(3, (2, 9, 12))
    moves = generator.transformations([1e-6, -1e-6], (9, 12), interpolation=interpolation, padding=padding)
    y = moves.apply(x).view(3, 2, 2, 9, 12)
    finite = (y[:, 0] - y[:, 1]) / 2e-6
    tangent = generator.input_tangent(x, interpolation, padding)
    assert (finite - tangent).abs().max() <= 1e-4 * tangent.abs().max()


@pytest.mark.parametrize("interpolation, padding", [("bilinear", "border"), ("bicubic", "zeros")])
def test_equals_central_differences_of_the_library_transformations(interpolation, padding):
    """Every element of every layer (convolutions, ReLU, max pooling, BatchNorm, adaptive pooling, linear
    layers) equals the central finite differences at ε = 1e-8 in float64. Their error is O(ε) (bilinear
    interpolation, ReLU and max pooling are piecewise linear, so their second-order terms do not cancel
    between ±ε), 3e-7 of a layer's largest value at worst here, and float64 rounding adds 1e-16 / ε:
    1e-5 is allowed. (At ε = 1e-6 one max-pooled element of these 12 samples is off by 27 %: its two
    largest inputs differ by 6e-6, so the finite differences straddle the max's kink.)"""
    model, x = small_cnn(seed=3).double(), images(12)
    sets = tm.transforms.rotations(4, interpolation=interpolation, padding=padding)
    result = tm.measure(model, x, sets, measures=GROUPS, compile=False, dedupe_batchnorm=False)  # BatchNorm too
    for group, generator in lie.GENERATORS.items():
        finite = central_differences(model, x, generator, 1e-8, interpolation, padding)
        assert result.layers_of(group) == list(finite)
        for layer, (squares, var2) in finite.items():
            got, expected, live = result.get(group, layer, per="element"), safe_divide(squares, var2), var2 > 0
            np.testing.assert_allclose(got[live], expected[live], rtol=0, atol=1e-5 * np.abs(got[live]).max(),
                                       err_msg=f"{group} {layer}")


@pytest.mark.parametrize("group", GROUPS)
def test_agrees_with_finite_differences_at_half_a_degree_layer_by_layer(group):
    """At ±0.5° (and translations by ±0.05 px, scalings by ±0.5 %, brightness ±0.01) each layer's mean
    agrees with central differences within their error. That error is first order in ε here, not second:
    bilinear interpolation, ReLU and max pooling are piecewise linear, and their kinks between −ε and +ε
    do not cancel. On white-noise images (the worst case for interpolation: second pixel differences
    3.5× the first ones, and ±0.5° moves pixels by up to 0.09 px) it reaches 23 % of a layer's value at
    ε; it must be below 30 %, and below 5 % at ε / 16 (measured: 2 %, the rest of the 16-fold decrease
    being lost to the units that cross a kink, whose number only falls in proportion on average)."""
    generator, eps = lie.GENERATORS[group], SMALL[lie.GENERATORS[group].name]
    model, x = small_cnn(seed=3).double(), images(48)
    means = tm.measure(model, x, tm.transforms.rotations(4), measures=(group,), compile=False).layer_means(
        group, include_dead=True)
    for step, tolerance in ((eps, 0.3), (eps / 16, 0.05)):
        finite = central_differences(model, x, generator, step)
        for layer, got in means.items():
            expected = np.mean(per_channel(*finite[layer]))
            assert abs(got - expected) <= tolerance * got, (layer, step, got, expected)


class SubtractMean(nn.Module):
    """Each image minus its own mean: brightness normalised away."""

    def forward(self, x):
        return x - x.mean(dim=(1, 2, 3), keepdim=True)


def test_brightness_normalised_away_is_exactly_zero():
    torch.manual_seed(0)
    model = nn.Sequential(SubtractMean(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 5 * 7, 3))
    result = tm.measure(model, images(10, dtype=torch.float32), tm.transforms.brightness([0, 0.1]),
                        measures=("lie_brightness",), noise_floor=True)
    assert result.layers == ["input", "0", "1", "2", "3", "5"]
    assert (result.get("lie_brightness", "input") > 0).all()  # the input itself changes
    for layer in result.layers[1:]:  # 0 where the unit varies at all (0 / 0 is 1 by tmeasures' convention)
        values, dead = (f("lie_brightness", layer, per="element") for f in (result.get, result.dead))
        assert (values[~dead] == 0).all() and (~dead).any(), layer


def _radial_conv(in_channels: int, out_channels: int, size: int, seed: int) -> nn.Conv2d:
    """A convolution whose kernels are smooth functions of the radius: sums of Gaussians of σ 1 and 1.5 px."""
    conv = nn.Conv2d(in_channels, out_channels, size, padding=size // 2).double()
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    r2 = offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2
    basis = torch.stack([torch.exp(-r2 / (2 * s * s)) for s in (1.0, 1.5)])
    basis = basis / basis.sum(dim=(1, 2), keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(out_channels, in_channels, 2, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("oik,khw->oihw", weights, basis))
    return conv


def _smooth_centred_images(n: int, size: int, sigma: float) -> torch.Tensor:
    """White noise blurred by a Gaussian of ``sigma`` px, under a centred Gaussian window (nothing at the
    border, so padding plays no part)."""
    x = images(n, (1, size, size), seed=1)
    r = int(3 * sigma) + 1
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r)), k.view(1, 1, -1, 1), padding=(r, 0))
    centred = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(centred.view(-1, 1) ** 2 + centred.view(1, -1) ** 2) / (2 * (0.15 * size) ** 2))
    x = x * window
    return x / x.std()


def test_rotation_invariant_by_construction_is_zero_within_interpolation_error():
    """Convolutions with radially symmetric kernels, a smooth nonlinearity and global average pooling are
    rotation invariant in the continuum. On the pixel grid the generator is a central difference and the
    kernels are sampled, which commute with rotation only up to O((h / σ)²) in the images' scale σ (h the
    pixel), so the normalized Lie derivative (a square) of the pooled features falls like (h / σ)⁴:
    below 1 % of the same network with random kernels at σ = 4 px, and ≥ 8× lower than at σ = 2 px
    (measured: 0.15 % and 26×; a bug in the generator or the tangents would leave it O(1)).
    (The pooled Lie derivative is the mean over positions of the maps' own: the mean of central differences
    along a rotation's flow is exactly 0, the flow being divergence free, so what remains is the maps'
    equivariance error on the grid.)"""
    def model(radial: bool) -> nn.Module:
        torch.manual_seed(0)
        conv = _radial_conv(1, 4, 11, seed=0) if radial else nn.Conv2d(1, 4, 11, padding=5).double()
        return nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3).double())

    def pooled(radial: bool, sigma: float) -> np.ndarray:
        x = _smooth_centred_images(16, 48, sigma)
        return tm.measure(model(radial), 2 * x, tm.transforms.rotations(4), measures=("lie_rotation",),
                          compile=False).get("lie_rotation", "2")

    invariant, random_kernels, rougher = pooled(True, 4.0), pooled(False, 4.0), pooled(True, 2.0)
    assert invariant.max() < 0.01 * random_kernels.mean(), (invariant, random_kernels)
    assert invariant.max() * 8 < rougher.max(), (invariant, rougher)


def test_only_lie_derivatives_forward_the_probe_once_per_generator():
    """No pass over the transformed probe when only Lie derivatives are measured; one forward-mode pass per
    chunk and generator."""
    model, calls = small_cnn(seed=3), []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    x = images(10, dtype=torch.float32)
    once = dict(batch_size=4, dedupe_batchnorm=False)  # (the default first finds the BatchNorm to leave out)
    tm.measure(model, x, tm.transforms.rotations(16), measures=("lie_rotation", "lie_scale"), **once)
    assert calls == [4, 4, 2] * 2
    calls.clear()
    tm.measure(model, x, tm.transforms.rotations(16), measures=("lie_rotation", "invariance"), **once)
    assert calls == [4, 4, 2] + [64, 64, 32]
    calls.clear()
    tm.measure(model, x, tm.transforms.rotations(16), measures=("lie_rotation", "invariance"), batch_size=4)
    assert calls == [16] + [4, 4, 2] + [64, 64, 32]  # the discovery pass: one sample, transformed


def test_stratified_and_compiled(kernels):
    """Per class, the values of the samples of that class alone; compiled kernels agree with the eager ones."""
    model, x = small_cnn(seed=3), images(12, dtype=torch.float32)
    labels = torch.arange(12) % 2
    groups = ("lie_rotation", "lie_translation_y")
    result = tm.measure(model, (x, labels), tm.transforms.rotations(4), measures=groups, stratified=True, batch_size=5)
    for k in (0, 1):
        alone = tm.measure(model, x[labels == k], tm.transforms.rotations(4), measures=groups, compile=False)
        for group in groups:
            for layer in alone.layers:
                np.testing.assert_allclose(result.get(group, layer, per="element", label=k),
                                           alone.get(group, layer, per="element"), rtol=1e-5, atol=1e-7)


def test_two_processes_equal_one(tmp_path, monkeypatch):
    from test_distributed import assert_matches, launch

    monkeypatch.setenv("TM_TENSORBOARD_COMPILE", "0")  # the compiled kernels are tested above
    launch("lie", 2, tmp_path, timeout=120)
    model = small_cnn(seed=3)
    x, labels = torch.randn(13, 3, 8, 8, generator=torch.Generator().manual_seed(7)), torch.arange(13) % 3
    measures = ("lie_rotation", "lie_translation_x", "lie_brightness", "invariance")
    # One thread, as the workers: the Lie derivative of a nearly equivariant unit is the difference of two
    # nearly equal terms, which magnifies the convolutions' rounding (it differs with the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = tm.measure(model, x, tm.transforms.rotations(4), measures=measures, batch_size=1)
        stratified = tm.measure(model, (x, labels), tm.transforms.rotations(4), measures=measures, stratified=True,
                                batch_size=1)
    finally:
        torch.set_num_threads(threads)
    for rank in range(2):
        assert_matches(tmp_path / f"lie_{rank}.npz", plain)
        assert_matches(tmp_path / f"lie_stratified_{rank}.npz", stratified)


def test_monitor_logs_it_and_the_plugin_lists_it(tmp_path):
    from test_plugin_routes import client_for, get_json

    model, x = small_cnn(seed=3), images(8, dtype=torch.float32)
    with tm.Monitor(model, x, tm.transforms.rotations(4), logdir=tmp_path / "run", every=1,
                    measures=("invariance", "lie_rotation", "lie_brightness")) as monitor:
        result = monitor.step(0)
    run = tm.read(tmp_path)["run"]
    assert run.measures == ["tvi", "svi", "nvi", "lie_rotation", "lie_brightness"]
    for layer, value in result.layer_means("lie_rotation").items():
        assert run.means["lie_rotation"][layer].values[0] == pytest.approx(value, rel=1e-6)
    definitions = {m["name"]: m["description"] for m in run.config["measures"]}
    assert "radians" in definitions["lie_rotation"] and "Lie derivative" in definitions["lie_brightness"]
    assert set(run.config["actions"]) == {"0", "1", "2", "3", "4", "5", "6"}  # feature maps (BatchNorm "4" derived)
    listed = get_json(client_for(tmp_path), "/runs")["runs"][0]["measures"]
    assert listed == ["tvi", "svi", "nvi", "lie_rotation", "lie_brightness"]


def test_clear_errors():
    x = images(4, (1, 28, 28), dtype=torch.float32)
    with pytest.raises(ValueError, match="interpolation 'nearest' is piecewise constant"):
        tm.measure(small_cnn(1), x, tm.transforms.rotations(4, interpolation="nearest"), measures=("lie_rotation",))
    with pytest.raises(ValueError, match=r"module 'resample' \(AffineResample\) runs an op that has no forward-mode "
                                         r"derivative.*grid_sampler_2d"):
        tm.measure(STNCNN(1, 10), x, tm.transforms.rotations(4), measures=("lie_rotation",))

    class Detached(nn.Module):
        def forward(self, x):
            return x.detach() * 2

    with pytest.raises(ValueError, match=r"^layer '1' \(Detached\) has no forward-mode tangent for lie_scale"):
        tm.measure(nn.Sequential(nn.Conv2d(1, 2, 3), Detached()), x, tm.transforms.rotations(4),
                   measures=("lie_scale",))
    with pytest.raises(ValueError, match=r"cyclic_shift\(4\) moves channels by whole steps of a finite group, which "
                                         "has no infinitesimal generator"):
        tm.measure(P4CNN(1, 10), x, tm.transforms.rot90(), measures=("lie_rotation",),
                   actions={"features.*": tm.actions.cyclic_shift(4)})


def test_vision_transformer_logits_equal_central_differences():
    """Through nn.MultiheadAttention (whose fused inference kernels have no forward-mode derivative: the
    measurement runs its composite path) the logits' Lie derivative equals central differences in float64,
    and the attention fast path is switched back on afterwards."""
    from tm_tensorboard.examples.models import VisionTransformer

    torch.manual_seed(0)
    model, x = VisionTransformer(1, 5, width=0.25, depth=2).double().eval(), images(6, (1, 16, 16))
    generator = lie.GENERATORS["lie_rotation"]
    result = tm.measure(model, x, tm.transforms.rotations(4), measures=("lie_rotation",), layers=["head"], compile=False)
    assert torch.backends.mha.get_fastpath_enabled()
    eps = 1e-7
    moves = generator.transformations([eps, -eps], (16, 16))
    with torch.no_grad():
        moved, reference = model(moves.apply(x)).view(6, 2, -1), model(x)
    squares = ((moved[:, 0] - moved[:, 1]) / (2 * eps)).square().mean(0).numpy()
    expected = safe_divide(squares, 2 * reference.var(0).numpy())
    np.testing.assert_allclose(result.get("lie_rotation", "head"), expected, rtol=1e-4)
