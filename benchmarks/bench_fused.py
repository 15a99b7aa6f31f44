"""The fused statistics: ops a GPU would launch, measure() against its forward floor, and compile time.

    python benchmarks/bench_fused.py            # ~12 min on an idle 2-core machine

1. Ops per observed layer per chunk (what a GPU would launch), counted as in tests/launches.py: every
   top-level ``aten::`` op in torch.profiler's record plus one per compiled region, the forward's own
   subtracted; SimpleCNN and ResNet18Style(width=0.25) on 3×32×32, N = 64, T = 16 rotations,
   batch_size = 16 (4 chunks), invariance and the default measures, compiled and eager, without error
   bars (the chunk path), and compiled with them (4 shards: their finalizing amortized over 4 chunks).
   Compiled means the compiled graphs here, as on a GPU (the CPU kernel of native.py off).
2. Wall time of ``measure()`` against the forward-only floor at the same images per forward (all N·T
   transformed images through the model, eval, no_grad, the C heap set as a measurement sets it), CPU,
   2 threads: the reference case of bench_engine.py (13 layers, N = 256) and ResNet18Style(width=0.25) at
   32 px (59 layers, N = 128), T = 16 rotations, batch_size 4 and 16; invariance compiled (on CPU with
   native.py's kernel) and eager, the default measures compiled, all with error bars as by default
   (8 shards) and the compiled ones also without (``error_bars=False``). ``--layers default`` measures as
   measure() does by default (ResNet18Style's 20 eval-mode BatchNorms of convolutions derived from their
   inputs' states, ``derived.py``: the result still holds all 59 layers), ``--layers all`` with
   ``dedupe_batchnorm=False`` (every layer hooked and measured, as the records before stop 58).
   Every method runs once per repetition, in turn; medians of ``--reps``, and the median of each repetition's
   ratio to the floor run just before (``paired_ratios``). The kernels are compiled
   before the timed part (that cost is item 3).
3. Compile time: a fresh process with an empty Inductor cache measuring the reference case once with
   ``compile=True`` (cold: what a first run on a machine pays), the same with the cache that run left
   (warm: every later process), and the time to make a Monitor (which compiles) and its first
   measurement, against a later one.
4. Host time per observed layer and chunk (``--parts host``): a model whose kernels take microseconds
   (20 convolutions of 4 channels on 6×6 maps, each followed by a ReLU: 40 layers; N = 64, T = 4,
   batch_size = 2: 32 chunks), so that measure()'s time over its forward floor is what the host spends
   per layer and chunk (hooks, calling each compiled graph): on a GPU that time, not the kernels, bounds
   a chunk (so native.py's CPU kernel is off here). Compiled (graphs compiled ahead of time, called
   directly), in the same process through Dynamo's frame evaluation (where compiling ahead of time is
   unavailable) and eager, and with the CPU kernels as a CPU runs it (``cpu_kernels``); and one call of the
   invariance update on a 2-sample chunk each of the first three ways.
5. A fresh process's measure() with the defaults (``--parts fresh``): a new Python process per run imports
   the package, measures the two cases of item 2 three times at the default batch_size 16 (``compile=None``:
   compiled only where that pays), then times the forward floor. Either the CPU kernels run without
   compiling (``fused.NATIVE``: built on this machine by an earlier process, loaded from their record) or,
   with ``TM_TENSORBOARD_NATIVE=0``, eagerly, which is what ``compile=None`` ran where compiling did not
   pay before the record existed. Runs alternate between the two, medians of ``--reps``.
6. The CPU kernels alone against compiling (``--parts native``): in one process, the two cases of item 2 at
   batch_size 4 and 16, invariance and the default measures, each also with the per-transformation errors
   and with the equivariance error, error bars as by default, ``compile=True``
   (the kernels, the compiled graphs for the rest) against what ``compile=None`` runs where compiling does
   not pay (``fused.NATIVE``: the kernels, eager code for the rest), interleaved, medians of ``--reps``.
7. Channels-last models (``--parts channels_last``): the two cases of item 2 with the model laid out channels-last
   (``model.to(memory_format=torch.channels_last)``, as CPU and GPU performance guides advise for
   convolutions) and as it is, at batch_size 4 and 16: each layout's forward floor and measure() of
   invariance and of the default measures, error bars as by default, compiled (the CPU kernels where they
   apply), interleaved, medians of ``--reps``.
8. What exact states let invariance cost (``--parts traffic``): the two cases of item 2 at batch_size 4 and 16,
   measure() of invariance (compiled: the CPU kernels) with its update kernel as it is, replaced by
   ``bench_native.traffic_only`` (the chunk read and the states read and written tile by tile, one
   addition a value: the bytes an exact update must move, none of its arithmetic) and by nothing (the
   counts only: hooks, rotations, finalizing), with and without error bars, interleaved with the floor,
   medians of ``--reps`` (~4 min). The values of the last two are wrong by design: timings only.
9. Pairs of chunks (``--parts pairs``): the two cases of item 2 at batch_size 4, measure() (compiled: the CPU
   kernels; error bars as by default) of invariance, of invariance and per_transformation and of the default
   measures, with chunks folded in by pairs (``layer_measures.Chunk.hold``, as measure() runs) and one at a
   time (``engine.PAIRED_SAMPLES`` 0), interleaved with the floor, medians of ``--reps`` (~4 min).
10. Which graph is checked first (``--parts guards``): ResNet18Style(width=0.25), N = 32, batch_size 4, the
   default measures, the compiled graphs as a GPU runs them (the CPU kernels off), no error bars: where one kind
   of arguments has several graphs compiled ahead of time, the one that served the same sizes is checked first
   (``fused.FusedFunction._remember``), against the graphs checked in the order they were stored: per
   measurement, guard checks per compiled call, the host's µs per call finding its graph (timed around it) and
   measure()'s wall time; the two ways alternate, medians of ``--reps``.

The allocator: glibc returns freed memory to the system until a large block (> 32 MiB) has once been
freed, after which it keeps it; a training process has long done that, a fresh benchmark process has
not, and then every chunk's activations page-fault in anew (measured: 0.55 M page faults and +1.3 s on
a 1.9 s floor). The script frees one 64 MiB block first, as training would have.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import tm_tensorboard as tm
from tm_tensorboard import engine, heap, native
from bench_engine import Net, interleaved, warm_allocator
from provenance import environment
from tm_tensorboard.examples.models import ResNet18Style, SimpleCNN

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from launches import top_level_ops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fused.json"
T = 16
THREADS = 2
INVARIANCE = ("invariance",)
DEFAULT = ("invariance", "same_equivariance")
TARGETS = {"ops_invariance": 8, "ops_default": 16, "invariance_over_floor": 1.5, "default_over_floor": 2.0}
PARTS = ("compile", "ops", "speed", "host", "dynamo", "fresh", "native", "channels_last", "traffic", "pairs",
         "guards")


@contextlib.contextmanager
def cpu_kernels(on: bool) -> Iterator[None]:
    """``on``: native.py's CPU kernels where they apply, as a CPU runs a measurement; off: the compiled
    graphs as a GPU runs them (the ops a GPU would launch, the host's time per call of a graph)."""
    before = os.environ.get(native.ENVIRONMENT_VARIABLE)
    os.environ[native.ENVIRONMENT_VARIABLE] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[native.ENVIRONMENT_VARIABLE]
        else:
            os.environ[native.ENVIRONMENT_VARIABLE] = before


def forward_floor(model: torch.nn.Module, images: list[torch.Tensor]) -> Callable[[], None]:
    """The forward-only floor: the transformed images through the model, chunk by chunk, no autograd, with
    the C heap as a measurement sets it (``heap.freed_memory_kept``): the forward at its best, not
    page-faulting its activations above 32 MB in anew every chunk as with glibc's own settings."""
    def floor() -> None:
        with torch.no_grad(), heap.freed_memory_kept():
            for x in images:
                model(x)
    return floor


def ops_per_layer_per_chunk(make_model: Callable[[], torch.nn.Module], measures, compile: bool,
                            error_bars: bool = False) -> dict:
    torch.manual_seed(0)
    model = make_model().eval()
    probe = torch.rand(64, 3, 32, 32)
    tset = tm.transforms.rotations(T)
    run = lambda: tm.measure(model, probe, tset, measures=measures, batch_size=16, compile=compile,  # noqa: E731
                             error_bars=error_bars,  # True: 4 shards of 16 samples (the default's, at N = 64)
                             dedupe_batchnorm=False)  # every layer (59 for ResNet18Style), as recorded before
    layers = len(run().layers)
    measured = top_level_ops(run)
    batches = [tset.apply(probe[i : i + 16]) for i in range(0, 64, 16)]
    forward = top_level_ops(forward_floor(model, batches))
    extra = measured - forward
    return {
        "layers": layers,
        "chunks": len(batches),
        "measure_ops": sum(measured.values()),
        "forward_ops": sum(forward.values()),
        "per_layer_per_chunk": (sum(measured.values()) - sum(forward.values())) / (layers * len(batches)),
        "most_common_extra": extra.most_common(8),
    }


@contextlib.contextmanager
def through_dynamo(on: bool) -> Iterator[None]:
    """With ``on``, Dynamo's frame evaluation calls the compiled regions, as where compiling ahead of time is
    unavailable (and as measure() did before), instead of the graphs compiled ahead of time."""
    from tm_tensorboard import fused

    failed = fused._AHEAD.failed
    fused._AHEAD.failed = "benchmarked through Dynamo" if on else failed
    try:
        yield
    finally:
        fused._AHEAD.failed = failed


def host_per_layer_chunk(reps: int) -> dict:
    """Microseconds the host spends per observed layer and chunk when the kernels take next to nothing."""
    from tm_tensorboard.layer_measures import _variance_update

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(20):
        layers += [torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).eval()
    probe, tset, batch_size = torch.rand(64, 4, 6, 6), tm.transforms.rotations(4), 2
    images = [tset.apply(chunk) for chunk in probe.split(batch_size)]

    def measure(measures, compile: bool, dynamo: bool = False, kernels: bool = False) -> Callable[[], None]:
        def run() -> None:
            with through_dynamo(dynamo), cpu_kernels(kernels):
                tm.measure(model, probe, tset, measures=measures, batch_size=batch_size, compile=compile,
                           error_bars=False, dedupe_batchnorm=False)
        return run

    methods = {"floor": forward_floor(model, images)}
    for label, measures in (("invariance", INVARIANCE), ("default", DEFAULT)):
        methods[f"{label}_compiled"] = measure(measures, True)
        methods[f"{label}_compiled_through_dynamo"] = measure(measures, True, dynamo=True)
        methods[f"{label}_eager"] = measure(measures, False)
        methods[f"{label}_cpu_kernels"] = measure(measures, True, kernels=True)  # what a CPU runs
    for run in methods.values():
        run()
    median = {m: statistics.median(ts) for m, ts in interleaved(methods, reps).items()}
    layer_chunks = len(layers) * len(images)

    x = torch.rand(2 * 4, 4)  # one call on next to no data: compiled both ways, and eagerly
    states = (torch.zeros(4, dtype=torch.float64), torch.zeros((), dtype=torch.int64),
              torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64),
              torch.zeros((), dtype=torch.int64))
    call = {}
    for label, compiled, dynamo in (("compiled", True, False), ("compiled_through_dynamo", True, True),
                                    ("eager", False, False)):
        with through_dynamo(dynamo):
            _variance_update(compiled, x, 4, *states)
            start, calls = time.perf_counter(), 2000
            for _ in range(calls):
                _variance_update(compiled, x, 4, *states)
            call[label] = (time.perf_counter() - start) / calls * 1e6
    return {
        "layers": len(layers), "chunks": len(images), "median_s": median,
        "us_per_layer_chunk": {m: (median[m] - median["floor"]) / layer_chunks * 1e6 for m in methods if m != "floor"},
        "us_per_invariance_update_call": call,
    }


