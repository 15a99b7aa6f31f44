"""A session's measurements on CPU reuse the memory of the previous one's streaming states: the same
numbers bit for bit, nothing allocated anew, results already returned untouched, nothing kept under a
memory budget; one-off measurements reuse the process's, kept lazily freed in between (``kept_states.py``)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tm_tensorboard as tm
from tm_tensorboard.engine import Measurement
from tm_tensorboard import kept_states
from tm_tensorboard.kept_states import MIN_BYTES, KeptStates, OneOffStates
from tm_tensorboard.probe import as_probe
from tm_tensorboard.shards import MIN_SHARD_SAMPLES
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
    measurement.run(as_probe(torch.nn.functional.interpolate(images, size=24)))  # smaller maps: other states
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


def test_error_bars_take_k_sets_of_states_where_the_kernels_finalize(monkeypatch):
    """With K shards, the whole probe's states take shard 0's memory where the replicates' CPU kernel
    finalizes (K sets of states in all), and come as one more set where it does not (the eager path): the
    bytes a session allocates for one layer's invariance, counted block by block, and the same numbers."""
    monkeypatch.setenv("TM_TENSORBOARD_NATIVE", "1")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1)).eval()  # 8 × 32 × 32 = 8192 units
    K, T, units = 4, 16, 8192
    probe = as_probe(torch.rand(K * MIN_SHARD_SAMPLES, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    moments, one_set = T * units * 8, (2 * T + 1) * units * 8  # a 1 MiB mean or m2; a set with the spread
    results, allocated = {}, {}
    for compile in (True, False):
        measurement = Measurement(model, tm.transforms.rotations(T), measures=("invariance",), batch_size=8,
                                  error_bars=K, compile=compile)
        results[compile] = measurement.run(probe)
        allocated[compile] = measurement.kept_states.kept_bytes
    # the first shard's mean and m2, the later shards' sets in one block (the spread's 64 kB alone is not kept)
    assert allocated[True] == 2 * moments + (K - 1) * one_set
    assert allocated[False] == allocated[True] + 2 * moments  # the whole probe's mean and m2, made at the end
    layer = results[True].layers[0]
    for measure in ("nvi", "tvi", "svi"):
        np.testing.assert_allclose(results[True].stderr(measure, layer), results[False].stderr(measure, layer),
                                   rtol=1e-6)  # (the compiled and eager chunk moments differ at float32 rounding)
        np.testing.assert_allclose(results[True].get(measure, layer), results[False].get(measure, layer), rtol=1e-6)


def lazily_free_bytes() -> int:
    """This process's pages marked lazily free and not yet taken back (Linux's smaps_rollup)."""
    with open("/proc/self/smaps_rollup") as rollup:
        line = next(line for line in rollup if line.startswith("LazyFree:"))
    return int(line.split()[1]) * 1024


def one_off(model, images, **keywords):
    return tm.measure(model, images, tm.transforms.rotations(4), measures=MEASURES, batch_size=8, error_bars=2,
                      compile=False, **keywords)


@pytest.mark.skipif(not isinstance(kept_states.one_off(), OneOffStates), reason="pages lazily freed: Linux only")
def test_one_off_measurements_reuse_the_previous_ones_state_memory_kept_lazily_free(monkeypatch):
    model, images = model_and_probe()
    pool = kept_states.one_off()
    assert kept_states.one_off() is pool  # the process's, for every one-off call
    first = arrays(one_off(model, images))
    allocated, reused = pool.allocated, pool.reused
    assert pool.kept_bytes >= 3 * MIN_BYTES
    assert lazily_free_bytes() >= 0.9 * pool.kept_bytes  # held, but the system may take it back
    second = one_off(model, images)
    assert pool.allocated == allocated and pool.reused - reused >= 3  # every block served again, none new
    assert_same(arrays(second), first)
    monkeypatch.setenv(kept_states.ENVIRONMENT_VARIABLE, "0")
    assert not isinstance(kept_states.one_off(), OneOffStates)
    assert_same(arrays(one_off(model, images)), first)  # states of its own, given back: the same numbers
    assert pool.allocated == allocated
    monkeypatch.setenv(kept_states.ENVIRONMENT_VARIABLE, "maybe")
    with pytest.raises(ValueError, match=kept_states.ENVIRONMENT_VARIABLE):
        kept_states.one_off()


def test_one_off_measurements_keep_nothing_under_a_memory_budget():
    model, images = model_and_probe()
    pool = kept_states.one_off()
    allocated, reused = pool.allocated, pool.reused
    one_off(model, images, memory_budget="8GB")
    assert (pool.allocated, pool.reused) == (allocated, reused)


def test_blocks_no_measurement_used_since_are_let_go_least_recently_used_first():
    pool = OneOffStates(unused_bytes=3 * MIN_BYTES)

    def measurement(*megabytes):
        with pool.serving():
            for m in megabytes:
                kept_states.zeros((m * MIN_BYTES // 8,), torch.float64, "cpu")

    measurement(1, 2)
    measurement(3)  # 1 and 2 unused: 3 MB, within the bound
    assert sorted(pool._free) == [(m * MIN_BYTES // 8, torch.float64) for m in (1, 2, 3)]
    measurement(4)  # unused: 3 (newest) then 1 and 2: 1 and 2 go
    assert sorted(pool._free) == [(m * MIN_BYTES // 8, torch.float64) for m in (3, 4)]
    measurement(3)  # served again; 4 unused, over the bound alone: it goes
    assert pool.reused == 1 and pool.kept_bytes == 3 * MIN_BYTES
    measurement()
    assert pool.kept_bytes == 3 * MIN_BYTES
    measurement(1)
    measurement(2)  # unused: 1 (newer) then 3: 3 goes
    assert sorted(pool._free) == [(m * MIN_BYTES // 8, torch.float64) for m in (1, 2)]


def test_a_pool_serving_one_measurement_gives_another_threads_states_of_their_own():
    pool = OneOffStates(unused_bytes=0)
    started, done = threading.Event(), threading.Event()
    theirs = []

    def other():
        started.wait()
        with pool.serving():
            theirs.append(kept_states.zeros((MIN_BYTES // 8,), torch.float64, "cpu"))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with pool.serving():
        mine = kept_states.zeros((MIN_BYTES // 8,), torch.float64, "cpu")
        started.set()
        done.wait(30)
    thread.join()
    held = pool._free[(MIN_BYTES // 8, torch.float64)]
    assert pool.allocated == 1 and len(held) == 1 and held[0].data_ptr() == mine.data_ptr()
    assert theirs and theirs[0].data_ptr() != mine.data_ptr()
