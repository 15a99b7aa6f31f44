"""The CPU kernels of invariance's and per_transformation's updates (native.py): the states of a float64
reference from the same float32 values for any chunking, the compiled graphs' numbers, NaN where they give
NaN, and a clean refusal (nothing touched) wherever they do not apply."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import tm_tensorboard as tm
from tm_tensorboard import block_pool, native
from tm_tensorboard import transforms as T
from tm_tensorboard.layer_measures import _equivariance_error_update, _invariance_error_update, _variance_update
from models import small_cnn

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "1")


def _states(T: int, units: int, block: torch.Tensor | None = None) -> list[torch.Tensor]:
    """spread total, spread count, mean, m2, count; with ``block``, views at odd offsets into it (as shards'
    states are carved from one allocation)."""
    if block is None:
        tensors = [torch.zeros(units, dtype=torch.float64), torch.zeros(T, units, dtype=torch.float64),
                   torch.zeros(T, units, dtype=torch.float64)]
    else:
        offsets = [1, 1 + units, 1 + units + T * units]
        tensors = [block.as_strided((units,), (1,), offsets[0]), block.as_strided((T, units), (units, 1), offsets[1]),
                   block.as_strided((T, units), (units, 1), offsets[2])]
    counts = torch.zeros(2, dtype=torch.int64)
    return [tensors[0], counts[0], tensors[1], tensors[2], counts[1]]


def _fold(values: torch.Tensor, T: int, sizes: list[int], states: list[torch.Tensor], kernel: bool) -> None:
    """values [N, T, units] folded in chunks of ``sizes`` samples."""
    start = 0
    for size in sizes:
        chunk = values[start: start + size].reshape(size * T, -1).contiguous()
        if kernel:
            assert native.variance_update(chunk, T, *states)
        else:  # the compiled graph, as a GPU runs it
            _variance_update._run_compiled((chunk, T, *states))
        start += size


@pytest.mark.parametrize("T, units", [(2, 5), (4, 517), (16, 1024 + 33)])
@pytest.mark.parametrize("sizes", [[1] * 9, [3, 3, 3], [4, 5], [9]], ids=["ones", "odd", "uneven", "whole"])
def test_states_equal_a_float64_reference_for_any_chunking(T, units, sizes):
    """Units of all kinds of level and spread: the sample moments to 1e-12 of a float64 computation from
    the same float32 values (deviations over samples are exact float64 differences), the spread to float32
    rounding of the values' level (it is taken in the activations' precision, as on every path)."""
    g = torch.Generator().manual_seed(units)
    level = torch.logspace(-3, 3, units, dtype=torch.float64)
    values = (100 * level + level * 1e-3 * torch.randn(sum(sizes), T, units, generator=g, dtype=torch.float64)).float()
    states = _states(T, units, block=torch.zeros(1 + units + 2 * T * units, dtype=torch.float64))
    _fold(values, T, sizes, states, kernel=True)
    x = values.double()
    np.testing.assert_allclose(states[2].numpy(), x.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(states[3].numpy(), (x.var(0) * (len(x) - 1)).numpy(), rtol=1e-9, atol=0)
    spread_error = (states[0] - x.std(1).sum(0)).abs()  # float32 rounding of the values' level, per sample
    assert (spread_error <= 1e-6 * x.abs().amax(1).sum(0)).all(), spread_error.max()
    assert states[1].item() == states[4].item() == sum(sizes)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_states_equal_the_compiled_graphs(batch):
    """The compiled graph's states (what a GPU computes) up to its float32 deviations (~1e-7 of the values'
    level), after 3 chunks."""
    g = torch.Generator().manual_seed(batch)
    T, units = 16, 3000
    values = torch.randn(3 * batch, T, units, generator=g) * torch.linspace(0.1, 10, units) + 2
    ours, graphs = _states(T, units), _states(T, units)
    _fold(values, T, [batch] * 3, ours, kernel=True)
    _fold(values, T, [batch] * 3, graphs, kernel=False)
    for a, b in zip(ours, graphs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)  # the graph: float32 deviations of values up to ~40


@pytest.mark.parametrize("T", [3, 16])
@pytest.mark.parametrize("batch, held", [(1, 0), (4, 0), (4, 4), (8, 0), (16, 0), (40, 0), (64, 0)])
def test_rows_a_multiple_of_4_kb_apart_give_the_states_of_rows_that_are_not(T, batch, held):
    """Rows of 2,048 units (8 KB apart: with vectors shorter than a line, packed from 8 samples, read a line at a
    time below or where the packed tile would not fit) and the same units among 2,064 (read where they lie): the
    same states bit for bit, NaN and inf included, in three chunks (and after a held chunk: a pair)."""
    g = torch.Generator().manual_seed(batch * T + held)
    units, wider = 2048, 2048 + 16
    values = torch.randn(3 * (batch + held), T, wider, generator=g) * torch.linspace(0.1, 10, wider) + 2
    values[1, 0, 5], values[2, T - 1, 700], values[0, 1, 2047] = float("nan"), float("inf"), -float("inf")
    aliased, apart = _states(T, units), _states(T, wider)
    for states, width in ((aliased, units), (apart, wider)):
        for k in range(3):
            rows = values[k * (batch + held): (k + 1) * (batch + held), :, :width].reshape(-1, width)
            kept, chunk = rows[: held * T].contiguous(), rows[held * T:].contiguous()
            assert native.variance_update(chunk, T, *states, held=kept if held else None)
    for a, b in zip(aliased, apart):
        np.testing.assert_array_equal(a.numpy(), b[..., :units].numpy() if a.dim() else b.numpy())


def test_nan_and_inf_where_the_compiled_graphs_have_them():
    """A NaN activation makes its unit's spread and its (transformation, unit) moments NaN, an inf makes
    them non-finite, exactly where the compiled graph's are; other units are unaffected."""
    T, units = 4, 40
    values = torch.randn(6, T, units, generator=torch.Generator().manual_seed(0))
    values[2, 1, 3] = float("nan")
    values[4, 0, 7] = float("inf")
    values[0, 2, 11] = -float("inf")  # the shift itself
    ours, graphs = _states(T, units), _states(T, units)
    _fold(values, T, [3, 3], ours, kernel=True)
    _fold(values, T, [3, 3], graphs, kernel=False)
    for a, b in zip(ours, graphs):
        np.testing.assert_array_equal(torch.isfinite(a).numpy(), torch.isfinite(b).numpy())
    assert ours[2][1, 3].isnan() and torch.isfinite(ours[2][0, 3]) and ours[0][3].isnan()  # (t, unit) moments
    assert torch.isfinite(ours[2][:, 4]).all() and torch.isfinite(ours[0][4])


