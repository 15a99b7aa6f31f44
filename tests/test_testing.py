"""tm_tensorboard.testing: assert_equivariant / assert_invariant pass on equivariant networks and layers, fail
on ordinary ones with a message naming the layer, channel and transformation, honour the tolerances, use
given or seeded random inputs, leave the model and the RNG as they were, and reject bad arguments in one
line."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from models import randomize_batchnorm, rot90_equivariant_cnn, small_cnn, symmetrize_rot90
from tm_tensorboard.examples.models import P4CNN, P4GroupConv2d, P4LiftingConv2d, SimpleCNN
from tm_tensorboard.testing import assert_equivariant, assert_invariant

P4_FEATURES = {"features.*": tm.actions.cyclic_shift(4)}
MNIST = (2, 1, 28, 28)


def p4cnn() -> nn.Module:
    """A randomly initialized P4CNN with random BatchNorm statistics (so eval-mode BatchNorm is not the identity)."""
    torch.manual_seed(0)
    model = P4CNN(1, 10, width=0.5)
    randomize_batchnorm(model, variance=(0.1, 2.0))
    return model


def conv(symmetry: str | None = None, seed: int = 0) -> nn.Conv2d:
    """A 3→4 channel 3×3 convolution; ``symmetry`` "rot90" or "horizontal" makes its kernels invariant to it."""
    torch.manual_seed(seed)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    if symmetry == "rot90":
        symmetrize_rot90(layer)
    elif symmetry == "horizontal":
        with torch.no_grad():
            layer.weight.copy_((layer.weight + layer.weight.flip(-1)) / 2)
    return layer


# -- the acceptance case: the p4 example model passes, the plain CNN fails naming a layer ---------------


def test_p4cnn_features_are_equivariant_and_its_logits_invariant():
    model = p4cnn()
    assert_equivariant(model, tm.transforms.rot90(), action=P4_FEATURES, input_shape=MNIST)
    assert_invariant(model, tm.transforms.rot90(), input_shape=MNIST)
    # Explicit layers with one action for all of them, and the orientation-pooled maps under identity().
    assert_equivariant(model, tm.transforms.rot90(), action=tm.actions.cyclic_shift(4), layers="features.*",
                       input_shape=MNIST)
    assert_equivariant(model, tm.transforms.rot90(), layers=["orientation_pool", "spatial_pool"], input_shape=MNIST)


def test_p4cnn_without_the_cyclic_shift_fails_at_its_first_layer():
    with pytest.raises(AssertionError) as caught:
        assert_equivariant(p4cnn(), tm.transforms.rot90(), layers="features.*", input_shape=MNIST)
    message = str(caught.value)
    assert message.startswith("not equivariant: layer 'features.")
    assert "first failing layer in forward order: 'features.0' (P4LiftingConv2d)" in message
    assert "under action identity" in message


def test_simple_cnn_fails_naming_layer_channel_transformation_and_error():
    torch.manual_seed(0)
    model = SimpleCNN(3, 10, width=0.25)
    with pytest.raises(AssertionError, match=(
        r"^not equivariant: layer 'features\.\d+' \((Conv2d|ReLU|MaxPool2d|AdaptiveAvgPool2d)\), channel \d+, "
        r"transformation 'rotation (90|180|270)°': \|error\| [\d.e+-]+ > [\d.e+-]+ allowed "
        r"\(atol=0.0001, rtol=0.0001\)\n"
    )) as caught:
        assert_equivariant(model, tm.transforms.rot90(), layers="features.*", input_shape=(2, 3, 32, 32))
    lines = str(caught.value).splitlines()
    assert lines[1].endswith("(layer, transformation, channel) fail; the worst:")
    assert lines[2].split() == ["layer", "transformation", "channel", "|error|", "allowed"]
    table = lines[3:8]
    errors = [float(row.split()[-2]) for row in table]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1
    assert lines[8].startswith("first failing layer in forward order: 'features.0' (Conv2d)")
    assert lines[9] == (
        "compared g⁻¹ ψ(φ(g x)) with ψ(φ(x)) under action identity on random inputs of shape [2, 3, 32, 32] "
        "(input_shape)"
    )
    with pytest.raises(AssertionError, match=r"^not invariant: layer 'model' \(SimpleCNN\), channel \d, "):
        assert_invariant(model, tm.transforms.rot90(), input_shape=(2, 3, 32, 32))


def test_rot90_symmetric_cnn_passes():
    model = rot90_equivariant_cnn()
    assert_equivariant(model, tm.transforms.rot90(), layers=[nn.Conv2d, nn.ReLU], input_shape=(2, 3, 16, 16))
    assert_invariant(model, tm.transforms.rot90(), input_shape=(2, 3, 16, 16))


# -- single layers, flips, tolerances -------------------------------------------------------------------


def test_single_conv_with_symmetric_kernels_passes_and_an_ordinary_one_fails():
    assert_equivariant(conv("rot90"), tm.transforms.rot90())  # input shape inferred from in_channels
    with pytest.raises(AssertionError, match=r"^not equivariant: layer 'model' \(Conv2d\), channel [0-3], "
                                             r"transformation 'rotation (90|180|270)°'") as caught:
        assert_equivariant(conv(), tm.transforms.rot90())
    assert "random inputs of shape [2, 3, 32, 32] (inferred from in_channels)" in str(caught.value)


def test_single_p4_layers_under_their_action():
    """What a developer of p4 layers writes. Inputs are images that g only rotates, so a p4 → p4 layer is
    checked behind a lifting layer; the cyclic shift in the wrong direction fails."""
    torch.manual_seed(0)
    shift = tm.actions.cyclic_shift(4)
    lifting = P4LiftingConv2d(2, 3)
    assert_equivariant(lifting, tm.transforms.rot90(), action=shift, input_shape=(2, 2, 9, 9))
    with pytest.raises(AssertionError, match=r"under action cyclic_shift\(4, direction=-1\) on random inputs"):
        assert_equivariant(lifting, tm.transforms.rot90(), action=tm.actions.cyclic_shift(4, direction=-1),
                           input_shape=(2, 2, 9, 9))
    stack = nn.Sequential(lifting, P4GroupConv2d(3, 3))
    assert_equivariant(stack, tm.transforms.rot90(), action=shift, layers="1", input_shape=(2, 2, 9, 9))


def test_flips_name_the_flip_that_breaks_equivariance():
    layer = conv("horizontal")
    assert_equivariant(layer, tm.transforms.flips(vertical=False))
    with pytest.raises(AssertionError, match=r"transformation 'flip vertical'") as caught:
        assert_equivariant(layer, tm.transforms.flips())
    assert "flip horizontal" not in str(caught.value)


def test_tolerances_decide():
    """A symmetric conv with one weight nudged by 1e-3 fails at the defaults and passes with atol = 1e-2."""
    layer = conv("rot90")
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(AssertionError, match=r"channel 0, .*\|error\| 0\.00\d+ > 0\.000\d+ allowed"):
        assert_equivariant(layer, tm.transforms.rot90())
    assert_equivariant(layer, tm.transforms.rot90(), atol=1e-2)
    with pytest.raises(AssertionError, match=r"> 0 allowed \(atol=0, rtol=0\)"):
        assert_equivariant(layer, tm.transforms.rot90(), atol=0, rtol=0)


def test_relative_tolerance_scales_with_the_values():
    """Brightening values near 1000 by 1e-3 is within rtol = 1e-4 (0.1 allowed) but not within atol alone."""
    torch.manual_seed(0)
    large = 1000 + torch.randn(2, 3)
    brighter = tm.transforms.brightness([0.0, 1e-3])
    assert_invariant(nn.Identity(), brighter, large)
    with pytest.raises(AssertionError, match=r"transformation 'brightness \+0\.001'"):
        assert_invariant(nn.Identity(), brighter, large, rtol=0)


def test_dtype_follows_the_model():
    """A float64 model gets float64 random inputs: its rounding errors are far below float32's."""
    layer = conv().double()
    symmetrize_rot90(layer)  # in float64: kernels symmetrized in float32 are asymmetric by ~1e-8
    assert_equivariant(layer, tm.transforms.rot90(), atol=1e-12, rtol=0)


