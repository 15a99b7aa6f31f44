"""Pairs of chunks on CPU (``Chunk.hold``): a chunk of at most PAIRED_SAMPLES samples keeps its layers' outputs
for the next chunk of its shard, and one kernel call folds both into the states as two calls would (the same
numbers, to the last bit), each tile of the states read and written once for both."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import engine, layer_measures, native
from tm_tensorboard import transforms as T
from models import small_cnn

# where each update kernel takes the samples it folds: this chunk's, then those kept from the chunk before
SAMPLES = {"invariance update": (7, 8), "invariance and per-transformation update": (12, 13),
           "per-transformation and equivariance-error update": (9, 10)}


@pytest.fixture
def folds(monkeypatch) -> Counter:
    """The update kernels' calls, counted by (kernel, samples folded, the layer's units), the kernels built."""
    counts: Counter = Counter()
    for kernel in native._KERNELS:
        call = kernel.get()
        assert call is not None, kernel.failed
        if kernel.name in SAMPLES:
            chunk, held = SAMPLES[kernel.name]
            monkeypatch.setattr(kernel, "_call", lambda *a, call=call, name=kernel.name, c=chunk, h=held: counts.update(
                [(name, a[c] + a[h], a[2 if name != "per-transformation and equivariance-error update" else 6].numel())]
            ) or call(*a))
    return counts


def _by_samples(folds: Counter, units: int | None = None) -> Counter:
    """The kernel calls counted by the samples each folded (of the layers of ``units`` units only, if given)."""
    counts: Counter = Counter()
    for (_, samples, layer_units), n in folds.items():
        if units is None or layer_units == units:
            counts[samples] += n
    return counts


def _same(ours: tm.MeasureResult, theirs: tm.MeasureResult, names: tuple[str, ...]) -> None:
    """Every value and standard error of ``names``, per element and per channel, exactly equal."""
    for name in names:
        layers = ours.layers_of(name)
        assert layers == theirs.layers_of(name) and layers
        for layer in layers:
            for per in ("element", "channel"):
                np.testing.assert_array_equal(ours.get(name, layer, per=per), theirs.get(name, layer, per=per),
                                              err_msg=f"{name} {layer} {per}")
            if ours.has_error_bars(name):
                np.testing.assert_array_equal(ours.stderr(name, layer, per="channel"),
                                              theirs.stderr(name, layer, per="channel"), err_msg=f"stderr {name} {layer}")


@pytest.mark.parametrize("measures", [("invariance",), ("same_equivariance",), ("per_transformation",),
                                      ("invariance", "per_transformation"),
                                      ("invariance", "same_equivariance", "per_transformation")])
def test_pairs_of_chunks_measure_what_single_chunks_measure(monkeypatch, folds, measures):
    """24 samples in 2 shards, chunks of 3: every layer folds 6 samples in 3 calls (the measurement's first two
    chunks one at a time: whether a layer's output stays as it is is learnt from them), with the values and
    standard errors of the chunks one at a time."""
    model, images = small_cnn(), torch.rand(24, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    names = {"invariance": ("nvi", "tvi", "svi"), "same_equivariance": ("nvse",), "per_transformation": ("ie_t",)}

    def run() -> tm.MeasureResult:
        return tm.measure(model, images, T.rotations(4), measures=measures, batch_size=3, error_bars=2, compile=None)

    paired = run()
    by_samples = _by_samples(folds)
    assert set(by_samples) == {3, 6} and 2 * by_samples[6] == 3 * by_samples[3], by_samples
    monkeypatch.setattr(engine, "PAIRED_SAMPLES", 0)
    folds.clear()
    single = run()
    assert {samples for (_, samples, _) in folds} == {3}
    _same(paired, single, tuple(n for group in measures for n in names[group]))


def test_an_output_changed_in_place_later_in_the_forward_is_not_kept(monkeypatch, folds):
    """A convolution's output that an in-place ReLU overwrites after its hook is measured at once, every chunk;
    the ReLU's (the same memory, changed by then) and the last convolution's are kept for pairs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 5, 3, padding=1))
    images = torch.randn(16, 3, 10, 10)

    def run() -> tm.MeasureResult:
        return tm.measure(model, images, T.rotations(4), measures=("invariance",), batch_size=2, error_bars=False,
                          compile=None)

    paired = run()
    units = {"0": 600, "1": 600, "2": 500}
    conv_and_relu, last = _by_samples(folds, units["0"]), _by_samples(folds, units["2"])
    assert conv_and_relu == {2: 8 + 2, 4: 3} and last == {2: 2, 4: 3}, (conv_and_relu, last)
    monkeypatch.setattr(engine, "PAIRED_SAMPLES", 0)
    _same(paired, run(), ("nvi", "tvi", "svi"))


class _IntoOneBuffer(nn.Module):
    """A ReLU that writes every call's output into the same buffer (as a module that preallocates its output)."""

    def __init__(self):
        super().__init__()
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out is None or self.out.shape != x.shape:
            self.out = torch.empty_like(x)
        return torch.clamp(x, min=0, out=self.out)


