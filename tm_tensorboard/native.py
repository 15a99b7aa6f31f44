"""Hand-written CPU kernels for the hottest per-chunk updates, compiled at run time by the C++ toolchain
Inductor uses: invariance's (and same-equivariance's, on the maps moved back) and ``per_transformation``'s (and
the equivariance error's, the same squared differences from maps moved back), same-equivariance's inverse
warp, the error bars' replicates of both variance groups and of ``per_transformation``, and the zeroing of
the state memory a measurement keeps for the next (``kept_states``).

Inductor compiles invariance's update into two loop nests, one per reduction axis (the spread over
transformations, the moments over samples), that each read the chunk from memory, and its reductions over
samples read one strided stream per sample: ~10-25 GB/s on this project's CPU, where the states and the
chunk could move at 60-130 GB/s. This kernel walks the units in tiles: each sample's rows of a tile are
read once, in T sequential streams, for the spread, and stay in cache for the moments, which are merged
into the states tile by tile. ``per_transformation``'s kernel reads each row once too, the untransformed
rows of a tile staying in cache for all T differences (``benchmarks/bench_native.py``); where a layer has both,
one kernel does both tile by tile, the second reading the rows the first brought into cache. The arithmetic is
the compiled path's: the spread two-pass within each sample in the activations' precision, the moments
shifted by the chunk's first sample and accumulated in float64 (exact differences of float32 values),
merged by Chan's formula, squared differences in the activations' precision summed in float64. States of no
samples yet (with error bars, every shard's first chunk) are written without being read. A call may also take
the rows of the chunk before, kept for it (pairs of chunks of a few samples: ``layer_measures.Chunk.hold``):
tile by tile, those first and then the chunk's, as two calls would fold them (the same numbers), each tile of
the states read from memory and written back once for both. A layer and the ReLU that takes its output
(``relu_pairs.py``) are folded by one call too: each vector of the layer's rows, read once, folded as it is and
as its ReLU (max(v, 0) as torch's ReLU takes it), the ReLU's output never read (the same numbers as two calls).

The inverse warp (``warps.py``) compiles to two passes over the chunk: maps laid out pixel-major, then
each output row gathered from its taps' rows. Its kernel lays one map at a time out pixel-major in a
buffer that stays in cache and gathers from there: the chunk is read once and the moved maps written once,
the same sums in the same order (2-3x faster than the two graphs on the reference case's layers).

The error bars' replicates (``shards.py``) of invariance and same-equivariance are TV and SV of the
whole probe without each shard: compiled, the states were turned into the replicates' by one graph and
each shard's computed by another (0.28 s on ResNet18Style with the default measures, in a profile); one
graph for all shards read the whole probe's states once per shard at ~10 GB/s (0.27 s). The kernel takes a
tile of units through every transformation and shard with the whole probe's rows in cache, summing each
replicate's square roots there (0.12 s). Finalizing compiled, it also merges the shards into the whole
probe's states, row by row, just before it reads them (the merge was a pass of its own over the same states).
``per_transformation``'s replicates (the mean squared difference of each transformation and twice the
untransformed rows' variance, without each shard) are made the same way: merged, left out and divided in one
pass over each tile, where eagerly the merge, the leave-out and each shard's values were a pass (or several)
each.

They run on CPU where the compiled updates run (``compile``), for float32 activations and float64 states;
anything else, a GPU included, runs the compiled graphs. A toolchain that cannot build them warns once and
the compiled graphs take over; ``TM_TENSORBOARD_NATIVE=0`` turns them off.

Built once per machine: Inductor's code cache keeps each library, and this module records where (``_Store``),
so that a later process loads it in well under a millisecond, where going through Inductor's cache costs
~1.6 s a process (importing Inductor, probing the CPU's vector instructions by compiling and loading test
programs). Loaded that cheaply, they serve without any compiled graph (``fused.NATIVE``: the kernels where
they apply, eager elsewhere; ``engine.automatic_kernels`` says when).
"""
from __future__ import annotations

import getpass
import hashlib
import importlib.util
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import caller

__all__ = ["ENVIRONMENT_VARIABLE", "TILE", "variance_update", "relu_update", "relu_both_update", "errors_update",
           "moved_errors_update", "both_update", "lies_channels_last", "move_back", "variance_replicates",
           "errors_replicates", "zero_fill", "prepare_zero_fill", "enabled", "available", "stored", "build_all",
           "record_directory", "report_failure", "build_seconds"]

ENVIRONMENT_VARIABLE = "TM_TENSORBOARD_NATIVE"
TILE = 512  # most units per tile: b·T rows of 2 KB, in L2 for the moments' pass (bench_native.py)
MIN_TILE, MAX_TILE = 64, 1024  # (MAX_TILE: the variance kernel's per-thread buffer)

_PRELUDE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using VF = at::vec::Vectorized<float>;
using VD = at::vec::Vectorized<double>;
constexpr int64_t NF = VF::size();
constexpr int64_t ND = VD::size();

#if defined(__GNUC__)
#define ALWAYS_INLINE __attribute__((always_inline)) inline  // (called instead: errors_tile 7-10 % slower, Zen 3)
#else
#define ALWAYS_INLINE inline
#endif

// A vector, or one value, of rows as they lie, or (RELU) of their ReLU as torch's takes it (max(v, 0), NaN kept,
// -0 kept): the states of a ReLU of an observed output folded from that output (``relu_update``).
static ALWAYS_INLINE VF relu_of(const VF& v) { return at::vec::clamp_min(v, VF(0.0f)); }
template <bool RELU>
static ALWAYS_INLINE VF load(const float* p) {
  if constexpr (RELU) return relu_of(VF::loadu(p));
  return VF::loadu(p);
}
template <bool RELU>
static ALWAYS_INLINE float load1(const float* p) {
  if constexpr (RELU) return std::isnan(*p) || *p >= 0.0f ? *p : 0.0f;
  return *p;
}

// Fold b samples of n units (rows `stride` floats apart, in cache) into float64 mean and m2 of n_a samples:
// deviations from the first sample as float64 differences, the chunk's moments merged by Chan's formula
// (`fold_vector`: NF units from u; `fold_unit`: unit u; w: the chunk's share of the merge, nw: n_a·w).
// A state of no samples yet is written, not read: what the merge into zeros gives (but for the sign of a
// zero mean), without reading the states (with error bars the first chunk of every shard is such a chunk).
template <bool RELU>
static ALWAYS_INLINE void fold_vector(const float* rows, int64_t stride, int64_t b, int64_t u, double* mean,
                                      double* m2, double w, double nw, bool fresh) {
  const auto z = at::vec::convert<double, 2, float, 1>(load<RELU>(rows + u));  // the shift: sample 0
  VD s[2] = {VD(0.0), VD(0.0)}, q[2] = {VD(0.0), VD(0.0)};
  for (int64_t i = 1; i < b; i++) {
    const auto v = at::vec::convert<double, 2, float, 1>(load<RELU>(rows + i * stride + u));
    for (int h = 0; h < 2; h++) {
      const VD e = v[h] - z[h];
      s[h] = s[h] + e;
      q[h] = q[h] + e * e;
    }
  }
  for (int h = 0; h < 2; h++) {
    double* mp = mean + u + h * ND;
    double* qp = m2 + u + h * ND;
    const VD chunk_mean = s[h] / VD(static_cast<double>(b));
    const VD chunk_m2 = q[h] - s[h] * chunk_mean;
    if (fresh) {
      chunk_m2.store(qp);
      (z[h] + chunk_mean).store(mp);
      continue;
    }
    const VD old = VD::loadu(mp);
    const VD delta = (old - z[h]) - chunk_mean;
    (VD::loadu(qp) + chunk_m2 + delta * delta * VD(nw)).store(qp);
    (old - delta * VD(w)).store(mp);
  }
}

template <bool RELU>
static inline void fold_unit(const float* rows, int64_t stride, int64_t b, int64_t u, double* mean, double* m2,
                             double w, double nw, bool fresh) {
  const double z = load1<RELU>(rows + u);
  double s = 0.0, q = 0.0;
  for (int64_t i = 1; i < b; i++) {
    const double e = static_cast<double>(load1<RELU>(rows + i * stride + u)) - z;
    s += e;
    q += e * e;
  }
  const double chunk_mean = s / static_cast<double>(b), chunk_m2 = q - s * chunk_mean;
  if (fresh) {
    m2[u] = chunk_m2;
    mean[u] = z + chunk_mean;
    return;
  }
  const double delta = (mean[u] - z) - chunk_mean;
  m2[u] += chunk_m2 + delta * delta * nw;
  mean[u] -= delta * w;
}

template <bool RELU = false>
static inline void fold_moments(const float* rows, int64_t stride, int64_t b, int64_t n, double* mean,
                                double* m2, double n_a) {
  const double w = static_cast<double>(b) / (n_a + static_cast<double>(b)), nw = n_a * w;
  const bool fresh = n_a == 0.0;
  const int64_t whole = n / NF * NF;
  for (int64_t u = 0; u < whole; u += NF) fold_vector<RELU>(rows, stride, b, u, mean, m2, w, nw, fresh);
  for (int64_t u = whole; u < n; u++) fold_unit<RELU>(rows, stride, b, u, mean, m2, w, nw, fresh);
}
"""

_TILES = _PRELUDE + r"""
// The sum over transformations t < T of term(t) in four interleaved accumulators (term t into the t % 4-th), added
// pairwise: as one chain of T dependent additions the invariance kernel took 10-12 % longer with its chunk in cache
// (benchmarks/README.md, "CPU kernels"). V: float or VF, in the same order either way.
template <typename V, typename Term>
static inline V sum_over_transformations(int64_t T, Term term) {
  V a(0.0f), b(0.0f), c(0.0f), d(0.0f);
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {
    a = a + term(t);
    b = b + term(t + 1);
    c = c + term(t + 2);
    d = d + term(t + 3);
  }
  if (t < T) a = a + term(t);
  if (t + 1 < T) b = b + term(t + 1);
  if (t + 2 < T) c = c + term(t + 2);
  return (a + b) + (c + d);
}