def ahead_of_time_against_dynamo(reps: int) -> dict:
    """measure() on ResNet18Style(0.25) with the graphs compiled ahead of time and through Dynamo's calls."""
    torch.manual_seed(0)
    model = ResNet18Style(3, 10, width=0.25).eval()
    probe = torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tset = tm.transforms.rotations(T)
    out = {}
    for batch_size in (4, 16):
        def run(measures, dynamo: bool, b=batch_size) -> None:
            with through_dynamo(dynamo):
                tm.measure(model, probe, tset, measures=measures, batch_size=b, compile=True, error_bars=False,
                           dedupe_batchnorm=False)

        methods: dict[str, Callable[[], None]] = {
            "floor": forward_floor(model, [tset.apply(chunk) for chunk in probe.split(batch_size)])}
        for label, measures in (("invariance", INVARIANCE), ("default", DEFAULT)):
            methods[f"{label}_ahead_of_time"] = lambda m=measures: run(m, False)
            methods[f"{label}_through_dynamo"] = lambda m=measures: run(m, True)
        for method in methods.values():
            method()
        median = {m: statistics.median(ts) for m, ts in interleaved(methods, reps).items()}
        out[f"b{batch_size}"] = {"median_s": median, "over_floor": {m: median[m] / median["floor"] for m in median}}
        print(f"ahead of time / Dynamo, batch {batch_size}:", json.dumps({m: round(v, 2) for m, v in median.items()}), flush=True)
    return out