def test_it_declines_what_it_does_not_apply_to_and_touches_nothing():
    x = torch.randn(8, 6)
    cases = {
        "float64 activations": (x.double(), 4, _states(4, 6)),
        "non-contiguous": (torch.randn(6, 8).t(), 4, _states(4, 6)),
        "one transformation": (x, 1, _states(1, 6)),
        "meta device": (x.to("meta"), 4, _states(4, 6)),
    }
    float32_states = _states(4, 6)
    float32_states[2], float32_states[3] = float32_states[2].float(), float32_states[3].float()
    cases["float32 states"] = (x, 4, float32_states)
    for name, (values, t, states) in cases.items():
        before = [s.clone() for s in states]
        assert not native.variance_update(values, t, *states), name
        for a, b in zip(states, before):
            assert torch.equal(a, b), name
    declined = {"float64 activations": (x.double(), 4, 0), "one transformation": (x, 1, 0),
                "identity out of range": (x, 4, 4), "non-contiguous": (torch.randn(6, 8).t(), 4, 0)}
    for name, (values, t, identity) in declined.items():
        states = _error_states(t, 6)
        assert not native.errors_update(values, t, identity, *states), name
        assert not any(s.any() for s in states), name


def test_the_environment_variable_turns_it_off(monkeypatch):
    states = _states(4, 6)
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0")
    assert not native.variance_update(torch.randn(8, 6), 4, *states)
    assert states[4].item() == 0
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "maybe")
    with pytest.raises(ValueError, match="TM_TENSORBOARD_NATIVE='maybe': use 1"):
        native.variance_update(torch.randn(8, 6), 4, *states)


def _error_states(T: int, units: int) -> list[torch.Tensor]:
    """squared total, its count, the untransformed activations' mean and m2, their count."""
    f64 = torch.float64
    counts = torch.zeros(2, dtype=torch.int64)
    return [torch.zeros(T, units, dtype=f64), counts[0], torch.zeros(units, dtype=f64), torch.zeros(units, dtype=f64),
            counts[1]]


def _fold_errors(values: torch.Tensor, T: int, identity: int, sizes: list[int], states: list[torch.Tensor],
                 kernel: bool) -> None:
    start = 0
    for size in sizes:
        chunk = values[start: start + size].reshape(size * T, -1).contiguous()
        if kernel:
            assert native.errors_update(chunk, T, identity, *states)
        else:
            _invariance_error_update._run_compiled((chunk, T, identity, *states))
        start += size


@pytest.mark.parametrize("batch", [3, 8, 9, 16])
def test_per_transformation_on_rows_a_multiple_of_4_kb_apart_gives_the_states_of_rows_that_are_not(batch):
    """per_transformation's kernel and the joint one (with invariance's) on rows of 2,048 units (read a line at a
    time from 8 samples, with vectors shorter than a line) and on the same units among 2,064: the same states bit
    for bit, NaN and inf included, in three chunks."""
    T, identity, units, wider = 16, 3, 2048, 2048 + 16
    g = torch.Generator().manual_seed(batch)
    values = torch.randn(3 * batch, T, wider, generator=g) * torch.linspace(0.1, 10, wider) + 2
    values[1, 0, 5], values[2, T - 1, 700], values[0, identity, 2047] = float("nan"), float("inf"), -float("inf")
    alone = {width: _error_states(T, width) for width in (units, wider)}
    joint = {width: _states(T, width) + _error_states(T, width) for width in (units, wider)}
    for width in (units, wider):
        for k in range(3):
            chunk = values[k * batch: (k + 1) * batch, :, :width].reshape(-1, width).contiguous()
            assert native.errors_update(chunk, T, identity, *alone[width])
            assert native.both_update(chunk, T, identity, *joint[width])
    for states in (alone, joint):
        for a, b in zip(states[units], states[wider]):
            np.testing.assert_array_equal(a.numpy(), b[..., :units].numpy() if a.dim() else b.numpy())