// Rows a multiple of 4 KB apart, read with vectors shorter than a cache line (`aliased`): every x86 core's L1 cache
// is 4 KB a way, so there the T rows of the spread's two passes (and the b rows of the moments') all fall in one of
// its sets, more rows than it has ways, and each line, read half a line at a time, is evicted by the other rows'
// before its second half is read (benchmarks/README.md, "CPU kernels": measured on a Zen 3, AVX2; with AVX-512 a
// vector is a line, and rows 64 bytes off such strides gained nothing on a Zen 5). From PACKED_SAMPLES samples a
// tile's rows are copied row by row into a buffer of this thread's, 64 bytes apart beyond their length, so that they
// fall in different sets (while the buffer stays under PACKED_FLOATS: 2 MB a thread, kept for the next call); with
// fewer, the moments' b rows fit the ways and the spread reads each line of its T rows once into a small buffer
// (`spread_through_lines`): a copy of the whole tile cost as much as it saved there.
constexpr int64_t PACKED_SAMPLES = 8, PACKED_FLOATS = int64_t(1) << 19, LINE_T = 64;
static inline bool aliased(int64_t U) { return NF * sizeof(float) < 64 && U % 1024 == 0; }
static inline int64_t packed_stride(int64_t n) { return n + 16; }
static inline bool packs(int64_t b, int64_t T, int64_t U, int64_t n) {
  return aliased(U) && b >= PACKED_SAMPLES && b * T * packed_stride(n) <= PACKED_FLOATS;
}
static inline const float* packed_rows(const float* x, int64_t rows, int64_t U, int64_t n) {
  static thread_local std::vector<float> buffer;
  const int64_t stride = packed_stride(n);
  if (static_cast<int64_t>(buffer.size()) < rows * stride) buffer.resize(rows * stride);
  for (int64_t r = 0; r < rows; r++) std::memcpy(buffer.data() + r * stride, x + r * U, n * sizeof(float));
  return buffer.data();
}

// One sample's std over transformations of NF units (its T rows at v, `stride` floats apart) added to spread.
template <bool RELU = false>
static inline void add_spread(const float* v, int64_t stride, int64_t T, double* spread) {
  const float t_count = static_cast<float>(T), t_dof = static_cast<float>(T - 1);  // divided by, as torch does
  const VF mu = sum_over_transformations<VF>(T, [&](int64_t t) { return load<RELU>(v + t * stride); }) / VF(t_count);
  const VF q = sum_over_transformations<VF>(T, [&](int64_t t) {
    const VF d = load<RELU>(v + t * stride) - mu;
    return d * d;
  });
  const auto sd = at::vec::convert<double, 2, float, 1>((q / VF(t_dof)).sqrt());
  (VD::loadu(spread) + sd[0]).store(spread);
  (VD::loadu(spread + ND) + sd[1]).store(spread + ND);
}

// One sample's std over transformations of one unit (its T values at v, `stride` floats apart), as `add_spread`'s.
template <bool RELU>
static inline double unit_spread(const float* v, int64_t stride, int64_t T) {
  const float t_count = static_cast<float>(T), t_dof = static_cast<float>(T - 1);
  const float mu = sum_over_transformations<float>(T, [&](int64_t t) { return load1<RELU>(v + t * stride); }) / t_count;
  const float q = sum_over_transformations<float>(T, [&](int64_t t) {
    const float d = load1<RELU>(v + t * stride) - mu;
    return d * d;
  });
  return static_cast<double>(std::sqrt(q / t_dof));
}

// `add_spread` of the units [u, u + 2 NF) of a sample's T rows at xi, R floats apart: each row's 2 NF floats
// (an L1 line at least) loaded once into `line` (T rows of 2 NF floats), the two passes made there.
template <bool RELU>
static inline void spread_through_lines(const float* xi, int64_t R, int64_t T, int64_t u, float* line,
                                        double* spread) {
  for (int64_t t = 0; t < T; t++) {
    load<RELU>(xi + t * R + u).store(line + t * 2 * NF);
    load<RELU>(xi + t * R + u + NF).store(line + t * 2 * NF + NF);
  }
  add_spread(line, 2 * NF, T, spread + u);
  add_spread(line + NF, 2 * NF, T, spread + u + NF);
}

// Invariance's update of n units of b samples' rows (sample i's transformation t at x + (i·T + t)·R, n units
// each): each sample's std over transformations (T sequential streams over the tile) summed into spread (n doubles,
// a work buffer) and then spread_total; per transformation, the moments over samples (the tile now in cache)
// merged into mean, m2 (rows of the states U doubles apart). `lines`: the spread through `spread_through_lines`.
template <bool RELU>
static inline void variance_rows(const float* x, int64_t R, bool lines, double* spread, double* spread_total,
                                 double* mean, double* m2, double n_a, int64_t b, int64_t T, int64_t U, int64_t n) {
  const int64_t TR = T * R, whole = n / NF * NF;
  alignas(64) float line[LINE_T * 2 * NF];
  for (int64_t u = 0; u < n; u++) spread[u] = 0.0;
  for (int64_t i = 0; i < b; i++) {
    const float* xi = x + i * TR;
    int64_t u = 0;
    if (lines) {
      for (; u + 2 * NF <= whole; u += 2 * NF) spread_through_lines<RELU>(xi, R, T, u, line, spread);
    }
    for (; u < whole; u += NF) add_spread<RELU>(xi + u, R, T, spread + u);
    for (; u < n; u++) spread[u] += unit_spread<RELU>(xi + u, R, T);
  }
  for (int64_t u = 0; u < n; u++) spread_total[u] += spread[u];
  for (int64_t t = 0; t < T; t++) {
    fold_moments<RELU>(x + t * R, TR, b, n, mean + t * U, m2 + t * U, n_a);
  }
}

// Invariance's update of the units [u0, u0 + n) of x [b, T, U] (float32, contiguous), or (RELU) of its ReLU:
// `variance_rows` on the chunk's rows, or on a packed copy of them (`packs`), or through lines where they are
// `aliased` otherwise.
template <bool RELU = false>
static inline void variance_tile(const float* x, double* spread, double* spread_total, double* mean, double* m2,
                                 double n_a, int64_t b, int64_t T, int64_t U, int64_t u0, int64_t n) {
  const bool pack = packs(b, T, U, n), lines = !pack && aliased(U) && T <= LINE_T;
  const float* rows = pack ? packed_rows(x + u0, b * T, U, n) : x + u0;
  variance_rows<RELU>(rows, pack ? packed_stride(n) : U, lines, spread, spread_total + u0, mean + u0, m2 + u0, n_a, b,
                      T, U, n);
}

// `variance_rows` of x's rows (R floats apart, as they lie) and of their ReLU at once (states relu_*), unit by unit:
// each vector of a sample's T rows, and of a transformation's b rows, read once for both.
static inline void variance_rows_and_relu(const float* x, int64_t R, double* spread, double* relu_spread,
                                          double* spread_total, double* relu_spread_total, double* mean, double* m2,
                                          double* relu_mean, double* relu_m2, double n_a, double relu_n_a, int64_t b,
                                          int64_t T, int64_t U, int64_t n) {
  const int64_t TR = T * R, whole = n / NF * NF;
  for (int64_t u = 0; u < n; u++) spread[u] = relu_spread[u] = 0.0;
  for (int64_t i = 0; i < b; i++) {
    const float* xi = x + i * TR;
    int64_t u = 0;
    for (; u < whole; u += NF) {
      add_spread<false>(xi + u, R, T, spread + u);
      add_spread<true>(xi + u, R, T, relu_spread + u);
    }
    for (; u < n; u++) {
      spread[u] += unit_spread<false>(xi + u, R, T);
      relu_spread[u] += unit_spread<true>(xi + u, R, T);
    }
  }
  for (int64_t u = 0; u < n; u++) {
    spread_total[u] += spread[u];
    relu_spread_total[u] += relu_spread[u];
  }
  const double B = static_cast<double>(b), w = B / (n_a + B), nw = n_a * w;
  const double rw = B / (relu_n_a + B), rnw = relu_n_a * rw;
  const bool fresh = n_a == 0.0, relu_fresh = relu_n_a == 0.0;
  for (int64_t t = 0; t < T; t++) {
    const float* rows = x + t * R;
    double *mt = mean + t * U, *qt = m2 + t * U, *rmt = relu_mean + t * U, *rqt = relu_m2 + t * U;
    int64_t u = 0;
    for (; u < whole; u += NF) {
      fold_vector<false>(rows, TR, b, u, mt, qt, w, nw, fresh);
      fold_vector<true>(rows, TR, b, u, rmt, rqt, rw, rnw, relu_fresh);
    }
    for (; u < n; u++) {
      fold_unit<false>(rows, TR, b, u, mt, qt, w, nw, fresh);
      fold_unit<true>(rows, TR, b, u, rmt, rqt, rw, rnw, relu_fresh);
    }
  }
}

// The squared differences of H vectors of units [u, u + H·NF) of b samples' rows (sample i's at xt and ref + i·TU)
// summed into st, even and odd samples apart (written, not read, with `fresh_sums`): H = 2 reads a line of each row
// at a time where vectors are half a line, in the same order per unit as H = 1.
template <int H, bool RELU = false>
static ALWAYS_INLINE void add_squared(const float* xt, const float* ref, int64_t TU, int64_t b, int64_t u,
                                      bool fresh_sums, double* st) {
  const auto squared = [&](int64_t i, int h) {
    const VF d = load<RELU>(xt + i * TU + u + h * NF) - load<RELU>(ref + i * TU + u + h * NF);
    return at::vec::convert<double, 2, float, 1>(d * d);
  };
  VD sums[H][4];  // per vector: the even samples' low and high halves, then the odd ones'
  for (int h = 0; h < H; h++) sums[h][0] = sums[h][1] = sums[h][2] = sums[h][3] = VD(0.0);
  int64_t i = 0;
  for (; i + 2 <= b; i += 2) {
    for (int h = 0; h < H; h++) {
      const auto even = squared(i, h), odd = squared(i + 1, h);
      sums[h][0] = sums[h][0] + even[0];
      sums[h][1] = sums[h][1] + even[1];
      sums[h][2] = sums[h][2] + odd[0];
      sums[h][3] = sums[h][3] + odd[1];
    }
  }
  for (int h = 0; h < H; h++) {
    if (i < b) {
      const auto even = squared(i, h);
      sums[h][0] = sums[h][0] + even[0];
      sums[h][1] = sums[h][1] + even[1];
    }
    const VD lo = sums[h][0] + sums[h][2], hi = sums[h][1] + sums[h][3];
    double* sh = st + u + h * NF;
    (fresh_sums ? lo : VD::loadu(sh) + lo).store(sh);
    (fresh_sums ? hi : VD::loadu(sh + ND) + hi).store(sh + ND);
  }
}

