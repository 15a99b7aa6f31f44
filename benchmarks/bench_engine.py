"""Engine benchmark: ``tm_tensorboard.measure()`` against the reference implementation tmeasures 1.2.11.

Reference case (DESIGN.md, "Performance"): a 4-conv CNN (32-32-64-64 channels) on 3×32×32 inputs with 13
observed leaf modules, N = 256 probe samples, T = 16 rotations, batch 64, CPU, 2 threads. In one run the
script measures, side by side:

- the forward-only floor (all N·T transformed images through the model, eval / no_grad), at 64 images
  per forward (tmeasures' batch), 256 and 1024 (what ``measure(batch_size=4 | 16 | 64)`` forwards at once);
- ``measure()`` with ``measures=("invariance",)`` at batch_size 4 (64 images per forward), 16 (the default,
  256) and 64 (1024) with the compiled fused statistics (compiled before the timed part; compile time is
  bench_fused.py's), with the eager ones at batch_size 16, and with the default measures (invariance +
  same-equivariance) at batch_size 16;
- tmeasures' ``NormalizedVarianceInvariance`` with ``PyTorchMeasureOptions(batch_size=64)``;
- images forwarded by each (counted by a hook on the first layer), peak memory of each (fresh subprocess,
  peak RSS minus that of a subprocess that only builds model and data), and the largest relative difference
  between the two libraries' per-element tvi / svi / nvi in every layer.

Timings are medians over ``--reps`` repetitions; within a repetition every method runs once, in turn, so
all ratios are measured under the same conditions. Run it in the benchmark environment
(``bash benchmarks/tmeasures_env.sh``), see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

import tm_tensorboard as tm
from provenance import cpu_name, source_version
from tm_tensorboard import fused

N = 256  # probe samples
T = 16  # rotations
TM_BATCH = 64  # tmeasures' batch size: images per forward
THREADS = 2
SEED = 0
NVI_SVI_MIN = 1e-4  # nvi is compared only where tmeasures' svi exceeds this
RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"
TARGETS = {"speedup_vs_tmeasures_min": 5.0, "ours_over_floor_max": 1.5, "rtol": 1e-4}

# Method name -> what it runs. Ours: (batch_size, measures, compiled); floor: images per forward.
OURS: dict[str, tuple[int, tuple[str, ...], bool]] = {
    "ours_b4": (4, ("invariance",), True),
    "ours_b16": (16, ("invariance",), True),
    "ours_b64": (64, ("invariance",), True),
    "ours_eager_b16": (16, ("invariance",), False),
    "ours_default_b16": (16, ("invariance", "same_equivariance"), True),
}
FLOORS: dict[str, int] = {"floor_64": 64, "floor_256": 256, "floor_1024": 1024}
FLOOR_OF = {
    "ours_b4": "floor_64",
    "ours_b16": "floor_256",
    "ours_b64": "floor_1024",
    "ours_eager_b16": "floor_256",
    "ours_default_b16": "floor_256",
}
METHODS = [*FLOORS, *OURS, "tmeasures"]


class Net(nn.Module):
    """conv-relu-conv-relu-pool-conv-relu-conv-relu-pool-(flatten in forward)-linear-relu-linear: 13 leaves."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.relu4 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.relu5 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.pool2(self.relu4(self.conv4(self.relu3(self.conv3(x)))))
        return self.fc2(self.relu5(self.fc1(x.flatten(1))))


