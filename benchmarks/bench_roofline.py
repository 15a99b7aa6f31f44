"""How close measure() can come to its forward floor on this machine: the memory traffic exact streaming
states cannot avoid, against the machine's memory bandwidth.

    python benchmarks/bench_roofline.py        # ~6 min on an idle 2-core machine

The statistics are memory-bound: per observed layer and chunk of b samples, an update reads the chunk's
activations and reads and writes the layer's states once (Chan's merge of the chunk's moments into the
float64 mean and M2 per transformation and element: 32 bytes per (transformation, element), whatever b).
So a measurement moves at least

    state traffic  = N / b chunks × 2 × state bytes   (read and write, once per chunk)
    value traffic  = N · T × activation elements × 4 bytes   (each activation read once, float32)

on top of its forward, and at the machine's bandwidth that is a lower bound on measure() / floor that no
implementation with per-chunk float64 states beats: a floor for issue 12's targets. This script measures,
in one run:

1. The bandwidth: reading a 512 MB float32 tensor (a sum) and reading and writing a 256 MB float64 tensor
   in place (what a state update does), 2 threads, medians of 9.
2. For DESIGN.md's reference case (13 layers, N = 256) and ResNet18Style(width=0.25) at 32 px (59 layers,
   N = 128), T = 16 rotations, batch_size 4 and 16, every layer (``dedupe_batchnorm=False``), no error
   bars: the forward floor at the same images per forward (``bench_fused.forward_floor``), measure() with
   invariance in float64 states (the default) and float32 states (``state_dtype=torch.float32``: half
   the state traffic), and with the default measures (+ same-equivariance), compiled, medians of
   ``--reps`` interleaved repetitions; the states' bytes from ``tm.estimate_memory``; the bound
   (floor + traffic / bandwidth) / floor beside the measured ratio.
"""
from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import statistics
import time
import warnings
from pathlib import Path

import torch

import tm_tensorboard as tm
from bench_engine import interleaved, warm_allocator
from bench_fused import forward_floor, speed_cases
from provenance import environment, save_results

RESULTS = Path(__file__).resolve().parent / "results" / "roofline.json"
THREADS = 2
T = 16
BATCH_SIZES = (4, 16)
VARIANTS = {  # label: (measures, state dtype)
    "invariance": (("invariance",), torch.float64),
    "invariance_float32": (("invariance",), torch.float32),
    "default": (("invariance", "same_equivariance"), torch.float64),
}


def bandwidth(reps: int = 9) -> dict:
    """GB/s reading float32 (a sum over 512 MB) and reading + writing float64 in place (256 MB)."""
    read = torch.rand(128 << 20)
    both = torch.rand(32 << 20, dtype=torch.float64)
    times = interleaved({"read": lambda: read.sum(), "read_write": lambda: both.mul_(1.0)}, reps)
    return {
        "read_GBps": read.numel() * 4 / statistics.median(times["read"]) / 1e9,
        "read_write_GBps": 2 * both.numel() * 8 / statistics.median(times["read_write"]) / 1e9,
    }


FORWARD_OPS = ("conv2d", "max_pool2d", "relu", "linear", "batch_norm", "adaptive_avg_pool2d", "add")


def profile(run) -> dict:
    """Seconds of one profiled call of ``run`` by kind: compiled kernels (Inductor's ``kernel`` functions),
    the forward's ATen ops, the transformations' ``grid_sampler``, and the rest (Python on the host:
    hooks, calls of the compiled graphs, finalizing; cProfile inflates it, so read it as an upper bound)."""
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    parts = {"kernels": 0.0, "forward": 0.0, "grid_sampler": 0.0, "total": 0.0}
    for (_, _, name), (_, _, tottime, _, _) in pstats.Stats(profiler).stats.items():
        parts["total"] += tottime
        if name.endswith(".kernel>") or name == "<built-in method kernel>":
            parts["kernels"] += tottime
        elif "grid_sampler" in name:
            parts["grid_sampler"] += tottime
        elif any(name == f"<built-in method torch.{op}>" or name == f"<built-in method torch._C._nn.{op}>" for op in FORWARD_OPS):
            parts["forward"] += tottime
    parts["host_and_rest"] = parts["total"] - parts["kernels"] - parts["forward"] - parts["grid_sampler"]
    return parts


def case(model: torch.nn.Module, probe: torch.Tensor, reps: int, speed: dict) -> dict:
    """Floors, measure() variants, traffic and bounds of one model at each batch size."""
    tset = tm.transforms.rotations(T)
    methods = {}
    for b in BATCH_SIZES:
        methods[f"floor_b{b}"] = forward_floor(model, [tset.apply(chunk) for chunk in probe.split(b)])
        for label, (measures, dtype) in VARIANTS.items():
            methods[f"{label}_b{b}"] = lambda m=measures, d=dtype, b=b: tm.measure(
                model, probe, tset, measures=m, batch_size=b, compile=True, error_bars=False,
                dedupe_batchnorm=False, state_dtype=d)
    for run in methods.values():  # compile, warm caches and the allocator
        run()
    wall = interleaved(methods, reps, type(model).__name__)
    median = {m: statistics.median(ts) for m, ts in wall.items()}
    out = {"N": len(probe), "median_s": median, "all_s": wall, "bounds": {},
           "profile": {m: profile(run) for m, run in methods.items() if "float32" not in m}}
    for label, (measures, dtype) in VARIANTS.items():
        report = tm.estimate_memory(model, probe, tset, measures=measures, error_bars=False,
                                    dedupe_batchnorm=False, state_dtype=dtype, batch_size=16)
        state_bytes = report.state_bytes
        elements = sum(math.prod(layer.unit_shape) for layer in report.layers)
        value_bytes = len(probe) * T * elements * 4
        for b in BATCH_SIZES:
            floor = median[f"floor_b{b}"]
            state_traffic = (len(probe) // b) * 2 * state_bytes
            state_s = state_traffic / (speed["read_write_GBps"] * 1e9)
            value_s = value_bytes / (speed["read_GBps"] * 1e9)
            measured = median[f"{label}_b{b}"]
            out["bounds"][f"{label}_b{b}"] = {
                "layers": len(report.layers),
                "state_bytes": state_bytes,
                "state_traffic_bytes": state_traffic,
                "value_bytes": value_bytes,
                "state_s": state_s,
                "value_s": value_s,
                "measured_over_floor": measured / floor,
                "bound_states_only": (floor + state_s) / floor,
                "bound_states_and_values": (floor + state_s + value_s) / floor,
                "over_floor_s": measured - floor,
                "bound_share_of_overhead": (state_s + value_s) / max(measured - floor, 1e-9),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")  # the border warning of random probes: not what this measures
    warm_allocator()
    start = time.perf_counter()
    speed = bandwidth()
    print(f"bandwidth: read {speed['read_GBps']:.1f} GB/s, read + write {speed['read_write_GBps']:.1f} GB/s", flush=True)
    cases = {name: case(model, probe, args.reps, speed) for name, (model, probe) in speed_cases().items()}
    speed_after = bandwidth()
    figures = {"environment": environment(), "threads": THREADS, "T": T, "reps": args.reps,
               "bandwidth": speed, "bandwidth_after": speed_after, "cases": cases,
               "seconds": time.perf_counter() - start}
    for name, result in cases.items():
        for key, bound in result["bounds"].items():
            print(f"{name} {key}: measured {bound['measured_over_floor']:.2f}x, bound {bound['bound_states_only']:.2f}x "
                  f"(states) / {bound['bound_states_and_values']:.2f}x (+ one read of the values)")
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