def speed_cases() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """The two cases issue 12's ratios are set on, seeded: DESIGN.md's reference case (13 layers, N = 256) and
    ResNet18Style(width=0.25) at 32 px (59 layers, N = 128), each (model in eval mode, probe)."""
    torch.manual_seed(0)
    reference = Net().eval()
    resnet = ResNet18Style(3, 10, width=0.25).eval()
    return {
        "reference": (reference, torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))),
        "ResNet18Style_w0.25_32px": (resnet, torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))),
    }


def speed_case(name: str, model: torch.nn.Module, probe: torch.Tensor, reps: int, layers: str = "default") -> dict:
    """Interleaved wall times of the floors and measure() variants of one model (``layers``: "default", the
    BatchNorms derived as measure() does by default, or "all", every layer measured)."""
    tset = tm.transforms.rotations(T)
    dedupe = None if layers == "default" else False
    methods: dict[str, Callable[[], Any]] = {}
    for batch_size in (4, 16):
        methods[f"floor_b{batch_size}"] = forward_floor(model, [tset.apply(chunk) for chunk in probe.split(batch_size)])
        variants = [("invariance", INVARIANCE, True, None), ("invariance_no_error_bars", INVARIANCE, True, False),
                    ("invariance_eager", INVARIANCE, False, None), ("default", DEFAULT, True, None),
                    ("default_no_error_bars", DEFAULT, True, False)]
        for label, measures, compile, bars in variants:  # error_bars None: the default (on where they fit)
            methods[f"{label}_b{batch_size}"] = (
                lambda m=measures, c=compile, b=batch_size, e=bars: tm.measure(
                    model, probe, tset, measures=m, batch_size=b, compile=c, error_bars=e, dedupe_batchnorm=dedupe)
            )
    timings = timed(methods, reps, name)
    median = timings["median_s"]
    ratios = {f"{m}_over_floor": ratio for m, ratio in over_floor(median).items()}
    result = tm.measure(model, probe[:2], tset, measures=INVARIANCE, dedupe_batchnorm=dedupe)
    return {
        "N": len(probe),
        "layers_option": layers,
        "layers": len(result.layers),
        "layers_measured": len(result.layers) - len(result.derived),
        "min_s": {m: min(ts) for m, ts in timings["all_s"].items()},
        "ratios": ratios,
        "paired_ratios": {f"{m}_over_floor": ratio for m, ratio in paired_over_floor(timings["all_s"]).items()},
        **timings,
    }