class Case:
    """The reference case: model, probe and the same rotations expressed in both libraries."""

    def __init__(self) -> None:
        torch.set_num_threads(THREADS)
        torch.manual_seed(SEED)
        self.model = Net().eval()
        self.probe = torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))
        self.ours = tm.transforms.rotations(T)  # 0°, 22.5°, ..., 337.5°
        self.degrees = [t.ops[0].params[0] for t in self.ours]
        self._tm_model: Any = None

    def tmeasures_transformations(self) -> Any:
        """The same rotations in tmeasures: it computes cos / sin of r·180 as radians, so r = radians / 180."""
        from tmeasures.pytorch.transformations.affine import RotationGenerator

        return RotationGenerator(r=[math.radians(d) / 180 for d in self.degrees])

    def tmeasures_model(self) -> Any:
        """tmeasures' wrapper around a copy of the model (its hooks are never removed, so keep them off ours)."""
        if self._tm_model is None:
            from tmeasures.pytorch import AutoActivationsModule

            self._tm_model = AutoActivationsModule(copy.deepcopy(self.model).eval())
        return self._tm_model

    def transformed_images(self) -> torch.Tensor:
        """All N·T transformed probe images, sample-major, as measure() forwards them."""
        with torch.no_grad():
            return torch.cat([self.ours.apply(chunk) for chunk in self.probe.split(TM_BATCH)])

    def float64_reference(self) -> Any:
        """measure() on a float64 copy of model and probe: float32 rounding of the forward pass removed."""
        model = copy.deepcopy(self.model).double()
        return tm.measure(model, self.probe.double(), self.ours, measures=("invariance",), batch_size=64)

    def runner(self, method: str) -> tuple[Callable[[], Any], nn.Module]:
        """A callable running ``method`` once (returning its result) and the model instance it forwards."""
        if method in FLOORS:
            images, per_forward = self.transformed_images(), FLOORS[method]

            def floor() -> None:
                with torch.no_grad():
                    for chunk in images.split(per_forward):
                        self.model(chunk)

            return floor, self.model
        if method in OURS:
            batch_size, measures, compiled = OURS[method]

            def ours() -> Any:
                return tm.measure(
                    self.model, self.probe, self.ours, measures=measures, batch_size=batch_size, compile=compiled
                )

            return ours, self.model
        if method == "tmeasures":
            from tmeasures.pytorch import NormalizedVarianceInvariance, PyTorchMeasureOptions

            transformations, model = self.tmeasures_transformations(), self.tmeasures_model()
            options = PyTorchMeasureOptions(batch_size=TM_BATCH, num_workers=0, verbose=False)

            def reference() -> Any:
                return NormalizedVarianceInvariance().eval(self.probe, transformations, model, options)

            return reference, model.module
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")