// The squared differences of one unit u (past the vectors) of b samples' rows summed into st[u] as `add_squared`
// sums a vector's.
template <bool RELU = false>
static inline void add_squared_unit(const float* xt, const float* ref, int64_t TU, int64_t b, int64_t u,
                                    bool fresh_sums, double* st) {
  double even = 0.0, odd = 0.0;
  for (int64_t i = 0; i < b; i++) {
    const float d = load1<RELU>(xt + i * TU + u) - load1<RELU>(ref + i * TU + u);
    (i % 2 == 0 ? even : odd) += static_cast<double>(d * d);
  }
  st[u] = fresh_sums ? even + odd : st[u] + (even + odd);
}

// per_transformation's update of the units [u0, u0 + n) of x [b, T, U]: the moments over samples of the
// untransformed rows (transformation `identity` of r [b, T, U]: x itself, or the equivariance error's
// features before moving back) merged into mean, m2 [U]; per transformation, the squared differences of x
// from them summed over samples into squared_total [T, U] (the untransformed rows in cache; written, not
// read, while it sums no samples yet: `fresh_sums`), even and odd samples in two sums added at the end (one
// chain of dependent additions per unit took 15-30 % longer at batch 4: benchmarks/README.md, "CPU kernels").
// Its 2·b rows at one offset evict one another where `aliased`: from PACKED_SAMPLES samples each row is read a
// line at a time there (at 4 samples that gained nothing in a measurement). RELU: of the ReLU of x and r.
template <bool RELU = false>
static inline void errors_tile(const float* x, const float* r, double* squared_total, bool fresh_sums, double* mean,
                               double* m2, double n_a, int64_t b, int64_t T, int64_t U, int64_t identity, int64_t u0,
                               int64_t n) {
  const int64_t TU = T * U, whole = n / NF * NF;
  const float* ref = r + identity * U + u0;  // sample i's untransformed row: ref + i * TU
  fold_moments<RELU>(ref, TU, b, n, mean + u0, m2 + u0, n_a);
  const bool lines = aliased(U) && b >= PACKED_SAMPLES;  // a line of each row at a time: the same sums, same order
  for (int64_t t = 0; t < T; t++) {
    const float* xt = x + t * U + u0;
    double* st = squared_total + t * U + u0;
    int64_t u = 0;
    for (; lines && u + 2 * NF <= whole; u += 2 * NF) add_squared<2, RELU>(xt, ref, TU, b, u, fresh_sums, st);
    for (; u < whole; u += NF) add_squared<1, RELU>(xt, ref, TU, b, u, fresh_sums, st);
    for (; u < n; u++) add_squared_unit<RELU>(xt, ref, TU, b, u, fresh_sums, st);  // (u is whole here)
  }
}
"""

_VARIANCE_SOURCE = _TILES + r"""
// x [b, T, U] float32 (contiguous), after `held` samples [held, T, U] kept from the chunk before (none: 0): each
// tile of both folded in as two calls would, one chunk after the other, its states read from memory once;
// states float64: spread_total [U], mean and m2 [T, U]; counts int64.
extern "C" void kernel(const float* x, const float* kept, double* spread_total, int64_t* spread_count, double* mean,
                       double* m2, int64_t* count, const int64_t b, const int64_t held, const int64_t T,
                       const int64_t U, const int64_t tile) {
  const double n_a = static_cast<double>(*count);
  const int64_t tiles = (U + tile - 1) / tile;
  #pragma omp parallel
  {
    alignas(64) double spread[1024];  // tile <= MAX_TILE
    #pragma omp for schedule(static)
    for (int64_t k = 0; k < tiles; k++) {
      const int64_t u0 = k * tile, n = std::min(tile, U - u0);
      if (held > 0) variance_tile(kept, spread, spread_total, mean, m2, n_a, held, T, U, u0, n);
      variance_tile(x, spread, spread_total, mean, m2, n_a + static_cast<double>(held), b, T, U, u0, n);
    }
  }
  *spread_count += held + b;
  *count += held + b;
}
"""

_RELU_TILE = r"""
// Invariance's update of the units [u0, u0 + n) of x [b, T, U] and of its ReLU, each vector read once for both
// (where the rows are packed or read through lines, `aliased`: the tile's update, then the ReLU's from the rows it
// brought into cache).
static inline void variance_tile_and_relu(const float* x, double* spread, double* relu_spread, double* spread_total,
                                          double* mean, double* m2, double n_a, double* relu_spread_total,
                                          double* relu_mean, double* relu_m2, double relu_n_a, int64_t b, int64_t T,
                                          int64_t U, int64_t u0, int64_t n) {
  if (aliased(U)) {
    variance_tile(x, spread, spread_total, mean, m2, n_a, b, T, U, u0, n);
    variance_tile<true>(x, spread, relu_spread_total, relu_mean, relu_m2, relu_n_a, b, T, U, u0, n);
  } else {
    variance_rows_and_relu(x + u0, U, spread, relu_spread, spread_total + u0, relu_spread_total + u0, mean + u0,
                           m2 + u0, relu_mean + u0, relu_m2 + u0, n_a, relu_n_a, b, T, U, n);
  }
}

struct VarianceStates {  // invariance's: spread total [U] and count, mean and m2 [T, U], count
  double* spread_total;
  int64_t* spread_count;
  double* mean;
  double* m2;
  int64_t* count;
};
struct ErrorStates {  // per_transformation's: squared total [T, U] and count, the untransformed rows' mean, m2, count
  double* squared_total;
  int64_t* squared_count;
  double* mean;
  double* m2;
  int64_t* count;
};

// `add_squared<1>` of x's rows and of their ReLU (into relu_st) at once: each vector read once for both, each sum
// added in the same order as two calls add it.
static ALWAYS_INLINE void add_squared_and_relu(const float* xt, const float* ref, int64_t TU, int64_t b, int64_t u,
                                               bool fresh_sums, double* st, bool relu_fresh_sums, double* relu_st) {
  VD sums[4], relu_sums[4];  // as add_squared's: the even samples' low and high halves, then the odd ones'
  for (int j = 0; j < 4; j++) sums[j] = relu_sums[j] = VD(0.0);
  const auto add = [&](int64_t i, int parity) {
    const VF a = VF::loadu(xt + i * TU + u), r = VF::loadu(ref + i * TU + u);
    const VF d = a - r, relu_d = relu_of(a) - relu_of(r);
    const auto squared = at::vec::convert<double, 2, float, 1>(d * d);
    const auto relu_squared = at::vec::convert<double, 2, float, 1>(relu_d * relu_d);
    for (int h = 0; h < 2; h++) {
      sums[2 * parity + h] = sums[2 * parity + h] + squared[h];
      relu_sums[2 * parity + h] = relu_sums[2 * parity + h] + relu_squared[h];
    }
  };
  int64_t i = 0;
  for (; i + 2 <= b; i += 2) {
    add(i, 0);
    add(i + 1, 1);
  }
  if (i < b) add(i, 0);
  const auto store = [](const VD* s, bool fresh, double* sh) {
    const VD lo = s[0] + s[2], hi = s[1] + s[3];
    (fresh ? lo : VD::loadu(sh) + lo).store(sh);
    (fresh ? hi : VD::loadu(sh + ND) + hi).store(sh + ND);
  };
  store(sums, fresh_sums, st + u);
  store(relu_sums, relu_fresh_sums, relu_st + u);
}

// `errors_tile` of x (r: x itself) and `errors_tile<true>` at once, where rows are not read a line at a time
// (`aliased`, from PACKED_SAMPLES: the two calls there): each vector of the T·b rows read once for both.
static inline void errors_tile_and_relu(const float* x, ErrorStates e, bool fresh_sums, double n_a, ErrorStates relu_e,
                                        bool relu_fresh_sums, double relu_n_a, int64_t b, int64_t T, int64_t U,
                                        int64_t identity, int64_t u0, int64_t n) {
  if (aliased(U) && b >= PACKED_SAMPLES) {
    errors_tile(x, x, e.squared_total, fresh_sums, e.mean, e.m2, n_a, b, T, U, identity, u0, n);
    errors_tile<true>(x, x, relu_e.squared_total, relu_fresh_sums, relu_e.mean, relu_e.m2, relu_n_a, b, T, U,
                      identity, u0, n);
    return;
  }
  const int64_t TU = T * U, whole = n / NF * NF;
  const float* ref = x + identity * U + u0;
  fold_moments(ref, TU, b, n, e.mean + u0, e.m2 + u0, n_a);
  fold_moments<true>(ref, TU, b, n, relu_e.mean + u0, relu_e.m2 + u0, relu_n_a);
  for (int64_t t = 0; t < T; t++) {
    const float* xt = x + t * U + u0;
    double* st = e.squared_total + t * U + u0;
    double* relu_st = relu_e.squared_total + t * U + u0;
    int64_t u = 0;
    for (; u < whole; u += NF) add_squared_and_relu(xt, ref, TU, b, u, fresh_sums, st, relu_fresh_sums, relu_st);
    for (; u < n; u++) {  // (a few units: each tail read twice)
      add_squared_unit(xt, ref, TU, b, u, fresh_sums, st);
      add_squared_unit<true>(xt, ref, TU, b, u, relu_fresh_sums, relu_st);
    }
  }
}

