"""Eval-mode BatchNorms measured from their inputs' states (``derived.py``): in the result like any layer, equal
to measuring their outputs (float64 models, whose outputs round at ~1e-16), without a hook on them."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import transforms as T
from tm_tensorboard.engine import Measurement
from tm_tensorboard.examples.models import P4BatchNorm2d
from tm_tensorboard.probe import as_probe
from models import randomize_batchnorm


class _Chains(nn.Module):
    """A BatchNorm of a convolution, a BatchNorm of that BatchNorm, and one BatchNorm module called on two
    convolutions' outputs (``shared``, ``shared#2``), negative γ among them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.bn_of_bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.left = nn.Conv2d(6, 4, 3, padding=1)
        self.right = nn.Conv2d(6, 4, 1)
        self.shared = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y = self.relu(self.bn_of_bn(self.bn(self.conv(x))))
        z = self.shared(self.left(y)) + self.shared(self.right(y))
        return self.head(self.pool(z).flatten(1))


DERIVED = {"bn": "conv", "bn_of_bn": "bn", "shared": "left", "shared#2": "right"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _Chains().double().eval()
    randomize_batchnorm(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight[::2] *= -1
    return model


def _probe(n: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, 10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _assert_same(derived: tm.MeasureResult, measured: tm.MeasureResult, labels=(None,)) -> int:
    """Every measure of every layer of ``derived`` equals ``measured``'s: per element, per channel, the layer
    means and their standard errors; the number of values compared."""
    compared = 0
    for measure in derived.measures:
        for layer in derived.layers_of(measure):
            for label in labels:
                for per in ("element", "channel"):
                    a, b = derived.get(measure, layer, per=per, label=label), measured.get(measure, layer, per=per,
                                                                                         label=label)
                    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f"{measure} {layer} {per}")
                    np.testing.assert_array_equal(derived.dead(measure, layer, per, label),
                                                  measured.dead(measure, layer, per, label))
                    compared += a.size
                np.testing.assert_allclose(derived.layer_mean(measure, layer, label=label),
                                           measured.layer_mean(measure, layer, label=label), rtol=1e-9)
                if derived.has_error_bars(measure):
                    for per in ("layer", "channel"):
                        np.testing.assert_allclose(derived.stderr(measure, layer, per=per, label=label),
                                                   measured.stderr(measure, layer, per=per, label=label),
                                                   rtol=1e-7, atol=1e-13, err_msg=f"stderr {measure} {layer}")
    return compared


def test_derived_batchnorms_equal_their_measured_outputs_in_every_measure():
    """Invariance, same-equivariance, the per-transformation errors, ANOVA, the equivariance error and a Lie
    derivative, with error bars (2 shards of 16): the default derives the four BatchNorm calls, which
    dedupe_batchnorm=False measures, and the results hold the same layers in the same order and values."""
    model, probe, tset = _model(), _probe(), T.rotations(5)
    measures = ("invariance", "same_equivariance", "per_transformation", "anova", "equivariance_error",
                "lie_rotation")
    keywords = dict(measures=measures, batch_size=8, error_bars=True, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the probe's border content
        derived = tm.measure(model, probe, tset, **keywords)
        measured = tm.measure(model, probe, tset, dedupe_batchnorm=False, **keywords)
    assert derived.derived == DERIVED and measured.derived == {}
    assert derived.layers == measured.layers == ["conv", "bn", "bn_of_bn", "relu", "left", "shared", "right",
                                                 "shared#2", "pool", "head"]
    assert [derived.layer_info(name).index for name in derived.layers] == list(range(10))
    assert derived.layer_info("bn").module_type == "BatchNorm2d"
    assert derived.shards == 2 and derived.has_error_bars("nvi")
    assert _assert_same(derived, measured) > 1000
    # the BatchNorms scale their inputs' TV: the comparison is not of a layer with itself
    assert not np.allclose(derived.get("tvi", "bn", per="element"), derived.get("tvi", "conv", per="element"))


def test_derived_batchnorms_are_not_hooked_and_hold_per_class_values():
    """The measurement's forward observes the convolutions only; stratified results (two classes) derive
    each class's values."""
    model, probe, tset = _model(), _probe(), T.rot90()
    labels = torch.arange(32) % 2
    measurement = Measurement(model, tset, measures=("invariance",), stratified=True, error_bars=False)
    measured_layers = [info.name for info in measurement.discover(as_probe(probe, labels=labels))]
    assert measured_layers == ["conv", "relu", "left", "right", "pool", "head"]
    derived = measurement.run(as_probe(probe, labels=labels))
    measured = tm.measure(model, probe, tset, labels=labels, measures=("invariance",), stratified=True,
                          error_bars=False, dedupe_batchnorm=False)
    assert derived.derived == DERIVED and derived.layers == measured.layers
    _assert_same(derived, measured, labels=(None, 0, 1))


def test_a_constant_batchnorm_channel_is_dead_and_not_rejected():
    """γ = 0 makes a channel constant: its TV and SV are exactly 0, so its nvi is dead (0 / 0), as the
    BatchNorm's output says up to its rounding, and ANOVA finds no effect (F = 0, not rejected)."""
    model, probe = _model(), _probe()
    with torch.no_grad():
        model.bn.weight[1] = 0.0
    keywords = dict(measures=("invariance", "anova"), batch_size=8, error_bars=False)
    derived = tm.measure(model, probe, T.rot90(), **keywords)
    measured = tm.measure(model, probe, T.rot90(), dedupe_batchnorm=False, **keywords)
    assert derived.get("tvi", "bn")[1] == 0.0 and derived.get("svi", "bn")[1] == 0.0
    assert derived.dead("nvi", "bn")[1] and derived.dead("nvi", "bn_of_bn")[1]
    assert derived.get("anova_f", "bn", per="element")[1].max() == 0.0 and derived.get("anova", "bn")[1] == 0.0
    assert abs(measured.get("tvi", "bn")[1]) < 1e-12  # the measured constant: rounding of its mean at most
    others = [c for c in range(6) if c != 1]
    np.testing.assert_allclose(derived.get("nvi", "bn")[others], measured.get("nvi", "bn")[others], rtol=1e-9)


class _TokensThenBatchNorm(nn.Module):
    """A Linear on [B, 3, 100] rows is a token layer (channels last, 8 of them); the BatchNorm1d after it
    reads the same [B, 3, 8] output channels first (3 of them): its per-channel values are not the Linear's."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(100, 8)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.norm(self.linear(x.flatten(2)))


def test_a_batchnorm_that_reads_its_input_otherwise_is_measured():
    torch.manual_seed(0)
    model = _TokensThenBatchNorm().double().eval()
    randomize_batchnorm(model)
    result = tm.measure(model, _probe(8), T.rot90(), measures=("invariance",), error_bars=False)
    assert result.layers == ["linear", "norm"] and result.derived == {}
    assert result.get("nvi", "norm").shape == (3,) and result.get("nvi", "linear").shape == (8,)


def test_a_monitor_logs_the_derived_batchnorms(tmp_path):
    model, probe = _model(), _probe(16)
    with tm.Monitor(model, probe, T.rot90(), logdir=tmp_path, every=1, error_bars=False) as monitor:
        assert [info.name for info in monitor.layers] == ["conv", "bn", "bn_of_bn", "relu", "left", "shared",
                                                          "right", "shared#2", "pool", "head"]
        monitor.step(0)
    (run,) = tm.read(tmp_path).values()
    assert run.layers("nvi") == [info.name for info in monitor.layers]
    assert [layer["name"] for layer in run.config["layers"]] == run.layers("nvi")


@pytest.mark.parametrize("positions", [None, 16])
def test_derived_batchnorms_under_sampled_positions_use_their_inputs(positions):
    """With positions=K a derived BatchNorm's per-channel values are its output's at its input's sampled
    positions: equal to its input's nvi per channel, and its TV scaled by |γ| / σ."""
    model, probe = _model(), _probe(16)
    result = tm.measure(model, probe, T.rot90(), measures=("invariance",), positions=positions, error_bars=False)
    assert result.layer_info("bn").positions == result.layer_info("conv").positions
    np.testing.assert_allclose(result.get("nvi", "bn"), result.get("nvi", "conv"), rtol=1e-9)
    scale = (model.bn.weight.abs() / torch.sqrt(model.bn.running_var + model.bn.eps)).detach().numpy()
    np.testing.assert_allclose(result.get("tvi", "bn"), result.get("tvi", "conv") * scale, rtol=1e-12)


def test_a_batchnorm_subclass_with_its_own_forward_is_measured():
    """P4BatchNorm2d shares one (γ, σ) pair among a filter's 4 orientation channels through a forward of its
    own: which channel each pair scales is the subclass's to say, so it is measured, not derived."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), P4BatchNorm2d(2), nn.BatchNorm2d(8)).double().eval()
    randomize_batchnorm(model)
    result = tm.measure(model, _probe(8), T.rot90(), measures=("invariance",), error_bars=False)
    assert result.layers == ["0", "1", "2"] and result.derived == {"2": "1"}


def _held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the numpy arrays reachable from ``obj`` through containers and the package's objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_held_bytes(v, seen) for v in obj)
    if type(obj).__module__.startswith("tm_tensorboard"):
        return _held_bytes(vars(obj), seen)
    return 0


def test_a_result_holds_no_values_of_its_derived_batchnorms():
    """Their values are made from their inputs' when read: the result holds what measuring the other layers
    holds, plus |s| (a few floats per channel), against the BatchNorms' own values when measured."""
    model, probe = _model(), _probe()
    keywords = dict(measures=("invariance", "same_equivariance"), batch_size=8)
    derived = tm.measure(model, probe, T.rot90(), **keywords)
    measured = tm.measure(model, probe, T.rot90(), dedupe_batchnorm=False, **keywords)
    batchnorms = sum(_held_bytes(measured._components[g][layer]) + _held_bytes(measured._shards[g][layer])
                     for g in measured.groups for layer in DERIVED)
    assert batchnorms > 10_000
    assert _held_bytes(derived) <= _held_bytes(measured) - batchnorms + 4 * 6 * 8
