"""Same-equivariance's inverse warps: grid_sample, the compiled taps (warps.py) and their CPU kernel
(native.move_back), in one process.

    python benchmarks/bench_warps.py            # ~5 min on an idle 2-core machine (--reps 5)

1. The warp alone on [b·T, C, h, w] = [256, 16, 32, 32] and [256, 64, 8, 8] float32 maps (T = 16
   rotations): ``grid_sample`` (what the eager path runs) against the compiled taps (the layout change
   and the gather, into kept buffers: "taps", what a GPU runs) and the CPU kernel that does both in one
   pass ("kernel"), each timed with the caches flushed (a 64 MiB write) before every call; medians of 15. Also
   the kernel with each map laid out as before aeccf3a ("kernel_torchs_transpose": by torch's transpose, scalar
   where torch's vectors are AVX2; the same code on AVX-512), and with its taps gathered as before the bilinear
   and one-tap gathers were compiled apart ("kernel_any_taps": every tap's row and weight read again for each
   vector of channels).
2. ``measure()`` with the default measures (invariance + same-equivariance), compiled, no error bars,
   T = 16 rotations, the ways of moving the maps back in the same process, interleaved with the
   forward-only floor at the same images per forward: the old one (``grid_sample``, states in (C, h, w)
   order, as before 6b9f42b) put back for the comparison by replacing ``SameEquivarianceMeasure.values``,
   the compiled taps ("taps": the warp's kernel declined), and the kernel (also the two earlier ways of part
   1); medians of ``--reps``. Cases:
   bench_fused.py's ResNet18Style(width=0.25) at 32 px (N = 128) at batch_size 4 and 16, and the reference
   case (13 layers, N = 256) at 16. Also the largest relative difference of nvse per channel between
   ``grid_sample``'s and each of the others'.
   ``--parts alone``: part 1 only (~1 min).
3. ``--parts eager``: the same with the eager statistics (``compile=False``), where every way runs
   ``grid_sample`` and "taps" and "kernel" add the layout change (an eager copy) so that the states stream
   pixel-major whichever path runs: what that costs the eager path (its figures keep the names of part 2:
   "taps" is the current code, here ``grid_sample`` and the copy). (Figures of the other parts already in
   ``--output`` are kept.)
4. ``--parts equivariance_error``: ``measure()`` with invariance + the equivariance error (identity action),
   compiled, no error bars, against invariance alone and the floor, interleaved: the maps moved back
   pixel-major with the identity's slot holding the untransformed maps (the current code) and laid out
   channel-major again as before (an action that only overrides ``undo`` takes that path, as
   ``cyclic_shift`` does); the reference case and ResNet18Style(width=0.25) at batch_size 16. Also the
   largest relative difference of ee per channel between the two; and the default measures without and
   with the equivariance error, its maps taken from same-equivariance's (the current code) or moved back
   again ("apart").
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import tm_tensorboard as tm
from bench_engine import Net, interleaved, warm_allocator
from provenance import environment
from tm_tensorboard import layer_measures, native
from tm_tensorboard.examples.models import ResNet18Style
from tm_tensorboard.statistics import Scratch

RESULTS = Path(__file__).resolve().parent / "results" / "warps.json"
T = 16
_FLUSH = torch.empty(64 << 20, dtype=torch.uint8)
_TAPS_VALUES = layer_measures.SameEquivarianceMeasure.values
_MOVE_BACK = native.move_back
_KERNEL = native._WARP
WAYS = ("grid_sample", "taps", "kernel", "kernel_torchs_transpose", "kernel_any_taps")


def _grid_sample_values(self, activation, chunk):
    """Before 6b9f42b: grid_sample, the states in the layer's (C, h, w) order."""
    return self.transformations.invert_features(self.maps(activation))


def use(way: str) -> None:
    """Move same-equivariance's maps back by ``grid_sample``, the compiled ``taps`` or their ``kernel`` (as it is,
    as before aeccf3a: ``kernel_torchs_transpose``, or with any number of taps: ``kernel_any_taps``)."""
    layer_measures.SameEquivarianceMeasure.pixel_major = way != "grid_sample"
    layer_measures.SameEquivarianceMeasure.values = _grid_sample_values if way == "grid_sample" else _TAPS_VALUES
    native.move_back = _MOVE_BACK if way.startswith("kernel") else lambda *arguments: False
    native._WARP = {"kernel_torchs_transpose": kernel_with_torchs_transpose,
                    "kernel_any_taps": kernel_with_any_taps}.get(way, lambda: _KERNEL)()