// Invariance's update of x [b, T, U] float32 (contiguous) and of its ReLU (relu: the states of a ReLU that took x),
// tile by tile (`variance_tile_and_relu`), and (ERRORS) per_transformation's of both from the rows invariance's
// brought into cache (`errors_tile_and_relu`): x is read from memory once, and the ReLU's output not at all.
template <bool ERRORS>
static inline void fold_with_relu(const float* x, VarianceStates v, VarianceStates relu, ErrorStates e,
                                  ErrorStates relu_e, int64_t b, int64_t T, int64_t U, int64_t identity, int64_t tile) {
  const double n_a = static_cast<double>(*v.count), relu_n_a = static_cast<double>(*relu.count);
  const double e_n_a = ERRORS ? static_cast<double>(*e.count) : 0.0;
  const double relu_e_n_a = ERRORS ? static_cast<double>(*relu_e.count) : 0.0;
  const bool fresh_sums = ERRORS && *e.squared_count == 0, relu_fresh_sums = ERRORS && *relu_e.squared_count == 0;
  const int64_t tiles = (U + tile - 1) / tile;
  #pragma omp parallel
  {
    alignas(64) double spread[1024], relu_spread[1024];  // tile <= MAX_TILE
    #pragma omp for schedule(static)
    for (int64_t k = 0; k < tiles; k++) {
      const int64_t u0 = k * tile, n = std::min(tile, U - u0);
      variance_tile_and_relu(x, spread, relu_spread, v.spread_total, v.mean, v.m2, n_a, relu.spread_total, relu.mean,
                             relu.m2, relu_n_a, b, T, U, u0, n);
      if constexpr (ERRORS) {
        errors_tile_and_relu(x, e, fresh_sums, e_n_a, relu_e, relu_fresh_sums, relu_e_n_a, b, T, U, identity, u0, n);
      }
    }
  }
  for (int64_t* c : {v.spread_count, v.count, relu.spread_count, relu.count}) *c += b;
  if constexpr (ERRORS) {
    for (int64_t* c : {e.squared_count, e.count, relu_e.squared_count, relu_e.count}) *c += b;
  }
}
"""

_RELU_SOURCE = _TILES + _RELU_TILE + r"""
// Invariance's update of x [b, T, U] and of its ReLU (relu_*), by `fold_with_relu`. States as in the invariance
// kernel.
extern "C" void kernel(const float* x, double* spread_total, int64_t* spread_count, double* mean, double* m2,
                       int64_t* count, double* relu_spread_total, int64_t* relu_spread_count, double* relu_mean,
                       double* relu_m2, int64_t* relu_count, const int64_t b, const int64_t T, const int64_t U,
                       const int64_t tile) {
  fold_with_relu<false>(x, {spread_total, spread_count, mean, m2, count},
                        {relu_spread_total, relu_spread_count, relu_mean, relu_m2, relu_count}, {}, {}, b, T, U, 0,
                        tile);
}
"""

_BOTH_RELU_SOURCE = _TILES + _RELU_TILE + r"""
// Both updates (invariance's and per_transformation's, as the joint kernel makes them) of x [b, T, U] and of its
// ReLU (relu_*), by `fold_with_relu`. States as in the two kernels.
extern "C" void kernel(const float* x, double* spread_total, int64_t* spread_count, double* mean, double* m2,
                       int64_t* count, double* squared_total, int64_t* squared_count, double* ref_mean,
                       double* ref_m2, int64_t* ref_count, double* relu_spread_total, int64_t* relu_spread_count,
                       double* relu_mean, double* relu_m2, int64_t* relu_count, double* relu_squared_total,
                       int64_t* relu_squared_count, double* relu_ref_mean, double* relu_ref_m2, int64_t* relu_ref_count,
                       const int64_t b, const int64_t T, const int64_t U, const int64_t identity, const int64_t tile) {
  fold_with_relu<true>(x, {spread_total, spread_count, mean, m2, count},
                       {relu_spread_total, relu_spread_count, relu_mean, relu_m2, relu_count},
                       {squared_total, squared_count, ref_mean, ref_m2, ref_count},
                       {relu_squared_total, relu_squared_count, relu_ref_mean, relu_ref_m2, relu_ref_count}, b, T, U,
                       identity, tile);
}
"""

_ERRORS_SOURCE = _TILES + r"""
// x and r [b, T, U] float32 (contiguous), after `held` samples of x_kept and r_kept [held, T, U] kept from the
// chunk before (none: 0; as in the invariance kernel), identity: r's untransformed row; states float64:
// squared_total [T, U], mean and m2 [U] (the untransformed rows' moments); counts int64.
extern "C" void kernel(const float* x, const float* r, const float* x_kept, const float* r_kept,
                       double* squared_total, int64_t* squared_count, double* mean, double* m2, int64_t* count,
                       const int64_t b, const int64_t held, const int64_t T, const int64_t U,
                       const int64_t identity, const int64_t tile) {
  const double n_a = static_cast<double>(*count);
  const bool fresh_sums = *squared_count == 0;
  const int64_t tiles = (U + tile - 1) / tile;
  #pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < tiles; k++) {
    const int64_t u0 = k * tile, n = std::min(tile, U - u0);
    if (held > 0) errors_tile(x_kept, r_kept, squared_total, fresh_sums, mean, m2, n_a, held, T, U, identity, u0, n);
    errors_tile(x, r, squared_total, fresh_sums && held == 0, mean, m2, n_a + static_cast<double>(held), b, T, U,
                identity, u0, n);
  }
  *squared_count += held + b;
  *count += held + b;
}
"""

_BOTH_SOURCE = _TILES + r"""
// Both updates of one chunk x [b, T, U], tile by tile: per_transformation's reads the rows invariance's
// just brought into cache (the chunk is read from memory once, not twice). States as in the two kernels.
// (`held` samples kept from the chunk before first, as in the invariance kernel.)
extern "C" void kernel(const float* x, const float* kept, double* spread_total, int64_t* spread_count, double* mean,
                       double* m2, int64_t* count, double* squared_total, int64_t* squared_count, double* ref_mean,
                       double* ref_m2, int64_t* ref_count, const int64_t b, const int64_t held, const int64_t T,
                       const int64_t U, const int64_t identity, const int64_t tile) {
  const double n_a = static_cast<double>(*count), ref_n_a = static_cast<double>(*ref_count);
  const bool fresh_sums = *squared_count == 0;
  const int64_t tiles = (U + tile - 1) / tile;
  #pragma omp parallel
  {
    alignas(64) double spread[1024];  // tile <= MAX_TILE
    #pragma omp for schedule(static)
    for (int64_t k = 0; k < tiles; k++) {
      const int64_t u0 = k * tile, n = std::min(tile, U - u0);
      if (held > 0) {
        variance_tile(kept, spread, spread_total, mean, m2, n_a, held, T, U, u0, n);
        errors_tile(kept, kept, squared_total, fresh_sums, ref_mean, ref_m2, ref_n_a, held, T, U, identity, u0, n);
      }
      const double h = static_cast<double>(held);
      variance_tile(x, spread, spread_total, mean, m2, n_a + h, b, T, U, u0, n);
      errors_tile(x, x, squared_total, fresh_sums && held == 0, ref_mean, ref_m2, ref_n_a + h, b, T, U, identity, u0,
                  n);
    }
  }
  *spread_count += held + b;
  *count += held + b;
  *squared_count += held + b;
  *ref_count += held + b;
}
"""


_WARP_SOURCE = _PRELUDE + r"""
// One map [C, hw] (rows hw apart) laid out pixel-major [hw, C]. torch's transpose of any size is vectorized
// only for AVX-512 (16×16 blocks); with AVX2 vectors it is an element-by-element loop, so there 8×8 blocks are
// transposed in registers, the edges one by one (on a Zen 3, measure() with the default measures 7-13 % faster:
// benchmarks/README.md, "Same-equivariance's inverse warps").
static inline void lay_out(const float* map, int64_t hw, float* rows, int64_t C) {
#if defined(CPU_CAPABILITY_AVX2)
  const int64_t blocked_c = C / 8 * 8, blocked_p = hw / 8 * 8;
  for (int64_t c = 0; c < blocked_c; c += 8) {
    for (int64_t p = 0; p < blocked_p; p += 8) {
      at::vec::transpose_mxn<float, 8, 8>(map + c * hw + p, hw, rows + p * C + c, C);
    }
    for (int64_t p = blocked_p; p < hw; p++) {
      for (int64_t i = 0; i < 8; i++) rows[p * C + c + i] = map[(c + i) * hw + p];
    }
  }
  for (int64_t c = blocked_c; c < C; c++) {
    for (int64_t p = 0; p < hw; p++) rows[p * C + c] = map[c * hw + p];
  }
#else
  at::vec::transpose_mxn<float>(map, hw, rows, C, static_cast<int>(C), static_cast<int>(hw));
#endif
}

// One output pixel's C channels (at op): the sum of its k taps, rows sp of `rows` (C floats each, counted from row
// `first`) times weights wp, in order, as warps.gather_taps adds them. KT: k as compiled (4: bilinear, 1: a pixel
// permutation), the taps' rows and weights then held through the channels (benchmarks/README.md, "Same-equivariance's
// inverse warps": the warp faster on a Zen 3), or 0: any k, each tap's row and weight read again for every vector
// (the stores of the moved maps may alias the float weights, so the compiler does not keep them).
template <int KT>
static ALWAYS_INLINE void gather(const float* rows, int64_t first, const int64_t* sp, const float* wp, int64_t k,
                                 int64_t C, float* op) {
  const float* source[KT > 0 ? KT : 1];
  VF weight[KT > 0 ? KT : 1];
  for (int j = 0; j < KT; j++) {
    source[j] = rows + (sp[j] - first) * C;
    weight[j] = VF(wp[j]);
  }
  const auto tap = [&](int64_t j, int64_t c, int count) {
    if (KT > 0) return VF::loadu(source[j] + c, count) * weight[j];
    return VF::loadu(rows + (sp[j] - first) * C + c, count) * VF(wp[j]);
  };
  const int64_t taps = KT > 0 ? KT : k, whole = C / NF * NF;
  for (int64_t c = 0; c < whole; c += NF) {
    VF total = tap(0, c, NF);
    for (int64_t j = 1; j < taps; j++) total = total + tap(j, c, NF);
    total.store(op + c);
  }
  if (whole < C) {
    const int rest = static_cast<int>(C - whole);
    VF total = tap(0, whole, rest);
    for (int64_t j = 1; j < taps; j++) total = total + tap(j, whole, rest);
    total.store(op + whole, rest);
  }
}

