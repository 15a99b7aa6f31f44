"""Clear errors instead of silent wrong numbers, and defaults that don't mislead (issue 13)."""
from __future__ import annotations

import copy
import gc
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.tensorboard import SummaryWriter

import tm_tensorboard as tm
from tm_tensorboard import transforms as T
from tm_tensorboard import probe as probe_module
from tm_tensorboard.probe import as_probe
from models import small_cnn


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_step_must_be_an_integer(tmp_path):
    with tm.Monitor(small_cnn(), _images(), T.flips(), logdir=tmp_path / "run", every=2) as monitor:
        for bad in ("4", 4.0, True, torch.tensor(4.0), torch.tensor([4]), None):
            with pytest.raises(TypeError, match=r"step\(global_step\) takes an int.*got"):
                monitor.step(bad)
        assert monitor.step(np.int64(4)) is not None  # numpy and 0-d torch integers are steps too
        assert monitor.step(torch.tensor(6)) is not None
        assert monitor.step(7) is None


def test_labels_outside_the_models_classes_are_an_error(tmp_path):
    model, images = small_cnn(classes=5), _images()
    labels = torch.tensor([0, 1, 2, 3, 4, 99, -1, 0])
    for measures in (("invariance", "accuracy"), None):  # explicit, and added by default with labels
        with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 5\).*got -1, 99"):
            tm.measure(model, (images, labels), T.flips(), measures=measures)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 5\)"):
        tm.Monitor(model, images, T.flips(), labels=labels, logdir=tmp_path / "run", measures=("accuracy",))
    assert not (tmp_path / "run").exists()
    groups = torch.tensor([7, 7, 7, 7, -3, -3, -3, -3])  # only grouping the samples: any integers do
    assert tm.measure(model, (images, groups), T.flips(), measures=("invariance",), stratified=True).classes == [-3, 7]


def test_two_monitors_on_one_run_and_namespace_are_refused(tmp_path):
    images = _images()
    first = tm.Monitor(small_cnn(), images, T.flips(), logdir=tmp_path / "run")
    os.symlink(tmp_path / "run", tmp_path / "link")
    for same in (tmp_path / "run", tmp_path / "link", str(tmp_path / "run" / ".." / "run")):
        with pytest.raises(ValueError, match=r"already writing namespace 'invariance'.*pass another namespace="):
            tm.Monitor(small_cnn(seed=1), images, T.flips(), logdir=same)
    writer = SummaryWriter(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="another namespace= .* or logdir="):
        tm.Monitor(small_cnn(seed=1), images, T.flips(), writer=writer)
    tm.Monitor(small_cnn(seed=1), images, T.flips(), writer=writer, namespace="second").close()  # documented use
    first.close()
    again = tm.Monitor(small_cnn(seed=1), images, T.flips(), writer=writer)  # close() released the run
    del again
    gc.collect()
    tm.Monitor(small_cnn(seed=1), images, T.flips(), logdir=tmp_path / "run").close()  # and so does collection
    writer.close()


def test_float32_overflow_warns_naming_the_layers(kernels):
    with pytest.warns(RuntimeWarning, match=r"inf in the measures of layer\(s\) 0, 1, 2, 3.*overflow") as caught:
        result = tm.measure(small_cnn(), _images() * 1e20, T.rotations(4), measures=("invariance",))
    assert not any("NaN activations" in str(w.message) for w in caught)
    assert np.isinf(result.get("tvi", "0")).all()  # squared deviations over transformations overflow float32
    svi = result.get("svi", "0")
    if kernels == "compiled":  # the CPU kernel takes differences over samples in float64: they do not overflow
        assert np.isfinite(svi).all() and (svi > 1e19).all()
    else:
        assert np.isinf(svi).all()


@pytest.mark.usefixtures("kernels")
def test_nan_warning_blames_nan_activations_only_when_there_are_some(no_warnings):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].bias[1] = -100.0  # channel 1 is always 0 after the ReLU
    images = _images()
    tm.measure(model, images, T.rotations(4), measures=("invariance", "anova"))  # no warning
    images[3, 0, 4, 4] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tm.measure(model, images, T.rotations(4), measures=("invariance", "anova"))
    assert [str(w.message).split(":")[0] for w in caught] == ["NaN in the measures of layer(s) 0, 1"]
    assert "NaN or infinite activations" in str(caught[0].message)


def test_complex_probe_or_layer_output_is_an_error():
    with pytest.raises(TypeError, match="complex"):
        tm.measure(small_cnn(), torch.randn(4, 3, 8, 8, dtype=torch.complex64), T.flips())

    class Spectrum(nn.Module):
        def forward(self, x):
            return torch.fft.fft2(x)

    class Magnitude(nn.Module):
        def forward(self, x):
            return x.abs()

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Spectrum(), Magnitude())
    with pytest.raises(ValueError, match=r"layer '1' \(Spectrum\) returns complex64 values"):
        tm.measure(model, _images(), T.flips())
    assert tm.measure(model, _images(), T.flips(), layers=["0", "2"]).layers == ["0", "2"]


