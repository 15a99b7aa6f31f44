"""Per-channel measures from a fixed random subset of positions per channel (``positions=K``): exact when
every position is kept, equal to the brute force on the same positions, unbiased with the stated error
over position seeds, the same positions everywhere, the memory saved, and clear errors."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import tm_tensorboard as tm
from tm_tensorboard import transforms as T
from tm_tensorboard.engine import Measurement, estimate_memory
from tm_tensorboard.examples.models import VisionTransformer
from tm_tensorboard.positions import sample_positions, standard_error
from tm_tensorboard.probe import as_probe
from models import small_cnn
from reference import activation_matrix, tv_sv
from test_fused import _HostReads

# uniform-noise probes reach the border that rotations with padding="border" (tmeasures' default) smear
pytestmark = pytest.mark.filterwarnings("ignore:tm_tensorboard. the probe's images have content at their border")

DEFAULT = ("invariance", "same_equivariance")


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _at(values: np.ndarray, picked: torch.Tensor, channels_last: bool = False) -> np.ndarray:
    """Per-element values [C, *positions] (or [positions, C]) at each channel's picked positions: [C, K]."""
    flat = values.reshape(values.shape[0], -1) if not channels_last else values.reshape(-1, values.shape[-1]).T
    return np.take_along_axis(flat, picked.numpy(), axis=1)


def _assert_same(a: tm.MeasureResult, b: tm.MeasureResult, rtol: float = 0.0) -> None:
    assert a.layers == b.layers
    for measure in a.measures:
        for layer in a.layers_of(measure):
            np.testing.assert_allclose(a.get(measure, layer), b.get(measure, layer), rtol=rtol, atol=0,
                                       err_msg=f"{measure} {layer}")


def test_keeping_every_position_is_the_exact_measurement():
    model, x, tset = small_cnn().eval(), _images(10), T.rotations(4)
    exact = tm.measure(model, x, tset, measures=DEFAULT, compile=False)
    every = tm.measure(model, x, tset, measures=DEFAULT, compile=False, positions=16 * 16)
    assert all(every.layer_info(layer).positions is None for layer in every.layers)
    _assert_same(exact, every)  # bit for bit
    some = tm.measure(model, x, tset, measures=DEFAULT, compile=False, positions=64)
    sampled = [layer for layer in some.layers if some.layer_info(layer).positions == 64]
    assert sampled == ["0", "1"]  # [6, 16, 16]; the [C, 8, 8] maps have 64 positions: all kept, exactly
    for layer in some.layers:
        if layer not in sampled:
            for measure in ("nvi", "tvi", "svi", "nvse"):
                if layer in some.layers_of(measure):
                    np.testing.assert_array_equal(some.get(measure, layer), exact.get(measure, layer))


@pytest.mark.parametrize(("batch_size", "compile"), [(1, False), (3, False), (16, False), (3, True)])
def test_equals_the_brute_force_on_the_same_positions(batch_size, compile):
    """Each channel's values are those of the brute-force measures (every activation kept, numpy) on its
    sampled positions only: TV and SV averaged over them, then divided; same-equivariance moves the whole
    map back first (torch.rot90), then keeps the positions. Any chunk size, eager or compiled updates."""
    model, x, tset, k, seed = small_cnn().eval(), _images(7, seed=1), T.rot90(), 20, 5
    result = tm.measure(model, x, tset, measures=DEFAULT, compile=compile, positions=k, positions_seed=seed,
                        batch_size=batch_size)
    layers = ["0", "1", "3"]

    def one(image, t):
        return torch.rot90(image, t, dims=(2, 3)) if t < 4 else None

    plain = activation_matrix(model, x, one, layers)
    moved = activation_matrix(model, x, one, layers, undo=lambda y, t: torch.rot90(y, -t, dims=(2, 3)))
    for layer in layers:
        shape = result.layer_info(layer).unit_shape
        assert result.layer_info(layer).positions == k
        picked = sample_positions(layer, shape[0], shape[1] * shape[2], k, seed)
        for A, names in ((plain, ("tvi", "svi", "nvi")), (moved, ("tvse", "svse", "nvse"))):
            tv, sv = (_at(v, picked).mean(axis=1) for v in tv_sv(A[layer]))
            for name, expected in zip(names, (tv, sv, tv / sv)):
                np.testing.assert_allclose(result.get(name, layer), expected, rtol=2e-5, atol=1e-7,
                                           err_msg=f"{name} {layer}")


