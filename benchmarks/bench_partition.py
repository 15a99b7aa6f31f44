"""Which core reads a chunk: the forward's operators after the CPU kernels, and the cost of moving lines between cores.

    python benchmarks/bench_partition.py        # ~1 min on an idle 2-core machine

Inside measure() the model's own operators run slower than in its forward floor (ResNet18Style(0.25) at
batch_size 4: ~0.1 s a measurement, as much as invariance's update kernels). This separates the causes on the
floor itself: ResNet18Style(width=0.25) at 32 px, N = 128, T = 16 rotations, batch 4 (32 forwards of 64 images),
the C heap as a measurement sets it, with a forward hook on every leaf layer's 4-D output but the convolutions'
(43: the BatchNorms, ReLUs, identity shortcuts and the pooling) doing, per variant:

- ``none``: nothing (the floor with hooks);
- ``kernel``: invariance's CPU kernel (``native.variance_update``) on the output, into 8 sets of states cycled every 4
  chunks (as 8 error-bar shards of 16 samples);
- ``reads_by_units``: the kernel's reads alone, tile by tile, each thread the units of its tiles in every row (the
  kernel's partition: a tile is all of a chunk's rows of a range of units), one addition a value;
- ``reads_by_rows``: the same reads, tile by tile, each thread the rows of its half of the chunk (the partition of
  torch's element-wise operators: contiguous halves of the tensor);
- ``kernel_then_stores``: the kernel, then every cache line of the output stored back unchanged by the thread whose
  row half it is (the lines read by the other core handed back before the operators after it run).

Per variant, interleaved, medians of ``--reps`` passes; and each operator's self time in one pass under
torch.profiler (convolutions, batch norms, ReLUs, additions). Also the round trip of one cache line between the two
threads of an OpenMP team (two threads taking turns on an atomic flag): what a line read or written by the other
core costs on this machine.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import tm_tensorboard as tm
from tm_tensorboard import native
import bench_native
from bench_fused import forward_floor, speed_cases
from provenance import environment, save_results

RESULTS = Path(__file__).resolve().parent / "results" / "partition.json"
T, BATCH, SHARDS = bench_native.T, 4, 8  # (bench_native's states are T's)
OPERATORS = {"aten::mkldnn_convolution": "convolutions", "aten::native_batch_norm": "batch_norms",
             "aten::clamp_min": "relus", "aten::add": "additions"}

# The update kernel's reads without its arithmetic, in one of two partitions between the threads: `by_rows` 0, each
# thread the units of its tiles in every row (as native.py's kernels split a chunk); 1, each thread the rows of its
# contiguous half of the chunk, tile by tile.
_READS = native._PRELUDE + r"""
extern "C" void kernel(const float* x, float* sink, const int64_t rows, const int64_t U, const int64_t tile,
                       const int64_t by_rows) {
  const int64_t tiles = (U + tile - 1) / tile;
  #pragma omp parallel
  {
    VF total(0.0f);
    const int64_t me = omp_get_thread_num(), all = omp_get_num_threads();
    const int64_t k0 = by_rows ? 0 : tiles * me / all, k1 = by_rows ? tiles : tiles * (me + 1) / all;
    const int64_t r0 = by_rows ? rows * me / all : 0, r1 = by_rows ? rows * (me + 1) / all : rows;
    for (int64_t k = k0; k < k1; k++) {
      const int64_t u0 = k * tile, n = std::min(tile, U - u0);
      for (int64_t r = r0; r < r1; r++) {
        const float* row = x + r * U + u0;
        for (int64_t u = 0; u + NF <= n; u += NF) total = total + VF::loadu(row + u);
      }
    }
    float lanes[NF];
    total.store(lanes);
    sink[me % 64] = lanes[0];
  }
}
"""

# Every 64-byte line of `x` stored back unchanged by the thread whose contiguous half of `x` it is in.
_STORES = native._PRELUDE + r"""
extern "C" void kernel(float* x, const int64_t n) {
  const int64_t lines = n / 16;
  #pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < lines; i++) {
    volatile float* v = x + i * 16;
    *v = *v;
  }
}
"""

# Two threads of a team take turns on one atomic flag `rounds` times; the seconds it took, into `seconds`.
_PING_PONG = native._PRELUDE + r"""
#include <atomic>
extern "C" void kernel(double* seconds, const int64_t rounds) {
  alignas(64) static std::atomic<int64_t> flag;
  flag.store(0);
  double start = 0.0;
  #pragma omp parallel num_threads(2)
  {
    const int64_t me = omp_get_thread_num();
    #pragma omp barrier
    if (me == 0) start = omp_get_wtime();
    for (int64_t i = 0; i < rounds; i++) {
      const int64_t mine = 2 * i + me;
      while (flag.load(std::memory_order_acquire) != mine) {}
      flag.store(mine + 1, std::memory_order_release);
    }
    #pragma omp barrier
    if (me == 0) *seconds = omp_get_wtime() - start;
  }
}
"""

_READS_KERNEL = native._Kernel("reads by units or rows", _READS, ["const float*", "float*"] + ["const int64_t"] * 4)
_STORES_KERNEL = native._Kernel("lines stored back", _STORES, ["float*", "const int64_t"])
_PING_PONG_KERNEL = native._Kernel("ping-pong", _PING_PONG, ["double*", "const int64_t"])


def round_trip_ns(rounds: int = 200_000, repeats: int = 5) -> float | None:
    """Nanoseconds for a cache line to go from one thread of a two-thread team to the other and back (median);
    None with fewer than two cores (the two threads would spin on one)."""
    if len(os.sched_getaffinity(0)) < 2:
        return None
    call = _PING_PONG_KERNEL.get()
    assert call is not None, _PING_PONG_KERNEL.failed
    seconds = torch.zeros(1, dtype=torch.float64)
    times = []
    for _ in range(repeats):
        call(seconds, rounds)
        times.append(seconds.item() / rounds * 1e9)
    return statistics.median(times)


def hooked_floor(model: torch.nn.Module, chunks: list[torch.Tensor], variant: str) -> Callable[[], None]:
    """The forward of every chunk with ``variant``'s work in a hook on each observed layer."""
    reads, stores = _READS_KERNEL.get(), _STORES_KERNEL.get()
    assert reads is not None and stores is not None, (_READS_KERNEL.failed, _STORES_KERNEL.failed)
    states: dict[torch.nn.Module, list[list[torch.Tensor]]] = {}
    sink = torch.zeros(64)
    chunk = [-1]  # the chunk being forwarded, counted over passes (a pass is a whole number of state cycles)

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        units = output[0].numel()
        if variant in ("kernel", "kernel_then_stores"):
            if module not in states:
                states[module] = [bench_native._states(units) for _ in range(SHARDS)]
            assert native.variance_update(output, T, *states[module][chunk[0] // 4 % SHARDS])
            if variant == "kernel_then_stores":
                stores(output, output.numel())
        elif variant in ("reads_by_units", "reads_by_rows"):
            reads(output, sink, output.shape[0], units, native._tile(units), int(variant == "reads_by_rows"))

    model.register_forward_pre_hook(lambda m, i: chunk.__setitem__(0, chunk[0] + 1))
    for module in model.modules():
        if not list(module.children()) and not isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: hook(m, i, o) if o.dim() == 4 else None)
    return forward_floor(model, chunks)


def operator_times(forward: Callable[[], None]) -> dict[str, float]:
    """Self seconds of the forward's main operators in one pass."""
    with profile(activities=[ProfilerActivity.CPU]) as record:
        forward()
    found = {OPERATORS[e.key]: e.self_cpu_time_total / 1e6 for e in record.key_averages() if e.key in OPERATORS}
    return {name: round(found.get(name, 0.0), 4) for name in OPERATORS.values()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    variants = ("none", "kernel", "reads_by_units", "reads_by_rows", "kernel_then_stores")
    model, probe = speed_cases()["ResNet18Style_w0.25_32px"]
    tset = tm.transforms.rotations(T)
    chunks = [tset.apply(c) for c in probe.split(BATCH)]
    passes = {}
    for variant in variants:  # each its own copy of the model, so that each has only its own hooks
        passes[variant] = hooked_floor(copy.deepcopy(model), chunks, variant)
        passes[variant]()  # states allocated, kernels loaded, the heap grown
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.reps):
        for variant in variants:
            start = time.perf_counter()
            passes[variant]()
            seconds[variant].append(time.perf_counter() - start)
    operators = {variant: operator_times(passes[variant]) for variant in variants}
    figures = {
        "environment": environment(),
        "case": {"model": "ResNet18Style(width=0.25)", "pixels": 32, "N": len(probe), "T": T, "batch": BATCH,
                 "hooked_layers": "every leaf layer's 4-D output but the convolutions'", "state_sets": SHARDS,
                 "threads": torch.get_num_threads(), "reps": args.reps},
        "round_trip_ns": None if (trip := round_trip_ns()) is None else round(trip, 1),
        "seconds": {v: {"median": round(statistics.median(s), 4), "runs": [round(x, 4) for x in s]}
                    for v, s in seconds.items()},
        "operator_seconds": operators,
    }
    save_results(figures, args.output)
    trip = figures["round_trip_ns"]
    print("cache line round trip between the two threads: " + ("none (one core)" if trip is None else f"{trip} ns"))
    for variant in variants:
        print(f"{variant:20s} {figures['seconds'][variant]['median']:.3f} s  operators {operators[variant]}")


if __name__ == "__main__":
    main()
