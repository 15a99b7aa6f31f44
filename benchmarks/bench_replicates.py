"""The error bars' replicates: the CPU kernels that finalize K shards' states, alone and inside measure().

    python benchmarks/bench_replicates.py        # ~2 min on an idle 2-core machine

1. Inside ``measure()``: ResNet18Style(width=0.25) at 32 px, N = 128, T = 16 rotations, batch_size 4, error bars as
   by default (8 shards), invariance and the default measures: the seconds of the replicates' kernel calls in a
   measurement, with the measurement's own seconds.
2. The kernels alone, as finalizing calls them (``merge=True``: the whole probe's states made from the shards'
   in the same pass): K = 8 shards of invariance's states (a spread total [U], mean and m2 [T, U]) and of
   per_transformation's (squared totals [T, U], mean and m2 [U]), T = 16, layers of U = 1,024, 4,096 and 16,384
   units, enough layers cycled that the states leave the caches (as after a measurement's chunks); milliseconds
   a pass over all layers and the shards' state bytes read over that time (per_transformation's also writes
   replicates [K, T + 1, U], as many bytes again).

Medians of ``--reps``. Run it with another package on ``PYTHONPATH`` for the figures before a change.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

import tm_tensorboard as tm
from tm_tensorboard import native
import bench_native
from bench_engine import warm_allocator
from bench_fused import DEFAULT, INVARIANCE, THREADS, speed_cases
from provenance import environment, save_results

RESULTS = Path(__file__).resolve().parent / "results" / "replicates.json"
T, K, BATCH = bench_native.T, 8, 4  # (bench_native's states are T's)
STATE_BYTES = 256 << 20  # shards' states a pass reads: more than this machine's caches hold


def _layer(units: int, errors: bool, g: torch.Generator) -> tuple[list, list[list[torch.Tensor]], torch.Tensor]:
    """A layer's whole-probe zero states (bench_native's: invariance's, or per_transformation's with ``errors``), K
    shards' of 16 samples each in the kernel's columns (each state's K tensors), and the replicates to fill. The
    shards' sums and m2 in [1, 2), their means standard normal: the rests well away from 0."""
    states = bench_native._error_states if errors else bench_native._states
    shards = [states(units) for _ in range(K)]
    for total, total_count, mean, m2, count in shards:
        total.uniform_(1, 2, generator=g)
        mean.normal_(generator=g)
        m2.uniform_(1, 2, generator=g)
        total_count.fill_(16)
        count.fill_(16)
    out = torch.empty(K, T + 1 if errors else 2, units, dtype=torch.float64)
    return states(units), [[shard[i] for shard in shards] for i in range(5)], out


def kernels_alone(units: int, kind: str, reps: int) -> dict[str, Any]:
    """One pass of a replicates' kernel over enough layers of ``units`` that their shards' states leave the caches."""
    errors = kind == "per_transformation"
    call = native.errors_replicates if errors else native.variance_replicates
    g = torch.Generator().manual_seed(units)
    layers = [_layer(units, errors, g)]
    read = sum(t.nbytes for column in layers[0][1] for t in column if t.is_floating_point())  # its shards' bytes
    layers += [_layer(units, errors, g) for _ in range(max(1, STATE_BYTES // read) - 1)]

    def one_pass() -> None:  # (the whole probe's states need no zeroing: the merge writes them unread)
        for whole, columns, out in layers:
            assert call(*whole, *columns, out, merge=True)

    one_pass()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"kind": kind, "units": units, "layers": len(layers), "shard_state_mb": round(read * len(layers) / 1e6, 1),
            "ms": round(median * 1e3, 2), "gb_per_s": round(read * len(layers) / median / 1e9, 1)}


def in_measure(measures: tuple[str, ...], reps: int) -> dict[str, Any]:
    """Seconds of the replicates' kernels within measure() of ResNet18Style(0.25) at batch 4 (medians)."""
    model, probe = speed_cases()["ResNet18Style_w0.25_32px"]
    tset = tm.transforms.rotations(T)
    spent = [0.0]
    original: Callable = native._replicates

    def timed(*args: Any) -> bool:
        start = time.perf_counter()
        done = original(*args)
        spent[0] += time.perf_counter() - start
        return done

    native._replicates = timed
    try:
        tm.measure(model, probe, tset, measures=measures, batch_size=BATCH, compile=True)
        kernels, totals = [], []
        for _ in range(reps):
            spent[0] = 0.0
            start = time.perf_counter()
            tm.measure(model, probe, tset, measures=measures, batch_size=BATCH, compile=True)
            totals.append(time.perf_counter() - start)
            kernels.append(spent[0])
    finally:
        native._replicates = original
    return {"measures": list(measures), "replicates_s": round(statistics.median(kernels), 4),
            "measure_s": round(statistics.median(totals), 4), "replicates_runs": [round(s, 4) for s in kernels]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warm_allocator()
    inside = [in_measure(measures, args.reps) for measures in (INVARIANCE, DEFAULT)]  # (first: the heap as it sets it)
    for row in inside:
        print(f"measure() {row['measures']}: replicates {row['replicates_s']} s of {row['measure_s']} s", flush=True)
    alone = [kernels_alone(units, kind, args.reps) for kind in ("invariance", "per_transformation")
             for units in (1024, 4096, 16384)]
    for row in alone:
        print(f"{row['kind']} U{row['units']}: {row['ms']} ms, {row['gb_per_s']} GB/s", flush=True)
    save_results({"environment": environment(), "T": T, "K": K, "batch": BATCH, "reps": args.reps,
                  "kernels_alone": alone, "in_measure": inside}, args.output)


if __name__ == "__main__":
    main()
