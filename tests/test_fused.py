"""The fused statistics: what a GPU would launch per layer and chunk, no host syncs, the compiler's
fallback, when measure() compiles, and updates that never write into the activations."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tm_tensorboard as tm
from tm_tensorboard import fused, native
from tm_tensorboard import transforms as T
from tm_tensorboard.engine import Measurement
from tm_tensorboard.examples.models import ResNet18Style, SimpleCNN
from tm_tensorboard.probe import as_probe
from tm_tensorboard.statistics import AccuracyState
from launches import COMPILED_REGION, top_level_ops
from models import small_cnn

# Ops a GPU would launch per observed layer for each further chunk (T = 16, batch_size = 16; 8 chunks
# against 4), counted as in launches.py with the forward's own ops subtracted: what grows with the probe.
# Once-per-measurement work (checking the probe, finalizing) is not in it. Reached: 1.4 / 1.1 (invariance)
# and 3.8 / 4.1 (invariance + same-equivariance) for SimpleCNN / ResNet18Style(width=0.25); 2.9 / 3.0 when
# grid_sample moved the maps back in one op, where the compiled taps (warps.py) take two kernels, the
# layout change and the taps, ~2.5× faster on CPU. Counted with the
# finalizing amortized over 4 chunks: 7.1 / 6.5 and 11.7 / 12.1 (5.0 / 4.6 and 8.1 / 8.5 before checking
# the states for NaN / inf when finalizing); before the fused updates 119 and 235.
# The chunk path is counted without error bars; their shards (K = 8 per measurement by default) are
# counted apart, per observed layer and shard: at the shard's end fresh states, when finalizing a merge into
# the totals, the leave-one-out states, their values and their reduction per channel (the jackknife). Reached
# for SimpleCNN: 16.1 (invariance) and 17.8 (+ same-equivariance), 3 of them views carving each shard's states
# out of one block (no kernel); 16.2 / 26.9 when each shard was merged and left out in its own call, 23.3 for
# invariance with Inductor's cache cold (a clean machine); random groups reached 9.2 / 15.1.
BUDGET = {("invariance",): 2, ("invariance", "same_equivariance"): 5}
SHARD_END_BUDGET = {("invariance",): 25, ("invariance", "same_equivariance"): 45}
MODELS = {"SimpleCNN": lambda: SimpleCNN(3, 10), "ResNet18Style": lambda: ResNet18Style(3, 10, width=0.25)}


def _ops_per_layer_per_chunk(model, measures, compile, t=16, batch_size=16):
    tset = T.rotations(t)

    def extra_ops(chunks: int):
        torch.manual_seed(0)
        probe = torch.rand(chunks * batch_size, 3, 32, 32)
        measured = top_level_ops(lambda: tm.measure(model, probe, tset, measures=measures, batch_size=batch_size,
                                                     compile=compile, error_bars=False))
        batches = [tset.apply(probe[i : i + batch_size]) for i in range(0, len(probe), batch_size)]

        def forward_only():
            with torch.no_grad():
                for batch in batches:
                    model(batch)

        return sum(measured.values()) - sum(top_level_ops(forward_only).values()), measured

    layers = len(tm.measure(model, torch.rand(2, 3, 32, 32), tset, measures=measures, compile=compile).layers)
    few, _ = extra_ops(4)
    more, measured = extra_ops(8)
    return (more - few) / (layers * 4), measured


@pytest.mark.parametrize("measures", list(BUDGET), ids=["invariance", "default"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_ops_per_layer_per_chunk_within_budget(name, measures, monkeypatch):
    """What a GPU would launch: the compiled graphs, without the CPU kernel of native.py (CPU only)."""
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0")
    model = MODELS[name]().eval()
    per_layer_chunk, measured = _ops_per_layer_per_chunk(model, measures, compile=True)
    assert measured[COMPILED_REGION] > 0, "nothing ran compiled"
    assert per_layer_chunk <= BUDGET[measures], f"{per_layer_chunk:.2f} ops per layer and chunk: {measured.most_common(12)}"


@pytest.mark.parametrize("measures", list(SHARD_END_BUDGET), ids=["invariance", "default"])
def test_compiled_ops_per_layer_per_shard_end_within_budget(measures, monkeypatch):
    """Error bars cost ops at each of the K shards' ends, none on the chunk path (as a GPU runs them)."""
    monkeypatch.setenv(native.ENVIRONMENT_VARIABLE, "0")
    model, tset = SimpleCNN(3, 10).eval(), T.rotations(16)
    torch.manual_seed(0)
    probe = torch.rand(128, 3, 32, 32)
    layers = len(tm.measure(model, probe[:2], tset, measures=measures, compile=True).layers)
    run = lambda bars: tm.measure(model, probe, tset, measures=measures, batch_size=16, compile=True,  # noqa: E731
                                  error_bars=bars)
    run(8)  # compiled first: compiling ahead of time dispatches ops (on fake tensors) that no GPU launches
    counts = [sum(top_level_ops(lambda: run(bars)).values()) for bars in (8, False)]
    per_shard_end = (counts[0] - counts[1]) / (layers * 8)
    assert 0 < per_shard_end <= SHARD_END_BUDGET[measures], per_shard_end


