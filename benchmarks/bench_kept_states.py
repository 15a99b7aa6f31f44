"""A session's measurements reusing the memory of the previous one's states (a Monitor's steps), and measure()
calls reusing the calls' before them, against measure() calls whose states page in anew.

    python benchmarks/bench_kept_states.py        # ~2 min on an idle 2-core machine

DESIGN.md's reference case (13 layers, N = 256) and ResNet18Style(width=0.25) at 32 px (59 layers,
N = 128, every layer), T = 16 rotations, ``batch_size=16``, compiled, with error bars as by default (8
shards: K sets of states where the CPU kernels finalize them), for invariance and for the default measures:
``measure()`` after ``tm.release_memory()`` (its states come fresh from the system, as in a process's
first call: ``*_measure_paged``), ``measure()`` called again (the states' blocks of the calls
before it, up to 2 GB: ``*_measure``), and ``Measurement.run`` called again on one session (what
``Monitor.step`` does), and the forward floor at the same images per forward, interleaved, medians of
``--reps``. Also the bytes a session keeps between measurements.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

import tm_tensorboard as tm
from bench_engine import interleaved, warm_allocator
from bench_fused import forward_floor, speed_cases
from provenance import environment, save_results
from tm_tensorboard.engine import Measurement
from tm_tensorboard.probe import as_probe

RESULTS = Path(__file__).resolve().parent / "results" / "kept_states.json"
THREADS = 2
BATCH_SIZE = 16
MEASURES = {"invariance": ("invariance",), "default": ("invariance", "same_equivariance")}


def case(model: torch.nn.Module, images: torch.Tensor, reps: int) -> dict:
    tset = tm.transforms.rotations(16)
    keywords = dict(batch_size=BATCH_SIZE, compile=True, dedupe_batchnorm=False)
    methods = {"floor": forward_floor(model, [tset.apply(chunk) for chunk in images.split(BATCH_SIZE)])}
    sessions = {}
    for label, measures in MEASURES.items():
        methods[f"{label}_measure_paged"] = lambda m=measures: (
            tm.release_memory(), tm.measure(model, images, tset, measures=m, **keywords))
        methods[f"{label}_measure"] = lambda m=measures: tm.measure(model, images, tset, measures=m, **keywords)
        sessions[label] = Measurement(model, tset, measures=measures, **keywords)
        methods[f"{label}_session"] = lambda s=sessions[label], p=as_probe(images): s.run(p)
    for run in methods.values():  # compile, warm up, and give each session its first measurement
        run()
    wall = interleaved(methods, reps, type(model).__name__)
    median = {m: statistics.median(ts) for m, ts in wall.items()}
    return {
        "N": len(images),
        "median_s": median,
        "all_s": wall,
        "over_floor": {m: t / median["floor"] for m, t in median.items()},
        "session_saves_s": {label: median[f"{label}_measure_paged"] - median[f"{label}_session"] for label in MEASURES},
        "kept_measure_saves_s": {label: median[f"{label}_measure_paged"] - median[f"{label}_measure"]
                                 for label in MEASURES},
        "kept_bytes": {label: s.kept_states.kept_bytes for label, s in sessions.items()},
        "shards": {label: s.shards(as_probe(images), None) for label, s in sessions.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")  # the border warning of random probes: not what this measures
    warm_allocator()
    start = time.perf_counter()
    cases = {name: case(model, probe, args.reps) for name, (model, probe) in speed_cases().items()}
    save_results({"environment": environment(), "threads": THREADS, "batch_size": BATCH_SIZE, "reps": args.reps,
                  "cases": cases, "seconds": time.perf_counter() - start}, args.output)


if __name__ == "__main__":
    main()
