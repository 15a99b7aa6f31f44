"""Memory: the states' bytes known before the first chunk, a budget checked before any forward but the
discovery pass, grouped passes that equal one pass, float32 states within their error bound, and the
eval-mode BatchNorms that measure nothing new."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import transforms as T
from tm_tensorboard.engine import Measurement, estimate_memory
from tm_tensorboard.examples.models import ResNet50, SimpleCNN
from tm_tensorboard.layer_measures import GROUPS, LayerMeasure
from tm_tensorboard.memory import format_bytes, parse_bytes
from tm_tensorboard.positions import AUTO_POSITIONS
from tm_tensorboard.probe import as_probe
from tm_tensorboard.statistics import StreamingState
from models import randomize_batchnorm, small_cnn

# uniform-noise probes reach the border that rotations with padding="border" (tmeasures' default) smear
pytestmark = pytest.mark.filterwarnings("ignore:tm_tensorboard. the probe's images have content at their border")


def _images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _state_tensors(root: object) -> list[torch.Tensor]:
    """Every tensor of every StreamingState reachable from ``root`` through attributes, lists and dicts."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(value: object, in_state: bool) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if in_state:
                found[id(value)] = value
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, in_state)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item, in_state)
        elif hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)):
            for item in vars(value).values():
                walk(item, in_state or isinstance(value, StreamingState))

    walk(root, False)
    return list(found.values())


@pytest.fixture
def allocated(monkeypatch) -> dict[str, int]:
    """{layer: bytes of its measures' state tensors} at their peak: each measure's once its whole probe's
    states are made (with error bars, while every shard's are still held)."""
    found: dict[str, dict[str, int]] = {}
    final_states = LayerMeasure.final_states

    def spy(self, *args, **kwargs):
        states = final_states(self, *args, **kwargs)
        found.setdefault(self.info.name, {})[self.group] = sum(t.nbytes for t in _state_tensors(self))
        return states

    monkeypatch.setattr(LayerMeasure, "final_states", spy)
    return found


def test_parse_bytes():
    assert parse_bytes(1234) == 1234
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5gib") == 3 * 2**29
    assert parse_bytes("10kB") == 10_000
    for bad in ("4 parsecs", "GB", "-1GB", 0, 2.5, True, None):
        with pytest.raises(ValueError, match="memory_budget must be"):
            parse_bytes(bad)
    assert format_bytes(16_900_000_000) == "16.9 GB" and format_bytes(12) == "12 B"


CASES = {
    "default, error bars": dict(measures=None, noise_floor=True, error_bars=True),
    "every group, stratified": dict(
        measures=("invariance", "same_equivariance", "equivariance_error", "per_transformation", "goodfellow",
                  "anova", "lie_rotation"),
        stratified=True, error_bars=False,
    ),
    "float32 states": dict(state_dtype=torch.float32),
}


@pytest.mark.parametrize("case", CASES)
def test_estimate_equals_the_allocated_state_bytes(case, allocated):
    """The estimate (meta-device states from the discovered layers, before any chunk) equals, layer by
    layer, the bytes of the state tensors a measurement then holds at its peak, error-bar totals included
    (finalizing eagerly: where the CPU kernels finalize, one set fewer, next test)."""
    keywords = CASES[case]
    images, labels = _images(36), torch.arange(36) % 3  # 36 samples: two error-bar shards
    model, tset = small_cnn(), T.rotations(4)
    report = estimate_memory(model, images, tset, labels=labels, batch_size=8, **keywords)
    tm.measure(model, (images, labels), tset, batch_size=8, compile=False, **keywords)
    assert [layer.name for layer in report.layers] == list(allocated)
    assert {layer.name: layer.state_bytes for layer in report.layers} == {
        name: sum(groups.values()) for name, groups in allocated.items()}
    assert report.state_bytes == sum(sum(groups.values()) for groups in allocated.values()) > 0
    # error bars (True, or by default: these states are small) take 2 shards here, 3 sets of states
    assert report.shards == (1 if keywords.get("error_bars") is False else 2)
    if "state_dtype" in keywords:  # float32 states: half the float64 bytes (the int64 counts stay)
        doubled = estimate_memory(model, images, tset, labels=labels, batch_size=8)
        assert report.state_bytes == pytest.approx(doubled.state_bytes / 2, rel=0.02)