def test_eager_ops_per_chunk_do_not_grow_with_transformations_or_batch():
    """The eager path is vectorized: one more chunk costs the same ops whatever T and the chunk size."""
    model = small_cnn().eval()

    def per_chunk(t: int, batch_size: int) -> int:
        counts = []
        for chunks in (1, 2):
            probe = torch.randn(batch_size * chunks, 3, 12, 12)
            tset = T.rotations([10.0 * k for k in range(t)])  # all interpolated (multiples of 90° are gathers)
            run = lambda: tm.measure(model, probe, tset, measures=("invariance", "same_equivariance"),  # noqa: E731
                                     batch_size=batch_size, compile=False)
            counts.append(sum(top_level_ops(run).values()))
        return counts[1] - counts[0]

    assert per_chunk(4, 2) == per_chunk(16, 2) == per_chunk(4, 8)


class _HostReads(TorchDispatchMode):
    """Counts ops that read a tensor's values back to the host or whose output shape depends on values."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _weighted(x, k, out, scratch=None):
    """x·(1 + 2 + … + k) into out, by a loop Dynamo specializes on k."""
    total = x
    for i in range(1, k):
        total = total + x * (i + 1)
    out.copy_(total)


def _results(f, x):
    got, expected = [], []
    for k in (2, 3, 2):
        out = torch.empty_like(x)
        f(True, x, k, out)
        got.append(out)
        expected.append(x * (k * (k + 1) // 2))
    return got, expected


def test_graphs_compiled_ahead_of_time_serve_only_what_their_guards_pass(monkeypatch):
    """Fused functions run as graphs compiled ahead of time, without Dynamo's frame evaluation (a third of
    the host's time per call): a call whose arguments a graph's guards reject gets a graph of its own, and
    where compiling ahead of time is unavailable, Dynamo's call serves, with the same numbers."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    x = torch.rand(5, 3)
    ahead = fused.FusedFunction(_weighted)
    got, expected = _results(ahead, x)
    torch.testing.assert_close(got, expected)
    assert [len(graphs) for graphs in ahead._ahead.values()] == [2]  # k = 2 and k = 3
    assert not _debug_get_cache_entry_list(_weighted.__code__)  # Dynamo never evaluated the frame

    monkeypatch.setattr(fused._AHEAD, "failed", "unavailable here")
    called = fused.FusedFunction(_weighted)
    got, expected = _results(called, x)
    torch.testing.assert_close(got, expected)
    assert not called._ahead and len(_debug_get_cache_entry_list(_weighted.__code__)) == 2


