"""A ReLU right after an observed layer, folded from that layer's output (relu_pairs.py, native.relu_update): the
numbers of two updates (the ReLU's on its own output), bit for bit; only where the ReLU is the plain, hook-free,
out-of-place kind that took the output unchanged; and a clear error where an output is later changed in place."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import native, relu_pairs
from tm_tensorboard import transforms as T


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "1")


def _states(T: int, units: int) -> list[torch.Tensor]:
    counts = torch.zeros(2, dtype=torch.int64)
    return [torch.zeros(units, dtype=torch.float64), counts[0], torch.zeros(T, units, dtype=torch.float64),
            torch.zeros(T, units, dtype=torch.float64), counts[1]]


def _rows(size: int, T: int, units: int, generator: torch.Generator) -> torch.Tensor:
    """A chunk [size·T, units] with negative values, -0, NaN and ±inf among them."""
    rows = torch.randn(size * T, units, generator=generator) * 3 + 0.5
    flat = rows.view(-1)
    flat[::7] = -0.0
    flat[3::101] = float("nan")
    flat[5::211] = float("inf")
    flat[6::223] = float("-inf")
    return rows


@pytest.mark.parametrize("T, units, sizes", [(2, 5, [1, 3]), (4, 517, [3, 5, 2]), (16, 4096, [16, 16]),
                                             (16, 1024 + 33, [9, 4])])
def test_one_pass_gives_the_states_of_the_layer_and_of_its_relu_output_bit_for_bit(T, units, sizes):
    """The layer's states as ``variance_update`` makes them, and the ReLU's as ``variance_update`` makes them from
    ``torch.relu`` of the rows."""
    generator = torch.Generator().manual_seed(units)
    ours, layer, relu = _states(T, units), _states(T, units), _states(T, units)
    relu_ours = _states(T, units)
    for size in sizes:
        rows = _rows(size, T, units, generator)
        assert native.relu_update(rows, T, ours, relu_ours)
        assert native.variance_update(rows, T, *layer)
        assert native.variance_update(torch.relu(rows), T, *relu)
    for mine, theirs in zip(ours + relu_ours, layer + relu):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(relu_ours[3]).any() and not torch.isnan(relu_ours[3]).all()


def _both_states(T: int, units: int) -> list[torch.Tensor]:
    """Invariance's five states, then per_transformation's: squared total [T, units] and count, mean, m2, count."""
    counts = torch.zeros(2, dtype=torch.int64)
    return _states(T, units) + [torch.zeros(T, units, dtype=torch.float64), counts[0],
                                torch.zeros(units, dtype=torch.float64), torch.zeros(units, dtype=torch.float64),
                                counts[1]]


@pytest.mark.parametrize("T, units, sizes, identity", [(2, 5, [1, 3], 1), (4, 517, [3, 5, 2], 2),
                                                       (16, 4096, [16, 16], 0), (16, 1024 + 33, [9, 4], 0)])
def test_with_per_transformation_one_pass_gives_both_updates_of_the_layer_and_of_its_relu(T, units, sizes, identity):
    """The joint kernel's states of the layer and of its ReLU as ``both_update`` makes them from the rows and from
    ``torch.relu`` of them, bit for bit (vectors and scalar tails, a first chunk and the ones after it)."""
    generator = torch.Generator().manual_seed(units)
    ours, relu_ours, layer, relu = (_both_states(T, units) for _ in range(4))
    for size in sizes:
        rows = _rows(size, T, units, generator)
        assert native.relu_both_update(rows, T, identity, ours, relu_ours)
        assert native.both_update(rows, T, identity, *layer)
        assert native.both_update(torch.relu(rows), T, identity, *relu)
    for mine, theirs in zip(ours + relu_ours, layer + relu):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)
    assert not native.relu_both_update(rows, T, T, ours, relu_ours)  # no such identity: declined


def test_it_declines_what_it_does_not_take_and_touches_nothing():
    rows, states, relu = torch.randn(8, 10), _states(4, 10), _states(4, 10)
    assert not native.relu_update(rows.double(), 4, states, relu)
    assert not native.relu_update(rows, 4, states, _states(4, 11))
    assert not native.relu_update(rows.t().contiguous().t(), 4, states, relu)
    assert all(not t.any() for t in states + relu)


class _Pairs(nn.Module):
    """Four layer → ReLU pairs: folded (conv1 → relu1), in place (relu2), with a hook of the user's (relu3),
    folded (fc → relu4)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)
        self.conv3, self.relu3 = nn.Conv2d(8, 4, 3, padding=1), nn.ReLU()
        self.relu3.register_forward_hook(lambda module, inputs, output: None)
        self.pool, self.fc, self.relu4 = nn.AdaptiveAvgPool2d(2), nn.Linear(16, 6), nn.ReLU()

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.relu4(self.fc(self.pool(x).flatten(1)))


