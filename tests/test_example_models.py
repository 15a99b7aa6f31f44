"""The example models: each builds, classifies MNIST- and CIFAR10-sized images and trains; P4CNN's group
feature maps transform exactly as documented under rot90, and its logits are rot90-invariant."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tm_tensorboard as tm
from models import randomize_batchnorm
from tm_tensorboard.examples.models import (
    MODELS,
    P4BatchNorm2d,
    P4CNN,
    P4GroupConv2d,
    P4LiftingConv2d,
    ResNet18Style,
    ResNet50,
    STNCNN,
    SymmetricMaxPool2d,
    build_model,
)

INPUTS = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
SMALL = 0.25  # width multiplier that keeps every model fast on a CPU


def rot(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Counter-clockwise quarter turns as displayed, on the last two dimensions."""
    return torch.rot90(x, k, dims=(-2, -1))


def p4_action(feature_map: torch.Tensor, k: int = 1) -> torch.Tensor:
    """What rotating the input by k quarter turns does to a [B, C·4, H, W] group feature map: every map
    rotates by k quarter turns and each filter's 4 orientation channels shift cyclically by +k
    (new orientation r holds old orientation r - k)."""
    by_orientation = feature_map.unflatten(1, (-1, 4))  # [B, C, 4, H, W], channel c·4 + r
    return rot(torch.roll(by_orientation, k, dims=2), k).flatten(1, 2)


@pytest.mark.parametrize("data", INPUTS)
@pytest.mark.parametrize("name", MODELS)
def test_every_model_classifies_and_trains(name, data):
    torch.manual_seed(0)
    shape = INPUTS[data]
    model = build_model(name, shape[0], 7, width=SMALL)
    images, labels = torch.randn(3, *shape), torch.tensor([0, 3, 6])
    logits = model(images)
    assert logits.shape == (3, 7) and logits.dtype == torch.float32
    F.cross_entropy(logits, labels).backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not without_grad, f"parameters without a finite gradient: {without_grad}"
    assert model.eval()(images).shape == (3, 7)


@pytest.mark.parametrize("name", MODELS)
def test_models_create_no_tensors_of_their_own_dtype(name):
    """A float64 model runs on float64 input: nothing in forward is hard-wired to float32 (nor to a device)."""
    model = build_model(name, 3, 4, width=SMALL).double()
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("name", MODELS)
def test_every_activation_is_its_own_module_called_once(name):
    """Each activation has its own module name: no ReLU / GELU instance is shared, none is in-place."""
    model = build_model(name, 1, 3, width=SMALL)
    activations = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.GELU))]
    calls = {id(m): 0 for m in activations}
    handles = [m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls[id(m)] + 1)) for m in activations]
    model(torch.randn(2, 1, 28, 28))
    for handle in handles:
        handle.remove()
    assert activations and set(calls.values()) == {1}
    assert not any(getattr(m, "inplace", False) for m in activations)


def test_build_model_rejects_unknown_names_and_widths():
    valid = "simple_cnn, allconv, vgg, resnet18, resnet50, p4cnn, stn, vit"
    with pytest.raises(ValueError, match=f"unknown model 'lenet'; valid names: {valid}"):
        build_model("lenet", 1, 10)
    with pytest.raises(ValueError, match="width must be a positive"):
        build_model("vgg", 1, 10, width=0)


def test_resnet18_has_the_reference_layout():
    model = ResNet18Style(3, 10)
    # The CIFAR ResNet-18 (stem 3×3, [2, 2, 2, 2] basic blocks at 64-128-256-512) has 11 173 962 parameters.
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert [stage[0].conv1.out_channels for stage in model.stages] == [64, 128, 256, 512]
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]