// x: maps [b·T, C, hw] float32 (map m is sample m / T's transformation m % T), or with `channels_last` [b·T,
// hw, C]; taps [T·hw, k]: sources into the T·hw pixel-major rows of a sample (transformation t's from row t·hw
// on) and float32 weights; out [b, T·hw, C]. buffer: threads × hw·C floats, one map pixel-major per thread
// (unused with `channels_last`: the maps are read where they lie).
extern "C" void kernel(const float* x, const int64_t* sources, const float* weights, float* out, float* buffer,
                       const int64_t maps, const int64_t T, const int64_t C, const int64_t hw, const int64_t k,
                       const int64_t threads, const int64_t channels_last) {
  #pragma omp parallel num_threads(threads)
  {
    float* laid_out = buffer + omp_get_thread_num() * hw * C;
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < maps; m++) {
      const int64_t t = m % T;
      const float* rows = x + m * C * hw;
      if (!channels_last) {
        lay_out(rows, hw, laid_out, C);
        rows = laid_out;
      }
      const int64_t* src = sources + t * hw * k;
      const float* w = weights + t * hw * k;
      const int64_t first = t * hw;  // the sources count from the sample's first row: map t's from row t·hw on
      float* o = out + m * hw * C;  // map m = i·T + t: rows (i·T + t)·hw on
      for (int64_t p = 0; p < hw; p++) {
        const int64_t* sp = src + p * k;
        const float* wp = w + p * k;
        float* op = o + p * C;
        if (k == 4) {
          gather<4>(rows, first, sp, wp, k, C, op);
        } else if (k == 1) {
          gather<1>(rows, first, sp, wp, k, C, op);
        } else {
          gather<0>(rows, first, sp, wp, k, C, op);
        }
      }
    }
  }
}
"""


_SHARDS = _PRELUDE + r"""
// A replicates' kernel's K shards: per shard, `table` holds the addresses of its five states (a sum over
// samples and its count, a mean, an m2 and their count, in that order).
struct Shards {
  const int64_t* table;
  int64_t K;
  const double* state(int64_t k, int64_t field) const { return reinterpret_cast<const double*>(table[5 * k + field]); }
  int64_t count(int64_t k, int64_t field) const { return *reinterpret_cast<const int64_t*>(table[5 * k + field]); }
  // shard k's row t of a state [T, U] from unit u0, and the row read after it (to prefetch): the next shard's row
  // t, or the first shard's row t + 1, or (the last) itself
  const double* row(int64_t k, int64_t field, int64_t t, int64_t U, int64_t u0) const {
    return state(k, field) + t * U + u0;
  }
  const double* row_after(int64_t k, int64_t field, int64_t t, int64_t T, int64_t U, int64_t u0) const {
    return k + 1 < K ? row(k + 1, field, t, U, u0) : t + 1 < T ? row(0, field, t + 1, U, u0) : row(k, field, t, U, u0);
  }
};

// With `merge`: the weights of Chan's merge of each shard into the whole probe's moments, shard after shard
// from none (n_b / n and n_a · n_b / n, as shards.merge_into into zero states), and the whole probe's counts
// after it (the moments', the sum's); without, its counts as they are.
struct Merge {
  std::vector<double> w_mean, w_m2;
  int64_t samples, sum_samples;
  Merge(const Shards& shards, bool merge, int64_t samples, int64_t sum_samples)
      : w_mean(shards.K), w_m2(shards.K), samples(merge ? 0 : samples), sum_samples(merge ? 0 : sum_samples) {
    for (int64_t k = 0; merge && k < shards.K; k++) {
      const double n_a = static_cast<double>(this->samples), n_b = static_cast<double>(shards.count(k, 4));
      const double n_ab = std::max(n_a + n_b, 1.0);
      w_mean[k] = n_b / n_ab;
      w_m2[k] = n_a * n_b / n_ab;
      this->samples += shards.count(k, 4);
      this->sum_samples += shards.count(k, 1);
    }
  }
  // one unit of shard k's moments merged into the whole probe's
  void unit(int64_t k, double& mu, double& q, double mu_k, double q_k) const {
    const double delta = mu_k - mu;
    mu += delta * w_mean[k];
    q += q_k + delta * delta * w_m2[k];
  }
  // `width` units of shard k's moments merged into the whole probe's (rows of the thread's), the lines of the rows
  // read next (next_mu, next_q: the next shard's, or the first shard's of the next transformation) prefetched a
  // row ahead: rows of 4 KB, each a page of its own, which the hardware's prefetchers start anew every row (with
  // the loops written with vectors, large layers' shards read a third faster: benchmarks/README.md, "Error bars'
  // replicates")
  void row(int64_t k, double* mu, double* q, const double* mu_k, const double* q_k, int64_t width,
           const double* next_mu, const double* next_q) const {
    const int64_t whole = width / ND * ND;
    for (int64_t u = 0; u < whole; u += ND) {
      __builtin_prefetch(next_mu + u);
      __builtin_prefetch(next_q + u);
      const VD m = VD::loadu(mu + u), delta = VD::loadu(mu_k + u) - m;
      (m + delta * VD(w_mean[k])).store(mu + u);
      (VD::loadu(q + u) + (VD::loadu(q_k + u) + delta * delta * VD(w_m2[k]))).store(q + u);
    }
    for (int64_t u = whole; u < width; u++) unit(k, mu[u], q[u], mu_k[u], q_k[u]);
  }
};

// The whole probe's moments without a shard (shards.moments_without) of `samples_k` of its `samples`: the
// weights of the rest's mean and M2, and its degrees of freedom.
struct Rest {
  double w_mean, keep, w_m2, dof;
  Rest(int64_t samples, int64_t samples_k) {
    const double n = static_cast<double>(samples), n_k = static_cast<double>(samples_k), n_r = n - n_k;
    w_mean = n_k / std::max(n_r, 1.0);
    keep = n_r > 0 ? 1.0 : 0.0;
    w_m2 = n_k * n_r / std::max(n, 1.0);
    dof = static_cast<double>(std::max<int64_t>(samples - samples_k - 1, 0));
  }
  // the rest's M2 at one unit: 0 within `r` of the whole probe's (NaN stays: the comparison is false)
  double m2(double mu, double q, double mu_k, double q_k, double r) const {
    const double rest_mean = (mu + (mu - mu_k) * w_mean) * keep;
    const double delta = mu_k - rest_mean;
    const double rest = q - q_k - delta * delta * w_m2;
    return rest <= q * r ? 0.0 : rest;
  }
  // the same of ND units
  VD m2(const VD& mu, const VD& q, const VD& mu_k, const VD& q_k, double r) const {
    const VD rest_mean = (mu + (mu - mu_k) * VD(w_mean)) * VD(keep);
    const VD delta = mu_k - rest_mean;
    const VD rest = q - q_k - delta * delta * VD(w_m2);
    return VD::blendv(rest, VD(0.0), rest <= q * VD(r));
  }
};

// A sum over samples without a shard (shards.sum_without): 0 within `r` of the whole probe's.
static inline double sum_without(double total, double total_k, double r) {
  const double rest = total - total_k;
  return std::abs(rest) <= std::abs(total) * r ? 0.0 : rest;
}

// `sum_without` of `width` units divided by `samples` into out.
static inline void sums_without(const double* total, const double* total_k, double r, double samples, double* out,
                                int64_t width) {
  const int64_t whole = width / ND * ND;
  for (int64_t u = 0; u < whole; u += ND) {
    const VD all = VD::loadu(total + u), rest = all - VD::loadu(total_k + u);
    (VD::blendv(rest, VD(0.0), rest.abs() <= all.abs() * VD(r)) / VD(samples)).store(out + u);
  }
  for (int64_t u = whole; u < width; u++) out[u] = sum_without(total[u], total_k[u], r) / samples;
}

// `width` doubles of `rows` added into sum (rows of the thread's), the next row's lines prefetched.
static inline void add_row(double* sum, const double* rows, int64_t width, const double* next) {
  const int64_t whole = width / ND * ND;
  for (int64_t u = 0; u < whole; u += ND) {
    __builtin_prefetch(next + u);
    (VD::loadu(sum + u) + VD::loadu(rows + u)).store(sum + u);
  }
  for (int64_t u = whole; u < width; u++) sum[u] += rows[u];
}
"""

_REPLICATES_SOURCE = _SHARDS + r"""
constexpr int64_t TILE = 512;  // units per tile: the K sums of square roots (K · 4 KB) and rows of 4 KB

// The square roots of `width` units of the rest's M2 without a shard (its moments mu_k, q_k) added to acc; PREFETCH:
// the lines of the rows read next (next_mu, next_q) prefetched, where the shard's rows are not in cache already.
template <bool PREFETCH>
static inline void add_roots(const Rest& rest, const double* mu, const double* q, const double* mu_k, const double* q_k,
                             double r, bool scaled, int64_t width, double* acc, const double* next_mu,
                             const double* next_q) {
  const int64_t whole = width / ND * ND;
  for (int64_t u = 0; u < whole; u += ND) {
    if constexpr (PREFETCH) {
      __builtin_prefetch(next_mu + u);
      __builtin_prefetch(next_q + u);
    }
    const VD kept = rest.m2(VD::loadu(mu + u), VD::loadu(q + u), VD::loadu(mu_k + u), VD::loadu(q_k + u), r);
    (VD::loadu(acc + u) + (scaled ? kept.sqrt() : (kept / VD(0.0)).sqrt())).store(acc + u);
  }
  for (int64_t u = whole; u < width; u++) {
    const double m2_r = rest.m2(mu[u], q[u], mu_k[u], q_k[u], r);
    acc[u] += scaled ? std::sqrt(m2_r) : std::sqrt(m2_r / 0.0);
  }
}