@pytest.mark.parametrize("T, units, identity", [(2, 5, 0), (4, 517, 2), (16, 1024 + 33, 0)])
@pytest.mark.parametrize("sizes", [[1] * 9, [3, 3, 3], [4, 5], [9]], ids=["ones", "odd", "uneven", "whole"])
def test_per_transformation_states_equal_a_float64_reference_for_any_chunking(T, units, identity, sizes):
    """The squared differences from the untransformed activations to float32 rounding of each difference,
    summed per (transformation, unit); the untransformed activations' moments to 1e-12; the identity's 0."""
    g = torch.Generator().manual_seed(units)
    level = torch.logspace(-3, 3, units, dtype=torch.float64)
    values = (level + level * 1e-2 * torch.randn(sum(sizes), T, units, generator=g, dtype=torch.float64)).float()
    states = _error_states(T, units)
    _fold_errors(values, T, identity, sizes, states, kernel=True)
    x = values.double()
    reference = x[:, identity]
    squared = (x - reference.unsqueeze(1)).square().sum(0)
    np.testing.assert_allclose(states[0].numpy(), squared.numpy(), rtol=1e-6, atol=0)
    assert (states[0][identity] == 0).all()
    np.testing.assert_allclose(states[2].numpy(), reference.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(states[3].numpy(), (reference.var(0) * (len(x) - 1)).numpy(), rtol=1e-9)
    assert states[1].item() == states[4].item() == sum(sizes)


@pytest.mark.parametrize("batch", [1, 8])
def test_per_transformation_states_equal_the_compiled_graphs(batch):
    g = torch.Generator().manual_seed(batch)
    T, units = 16, 3000
    values = torch.randn(3 * batch, T, units, generator=g) * torch.linspace(0.1, 10, units) + 2
    values[1, 3, 7] = float("nan")
    ours, graphs = _error_states(T, units), _error_states(T, units)
    _fold_errors(values, T, 5, [batch] * 3, ours, kernel=True)
    _fold_errors(values, T, 5, [batch] * 3, graphs, kernel=False)
    for a, b in zip(ours, graphs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6, equal_nan=True)


@pytest.mark.parametrize("batch", [1, 8])
def test_equivariance_error_states_equal_the_compiled_graphs(batch):
    """The equivariance error's fold (maps moved back against the untransformed features, two tensors)
    gives the compiled graph's states; it declines features of another shape and touches nothing."""
    g = torch.Generator().manual_seed(batch + 1)
    T, identity, units = 8, 3, 2000
    moved = torch.randn(3 * batch, T, units, generator=g) * torch.linspace(0.1, 10, units) + 2
    features = moved + 0.1 * torch.randn(3 * batch, T, units, generator=g)
    ours, graphs = _error_states(T, units), _error_states(T, units)
    for i in range(3):
        rows = slice(i * batch, (i + 1) * batch)
        back, psi = moved[rows].reshape(batch * T, units), features[rows].reshape(batch * T, units)
        assert native.moved_errors_update(back, psi, T, identity, *ours)
        _equivariance_error_update._run_compiled((back, psi, T, identity, *graphs))
    for a, b in zip(ours, graphs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)
    states = _error_states(T, units)
    assert not native.moved_errors_update(back, psi[:, :-1].contiguous(), T, identity, *states)
    assert not native.moved_errors_update(back, psi.double(), T, identity, *states)
    assert not any(s.any() for s in states)


@pytest.mark.parametrize("T, units, identity", [(2, 5, 1), (4, 517, 2), (16, 1024 + 33, 0)])
@pytest.mark.parametrize("sizes", [[1] * 5, [3, 4], [9]], ids=["ones", "uneven", "whole"])
def test_both_updates_at_once_equal_each_kernel_alone(T, units, identity, sizes):
    """native.both_update (one pass for invariance and per_transformation) leaves every state bit-equal to
    the two kernels run one after the other, NaN and inf included, the states carved at odd offsets."""
    g = torch.Generator().manual_seed(units + T)
    values = torch.randn(sum(sizes), T, units, generator=g) * torch.linspace(0.1, 10, units) + 2
    values[0, T - 1, 3] = float("nan")
    values[-1, 0, 4] = float("inf")
    together = _states(T, units, block=torch.zeros(1 + units + 2 * T * units, dtype=torch.float64)) + \
        _error_states(T, units)
    alone = _states(T, units) + _error_states(T, units)
    start = 0
    for size in sizes:
        chunk = values[start: start + size].reshape(size * T, -1).contiguous()
        assert native.both_update(chunk, T, identity, *together)
        assert native.variance_update(chunk, T, *alone[:5]) and native.errors_update(chunk, T, identity, *alone[5:])
        start += size
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert together[5][:, 3].isnan().any() and torch.isfinite(together[5][:, 2]).all()


@pytest.mark.parametrize("kernel", ["variance", "errors", "both"])
def test_states_of_no_samples_yet_are_written_not_read(kernel):
    """The first chunk into a state writes its moments and squared sums without reading them (no traffic for
    states that hold nothing yet): states filled with NaN at count 0 end bit-equal to zero states, over a
    first chunk and a second one that merges, with NaN and inf activations."""
    T, units, identity = 4, 517, 1
    values = torch.randn(7, T, units, generator=torch.Generator().manual_seed(3)) * 3 + 1
    values[1, 2, 5] = float("nan")
    values[5, 0, 6] = float("inf")
    runs = []
    for garbage in (False, True):
        states = _states(T, units) + _error_states(T, units)
        if garbage:  # every state a kernel writes from its first chunk: the moments, the squared sums
            for i in (2, 3, 5, 7, 8):
                states[i].fill_(float("nan"))
        for chunk in (values[:3], values[3:]):
            chunk = chunk.reshape(-1, units).contiguous()
            if kernel == "variance":
                assert native.variance_update(chunk, T, *states[:5])
            elif kernel == "errors":
                assert native.errors_update(chunk, T, identity, *states[5:])
            else:
                assert native.both_update(chunk, T, identity, *states)
        runs.append(states if kernel == "both" else states[:5] if kernel == "variance" else states[5:])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(runs[1][2 if kernel != "errors" else 0]).float().mean() > 0.99


def test_both_at_once_decline_what_either_does_not_take_and_touch_nothing():
    x = torch.randn(8, 6)
    cases = {"float64 activations": (x.double(), 4, 0), "identity out of range": (x, 4, 4),
             "one transformation": (x, 1, 0), "non-contiguous": (torch.randn(6, 8).t(), 4, 0)}
    for name, (values, t, identity) in cases.items():
        states = _states(t, 6) + _error_states(t, 6)
        assert not native.both_update(values, t, identity, *states), name
        assert not any(s.any() for s in states), name
    for position in (2, 5):  # float32 moments of either group
        states = _states(4, 6) + _error_states(4, 6)
        states[position] = states[position].float()
        assert not native.both_update(x, 4, 0, *states)
        assert not any(s.any() for s in states)


def test_a_layer_with_both_groups_is_updated_once_per_chunk_with_the_numbers_of_each_alone(monkeypatch):
    """measure() with invariance and per_transformation runs the one-pass kernel on every layer and chunk (a
    layer and the ReLU after it in one call, relu_pairs.py) and gives exactly what each group measured alone gives,
    stratified and with error bars too."""
    model, images = small_cnn(), torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(40) % 2
    tset = T.rotations(8, padding="zeros")
    calls = []
    both_update, relu_both_update = native.both_update, native.relu_both_update
    monkeypatch.setattr(native, "both_update", lambda *a, **k: calls.append(1) or both_update(*a, **k))
    monkeypatch.setattr(native, "relu_both_update", lambda *a, **k: calls.extend([1, 1]) or relu_both_update(*a, **k))
    for stratified in (False, True):
        def run(groups):
            return tm.measure(model, (images, labels) if stratified else images, tset, measures=groups, batch_size=5,
                              compile=True, error_bars=2, stratified=stratified)

        calls.clear()
        both = run(("invariance", "per_transformation"))
        layers, chunks = len(both.layers) - len(both.derived), 40 // 5  # (stratified: each class's 20 in 4 chunks)
        assert both.derived == {"4": "3"}  # measured layers only: the BatchNorm "4" is derived from "3"
        assert len(calls) == layers * chunks, (len(calls), layers, chunks)
        alone = {"nvi": run(("invariance",)), "ie_t": run(("per_transformation",))}
        for measure, result in alone.items():
            for layer in both.layers:
                np.testing.assert_array_equal(both.get(measure, layer), result.get(measure, layer))
                np.testing.assert_array_equal(both.stderr(measure, layer), result.stderr(measure, layer))


def test_measure_with_the_kernel_equals_the_compiled_graphs(monkeypatch):
    """End to end, invariance, same-equivariance (whose moved-back maps its kernel folds too) and
    per_transformation give the compiled graphs' numbers, with error bars."""
    model, images = small_cnn(), torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tset = T.rotations(8, padding="zeros")
    groups = ("invariance", "same_equivariance", "per_transformation")
    run = lambda: tm.measure(model, images, tset, measures=groups, batch_size=5, compile=True,  # noqa: E731
                             error_bars=3)  # shards of 16
    ours = run()
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0")
    graphs = run()
    spatial = [layer for layer in ours.layers if ours.layer_info(layer).is_spatial]
    assert spatial
    for measure in ("nvi", "tvi", "svi", "nvse", "ie_t"):
        for layer in spatial if measure == "nvse" else ours.layers:
            np.testing.assert_allclose(ours.get(measure, layer), graphs.get(measure, layer), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(ours.stderr(measure, layer), graphs.stderr(measure, layer), rtol=1e-4, atol=1e-7)


def test_a_kernel_that_does_not_build_warns_once_and_the_graphs_measure(monkeypatch):
    """A toolchain that builds Inductor's code but not this kernel: one warning, the graphs' numbers."""
    model, images = small_cnn(), torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    tset = T.rotations(4, padding="zeros")
    def run():
        return tm.measure(model, images, tset, measures=("invariance",), compile=True, error_bars=False)

    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0")
    expected = run()
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "1")
    broken = native._Kernel("invariance update", native._VARIANCE_SOURCE.replace('extern "C"', "not C++"),
                            native._VARIANCE.arguments)
    monkeypatch.setattr(native, "_VARIANCE", broken)
    monkeypatch.setattr(native, "_UPDATES", (broken, native._ERRORS))
    monkeypatch.setattr(native, "_KERNELS", (broken, native._ERRORS))
    with pytest.warns(RuntimeWarning, match="CPU kernel of the invariance update could not be built") as caught:
        first = run()
        second = run()
    assert len([w for w in caught if "CPU kernel" in str(w.message)]) == 1
    assert not native.available()
    for result in (first, second):
        for layer in expected.layers:
            np.testing.assert_array_equal(result.get("nvi", layer), expected.get("nvi", layer))


_WARP_SETS = {
    "rotations(16) bilinear zeros": T.rotations(16, padding="zeros"),
    "rot90 (one tap)": T.rot90(),
    "rotations(6) bicubic reflection": T.rotations(6, interpolation="bicubic", padding="reflection"),
}


def _moved(tset: T.TransformationSet, maps: torch.Tensor, kernel: bool) -> torch.Tensor:
    """maps [b·T, C, h, w] moved back pixel-major, [b, T·h·w, C], by the kernel or by the compiled graphs."""
    from tm_tensorboard import warps
    from tm_tensorboard.statistics import Scratch

    n, channels, height, width = maps.shape
    sources, weights = tset.inverse_taps(height, width, CPU, maps.dtype)
    out = torch.full((n // len(tset), len(tset) * height * width, channels), -7.0)
    if kernel:
        assert native.move_back(maps, sources, weights, out, lambda numel: torch.full((numel,), 3.0))
    else:
        scratch = Scratch()
        warps.gather_taps._run_compiled((tset.pixel_major(maps, True, scratch), sources, weights, out))
    return out


@pytest.mark.parametrize("name", list(_WARP_SETS))
@pytest.mark.parametrize("channels, height, width", [(1, 5, 7), (3, 8, 8), (16, 6, 5), (20, 9, 4), (33, 4, 4)])
def test_moved_back_maps_equal_the_compiled_graphs_and_grid_sample(name, channels, height, width):
    """Channels fewer than, equal to and not a multiple of the vector width, odd map sizes, 1, 4 and 16
    taps: the compiled layout change and gather's values (the same sums in the same order), NaN where they
    have NaN (a tap of weight 0 on inf), and grid_sample's (the eager path) up to float rounding."""
    tset = _WARP_SETS[name]
    g = torch.Generator().manual_seed(channels * height)
    maps = torch.randn(3 * len(tset), channels, height, width, generator=g)
    maps[1, 0, 0, 0] = float("inf")
    maps[len(tset) + 2, -1, -1, -1] = float("nan")
    ours, graphs = _moved(tset, maps, kernel=True), _moved(tset, maps, kernel=False)
    torch.testing.assert_close(ours, graphs, rtol=1e-6, atol=1e-6, equal_nan=True)
    eager = tset.pixel_major(tset.invert_features(maps))
    finite = eager.isfinite() & ours.isfinite()
    assert finite.float().mean() > 0.5
    torch.testing.assert_close(ours[finite], eager[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels, height, width", [(3, 8, 8), (16, 6, 5), (20, 9, 4), (33, 4, 4)])
def test_maps_lying_channels_last_are_moved_back_from_where_they_lie(channels, height, width):
    """A channels-last model's maps ([n, h, w, C] in memory): the values of the same maps laid out channel-major,
    bit for bit, without the work buffer that lays each map out pixel-major."""
    tset = _WARP_SETS["rotations(16) bilinear zeros"]
    maps = torch.randn(2 * len(tset), channels, height, width, generator=torch.Generator().manual_seed(channels))
    lying = maps.contiguous(memory_format=torch.channels_last)
    assert not lying.is_contiguous()
    sources, weights = tset.inverse_taps(height, width, CPU, maps.dtype)
    out = torch.full((2, len(tset) * height * width, channels), -7.0)
    asked = []
    assert native.move_back(lying, sources, weights, out, lambda numel: asked.append(numel) or torch.empty(numel))
    assert asked == []
    torch.testing.assert_close(out, _moved(tset, maps, kernel=True), rtol=0, atol=0)


def test_move_back_declines_what_it_does_not_apply_to_and_touches_nothing(monkeypatch):
    tset = T.rotations(4, padding="zeros")
    maps = torch.randn(8, 3, 5, 5)
    sources, weights = tset.inverse_taps(5, 5, CPU, torch.float32)
    out = torch.zeros(2, 4 * 25, 3)
    buffer = lambda numel: torch.empty(numel)  # noqa: E731
    cases = {
        "float64 maps": (maps.double(), sources, weights, out),
        "non-contiguous maps": (maps.transpose(2, 3), sources, weights, out),
        "int32 sources": (maps, sources.int(), weights, out),
        "not whole samples": (maps[:6], sources, weights, out),
        "meta device": (maps.to("meta"), sources, weights, out),
        "flat maps": (maps.flatten(2), sources, weights, out),
    }
    for name, arguments in cases.items():
        assert not native.move_back(*arguments, buffer), name
        assert not out.any(), name
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0")
    assert not native.move_back(maps, sources, weights, out, buffer)
    assert not out.any()


def _replicate_arguments(counts: list[int], T: int = 7, units: int = 301) -> list:
    """The whole probe's invariance states and K shards' with ``counts`` samples each (spread total,
    spread count, mean, m2, count), the whole probe's m2 consistent with the shards' (within them)."""
    g = torch.Generator().manual_seed(len(counts) * units)
    f64 = torch.float64

    def state(n: int) -> list[torch.Tensor]:
        return [torch.rand(units, generator=g, dtype=f64) * n, torch.tensor(n),
                torch.randn(T, units, generator=g, dtype=f64), torch.rand(T, units, generator=g, dtype=f64) * n,
                torch.tensor(n)]

    shards = [state(n) for n in counts]
    total = state(sum(counts))
    total[0] = sum(s[0] for s in shards)
    total[3] = sum(s[3] for s in shards) * 1.5
    return total + [[s[i] for s in shards] for i in range(5)]


@pytest.mark.parametrize("counts", [[3, 4, 1, 5, 2], [16] * 8, [0, 9], [9, 0, 0]],
                         ids=["uneven", "eight", "empty shard", "one shard holds all"])
def test_replicates_equal_the_graphs_and_the_eager_function(counts):
    """TV and SV without each shard, from the states as they are: the compiled graph's and the eager
    function's values (float64 throughout: to 1e-12), NaN and inf where theirs are (no samples left, a shard
    with NaN states, a rest within rounding of 0)."""
    from tm_tensorboard.layer_measures import _variance_replicates

    arguments = _replicate_arguments(counts)
    arguments[8][0][1, 3] = float("nan")  # a NaN in the first shard's m2
    arguments[8][-1][0, :5] = arguments[3][0, :5] = 0.0  # the whole probe's M2 all in the last shard: rest 0
    outs = [torch.full((len(counts), 2, 301), -7.0, dtype=torch.float64) for _ in range(3)]
    assert native.variance_replicates(*arguments, outs[0])
    _variance_replicates._run_compiled((*arguments, outs[1]))
    _variance_replicates.fn(*arguments, outs[2])
    for other in outs[1:]:
        torch.testing.assert_close(outs[0], other, rtol=1e-12, atol=1e-300, equal_nan=True)
        assert torch.equal(outs[0].isinf(), other.isinf())
    assert outs[0].isnan().any()


def test_replicates_decline_what_they_do_not_apply_to():
    arguments = _replicate_arguments([3, 4])
    out = torch.zeros(2, 2, 301, dtype=torch.float64)
    float32 = list(arguments)
    float32[2] = float32[2].float()
    wrong_out = torch.zeros(3, 2, 301, dtype=torch.float64)
    for name, (values, target) in {"float32 mean": (float32, out), "an out of another shape": (arguments, wrong_out),
                                   "no shards": (arguments[:5] + [[]] * 5, out[:0])}.items():
        assert not native.variance_replicates(*values, target), name
        assert not target.any(), name


@pytest.mark.parametrize("counts", [[3, 4, 1, 5, 2], [16] * 8, [0, 9]], ids=["uneven", "eight", "empty shard"])
def test_replicates_with_the_merge_equal_merge_into_then_the_replicates(counts):
    """``merge=True``: the whole probe's states made from the shards' in the same pass are shards.merge_into's
    (float64: to 1e-13, counts exactly), and the replicates then those of the states merged apart."""
    from tm_tensorboard.shards import merge_into
    from tm_tensorboard.statistics import SampleMoments, SampleSum

    arguments = _replicate_arguments(counts)
    for whole in arguments[:5]:
        whole.zero_()  # as finalizing finds them: every sample went to a shard
    apart = [a.clone() if isinstance(a, torch.Tensor) else a for a in arguments]

    def state(kind, tensors, count):  # a state holding these tensors (their storage) and count
        made = kind(tuple(tensors[0].shape), torch.device("cpu"))
        for name, tensor in zip(made._names, tensors):
            setattr(made, name, tensor)
        made.count = count
        return made

    spread, moments = state(SampleSum, apart[0:1], apart[1]), state(SampleMoments, apart[2:4], apart[4])
    merge_into(spread, [state(SampleSum, [t], c) for t, c in zip(*apart[5:7])], compiled=True)
    merge_into(moments, [state(SampleMoments, [m, q], c) for m, q, c in zip(*apart[7:10])], compiled=True)
    outs = [torch.full((len(counts), 2, 301), -7.0, dtype=torch.float64) for _ in range(2)]
    assert native.variance_replicates(*arguments, outs[0], merge=True)
    assert native.variance_replicates(*apart, outs[1])
    assert arguments[1].item() == arguments[4].item() == sum(counts) == apart[4].item() == apart[1].item()
    for ours, theirs in zip([arguments[i] for i in (0, 2, 3)], [apart[i] for i in (0, 2, 3)]):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-300, equal_nan=True)


def _errors_shards(counts: list[int], T: int = 6, units: int = 517) -> tuple[list, list[list[torch.Tensor]]]:
    """per_transformation's zero states of the whole probe (squared total, count, the untransformed rows'
    mean, m2, count) as finalizing finds them, and K shards' with ``counts`` samples: NaN, ±inf, a unit that
    varied in one shard only (rest 0 within rounding)."""
    g = torch.Generator().manual_seed(len(counts) * units)
    f64 = torch.float64
    shards = [[torch.rand(T, units, generator=g, dtype=f64) * n, torch.tensor(n),
               torch.randn(units, generator=g, dtype=f64), torch.rand(units, generator=g, dtype=f64) * n,
               torch.tensor(n)] for n in counts]
    shards[0][0][1, 3], shards[0][3][4] = float("nan"), float("nan")
    shards[-1][0][2, 5], shards[0][2][6] = float("inf"), float("-inf")
    for shard in shards[1:]:
        shard[0][:, 7], shard[3][7] = 0.0, 0.0  # unit 7 varied in the first shard only
        shard[2][7] = shards[0][2][7]
    whole = [torch.zeros(T, units, dtype=f64), torch.tensor(0), torch.zeros(units, dtype=f64),
             torch.zeros(units, dtype=f64), torch.tensor(0)]
    return whole, shards


@pytest.mark.parametrize("counts", [[3, 4, 1, 5, 2], [16] * 8, [0, 9], [9, 0, 0]],
                         ids=["uneven", "eight", "empty shard", "one shard holds all"])
def test_per_transformation_replicates_equal_the_merge_the_leave_out_and_the_values(counts):
    """native.errors_replicates: the whole probe's states merged from the shards' in the same pass are
    shards.merge_into's, and each replicate is what the leave-out then the measure's values give, eagerly and
    through the compiled graphs (float64 throughout: to 1e-12; NaN and inf where theirs are)."""
    from tm_tensorboard.layer_measures import _invariance_error_compute
    from tm_tensorboard.shards import _leave_out_moments, _leave_out_sums, _merge_moments, _merge_sums

    whole, shards = _errors_shards(counts)
    T, units = whole[0].shape
    out = torch.full((len(counts), T + 1, units), -7.0, dtype=torch.float64)
    expected = []
    for compiled in (False, True):
        total, apart = [w.clone() for w in whole], [[t.clone() for t in shard] for shard in shards]
        column = [[shard[i] for shard in apart] for i in range(5)]
        _merge_sums(compiled, total[0], total[1], column[0], column[1])
        _merge_moments(compiled, *total[2:], *column[2:])
        merged = [t.clone() for t in total]
        _leave_out_sums(compiled, total[0], total[1], column[0], column[1])
        _leave_out_moments(compiled, *total[2:], *column[2:])
        expected.append((merged, torch.stack([_invariance_error_compute(compiled, sq, n_sq, m2, n)
                                              for sq, n_sq, _, m2, n in apart])))
    assert native.errors_replicates(*whole, *[[shard[i] for shard in shards] for i in range(5)], out, merge=True)
    for merged, values in expected:
        for ours, theirs in zip(whole, merged):
            torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-300, equal_nan=True)
        torch.testing.assert_close(out, values, rtol=1e-12, atol=1e-300, equal_nan=True)
        assert torch.equal(out.isinf(), values.isinf()) and torch.equal(out.isnan(), values.isnan())
    assert whole[1].item() == whole[4].item() == sum(counts)
    assert out.isnan().any()  # (an infinite rest is within rounding of the infinite total: 0, as in sum_without)
    if sum(counts) > counts[0]:
        assert (out[0, :T, 7] == 0).all()  # without the first shard, unit 7 never varied


def test_per_transformation_replicates_decline_what_they_do_not_apply_to():
    whole, shards = _errors_shards([3, 4])
    columns = [[shard[i] for shard in shards] for i in range(5)]
    T, units = whole[0].shape
    out = torch.zeros(2, T + 1, units, dtype=torch.float64)
    float32 = [whole[0].float()] + whole[1:]
    for name, (states, shard_states, target) in {
            "float32 squares": (float32, columns, out), "an out of another shape": (whole, columns, out[:, :T]),
            "no shards": (whole, [[]] * 5, out[:0])}.items():
        assert not native.errors_replicates(*states, *shard_states, target, merge=True), name
        assert not target.any() and not whole[0].any() and whole[1] == 0, name



@pytest.mark.parametrize("kernel", ["variance", "errors"])
@pytest.mark.parametrize("counts", [[3, 4, 1, 5, 2], [0, 9], [9, 0, 0]],
                         ids=["uneven", "empty first", "first holds all"])
def test_replicates_merged_into_shard_zeros_own_states_are_those_merged_apart(kernel, counts):
    """``merge=True`` with the whole probe's states being shard 0's (as finalizing passes them: K sets, not
    K + 1): the same replicates and merged states, bit for bit, as into separate zero states; what shard 0's
    held is not read as a whole probe's (its count is not where the merge starts)."""
    if kernel == "variance":
        arguments = _replicate_arguments(counts)
        whole, shards = arguments[:5], [[arguments[5 + i][k] for i in range(5)] for k in range(len(counts))]
        for tensor in whole:
            tensor.zero_()
        call, components = native.variance_replicates, 2
    else:
        whole, shards = _errors_shards(counts)
        call, components = native.errors_replicates, whole[0].shape[0] + 1
    units = whole[2].shape[-1]
    apart = [[t.clone() for t in shard] for shard in shards]
    outs = [torch.full((len(counts), components, units), -7.0, dtype=torch.float64) for _ in range(2)]
    assert call(*whole, *[[shard[i] for shard in apart] for i in range(5)], outs[0], merge=True)
    assert call(*shards[0], *[[shard[i] for shard in shards] for i in range(5)], outs[1], merge=True)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0, equal_nan=True)
    for ours, theirs in zip(shards[0], whole):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    assert shards[0][1].item() == shards[0][4].item() == sum(counts)

_LATER_PROCESS = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    sys.path.insert(0, {tests!r})
    from tm_tensorboard import fused, native
    stored = native.stored()
    x = torch.arange(4 * 3 * 37, dtype=torch.float32).reshape(12, 37).sin()
    states = [torch.zeros(37, dtype=torch.float64), torch.zeros((), dtype=torch.int64),
              torch.zeros(3, 37, dtype=torch.float64), torch.zeros(3, 37, dtype=torch.float64),
              torch.zeros((), dtype=torch.int64)]
    folded = native.variance_update(x, 3, *states)
    import tm_tensorboard as tm
    from tm_tensorboard import transforms as T
    from models import small_cnn
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tm.measure(small_cnn(), torch.rand(8, 3, 12, 12), T.rotations(4, padding="zeros"),
                            measures=("invariance", "same_equivariance"), error_bars=False)
    print(json.dumps({{"stored": stored, "folded": folded, "states": [s.tolist() for s in states],
                       "inductor": sorted(m for m in sys.modules if m.startswith("torch._inductor")),
                       "compiled_seconds": fused.compiled_seconds(), "build_seconds": native.build_seconds(),
                       "nvse": [result.get("nvse", layer).tolist() for layer in result.layers_of("nvse")]}}))
    """
)


@pytest.mark.parametrize("size, offset", [(1 << 20, 0), ((1 << 20) + 7, 3), (33, 15), (5, 1), (0, 0)])
def test_zero_fill_zeroes_every_byte_of_the_block_and_none_around_it(size, offset):
    """native.zero_fill: the block's bytes all zero whatever its alignment and length (the streaming stores'
    16-byte body, a head and a tail written apart), the bytes either side of it as they were."""
    native._ZERO.get()
    buffer = torch.full((offset + size + 9,), 0xAB, dtype=torch.uint8)
    block = buffer[offset: offset + size]
    assert native.zero_fill(block)
    assert not block.any()
    assert (buffer[:offset] == 0xAB).all() and (buffer[offset + size:] == 0xAB).all()
    states = torch.full((16, 16384), float("nan"), dtype=torch.float64)  # 2 MB, split between the threads
    assert native.zero_fill(states)
    assert torch.equal(states, torch.zeros_like(states))


def test_zero_fill_declines_what_it_does_not_apply_to_and_touches_nothing(monkeypatch):
    native._ZERO.get()
    strided = torch.ones(64, 64, dtype=torch.float64).t()
    assert not native.zero_fill(strided) and strided.all()
    assert not native.zero_fill(torch.ones(8, device="meta"))
    block = torch.ones(1024, dtype=torch.float64)
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0")
    assert not native.zero_fill(block) and block.all()


def test_the_kernels_count_as_stored_without_the_zeroings(monkeypatch):
    """``native.stored()`` (which lets compile=None run the kernels) asks for the kernels a measurement's chunks
    run, not for the kept states' zeroing: a machine whose update kernels were built before it existed keeps
    running them."""
    for kernel in native._UPDATES:
        assert kernel.get() is not None
    unbuilt = native._Kernel("zeroing, never built", native._ZERO.source + "// another source", native._ZERO.arguments)
    monkeypatch.setattr(native, "_ZERO", unbuilt)
    monkeypatch.setattr(native, "_KERNELS", (*native._UPDATES, unbuilt))
    assert not unbuilt.stored() and native.stored()


def test_a_zeroing_kernel_that_does_not_build_leaves_the_other_kernels_on(monkeypatch):
    """The zeroing kernel failing to build: zero_fill declines (the caller zeroes with torch), the update kernels
    stay available to compile=None and nothing warns of it."""
    for kernel in native._UPDATES:
        assert kernel.get() is not None
    broken = native._Kernel("zeroing, broken", native._PRELUDE + "this is not C++", native._ZERO.arguments)
    monkeypatch.setattr(native, "_ZERO", broken)
    monkeypatch.setattr(native, "_KERNELS", (*native._UPDATES, broken))
    block = torch.ones(1024, dtype=torch.float64)
    assert not native.zero_fill(block) and block.all()
    assert broken.failed is not None and native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        native.report_failure()


def test_a_later_process_loads_the_kernels_built_here_without_inductor():
    """Building a kernel records where its library is; a later process on this machine loads every kernel from
    there without importing Inductor (its ~1.6 s: its import, the CPU's instructions probed), computes the
    same states bit for bit, and a small measure() (compile=None) runs them without compiling anything."""
    for kernel in native._KERNELS:
        assert kernel.get() is not None, kernel.failed
        library = native._STORE.library(kernel)
        assert library is not None and os.path.samefile(library, kernel.get().__self__.__file__)
    x = torch.arange(4 * 3 * 37, dtype=torch.float32).reshape(12, 37).sin()
    states = _states(3, 37)
    assert native.variance_update(x, 3, *states)
    environment = {**os.environ, native.ENVIRONMENT_VARIABLE: "1"}
    environment.pop("TM_TENSORBOARD_COMPILE", None)
    done = subprocess.run([sys.executable, "-c", _LATER_PROCESS.format(tests=os.path.dirname(__file__))],
                          capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["stored"] and out["folded"]
    assert out["inductor"] == [] and out["compiled_seconds"] == out["build_seconds"] == 0
    for ours, theirs in zip(states, out["states"]):
        np.testing.assert_array_equal(ours.numpy(), np.array(theirs))
    torch.manual_seed(0)
    expected = tm.measure(small_cnn(), torch.rand(8, 3, 12, 12), T.rotations(4, padding="zeros"),
                          measures=("invariance", "same_equivariance"), error_bars=False, compile=True)
    assert len(out["nvse"]) == len(expected.layers_of("nvse")) > 0
    for values, layer in zip(out["nvse"], expected.layers_of("nvse")):
        np.testing.assert_allclose(np.array(values), expected.get("nvse", layer), rtol=1e-6, atol=1e-9)


def test_a_missing_or_foreign_record_loads_nothing(tmp_path, monkeypatch):
    """A record whose library is gone, or is not one, leaves the kernel unstored (built through Inductor when
    asked for); a record of the right library loads it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    built = native._VARIANCE.get()
    assert built is not None

    def fresh() -> native._Kernel:
        return native._Kernel(native._VARIANCE.name, native._VARIANCE.source, native._VARIANCE.arguments)

    kernel = fresh()
    record = native._STORE.path(kernel)
    assert record.parent == tmp_path / "tm_tensorboard" and not kernel.stored()
    record.parent.mkdir(parents=True)
    record.write_text(str(tmp_path / "gone.so"))
    assert not fresh().stored()
    (tmp_path / "garbage.so").write_bytes(b"not a library")
    record.write_text(str(tmp_path / "garbage.so"))
    assert not fresh().stored()
    record.write_text(built.__self__.__file__)
    kernel = fresh()
    assert kernel.stored()
    x, ours, theirs = torch.rand(8, 21), _states(4, 21), _states(4, 21)
    kernel.get()(x, x, *ours, 2, 0, 4, 21, 64)
    built(x, x, *theirs, 2, 0, 4, 21, 64)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_measure_runs_the_stored_kernels_where_compiling_does_not_pay(monkeypatch):
    """compile=None where compiling would not pay, the kernels built: every kernel runs and no graph is compiled
    or loaded (``fused.NATIVE``), with the compiled measurement's numbers (eager's where no kernel applies);
    TM_TENSORBOARD_NATIVE=0 measures eagerly."""
    from tm_tensorboard import engine, fused

    for kernel in native._KERNELS:
        assert kernel.get() is not None
    model, images = small_cnn(), torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tset = T.rotations(8, padding="zeros")
    groups = ("invariance", "same_equivariance", "per_transformation", "equivariance_error")
    run = lambda compile: tm.measure(model, images, tset, measures=groups, batch_size=5, compile=compile,  # noqa: E731
                                     error_bars=3)
    compiled, eager = run(True), run(False)
    monkeypatch.setattr(engine, "compile_pays", lambda values, measurements=1: False)
    assert engine.automatic_kernels(10**12) is fused.NATIVE
    graphs, calls = [], {}
    monkeypatch.setattr(fused.FusedFunction, "_run_compiled", lambda self, args: graphs.append(self.__name__))
    for kernel in native._KERNELS:
        call = kernel.get()
        monkeypatch.setattr(kernel, "_call", lambda *a, call=call, name=kernel.name: calls.update(
            {name: calls.get(name, 0) + 1}) or call(*a))
    ours = run(None)
    assert graphs == []
    assert set(calls) == {"invariance and per-transformation update", "inverse warp", "error bars' replicates",
                          "invariance update", "per-transformation and equivariance-error update",
                          "per-transformation error bars' replicates",
                          "invariance and per-transformation update of a layer and its ReLU"}  # (Linear → ReLU)
    for measure in ("nvi", "nvse", "ie_t", "ee_t"):
        for layer in ours.layers_of(measure):
            np.testing.assert_allclose(ours.get(measure, layer), compiled.get(measure, layer), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(ours.get(measure, layer), eager.get(measure, layer), rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(ours.stderr(measure, layer), compiled.stderr(measure, layer), rtol=1e-5,
                                       atol=1e-9)
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0")
    assert engine.automatic_kernels(10**12) is False


def test_the_build_kernels_command_builds_them_once_for_later_processes(tmp_path):
    """``tm-tensorboard build-kernels`` on a machine without them (an empty Inductor cache) builds and records
    every kernel; a later process finds them all stored. Turned off or without a compiler it says why, exit 1."""
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
                   native.ENVIRONMENT_VARIABLE: "1"}

    def run(*arguments: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *arguments], capture_output=True, text=True,
                              env={**environment, **env}, timeout=600)

    off = run("-m", "tm_tensorboard.cli", "build-kernels", **{native.ENVIRONMENT_VARIABLE: "0"})
    assert off.returncode == 1 and "TM_TENSORBOARD_NATIVE=0" in off.stderr
    broken = run("-m", "tm_tensorboard.cli", "build-kernels", CXX=str(tmp_path / "no-such-c++"))
    assert broken.returncode == 1 and "invariance update kernel could not be built" in broken.stderr
    done = run("-m", "tm_tensorboard.cli", "build-kernels")
    assert done.returncode == 0, done.stderr
    assert "built the CPU kernels" in done.stdout and str(tmp_path / "inductor" / "tm_tensorboard") in done.stdout
    libraries = list((tmp_path / "inductor" / "tm_tensorboard").glob("native-*.library"))
    assert len(libraries) == len(native._KERNELS) + len(block_pool.kernels())  # (and the pool of block_pool.py)
    later = run("-c", "from tm_tensorboard import native; import sys; print(native.stored(), "
                "any(m.startswith('torch._inductor') for m in sys.modules))")
    assert later.returncode == 0 and later.stdout.split() == ["True", "False"], later.stderr


def test_where_the_kernels_do_all_the_work_they_replace_compiling(monkeypatch, tmp_path):
    """compile=None where compiling would pay: the CPU kernels (no graph) for the groups they serve on CPU with
    float64 states at every position, also in a Monitor, which builds them when made; the compiled graphs
    for anything else (another group, float32 states, sampled positions)."""
    from tm_tensorboard import engine, fused
    from tm_tensorboard.engine import Measurement

    monkeypatch.setattr(engine, "compile_pays", lambda values, measurements=1: True)
    cpu = torch.device("cpu")
    tset = T.rotations(4, padding="zeros")
    assert Measurement(small_cnn(), tset, measures=("invariance", "same_equivariance", "equivariance_error",
                                                    "per_transformation")).native_covered(cpu)
    for keywords in ({"measures": ("invariance", "goodfellow")}, {"measures": ("per_transformation", "anova")},
                     {"state_dtype": torch.float32}, {"positions": 4}):
        assert not Measurement(small_cnn(), tset, **keywords).native_covered(cpu), keywords
    assert not Measurement(small_cnn(), tset).native_covered(torch.device("meta"))
    assert engine.automatic_kernels(0, native_covered=True) is fused.NATIVE
    assert engine.automatic_kernels(0, native_covered=False) is True
    graphs = []
    monkeypatch.setattr(fused.FusedFunction, "_run_compiled", lambda self, args: graphs.append(self.__name__))
    images = torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    built = native.build_seconds()
    monitor = tm.Monitor(small_cnn(), images, tset, logdir=tmp_path,
                         measures=("invariance", "same_equivariance", "per_transformation"))
    with monitor:
        assert monitor._measurement.compile is fused.NATIVE
        assert monitor.compile_seconds == pytest.approx(native.build_seconds() - built)  # building, not compiling
        assert all(kernel.stored() for kernel in native._KERNELS)
        result = monitor.step(0, force=True)
    assert graphs == [] and result.layers_of("nvse") and result.layers_of("ie_t")
