"""Monitor costs: event-file bytes and write time per measured step, and amortized training overhead.

    python benchmarks/bench_monitor.py            # ~5 min on an idle 2-core machine

1. A ResNet-18-sized model (examples' ResNet18Style, width 1: 11.2 M parameters, 3×32×32 inputs,
   per-channel values): bytes added to the event file by each measured step (the first step also
   carries the summary metadata) and the time to build and write one step's summaries, for the default
   measures (invariance + same-equivariance) and for invariance only.
2. The small example model (SimpleCNN, width 0.5, 1×32×32 glyphs) trained with Adam, batch 64: training
   time of the same loop without and with the two Monitor lines (every=100, probe 256, rotations(16),
   invariance + same-equivariance + accuracy), interleaved in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

import tm_tensorboard as tm
from tm_tensorboard.engine import Measurement
from tm_tensorboard.probe import as_probe
from tm_tensorboard.examples.models import ResNet18Style, SimpleCNN
from tm_tensorboard.examples.shapes import make_shapes
from tm_tensorboard.summary import SummaryEmitter


def event_file(logdir: Path) -> Path:
    return next(logdir.glob("events.out.tfevents.*"))


def bytes_and_write_time(measures: tuple[str, ...], steps: int) -> dict:
    """Bytes per step and median write time (summary building + event writing + flush)."""
    torch.manual_seed(0)
    model = ResNet18Style(3, 10)
    probe = torch.randn(64, 3, 32, 32)
    result = Measurement(model, tm.transforms.rotations(4), measures=measures, batch_size=16).run(as_probe(probe))
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        emitter = SummaryEmitter(writer)
        writer.flush()
        sizes, times = [event_file(Path(tmp)).stat().st_size], []
        for step in range(steps):
            start = time.perf_counter()
            emitter.write_result(result, step)
            writer.flush()
            times.append(time.perf_counter() - start)
            sizes.append(event_file(Path(tmp)).stat().st_size)
        writer.close()
    deltas = [b - a for a, b in zip(sizes, sizes[1:])]
    units = sum(len(result.get("nvi", layer)) for layer in result.layers)
    return {
        "measures": list(measures),
        "layers": len(result.layers),
        "channels_per_measure": units,
        "per_unit_measures_logged": len(result.measures),
        "first_step_bytes": deltas[0],
        "step_bytes": statistics.median(deltas[1:]),
        "write_seconds_median": statistics.median(times[1:]),
        "write_seconds_first": times[0],
    }


def train(steps: int, monitor_dir: Path | None, data: tuple, probe: tuple) -> float:
    """Seconds for ``steps`` Adam steps of the small model; with the two Monitor lines if ``monitor_dir``."""
    torch.manual_seed(0)
    images, labels = data
    model = SimpleCNN(1, 5, width=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    if monitor_dir is not None:
        monitor = tm.Monitor(model, probe, tm.transforms.rotations(16), logdir=monitor_dir, every=100,
                             measures=("invariance", "same_equivariance", "accuracy"))
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor_dir is not None:
            monitor.step(step)
    if monitor_dir is not None:
        monitor.close()
    return time.perf_counter() - start


def training_overhead(steps: int, repeats: int) -> dict:
    """Training time with and without the Monitor (every=100), interleaved in one run; medians."""
    data = make_shapes(6000, 32, seed=1)
    test = make_shapes(256, 32, seed=2)
    timings: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        train(20, None, data, test)  # warm up (first optimizer step imports torch._dynamo)
        for r in range(repeats):
            timings["without"].append(train(steps, None, data, test))
            timings["with"].append(train(steps, Path(tmp) / f"run{r}", data, test))
    plain, monitored = statistics.median(timings["without"]), statistics.median(timings["with"])
    return {
        "steps": steps,
        "repeats": repeats,
        "every": 100,
        "probe": 256,
        "transformations": 16,
        "measurements": steps // 100,
        "plain_loop_seconds": plain,
        "monitored_loop_seconds": monitored,
        "seconds_per_measurement": (monitored - plain) / (steps // 100),
        "overhead_fraction": monitored / plain - 1,
        "raw": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "monitor.json"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    figures = {
        "load_average_before": os.getloadavg(),
        "resnet18_default": bytes_and_write_time(("invariance", "same_equivariance"), steps=6),
        "resnet18_invariance": bytes_and_write_time(("invariance",), steps=6),
        "overhead": training_overhead(args.steps, args.repeats),
        "load_average_after": os.getloadavg(),
    }
    print(json.dumps(figures, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