def test_where_the_kernels_finalize_error_bars_take_one_set_of_states_fewer_than_estimated(allocated, monkeypatch):
    """The estimate counts K + 1 sets of states for the groups with error bars: the bound. Where the
    replicates' CPU kernels finalize (invariance and same-equivariance here), the whole probe's states take
    shard 0's memory: K sets, the estimate less one set of those groups' states, layer by layer."""
    monkeypatch.setenv("TM_TENSORBOARD_NATIVE", "1")
    images = _images(48)  # three error-bar shards
    model, tset = small_cnn(), T.rotations(4)
    report = estimate_memory(model, images, tset, batch_size=8, error_bars=True)
    tm.measure(model, images, tset, batch_size=8, error_bars=True, compile=True)
    assert report.shards == 3
    for layer in report.layers:
        held = allocated[layer.name]
        assert set(held) == set(layer.by_group) and "invariance" in held
        for group, estimated in layer.by_group.items():
            assert held[group] == estimated // (report.shards + 1) * report.shards, (layer.name, group)


def test_report_reads_as_a_table():
    report = estimate_memory(small_cnn(), _images(8), T.rotations(4), measures=("invariance",), error_bars=False)
    text = str(report)
    assert text.splitlines()[0].split() == ["layer", "type", "output", "states"]
    # layer "3" is a Conv2d with [8, 6, 6] outputs: (2·T + 1) · 288 float64 values and two int64 counts
    assert report.layers[3].state_bytes == (2 * 4 + 1) * 288 * 8 + 2 * 8
    assert "3      Conv2d             8×6×6" in text and format_bytes(report.total_bytes) in text
    assert report.largest(1)[0].state_bytes == max(layer.state_bytes for layer in report.layers)


def test_a_model_built_on_the_meta_device_is_estimated_without_weights():
    """A model too big to build can be sized: built under torch.device("meta"), with a meta probe."""
    torch.manual_seed(0)
    real = ResNet50(3, 10, width=0.125)
    with torch.device("meta"):
        meta = ResNet50(3, 10, width=0.125)
    tset = T.rotations(16)
    expected = estimate_memory(real, _images(40, size=32), tset, batch_size=4, dedupe_batchnorm=True)
    sized = estimate_memory(meta, torch.empty(40, 3, 32, 32, device="meta"), tset, batch_size=4,
                            dedupe_batchnorm=True)
    assert sized.layers == expected.layers and len(sized.layers) == 105
    assert (sized.state_bytes, sized.working_bytes) == (expected.state_bytes, expected.working_bytes)


def _count_forwards(model: nn.Module) -> list[int]:
    """Rows of every forward call of ``model``, recorded by a forward pre-hook."""
    rows: list[int] = []
    model.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[0]))
    return rows


def test_a_budget_too_small_fails_after_the_discovery_pass_only(tmp_path):
    torch.manual_seed(0)
    model = ResNet50(3, 10, width=0.125)
    images, tset = _images(20, size=32), T.rotations(4)
    report = estimate_memory(model, images, tset, batch_size=4)
    largest = report.largest(3)
    budget = report.working_bytes + largest[0].state_bytes // 2
    forwards = _count_forwards(model)
    with pytest.raises(ValueError) as caught:
        tm.measure(model, images, tset, batch_size=4, memory_budget=budget, state_dtype=torch.float64)
    assert forwards == [len(tset)]  # the one-sample discovery pass, nothing else
    message = str(caught.value)
    assert f"memory_budget={format_bytes(budget)} is too small" in message
    for layer in largest:
        shape = list(layer.unit_shape)
        assert f"{layer.name} ({layer.module_type} {shape}) {format_bytes(layer.state_bytes)}" in message
    assert f"All 105 layers: {format_bytes(report.state_bytes)} of states" in message  # BatchNorms left out
    for advice in ("layers=", "state_dtype=torch.float32", "measures=('invariance',)", "batch_size"):
        assert advice in message
    forwards.clear()
    with pytest.raises(ValueError, match="is too small"):  # the Monitor says so when made, before any step
        tm.Monitor(model, images, tset, logdir=tmp_path / "run", batch_size=4, memory_budget=budget, compile=False,
                   state_dtype=torch.float64)
    assert forwards == [len(tset)]
    with pytest.raises(ValueError, match="is too small"):
        estimate_memory(model, images, tset, batch_size=4, memory_budget=budget, state_dtype=torch.float64).passes()


