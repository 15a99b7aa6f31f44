"""The CPU kernels of native.py (invariance's and per_transformation's updates) against the compiled graphs.

    python benchmarks/bench_native.py                  # ~13 min on an idle 2-core machine
    python benchmarks/bench_native.py --updates-only   # part 1 alone
    python benchmarks/bench_native.py --measure-only   # part 2 alone

1. The update alone: one [b·T, U] float32 chunk folded into float64 states, T = 16, U from 512 to 65,536
   units (``--units``), invariance's at b = 4 and 16, per_transformation's at 4 and 8 (its sample blocks on
   CPU; ``--kinds``), by the compiled graph and by the kernel (and the kernel with other largest tiles,
   ``native.TILE``: ``--tiles``; a small layer gets smaller ones, two per thread); enough layers cycled that
   the states and chunks leave the caches, as in a measurement. The kernel also into states of no samples
   (a shard's first chunk: the moments and squared sums written without being read) against merging.
   The traffic an update must move (the chunk read once, the states read and written) over its time: the
   effective bandwidth, against this machine's (bench_roofline.py); and invariance's kernel against the
   same traffic moved with one addition a value, tile by tile (``traffic_only``): what its arithmetic
   adds where it does not overlap the memory traffic. And each kernel as before its rows a multiple of 4 KB
   apart were packed or read a line at a time (``kernel_rows_as_they_lie``: the same kernel with ``aliased``
   false).
2. ``measure()`` with the kernels (all of native.py's: the updates', the inverse warp's, the error bars'
   replicates') and without them (TM_TENSORBOARD_NATIVE=0: the compiled graphs), interleaved
   with the forward-only floor in one run, on bench_fused's two cases (the reference case, N = 256, and
   ResNet18Style(width=0.25) at 32 px, N = 128), T = 16 rotations, batch_size 4 and 16, invariance and
   the default measures, error bars as by default; medians of ``--reps``. Also with invariance's kernel
   as before the aliased rows were packed (``kernel_rows_as_they_lie``, also what same-equivariance's maps
   moved back are folded by).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import tm_tensorboard as tm
from tm_tensorboard import native
from tm_tensorboard.layer_measures import _invariance_error_update, _variance_update
from bench_engine import interleaved, warm_allocator
from bench_fused import DEFAULT, INVARIANCE, THREADS, forward_floor, speed_cases
from provenance import environment, save_results

RESULTS = Path(__file__).resolve().parent / "results" / "native.json"
T = 16
CACHE_BYTES = 64 << 20  # layers cycled: more chunk and state bytes than this machine's caches hold


def _states(units: int) -> list[torch.Tensor]:
    """Invariance's: spread total and count, mean and m2 [T, units], count."""
    f64 = torch.float64
    return [torch.zeros(units, dtype=f64), torch.zeros((), dtype=torch.int64), torch.zeros(T, units, dtype=f64),
            torch.zeros(T, units, dtype=f64), torch.zeros((), dtype=torch.int64)]


def _error_states(units: int) -> list[torch.Tensor]:
    """per_transformation's: squared total [T, units] and count, the untransformed mean and m2, count."""
    f64 = torch.float64
    return [torch.zeros(T, units, dtype=f64), torch.zeros((), dtype=torch.int64), torch.zeros(units, dtype=f64),
            torch.zeros(units, dtype=f64), torch.zeros((), dtype=torch.int64)]


# The bytes invariance's update cannot avoid moving, with as little arithmetic as reading needs: each tile's
# rows read row by row (one addition a value, kept so that the reads stay), then its states' rows read and
# written (one addition each). What the kernel takes over this is what its arithmetic costs where it does
# not overlap the memory traffic.
_TRAFFIC_SOURCE = r"""
extern "C" void kernel(const float* x, double* mean, double* m2, float* sink, const int64_t b, const int64_t T,
                       const int64_t U, const int64_t tile) {
  const int64_t tiles = (U + tile - 1) / tile, TU = T * U;
  #pragma omp parallel
  {
    VF total(0.0f);
    #pragma omp for schedule(static)
    for (int64_t k = 0; k < tiles; k++) {
      const int64_t u0 = k * tile, n = std::min(tile, U - u0);
      for (int64_t i = 0; i < b; i++) {
        for (int64_t t = 0; t < T; t++) {
          const float* row = x + i * TU + t * U + u0;
          for (int64_t u = 0; u + NF <= n; u += NF) total = total + VF::loadu(row + u);
        }
      }
      for (int64_t t = 0; t < T; t++) {
        double* mp = mean + t * U + u0;
        double* qp = m2 + t * U + u0;
        for (int64_t u = 0; u + ND <= n; u += ND) {
          (VD::loadu(mp + u) + VD(1.0)).store(mp + u);
          (VD::loadu(qp + u) + VD(1.0)).store(qp + u);
        }
      }
    }
    float lanes[NF];
    total.store(lanes);
    sink[omp_get_thread_num() % 64] = lanes[0];
  }
}
"""
_TRAFFIC = native._Kernel("traffic floor", native._PRELUDE + _TRAFFIC_SOURCE,
                          ["const float*", "double*", "double*", "float*"] + ["const int64_t"] * 4)