def over_floor(median: dict[str, float]) -> dict[str, float]:
    """Each method's median over its floor's (methods ``<label>_b<batch_size>``, floors ``floor_b<batch_size>``)."""
    return {m: s / median[_floor_of(m)] for m, s in median.items() if not m.startswith("floor")}


def _floor_of(method: str) -> str:
    """The floor a method ``<label>_b<batch_size>`` is set against: ``floor_b<batch_size>``."""
    return f"floor_b{method.rsplit('_b', 1)[1]}"


def paired_over_floor(all_s: dict[str, list[float]]) -> dict[str, float]:
    """Each method's median over the repetitions of its time over its floor's in the same repetition (run seconds
    before it): this VM's speed drifts by tens of percent within minutes, and a pair shares the drift."""
    return {m: statistics.median(t / f for t, f in zip(ts, all_s[_floor_of(m)]))
            for m, ts in all_s.items() if not m.startswith("floor")}


def with_ratios(probe: torch.Tensor, timings: dict) -> dict:
    """A case's record: its probe size, each method's median over its floor (and ``paired_over_floor``), and
    ``timed``'s figures."""
    return {"N": len(probe), "over_floor": over_floor(timings["median_s"]),
            "paired_over_floor": paired_over_floor(timings["all_s"]), **timings}