def cold_ms(fn: Callable[[], object], reps: int = 15) -> float:
    fn(), fn()
    times = []
    for _ in range(reps):
        _FLUSH.fill_(1)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@functools.cache
def kernel_with_torchs_transpose() -> native._Kernel:
    """The warp's kernel as before aeccf3a: each map laid out by torch's transpose of any size, which is
    vectorized only for AVX-512 (with AVX2 vectors, an element-by-element loop); the same code on AVX-512."""
    laid_out = "lay_out(rows, hw, laid_out, C);"
    assert native._WARP_SOURCE.count(laid_out) == 1
    source = native._WARP_SOURCE.replace(laid_out, "at::vec::transpose_mxn<float>(rows, hw, laid_out, C, "
                                         "static_cast<int>(C), static_cast<int>(hw));")
    return native._Kernel("inverse warp, torch's transpose", source, _KERNEL.arguments)


@functools.cache
def kernel_with_any_taps() -> native._Kernel:
    """The warp's kernel with every pixel's taps gathered by its code for any number of them (``gather<0>``), as
    all were before the bilinear (4) and one-tap gathers were compiled apart: each tap's row and weight read
    again for every vector of channels."""
    dispatch = "if (k == 4) {", "} else if (k == 1) {"
    assert all(native._WARP_SOURCE.count(line) == 1 for line in dispatch)
    source = native._WARP_SOURCE.replace(dispatch[0], "if (false) {").replace(dispatch[1], "} else if (false) {")
    return native._Kernel("inverse warp, any taps", source, _KERNEL.arguments)


def warp_alone() -> dict:
    tset, out = tm.transforms.rotations(T), {}
    for shape in ((256, 16, 32, 32), (256, 64, 8, 8)):
        maps, scratch = torch.randn(*shape), Scratch()
        out[str(list(shape))] = {"grid_sample_ms": cold_ms(lambda: tset.invert_features(maps))}
        for way in WAYS[1:]:
            use(way)
            out[str(list(shape))][f"{way}_ms"] = cold_ms(lambda: tset.invert_features_pixel_major(maps, True, scratch))
    use("kernel")
    return out


def measured(name: str, model: torch.nn.Module, samples: int, batch_size: int, reps: int,
             compile: bool = True) -> dict:
    torch.manual_seed(0)
    probe = torch.rand(samples, 3, 32, 32)
    tset = tm.transforms.rotations(T)

    def run():
        return tm.measure(model, probe, tset, measures=("invariance", "same_equivariance"), batch_size=batch_size,
                          compile=compile, error_bars=False, dedupe_batchnorm=False)

    def floor():
        with torch.no_grad():
            for lo in range(0, samples, batch_size):
                model(tset.apply(probe[lo : lo + batch_size]))

    results = {}
    for way in WAYS:
        use(way)
        results[way] = run()  # compiles
    old = results["grid_sample"]
    difference = {way: max(float(np.abs(old.get("nvse", layer) - results[way].get("nvse", layer)).max()
                                 / np.abs(old.get("nvse", layer)).max()) for layer in old.layers_of("nvse"))
                  for way in WAYS[1:]}
    times: dict[str, list[float]] = {"floor": [], **{way: [] for way in WAYS}}
    for _ in range(reps):
        for way in times:
            if way != "floor":
                use(way)
            start = time.perf_counter()
            floor() if way == "floor" else run()
            times[way].append(time.perf_counter() - start)
    use("kernel")
    medians = {way: statistics.median(values) for way, values in times.items()}
    figures = {"case": name, "batch_size": batch_size, "samples": samples, "compiled": compile, "runs_s": times,
               "median_s": medians, **{f"{way}_over_floor": medians[way] / medians["floor"] for way in WAYS},
               "nvse_max_relative_difference": difference}
    print(json.dumps({k: v for k, v in figures.items() if k != "runs_s"}))
    return figures


class _ChannelMajor(tm.actions.FeatureAction):
    """The identity action whose ``undo`` is its own: the equivariance error's channel-major path."""

    def undo(self, y, transformations, compiled=False, scratch=None):
        return super().undo(y, transformations, compiled, scratch)


