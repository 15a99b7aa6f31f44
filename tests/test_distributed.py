"""torch.distributed (gloo, 2 and 3 CPU processes): exact merge across ranks, rank 0 writes, no hangs."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tm_tensorboard as tm
from tm_tensorboard import metadata
from logs import ctx, provider
from models import small_cnn

pytestmark = pytest.mark.usefixtures("kernels")  # every test with the eager and the compiled updates

WORKER = Path(__file__).parent / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out: Path, timeout: float = 480) -> None:
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), scenario, str(rank), str(world), str(port), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(world)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"{scenario} with {world} ranks hung")
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)


def probe(n):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3


def assert_matches(path: Path, result: tm.MeasureResult, lie_rtol: float = 1e-6) -> None:
    saved = np.load(path)
    expected_keys = {f"{m}|{layer}" for m in result.measures for layer in result.layers_of(m)}
    assert set(saved.files) - {"accuracy"} == expected_keys
    for key in expected_keys:
        measure, layer = key.split("|")
        rtol = lie_rtol if measure.startswith("lie_") else 1e-6
        np.testing.assert_allclose(saved[key], result.get(measure, layer, per="element"), rtol=rtol, atol=1e-12, err_msg=key)
    if result.accuracy is not None:
        np.testing.assert_array_equal(saved["accuracy"], result.accuracy)


@pytest.mark.parametrize("world", [2, 3])
def test_results_equal_single_process(tmp_path, world):
    launch("measure", world, tmp_path)
    model = small_cnn(seed=3)
    images, labels = probe(13)
    both = ("invariance", "same_equivariance", "accuracy")
    plain = tm.measure(model, (images, labels), tm.transforms.rotations(4), measures=both, batch_size=1)
    stratified = tm.measure(model, (images, labels), tm.transforms.rotations(4), stratified=True, batch_size=1)
    for rank in range(world):  # every rank gets the same, complete result
        assert_matches(tmp_path / f"plain_{rank}.npz", plain)
        assert_matches(tmp_path / f"stratified_{rank}.npz", stratified)


@pytest.mark.parametrize("world", [2, 3])
def test_error_bars_equal_single_process(tmp_path, world):
    """Every error-bar shard is split across the ranks and merged at its end: values and standard errors
    equal one process's."""
    launch("error_bars", world, tmp_path)
    model = small_cnn(seed=3)
    images, labels = probe(32)
    for name, kwargs in (("plain", {}), ("stratified", {"stratified": True})):
        single = tm.measure(model, (images, labels), tm.transforms.rotations(4), batch_size=1, error_bars=2,
                            measures=("invariance", "lie_rotation"), **kwargs)
        assert single.shards == 2
        for rank in range(world):
            # (the Lie derivative of a near-constant unit, a ratio in the thousands, amplifies the float32
            # rounding of forward-mode convolutions that differs between one thread and several)
            assert_matches(tmp_path / f"bars_{name}_{rank}.npz", single, lie_rtol=1e-4)
            saved = np.load(tmp_path / f"bars_{name}_stderr_{rank}.npz")
            for key in saved.files:
                measure, layer, per = key.split("|")
                np.testing.assert_allclose(saved[key], single.stderr(measure, layer, per=per), rtol=1e-4,
                                           atol=1e-12, err_msg=key)


def test_grouped_passes_equal_one_pass_on_every_rank(tmp_path):
    """Under a memory budget that takes several passes, every rank measures each pass's layers over its part
    of the probe, merged as in one pass: the same numbers and standard errors as one pass, exactly, and
    those of one process."""
    launch("passes", 2, tmp_path)
    images, labels = probe(32)
    single = tm.measure(small_cnn(seed=3), (images, labels), tm.transforms.rotations(4), batch_size=1, error_bars=2,
                        measures=("invariance", "same_equivariance", "accuracy"), noise_floor=True)
    for rank in range(2):
        for name in ("", "stderr_"):
            grouped, one = np.load(tmp_path / f"passes_{name}{rank}.npz"), np.load(tmp_path / f"one_{name}{rank}.npz")
            assert grouped.files == one.files and len(one.files) > 10
            for key in one.files:
                np.testing.assert_array_equal(grouped[key], one[key], err_msg=key)
        assert_matches(tmp_path / f"passes_{rank}.npz", single)


def test_probe_smaller_than_world(tmp_path):
    launch("small", 3, tmp_path)
    single = tm.measure(small_cnn(seed=3), probe(2)[0], tm.transforms.flips(), batch_size=1)
    for rank in range(3):
        assert_matches(tmp_path / f"small_{rank}.npz", single)


@pytest.mark.parametrize("scenario, pattern", [("mismatch", "RankMismatchError: the ranks measured different things"),
                                               ("failure", "out of memory on rank 1")])
def test_mismatch_and_failure_reported_on_every_rank(tmp_path, scenario, pattern):
    launch(scenario, 2, tmp_path, timeout=240)
    for rank in range(2):
        assert pattern in (tmp_path / f"error_{rank}.txt").read_text()


def test_ddp_training_loop_logs_match_single_process(tmp_path):
    launch("train", 2, tmp_path)
    assert list((tmp_path / "logs_0" / "run").glob("events.out.tfevents.*"))
    assert not (tmp_path / "logs_1").exists()  # only rank 0 writes
    p = provider(tmp_path / "logs_0")
    data = p.read_tensors(ctx(), experiment_id="", plugin_name=metadata.UNITS_PLUGIN_NAME, downsample=100,
                          run_tag_filter=None)["run"]
    images, labels = probe(12)
    steps = sorted({d.step for series in data.values() for d in series})
    assert steps == [2, 4, 6]
    for step in steps:
        model = small_cnn(seed=3)
        model.load_state_dict(torch.load(tmp_path / f"weights_{step}.pt"))
        single = tm.measure(model, (images, labels), tm.transforms.rotations(4),
                            measures=("invariance", "same_equivariance"), batch_size=6)  # a rank's shard: one chunk
        for measure in single.measures:
            for layer in single.layers_of(measure):
                logged = next(d.numpy for d in data[metadata.unit_tag("invariance", measure, layer)] if d.step == step)
                np.testing.assert_allclose(logged, single.get(measure, layer).astype(np.float32), rtol=1e-5)