def test_an_output_written_again_at_the_next_call_is_not_kept(monkeypatch, folds):
    """A module that writes each call's output into one buffer is seen to change it by the next forward (an
    output is watched through two): it is measured at its hook, every chunk, and nothing fails."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _IntoOneBuffer(), nn.Conv2d(6, 5, 3, padding=1))
    images = torch.randn(16, 3, 10, 10)

    def run() -> tm.MeasureResult:
        return tm.measure(model, images, T.rotations(4), measures=("invariance",), batch_size=2, error_bars=False,
                          compile=None)

    paired = run()
    conv_and_buffer = _by_samples(folds, 600)
    assert conv_and_buffer == {2: 2 + 8, 4: 3}, conv_and_buffer  # the conv's pairs; the buffer's 8 chunks alone
    monkeypatch.setattr(engine, "PAIRED_SAMPLES", 0)
    _same(paired, run(), ("nvi", "tvi", "svi"))


class _ChangesLater(nn.Module):
    """Changes its convolution's output in place after it is observed, from its third call on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.conv(x)
        z = y * 2
        if self.calls >= 3:
            y.mul_(-1)
        return z


def test_an_output_changed_in_place_only_in_later_chunks_fails_clearly(folds):
    model = _ChangesLater()
    with pytest.raises(RuntimeError, match="'conv' was changed in place after it was observed"):
        tm.measure(model, torch.randn(16, 3, 8, 8), T.rotations(4), measures=("invariance",), layers=["conv"],
                   batch_size=2, error_bars=False, compile=None)


class _EveryOtherCall(nn.Module):
    """A second convolution on the calls of odd number only (data-dependent control flow)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.extra = nn.Conv2d(4, 5, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.conv(x)
        return self.extra(y) if self.calls % 2 == 1 else y


def test_an_output_kept_for_a_chunk_that_does_not_reach_its_layer_is_folded_in_alone(monkeypatch, folds):
    """A layer that the pair's second chunk does not reach folds the output kept for it alone after that
    chunk's forward, in its own shard: the values and standard errors of the chunks one at a time."""
    model, images = _EveryOtherCall(), torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    alone = []
    after_forward = engine._Observer.after_forward

    def spy(observer, phase, chunk):
        if observer.held is not None and not chunk.hold:
            alone.append(observer.info.name)
        after_forward(observer, phase, chunk)

    def run() -> tm.MeasureResult:
        model.calls = 0
        return tm.measure(model, images, T.rotations(4), measures=("invariance",), batch_size=2, error_bars=2,
                          compile=None)

    monkeypatch.setattr(engine._Observer, "after_forward", spy)
    paired = run()
    # the pairs' first chunks reach it (the first kept from the second pair on): kept, then folded in alone
    assert alone == ["extra"] * 3
    assert _by_samples(folds, 5 * 8 * 8) == {2: 4}
    monkeypatch.setattr(engine, "PAIRED_SAMPLES", 0)
    _same(paired, run(), ("nvi", "tvi", "svi"))


@pytest.mark.parametrize("option", ["stratified", "memory_budget", "eager"])
def test_chunks_are_not_paired_with_classes_under_a_memory_budget_or_without_the_kernels(folds, option):
    model, images = small_cnn(), torch.rand(24, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(24) % 3
    kwargs = {"stratified": {"labels": labels, "stratified": True}, "memory_budget": {"memory_budget": "2GB"},
              "eager": {"compile": False}}[option]
    tm.measure(model, images, T.rotations(4), measures=("invariance",), batch_size=3, error_bars=False,
               **{"compile": None, **kwargs})
    assert all(samples <= 3 for (_, samples, _) in folds)  # (a class's samples of a chunk, or all of them)


def test_where_the_kernels_do_not_take_a_pair_it_is_one_chunk_after_the_other(monkeypatch, folds):
    """Compiled with float32 states, which the CPU kernels do not take, the outputs kept for pairs are folded in
    by the compiled graphs one chunk after the other: the same numbers."""
    model, images = small_cnn(), torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    measures = ("invariance", "same_equivariance", "per_transformation")
    kept = []
    update_pair = layer_measures.LayerMeasure.update_pair

    def spy(measure, *arguments):
        kept.append(measure.group)
        update_pair(measure, *arguments)

    def run() -> tm.MeasureResult:
        return tm.measure(model, images, T.rotations(4), measures=measures, batch_size=2, error_bars=2, compile=True,
                          state_dtype=torch.float32)

    monkeypatch.setattr(layer_measures.LayerMeasure, "update_pair", spy)
    paired = run()
    assert set(kept) == set(measures) and not folds  # every group's pairs, one chunk after the other, no kernel
    monkeypatch.setattr(engine, "PAIRED_SAMPLES", 0)
    _same(paired, run(), ("nvi", "nvse", "ie_t"))