def timed(methods: dict[str, Callable[[], Any]], reps: int, name: str) -> dict:
    """Each method once untimed (compiles, warms caches and the allocator), then all of them interleaved ``reps``
    times: their wall times, medians, and the load average before and after the timed part."""
    for run in methods.values():
        run()
    load_before = os.getloadavg()
    wall = interleaved(methods, reps, name)
    return {"median_s": {m: statistics.median(ts) for m, ts in wall.items()}, "all_s": wall,
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


_COMPILE_CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {benchmarks!r})
    import numpy as np
    import torch
    block = np.ones(64 << 20, dtype=np.uint8); del block  # the allocator as in training (see bench_fused.py)
    torch.set_num_threads({threads})
    import tm_tensorboard as tm
    from tm_tensorboard import fused
    from bench_engine import Net
    torch.manual_seed(0)
    model, probe = Net().eval(), torch.rand(256, 3, 32, 32)
    tset = tm.transforms.rotations({T})
    start = time.perf_counter()
    monitor = tm.Monitor(model, probe, tset, logdir={logdir!r}, measures=("invariance", "same_equivariance"))
    made = time.perf_counter() - start
    steps = []
    for step in range(3):
        start = time.perf_counter()
        monitor.step(step, force=True)
        steps.append(time.perf_counter() - start)
    monitor.close()
    print(json.dumps({{"monitor_made_s": made, "compile_s": monitor.compile_seconds, "steps_s": steps}}))
    """
)


def compile_times(cache: Path) -> dict:
    """Monitor construction (compiling) and its first measurements, with a cold and a warm Inductor cache."""
    out = {}
    for label in ("cold", "warm"):
        with tempfile.TemporaryDirectory() as logdir:
            script = _COMPILE_CHILD.format(benchmarks=str(Path(__file__).parent), threads=THREADS, T=T, logdir=logdir)
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
            env.pop("TM_TENSORBOARD_COMPILE", None)
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
            out[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"compile, {label} cache: {out[label]}", flush=True)
    return out


_FRESH_CHILD = textwrap.dedent(
    """
    import json, sys, time
    started = time.perf_counter()
    sys.path.insert(0, {benchmarks!r})
    import numpy as np
    import torch
    block = np.ones(64 << 20, dtype=np.uint8); del block  # the allocator as in training (see bench_fused.py)
    torch.set_num_threads({threads})
    import tm_tensorboard as tm
    from tm_tensorboard import fused
    from bench_fused import forward_floor, speed_cases
    model, probe = speed_cases()[{case!r}]
    tset = tm.transforms.rotations({T})
    imported = time.perf_counter() - started
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        tm.measure(model, probe, tset, measures={measures!r}, dedupe_batchnorm=False)
        seconds.append(time.perf_counter() - start)
    floor = forward_floor(model, [tset.apply(chunk) for chunk in probe.split(16)])
    floor()  # (its first run pages the heap in)
    start = time.perf_counter()
    floor()
    print(json.dumps({{"imported_s": imported, "measure_s": seconds, "floor_s": time.perf_counter() - start,
                      "compiled_s": fused.compiled_seconds()}}))
    """
)


def fresh_process_measure(reps: int) -> dict:
    """measure() with its defaults in new processes: the CPU kernels loaded from their record against eager."""
    import warnings

    for kernel in native._KERNELS:  # built (or loaded) here, so that the children find them recorded
        if kernel.get() is None:
            warnings.warn(f"the {kernel.name} kernel could not be built: {kernel.failed}")
    modes = {"stored_kernels": "1", "eager": "0"}
    runs: dict[str, list] = {}
    for _ in range(reps):
        for case in ("reference", "ResNet18Style_w0.25_32px"):
            for label, measures in (("invariance", INVARIANCE), ("default", DEFAULT)):
                for mode, native_env in modes.items():
                    script = _FRESH_CHILD.format(benchmarks=str(Path(__file__).resolve().parent), threads=THREADS,
                                                 case=case, T=T, measures=measures)
                    environment = {**os.environ, native.ENVIRONMENT_VARIABLE: native_env}
                    environment.pop("TM_TENSORBOARD_COMPILE", None)
                    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                                          text=True, env=environment, timeout=1800)
                    if done.returncode != 0:
                        raise RuntimeError(done.stderr)
                    figures = json.loads(done.stdout.strip().splitlines()[-1])
                    runs.setdefault(f"{case}/{label}/{mode}", []).append(figures)
    out: dict[str, Any] = {"batch_size": 16, "runs": runs}
    for key, values in runs.items():
        first = statistics.median(v["measure_s"][0] for v in values)
        later = statistics.median(s for v in values for s in v["measure_s"][1:])
        floor = statistics.median(v["floor_s"] for v in values)
        out[key] = {"first_s": first, "later_s": later, "floor_s": floor, "first_over_floor": first / floor,
                    "later_over_floor": later / floor, "compiled_s": max(v["compiled_s"] for v in values),
                    "imported_s": statistics.median(v["imported_s"] for v in values)}
        print(key, json.dumps({k: round(v, 3) for k, v in out[key].items()}), flush=True)
    return out


def native_against_compiled(reps: int) -> dict:
    """measure() with the CPU kernels and the compiled graphs against the CPU kernels and eager code."""
    from tm_tensorboard import engine

    def run(model, probe, tset, measures, batch_size, mode) -> None:
        pays = engine.compile_pays
        if mode == "native":  # what compile=None runs where compiling does not pay
            engine.compile_pays = lambda values, measurements=1: False
        try:
            tm.measure(model, probe, tset, measures=measures, batch_size=batch_size,
                       compile=True if mode == "compiled" else None, dedupe_batchnorm=False)
        finally:
            engine.compile_pays = pays

    tset = tm.transforms.rotations(T)
    methods: dict[str, Callable[[], Any]] = {}
    for case, (model, probe) in speed_cases().items():
        for batch_size in (4, 16):
            methods[f"{case}/floor_b{batch_size}"] = forward_floor(
                model, [tset.apply(chunk) for chunk in probe.split(batch_size)])
            for label, measures in (("invariance", INVARIANCE), ("default", DEFAULT),
                                    ("invariance_per_transformation", INVARIANCE + ("per_transformation",)),
                                    ("default_equivariance_error", DEFAULT + ("equivariance_error",))):
                for mode in ("compiled", "native"):
                    methods[f"{case}/{label}_b{batch_size}/{mode}"] = (
                        lambda m=model, p=probe, ms=measures, b=batch_size, mo=mode: run(m, p, tset, ms, b, mo))
    for method in methods.values():
        method()
    wall = interleaved(methods, reps)
    median = {m: statistics.median(ts) for m, ts in wall.items()}
    out: dict[str, Any] = {"median_s": median, "all_s": wall}
    for method, seconds in median.items():
        if "/floor" not in method:
            case, rest = method.split("/", 1)
            batch_size = rest.split("_b")[1].split("/")[0]
            out.setdefault("over_floor", {})[method] = seconds / median[f"{case}/floor_b{batch_size}"]
    for method, ratio in out["over_floor"].items():
        print(method, round(median[method], 3), f"{ratio:.2f}", flush=True)
    return out


def channels_last_case(name: str, model: torch.nn.Module, probe: torch.Tensor, reps: int) -> dict:
    """Floors and measure() of one model laid out channel-major ("contiguous") and channels-last."""
    tset = tm.transforms.rotations(T)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

    def laid_out(layout: str, run: Callable[[], Any]) -> Callable[[], Any]:
        def in_layout() -> Any:
            model.to(memory_format=layouts[layout])
            return run()
        return in_layout

    methods: dict[str, Callable[[], Any]] = {}
    for batch_size in (4, 16):
        images = [tset.apply(chunk) for chunk in probe.split(batch_size)]
        for layout in layouts:
            methods[f"{layout}/floor_b{batch_size}"] = laid_out(layout, forward_floor(model, images))
            for label, measures in (("invariance", INVARIANCE), ("default", DEFAULT)):
                methods[f"{layout}/{label}_b{batch_size}"] = laid_out(layout, lambda m=measures, b=batch_size: (
                    tm.measure(model, probe, tset, measures=m, batch_size=b, compile=True, dedupe_batchnorm=False)))
    timings = timed(methods, reps, name)
    model.to(memory_format=torch.contiguous_format)
    median = timings["median_s"]
    return {
        "N": len(probe),
        "over_own_floor": {m: median[m] / median[f"{m.split('/')[0]}/floor_b{m.rsplit('_b', 1)[1]}"]
                           for m in methods if "/floor" not in m},
        "over_contiguous_floor": {m: median[m] / median[f"contiguous/floor_b{m.rsplit('_b', 1)[1]}"]
                                  for m in methods if "/floor" not in m},
        **timings,
    }


@contextlib.contextmanager
def invariance_update(kind: str) -> Iterator[None]:
    """Invariance's CPU kernel as it is ("kernel"), replaced by the traffic it must move ("traffic") or by
    nothing but its counts ("none"). What measure() then returns is wrong by design: for timing only."""
    from bench_native import traffic_only
    from tm_tensorboard import layer_measures

    update = layer_measures._variance_update
    kernel = update.native
    sink = torch.zeros(64)

    def replaced(output, T, spread_total, spread_count, mean, m2, count) -> bool:
        if not native._applies(output, T, (mean, m2), (spread_total,)):
            return kernel(output, T, spread_total, spread_count, mean, m2, count)
        samples = output.numel() // (T * spread_total.numel())
        if kind == "traffic":
            traffic_only(output.view(samples * T, -1), [spread_total, spread_count, mean, m2, count], sink)
        spread_count += samples
        count += samples
        return True

    update.native = kernel if kind == "kernel" else replaced
    try:
        yield
    finally:
        update.native = kernel


def traffic_case(name: str, model: torch.nn.Module, probe: torch.Tensor, reps: int) -> dict:
    """Floors and measure() of invariance with its update kernel as it is, its traffic only, or nothing."""
    tset = tm.transforms.rotations(T)
    methods: dict[str, Callable[[], Any]] = {}
    for batch_size in (4, 16):
        methods[f"floor_b{batch_size}"] = forward_floor(model, [tset.apply(chunk) for chunk in probe.split(batch_size)])
        for kind in ("kernel", "traffic", "none"):
            for bars in (True, False):
                def run(kind=kind, bars=bars, b=batch_size) -> None:
                    with invariance_update(kind), warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the NaN of states left empty ("none")
                        tm.measure(model, probe, tset, measures=INVARIANCE, batch_size=b, compile=True,
                                   error_bars=None if bars else False, dedupe_batchnorm=False)
                methods[f"{kind}{'' if bars else '_no_error_bars'}_b{batch_size}"] = run
    return with_ratios(probe, timed(methods, reps, name))


@contextlib.contextmanager
def chunk_pairs(on: bool) -> Iterator[None]:
    """``on``: chunks of at most PAIRED_SAMPLES samples folded in by pairs (``Chunk.hold``), as measure() does;
    off: one chunk at a time, as before them."""
    before = engine.PAIRED_SAMPLES
    engine.PAIRED_SAMPLES = before if on else 0
    try:
        yield
    finally:
        engine.PAIRED_SAMPLES = before


def pairs_case(name: str, model: torch.nn.Module, probe: torch.Tensor, reps: int) -> dict:
    """At batch_size=4, the floor and measure() with chunks folded in by pairs and one at a time: invariance,
    with per_transformation, and the default measures, error bars as by default."""
    tset = tm.transforms.rotations(T)
    methods: dict[str, Callable[[], Any]] = {"floor_b4": forward_floor(model, [tset.apply(c) for c in probe.split(4)])}
    for label, measures in (("invariance", INVARIANCE), ("per_transformation", INVARIANCE + ("per_transformation",)),
                            ("default", DEFAULT)):
        for on in (True, False):
            def run(measures=measures, on=on) -> None:
                with chunk_pairs(on):
                    tm.measure(model, probe, tset, measures=measures, batch_size=4, compile=True,
                               dedupe_batchnorm=False)
            methods[f"{label}_{'pairs' if on else 'single'}_b4"] = run
    return with_ratios(probe, timed(methods, reps, name))


@contextlib.contextmanager
def served_first(on: bool) -> Iterator[None]:
    """With ``on`` (as measure() runs), the graph that served the same sizes of arguments is checked first; off,
    the graphs are checked in the order they were stored."""
    from tm_tensorboard import fused

    sizes = fused._sizes
    fused._sizes = sizes if on else (lambda args: None)
    try:
        yield
    finally:
        fused._sizes = sizes


def guard_checks(reps: int) -> dict:
    """Item 10: guard checks per compiled call, the host's time per call finding its graph, and measure()'s time,
    the served graph checked first or not."""
    from torch._dynamo.aot_compile import AOTCompiledFunction
    from tm_tensorboard import fused

    torch.manual_seed(0)
    model = ResNet18Style(3, 10, width=0.25).eval()
    probe = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tset = tm.transforms.rotations(T)
    counts = {"checks": 0, "calls": 0, "seconds": 0.0}
    check, lookup = AOTCompiledFunction.guard_check, fused.FusedFunction._ahead_of_time

    def counted_check(graph, *args, **kwargs):
        counts["checks"] += 1
        return check(graph, *args, **kwargs)

    def timed_lookup(function, args):
        start = time.perf_counter()
        graph = lookup(function, args)
        counts["seconds"] += time.perf_counter() - start
        counts["calls"] += 1
        return graph

    figures: dict[str, dict[str, list[float]]] = {"s": {}, "checks_per_call": {}, "lookup_us_per_call": {}}
    variants = (("served_first", True), ("in_stored_order", False))
    with cpu_kernels(False):
        for _, on in variants:  # compiled (or loaded from the store) first
            with served_first(on):
                tm.measure(model, probe, tset, measures=DEFAULT, batch_size=4, compile=True, error_bars=False,
                           dedupe_batchnorm=False)
        AOTCompiledFunction.guard_check, fused.FusedFunction._ahead_of_time = counted_check, timed_lookup
        try:
            for rep in range(reps):
                for label, on in variants if rep % 2 == 0 else variants[::-1]:
                    counts.update(checks=0, calls=0, seconds=0.0)
                    start = time.perf_counter()
                    with served_first(on):
                        tm.measure(model, probe, tset, measures=DEFAULT, batch_size=4, compile=True,
                                   error_bars=False, dedupe_batchnorm=False)
                    figures["s"].setdefault(label, []).append(time.perf_counter() - start)
                    figures["checks_per_call"].setdefault(label, []).append(counts["checks"] / counts["calls"])
                    per_call = counts["seconds"] / counts["calls"] * 1e6
                    figures["lookup_us_per_call"].setdefault(label, []).append(per_call)
        finally:
            AOTCompiledFunction.guard_check, fused.FusedFunction._ahead_of_time = check, lookup
    medians = {figure: {label: statistics.median(values) for label, values in by_label.items()}
               for figure, by_label in figures.items()}
    return {"N": len(probe), "batch_size": 4, "compiled_calls": counts["calls"], "medians": medians, "all": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run some parts; the others' figures already in --output are kept")
    parser.add_argument("--layers", choices=("default", "all"), default="default",
                        help="the speed part: measure()'s default (BatchNorms derived from their inputs) or every "
                             "layer measured (dedupe_batchnorm=False)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warm_allocator()

    kept = len(args.parts) < len(PARTS) and args.output.exists()  # the other parts' figures, where there are any
    figures: dict[str, Any] = json.loads(args.output.read_text()) if kept else {}
    figures.update({"environment": environment(), "targets": TARGETS})
    if "compile" in args.parts:
        with tempfile.TemporaryDirectory() as cache:
            figures["compile"] = compile_times(Path(cache))

    models = {"SimpleCNN": lambda: SimpleCNN(3, 10), "ResNet18Style_w0.25": lambda: ResNet18Style(3, 10, width=0.25)}
    if "ops" in args.parts:  # the chunk path (error bars off, as the targets were set), and with error bars
        with cpu_kernels(False):
            figures["ops"] = {
            f"{name}/{'+'.join(measures)}/{'compiled' if compile else 'eager'}{'/error_bars' if bars else ''}":
                    ops_per_layer_per_chunk(make, measures, compile, bars)
                for name, make in models.items()
                for measures in (INVARIANCE, DEFAULT)
                for compile, bars in ((True, False), (False, False), (True, True))
            }
        for key, value in figures["ops"].items():
            print(f"ops per layer per chunk {key}: {value['per_layer_per_chunk']:.2f}", flush=True)
    if "host" in args.parts:
        with cpu_kernels(False):
            figures["host"] = host_per_layer_chunk(max(args.reps, 7))
        print("host µs per layer and chunk:", json.dumps({k: round(v) for k, v in figures["host"]["us_per_layer_chunk"].items()}),
              "per invariance update call:", json.dumps({k: round(v) for k, v in figures["host"]["us_per_invariance_update_call"].items()}), flush=True)
    if "guards" in args.parts:
        figures["guards"] = guard_checks(max(args.reps, 7))
        print("guards:", json.dumps(figures["guards"]["medians"]), flush=True)
    if "dynamo" in args.parts:
        figures["ahead_of_time_against_dynamo"] = ahead_of_time_against_dynamo(args.reps)
    if "native" in args.parts:
        figures["native_against_compiled"] = native_against_compiled(args.reps)
    if "fresh" in args.parts:
        figures["fresh_process"] = fresh_process_measure(min(args.reps, 3))
    if "channels_last" in args.parts:
        figures["channels_last"] = {case: channels_last_case(case, model, probe, args.reps)
                                    for case, (model, probe) in speed_cases().items()}
        for case, value in figures["channels_last"].items():
            print(case, json.dumps({k: round(v, 3) for k, v in value["median_s"].items()}), flush=True)
    for part, run_case in (("traffic", traffic_case), ("pairs", pairs_case)):
        if part in args.parts:
            figures[part] = {case: run_case(case, model, probe, args.reps)
                             for case, (model, probe) in speed_cases().items()}
            for case, value in figures[part].items():
                print(case, json.dumps({k: round(v, 2) for k, v in value["over_floor"].items()}), flush=True)
    if "speed" not in args.parts:
        print(json.dumps(figures, indent=1))
        if not args.no_save:
            args.output.write_text(json.dumps(figures, indent=1) + "\n")
        return

    figures["speed"] = {
        case: speed_case(label, model, probe, args.reps, args.layers)
        for (case, (model, probe)), label in zip(speed_cases().items(), ("reference", "resnet"))
    }
    for case, value in figures["speed"].items():
        print(case, json.dumps({k: round(v, 2) for k, v in value["ratios"].items()}))
    print(json.dumps(figures, indent=1))
    if not args.no_save:
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
