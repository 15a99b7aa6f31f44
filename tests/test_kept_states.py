"""A session's measurements on CPU reuse the memory of the previous one's streaming states, and measure()'s
calls that of the calls before: the same numbers bit for bit, nothing allocated anew, results already
returned untouched, nothing kept under a memory budget (``kept_states.py``)."""
from __future__ import annotations

import numpy as np
import torch

import tm_tensorboard as tm
from tm_tensorboard import kept_states, native
from tm_tensorboard.engine import Measurement
from tm_tensorboard.kept_states import MIN_BYTES, KeptStates
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


def test_reused_blocks_are_zeroed_by_the_streaming_kernel_with_the_same_numbers(monkeypatch):
    """Where the CPU kernels are at hand, a kept block is zeroed by native.zero_fill (streaming stores), and
    the eager updates that read their states then give the numbers of fresh states."""
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "1")
    native._ZERO.get()
    zeroed = []

    def zero_fill(block):
        zeroed.append(native_zero_fill(block))
        return zeroed[-1]

    native_zero_fill = native.zero_fill
    monkeypatch.setattr(native, "zero_fill", zero_fill)
    model, images = model_and_probe()
    measurement = session(model)
    first = arrays(measurement.run(as_probe(images)))
    assert not zeroed  # nothing kept yet
    second = arrays(measurement.run(as_probe(images)))
    assert len(zeroed) == measurement.kept_states.reused and all(zeroed)
    assert_same(second, first)


def test_a_compiled_warm_up_readies_the_zeroing_kernel(monkeypatch):
    """A Monitor's warm-up (compiled, CPU) builds or loads the kept states' zeroing kernel, so that its first
    measurement, which reuses the warm-up's blocks, does not wait on it."""
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "1")
    unready = native._Kernel(native._ZERO.name, native._ZERO.source, native._ZERO.arguments)
    monkeypatch.setattr(native, "_ZERO", unready)
    model, images = model_and_probe()
    measurement = Measurement(model, tm.transforms.rotations(4), measures=("invariance",), batch_size=8,
                              compile=True)
    assert unready._call is None
    measurement.warm_up(as_probe(images))
    assert unready._call is not None


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


def one_off(model, images, **keywords):
    return tm.measure(model, images, tm.transforms.rotations(4), measures=MEASURES, batch_size=8, compile=False,
                      **{"error_bars": 2, **keywords})


def test_one_off_measurements_reuse_the_previous_calls_state_memory(monkeypatch):
    """measure() calls share the process's KeptStates: a second call allocates no state anew and gives the same
    numbers bit for bit as a call that keeps nothing; release_memory() lets the blocks go."""
    model, images = model_and_probe()
    tm.release_memory()
    shared = kept_states._ONE_OFF
    first = arrays(one_off(model, images))
    allocated, reused = shared.allocated, shared.reused
    assert shared.kept_bytes >= 3 * MIN_BYTES
    second = arrays(one_off(model, images))
    assert shared.allocated == allocated and shared.reused > reused
    assert_same(second, first)
    monkeypatch.setenv("TM_TENSORBOARD_KEEP_FREED_MEMORY", "0")
    kept = shared.kept_bytes
    assert_same(arrays(one_off(model, images)), first)
    assert shared.allocated == allocated and shared.kept_bytes == kept  # the switch: a KeptStates of its own
    tm.release_memory()
    assert shared.kept_bytes == 0


def test_one_off_measurements_keep_earlier_calls_blocks_within_their_cap(monkeypatch):
    """Calls of different configurations in turn (with and without error bars) each find their blocks again;
    what is held never passes ONE_OFF_BYTES, the last call's blocks first."""
    model, images = model_and_probe()
    tm.release_memory()
    shared = kept_states._ONE_OFF
    one_off(model, images, error_bars=False)
    plain = shared.kept_bytes
    one_off(model, images)
    both = shared.kept_bytes
    assert both > plain
    allocated = shared.allocated
    one_off(model, images, error_bars=False)
    one_off(model, images)
    assert shared.allocated == allocated and shared.kept_bytes == both
    monkeypatch.setattr(shared, "cap", plain)
    one_off(model, images, error_bars=False)
    assert shared.kept_bytes == plain  # the last call's blocks, nothing of the call before
    tm.release_memory()


def test_a_measurement_under_a_memory_budget_lets_go_of_what_one_off_calls_kept():
    model, images = model_and_probe()
    one_off(model, images)
    assert kept_states._ONE_OFF.kept_bytes > 0
    one_off(model, images, memory_budget="8GB")
    assert kept_states._ONE_OFF.kept_bytes == 0


def test_a_one_off_measurement_while_another_holds_the_kept_memory_uses_its_own():
    model, images = model_and_probe()
    tm.release_memory()
    one_off(model, images)
    shared = kept_states._ONE_OFF
    allocated, kept = shared.allocated, shared.kept_bytes
    with kept_states.one_off(model, tuple(images.shape[1:])) as held:  # (as another thread's measurement would)
        assert held is shared
        one_off(model, images)
    assert shared.allocated == allocated and shared.kept_bytes == kept
    tm.release_memory()


def test_a_one_off_measurement_of_another_model_or_sample_shape_lets_go_first():
    """Blocks kept for one model are let go before another model's (or another sample shape's) states are
    allocated, so that they cannot keep its allocations from reusing that memory."""
    model, images = model_and_probe()
    other, _ = model_and_probe()
    tm.release_memory()
    shared = kept_states._ONE_OFF
    before = shared.allocated
    one_off(model, images)
    kept, blocks = shared.kept_bytes, shared.allocated - before
    one_off(other, images)  # the same sizes, but another model: nothing reused
    assert shared.allocated - before == 2 * blocks and shared.kept_bytes == kept
    smaller = torch.nn.functional.interpolate(images, size=24)
    one_off(other, smaller)  # another sample shape
    assert 0 < shared.kept_bytes < kept
    allocated = shared.allocated
    one_off(other, smaller)  # the same model and shape again: every block reused
    assert shared.allocated == allocated
    tm.release_memory()