def test_equals_the_exact_elements_at_the_positions_on_token_layers():
    """A ViT block's [tokens, D] output keeps positions among the tokens per channel D; its maps (patch_grid)
    among the h·w patches; each channel's values are the exact per-element ones at them, averaged (and the
    per-transformation errors are measured on the tokens' positions too)."""
    torch.manual_seed(0)
    model = VisionTransformer(3, 5, width=0.25, depth=1).eval()
    x, tset, k = _images(6), T.rot90(), 8
    kw = dict(measures=DEFAULT + ("per_transformation",), layers=["blocks.0"], compile=False,
              actions=tm.actions.patch_grid(4, 4, cls_tokens=1))
    exact = tm.measure(model, x, tset, **kw)
    sampled = tm.measure(model, x, tset, positions=k, **kw)
    tokens, dim = exact.layer_info("blocks.0").unit_shape
    on_tokens = sample_positions("blocks.0", dim, tokens, k, 0)
    on_maps = sample_positions("blocks.0", dim, 16, k, 0)
    for tv, sv, nv, picked, last in (("tvi", "svi", "nvi", on_tokens, True), ("tvse", "svse", "nvse", on_maps, False)):
        a = _at(exact.get(tv, "blocks.0", per="element"), picked, last).mean(axis=1)
        b = _at(exact.get(sv, "blocks.0", per="element"), picked, last).mean(axis=1)
        # (float32 sums over transformations round differently on a gathered tensor than on the whole one)
        np.testing.assert_allclose(sampled.get(tv, "blocks.0"), a, rtol=1e-6)
        np.testing.assert_allclose(sampled.get(nv, "blocks.0"), a / b, rtol=1e-6)
    ie = sampled.get("ie_t", "blocks.0")
    assert ie.shape == (4, dim) and np.all(ie[0] == 0) and np.all(ie[1:] > 0)


def test_unbiased_with_the_stated_error_over_position_seeds():
    """A small random CNN on a fixed probe: over 40 position seeds, the mean of each channel's subsampled
    tvi and nvi is the exact value within 4 standard errors of that mean (plus the ratio estimator's
    O(1/K) bias, from Cochran's formula), and their spread over seeds is the stated standard error
    (``positions.standard_error``: finite-population corrected; delta method for the ratio) within what 40
    draws allow. P = 256 positions (layer 0) and 64 (layer 3, where the correction is √(32/63))."""
    model, x, tset, k, seeds = small_cnn().eval(), _images(24), T.rotations(4), 32, 40
    layers = ["0", "3"]
    kw = dict(measures=("invariance",), layers=layers, compile=False)
    exact = tm.measure(model, x, tset, **kw)
    runs = [tm.measure(model, x, tset, positions=k, positions_seed=seed, **kw) for seed in range(seeds)]
    for layer in layers:
        tv, sv = (exact.get(m, layer, per="element") for m in ("tvi", "svi"))
        tv, sv = tv.reshape(len(tv), -1), sv.reshape(len(sv), -1)
        count = tv.shape[1]
        ratio = tv.mean(axis=1) / sv.mean(axis=1)
        covariance = ((tv - tv.mean(1, keepdims=True)) * (sv - sv.mean(1, keepdims=True))).sum(1) / (count - 1)
        bias = (1 - k / count) / k * (ratio * sv.var(axis=1, ddof=1) - covariance) / sv.mean(axis=1) ** 2
        for measure, stated, offset in (("tvi", standard_error(tv, k), 0.0), ("nvi", standard_error(tv, k, sv), bias)):
            values = np.array([r.get(measure, layer) for r in runs])  # [seeds, channels]
            assert np.all(values.std(axis=0) > 0), "the seeds drew the same positions"
            error = values.mean(axis=0) - exact.get(measure, layer)
            allowed = 4 * stated / np.sqrt(seeds) + np.abs(offset)
            assert np.all(np.abs(error) <= allowed), (measure, layer, error / stated)
            spread = values.std(axis=0, ddof=1) / stated
            assert np.all((spread > 0.6) & (spread < 1.5)), (measure, layer, spread)
            pooled = np.sqrt(np.mean(spread**2))  # 39 × channels degrees of freedom: sd ≈ 0.04
            assert 0.8 < pooled < 1.2, (measure, layer, pooled)