def traffic_only(x: torch.Tensor, states: list[torch.Tensor], sink: torch.Tensor) -> None:
    """``_TRAFFIC_SOURCE`` on invariance's chunk ``x`` [b·T, U] and states, in native.TILE-unit tiles."""
    units = states[0].numel()
    call = _TRAFFIC.get()
    assert call is not None, _TRAFFIC.failed
    call(x, states[2], states[3], sink, x.shape[0] // T, T, units, native.TILE)


@functools.cache
def kernel_rows_as_they_lie(name: str = "_VARIANCE") -> native._Kernel:
    """A kernel of native.py's (invariance's by default; ``_ERRORS``: per_transformation's) as before its rows a
    multiple of 4 KB apart were packed or read a line at a time: the same source with ``aliased`` false."""
    aliased = "static inline bool aliased(int64_t U) { return NF * sizeof(float) < 64 && U % 1024 == 0; }"
    kernel = getattr(native, name)
    assert kernel.source.count(aliased) == 1
    source = kernel.source.replace(aliased, "static inline bool aliased(int64_t U) { return false; }")
    return native._Kernel(f"{kernel.name}, rows as they lie", source, kernel.arguments)


class TimedKernel:
    """A native._Kernel whose calls add their wall time to ``seconds``."""

    def __init__(self, kernel: native._Kernel):
        self.kernel, self.seconds = kernel, 0.0

    def get(self) -> Callable[..., None]:
        call = self.kernel.get()

        def timed(*arguments) -> None:
            start = time.perf_counter()
            call(*arguments)
            self.seconds += time.perf_counter() - start
        return timed


@contextlib.contextmanager
def rows_as_they_lie(on: bool, timer: list[float] | None = None) -> Iterator[None]:
    """With ``on``, native.variance_update and errors_update run their ``kernel_rows_as_they_lie``; with ``timer``,
    the seconds invariance's kernel calls took are appended to it."""
    kernel, errors = native._VARIANCE, native._ERRORS
    timed = TimedKernel(kernel_rows_as_they_lie() if on else kernel)
    native._VARIANCE = timed if timer is not None else timed.kernel
    native._ERRORS = kernel_rows_as_they_lie("_ERRORS") if on else errors
    try:
        yield
    finally:
        native._VARIANCE, native._ERRORS = kernel, errors
        if timer is not None:
            timer.append(timed.seconds)


# per update kind: its states, the compiled graph (never the kernel), the kernel, the states' bytes
UPDATES = {
    "invariance": (_states, lambda x, s: _variance_update._run_compiled((x, T, *s)),
                   lambda x, s: native.variance_update(x, T, *s), lambda units: (2 * T + 1) * units * 8),
    "per_transformation": (_error_states, lambda x, s: _invariance_error_update._run_compiled((x, T, 0, *s)),
                           lambda x, s: native.errors_update(x, T, 0, *s), lambda units: (T + 2) * units * 8),
}


def update_alone(kind: str, batch: int, units: int, tiles: list[int], reps: int) -> dict:
    """Microseconds per update by the compiled graph and by the kernel (per largest tile), medians of ``reps``."""
    make_states, graph, kernel_update, state_size = UPDATES[kind]
    chunk_bytes, state_bytes = batch * T * units * 4, state_size(units)
    # at least CACHE_BYTES cycled, two layers or more (one layer of 34 MB was served from the 32 MB L3 in part)
    layers = max(2, -(-CACHE_BYTES // (chunk_bytes + state_bytes)))
    chunks = [torch.randn(batch * T, units) for _ in range(layers)]
    states = [make_states(units) for _ in range(layers)]
    calls = max(layers, 200 // layers * layers)

    def timed(update: Callable[[torch.Tensor, list[torch.Tensor]], Any]) -> float:
        for x, s in zip(chunks, states):
            update(x, s)  # compiles, pages in
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for k in range(calls):
                update(chunks[k % layers], states[k % layers])
            times.append((time.perf_counter() - start) / calls)
        return statistics.median(times) * 1e6

    def kernel(tile: int) -> Callable:
        def update(x, s):
            previous, native.TILE = native.TILE, tile
            try:
                assert kernel_update(x, s)
            finally:
                native.TILE = previous
        return update

    def holding(samples: int) -> Callable:
        """The kernel into states holding ``samples`` samples (0: a shard's first chunk, written unread)."""
        def update(x, s):
            s[1].fill_(samples)
            s[4].fill_(samples)
            assert kernel_update(x, s)
        return update

    us = {"graph": timed(graph)}
    for tile in tiles:
        us[f"kernel_tile{tile}"] = timed(kernel(tile))
    with rows_as_they_lie(True):
        us["kernel_rows_as_they_lie"] = timed(kernel(native.TILE))
    us["kernel_first_chunk"] = timed(holding(0))  # both with the counts set: the same two small calls more
    us["kernel_merging"] = timed(holding(batch))
    if kind == "invariance":
        sink = torch.zeros(64)
        us["traffic_only"] = timed(lambda x, s: traffic_only(x, s, sink))
    traffic = {k: chunk_bytes + 2 * state_bytes for k in us}
    spread_bytes = units * 8 if kind == "invariance" else 0  # the one state a first chunk still reads
    traffic["kernel_first_chunk"] = chunk_bytes + state_bytes + spread_bytes  # (the rest written, not read)
    if "traffic_only" in us:  # the moments' states only: it leaves the spread's sums alone
        traffic["traffic_only"] = chunk_bytes + 2 * (state_bytes - spread_bytes)
    kernel_us = us[f"kernel_tile{native.TILE}"]
    return {"update": kind, "batch": batch, "units": units, "layers_cycled": layers, "us": us,
            "graph_over_kernel": us["graph"] / kernel_us,
            "kernel_over_traffic_only": kernel_us / us["traffic_only"] if "traffic_only" in us else None,
            "effective_GBps": {k: traffic[k] / (v * 1e-6) / 1e9 for k, v in us.items()}}


def measure_with_and_without(reps: int) -> dict:
    """measure() / floor with the kernel and with the compiled graphs, per case, batch size and measures; and
    the seconds a measure() spends in invariance's kernel (as it is or with its rows as they lie), timed around
    each call: less noisy than whole measurements where the floor itself varies."""
    out = {}
    tset = tm.transforms.rotations(T)
    for case, (model, probe) in speed_cases().items():
        methods: dict[str, Callable[[], Any]] = {}
        kernel_s: dict[str, list[float]] = {}
        for batch in (4, 16):
            methods[f"floor_b{batch}"] = forward_floor(model, [tset.apply(chunk) for chunk in probe.split(batch)])
            for label, measures in (("invariance", INVARIANCE), ("default", DEFAULT)):
                for way in ("kernel", "graphs", "kernel_rows_as_they_lie"):
                    name = f"{label}_{way}_b{batch}"
                    timer = kernel_s.setdefault(name, []) if way != "graphs" else None

                    def run(m=measures, b=batch, w=way, timer=timer):
                        os.environ[native.ENVIRONMENT_VARIABLE] = "0" if w == "graphs" else "1"
                        with rows_as_they_lie(w == "kernel_rows_as_they_lie", timer):
                            tm.measure(model, probe, tset, measures=m, batch_size=b, compile=True,
                                       dedupe_batchnorm=False)
                    methods[name] = run
        for run in methods.values():
            run()
        for timer in kernel_s.values():
            timer.clear()  # (the untimed first calls)
        wall = interleaved(methods, reps, case)
        median = {m: statistics.median(ts) for m, ts in wall.items()}
        out[case] = {
            "N": len(probe),
            "median_s": median,
            "all_s": wall,
            "invariance_kernel_median_s": {m: statistics.median(ts) for m, ts in kernel_s.items()},
            "invariance_kernel_all_s": kernel_s,
            "over_floor": {m: v / median[f"floor_b{m.rsplit('_b', 1)[1]}"] for m, v in median.items()
                           if not m.startswith("floor")},
        }
        print(case, {m: round(v, 2) for m, v in out[case]["over_floor"].items()}, flush=True)
    os.environ[native.ENVIRONMENT_VARIABLE] = "1"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tiles", type=int, nargs="+", default=[128, 256, native.TILE, 1024])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--updates-only", action="store_true", help="part 1 only (~2 min)")
    parser.add_argument("--measure-only", action="store_true", help="part 2 only (~11 min)")
    parser.add_argument("--units", type=int, nargs="+", default=[512, 4096, 16384, 65536],
                        help="layer sizes of part 1 (e.g. 16384 16400: a row stride off a multiple of 4 KB)")
    parser.add_argument("--kinds", nargs="+", choices=tuple(UPDATES), default=list(UPDATES),
                        help="updates of part 1")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warm_allocator()
    started = time.perf_counter()
    figures: dict[str, Any] = {"environment": environment(), "T": T, "threads": THREADS, "reps": args.reps,
                               "tile": native.TILE}
    updates = []
    for kind, batches in (("invariance", (4, 16)), ("per_transformation", (4, 8))):  # (8: DIFFERENCE_BLOCK)
        if kind not in args.kinds or args.measure_only:
            continue
        for batch in batches:
            for units in args.units:
                updates.append(update_alone(kind, batch, units, sorted(set(args.tiles)), args.reps))
                row = updates[-1]
                print(f"{kind} b{batch} U{units}: " + ", ".join(f"{k} {v:.0f} µs" for k, v in row["us"].items()),
                      flush=True)
    if updates:
        figures["update_alone"] = updates
    if not args.updates_only:
        figures["measure"] = measure_with_and_without(args.reps)
    figures["seconds"] = time.perf_counter() - started
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