@contextmanager
def counting_images(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count forward calls and images through ``model``'s first layer.

    The hook sits on the first leaf module, not on the model: tmeasures calls ``model.forward()``
    directly, which bypasses hooks registered on the model itself.
    """
    counts = {"forward_calls": 0, "images": 0}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        counts["forward_calls"] += 1
        counts["images"] += inputs[0].shape[0]

    first = next(m for m in model.modules() if not any(True for _ in m.children()))
    handle = first.register_forward_pre_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def check_transformations(case: Case) -> float:
    """Max abs difference between both libraries' rotations of the first probe image."""
    x = case.probe[:1]
    with torch.no_grad():
        ours = case.ours.apply(x)
        theirs = torch.stack([t(x[0]) for t in case.tmeasures_transformations()])
    return float((ours - theirs).abs().max())


def relative_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b| / max(|a|, |b|) element-wise; 0 where both are 0."""
    scale = np.maximum(np.abs(a), np.abs(b))
    diff = np.abs(a - b)
    return np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)


Values = dict[str, list[np.ndarray]]  # measure -> per-element values of every layer, in network order


def our_values(result: Any) -> Values:
    """A ``MeasureResult``'s per-element tvi / svi / nvi of every layer."""
    return {m: [result.get(m, layer, per="element") for layer in result.layers] for m in ("tvi", "svi", "nvi")}


def tmeasures_values(result: Any) -> Values:
    """NormalizedVarianceInvariance's result: ``.layers`` = NV, ``.x_result`` = TV, ``.y_result`` = SV."""
    return {
        m: [np.asarray(v, dtype=np.float64) for v in layers]
        for m, layers in (("tvi", result.x_result.layers), ("svi", result.y_result.layers), ("nvi", result.layers))
    }


def differences(a: Values, b: Values, names: list[str]) -> dict[str, Any]:
    """Max relative difference per layer (matched by order) of per-element tvi, svi and nvi.

    tvi and svi are compared on all units and, like nvi, on the units where b's svi > NVI_SVI_MIN
    (suffix ``_svi_gt``). Non-finite values are skipped (and counted if only one side has them).
    """
    if any(len(v) != len(names) for v in (*a.values(), *b.values())):
        raise RuntimeError(f"layer counts differ: {[len(v) for v in a.values()]} vs {[len(v) for v in b.values()]}")
    rows = []
    for i, name in enumerate(names):
        row: dict[str, Any] = {"layer": name}
        significant = b["svi"][i] > NVI_SVI_MIN
        for measure in ("tvi", "svi", "nvi"):
            x, y = a[measure][i], b[measure][i]
            if x.shape != y.shape:
                raise RuntimeError(f"{name}: {measure} shapes differ: {x.shape} vs {y.shape}")
            finite = np.isfinite(x) & np.isfinite(y)
            if (np.isfinite(x) != np.isfinite(y)).any():
                row[f"{measure}_finiteness_differs"] = int((np.isfinite(x) != np.isfinite(y)).sum())
            rel = relative_difference(np.where(finite, x, 0.0), np.where(finite, y, 0.0))
            if measure != "nvi":
                row[measure] = float(rel.max())
            masked = rel[significant & finite]
            row[f"{measure}_svi_gt" if measure != "nvi" else "nvi"] = float(masked.max()) if masked.size else 0.0
        row["units_svi_gt"] = f"{int(significant.sum())}/{significant.size}"
        rows.append(row)
    keys = ("tvi", "svi", "tvi_svi_gt", "svi_svi_gt", "nvi")
    return {"max": {k: max(r[k] for r in rows) for k in keys}, "per_layer": rows}


def warm_allocator() -> None:
    """Free one block above glibc's largest mmap threshold (32 MiB), as any training process has done:
    until then glibc hands freed memory back to the system and every chunk's activations page-fault in
    anew (measured: 0.55 M page faults and +1.3 s on a 1.9 s floor), for the floors and for ours."""
    block = np.ones(64 << 20, dtype=np.uint8)
    del block


def interleaved(methods: dict[str, Callable[[], Any]], reps: int, name: str | None = None) -> dict[str, list[float]]:
    """``reps`` rounds of all the methods in turn (run each once before: compiling, warming caches and the
    allocator); their wall times (each round printed under ``name``)."""
    wall: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(reps):
        for method, run in methods.items():
            start = time.perf_counter()
            run()
            wall[method].append(time.perf_counter() - start)
        if name is not None:
            print(f"{name} rep {rep + 1}/{reps}: " + ", ".join(f"{m} {wall[m][-1]:.2f}" for m in methods), flush=True)
    return wall


def peak_memory_mib(method: str) -> float:
    """Peak RSS (MiB) of a fresh subprocess running ``method`` once ("baseline": imports, model and data)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", method], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_kib"] / 1024


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB.

    VmHWM, not ``getrusage().ru_maxrss``: Linux carries ru_maxrss over fork and exec, so a child of this
    (large) benchmark process would report at least the parent's size. VmHWM belongs to the process's own
    address space, which exec replaces.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (the memory figures need Linux)")


def child(method: str) -> None:
    """Subprocess body for the memory figures: build the case, run ``method`` once, print the peak RSS."""
    import tmeasures.pytorch  # noqa: F401  (imported in every child so the baseline includes it)

    case = Case()
    warm_allocator()
    if method != "baseline":
        run, _ = case.runner(method)
        run()
    print(json.dumps({"peak_rss_kib": peak_rss_kib()}))


def timed_runs(runners: dict[str, tuple[Callable[[], Any], nn.Module]], reps: int) -> dict[str, Any]:
    """Run every method once per repetition, in turn; the first repetition also counts images and keeps results."""
    wall: dict[str, list[float]] = {m: [] for m in runners}
    cpu: dict[str, list[float]] = {m: [] for m in runners}
    results: dict[str, Any] = {}
    counts: dict[str, dict[str, int]] = {}
    for rep in range(reps):
        for method, (run, model) in runners.items():
            with counting_images(model) as counted:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                result = run()
                wall[method].append(time.perf_counter() - start_wall)
                cpu[method].append(time.process_time() - start_cpu)
            if rep == 0:
                results[method], counts[method] = result, counted
        print(f"rep {rep + 1}/{reps}: " + ", ".join(f"{m} {wall[m][-1]:.2f}s" for m in runners), flush=True)
    return {"wall": wall, "cpu": cpu, "results": results, "counts": counts}


def benchmark(reps: int) -> dict[str, Any]:
    """All figures of the reference case, measured in this process (times) and in subprocesses (memory)."""
    import tmeasures

    load_before = os.getloadavg()
    case = Case()
    transform_diff = check_transformations(case)
    print(f"transformation check: max |ours - tmeasures| over the {T} rotations of one image = {transform_diff:.2e}")
    if transform_diff > 1e-4:
        raise SystemExit("the two libraries' rotations differ: comparing their measures would be meaningless")

    warm_allocator()
    runners = {m: case.runner(m) for m in METHODS}
    with torch.no_grad():  # warm up the convolution primitives of both model copies
        for _, model in runners.values():
            model(case.probe[:TM_BATCH])
    for method in OURS:  # compile the fused kernels (their cost is recorded apart: bench_fused.py)
        runners[method][0]()
    compile_seconds = fused.compiled_seconds()
    runs = timed_runs(runners, reps)
    median = {m: statistics.median(ts) for m, ts in runs["wall"].items()}
    median_cpu = {m: statistics.median(ts) for m, ts in runs["cpu"].items()}
    load_after = os.getloadavg()

    baseline = peak_memory_mib("baseline")
    memory = {m: peak_memory_mib(m) - baseline for m in METHODS}

    names = runs["results"]["ours_b16"].layers
    ours, theirs = our_values(runs["results"]["ours_b16"]), tmeasures_values(runs["results"]["tmeasures"])
    exact = our_values(case.float64_reference())
    numbers = differences(ours, theirs, names)
    ours_methods = [m for m in OURS if OURS[m][1] == ("invariance",) and OURS[m][2]]
    ratios = {
        **{f"tmeasures_over_{m}": median["tmeasures"] / median[m] for m in OURS},
        **{f"{m}_over_{FLOOR_OF[m]}": median[m] / median[FLOOR_OF[m]] for m in OURS},
        "tmeasures_over_floor_64": median["tmeasures"] / median["floor_64"],
    }
    best_speedup = max(ratios[f"tmeasures_over_{m}"] for m in ours_methods)
    best_floor = min(ratios[f"{m}_over_{FLOOR_OF[m]}"] for m in ours_methods)
    targets = {
        **TARGETS,
        "speedup_met": {m: ratios[f"tmeasures_over_{m}"] >= TARGETS["speedup_vs_tmeasures_min"] for m in ours_methods},
        "floor_met": {m: ratios[f"{m}_over_{FLOOR_OF[m]}"] <= TARGETS["ours_over_floor_max"] for m in ours_methods},
        "rtol_met": {
            "nvi_svi_gt": numbers["max"]["nvi"] <= TARGETS["rtol"],
            "tvi_svi_svi_gt": max(numbers["max"]["tvi_svi_gt"], numbers["max"]["svi_svi_gt"]) <= TARGETS["rtol"],
            "tvi_svi_all_units": max(numbers["max"]["tvi"], numbers["max"]["svi"]) <= TARGETS["rtol"],
        },
        "best_speedup": best_speedup,
        "best_ours_over_floor": best_floor,
    }
    return {
        "case": {
            "model": "4-conv CNN 32-32-64-64, 3x3 pad 1, 2 maxpools, fc 4096-128-10; 13 observed leaf modules",
            "probe": f"torch.rand({N}, 3, 32, 32), seed {SEED}",
            "transformations": f"{T} rotations, {case.ours.id}",
            "N": N,
            "T": T,
            "tmeasures_batch_size": TM_BATCH,
            "threads": THREADS,
            "reps": reps,
        },
        "environment": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": load_after,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "tm_tensorboard": f"{tm.__version__} ({source_version()})",
            "tmeasures": getattr(tmeasures, "__version__", "1.2.11"),
        },
        "transformation_check_max_abs_diff": transform_diff,
        "layers": {"ours": names, "tmeasures": list(runs["results"]["tmeasures"].layer_names)},
        "compile_seconds_before_timing": compile_seconds,
        "images_per_forward": {
            **FLOORS,
            **{m: bs * T for m, (bs, _, _) in OURS.items()},
            "tmeasures": "16 (TV pass: one sample's T images) / 64 (SV pass)",
        },
        "time_s": {
            "median": median,
            "min": {m: min(ts) for m, ts in runs["wall"].items()},
            "median_cpu": median_cpu,
            "all": runs["wall"],
        },
        "ratios": ratios,
        "forwarded": runs["counts"],
        "peak_memory_mib": {"baseline_rss": baseline, **memory},
        "ours_b16_vs_tmeasures": numbers,
        "vs_float64_reference": {
            "ours_b16": differences(ours, exact, names)["max"],
            "tmeasures": differences(theirs, exact, names)["max"],
        },
        "ours_b4_vs_ours_b16": differences(our_values(runs["results"]["ours_b4"]), ours, names)["max"],
        "targets": targets,
    }


def report(figures: dict[str, Any]) -> None:
    """Print the human-readable tables."""
    median, fastest, cpu = (figures["time_s"][k] for k in ("median", "min", "median_cpu"))
    counts, memory, per_forward = figures["forwarded"], figures["peak_memory_mib"], figures["images_per_forward"]
    header = ("method", "wall s", "min s", "cpu s", "images", "forwards", "img/fwd", "peak MiB")
    print("\n" + f"{header[0]:<18}" + "".join(f"{h:>9}" for h in header[1:]))
    for m in METHODS:
        ipf = per_forward[m] if m != "tmeasures" else "16/64"
        print(
            f"{m:<18}{median[m]:>9.2f}{fastest[m]:>9.2f}{cpu[m]:>9.2f}{counts[m]['images']:>9}"
            f"{counts[m]['forward_calls']:>9}{ipf!s:>9}{memory[m]:>9.1f}"
        )
    print(
        f"(wall, cpu: medians of {figures['case']['reps']}; min: fastest wall; peak memory: peak RSS minus the "
        f"{memory['baseline_rss']:.1f} MiB of a process that only builds model + data)"
    )
    print("\nratios of median wall times:")
    for name, value in figures["ratios"].items():
        print(f"  {name:<34}{value:8.2f}")
    numbers = figures["ours_b16_vs_tmeasures"]
    print(f"\nmax relative difference, ours (batch_size 16) vs tmeasures, per element ('>': svi > {NVI_SVI_MIN:g}):")
    print(f"  {'layer':<8}{'tvi':>10}{'svi':>10}{'tvi >':>10}{'svi >':>10}{'nvi >':>10}  units >")
    for row in [*numbers["per_layer"], {"layer": "all", "units_svi_gt": "", **numbers["max"]}]:
        print(
            f"  {row['layer']:<8}{row['tvi']:>10.2e}{row['svi']:>10.2e}{row['tvi_svi_gt']:>10.2e}"
            f"{row['svi_svi_gt']:>10.2e}{row['nvi']:>10.2e}  {row['units_svi_gt']}"
        )
    for label, maxima in (
        *((f"{k} vs float64 reference", v) for k, v in figures["vs_float64_reference"].items()),
        ("ours batch_size 4 vs 16", figures["ours_b4_vs_ours_b16"]),
    ):
        print(f"  {label:<32}" + ", ".join(f"{k} {v:.1e}" for k, v in maxima.items()))
    print("\ntargets: " + json.dumps(figures["targets"]))


def main() -> None:
    # tmeasures' DataLoaders ask for pinned memory, which has no meaning without an accelerator.
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true.*")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per method (default 5)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON file for the figures (default {RESULTS})")
    parser.add_argument("--no-save", action="store_true", help="only print the figures")
    parser.add_argument("--child", choices=["baseline", *METHODS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    figures = benchmark(args.reps)
    report(figures)
    print("\n" + json.dumps(figures, indent=1))
    if not args.no_save:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
