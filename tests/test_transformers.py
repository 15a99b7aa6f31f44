"""Vision Transformers measured end to end: tuple outputs (attention) on their first tensor, token outputs
[tokens, D] per element and per channel (averaged over tokens) against the brute-force reference, the
patch_grid action's layout, exact equivariance of a ViT built to be rot90- and flip-equivariant, and the
example ViT trained, monitored and served."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import fused, transforms as T
from tm_tensorboard.examples.models import VisionTransformer
from tm_tensorboard.examples.training import train_run
from tm_tensorboard.examples.variants import monitor_options
from tm_tensorboard.expressions import parse_action
from tm_tensorboard.testing import assert_equivariant
from reference import activation_matrix, measures as ref_measures
from test_examples_and_demo import load_script, served_runs, write_mnist

# An equivariant float32 network differs from exact agreement by rounding only: attention and LayerNorm sum
# over permuted tokens in another order, which moves a unit by a few float32 ulps (~1e-7 of its scale) per
# operation. Measured on the ViT below, per element (a ratio over an element's own sample spread, larger
# where that spread is small): nvse up to 7.6e-6, ee up to 3.8e-11. A broken equivariance gives nvse and ee
# of order 1 (the same ViT with a positional embedding: 0.9-1.2), so these bounds sit more than 10x above
# rounding and 1e3x (nvse) / 1e7x (ee, a ratio of squares) below a real violation.
NVSE_TOLERANCE = 1e-4
EE_TOLERANCE = 1e-9


def small_vit(depth: int = 2, seed: int = 0) -> VisionTransformer:
    """The example ViT at width 0.25 (4 heads × 4 channels = D 16) with ``depth`` blocks."""
    torch.manual_seed(seed)
    return VisionTransformer(1, 5, width=0.25, depth=depth).eval()


def symmetrize_d4(conv: nn.Conv2d) -> None:
    """Make every kernel invariant to rot90 and flips: a rotated or flipped patch embeds as the patch does."""
    with torch.no_grad():
        w = conv.weight
        rotations = [torch.rot90(w, k, dims=(2, 3)) for k in range(4)]
        w.copy_(sum(rotations + [r.flip(-1) for r in rotations]) / 8)


def equivariant_vit() -> VisionTransformer:
    """No positional embedding (attention, LayerNorm and the MLP commute with any permutation of the tokens)
    and D4-symmetric patch kernels (rot90 / flips of the image permute its patch tokens as the grid's cells):
    every block is exactly equivariant on the patch grid, and the class token invariant."""
    model = small_vit(depth=4)
    with torch.no_grad():
        model.row_position.zero_()
        model.column_position.zero_()
    symmetrize_d4(model.patch_embed)
    return model


# -- tuple outputs -------------------------------------------------------------------------------------


class FirstOnly(nn.Module):
    """Attention that returns its output tensor alone."""

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.attn = attn

    def forward(self, *args):
        return self.attn(*args)[0]


class Attention(nn.Module):
    """Patch tokens through one attention layer called with its defaults: it returns (output, weights)."""

    def __init__(self, first_only: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.attn = FirstOnly(attn) if first_only else attn

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        out = self.attn(tokens, tokens, tokens)
        return (out if isinstance(out, torch.Tensor) else out[0]).mean(1)


class NoneFirst(nn.Module):
    def forward(self, x):
        return None, x


def test_tuple_outputs_are_measured_on_their_first_tensor():
    probe = torch.randn(6, 3, 8, 8)
    tuple_result = tm.measure(Attention(), probe, T.rot90(), layers="attn", compile=False)
    tensor_result = tm.measure(Attention(first_only=True), probe, T.rot90(), layers="attn", compile=False)
    for measure in ("tvi", "svi", "nvi"):
        np.testing.assert_array_equal(tuple_result.get(measure, "attn", per="element"),
                                      tensor_result.get(measure, "attn", per="element"))
    # By default attention is observed as a whole, not through the output projection it never calls.
    assert tm.measure(Attention(), probe, T.rot90(), compile=False).layers == ["embed", "attn"]


def test_a_tuple_without_a_leading_tensor_is_named_or_skipped():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), NoneFirst())
    probe = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^layer '1' \(NoneFirst\) returns a tuple whose first element is NoneType, "
                                         r"not a tensor; it cannot be measured$"):
        tm.measure(model, probe, T.rot90(), layers=["0", "1"], compile=False)
    assert tm.measure(model, probe, T.rot90(), compile=False).layers == ["0"]  # default layers: skipped


# -- token outputs against the brute-force reference ---------------------------------------------------


def undo_rot90(output: torch.Tensor, t: int) -> torch.Tensor:
    """Rotate a layer's output back by t quarter turns, written independently of the library: a feature map
    [1, D, h, w] directly, tokens [1, 1 + 3·3, D] after laying the patch tokens out row-major on their grid."""
    if output.dim() == 3:
        output = output[:, 1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    return torch.rot90(output, -t, dims=(2, 3))


@pytest.mark.usefixtures("kernels")
def test_token_outputs_equal_brute_force_per_element_and_per_channel():
    torch.manual_seed(1)
    model, probe, tset = small_vit(), torch.randn(7, 1, 12, 12), T.rot90()  # 3×3 patches + a class token
    tokens = ["blocks.0.norm1", "blocks.0.attn", "blocks.0.mlp.1", "blocks.1", "norm"]
    layers = ["patch_embed", *tokens, "head"]

    def one(x, t):
        return tset.apply_one(x, t) if t < len(tset) else None

    plain = activation_matrix(model, probe, one, layers)
    moved_back = activation_matrix(model, probe, one, layers[:-1], undo_rot90)
    result = tm.measure(model, probe, tset, layers=layers, measures=("invariance", "same_equivariance"),
                        actions=tm.actions.patch_grid(3, 3, cls_tokens=1), batch_size=3)  # chunks of 3, 3, 1
    for layer in tokens:
        info = result.layer_info(layer)
        channels = 64 if layer == "blocks.0.mlp.1" else 16  # the MLP's hidden width is 4 D
        assert info.tokens and info.unit_shape == (10, channels) and info.num_channels == channels
        assert info.map_shape == (channels, 3, 3)
        A = plain[layer]  # [N, T, tokens, D]
        by_channel = ref_measures(np.swapaxes(A, -1, -2), "channel")  # channels first: averaged over tokens
        for name, key in (("tvi", "tv"), ("svi", "sv"), ("nvi", "nv")):
            got = result.get(name, layer, per="element")
            assert got.shape == (10, channels)
            np.testing.assert_allclose(got, ref_measures(A, "element")[key], rtol=2e-5, atol=1e-7, err_msg=f"{name} {layer}")
            np.testing.assert_allclose(result.get(name, layer), by_channel[key], rtol=2e-5, atol=1e-7,
                                       err_msg=f"{name} {layer} per channel")
    for layer in layers[:-1]:  # the maps: [D, 3, 3] of the patch tokens, the class token left out
        for per in ("element", "channel"):
            ref = ref_measures(moved_back[layer], per)
            for name, key in (("tvse", "tv"), ("svse", "sv"), ("nvse", "nv")):
                np.testing.assert_allclose(result.get(name, layer, per=per), ref[key], rtol=2e-5, atol=1e-7,
                                           err_msg=f"{name} {layer} {per}")
    assert result.layers_of("nvse") == layers[:-1]  # the logits have no maps


class ConvThenLinear(nn.Module):
    """A 1-D convolution over the flattened image ([C, L], channels first), then a Linear on its transpose
    ([L, D], tokens)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.linear = nn.Linear(4, 6)

    def forward(self, x):
        return self.linear(self.conv(x.flatten(2)).transpose(1, 2))


def test_three_dimensional_outputs_are_tokens_unless_the_module_puts_channels_first():
    result = tm.measure(ConvThenLinear(), torch.randn(5, 3, 4, 4), T.rot90(), compile=False)
    conv, linear = result.layer_info("conv"), result.layer_info("linear")
    assert not conv.tokens and conv.unit_shape == (4, 16) and result.get("nvi", "conv").shape == (4,)
    assert linear.tokens and linear.unit_shape == (16, 6) and result.get("nvi", "linear").shape == (6,)
    assert result.layers_of("nvse") == []  # neither has maps without a patch grid
    with pytest.raises(KeyError, match="token outputs get them from a patch_grid feature action"):
        result.get("nvse", "linear")


# -- the patch_grid action -----------------------------------------------------------------------------


def test_patch_grid_lays_patch_tokens_out_row_major_without_the_class_token():
    action = tm.actions.patch_grid(2, 3, cls_tokens=1)
    tokens = torch.randn(2, 7, 4)
    maps = action.maps(tokens)
    assert maps.shape == (2, 4, 2, 3) and action.grid(7) == (2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(maps[:, :, i, j], tokens[:, 1 + 3 * i + j])
    feature_maps = torch.randn(2, 4, 5, 5)
    assert action.maps(feature_maps) is feature_maps  # maps already (the patch embedding)
    with pytest.raises(ValueError, match=r"patch_grid\(2, 3, cls_tokens=1\) lays out 1 \+ 2·3 = 7 tokens; the layer outputs 6"):
        action.grid(6)
    for bad in ((0, 3, 0), (2, 3, -1), (2.0, 3, 0)):
        with pytest.raises(ValueError, match="patch_grid needs an int"):
            tm.actions.patch_grid(*bad)
    assert repr(action) == "patch_grid(2, 3, cls_tokens=1)"
    assert parse_action(repr(action)).grid(7) == (2, 3)  # the command line spells it the same


@pytest.mark.parametrize("move", [lambda x: torch.rot90(x, 1, dims=(2, 3)), lambda x: torch.rot90(x, 2, dims=(2, 3)),
                                  lambda x: x.flip(-1), lambda x: x.flip(-2)], ids=["rot90", "rot180", "flip-h", "flip-v"])
def test_moving_the_image_moves_its_patch_tokens_as_it_moves_the_grid(move):
    """When the patch size divides the image, rot90 and flips carry every patch onto another one, turned or
    mirrored: with D4-symmetric patch kernels the laid-out tokens move exactly as the image does."""
    torch.manual_seed(0)
    embed = nn.Conv2d(2, 5, 4, stride=4).double()
    symmetrize_d4(embed)
    cls = torch.zeros(3, 1, 5, dtype=torch.float64)

    def tokens_of(x):
        return torch.cat([cls, embed(x).flatten(2).transpose(1, 2)], dim=1)

    x = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    action = tm.actions.patch_grid(4, 4, cls_tokens=1)
    with torch.no_grad():
        torch.testing.assert_close(action.maps(tokens_of(move(x))), move(action.maps(tokens_of(x))), rtol=1e-12, atol=1e-12)


def test_a_patch_grid_that_does_not_fit_the_tokens_names_the_layer():
    with pytest.raises(ValueError, match=r"^layer 'blocks.0.norm1': patch_grid\(4, 4, cls_tokens=1\) lays out 1 \+ 4·4 "
                                         r"= 17 tokens; the layer outputs 10"):
        tm.measure(small_vit(), torch.randn(3, 1, 12, 12), T.rot90(), actions=tm.actions.patch_grid(4, 4, cls_tokens=1),
                   compile=False)


# -- a ViT equivariant by construction -------------------------------------------------------------------


@pytest.mark.parametrize("tset", [T.rot90(), T.flips()], ids=["rot90", "flips"])
def test_a_vit_built_equivariant_measures_zero_on_its_blocks(tset):
    model = equivariant_vit()
    torch.manual_seed(2)
    probe = torch.randn(12, 1, 28, 28)
    action = tm.actions.patch_grid(*model.grid(28, 28), cls_tokens=model.cls_tokens)
    result = tm.measure(model, probe, tset, layers=["patch_embed", "blocks.*", "head"], actions=action,
                        measures=("invariance", "same_equivariance", "equivariance_error"), compile=False)
    blocks = [layer for layer in result.layers if layer.startswith("blocks.")]
    assert "blocks.3.attn" in blocks and result.layers_of("nvse") == result.layers_of("ee") == ["patch_embed", *blocks]
    for layer in result.layers_of("nvse"):
        assert result.get("nvse", layer, per="element").max() < NVSE_TOLERANCE, layer
        assert result.get("ee", layer, per="element").max() < EE_TOLERANCE, layer
    assert result.layer_means("nvi")["blocks.3"] > 0.5  # its maps move with the image: equivariant, not invariant
    assert result.get("nvi", "head").max() < NVSE_TOLERANCE  # the class token's logits are invariant
    assert_equivariant(model, tset, action={"blocks.*": action}, input_shape=(2, 1, 28, 28))

    with torch.no_grad():  # a positional embedding breaks it: the measures see it
        nn.init.normal_(model.row_position)
    broken = tm.measure(model, probe, tset, layers="blocks.*", actions=action, compile=False,
                        measures=("same_equivariance", "equivariance_error"))
    for layer in broken.layers_of("nvse"):
        assert broken.layer_means("nvse")[layer] > 0.1 and broken.layer_means("ee")[layer] > 0.01, layer
    with pytest.raises(AssertionError, match="first failing layer in forward order: 'blocks.0.norm1'"):
        assert_equivariant(model, tset, action={"blocks.*": action}, input_shape=(2, 1, 28, 28))


# -- the example ViT -------------------------------------------------------------------------------------


@pytest.fixture
def eager(monkeypatch):
    """Eager statistics in the Monitors of the examples (compiling them for a few tiny steps does not pay)."""
    monkeypatch.setenv(fused.ENVIRONMENT_VARIABLE, "0")


@pytest.mark.usefixtures("eager")
def test_the_example_vit_trains_and_the_monitor_measures_it_under_rotations_then_rot90(tmp_path):
    torch.manual_seed(0)
    images, labels = torch.rand(96, 1, 28, 28), torch.randint(0, 10, (96,))
    model = VisionTransformer(1, 10, width=0.25)
    before = [p.detach().clone() for p in model.parameters()]
    options = monitor_options(model, (28, 28))
    assert repr(options["actions"]) == "patch_grid(7, 7, cls_tokens=1)"
    metrics = train_run(model, (images[:64], labels[:64]), (images[64:], labels[64:]), tmp_path / "vit", steps=4,
                        batch_size=16, probe_size=16, transformations=T.rotations(8, padding="zeros"), every=2,
                        monitor_options=options)
    assert set(metrics) >= {"test/accuracy", "test/accuracy_rotated"}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    logs = tm.read(tmp_path)["vit"]
    assert sorted(logs.means["nvse"]["blocks.3.attn"].steps) == [0, 2, 4]
    result = tm.measure(model, images[64:], T.rot90(), actions=options["actions"], compile=False,
                        measures=("invariance", "same_equivariance", "equivariance_error"))
    assert {"blocks.0.attn", "blocks.3.mlp.2", "head"} <= set(result.layers)
    for layer in result.layers_of("ee"):
        assert np.isfinite(result.get("ee", layer)).all() and np.isfinite(result.get("nvse", layer)).all(), layer


@pytest.mark.usefixtures("eager")
def test_the_mnist_script_trains_a_vit_and_the_tab_names_its_layers(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_mnist(data)
    logdir = tmp_path / "runs"
    assert load_script("mnist.py").main(["--smoke", "--model", "vit", "--width", "0.25", "--data-dir", str(data),
                                         "--logdir", str(logdir), "--augmentation", "none", "--batch-size", "16"]) == 0
    entry = served_runs(logdir)["vit-none"]
    layers = {layer["name"]: layer for layer in entry["layers"]}
    assert {"input", "patch_embed", "blocks.0.attn", "blocks.3.attn", "blocks.3.mlp.1", "head"} <= set(layers)
    attn = layers["blocks.0.attn"]
    assert attn["module_type"] == "MultiheadAttention" and attn["unit_shape"] == [50, 16] and attn["num_units"] == 16
    assert "blocks.0.attn" in entry["measure_layers"]["nvse"] and entry["accuracy"] and entry["max_step"] == 20
    assert tm.read(logdir)["vit-none"].config["actions"]["blocks.0.attn"] == "patch_grid(7, 7, cls_tokens=1)"
