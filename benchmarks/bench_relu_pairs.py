"""A layer and the ReLU after it folded by one kernel call (relu_pairs.py) against each updated alone.

    python benchmarks/bench_relu_pairs.py          # ~6 min on an idle 2-core machine

1. The update alone: a chunk [b·T, U] float32 (T = 16) and its ReLU folded into two sets of invariance's float64
   states, by ``native.relu_update`` (one read of the chunk) and by two ``native.variance_update`` calls (the chunk,
   then the ReLU's own output, another tensor, as in a measurement); enough layers cycled that the chunks and states
   leave the caches. Microseconds per pair of layers.
2. In a measurement, folding on and off alternating in one process (off: every layer updated alone, as before
   relu_pairs.py), medians of ``--reps``, with the forward floor: bench_monitor.py's Monitor (SimpleCNN(1, 5,
   width 0.5), 256 glyphs × rotations(16), batch_size 16, invariance + accuracy; its ``monitor.step``), and
   ``measure()`` on the reference case (bench_engine.py's Net, 256 images, rotations(16), batch_size 16, invariance
   and invariance + per_transformation, error bars as by default; at 4 its chunks are kept in pairs, where nothing
   is folded).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import tm_tensorboard as tm
from tm_tensorboard import native, relu_pairs
from tm_tensorboard.examples.models import SimpleCNN
from tm_tensorboard.examples.shapes import make_shapes
from bench_engine import Case, warm_allocator
from bench_fused import THREADS, forward_floor
from provenance import environment, save_results, source_version

T = 16
CACHE_BYTES = 64 << 20  # layers cycled: more chunk and state bytes than this machine's caches hold
FOLDING = relu_pairs.ReluPairs.update


def _states(units: int) -> list[torch.Tensor]:
    f64 = torch.float64
    return [torch.zeros(units, dtype=f64), torch.zeros((), dtype=torch.int64), torch.zeros(T, units, dtype=f64),
            torch.zeros(T, units, dtype=f64), torch.zeros((), dtype=torch.int64)]


def update_alone(batch: int, units: int, reps: int) -> dict:
    """Microseconds per pair of layers: one call, two calls; medians of ``reps``."""
    pair_bytes = 2 * batch * T * units * 4 + 2 * (2 * T + 1) * units * 8
    layers = max(2, -(-CACHE_BYTES // pair_bytes))
    chunks = [torch.randn(batch * T, units) for _ in range(layers)]
    relus = [torch.relu(x) for x in chunks]
    states = [(_states(units), _states(units)) for _ in range(layers)]
    calls = max(layers, 200 // layers * layers)

    def one_call(k: int) -> None:
        assert native.relu_update(chunks[k], T, *states[k])

    def two_calls(k: int) -> None:
        assert native.variance_update(chunks[k], T, *states[k][0])
        assert native.variance_update(relus[k], T, *states[k][1])

    us = {}
    for name, update in (("one_call", one_call), ("two_calls", two_calls)):
        for k in range(layers):
            update(k)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for c in range(calls):
                update(c % layers)
            times.append((time.perf_counter() - start) / calls * 1e6)
        us[name] = statistics.median(times)
    return {"batch": batch, "units": units, "layers_cycled": layers, "us_per_pair": us,
            "one_over_two": us["one_call"] / us["two_calls"]}


def _folding(on: bool) -> None:
    relu_pairs.ReluPairs.update = FOLDING if on else (
        lambda self, name, module, inputs, observer, phase, activation, chunk: observer.update(phase, activation,
                                                                                              chunk))


def alternating(measure: Callable[[], None], floor: Callable[[], None], reps: int) -> dict:
    """Seconds of ``measure`` with folding on and off and of ``floor``, alternating (the order flipped every
    repeat); medians, the ratios to the floor and the median of each repeat's on / off."""
    runs: dict[str, list[float]] = {"on": [], "off": [], "floor": []}
    for on in (True, False):
        _folding(on)
        measure()
    floor()
    for r in range(reps):
        for name in (("on", "off", "floor") if r % 2 == 0 else ("floor", "off", "on")):
            if name != "floor":
                _folding(name == "on")
            start = time.perf_counter()
            (floor if name == "floor" else measure)()
            runs[name].append(time.perf_counter() - start)
    _folding(True)
    median = {k: statistics.median(v) for k, v in runs.items()}
    return {"median_s": median, "all_s": runs, "on_over_floor": median["on"] / median["floor"],
            "off_over_floor": median["off"] / median["floor"],
            "on_over_off_paired": statistics.median(a / b for a, b in zip(runs["on"], runs["off"]))}


def monitor_measurement(reps: int) -> dict:
    torch.manual_seed(0)
    probe = make_shapes(256, 32, seed=2)  # (images, labels): accuracy too
    images, model = probe[0], SimpleCNN(1, 5, width=0.5)
    tset = tm.transforms.rotations(T)
    with tempfile.TemporaryDirectory() as tmp:
        monitor = tm.Monitor(model, probe, tset, logdir=tmp, every=1, measures=("invariance", "accuracy"),
                             batch_size=16)
        steps = iter(range(1, 10**6))
        model.eval()
        floor = forward_floor(model, [tset.apply(chunk) for chunk in images.split(16)])
        out = alternating(lambda: monitor.step(next(steps)), floor, reps)
        monitor.close()
    return out


def reference_measure(reps: int, measures: tuple[str, ...]) -> dict:
    case = Case()
    tset = tm.transforms.rotations(T)
    floor = forward_floor(case.model, [tset.apply(chunk) for chunk in case.probe.split(16)])
    return alternating(lambda: tm.measure(case.model, case.probe, tset, measures=measures, batch_size=16,
                                          compile=True), floor, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "results" / f"relu_pairs_{source_version()}.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warm_allocator()
    figures: dict = {"environment": environment(), "T": T, "threads": THREADS, "reps": args.reps}
    figures["update_alone"] = [update_alone(b, u, args.reps) for b in (4, 16) for u in (4096, 8192, 16384, 32768)]
    for row in figures["update_alone"]:
        print(row, flush=True)
    figures["monitor"] = monitor_measurement(args.reps)
    print("monitor", {k: v for k, v in figures["monitor"].items() if k != "all_s"}, flush=True)
    groups = (("invariance", ("invariance",)), ("per_transformation", ("invariance", "per_transformation")))
    for name, measures in groups:
        key = f"reference_case_b16_{name}"
        figures[key] = reference_measure(args.reps, measures)
        print(key, {k: v for k, v in figures[key].items() if k != "all_s"}, flush=True)
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