// The whole probe's invariance states (spread_total [U], mean and m2 [T, U], counts) and K shards' (table:
// per shard the addresses of its spread_total, spread_count, mean, m2, count); out [K, 2, U] := TV and SV
// without each shard (shards.moments_without, shards.sum_without, layer_measures._variance_values). With
// `merge`, each row of the whole probe's states is first made from the shards' (shards.merge_into: Chan's
// merge, shard after shard, from none) in a row of the thread's, the shards' rows then read again from cache,
// and stored after them: the whole probe's states may be shard 0's (what they held is not read).
extern "C" void kernel(double* spread_total, int64_t* spread_count, double* mean, double* m2, int64_t* count,
                       const int64_t* table, const double* rounding, double* out, const int64_t K, const int64_t T,
                       const int64_t U, const int64_t merge) {
  const Shards shards{table, K};
  const Merge merged(shards, merge, *count, *spread_count);
  const double r = *rounding;
  const int64_t tiles = (U + TILE - 1) / TILE;
  #pragma omp parallel
  {
  std::vector<double> sums(K * TILE), rows(3 * TILE);
  double* roots = sums.data();
  #pragma omp for schedule(static)
  for (int64_t tile = 0; tile < tiles; tile++) {
    const int64_t u0 = tile * TILE, width = std::min(TILE, U - u0), whole = width / ND * ND;
    std::fill(roots, roots + K * TILE, 0.0);
    for (int64_t t = 0; t < T; t++) {
      double* mu = merge ? rows.data() : mean + t * U + u0;
      double* q = merge ? rows.data() + TILE : m2 + t * U + u0;
      if (merge) std::fill(rows.data(), rows.data() + 2 * TILE, 0.0);
      for (int64_t k = 0; merge && k < K; k++) {
        merged.row(k, mu, q, shards.row(k, 2, t, U, u0), shards.row(k, 3, t, U, u0), width,
                   shards.row_after(k, 2, t, T, U, u0), shards.row_after(k, 3, t, T, U, u0));
      }
      for (int64_t k = 0; k < K; k++) {
        const Rest rest(merged.samples, shards.count(k, 4));
        const bool scaled = rest.dof > 0;  // √M2 summed, divided by √dof once below; else √(M2 / 0): inf, NaN for 0
        const double *mu_k = shards.row(k, 2, t, U, u0), *q_k = shards.row(k, 3, t, U, u0);
        const double *next_mu = shards.row_after(k, 2, t, T, U, u0), *next_q = shards.row_after(k, 3, t, T, U, u0);
        double* acc = roots + k * TILE;
        if (merge) add_roots<false>(rest, mu, q, mu_k, q_k, r, scaled, width, acc, next_mu, next_q);  // rows in cache
        else add_roots<true>(rest, mu, q, mu_k, q_k, r, scaled, width, acc, next_mu, next_q);
      }
      if (merge) {  // (after the rest: the whole probe's states may be shard 0's)
        std::copy(mu, mu + width, mean + t * U + u0);
        std::copy(q, q + width, m2 + t * U + u0);
      }
    }
    double* total = merge ? rows.data() + 2 * TILE : spread_total + u0;
    if (merge) std::fill(total, total + width, 0.0);
    for (int64_t k = 0; merge && k < K; k++) {
      add_row(total, shards.row(k, 0, 0, U, u0), width, shards.row_after(k, 0, 0, 1, U, u0));
    }
    for (int64_t k = 0; k < K; k++) {
      const double rest_samples = static_cast<double>(merged.sum_samples - shards.count(k, 1));
      sums_without(total, shards.row(k, 0, 0, U, u0), r, rest_samples, out + (2 * k) * U + u0, width);
      const double dof = Rest(merged.samples, shards.count(k, 4)).dof;
      const double scale = (dof > 0 ? std::sqrt(dof) : 1.0) * static_cast<double>(T);  // (the std's 1 / √dof)
      double* sv = out + (2 * k + 1) * U + u0;
      for (int64_t u = 0; u < whole; u += ND) (VD::loadu(roots + k * TILE + u) / VD(scale)).store(sv + u);
      for (int64_t u = whole; u < width; u++) sv[u] = roots[k * TILE + u] / scale;
    }
    if (merge) std::copy(total, total + width, spread_total + u0);
  }
  }
  *count = merged.samples;
  *spread_count = merged.sum_samples;
}
"""

_ERRORS_REPLICATES_SOURCE = _SHARDS + r"""
constexpr int64_t TILE = 512;  // units per tile: the whole probe's rows of it stay in cache for all K shards

// per_transformation's states of the whole probe (squared_total [T, U], squared_count; the untransformed
// rows' mean and m2 [U], count) and K shards' (table: per shard the addresses of its squared_total,
// squared_count, mean, m2, count); out [K, T + 1, U] := per shard k, of the probe without it, the mean squared
// difference of each transformation (T rows) and twice the untransformed rows' sample variance
// (layer_measures._invariance_error_compute of shards.sum_without and shards.moments_without). With `merge`,
// each row of the whole probe's states is first made from the shards' (shards.merge_into, shard after shard,
// from none) in a row of the thread's and stored after the shards' rows are read again: the whole probe's
// states may be shard 0's.
extern "C" void kernel(double* squared_total, int64_t* squared_count, double* mean, double* m2, int64_t* count,
                       const int64_t* table, const double* rounding, double* out, const int64_t K, const int64_t T,
                       const int64_t U, const int64_t merge) {
  const Shards shards{table, K};
  const Merge merged(shards, merge, *count, *squared_count);
  const double r = *rounding;
  const int64_t tiles = (U + TILE - 1) / TILE;
  #pragma omp parallel
  {
  std::vector<double> rows(2 * TILE);
  #pragma omp for schedule(static)
  for (int64_t tile = 0; tile < tiles; tile++) {
    const int64_t u0 = tile * TILE, width = std::min(TILE, U - u0), whole = width / ND * ND;
    double* mu = merge ? rows.data() : mean + u0;
    double* q = merge ? rows.data() + TILE : m2 + u0;
    if (merge) std::fill(rows.data(), rows.data() + 2 * TILE, 0.0);
    for (int64_t k = 0; merge && k < K; k++) {
      merged.row(k, mu, q, shards.row(k, 2, 0, U, u0), shards.row(k, 3, 0, U, u0), width,
                 shards.row_after(k, 2, 0, 1, U, u0), shards.row_after(k, 3, 0, 1, U, u0));
    }
    for (int64_t k = 0; k < K; k++) {
      const Rest rest(merged.samples, shards.count(k, 4));
      const double *mu_k = shards.row(k, 2, 0, U, u0), *q_k = shards.row(k, 3, 0, U, u0);
      double* var2 = out + (k * (T + 1) + T) * U + u0;
      for (int64_t u = 0; u < whole; u += ND) {
        const VD m2_r = rest.m2(VD::loadu(mu + u), VD::loadu(q + u), VD::loadu(mu_k + u), VD::loadu(q_k + u), r);
        (VD(2.0) * (m2_r / VD(rest.dof))).store(var2 + u);
      }
      for (int64_t u = whole; u < width; u++) var2[u] = 2.0 * (rest.m2(mu[u], q[u], mu_k[u], q_k[u], r) / rest.dof);
    }
    if (merge) {  // (after the rest: the whole probe's states may be shard 0's)
      std::copy(mu, mu + width, mean + u0);
      std::copy(q, q + width, m2 + u0);
    }
    for (int64_t t = 0; t < T; t++) {
      double* total = merge ? rows.data() : squared_total + t * U + u0;
      if (merge) std::fill(total, total + width, 0.0);
      for (int64_t k = 0; merge && k < K; k++) {
        add_row(total, shards.row(k, 0, t, U, u0), width, shards.row_after(k, 0, t, T, U, u0));
      }
      for (int64_t k = 0; k < K; k++) {
        const double rest_samples = static_cast<double>(merged.sum_samples - shards.count(k, 1));
        sums_without(total, shards.row(k, 0, t, U, u0), r, rest_samples, out + (k * (T + 1) + t) * U + u0, width);
      }
      if (merge) std::copy(total, total + width, squared_total + t * U + u0);
    }
  }
  }
  *count = merged.samples;
  *squared_count = merged.sum_samples;
}
"""


class _Store:
    """Where earlier processes on this machine found each kernel's library in Inductor's code cache: one small
    file per kernel under ``<Inductor's cache directory>/tm_tensorboard``, named by a digest of the kernel's
    source, torch's and Python's versions and the CPU (Inductor builds with ``-march=native``), holding the
    library's path. Best effort: a missing, stale or unreadable record loads through Inductor instead."""

    def __init__(self):
        self._machine: str | None = None

    @staticmethod
    def directory() -> Path:
        """Inductor's cache directory (``torch._inductor.runtime.cache_dir_utils.cache_dir``'s rule, without
        importing Inductor: a directory that differs only means a record not found)."""
        configured = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if configured is None:
            try:
                user = getpass.getuser()
            except (KeyError, ModuleNotFoundError, OSError):
                user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
            configured = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
        return Path(os.path.abspath(configured)) / "tm_tensorboard"

    def machine(self) -> str:
        """The CPU: its architecture, the vector instructions torch uses, and its model and flags (Linux)."""
        if self._machine is None:
            described = [platform.machine(), torch.backends.cpu.get_cpu_capability()]
            try:
                with open("/proc/cpuinfo") as cpuinfo:
                    described += sorted({line.strip() for line in cpuinfo
                                         if line.startswith(("model name", "flags", "Features", "CPU part"))})
            except OSError:
                pass
            self._machine = "\n".join(described)
        return self._machine

    def path(self, kernel: "_Kernel") -> Path:
        key = "\0".join([kernel.source, *kernel.arguments, torch.__version__, sys.implementation.cache_tag,
                         self.machine()])
        return self.directory() / f"native-{hashlib.sha256(key.encode()).hexdigest()[:32]}.library"

    def library(self, kernel: "_Kernel") -> str | None:
        """The recorded library of ``kernel``, if it is still there."""
        try:
            library = self.path(kernel).read_text().strip()
        except OSError:
            return None
        return library if os.path.isfile(library) else None

    def load(self, kernel: "_Kernel") -> Callable | None:
        """``kernel``'s entry point from its recorded library, loaded as Inductor loads it; None if unrecorded."""
        library = self.library(kernel)
        if library is None:
            return None
        try:
            # what the library's bindings read a tensor's data pointer through (Inductor sets it the same way)
            os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(
                torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr)
            name = f"tm_tensorboard_native_{Path(library).stem.split('.')[0]}.kernel"  # its PyInit_kernel
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, library)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules[name] = module
            return module.kernel
        except Exception:  # a library of another build after all: Inductor's cache loads or rebuilds it
            return None

    def record(self, kernel: "_Kernel", call: Callable) -> None:
        """Note where Inductor put ``kernel``'s library (written to a temporary file, then renamed)."""
        try:
            library = os.path.abspath(call.__self__.__file__)
            path = self.path(kernel)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(library)
            os.replace(temporary, path)
        except Exception:  # a read-only cache directory, a binding without a file: loaded through Inductor again
            pass


_STORE = _Store()


class _Kernel:
    """One kernel, built on first use (Inductor's code cache keeps the library on disk, ``_Store`` where)."""

    def __init__(self, name: str, source: str, arguments: list[str]):
        self.name, self.source, self.arguments = name, source, arguments
        self.failed: str | None = None  # why it was given up in this process, once it was
        self.reported = False  # the failure warned of (once Inductor's own compiling is known to work)
        self.seconds = 0.0  # spent building it, or loading it through Inductor
        self._call: Callable | None = None
        self._looked_up = False  # whether its recorded library was tried

    def stored(self) -> bool:
        """Whether it is at hand without compiling: loaded in this process, or loaded now from the library an
        earlier process recorded (tried once)."""
        if self._call is None and self.failed is None and not self._looked_up:
            self._looked_up = True
            self._call = _STORE.load(self)
        return self._call is not None

    def get(self) -> Callable | None:
        if not self.stored() and self.failed is None:
            start = time.perf_counter()
            try:
                from torch._inductor.codecache import CppPythonBindingsCodeCache

                self._call = CppPythonBindingsCodeCache.load_pybinding(self.arguments, self.source)
                _STORE.record(self, self._call)
            except Exception as error:  # no compiler, an older torch: the compiled graphs serve
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                self.failed = f"{type(error).__name__}: {message}"
            self.seconds += time.perf_counter() - start
        return self._call


