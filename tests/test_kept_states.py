"""A session's measurements on CPU reuse the memory of the previous one's streaming states: the same
numbers bit for bit, nothing allocated anew, results already returned untouched, nothing kept under a
memory budget (``kept_states.py``)."""
from __future__ import annotations

import numpy as np
import torch

import tm_tensorboard as tm
from tm_tensorboard.engine import Measurement
from tm_tensorboard.kept_states import MIN_BYTES, KeptStates
from tm_tensorboard.probe import as_probe
from tm_tensorboard.examples.models import SimpleCNN

MEASURES = ("invariance", "same_equivariance", "per_transformation")


def model_and_probe(size: int = 32, n: int = 32):
    torch.manual_seed(0)
    return SimpleCNN(3, 10).eval(), torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def arrays(result) -> dict:
    """Every per-element component and every jackknife replicate of a result, copied."""
    out = {}
    for group, layers in result._components.items():
        for layer, (_, values) in layers.items():
            out[(group, layer)] = values.copy()
    for group, layers in result._shards.items():
        for layer, values in layers.items():
            out[(group, "replicates", layer)] = values.copy()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def session(model, **keywords) -> Measurement:
    return Measurement(model, tm.transforms.rotations(4), measures=MEASURES, batch_size=8, error_bars=2,
                       compile=False, **keywords)


def test_a_second_measurement_reuses_the_first_ones_state_memory_with_the_same_numbers():
    model, images = model_and_probe()
    measurement = session(model)
    probe = as_probe(images)
    first = measurement.run(probe)
    kept = measurement.kept_states
    blocks = kept.allocated
    assert blocks >= 3 and kept.reused == 0  # the larger layers' states, and their shards' blocks
    assert kept.kept_bytes >= blocks * MIN_BYTES
    before = arrays(first)
    second = measurement.run(probe)
    assert kept.allocated == blocks and kept.reused == blocks  # every block served again, none new
    assert_same(arrays(second), before)
    assert_same(arrays(first), before)  # the first result is a copy: reusing its states changed nothing
    fresh = tm.measure(model, images, tm.transforms.rotations(4), measures=MEASURES, batch_size=8,
                       error_bars=2, compile=False)
    assert_same(arrays(fresh), before)


def test_blocks_the_last_measurement_did_not_use_are_let_go():
    model, images = model_and_probe()
    measurement = session(model)
    measurement.run(as_probe(images))
    large = measurement.kept_states.kept_bytes
    measurement.run(as_probe(torch.nn.functional.interpolate(images, size=16)))  # smaller maps: other states
    assert 0 < measurement.kept_states.kept_bytes < large / 2  # (blocks of equal size are served again)


def test_nothing_is_kept_under_a_memory_budget():
    model, images = model_and_probe()
    measurement = session(model, memory_budget="8GB")
    measurement.run(as_probe(images))
    assert measurement.kept_states.kept_bytes == 0 and measurement.kept_states.allocated == 0


def test_a_monitor_pages_in_its_states_once(tmp_path):
    model, images = model_and_probe()
    monitor = tm.Monitor(model, images, tm.transforms.rotations(4), logdir=tmp_path, every=1, measures=MEASURES,
                         batch_size=8, error_bars=2, compile=False)
    with monitor:
        first = arrays(monitor.step(0))
        kept = monitor._measurement.kept_states
        blocks = kept.allocated
        assert_same(arrays(monitor.step(1)), first)
        assert kept.allocated == blocks and kept.reused == blocks


def test_small_states_and_other_devices_are_not_kept():
    kept = KeptStates()
    with kept.serving():
        small = kept.zeros((4, 8), torch.float64, "cpu")
        meta = kept.zeros((1 << 20,), torch.float64, "meta")
    assert small.abs().sum() == 0 and meta.device.type == "meta"
    assert kept.allocated == 0 and kept.kept_bytes == 0