def test_the_graph_that_served_these_sizes_is_checked_first(monkeypatch):
    """Where one kind of arguments has several graphs (their guards split sizes: on ResNet18Style, invariance's
    update has one for layers of 8,192 units or more and one for smaller layers), the graph that served the same
    sizes before is checked first, so each call checks one graph's guards (a failing check costs the host ~14 µs,
    and the host's time per layer and chunk is what a GPU waits on)."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    checked = []
    check = AOTCompiledFunction.guard_check
    monkeypatch.setattr(AOTCompiledFunction, "guard_check",
                        lambda graph, *args, **kwargs: checked.append(graph) or check(graph, *args, **kwargs))
    x = torch.rand(5, 3)
    weighted = fused.FusedFunction(_weighted)
    for k in (2, 3, 2, 3):  # each k's graph compiled (or loaded from the store) and found
        weighted(True, x, k, torch.empty_like(x))
    assert [len(graphs) for graphs in weighted._ahead.values()] == [2]
    checked.clear()
    for k in (2, 3, 3, 2, 3):
        out = torch.empty_like(x)
        weighted(True, x, k, out)
        torch.testing.assert_close(out, x * (k * (k + 1) // 2))
    assert len(checked) == 5


def _doubled(x, out, scratch=None):
    """2·x into out."""
    out.copy_(x * 2)


class _Seen(TorchDispatchMode):
    """The aten ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def test_under_a_dispatch_mode_the_eager_function_serves_and_compiling_goes_on():
    """No compiled graph serves under a TorchDispatchMode (an op counter, FlopCounterMode): a stored graph's guards
    fail there, a graph compiled there passes only such a mode's and took a slot of the store (which once full left
    later processes without graphs ahead of time), and Dynamo's call finds no frame to compile (under fullgraph an
    error that gave compiling up for the whole process). The eager function serves those calls, the mode sees its
    ops, nothing is compiled or stored, and the graph serves again after the mode."""
    x = torch.rand(5, 3)
    doubled = fused.FusedFunction(_doubled)
    out = torch.empty_like(x)
    doubled(True, x, out)  # a graph compiled ahead of time, or loaded from the store
    counts, graphs = dict(fused._AHEAD.counts), fused._graph_count()
    eager_calls = []
    doubled.fn = lambda *args, **kwargs: eager_calls.append(1) or _doubled(*args, **kwargs)  # the graph has its own
    for calls in (1, 2):
        out = torch.empty_like(x)
        with _Seen() as seen:
            doubled(True, x, out)
        torch.testing.assert_close(out, 2 * x)
        assert torch.ops.aten.mul in seen.ops and len(eager_calls) == calls
    assert fused._AHEAD.counts == counts and fused._graph_count() == graphs
    assert fused.compile_available() and fused._AHEAD.failed is None
    out = torch.empty_like(x)
    doubled(True, x, out)
    torch.testing.assert_close(out, 2 * x)
    assert len(eager_calls) == 2 and fused._AHEAD.counts == counts  # the graph served


_STORE_CHILD = textwrap.dedent(
    """
    import json, torch
    from tm_tensorboard import fused
    from tm_tensorboard.layer_measures import _variance_update
    x = torch.arange(60, dtype=torch.float32).reshape(3 * 4, 5).sin()
    states = (torch.zeros(5, dtype=torch.float64), torch.zeros((), dtype=torch.int64),
              torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64),
              torch.zeros((), dtype=torch.int64))
    _variance_update(True, x, 4, *states)
    print(json.dumps({"counts": fused._AHEAD.counts, "failed": fused._AHEAD.failed,
                      "states": [t.tolist() for t in states]}))
    """
)