_ZERO_SOURCE = _PRELUDE + r"""
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// `bytes` bytes from `p` set to zero on every thread; on x86 by streaming (non-temporal) stores, which neither
// read each line before writing it nor keep it in the caches: the kept states they zero are written, not read,
// by the kernels' first chunk, and are far larger than the caches (benchmarks/README.md: ~3x torch's zero_).
extern "C" void kernel(char* p, const int64_t bytes) {
#if defined(__SSE2__)
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
  const int64_t head = std::min<int64_t>(bytes, misaligned ? 16 - misaligned : 0);
  const int64_t vectors = (bytes - head) / 16;
  std::memset(p, 0, head);
  std::memset(p + head + vectors * 16, 0, bytes - head - vectors * 16);
  __m128i* body = reinterpret_cast<__m128i*>(p + head);
  #pragma omp parallel
  {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < vectors; i++) _mm_stream_si128(body + i, _mm_setzero_si128());
    _mm_sfence();  // this thread's streaming stores ordered before what follows the region
  }
#else
  std::memset(p, 0, bytes);
#endif
}
"""


_STATE_ARGUMENTS = ["const float*", "double*", "int64_t*", "double*", "double*", "int64_t*"]
_VARIANCE = _Kernel("invariance update", _VARIANCE_SOURCE,
                    _STATE_ARGUMENTS[:1] + _STATE_ARGUMENTS + ["const int64_t"] * 5)
_RELU = _Kernel("invariance update of a layer and its ReLU", _RELU_SOURCE,
                _STATE_ARGUMENTS[:1] + _STATE_ARGUMENTS[1:] * 2 + ["const int64_t"] * 4)
_BOTH_RELU = _Kernel("invariance and per-transformation update of a layer and its ReLU", _BOTH_RELU_SOURCE,
                     _STATE_ARGUMENTS[:1] + _STATE_ARGUMENTS[1:] * 4 + ["const int64_t"] * 5)
_ERRORS = _Kernel("per-transformation and equivariance-error update", _ERRORS_SOURCE,
                  _STATE_ARGUMENTS[:1] * 3 + _STATE_ARGUMENTS + ["const int64_t"] * 6)
_BOTH = _Kernel("invariance and per-transformation update", _BOTH_SOURCE,
                _STATE_ARGUMENTS[:1] + _STATE_ARGUMENTS + _STATE_ARGUMENTS[1:] + ["const int64_t"] * 6)
_WARP = _Kernel("inverse warp", _WARP_SOURCE,
                ["const float*", "const int64_t*", "const float*", "float*", "float*"] + ["const int64_t"] * 7)
_REPLICATES_ARGUMENTS = _STATE_ARGUMENTS[1:] + ["const int64_t*", "const double*", "double*"] + ["const int64_t"] * 4
_REPLICATES = _Kernel("error bars' replicates", _REPLICATES_SOURCE, _REPLICATES_ARGUMENTS)
_ERRORS_REPLICATES = _Kernel("per-transformation error bars' replicates", _ERRORS_REPLICATES_SOURCE,
                             _REPLICATES_ARGUMENTS)
# what a measurement's chunks run
_UPDATES = (_VARIANCE, _RELU, _ERRORS, _BOTH, _BOTH_RELU, _WARP, _REPLICATES, _ERRORS_REPLICATES)
_ZERO = _Kernel("zeroing of kept states", _ZERO_SOURCE, ["char*", "const int64_t"])
_KERNELS = (*_UPDATES, _ZERO)


def enabled() -> bool:
    """Whether TM_TENSORBOARD_NATIVE allows the kernels (unset or 1: yes; 0: no)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if value not in ("", "1", "true", "0", "false"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: use 1 (the CPU kernels where they apply) or 0 (never)")
    return value not in ("0", "false")


def available() -> bool:
    """False once building a kernel a measurement's chunks run failed in this process (the zeroing's failing
    leaves ``zero_fill`` to ``zero_``: the same zeros)."""
    return all(kernel.failed is None for kernel in _UPDATES)


def build_all() -> tuple["_Kernel", ...]:
    """Every kernel, built (or loaded) now: ``tm-tensorboard build-kernels``. Their ``failed`` says why not."""
    for kernel in _KERNELS:
        kernel.get()
    return _KERNELS


def record_directory() -> Path:
    """Where the kernels' libraries are recorded for later processes."""
    return _Store.directory()


def stored() -> bool:
    """Whether every kernel a measurement's chunks run is at hand without compiling (allowed, and loaded or built
    on this machine before). (Not the zeroing's, which only serves kept states where it is: ``zero_fill``.)"""
    return enabled() and all(kernel.stored() for kernel in _UPDATES)


def report_failure(instead: str = "the compiled kernels") -> None:
    """Warn once of each kernel that could not be built: called after a compiled graph ran, so that a
    missing compiler (which fails both) warns once, of the compiled kernels (``fused.py``); or where the
    kernels run without the graphs (``fused.NATIVE``), saying that ``instead`` runs."""
    for kernel in _UPDATES:
        if kernel.failed is not None and not kernel.reported:
            kernel.reported = True
            warnings.warn(
                f"tm_tensorboard: the CPU kernel of the {kernel.name} could not be built, so {instead} run "
                f"instead (same numbers, slower): {kernel.failed}",
                RuntimeWarning,
                stacklevel=caller.stacklevel(),
            )


def build_seconds() -> float:
    """Seconds spent building or loading the kernels in this process."""
    return sum(kernel.seconds for kernel in _KERNELS)


def _takes_rows(rows: torch.Tensor, T: int, units: int) -> bool:
    """Whether a kernel reads these activations: on CPU, float32, contiguous, no autograd, a whole number of
    samples of T rows of ``units``. (Checked at every call: ``is_cpu`` and ``dtype is``, not ``device.type``
    and ``==``, which took a third of a call's host time.)"""
    if not (rows.is_cpu and rows.dtype is torch.float32 and not rows.requires_grad and rows.is_contiguous()):
        return False
    numel = rows.numel()
    return numel > 0 and numel % (T * units) == 0


def _states(states: Sequence[torch.Tensor], numel: int | None = None) -> bool:
    """Whether a kernel takes these states: float64, contiguous, on CPU, ``numel`` values each (if given)."""
    for state in states:
        if not (state.is_cpu and state.dtype is torch.float64 and state.is_contiguous()
                and (numel is None or state.numel() == numel)):
            return False
    return True


def _applies(output: torch.Tensor, T: int, per_transformation: tuple[torch.Tensor, ...],
             per_unit: tuple[torch.Tensor, ...]) -> bool:
    """Whether a kernel takes these arguments: CPU, float32 activations [b·T, ...] (contiguous, a whole
    number of samples), float64 contiguous states [T, units] and [units], two transformations or more."""
    units = per_unit[0].numel()
    return (T >= 2 and _takes_rows(output, T, units) and _states(per_transformation, T * units)
            and _states(per_unit, units) and enabled())


def _held_samples(held: torch.Tensor | None, T: int, units: int) -> int | None:
    """The samples of ``held``, rows [held·T, ...] kept from the chunk before to fold in with a chunk's (the
    rows of a pair of chunks: ``layer_measures.Chunk.hold``): 0 for none; None where a kernel cannot take them
    (``_takes_rows``, as of a chunk's rows)."""
    if held is None:
        return 0
    return held.numel() // (T * units) if _takes_rows(held, T, units) else None


