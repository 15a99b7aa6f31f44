"""Folding a chunk's samples in blocks (layer_measures.SAMPLE_BLOCK, DIFFERENCE_BLOCK) against at once, on CPU.

    python benchmarks/bench_blocks.py           # ~25 min on an idle 2-core machine (--reps 5)

1. ``kernels``: the compiled invariance update (``_variance_update``: spread over T, moments over samples)
   and the per-transformation update (``_invariance_error_update``: squared differences from the
   untransformed sample) on one chunk [b, T = 16, units] float32 with float64 states, for b = 16 and 64
   and 4,096 / 16,384 / 32,768 units, folded in one call or in calls over blocks of 2 … 32 samples; every
   variant once per round in turn, medians of 15 (milliseconds per chunk).
2. ``measure``: ``measure()`` on the reference case (13 layers, N = 256, T = 16 rotations, compiled, no
   error bars) at batch_size 16 and 64 with invariance, the default measures, and each with
   ``per_transformation``, blocked as the package does against every chunk in one update
   (``BLOCKED_BYTES`` set out of reach), interleaved, medians of ``--reps``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import tm_tensorboard as tm
from bench_engine import Net, interleaved
from provenance import environment, save_results
from tm_tensorboard import fused, layer_measures
from tm_tensorboard.statistics import SampleMoments, SampleSum

RESULTS = Path(__file__).resolve().parent / "results" / "blocks.json"
THREADS = 2
T = 16
BLOCKS = (2, 4, 8, 16, 32)


def kernel_times(rounds: int = 15) -> dict:
    """Milliseconds per chunk of each update, at once ("whole") and in blocks, per chunk shape."""
    out = {}
    with fused.compiling():
        for b in (16, 64):
            for units in (4096, 16384, 32768):
                x = torch.randn(b * T, units, generator=torch.Generator().manual_seed(0))
                spread, moments = SampleSum((units,), "cpu"), SampleMoments((T, units), "cpu")
                squared, reference = SampleSum((T, units), "cpu"), SampleMoments((units,), "cpu")

                def invariance(rows):
                    layer_measures._variance_update(True, rows, T, spread.total, spread.count, moments.mean,
                                                    moments.m2, moments.count)

                def differences(rows):
                    layer_measures._invariance_error_update(True, rows, T, 0, squared.total, squared.count,
                                                            reference.mean, reference.m2, reference.count)

                variants = {}
                for name, update in (("invariance", invariance), ("per_transformation", differences)):
                    for block in ("whole", *[k for k in BLOCKS if k < b]):
                        size = b if block == "whole" else block
                        variants[f"{name}_{block}"] = (
                            lambda update=update, size=size: [update(x[i * T:(i + size) * T]) for i in range(0, b, size)])
                for run in variants.values():
                    run()  # compile, warm
                times = interleaved(variants, rounds)
                out[f"b{b}_units{units}"] = {name: 1e3 * statistics.median(t) for name, t in times.items()}
                print(f"b{b} units {units}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[f"b{b}_units{units}"].items()),
                      flush=True)
    return out


def measure_times(reps: int) -> dict:
    """measure() on the reference case blocked as shipped and with every chunk in one update."""
    model = Net().eval()
    probe = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tset = tm.transforms.rotations(16)
    shipped = layer_measures.BLOCKED_BYTES
    variants = {}
    for b in (16, 64):
        for name, measures in (("invariance", ("invariance",)),
                               ("invariance_per_transformation", ("invariance", "per_transformation")),
                               ("default", ("invariance", "same_equivariance")),
                               ("default_per_transformation", ("invariance", "same_equivariance", "per_transformation"))):
            for way, limit in (("blocked", shipped), ("whole", 1 << 62)):
                def run(b=b, measures=measures, limit=limit):
                    layer_measures.BLOCKED_BYTES = limit
                    try:
                        tm.measure(model, probe, tset, measures=measures, batch_size=b, compile=True, error_bars=False)
                    finally:
                        layer_measures.BLOCKED_BYTES = shipped
                variants[f"b{b}_{name}_{way}"] = run
    for run in variants.values():
        run()
    times = interleaved(variants, reps, "measure")
    median = {name: statistics.median(t) for name, t in times.items()}
    out = {"seconds": median, "runs": times, "blocked_over_whole": {}, "per_transformation_added": {}}
    for b in (16, 64):
        for name in ("invariance", "invariance_per_transformation", "default", "default_per_transformation"):
            out["blocked_over_whole"][f"b{b}_{name}"] = median[f"b{b}_{name}_blocked"] / median[f"b{b}_{name}_whole"]
        for base in ("invariance", "default"):
            for way in ("blocked", "whole"):
                out["per_transformation_added"][f"b{b}_{base}_{way}"] = (
                    median[f"b{b}_{base}_per_transformation_{way}"] / median[f"b{b}_{base}_{way}"] - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--parts", nargs="+", default=["kernels", "measure"], choices=["kernels", "measure"])
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    figures = {"environment": environment(), "threads": THREADS,
               "sample_block": layer_measures.SAMPLE_BLOCK, "difference_block": layer_measures.DIFFERENCE_BLOCK,
               "blocked_bytes": layer_measures.BLOCKED_BYTES}
    if "kernels" in args.parts:
        figures["kernels_ms"] = kernel_times()
    if "measure" in args.parts:
        figures["measure"] = measure_times(args.reps)
    figures["seconds"] = time.perf_counter() - start
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