def test_resnet50_has_the_imagenet_layout():
    with torch.device("meta"):  # shapes only: no weights to initialize, a 224 px forward without arithmetic
        model = ResNet50()
    # torchvision's resnet50() (7×7 stem, [3, 4, 6, 3] bottlenecks, 1000 classes) has 25 557 032 parameters.
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert [len(stage) for stage in model.stages] == [3, 4, 6, 3]
    assert [stage[-1].conv3.out_channels for stage in model.stages] == [256, 512, 1024, 2048]
    shapes = {}
    hooks = [model.stem.register_forward_hook(lambda m, i, o: shapes.__setitem__("stem", o.shape[1:]))]
    for k, stage in enumerate(model.stages):
        hooks.append(stage.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, o.shape[1:])))
    logits = model(torch.empty(2, 3, 224, 224, device="meta"))
    assert logits.shape == (2, 1000)
    assert [tuple(shapes[k]) for k in ("stem", 0, 1, 2, 3)] == [
        (64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]


def test_resnet50_is_measured_and_logged_end_to_end(tmp_path):
    """At small width and resolution every one of its 158 default layers is measured, and the Monitor
    writes a run TensorBoard's reader reads back with all of them."""
    torch.manual_seed(0)
    model = ResNet50(3, 10, width=0.125)
    randomize_batchnorm(model)
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    tset = tm.transforms.rotations(4, padding="zeros")  # (with same-equivariance: no BatchNorm dedupe)
    result = tm.measure(model, (images, labels), tset, batch_size=3, compile=False)
    assert len(result.layers) == 158 and result.layers[:4] == ["stem.0", "stem.1", "stem.2", "stem.3"]
    assert result.layers[-2:] == ["pool", "classifier.1"] and result.accuracy.shape == (4,)
    for layer in result.layers:
        live = ~result.dead("nvi", layer)
        assert live.any() and np.isfinite(result.get("nvi", layer)[live]).all(), layer
    with tm.Monitor(model, (images, labels), tset, logdir=tmp_path / "resnet50", every=1, batch_size=3,
                    compile=False) as monitor:
        monitor.step(0)
    run = tm.read(tmp_path)["resnet50"]
    assert run.layers("nvi") == result.layers
    np.testing.assert_allclose([run.means["nvi"][layer].values[-1] for layer in result.layers],
                               list(result.layer_means("nvi").values()), rtol=1e-6)


def test_untrained_stn_passes_images_through():
    torch.manual_seed(0)
    model = STNCNN(3, 10, width=SMALL)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.transform(images), images, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- P4CNN


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 27, 27), (2, 30, 24)],
                         ids=["mnist", "cifar10", "odd", "rectangular"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_p4cnn_group_maps_rotate_and_shift_orientation_by_plus_one(shape, mode):
    """f(rot(x))[c, r] == rot(f(x)[c, r - 1]) exactly (float64) at every module of ``features``."""
    torch.manual_seed(0)
    model = P4CNN(shape[0], 5, width=0.5).double()
    randomize_batchnorm(model)
    model.train(mode == "train")
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone())) for m in model.features]
    x = torch.randn(4, *shape, dtype=torch.float64)
    model(x)
    plain, outputs[:] = list(outputs), []
    model(rot(x))
    rotated = outputs
    for hook in hooks:
        hook.remove()
    assert len(plain) == len(model.features)
    for layer, (f, f_rot) in enumerate(zip(plain, rotated)):
        where = f"features[{layer}] ({type(model.features[layer]).__name__})"
        assert f.shape[1] % 4 == 0, where
        torch.testing.assert_close(f_rot, p4_action(f), atol=1e-10, rtol=0, msg=where)
        # The direction matters: a shift by -1 is wrong (the maps are not orientation-symmetric).
        shifted_back = rot(torch.roll(f.unflatten(1, (-1, 4)), -1, dims=2)).flatten(1, 2)
        assert (f_rot - shifted_back).abs().max() > 1e-3, where


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("data", INPUTS)
def test_p4cnn_logits_are_rot90_invariant(data, mode):
    torch.manual_seed(0)
    model = P4CNN(INPUTS[data][0], 10)
    randomize_batchnorm(model)
    model.train(mode == "train")
    x = torch.randn(6, *INPUTS[data])
    with torch.no_grad():
        logits = model(x)
        for k in (1, 2, 3):
            torch.testing.assert_close(model(rot(x, k)), logits, atol=1e-5, rtol=0)
    assert (logits[1:] - logits[:1]).abs().max() > 1e-4  # samples differ by far more than the tolerance


@pytest.mark.parametrize("bias", [True, False])
def test_p4_convolutions_follow_the_documented_law(bias):
    torch.manual_seed(0)
    lift, group = P4LiftingConv2d(2, 3, 5, bias=bias).double(), P4GroupConv2d(3, 2, 3, bias=bias).double()
    x = torch.randn(2, 2, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(lift(rot(x)), p4_action(lift(x)), atol=1e-12, rtol=0)
    g = torch.randn(2, 12, 9, 9, dtype=torch.float64)  # any group feature map, not only a lifted one
    for k in (1, 2, 3):
        torch.testing.assert_close(group(p4_action(g, k)), p4_action(group(g), k), atol=1e-12, rtol=0)


def test_p4_convolutions_need_odd_kernels():
    with pytest.raises(ValueError, match="odd kernel_size"):
        P4LiftingConv2d(1, 2, kernel_size=4)
    with pytest.raises(ValueError, match="odd kernel_size"):
        P4GroupConv2d(1, 2, kernel_size=2)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_p4_batchnorm_shares_parameters_across_orientations(mode):
    """Per-orientation statistics and affine parameters (a plain BatchNorm2d over C·4 channels) break the
    law; P4BatchNorm2d's shared ones keep it."""
    torch.manual_seed(0)
    g = torch.randn(8, 12, 6, 6, dtype=torch.float64)
    shared, plain = P4BatchNorm2d(3).double(), nn.BatchNorm2d(12).double()
    for bn in (shared, plain):
        randomize_batchnorm(bn)
        bn.train(mode == "train")
    torch.testing.assert_close(shared(p4_action(g)), p4_action(shared(g)), atol=1e-12, rtol=0)
    assert (plain(p4_action(g)) - p4_action(plain(g))).abs().max() > 0.1


@pytest.mark.parametrize("size", [(8, 8), (7, 7), (9, 6)])
def test_symmetric_max_pool_commutes_with_rot90_and_flips(size):
    x = torch.randn(2, 3, *size)
    pool = SymmetricMaxPool2d()
    assert pool(x).shape[-2:] == tuple((n + 1) // 2 for n in size)
    torch.testing.assert_close(pool(rot(x)), rot(pool(x)), atol=0, rtol=0)
    torch.testing.assert_close(pool(x.flip(-1)), pool(x).flip(-1), atol=0, rtol=0)


def test_plain_2x2_max_pool_breaks_rot90_on_odd_sizes():
    """Why SymmetricMaxPool2d exists: a 2×2 window drops the last row / column on one side only."""
    x = torch.randn(2, 3, 7, 7)
    assert not torch.equal(F.max_pool2d(rot(x), 2), rot(F.max_pool2d(x, 2)))