def _fresh_process(script: str, tmp_path, **env) -> dict:
    """Run ``script`` in a new Python process with its own Inductor cache (``tmp_path / "inductor"``, kept
    across calls with the same ``tmp_path``) and the default compile mode; the JSON it prints last."""
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), **env}
    environment.pop("TM_TENSORBOARD_COMPILE", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_graphs_compiled_ahead_of_time_are_stored_for_later_processes(tmp_path):
    """Compiling ahead of time bypasses Inductor's caches, so the graphs are stored (in Inductor's cache
    directory): a later process loads them instead of compiling, and computes the same numbers."""
    runs = [_fresh_process(_STORE_CHILD, tmp_path, TM_TENSORBOARD_NATIVE="0") for _ in range(2)]  # (graphs)
    assert runs[0]["failed"] is None and runs[0]["counts"] == {"compiled": 1, "loaded": 0}
    assert runs[1]["counts"] == {"compiled": 0, "loaded": 1}
    assert runs[1]["states"] == runs[0]["states"]
    assert len(list((tmp_path / "inductor" / "tm_tensorboard").glob("_variance_update-*.graph"))) == 1


_STRICT_WARNINGS_CHILD = textwrap.dedent(
    """
    import json, warnings, torch
    from torch import nn
    import tm_tensorboard as tm
    from tm_tensorboard import fused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tm.measure(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(8, 3, 8, 8),
                   tm.transforms.rotations(4, padding="zeros"), measures=("invariance",), compile=True)
    print(json.dumps({"compiled": fused.compile_available(), "ahead_of_time": fused._AHEAD.failed is None}))
    """
)


def test_a_process_first_compiling_under_strict_warnings_compiles(tmp_path):
    """Compiling imports parts of torch that warn of their own deprecations; under a user's
    warnings.simplefilter("error") that failed the first compile of a process (and then the measurement)."""
    assert _fresh_process(_STRICT_WARNINGS_CHILD, tmp_path) == {"compiled": True, "ahead_of_time": True}


def test_chunk_path_has_no_host_syncs():
    """Streaming every measure group (stratified, noise floor, accuracy) reads nothing back to the host."""
    model = small_cnn()
    probe = as_probe(torch.randn(9, 3, 8, 8), labels=torch.arange(9) % 3)
    groups = ("invariance", "same_equivariance", "equivariance_error", "goodfellow", "anova", "accuracy")
    session = Measurement(model, T.rotations(4), measures=groups, batch_size=4, stratified=True, noise_floor=True)
    observers, accuracy = {}, AccuracyState(4, torch.device("cpu"))
    with _HostReads() as reads:
        for phase in session.phases:
            session.stream(probe, [0, 1, 2], phase, observers, accuracy, compiled=False, shards=[(0, 5), (5, 9)])
            for observer in observers.values():
                for m in observer.measures.values():
                    m.finish(phase)
    assert reads.seen == []
    assert all(len(m.shard_states) == 2 for o in observers.values() for m in o.sharded("transformed"))  # error bars
    assert len(observers) == len(session.discover(probe))  # every layer and the input (noise floor) were measured


def test_equivariance_error_never_writes_into_the_activations():
    """With photometric transformations the moved-back features are the activation itself: measuring
    the equivariance error must not change what later layers see (it did: ee = inf and every later
    layer's nvi off by up to 1.1)."""
    torch.manual_seed(0)
    model, x = small_cnn(), torch.randn(8, 3, 12, 12)
    tset = T.brightness([0, 0.5])
    alone = tm.measure(model, x, tset, measures=("invariance",), compile=False)
    together = tm.measure(model, x, tset, measures=("invariance", "equivariance_error"), compile=False)
    for layer in alone.layers:
        np.testing.assert_array_equal(alone.get("nvi", layer), together.get("nvi", layer))
    assert all(np.isfinite(together.get("ee", layer)).all() for layer in together.layers_of("ee"))


def test_compile_argument_and_environment_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="compile must be True, False or None"):
        tm.measure(small_cnn(), torch.randn(4, 3, 8, 8), T.rotations(2), compile="yes")
    monkeypatch.setenv("TM_TENSORBOARD_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="TM_TENSORBOARD_COMPILE='sometimes': use 1"):
        tm.measure(small_cnn(), torch.randn(4, 3, 8, 8), T.rotations(2))


_CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    sys.path.insert(0, {tests!r})
    import tm_tensorboard as tm
    from tm_tensorboard import fused, transforms as T
    from models import small_cnn
    torch.manual_seed(0)
    model, probe = small_cnn(), torch.randn(32, 3, 8, 8)  # two error-bar shards: finalizing them is compiled too
    out = {{}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, compile in {runs!r}:
            result = tm.measure(model, probe, T.rotations(4), measures=("invariance", "equivariance_error"),
                                batch_size=4, compile=compile)
            out[name] = {{
                "values": [result.get(m, layer, per="element").tolist() for m in ("nvi", "ee")
                           for layer in result.layers_of(m)],
                "compiled_seconds": fused.compiled_seconds(),
                "compile_available": fused.compile_available(),
            }}
    out["warnings"] = [str(w.message) for w in caught if str(w.message).startswith("tm_tensorboard:")]
    print(json.dumps(out))
    """
)


def _child(tmp_path, runs, **env) -> dict:
    return _fresh_process(_CHILD.format(tests=os.path.dirname(__file__), runs=runs), tmp_path, **env)


def test_a_missing_compiler_warns_once_and_measures_eagerly(tmp_path):
    """No C++ compiler (a fresh Inductor cache, so nothing compiled can be reused): compile=True warns
    once, gives the eager numbers, and later measurements go straight to the eager path."""
    out = _child(tmp_path, [("eager", False), ("first", True), ("second", True)], CXX=str(tmp_path / "no-such-c++"))
    assert len(out["warnings"]) == 1 and "eager kernels" in out["warnings"][0]
    assert not out["second"]["compile_available"]
    np.testing.assert_array_equal(np.array(out["first"]["values"], dtype=object), np.array(out["eager"]["values"], dtype=object))
    np.testing.assert_array_equal(np.array(out["second"]["values"], dtype=object), np.array(out["eager"]["values"], dtype=object))


def test_measure_compiles_only_when_asked_or_when_it_pays(tmp_path):
    """A small measurement with the default compile=None runs eagerly (compiling would cost more than it
    saves); compile=True compiles; once compiled, compile=None reuses the kernels."""
    out = _child(tmp_path, [("auto", None), ("compiled", True), ("auto_after", None)])
    assert out["auto"]["compiled_seconds"] == 0
    assert out["compiled"]["compiled_seconds"] > 0
    assert out["auto_after"]["compiled_seconds"] == out["compiled"]["compiled_seconds"]  # nothing new to compile
    assert out["warnings"] == []
    for a, b in zip(out["auto"]["values"], out["compiled"]["values"]):
        np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_near_constant_units_keep_their_precision(batch_size):
    """Units whose spread is 1e-4 of their level (the noise floor of images around 100 under small
    brightness shifts): the sample variance equals a float64 reference from the same float32 values to
    1e-6. Deviations from a float32 chunk mean, merged across chunks, were off by up to 1.1e-4 here."""
    torch.manual_seed(0)
    images = 100 + 0.01 * torch.randn(29, 1, 4, 4)
    tset = T.brightness([0.0, 0.001, 0.003])
    result = tm.measure(nn.Sequential(nn.ReLU()), images, tset, measures=("invariance",), noise_floor=True,
                        batch_size=batch_size)
    values = torch.stack([tset.apply_one(images, t) for t in range(len(tset))], dim=1).double().numpy()
    sv = values.std(axis=0, ddof=1).mean(axis=0)  # [1, 4, 4]
    tv = values.std(axis=1, ddof=1).mean(axis=0)
    np.testing.assert_allclose(result.get("svi", "input", per="element"), sv, rtol=1e-6)
    np.testing.assert_allclose(result.get("tvi", "input", per="element"), tv, rtol=1e-5)


_MONITOR_CHILD = textwrap.dedent(
    """
    import json, sys, tempfile
    import torch
    sys.path.insert(0, {tests!r})
    import tm_tensorboard as tm
    from tm_tensorboard import fused, transforms as T
    from models import small_cnn
    torch.manual_seed(0)
    model, probe = small_cnn(), torch.randn(32, 3, 8, 8)  # two error-bar shards: finalizing them is compiled too
    out = {{}}
    with tempfile.TemporaryDirectory() as logdir:
        for name, compile in (("auto", None), ("compiled", True)):
            monitor = tm.Monitor(model, probe, T.rotations(4), logdir=logdir + "/" + name, compile=compile)
            made = fused.compiled_seconds()
            result = monitor.step(0)
            out[name] = {{"compile_seconds": monitor.compile_seconds, "made": made,
                         "after_step": fused.compiled_seconds(), "shards": result.shards}}
            monitor.close()
    print(json.dumps(out))
    """
)


def test_a_monitor_compiles_when_made_and_only_when_it_pays(tmp_path):
    """A small Monitor measures eagerly (ten measurements would not repay compiling); with compile=True it
    compiles when it is made, says how long that took, and its measurements compile nothing more."""
    out = _fresh_process(_MONITOR_CHILD.format(tests=os.path.dirname(__file__)), tmp_path)
    assert out["auto"] == {"compile_seconds": 0, "made": 0, "after_step": 0, "shards": 2}
    assert out["compiled"]["compile_seconds"] > 0 and out["compiled"]["shards"] == 2
    assert out["compiled"]["after_step"] == out["compiled"]["made"] == pytest.approx(out["compiled"]["compile_seconds"])


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("stratified", [False, True], ids=["whole", "per_class"])
def test_updates_in_sample_blocks_give_the_numbers_of_one_update(monkeypatch, stratified):
    """On CPU a large chunk is folded in blocks of at most 16 samples (8 for squared differences): views of
    the chunk, each merged by Chan's formula. Every group's values, per element, equal those of one update
    per chunk up to float32 rounding (a chunk of 37 samples: blocks of 16, 16, 5 and of 8, 8, 8, 8, 5), and
    the blocks do run."""
    from tm_tensorboard import layer_measures

    torch.manual_seed(0)
    model, probe = small_cnn(), torch.randn(74, 3, 8, 8)
    labels = torch.arange(74) % 3
    measures = ("invariance", "same_equivariance", "equivariance_error", "per_transformation", "goodfellow",
                "anova", "lie_rotation")
    blocks = []
    original = layer_measures.Chunk.rows

    def counted(self, values, block=layer_measures.SAMPLE_BLOCK):
        out = list(original(self, values, block))
        blocks.append(len(out))
        return iter(out)

    def run(blocked_bytes):
        monkeypatch.setattr(layer_measures, "BLOCKED_BYTES", blocked_bytes)
        return tm.measure(model, (probe, labels) if stratified else probe, T.rotations(4), measures=measures,
                          batch_size=37, error_bars=False, stratified=stratified)

    monkeypatch.setattr(layer_measures.Chunk, "rows", counted)
    whole = run(10**18)
    assert max(blocks) == (3 if stratified else 1)
    blocks.clear()
    blocked = run(0)
    assert max(blocks) == (6 if stratified else 5)  # blocks of 8: 37 samples in 5, the classes' 13, 12, 12 in 2 + 2 + 2
    labels_of = [None, *range(3)] if stratified else [None]
    for measure in whole.measures:
        for layer in whole.layers_of(measure):
            for label in labels_of:
                np.testing.assert_allclose(blocked.get(measure, layer, per="element", label=label),
                                           whole.get(measure, layer, per="element", label=label),
                                           rtol=1e-4, atol=1e-6, err_msg=f"{measure} {layer} {label}")