def _live_state_bytes() -> int:
    return sum(t.nbytes for o in gc.get_objects() if isinstance(o, StreamingState) for t in (*o.tensors(), o.count))


@pytest.mark.usefixtures("kernels")
def test_grouped_passes_equal_one_pass(monkeypatch):
    """Under a budget that holds about a third of the states, the layers take several passes over the probe,
    one pass's states in memory at a time, within the budget, and every number equals the one-pass
    measurement's exactly."""
    torch.manual_seed(0)
    model = small_cnn()
    images, labels = _images(40), torch.arange(40) % 3
    tset = T.rotations(3)
    keywords = dict(measures=("invariance", "same_equivariance", "goodfellow", "accuracy"), stratified=True,
                    noise_floor=True, batch_size=8, error_bars=True, state_dtype=torch.float64)
    whole = estimate_memory(model, images, tset, labels=labels, **keywords)
    budget = whole.working_bytes + whole.state_bytes // 3
    report = estimate_memory(model, images, tset, labels=labels, memory_budget=budget, **keywords)
    passes = report.passes()
    assert len(passes) >= 3 and sorted(sum(passes, [])) == sorted(layer.name for layer in report.layers)
    sizes = {layer.name: layer.state_bytes for layer in report.layers}
    assert all(sum(sizes[name] for name in names) + report.working_bytes <= budget for names in passes)

    forwards = _count_forwards(model)
    one = tm.measure(model, (images, labels), tset, **keywords)
    single_forwards = len(forwards)
    forwards.clear()
    live: list[tuple[int, int]] = []  # states alive (bytes) when each pass starts and when it ends
    stream_phases = Measurement._stream_phases

    def spy(self, *args):
        before = _live_state_bytes()
        streamed = stream_phases(self, *args)
        live.append((before, _live_state_bytes()))
        return streamed

    monkeypatch.setattr(Measurement, "_stream_phases", spy)
    gc.collect()
    with pytest.warns(UserWarning, match=f"measuring in {len(passes)} passes over the probe"):
        grouped = tm.measure(model, (images, labels), tset, memory_budget=budget, **keywords)
    assert len(forwards) == 1 + len(passes) * single_forwards  # discovery, then every pass over the probe
    assert [before for before, _ in live] == [0] * len(passes)
    # streamed: K sets of the states with error bars (the whole probe's, the K + 1st, come when finalizing)
    streamed = {layer.name: sum(b // (report.shards + 1) * report.shards if GROUPS[g].shardable else b
                                for g, b in layer.by_group.items()) for layer in report.layers}
    assert [after for _, after in live] == [sum(streamed[name] for name in names) for names in passes]
    assert grouped.layers == one.layers and grouped.shards == one.shards == 2
    assert [grouped.layer_info(n) for n in one.layers] == [one.layer_info(n) for n in one.layers]
    np.testing.assert_array_equal(grouped.accuracy, one.accuracy)
    for measure in ("tvi", "svi", "nvi", "tvse", "svse", "nvse", "gf"):
        for layer in one.layers_of(measure):
            for label in (None, 0, 2):
                np.testing.assert_array_equal(grouped.get(measure, layer, per="element", label=label),
                                              one.get(measure, layer, per="element", label=label), err_msg=layer)
    for measure in ("nvi", "nvse"):  # (goodfellow has no error bars)
        np.testing.assert_array_equal(list(grouped.layer_stderrs(measure).values()),
                                      list(one.layer_stderrs(measure).values()))


def test_monitor_measures_in_passes_under_a_budget(tmp_path):
    torch.manual_seed(0)
    model, images, tset = small_cnn(), _images(16), T.rotations(3, padding="zeros")
    whole = estimate_memory(model, images, tset, batch_size=8)
    budget = whole.working_bytes + whole.state_bytes // 2
    with pytest.warns(UserWarning, match="passes over the probe"):
        monitor = tm.Monitor(model, images, tset, logdir=tmp_path / "run", every=1, batch_size=8,
                             memory_budget=budget, compile=False, state_dtype=torch.float64)
    with monitor:
        logged = monitor.step(0)
    expected = tm.measure(model, images, tset, batch_size=8, compile=False)
    for layer in expected.layers:
        np.testing.assert_array_equal(logged.get("nvi", layer), expected.get("nvi", layer))
    assert tm.read(tmp_path)["run"].layers("nvi") == expected.layers