def test_half_and_bfloat16_models_get_a_probe_of_their_dtype(tmp_path):
    model, images = small_cnn(), _images()
    full = tm.measure(model, images, T.rot90(), measures=("invariance",))
    for dtype in (torch.float16, torch.bfloat16):  # both run a small CNN on CPU in torch 2.13
        low = tm.measure(copy.deepcopy(model).to(dtype), images, T.rot90(), measures=("invariance",))
        np.testing.assert_allclose(low.get("svi", "3"), full.get("svi", "3"), rtol=0.05)
    with tm.Monitor(model, images, T.rot90(), logdir=tmp_path / "run", every=1) as monitor:
        model.half()  # after the Monitor was made: the probe follows the model's dtype
        assert monitor.step(0) is not None


class Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(3, 4, 4), 0


def test_datasets_and_loaders_are_read_up_to_a_default_number_of_samples(no_warnings):
    assert probe_module.DEFAULT_NUM_SAMPLES == 256
    dataset = TensorDataset(torch.randn(300, 3, 4, 4), torch.randint(0, 5, (300,)))
    for probe in (dataset, DataLoader(dataset, batch_size=100), Endless()):
        with pytest.warns(UserWarning, match=r"more than 256 samples; using the first 256 \(pass num_samples="):
            assert len(as_probe(probe)) == 256
    assert len(as_probe(dataset, num_samples=300)) == 300  # asked for: no notice
    assert len(as_probe(DataLoader(TensorDataset(torch.randn(256, 3, 4, 4)), batch_size=64))) == 256  # all of it
    assert len(as_probe(torch.randn(300, 3, 4, 4))) == 300  # a tensor is used whole: the user chose it


def test_torch_compiled_model_is_measured_through_its_original_module():
    model, images = small_cnn(), _images()
    graphs = []

    def backend(graph, inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(model, backend=backend)
    compiled(images)
    compiled_before = len(graphs)
    eager = tm.measure(model, images, T.rot90())
    result = tm.measure(compiled, images, T.rot90())
    assert len(graphs) == compiled_before  # measuring compiled nothing
    assert result.layers == eager.layers
    for layer in eager.layers:
        np.testing.assert_array_equal(result.get("nvi", layer), eager.get("nvi", layer))
    compiled(images)
    assert len(graphs) == compiled_before  # and the compiled training is as it was: no recompile
    in_place = copy.deepcopy(model)
    in_place.compile(backend=backend)  # nn.Module.compile(): the module itself runs compiled
    in_place(images)
    compiled_before = len(graphs)
    result = tm.measure(in_place, images, T.rot90())
    assert len(graphs) == compiled_before and result.layers == eager.layers


def test_labels_add_accuracy_by_default_and_unused_labels_warn(tmp_path):
    model, images, labels = small_cnn(), _images(), torch.arange(8) % 5
    result = tm.measure(model, (images, labels), T.flips())
    assert result.groups == ["invariance", "same_equivariance"] and result.accuracy.shape == (len(T.flips()),)
    assert tm.measure(model, images, T.flips()).accuracy is None
    with pytest.warns(UserWarning, match=r"labels are unused.*\"accuracy\""):
        assert tm.measure(model, images, T.flips(), labels=labels, measures=("invariance",)).accuracy is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stratified uses them
        tm.measure(model, (images, labels // 3), T.flips(), measures=("invariance",), stratified=True)
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())  # no logits: the default accuracy is left out, with a notice
    with pytest.warns(UserWarning, match="not measuring accuracy"):
        assert tm.measure(features, (images, labels), T.flips()).accuracy is None
    with tm.Monitor(model, (images, labels), T.flips(), logdir=tmp_path / "run", every=1) as monitor:
        assert monitor.step(0).accuracy.shape == (len(T.flips()),)


def _digits(n: int = 64) -> torch.Tensor:
    """scikit-learn's real handwritten digits (8×8, ink up to the border), upsampled to 32×32 in [0, 1]."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 16
    return torch.nn.functional.interpolate(images, size=32, mode="bilinear", align_corners=False)


def test_border_padding_warns_when_the_probe_has_content_at_its_border():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    digits = _digits()
    with pytest.warns(UserWarning, match=r"content at their border .* padding='zeros'"):
        tm.measure(model, digits, tm.transforms.rotations(8), measures=("invariance",))
    framed = torch.nn.functional.pad(digits[..., 4:-4, 4:-4], (4, 4, 4, 4))  # the same digits on a blank margin
    quiet = [
        (digits, tm.transforms.rotations(8, padding="zeros")),  # the advice taken
        (digits, tm.transforms.rot90()),  # a pixel permutation: nothing is padded
        (digits, tm.transforms.brightness([0.0, 0.1])),
        (framed, tm.transforms.rotations(8)),  # nothing at the border to smear
    ]
    for probe, transformations in quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            tm.measure(model, probe, transformations, measures=("invariance",))