def _tile(units: int) -> int:
    """Tiles of TILE units, smaller on a small layer so that every thread gets two (bench_native.py: a layer
    of 512 units at batch 16 took 60 µs in one tile, 37 µs in four)."""
    return min(TILE, MAX_TILE, max(MIN_TILE, -(-units // (32 * torch.get_num_threads())) * 16))


def variance_update(output: torch.Tensor, T: int, spread_total: torch.Tensor, spread_count: torch.Tensor,
                    mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor,
                    held: torch.Tensor | None = None) -> bool:
    """Fold a chunk ``output`` [b·T, ...] into invariance's states like ``layer_measures._variance_update``
    (after ``held``, the rows of the chunk before kept for this call: as two calls would, each tile of the states
    read from memory once for both); False (nothing done) where the kernel does not apply (``_applies``) or is
    unavailable."""
    units = spread_total.numel()
    if not _applies(output, T, (mean, m2), (spread_total,)) or (kept := _held_samples(held, T, units)) is None:
        return False
    kernel = _VARIANCE.get()
    if kernel is None:
        return False
    kernel(output, output if held is None else held, spread_total, spread_count, mean, m2, count,
           output.numel() // (T * units), kept, T, units, _tile(units))
    return True


def relu_update(output: torch.Tensor, T: int, states: Sequence[torch.Tensor],
                relu_states: Sequence[torch.Tensor]) -> bool:
    """Fold a chunk ``output`` [b·T, ...] into invariance's ``states`` (spread total and count, mean, m2, count) and
    its ReLU (torch.relu of it) into ``relu_states``, the same five of a ReLU layer that took ``output``: the same
    numbers as two ``variance_update`` calls, the second on the ReLU's own output, from one read of ``output``
    (``relu_pairs.py``). False (nothing done) where the kernel does not apply or is unavailable."""
    units = states[0].numel()
    if not (_applies(output, T, tuple(states[2:4]), states[:1]) and _states(relu_states[2:4], T * units)
            and _states(relu_states[:1], units)):
        return False
    kernel = _RELU.get()
    if kernel is None:
        return False
    kernel(output, *states, *relu_states, output.numel() // (T * units), T, units, _tile(units))
    return True


def relu_both_update(output: torch.Tensor, T: int, identity: int, states: Sequence[torch.Tensor],
                     relu_states: Sequence[torch.Tensor]) -> bool:
    """``relu_update`` for a layer measured for invariance and ``per_transformation`` (``both_update``'s): states
    and relu_states are each invariance's five, then per_transformation's (squared total and count, the
    untransformed mean, m2, count). False (nothing done) where the kernel does not apply or is unavailable."""
    units = states[0].numel()
    per_transformation, per_unit = (2, 3, 5), (0, 7, 8)  # mean, m2, squared total; spread and the untransformed's
    if not (0 <= identity < T and _applies(output, T, tuple(states[i] for i in per_transformation),
                                           tuple(states[i] for i in per_unit))
            and _states([relu_states[i] for i in per_transformation], T * units)
            and _states([relu_states[i] for i in per_unit], units)):
        return False
    kernel = _BOTH_RELU.get()
    if kernel is None:
        return False
    kernel(output, *states, *relu_states, output.numel() // (T * units), T, units, identity, _tile(units))
    return True


def errors_update(output: torch.Tensor, T: int, identity: int, squared_total: torch.Tensor,
                  squared_count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor,
                  held: torch.Tensor | None = None) -> bool:
    """Fold a chunk ``output`` [b·T, ...] into ``per_transformation``'s states like
    ``layer_measures._invariance_error_update`` (after ``held``, as ``variance_update``); False (nothing done)
    where the kernel does not apply."""
    return _errors(output, output, T, identity, squared_total, squared_count, mean, m2, count, held)


def moved_errors_update(moved: torch.Tensor, features: torch.Tensor, T: int, identity: int,
                        squared_total: torch.Tensor, squared_count: torch.Tensor, mean: torch.Tensor,
                        m2: torch.Tensor, count: torch.Tensor) -> bool:
    """The equivariance error's fold (``layer_measures._equivariance_error_update``): the squared differences
    of the maps moved back ``moved`` from the untransformed rows of ``features`` (both [b·T, ...]) and the
    moments of those; False (nothing done) where the kernel does not apply."""
    return features.shape == moved.shape and _errors(moved, features, T, identity, squared_total, squared_count,
                                                      mean, m2, count)


def _errors(output: torch.Tensor, reference: torch.Tensor, T: int, identity: int, squared_total: torch.Tensor,
            squared_count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor,
            held: torch.Tensor | None = None) -> bool:
    """The squared differences' kernel, the untransformed rows read from ``reference`` (and ``held``, kept
    from the chunk before, its own: only where ``reference`` is ``output``)."""
    units = mean.numel()
    if not (_applies(output, T, (squared_total,), (mean, m2)) and 0 <= identity < T
            and reference.device.type == "cpu" and reference.dtype == torch.float32 and reference.is_contiguous()
            and not reference.requires_grad and (kept := _held_samples(held, T, units)) is not None
            and (held is None or reference is output)):
        return False
    kernel = _ERRORS.get()
    if kernel is None:
        return False
    before = output if held is None else held
    before_reference = reference if held is None else held
    kernel(output, reference, before, before_reference, squared_total, squared_count, mean, m2, count,
           output.numel() // (T * units), kept, T, units, identity, _tile(units))
    return True


def both_update(output: torch.Tensor, T: int, identity: int, spread_total: torch.Tensor, spread_count: torch.Tensor,
                mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor, squared_total: torch.Tensor,
                squared_count: torch.Tensor, reference_mean: torch.Tensor, reference_m2: torch.Tensor,
                reference_count: torch.Tensor, held: torch.Tensor | None = None) -> bool:
    """``variance_update`` and ``errors_update`` of one chunk in one pass (each tile read from memory once;
    after ``held``, as ``variance_update``); False (nothing done) where either does not apply."""
    units = spread_total.numel()
    if (not _applies(output, T, (mean, m2, squared_total), (spread_total, reference_mean, reference_m2))
            or not 0 <= identity < T or (kept := _held_samples(held, T, units)) is None):
        return False
    kernel = _BOTH.get()
    if kernel is None:
        return False
    kernel(output, output if held is None else held, spread_total, spread_count, mean, m2, count, squared_total,
           squared_count, reference_mean, reference_m2, reference_count, output.numel() // (T * units), kept, T,
           units, identity, _tile(units))
    return True


def lies_channels_last(maps: torch.Tensor) -> bool:
    """Whether maps [n, C, h, w] lie in memory as [n, h, w, C] (and not also channel-major: C or h·w of 1)."""
    return maps.dim() == 4 and not maps.is_contiguous() and maps.is_contiguous(memory_format=torch.channels_last)


def move_back(maps: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
              buffer: Callable[[int], torch.Tensor]) -> bool:
    """Maps [b·T, C, h, w] moved back by their taps (``warps.tap_table``: sources [T·h·w, k] into a sample's
    T·h·w rows, weights) into ``out`` [b, T·h·w, C] pixel-major, as ``warps.pixel_major`` then
    ``warps.gather_taps`` do, in one pass: each map laid out pixel-major in cache (``buffer(numel)``: a
    float32 work buffer the caller keeps), its taps gathered from there; maps that lie channels-last in
    memory are already pixel-major, and gathered from where they lie. False where it does not apply."""
    if maps.dim() != 4 or sources.dim() != 2 or not enabled():
        return False
    n, channels, height, width = maps.shape
    pixels = height * width
    T, k = sources.shape[0] // max(pixels, 1), sources.shape[1]
    contiguous = maps.is_contiguous()
    channels_last = not contiguous and lies_channels_last(maps)
    if not (maps.is_cpu and sources.is_cpu and weights.is_cpu and out.is_cpu
            and maps.dtype is torch.float32 and out.dtype is torch.float32 and weights.dtype is torch.float32
            and sources.dtype is torch.int64 and not maps.requires_grad
            and (contiguous or channels_last) and sources.is_contiguous() and weights.is_contiguous()
            and out.is_contiguous() and n > 0 and pixels > 0 and T > 0 and sources.shape[0] == T * pixels
            and n % T == 0 and weights.shape == sources.shape and out.numel() == maps.numel()):
        return False
    kernel = _WARP.get()
    if kernel is None:
        return False
    threads = max(1, min(torch.get_num_threads(), n))
    work = out if channels_last else buffer(threads * pixels * channels)  # (the kernel reads no buffer then)
    kernel(maps, sources, weights, out, work, n, T, channels, pixels, k, threads, int(channels_last))
    return True


def zero_fill(block: torch.Tensor) -> bool:
    """``block`` (contiguous, on CPU) set to zero by streaming stores (``_ZERO_SOURCE``) where that kernel is at
    hand: built (or loaded) with the others (``build_all``), by a Monitor's warm-up (``prepare_zero_fill``), or
    here once invariance's update is built on this machine. False (nothing done) where not, or where it failed to
    build (the caller's ``zero_`` then: the same zeros, not worth a warning of its own)."""
    if not (block.is_cpu and block.is_contiguous() and enabled() and (_ZERO.stored() or _VARIANCE.stored())):
        return False
    call = _ZERO.get()
    if call is None:
        return False
    call(block, block.numel() * block.element_size())
    return True


def prepare_zero_fill() -> None:
    """Build (or load) ``zero_fill``'s kernel now where the kernels are allowed: a compiled measurement's warm-up,
    so that the first measurement to reuse kept states does not wait on it."""
    if enabled():
        _ZERO.get()


def variance_replicates(spread_total: torch.Tensor, spread_count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                        count: torch.Tensor, shard_totals: list[torch.Tensor], shard_spread_counts: list[torch.Tensor],
                        shard_means: list[torch.Tensor], shard_m2s: list[torch.Tensor],
                        shard_counts: list[torch.Tensor], out: torch.Tensor, merge: bool = False) -> bool:
    """``layer_measures._variance_replicates``: ``out`` [K, 2, units] := TV and SV of the whole probe without
    each of its K shards, in one pass over the shards' states (each tile of units' rests summed in cache);
    ``merge``: the whole probe's states are made from the shards' first, in the same pass (``shards.merge_into``
    into zero states: what they held is not read, so they may be shard 0's, overwritten once its replicate is
    taken). False (nothing done) where it does not apply (float64 contiguous CPU states)."""
    K = len(shard_totals)
    if not (K >= 1 and mean.dim() == 2):
        return False
    T, units = mean.shape
    if not (spread_total.numel() == units and out.shape == (K, 2, units) and m2.shape == mean.shape
            and all(s.numel() == units for s in shard_totals)
            and all(s.shape == mean.shape for s in (*shard_means, *shard_m2s))):
        return False
    return _replicates(_REPLICATES, (spread_total, spread_count, mean, m2, count),
                       (shard_totals, shard_spread_counts, shard_means, shard_m2s, shard_counts), out, T, units, merge)


def errors_replicates(squared_total: torch.Tensor, squared_count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                      count: torch.Tensor, shard_totals: list[torch.Tensor], shard_squared_counts: list[torch.Tensor],
                      shard_means: list[torch.Tensor], shard_m2s: list[torch.Tensor], shard_counts: list[torch.Tensor],
                      out: torch.Tensor, merge: bool = False) -> bool:
    """``per_transformation``'s replicates: ``out`` [K, T + 1, units] := the mean squared difference of each
    transformation and twice the untransformed rows' variance of the whole probe without each of its K shards,
    in one pass over the shards' states; ``merge``: the whole probe's states are made from the shards' first, in
    the same pass (as ``variance_replicates``: they may be shard 0's). False (nothing done) where it does not
    apply (float64 contiguous CPU states)."""
    K = len(shard_totals)
    if not (K >= 1 and squared_total.dim() == 2):
        return False
    T, units = squared_total.shape
    if not (mean.numel() == units and m2.numel() == units and out.shape == (K, T + 1, units)
            and all(s.shape == squared_total.shape for s in shard_totals)
            and all(s.numel() == units for s in (*shard_means, *shard_m2s))):
        return False
    return _replicates(_ERRORS_REPLICATES, (squared_total, squared_count, mean, m2, count),
                       (shard_totals, shard_squared_counts, shard_means, shard_m2s, shard_counts), out, T, units, merge)


def _replicates(kernel: _Kernel, whole: tuple[torch.Tensor, ...], shards: tuple[list[torch.Tensor], ...],
                out: torch.Tensor, T: int, units: int, merge: bool) -> bool:
    """Call a replicates' kernel on the whole probe's five states (a sum over samples, its count, a mean, an
    m2, their count) and the K shards' (a list per state) where they are what it takes: float64 contiguous
    CPU states, int64 counts. False (nothing done) where not."""
    states = [whole[0], whole[2], whole[3], *shards[0], *shards[2], *shards[3], out]
    counts = [whole[1], whole[4], *shards[1], *shards[4]]
    if not (enabled() and _states(states)
            and all(c.is_cpu and c.dtype is torch.int64 and c.numel() == 1 for c in counts)):
        return False
    call = kernel.get()
    if call is None:
        return False
    from .shards import ROUNDING  # (shards imports fused, which imports this module)

    table = torch.tensor([s.data_ptr() for shard in zip(*shards) for s in shard], dtype=torch.int64)
    rounding = torch.tensor([ROUNDING * torch.finfo(torch.float64).eps], dtype=torch.float64)
    call(*whole, table, rounding, out, len(shards[0]), T, units, int(merge))
    return True