# The relative error of float32 states against float64 ones on the reference case (live units), stated in
# statistics.py. Measured at N = 256, batch 16, T = 16, invariance and same-equivariance: 4.7e-7 (eager) and
# 4.7e-6 (compiled: its float64 states also sum each chunk in float64) per element, 3.2e-7 per channel.
FLOAT32_BOUND = {"element": 1e-5, "channel": 1e-6}


@pytest.mark.usefixtures("kernels")
def test_float32_states_stay_within_the_stated_error():
    """The reference case (SimpleCNN at 32 px, rotations(16)), chunks merged by Chan's formula in float32."""
    torch.manual_seed(0)
    model = SimpleCNN(3, 10)
    images, tset = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(1)), T.rotations(16)
    keywords = dict(measures=("invariance",), batch_size=4, error_bars=False)  # 8 chunks merged
    exact = tm.measure(model, images, tset, **keywords)
    single = tm.measure(model, images, tset, state_dtype=torch.float32, **keywords)
    assert single.get("nvi", "features.0", per="element").dtype == np.float64  # results stay float64
    worst = {"element": 0.0, "channel": 0.0}
    for layer in exact.layers:
        for measure in ("tvi", "svi", "nvi"):
            for per in worst:
                x, y = exact.get(measure, layer, per=per), single.get(measure, layer, per=per)
                live = np.isfinite(x) & (x != 0)
                np.testing.assert_array_equal(y[~live], x[~live])  # dead units stay exactly dead
                worst[per] = max(worst[per], float((np.abs(y[live] - x[live]) / np.abs(x[live])).max()))
    assert worst["element"] < FLOAT32_BOUND["element"] and worst["channel"] < FLOAT32_BOUND["channel"], worst
    assert worst["element"] > 0  # float32 states do round: the comparison sees them


# ------------------------------------------------------------------------------------ BatchNorm dedupe


def _batchnorm_inputs(model: ResNet50) -> dict[str, str]:
    """Each BatchNorm of the ResNet-50 and the convolution whose output it normalizes."""
    pairs = {"stem.1": "stem.0"}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and name != "stem.1":
            parent, child = name.rsplit(".", 1)
            pairs[name] = f"{parent}.0" if child == "1" else f"{parent}.conv{child[-1]}"
    return pairs