def test_error_bars_compose():
    """With error bars the same positions are kept in every shard: the values equal those without, and
    each channel and layer mean has a standard error."""
    model, x, tset = small_cnn().eval(), _images(35, seed=2), T.rotations(4)
    kw = dict(measures=DEFAULT, compile=False, positions=16, batch_size=5)
    plain = tm.measure(model, x, tset, **kw)
    bars = tm.measure(model, x, tset, error_bars=2, **kw)
    _assert_same(plain, bars, rtol=1e-6)  # (the shards reorder the probe: other float32 chunk sums)
    assert bars.shards == 2
    assert np.isfinite(bars.stderr("nvi", "0", per="channel")).all() and np.isfinite(bars.stderr("nvse", "3"))


def test_same_positions_every_run_step_and_process():
    """The positions are a function of the layer's name, shape and the seed: every run (a Monitor step is
    one), every chunk and every rank (another process) keeps the same ones; the global RNG is untouched."""
    model, x, tset = small_cnn().eval(), _images(8), T.rotations(4)
    session = Measurement(model, tset, measures=DEFAULT, compile=False, positions=10, positions_seed=3)
    probe = as_probe(x)
    state = torch.get_rng_state()
    first, second = session.run(probe), session.run(probe)
    assert torch.equal(state, torch.get_rng_state())
    _assert_same(first, second)
    other = tm.measure(model, x, tset, measures=DEFAULT, compile=False, positions=10, positions_seed=4)
    assert not np.array_equal(first.get("nvi", "0"), other.get("nvi", "0"))
    here = sample_positions("layer1.0.conv1", 4, 100, 7, 3)
    code = ("from tm_tensorboard.positions import sample_positions; "
            "print(sample_positions('layer1.0.conv1', 4, 100, 7, 3).tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert eval(there) == here.tolist()
    assert here.shape == (4, 7) and all(len(set(row)) == 7 for row in here.tolist())  # without replacement


_RANK = """
import sys
import numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
import tm_tensorboard as tm
from models import small_cnn
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=world)
try:
    x = torch.rand(9, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = tm.measure(small_cnn().eval(), x, tm.transforms.rotations(4), measures=("invariance", "same_equivariance"),
                        compile=False, positions=10, positions_seed=2, batch_size=1)
    values = {{f"{{m}}|{{l}}": result.get(m, l) for m in result.measures for l in result.layers_of(m)}}
    np.savez(f"{{out}}/{{rank}}.npz", **values)
finally:
    dist.destroy_process_group()
"""


def test_ranks_keep_the_same_positions(tmp_path):
    """Two gloo ranks, each streaming its half of the probe: their states merge (same [C, K] positions in
    every process) into the single-process result."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK.format(tests=os.path.dirname(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [rank.communicate(timeout=240)[0] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(outputs)
    x = _images(9, seed=0)
    alone = tm.measure(small_cnn().eval(), x, T.rotations(4), measures=DEFAULT, compile=False, positions=10,
                       positions_seed=2, batch_size=1)
    for r in range(2):
        saved = np.load(tmp_path / f"{r}.npz")
        assert set(saved.files) == {f"{m}|{l}" for m in alone.measures for l in alone.layers_of(m)}
        for key in saved.files:
            np.testing.assert_allclose(saved[key], alone.get(*key.split("|")), rtol=1e-6, err_msg=key)


def test_chunk_path_reads_nothing_back():
    groups = ("invariance", "same_equivariance", "per_transformation", "goodfellow")
    session = Measurement(small_cnn(), T.rotations(4), measures=groups, batch_size=4, stratified=True, positions=9)
    probe = as_probe(torch.randn(9, 3, 8, 8), labels=torch.arange(9) % 3)
    observers = {}
    with _HostReads() as reads:
        for phase in session.phases:
            session.stream(probe, [0, 1, 2], phase, observers, None, compiled=False)
            for observer in observers.values():
                for m in observer.measures.values():
                    m.finish(phase)
    assert reads.seen == []
    assert observers["0"].measures["invariance"].unit_shape == (6, 9)


def test_memory_estimate_shrinks_and_a_budget_sees_it():
    model, x, tset = small_cnn().eval(), _images(4), T.rotations(4)
    exact = estimate_memory(model, x, tset, measures=DEFAULT)
    sampled = estimate_memory(model, x, tset, measures=DEFAULT, positions=16)
    for full, part in zip(exact.layers, sampled.layers):
        if len(full.unit_shape) < 3:
            assert part.state_bytes == full.state_bytes
            continue
        count = full.unit_shape[1] * full.unit_shape[2]
        share = min(16, count) / count  # layers with at most 16 positions per channel keep all
        for group in DEFAULT:  # states per element, plus two sample counts per state set
            assert part.by_group[group] - 16 == pytest.approx((full.by_group[group] - 16) * share), (full.name, group)
    budget = (exact.state_bytes + sampled.state_bytes) // 2 + exact.working_bytes
    exact64 = dict(measures=DEFAULT, memory_budget=budget, state_dtype=torch.float64)
    assert len(estimate_memory(model, x, tset, **exact64).passes()) > 1
    assert len(estimate_memory(model, x, tset, positions=16, **exact64).passes()) == 1


@pytest.mark.parametrize("positions", [0, -3, 2.5, True, "8"])
def test_bad_positions_are_a_clear_error(positions):
    with pytest.raises(ValueError, match="positions must be None .*, an int >= 1 .* or 'auto'"):
        tm.measure(small_cnn(), _images(4), T.rotations(4), positions=positions)


@pytest.mark.parametrize("group", ["equivariance_error", "anova", "lie_rotation"])
def test_measures_of_whole_maps_are_refused(group):
    with pytest.raises(ValueError, match=f"positions= cannot measure {group}"):
        tm.measure(small_cnn(), _images(4), T.rotations(4), measures=("invariance", group), positions=8)


def test_no_per_element_values_of_sampled_layers():
    result = tm.measure(small_cnn(), _images(4), T.rotations(4), measures=("invariance",), positions=8, compile=False)
    with pytest.raises(ValueError, match="layer '0' was measured on 8 sampled positions per channel"):
        result.get("nvi", "0", per="element")
    assert result.get("nvi", "11", per="element").shape == (5,)  # logits: no positions, all kept


def test_monitor_measures_the_same_positions_at_every_step(tmp_path):
    model, x, tset = small_cnn().eval(), _images(8), T.rotations(4)
    with tm.Monitor(model, x, tset, logdir=tmp_path / "run", every=1, measures=DEFAULT, compile=False,
                    positions=12, positions_seed=7) as monitor:
        assert [info.positions for info in monitor.layers[:2]] == [12, 12]
        first, second = monitor.step(0), monitor.step(1)
    _assert_same(first, second)
    alone = tm.measure(model, x, tset, measures=DEFAULT, compile=False, positions=12, positions_seed=7)
    _assert_same(first, alone)
    config = tm.read(tmp_path)["run"].config  # the logs say which layers are estimates, and how
    assert [layer["positions"] for layer in config["layers"]] == [info.positions or 0 for info in monitor.layers]
    assert config["positions_seed"] == 7 and config["state_dtype"] == "float64"


def test_monitor_fits_its_budget_and_logs_what_it_chose(tmp_path):
    """A Monitor under memory_budget with positions="auto" measures with what fit chose, and its run config
    records it: float32 states, the sampled positions per layer."""
    model, x, tset = small_cnn().eval(), _images(8), T.rotations(4)
    kw = dict(measures=DEFAULT, compile=False, error_bars=False)
    f32 = estimate_memory(model, x, tset, state_dtype=torch.float32, positions=16, **kw)
    with pytest.warns(UserWarning, match="float32 states .* and positions=16 sampled per channel"):
        monitor = tm.Monitor(model, x, tset, logdir=tmp_path / "run", every=1, positions="auto",
                             memory_budget=f32.total_bytes, **kw)
    with monitor:
        assert [info.positions for info in monitor.layers[:2]] == [16, 16]
        logged = monitor.step(0)
    _assert_same(logged, tm.measure(model, x, tset, state_dtype=torch.float32, positions=16, **kw))
    config = tm.read(tmp_path)["run"].config
    assert [layer["positions"] for layer in config["layers"]] == [info.positions or 0 for info in monitor.layers]
    assert config["state_dtype"] == "float32"