def test_nan_fails():
    class Nan(nn.Module):
        def forward(self, x):
            return x * float("nan")

    with pytest.raises(AssertionError, match=r"\|error\| nan > "):
        assert_invariant(Nan(), tm.transforms.rot90(), input_shape=(1, 1, 4, 4))


def test_any_output_shape_and_non_image_inputs_for_invariance():
    """Centring a vector is invariant to adding a constant; a linear layer is not."""

    class Centre(nn.Module):
        def forward(self, x):
            return x - x.mean(dim=1, keepdim=True)

    brighter = tm.transforms.brightness([0.0, 0.5, -2.0])
    assert_invariant(Centre(), brighter, input_shape=(4, 6))
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match=r"layer 'model' \(Linear\), channel \d, transformation 'brightness"):
        assert_invariant(nn.Linear(6, 3), brighter, input_shape=(4, 6))


# -- inputs ---------------------------------------------------------------------------------------------


def test_given_inputs_are_used_and_random_ones_are_seeded():
    layer = conv()  # not equivariant, but on zero images it outputs its bias everywhere
    assert_equivariant(layer, tm.transforms.rot90(), torch.zeros(2, 3, 8, 8))
    messages = []
    for seed in (0, 0, 1):
        with pytest.raises(AssertionError) as caught:
            assert_equivariant(layer, tm.transforms.rot90(), input_shape=(1, 3, 8, 8), seed=seed)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] != messages[2]
    with pytest.raises(AssertionError, match="on the given inputs$"):
        assert_equivariant(layer, tm.transforms.rot90(), torch.randn(1, 3, 8, 8))