def test_eval_batchnorm_has_its_inputs_nvi_and_is_derived_from_it():
    """Random running statistics and affine parameters, a third of the γ negative: every BatchNorm's
    per-element nvi equals its convolution's, and by default (as with dedupe_batchnorm=True) all 53 are left
    out of the forward's 158 observed layers and derived from their convolutions' (``derived.py``: the same
    158 layers and values in the result); dedupe_batchnorm=False measures them."""
    torch.manual_seed(0)
    model = ResNet50(3, 10, width=0.125).double()
    randomize_batchnorm(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight[::3] *= -1
    images, tset = _images(6, size=32).double(), T.rot90()
    pairs = _batchnorm_inputs(model)
    assert len(pairs) == 53
    keywords = dict(measures=("invariance",), batch_size=3, error_bars=False)
    full = tm.measure(model, images, tset, dedupe_batchnorm=False, **keywords)
    assert len(full.layers) == 158 and set(pairs) <= set(full.layers)
    for bn, conv in pairs.items():
        for per in ("element", "channel"):
            np.testing.assert_allclose(full.get("nvi", bn, per=per), full.get("nvi", conv, per=per), rtol=1e-9,
                                       atol=1e-12, err_msg=bn)
        scale = full.get("tvi", bn, per="element") / full.get("tvi", conv, per="element")
        assert np.nanstd(scale) > 0.1  # not the identity: the BatchNorm scales each channel by its own |γ|/σ
    deduped = tm.measure(model, images, tset, **keywords)  # the default
    assert deduped.layers == full.layers and deduped.derived == pairs and full.derived == {}
    measurement = Measurement(model, tset, measures=("invariance",), batch_size=3, error_bars=False)
    assert [info.name for info in measurement.discover(as_probe(images))] == [
        name for name in full.layers if name not in pairs]  # 105 layers observed
    assert tm.measure(model, images, tset, dedupe_batchnorm=True, **keywords).derived == pairs
    for layer in deduped.layers:
        if layer in pairs:
            for measure in ("tvi", "svi", "nvi"):
                np.testing.assert_allclose(deduped.get(measure, layer, per="element"),
                                           full.get(measure, layer, per="element"), rtol=1e-9, err_msg=layer)
        else:
            np.testing.assert_array_equal(deduped.get("nvi", layer), full.get("nvi", layer))
    assert [deduped.layer_info(name).index for name in deduped.layers] == list(range(158))
    explicit = tm.measure(model, images, tset, layers=["stem.0", "stem.1"], **keywords)  # on request
    assert explicit.layers == ["stem.0", "stem.1"]
    with pytest.raises(ValueError, match="dedupe_batchnorm=True thins the default layer selection"):
        tm.measure(model, images, tset, layers=["stem.0", "stem.1"], dedupe_batchnorm=True)


def test_dedupe_is_refused_where_a_batchnorm_measures_differ_from_its_inputs():
    """Goodfellow's firing rates with a negative γ, and maps moved back with zeros padding: both differ."""
    torch.manual_seed(0)
    model = small_cnn().double()  # layer "4" is a BatchNorm of the convolution "3"
    randomize_batchnorm(model)
    with torch.no_grad():
        model[4].weight[::2] *= -1
    images = _images(8).double()
    for measures, tset, name in ((("goodfellow",), T.rotations(5), "gf"),
                                 (("same_equivariance",), T.rotations(5, padding="zeros"), "nvse")):
        result = tm.measure(model, images, tset, measures=measures, error_bars=False)  # the default keeps "4"
        assert "4" in result.layers
        assert not np.allclose(result.get(name, "4", per="element"), result.get(name, "3", per="element"))
        with pytest.raises(ValueError, match="dedupe_batchnorm=True leaves out BatchNorms whose measures equal"):
            tm.measure(model, images, tset, measures=measures, dedupe_batchnorm=True)
    border = tm.measure(model, images, T.rotations(5), measures=("same_equivariance", "equivariance_error"),
                        error_bars=False, dedupe_batchnorm=False)
    for name in ("nvse", "ee"):  # with border padding they are equal, and the BatchNorm is derived
        np.testing.assert_allclose(border.get(name, "4", per="element"), border.get(name, "3", per="element"),
                                   rtol=1e-9)
    assert tm.measure(model, images, T.rotations(5), measures=("same_equivariance",),
                      dedupe_batchnorm=True).derived == {"4": "3"}
    assert tm.measure(model, images, T.rotations(5), measures=("same_equivariance",)).derived == {"4": "3"}


def test_a_batchnorm_under_a_grouped_feature_action_is_kept():
    """A cyclic shift of orientation channels mixes channels the BatchNorm scales differently: its
    equivariance error is not its convolution's, so neither the default nor dedupe_batchnorm=True derives it
    (the invariance measures alone still do), nor where the convolution alone has the shift."""
    torch.manual_seed(0)
    model = small_cnn().double()  # layer "4" is a BatchNorm of the convolution "3" (8 channels: 2 groups of 4)
    randomize_batchnorm(model)
    images = _images(8).double()
    shift = {"[34]": tm.actions.cyclic_shift(4)}  # on the convolution "3" and its BatchNorm
    for dedupe in (None, True):
        result = tm.measure(model, images, T.rot90(), measures=("invariance", "equivariance_error"), actions=shift,
                            error_bars=False, dedupe_batchnorm=dedupe)
        assert "4" in result.layers and result.derived == {}
        assert not np.allclose(result.get("ee", "4", per="element"), result.get("ee", "3", per="element"))
    assert tm.measure(model, images, T.rot90(), measures=("invariance",), actions=shift).derived == {"4": "3"}
    only = {"3": tm.actions.cyclic_shift(4)}  # the convolution's action alone: its BatchNorm's is the identity's
    result = tm.measure(model, images, T.rot90(), measures=("equivariance_error",), actions=only, error_bars=False)
    assert result.derived == {}
    assert not np.allclose(result.get("ee", "4", per="element"), result.get("ee", "3", per="element"))


class _Kept(nn.Module):
    """BatchNorms that are not an observed output's per-channel map: each one is kept."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.after_sum = nn.BatchNorm2d(4)  # fed conv + 1, computed outside any module
        self.after_inplace = nn.BatchNorm2d(4)  # fed the conv's output changed in place in forward()
        self.batch_statistics = nn.BatchNorm2d(4, track_running_stats=False)  # normalizes by the batch's
        self.plain = nn.BatchNorm2d(4)  # fed the conv's output as it is: left out

    def forward(self, x):
        y = self.conv(x)
        a = self.after_sum(y + 1)
        b = self.batch_statistics(y)
        c = self.plain(y)
        d = self.after_inplace(y.mul_(2))
        return a + b + c + d


def test_only_batchnorms_of_an_unaltered_observed_output_are_left_out():
    model = _Kept()
    result = tm.measure(model, _images(4), T.rot90(), measures=("invariance",), dedupe_batchnorm=True)
    assert result.layers == ["conv", "after_sum", "batch_statistics", "plain", "after_inplace"]
    assert result.derived == {"plain": "conv"}


def test_a_budget_is_met_with_float32_states_then_sampled_positions():
    """Under memory_budget the measurement fits one pass by itself, least lossy first: float32 states
    (state_dtype=None, the default), then the most sampled positions per channel of AUTO_POSITIONS
    (positions="auto"), saying what it chose; the numbers are those of asking for that choice."""
    torch.manual_seed(0)
    model, images, tset = small_cnn(), _images(12, size=16), T.rotations(4)
    kw = dict(measures=("invariance", "same_equivariance"), batch_size=4, error_bars=False, compile=False)
    f64 = estimate_memory(model, images, tset, state_dtype=torch.float64, **kw)
    f32 = estimate_memory(model, images, tset, state_dtype=torch.float32, **kw)
    assert f32.total_bytes < f64.total_bytes
    # no budget: float64, every position
    assert estimate_memory(model, images, tset, positions="auto", **kw).state_dtype == torch.float64
    budget = (f32.total_bytes + f64.total_bytes) // 2
    with pytest.warns(UserWarning, match=r"to fit memory_budget=.* measuring with float32 states \(within a relative"):
        chosen = estimate_memory(model, images, tset, memory_budget=budget, **kw)
    assert chosen.state_dtype == torch.float32 and chosen.total_bytes <= budget and len(chosen.passes()) == 1
    with pytest.warns(UserWarning, match="float32 states"):
        fitted = tm.measure(model, images, tset, memory_budget=budget, **kw)
    asked = tm.measure(model, images, tset, state_dtype=torch.float32, **kw)
    for layer in asked.layers:
        np.testing.assert_array_equal(fitted.get("nvi", layer), asked.get("nvi", layer))

    # sampled positions only with positions="auto", and the most of the ladder that fits
    budget = f32.working_bytes + f32.state_bytes // 3
    sizes = {k: estimate_memory(model, images, tset, state_dtype=torch.float32, positions=k, **kw).total_bytes
             for k in AUTO_POSITIONS}
    k = next(k for k in AUTO_POSITIONS if sizes[k] <= budget)
    assert k < 16 * 16
    with pytest.warns(UserWarning, match=rf"float32 states .* and positions={k} sampled per channel on the 2 layers"):
        fitted = tm.measure(model, images, tset, memory_budget=budget, positions="auto", **kw)
    asked = tm.measure(model, images, tset, state_dtype=torch.float32, positions=k, **kw)
    with pytest.warns(UserWarning, match="float32 states"):
        assert f"float32 states; invariance, same_equivariance; 4 transformations; 1 class; positions={k} on 2 layers" \
            in str(estimate_memory(model, images, tset, memory_budget=budget, positions="auto", **kw))
    assert [fitted.layer_info(n).positions for n in fitted.layers] == \
        [asked.layer_info(n).positions for n in asked.layers]
    for measure in ("nvi", "nvse"):
        for layer in asked.layers_of(measure):
            np.testing.assert_array_equal(fitted.get(measure, layer), asked.get(measure, layer))
    # state_dtype given: kept, the rest in passes
    budget = f64.working_bytes + f64.state_bytes // 2
    report = estimate_memory(model, images, tset, memory_budget=budget, state_dtype=torch.float64, **kw)
    assert report.state_dtype == torch.float64 and len(report.passes()) > 1
