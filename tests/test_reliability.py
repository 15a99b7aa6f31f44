"""measure() leaves training exactly as it was, explains bad input, and never syncs with the device mid-way."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import transforms as T
from tm_tensorboard.engine import Measurement
from tm_tensorboard.probe import as_probe
from tm_tensorboard.statistics import AccuracyState
from models import small_cnn


def _snapshot(model):
    return {
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "random_rng": random.getstate(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def _assert_same(before, after):
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])
    assert before["random_rng"] == after["random_rng"]
    assert before["grad_enabled"] == after["grad_enabled"]


def _training_model():
    model = small_cnn()
    model.train()
    model[4].eval()  # a mix of modes must come back as it was
    model[0].weight.requires_grad_(False)
    # make BatchNorm stats non-trivial, as after some training
    model(torch.randn(8, 3, 8, 8))
    return model


def test_state_identical_after_measure():
    from torch.utils.data import DataLoader, TensorDataset

    model = _training_model()
    loader = DataLoader(TensorDataset(torch.randn(20, 3, 8, 8), torch.randint(0, 5, (20,))), batch_size=4, shuffle=True)
    before = _snapshot(model)
    tm.measure(model, loader, T.rotations(4), measures=("invariance", "same_equivariance", "accuracy"), num_samples=12)
    _assert_same(before, _snapshot(model))


def test_state_identical_when_measure_raises():
    model = _training_model()

    class Boom(nn.Module):
        calls = 0

        def forward(self, x):
            Boom.calls += 1
            if Boom.calls == 2:
                raise RuntimeError("boom in the second chunk")
            return x

    model.add_module("boom", Boom())
    model.train()
    probe = torch.randn(6, 3, 8, 8)
    before = _snapshot(model)
    hooks_before = [len(m._forward_hooks) for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        tm.measure(model, probe, T.rotations(3), batch_size=3)
    _assert_same(before, _snapshot(model))
    assert [len(m._forward_hooks) for m in model.modules()] == hooks_before  # hooks removed


def test_grad_mode_restored_inside_no_grad():
    model = small_cnn()
    with torch.no_grad():
        tm.measure(model, torch.randn(4, 3, 8, 8), T.rotations(2))
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(layers=["conv9"]), ValueError, r"conv9.*valid module names: .*0, 1, 2"),
        (dict(layers="features.*"), ValueError, r"features\.\*"),
        (dict(probe=torch.randn(1, 3, 8, 8)), ValueError, "at least 2"),
        (dict(transformations=T.rotations([45])), ValueError, "at least 2"),
        # (the first batch: the discovery pass that finds the BatchNorm to leave out, one sample × 2 rotations)
        (dict(probe=torch.randn(4, 5, 8, 8)), ValueError, r"could not run on the transformed probe batch of shape \[2, 5, 8, 8\]"),
        (dict(probe=torch.randn(4, 5, 8, 8), dedupe_batchnorm=False), ValueError,
         r"could not run on the transformed probe batch of shape \[8, 5, 8, 8\]"),
        (dict(probe=torch.randn(4, 192)), ValueError, r"\[N, C, H, W\]"),
        (dict(probe=torch.randn(4, 3, 8, 10), transformations=T.rot90()), ValueError, "square"),
        (dict(labels=torch.tensor([0, 1, 2])), ValueError, "one class index per sample.*4 samples"),
        (dict(labels=torch.tensor([0.5, 1, 2, 1])), ValueError, "integer class indices"),
        (dict(measures=("invariance", "equivariance")), ValueError, "'equivariance'.*allowed: invariance"),
        (dict(measures=("accuracy",)), ValueError, "needs labels"),
        (dict(stratified=True), ValueError, "needs labels"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(transformations=[0, 90]), TypeError, "TransformationSet"),
        (dict(probe="images/"), TypeError, "probe must be"),
    ],
)
def test_bad_input_errors(kwargs, error, pattern):
    args = dict(model=small_cnn(), probe=torch.randn(4, 3, 8, 8), transformations=T.rotations(2))
    args.update(kwargs)
    model, probe, tset = args.pop("model"), args.pop("probe"), args.pop("transformations")
    with pytest.raises(error, match=pattern):
        tm.measure(model, probe, tset, **args)


def test_layer_selection_by_name_glob_and_type():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    probe = torch.randn(4, 3, 9, 9)
    tset = T.rotations(2)
    assert tm.measure(model, probe, tset, layers="features.*").layers == [f"features.{i}" for i in range(4)]
    assert tm.measure(model, probe, tset, layers=nn.Conv2d).layers == ["features.0", "features.2"]
    assert tm.measure(model, probe, tset, layers=["pool", "features.1"]).layers == ["features.1", "pool"]
    assert tm.measure(model, probe, tset, layers="features").layers == ["features"]  # a container is fine too


def test_tuple_outputs_are_measured_on_their_first_tensor_and_other_tuples_refused():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class NoneFirst(nn.Module):
        def forward(self, x):
            return None, x

    class Net(nn.Module):
        def __init__(self, second):
            super().__init__()
            self.conv, self.pair = nn.Conv2d(3, 2, 3), second()

        def forward(self, x):
            out = self.pair(self.conv(x))
            return out[0] if out[0] is not None else out[1]

    probe = torch.randn(3, 3, 6, 6)
    result = tm.measure(Net(Pair), probe, T.rotations(2, padding="zeros"))
    assert result.layers == ["conv", "pair"]
    np.testing.assert_array_equal(result.get("nvi", "pair"), result.get("nvi", "conv"))  # the first tensor
    assert tm.measure(Net(NoneFirst), probe, T.rotations(2, padding="zeros")).layers == ["conv"]  # default: skipped
    with pytest.raises(ValueError, match="'pair'.*tuple"):
        tm.measure(Net(NoneFirst), probe, T.rotations(2, padding="zeros"), layers=["pair"])


@pytest.mark.usefixtures("kernels")
def test_nan_activations_give_nan_and_a_warning():
    model = small_cnn()
    with torch.no_grad():
        model[9].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN.*'?9"):
        result = tm.measure(model, torch.randn(5, 3, 8, 8), T.rotations(3))
    assert np.isnan(result.get("nvi", "9")[0])
    assert np.isfinite(result.get("nvi", "9")[1:]).all()
    assert np.isfinite(result.get("nvi", "3")).all()


def test_stratified_needs_two_samples_per_class():
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        tm.measure(small_cnn(), (torch.randn(5, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2])), T.rotations(2), stratified=True)


def test_host_transfers_once_per_layer_and_no_item_calls(monkeypatch):
    """The only device-to-host copies are the final ones: one per measured layer, one for accuracy, one for the
    scales of the BatchNorms derived from their inputs."""
    counts = {"cpu": 0, "item": 0, "numpy": 0, "to_cpu": 0}
    original_cpu, original_item, original_to = torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.to

    def cpu(self, *a, **k):
        counts["cpu"] += 1
        return original_cpu(self, *a, **k)

    def item(self):
        counts["item"] += 1
        return original_item(self)

    def to(self, *a, **k):
        target = a[0] if a else k.get("device")
        if self.device.type != "cpu" and str(target).startswith("cpu"):
            counts["to_cpu"] += 1
        return original_to(self, *a, **k)

    model = small_cnn()
    probe = as_probe(torch.randn(9, 3, 8, 8), labels=torch.randint(0, 5, (9,)))
    session = Measurement(model, T.rotations(3), measures=("invariance", "same_equivariance", "accuracy"), batch_size=2)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "to", to)
    result = session.run(probe)
    assert counts["item"] == 0 and counts["to_cpu"] == 0
    assert result.derived == {"4": "3"}
    assert counts["cpu"] == len(result.layers) - len(result.derived) + 2


def test_streaming_runs_on_the_meta_device():
    """Every state tensor lives on the model's device: nothing is created on the host mid-way."""
    model = small_cnn().to("meta")
    probe = as_probe(torch.randn(6, 3, 8, 8), labels=torch.randint(0, 5, (6,))).to("meta")
    groups = ("invariance", "same_equivariance", "equivariance_error", "goodfellow", "anova", "accuracy")
    session = Measurement(model, T.rotations(3), measures=groups, batch_size=4, stratified=True, noise_floor=True)
    observers, accuracy = {}, AccuracyState(3, torch.device("meta"))
    for phase in session.phases:
        session.stream(probe, [0, 1, 2, 3, 4], phase, observers, accuracy)
        for observer in observers.values():
            for m in observer.measures.values():
                m.finish(phase)
    assert session.phases == ["thresholds", "global", "transformed"]
    assert accuracy.correct.device.type == "meta"
    assert "input" in observers and len(observers["3"].measures) == 5
    for observer in observers.values():
        for m in observer.measures.values():
            for phase in m.phases:
                for states in m.states(phase):
                    assert all(t.device.type == "meta" for state in states for t in state.tensors())