def apart(run: Callable[[], object]) -> Callable[[], object]:
    """``run`` with the equivariance error moving its maps back itself, not taking same-equivariance's."""
    values = layer_measures.SameEquivarianceMeasure.values

    def unshared(self, activation, chunk):
        moved = values(self, activation, chunk)
        chunk.moved_back = None
        return moved

    def wrapped():
        layer_measures.SameEquivarianceMeasure.values = unshared
        try:
            return run()
        finally:
            layer_measures.SameEquivarianceMeasure.values = values
    return wrapped


def equivariance_error(name: str, model: torch.nn.Module, samples: int, batch_size: int, reps: int) -> dict:
    torch.manual_seed(0)
    probe = torch.rand(samples, 3, 32, 32)
    tset = tm.transforms.rotations(T)

    def run(measures, action=None):
        return lambda: tm.measure(model, probe, tset, measures=measures, batch_size=batch_size, compile=True,
                                  error_bars=False, actions=action, dedupe_batchnorm=False)  # (the same layers)

    def floor():
        with torch.no_grad():
            for lo in range(0, samples, batch_size):
                model(tset.apply(probe[lo : lo + batch_size]))

    default = ("invariance", "same_equivariance", "equivariance_error")
    ways = {"floor": floor, "invariance": run(("invariance",)),
            "pixel_major": run(("invariance", "equivariance_error")),
            "channel_major": run(("invariance", "equivariance_error"), _ChannelMajor()),
            "default": run(default[:2]), "default_and_ee": run(default), "default_and_ee_apart": apart(run(default))}
    new, old = ways["pixel_major"](), ways["channel_major"]()  # (and compiles)
    ways["default_and_ee"](), ways["default_and_ee_apart"]()
    difference = max(float(np.abs(new.get("ee", layer) - old.get("ee", layer)).max()
                           / np.abs(old.get("ee", layer)).max()) for layer in old.layers_of("ee"))
    times = interleaved(ways, reps)
    medians = {way: statistics.median(values) for way, values in times.items()}
    figures = {"case": name, "batch_size": batch_size, "samples": samples, "runs_s": times, "median_s": medians,
               **{f"{way}_over_floor": medians[way] / medians["floor"] for way in ways},
               **{f"{way}_added_to_invariance": medians[way] / medians["invariance"] - 1
                  for way in ("pixel_major", "channel_major")},
               **{f"{way}_added_to_default": medians[way] / medians["default"] - 1
                  for way in ("default_and_ee", "default_and_ee_apart")},
               "ee_max_relative_difference": difference}
    print(json.dumps({k: v for k, v in figures.items() if k != "runs_s"}))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--parts", nargs="+", choices=("compiled", "alone", "eager", "equivariance_error"),
                        default=["compiled"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    warm_allocator()
    figures = json.loads(args.output.read_text()) if args.output.exists() else {}
    resnet = lambda: ResNet18Style(3, 10, width=0.25).eval()  # noqa: E731
    if "compiled" in args.parts:
        figures.update({"environment": environment(), "warp_alone": warp_alone(), "measure": [
            measured("ResNet18Style(width=0.25), 32 px", resnet(), 128, 4, args.reps),
            measured("ResNet18Style(width=0.25), 32 px", resnet(), 128, 16, args.reps),
            measured("reference case (bench_engine.Net)", Net().eval(), 256, 16, args.reps),
        ]})
        print(json.dumps(figures["warp_alone"]))
    if "alone" in args.parts:
        figures.update({"environment": environment(), "warp_alone": warp_alone()})
        print(json.dumps(figures["warp_alone"]))
    if "eager" in args.parts:
        figures["eager"] = {"environment": environment(), "measure": [
            measured("ResNet18Style(width=0.25), 32 px", resnet(), 128, 16, args.reps, compile=False),
            measured("reference case (bench_engine.Net)", Net().eval(), 256, 16, args.reps, compile=False),
        ]}
    if "equivariance_error" in args.parts:
        figures["equivariance_error"] = {"environment": environment(), "measure": [
            equivariance_error("reference case (bench_engine.Net)", Net().eval(), 256, 16, args.reps),
            equivariance_error("ResNet18Style(width=0.25), 32 px", resnet(), 128, 16, args.reps),
        ]}
    args.output.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