def _separately(monkeypatch) -> None:
    """Every layer updated alone, as before the pairs were folded."""
    monkeypatch.setattr(relu_pairs.ReluPairs, "update",
                        lambda self, name, module, inputs, observer, phase, activation, chunk:
                        observer.update(phase, activation, chunk))


def test_measure_folds_the_plain_relus_and_gives_the_numbers_of_every_layer_alone(monkeypatch):
    """With error bars (shards of 4 chunks) and chunks of 5 samples: the same values and standard errors, bit for
    bit, as every layer updated alone; relu1 and relu4 folded from the chunks after WATCHED_FORWARDS, the in-place
    ReLU and the one with a hook of the user's never."""
    torch.manual_seed(0)
    model, images = _Pairs().eval(), torch.rand(40, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    tset = T.rotations(8, padding="zeros")
    folded = []
    relu_update = native.relu_update
    monkeypatch.setattr(native, "relu_update",
                        lambda rows, T, states, relus: folded.append(states[0].numel()) or relu_update(rows, T, states,
                                                                                                      relus))
    run = lambda: tm.measure(model, images, tset, measures=("invariance",), batch_size=5, compile=True,  # noqa: E731
                             error_bars=2)
    ours = run()
    chunks = 40 // 5
    assert sorted(set(folded)) == [6, 8 * 12 * 12]
    assert folded.count(6) == folded.count(8 * 12 * 12) == chunks - relu_pairs.WATCHED_FORWARDS
    _separately(monkeypatch)
    folded.clear()
    alone = run()
    assert not folded
    assert ours.layers == alone.layers and "relu4" in ours.layers
    for measure in ("nvi", "tvi", "svi"):
        for layer in ours.layers:
            np.testing.assert_array_equal(ours.get(measure, layer), alone.get(measure, layer))
            np.testing.assert_array_equal(ours.stderr(measure, layer), alone.stderr(measure, layer))


def test_with_per_transformation_too_the_pairs_fold_with_the_numbers_of_every_layer_alone(monkeypatch):
    """Invariance and per_transformation (one joint kernel per layer): relu1 and relu4 folded with their layers by
    one call, the same values and standard errors as every layer updated alone."""
    torch.manual_seed(0)
    model, images = _Pairs().eval(), torch.rand(40, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    folded = []
    both = native.relu_both_update
    monkeypatch.setattr(native, "relu_both_update",
                        lambda rows, T, identity, states, relus: folded.append(states[0].numel())
                        or both(rows, T, identity, states, relus))
    groups = ("invariance", "per_transformation")
    run = lambda: tm.measure(model, images, T.rotations(8, padding="zeros"), measures=groups,  # noqa: E731
                             batch_size=5, compile=True, error_bars=2)
    ours = run()
    assert sorted(set(folded)) == [6, 8 * 12 * 12] and len(folded) == 2 * (8 - relu_pairs.WATCHED_FORWARDS)
    _separately(monkeypatch)
    alone = run()
    for measure in ("nvi", "ie_t"):
        for layer in ours.layers:
            np.testing.assert_array_equal(ours.get(measure, layer), alone.get(measure, layer))
            np.testing.assert_array_equal(ours.stderr(measure, layer), alone.stderr(measure, layer))


def test_a_monitor_folds_its_pairs_with_the_numbers_of_every_layer_alone(tmp_path, monkeypatch):
    """The same in a Monitor's measurements (the states kept between them)."""
    torch.manual_seed(0)
    model = _Pairs()
    images = torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    results = []
    for fold in (True, False):
        if not fold:
            _separately(monkeypatch)
        monitor = tm.Monitor(model, images, T.rotations(4), logdir=tmp_path / str(fold), every=1,
                             measures=("invariance",), batch_size=4, compile=True)
        results.append([monitor.step(step) for step in (1, 2)])
        monitor.close()
    for ours, alone in zip(*results):
        for layer in ours.layers:
            np.testing.assert_array_equal(ours.get("nvi", layer), alone.get("nvi", layer))


class _ChangedLater(nn.Module):
    """conv → (not observed) a module that doubles its input in place from its fourth call → ReLU."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.calls = 0

    def forward(self, x):
        y = self.conv(x)
        self.calls += 1
        if self.calls > 3:
            y.mul_(2)
        return self.relu(y)


def test_an_output_changed_in_place_after_the_first_chunks_raises_a_clear_error():
    model, images = _ChangedLater().eval(), torch.rand(30, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="'conv' was changed in place after it was observed"):
        tm.measure(model, images, T.rotations(4), measures=("invariance",), layers=["conv", "relu"], batch_size=5,
                   compile=True, error_bars=False)