# -- the model and the process are left as they were ----------------------------------------------------


@pytest.mark.parametrize("outcome", ["passes", "fails", "errors"])
def test_modes_rng_autograd_and_hooks_are_restored(outcome):
    model = small_cnn()
    model.train()
    model[4].eval()  # a mix of modes, restored module by module
    modes = [m.training for m in model.modules()]
    torch.manual_seed(123)
    np.random.seed(4)
    random.seed(5)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    call = {
        "passes": lambda: assert_invariant(model, tm.transforms.rot90(), input_shape=(2, 3, 8, 8), atol=1e3),
        "fails": lambda: assert_invariant(model, tm.transforms.rot90(), input_shape=(2, 3, 8, 8)),
        "errors": lambda: assert_equivariant(model, tm.transforms.rot90(), layers="9", input_shape=(2, 3, 8, 8)),
    }[outcome]
    expected = {"passes": None, "fails": AssertionError, "errors": ValueError}[outcome]
    if expected is None:
        call()
    else:
        with pytest.raises(expected):
            call()
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert torch.is_grad_enabled()
    assert all(not m._forward_hooks for m in model.modules())


def test_reachable_from_the_package():
    assert tm.testing.assert_equivariant is assert_equivariant
    assert tm.testing.assert_invariant is assert_invariant


# -- bad arguments: one-line errors ---------------------------------------------------------------------


class NoneFirst(nn.Module):
    """A model whose output tuple does not start with a tensor (tuples are checked on their first element)."""

    def forward(self, x):
        return None, x


class Unused(nn.Module):
    """A model with a module its forward never calls."""

    def __init__(self):
        super().__init__()
        self.used, self.spare = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.used(x)



@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: assert_equivariant(conv(), "rot90"), TypeError, "must be a TransformationSet"),
        (lambda: assert_invariant(lambda x: x, tm.transforms.rot90()), TypeError, "torch.nn.Module"),
        (lambda: assert_equivariant(p4cnn(), tm.transforms.rot90(), input_shape=MNIST), ValueError,
         r"layer 'model' outputs shape \[2, 10\], not feature maps .* use assert_invariant for logits"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), action=tm.actions.cyclic_shift(3)), ValueError,
         "layer 'model': cyclic_shift\\(3\\) needs a channel count divisible by 3; the layer has 4"),
        (lambda: assert_equivariant(conv(), tm.transforms.flips(), action=tm.actions.cyclic_shift(4)), ValueError,
         "acts on rotations by multiples of 90°; 'identity' is not one|'flip horizontal' is not one"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), action="cyclic"), TypeError,
         "action must be a FeatureAction"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), action={}), ValueError, "names no layers"),
        (lambda: assert_equivariant(p4cnn(), tm.transforms.rot90(), layers="feature.*", input_shape=MNIST),
         ValueError, r"no module matches layer selector\(s\) 'feature\.\*'; valid module names: model, features"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), torch.randn(2, 3, 8, 6)), ValueError,
         "needs square images"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), torch.randn(3, 8, 8)), ValueError,
         r"need image batches shaped \[N, C, H, W\]"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), torch.randn(1, 3, 8, 8), input_shape=(1, 3, 8, 8)),
         ValueError, "not both"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), [[0.0]]), TypeError, "inputs must be a tensor"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), input_shape=(2, 3, 0, 0)), ValueError,
         "input_shape must be positive ints"),
        (lambda: assert_equivariant(p4cnn(), tm.transforms.rot90(), action=P4_FEATURES), ValueError,
         "cannot infer the input shape of P4CNN"),
        (lambda: assert_invariant(p4cnn(), tm.transforms.rot90(), input_shape=(2, 3, 28, 28)), ValueError,
         r"the model could not run on random inputs of shape \[2, 3, 28, 28\] \(input_shape\): "),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), atol=-1), ValueError, "atol must be a finite"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), rtol=float("nan")), ValueError, "rtol must be"),
        (lambda: assert_equivariant(conv(), tm.transforms.rot90(), seed=1.5), TypeError, "seed must be an int"),
        (lambda: assert_invariant(NoneFirst(), tm.transforms.rot90(), input_shape=(2, 3, 4, 4)),
         ValueError, r"layer 'model' \(NoneFirst\) returns a tuple whose first element is NoneType, not a tensor"),
        (lambda: assert_invariant(Unused(), tm.transforms.rot90(), layers=nn.Conv2d, input_shape=(2, 3, 8, 8)),
         ValueError, r"^layer\(s\) spare were not called during the forward pass$"),
    ],
)
def test_bad_arguments_raise_one_line_errors(call, error, match):
    with pytest.raises(error, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
