"""The Lie derivative: its cost against the forward floor, and how it compares with the finite measures.

    python benchmarks/bench_lie.py            # ~3 min on an idle 2-core machine

1. Wall time on bench_engine.py's reference case (the 4-conv CNN, N = 256 CIFAR-sized images, CPU,
   2 threads): the forward-only floor (the N untransformed images through the model, eval, no_grad), the
   forward-mode pass alone (the same images as dual tensors carrying the rotation's input tangent, no
   hooks), and ``measure(measures=("lie_rotation",))`` with compiled and with eager statistics, at
   batch_size 16 and 64. Every method runs once per repetition, in turn; medians of ``--reps``. The
   kernels are compiled before the timed part.
2. The Lie derivative against the finite measures per layer, on examples.models.SimpleCNN trained for
   400 Adam steps on the demo's upright glyphs (as the demo's "cnn" run), probe: 256 test glyphs, border
   padding, layer means over live channels: ``lie_rotation`` (per radian²), the same from central finite
   differences of the library's rotations by ±0.5°, the equivariance error ee(θ) of rotations(0, ±θ)
   over θ² (θ in radians) for θ = 0.5°, 5°, 22.5°, and same-equivariance nvse(0.5°) / θ against
   √(2 · lie). Layer ``input`` (``noise_floor=True``) is what interpolation alone does.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

import tm_tensorboard as tm
from bench_engine import Net, warm_allocator
from provenance import environment, save_results
from tm_tensorboard import lie
from tm_tensorboard.capture import Capture, select_modules
from tm_tensorboard.examples.models import SimpleCNN
from tm_tensorboard.examples.shapes import CLASSES, make_shapes

RESULTS = Path(__file__).resolve().parent / "results" / "lie.json"
N = 256
THREADS = 2
TARGET_OVER_FLOOR = 3.0
ANGLES = (0.5, 5.0, 22.5)  # degrees


def speed(reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net().eval()
    probe = torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tset = tm.transforms.rotations(16)  # gives the warp's interpolation and padding; not forwarded
    methods: dict[str, Callable[[], Any]] = {}
    for b in (16, 64):
        chunks = probe.split(b)

        def floor(chunks=chunks) -> None:
            with torch.no_grad():
                for x in chunks:
                    model(x)

        def forward_mode(chunks=chunks) -> None:
            with torch.no_grad(), lie.forward_mode(model):
                for x in chunks:
                    model(forward_ad.make_dual(x, lie.rotation.input_tangent(x, "bilinear", "border")))

        methods[f"floor_b{b}"] = floor
        methods[f"forward_mode_b{b}"] = forward_mode
        for label, compile in (("compiled", True), ("eager", False)):
            methods[f"lie_{label}_b{b}"] = lambda b=b, c=compile: tm.measure(
                model, probe, tset, measures=("lie_rotation",), batch_size=b, compile=c)
    for run in methods.values():  # compiles, warms caches and the allocator
        run()
    wall: dict[str, list[float]] = {m: [] for m in methods}
    load_before = os.getloadavg()
    for rep in range(reps):
        for method, run in methods.items():
            start = time.perf_counter()
            run()
            wall[method].append(time.perf_counter() - start)
        print(f"rep {rep + 1}/{reps}: " + ", ".join(f"{m} {wall[m][-1]:.3f}" for m in methods), flush=True)
    median = {m: statistics.median(ts) for m, ts in wall.items()}
    return {
        "N": N,
        "median_s": median,
        "all_s": wall,
        "over_floor": {m: t / median["floor_b" + m.rsplit("_b", 1)[1]] for m, t in median.items() if "floor" not in m},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def trained_cnn(steps: int = 400, seed: int = 0) -> torch.nn.Module:
    """SimpleCNN trained on upright glyphs as the demo's "cnn" run (Adam 1e-3, batches of 64)."""
    torch.manual_seed(seed)
    model = SimpleCNN(1, len(CLASSES))
    images, labels = make_shapes(6000, 32, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def central_differences(model: torch.nn.Module, probe: torch.Tensor, degrees: float) -> dict[str, float]:
    """{layer: mean over live channels of mean L² / (2 · var)}, as lie_rotation normalizes it, with L the
    central difference [g_θ⁻¹ φ(g_θ x) − g_₋θ⁻¹ φ(g_₋θ x)] / 2θ of the library's own rotations (radians)."""
    rotations = tm.transforms.rotations([degrees, -degrees])
    outputs: dict[str, list[torch.Tensor]] = {}
    modules = select_modules(model)[0]
    keep = lambda name, module, out: outputs.setdefault(name, []).append(out.clone())  # noqa: E731
    with torch.no_grad(), Capture(modules, keep) as capture:
        for batch in (rotations.apply(probe), probe):
            capture.start_forward()
            model(batch)
    values = {}
    for name, (moved, reference) in outputs.items():
        if moved.dim() == 4:
            moved = rotations.invert_features(moved)
        moved = moved.view(len(probe), 2, *moved.shape[1:])
        squares = ((moved[:, 0] - moved[:, 1]) / (2 * math.radians(degrees))).square().mean(0)
        var2 = 2 * reference.var(0)
        if squares.dim() > 1:
            squares, var2 = squares.flatten(1).mean(1), var2.flatten(1).mean(1)
        live = (var2 > 0) | (squares > 0)
        values[name] = (squares[live] / var2[live]).mean().item()
    return values


def comparison() -> dict[str, Any]:
    model = trained_cnn()
    probe, labels = make_shapes(N, 32, seed=2)
    accuracy = (model(probe).argmax(1) == labels).float().mean().item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the glyphs' faint noise reaches the border: the padding warning
        lie_values = tm.measure(model, probe, tm.transforms.rotations(4), measures=("lie_rotation",), noise_floor=True)
        finite = {
            angle: tm.measure(model, probe, tm.transforms.rotations([0, angle, -angle]), noise_floor=True,
                              measures=("equivariance_error", "same_equivariance"))
            for angle in ANGLES
        }
    central = central_differences(model, probe, ANGLES[0])
    rows = {}
    for layer, value in lie_values.layer_means("lie_rotation").items():
        row: dict[str, Any] = {"lie": value}
        if layer in central:
            row["central_fd(0.5)"] = central[layer]
        for angle, result in finite.items():
            ee = result.layer_means("ee")
            if layer in ee:
                row[f"ee({angle:g})/theta^2"] = ee[layer] / math.radians(angle) ** 2
        nvse = finite[ANGLES[0]].layer_means("nvse")
        if layer in nvse:
            row["nvse(0.5)/theta"] = nvse[layer] / math.radians(ANGLES[0])
            row["sqrt(2 lie)"] = math.sqrt(2 * value)
        rows[layer] = row
    return {"model": "SimpleCNN(1, 5) trained 400 steps on upright glyphs", "probe_accuracy": accuracy, "layers": rows}


def report(figures: dict[str, Any]) -> None:
    ratios = figures["speed"]["over_floor"]
    print("\nLie derivative / forward floor:", ", ".join(f"{m} {r:.2f}" for m, r in ratios.items()))
    table = figures["comparison"]["layers"]
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    print(f"\n{'layer':<14}" + "".join(f"{c:>18}" for c in columns))
    for layer, row in table.items():
        print(f"{layer:<14}" + "".join(f"{row[c]:>18.4g}" if c in row else f"{'':>18}" for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warm_allocator()
    figures: dict[str, Any] = {
        "environment": environment(),
        "target_over_floor": TARGET_OVER_FLOOR,
        "speed": speed(args.reps),
        "comparison": comparison(),
    }
    report(figures)
    if not args.no_save:
        save_results(figures, args.output)


if __name__ == "__main__":
    sys.exit(main())
