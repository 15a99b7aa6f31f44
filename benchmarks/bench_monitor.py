"""Monitor costs: event-file bytes and write time per measured step, and amortized training overhead.

    python benchmarks/bench_monitor.py            # ~10 min on an idle 2-core machine

1. A ResNet-18-sized model (examples' ResNet18Style, width 1: 11.2 M parameters, 3×32×32 inputs,
   per-channel values): bytes added to the event file by each measured step (the first step also
   carries the summary metadata) and the time to build and write one step's summaries, for the default
   measures (invariance + same-equivariance) and for invariance only.
2. The small example model (SimpleCNN, width 0.5, 1×32×32 glyphs) trained with Adam, batch 64: training
   time of the same loop without and with the two Monitor lines (every=100, probe 256, rotations(16),
   batch_size 16; invariance + same-equivariance + accuracy, and invariance + accuracy), interleaved in
   one run (alternating which of the two loops runs first), and the forward floor of one measurement (the
   probe's N·T transformed images through the model at 256 per forward, eval, no autograd, the heap kept
   as a measurement keeps it; median of 3 warm passes): what each measurement costs the loop (writing
   included) as a multiple of that floor, from the medians of the loops, from each repeat's pair of
   loops (``*_paired``), and measurement by measurement (``*_stepwise``: its ``monitor.step`` call plus what
   the next AFTER_STEPS training steps took over the loop's median step). Making the first Monitor compiles
   the fused statistics: its time, the compile time and the first measurement are recorded apart.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

import tm_tensorboard as tm
from tm_tensorboard import heap
from tm_tensorboard.engine import Measurement
from tm_tensorboard.probe import as_probe
import bench_fused
from provenance import environment, save_results, source_version
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


PROBE, T_ROT, EVERY, BATCH = 256, 16, 100, 16
AFTER_STEPS = 5  # training steps after a measurement counted in its stepwise cost (its write spans ~2 of them)


def train(steps: int, monitor_dir: Path | None, data: tuple, probe: tuple, measures: tuple[str, ...]) -> dict:
    """``steps`` Adam steps of the small model; with the two Monitor lines if ``monitor_dir`` (the Monitor
    is made before the clock starts: making it compiles, recorded apart). Seconds of the loop, and of
    each ``monitor.step`` that measured (the measurement plus handing its result to the writer)."""
    torch.manual_seed(0)
    images, labels = data
    model = SimpleCNN(1, 5, width=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    out: dict = {"measured_step_seconds": [], "training_step_seconds": [], "measured_after": []}
    if monitor_dir is not None:
        made = time.perf_counter()
        monitor = tm.Monitor(model, probe, tm.transforms.rotations(T_ROT), logdir=monitor_dir, every=EVERY,
                             measures=measures, batch_size=BATCH)
        out["monitor_made_seconds"] = time.perf_counter() - made
        out["compile_seconds"] = monitor.compile_seconds
    start = time.perf_counter()
    for step in range(1, steps + 1):
        before = time.perf_counter()
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trained = time.perf_counter()
        out["training_step_seconds"].append(trained - before)
        if monitor_dir is not None and monitor.step(step) is not None:
            out["measured_step_seconds"].append(time.perf_counter() - trained)
            out["measured_after"].append(step)  # the training steps from this index on come after it
    if monitor_dir is not None:
        monitor.close()  # waits for the last step's write: part of the cost
    out["seconds"] = time.perf_counter() - start
    out["model"] = model
    return out


def stepwise_costs(run: dict, after: int = AFTER_STEPS) -> list[float]:
    """Each measurement's cost to its own loop: its ``monitor.step`` call plus what the ``after`` training steps
    after it took over the loop's median training step (the summaries written in the background meanwhile,
    the caches the measurement took). Each measurement against the steps around it, not one loop's total
    against another's, whose difference moved by ±0.2 s a measurement between repeats. (The last measurement,
    with no steps after it, is left out.)"""
    steps = run["training_step_seconds"]
    typical = statistics.median(steps)
    return [seconds + sum(t - typical for t in steps[i:i + after])
            for seconds, i in zip(run["measured_step_seconds"], run["measured_after"]) if i + after <= len(steps)]


def recorded(run: dict | float) -> dict | float:
    """A loop's figures as the results file keeps them: without the model and the time of every training step,
    with each measurement's stepwise cost (a floor run's seconds as they are)."""
    if isinstance(run, float):
        return run
    kept = {k: v for k, v in run.items() if k not in ("model", "training_step_seconds")}
    if run["measured_after"]:
        kept["stepwise_seconds"] = stepwise_costs(run)
    return kept


def forward_floor(model: torch.nn.Module, probe: torch.Tensor, passes: int = 3) -> float:
    """Seconds to forward the probe's N·T transformed images, BATCH·T per forward (eval, no autograd), with
    the C heap as a measurement sets it (``heap.freed_memory_kept``, as ``bench_fused.py``'s floor): one
    pass untimed, then the median of ``passes``. A single cold pass with glibc's own settings took 0.42-0.72 s
    within one invocation and 0.36-0.39 s in two others for the same model (stop 40): the ratio swung."""
    tset = tm.transforms.rotations(T_ROT)
    model.eval()
    forward = bench_fused.forward_floor(model, [tset.apply(chunk) for chunk in probe.split(BATCH)])
    times = []
    with heap.freed_memory_kept():  # one setting over all passes (forward() re-enters it)
        forward()
        for _ in range(passes):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_overhead(steps: int, repeats: int, measures: tuple[str, ...]) -> dict:
    """The loop with and without the Monitor, interleaved, and the N·T forward floor; medians.

    A measurement's cost = (monitored loop − plain loop) / measurements: what training loses to it,
    the background write included; compared with the forward floor of the same model.
    """
    data = make_shapes(6000, 32, seed=1)
    test = make_shapes(PROBE, 32, seed=2)
    runs: dict[str, list] = {"without": [], "with": [], "floor": []}
    with tempfile.TemporaryDirectory() as tmp:
        first = train(EVERY, Path(tmp) / "warm", data, test, measures)  # compiles; its one measurement is the first
        train(20, None, data, test, measures)
        for r in range(repeats):  # the two loops in alternating order: neither always runs first
            for monitored in ((False, True) if r % 2 == 0 else (True, False)):
                key, logdir = ("with", Path(tmp) / f"run{r}") if monitored else ("without", None)
                runs[key].append(train(steps, logdir, data, test, measures))
            runs["floor"].append(forward_floor(runs["with"][-1]["model"], test[0]))
    plain = statistics.median(r["seconds"] for r in runs["without"])
    monitored = statistics.median(r["seconds"] for r in runs["with"])
    floor = statistics.median(runs["floor"])
    measurements = steps // EVERY
    per_measurement = (monitored - plain) / measurements
    # each repeat's own difference (its two loops ran back to back): less exposed to drift between repeats
    paired = statistics.median((w["seconds"] - wo["seconds"]) / measurements
                               for w, wo in zip(runs["with"], runs["without"]))
    step_seconds = [s for r in runs["with"] for s in r["measured_step_seconds"]]
    stepwise = [c for r in runs["with"] for c in stepwise_costs(r)]
    return {
        "measures": list(measures),
        "steps": steps,
        "repeats": repeats,
        "every": EVERY,
        "probe": PROBE,
        "transformations": T_ROT,
        "batch_size": BATCH,
        "measurements": measurements,
        "plain_loop_seconds": plain,
        "monitored_loop_seconds": monitored,
        "seconds_per_measurement": per_measurement,
        "forward_floor_seconds": floor,
        "measurement_over_floor": per_measurement / floor,
        "seconds_per_measurement_paired": paired,
        "measurement_over_floor_paired": paired / floor,
        "monitor_step_seconds_median": statistics.median(step_seconds),
        "monitor_step_over_floor": statistics.median(step_seconds) / floor,
        "steps_after_counted": AFTER_STEPS,
        "seconds_per_measurement_stepwise": statistics.median(stepwise),
        "measurement_over_floor_stepwise": statistics.median(stepwise) / floor,
        "overhead_fraction": monitored / plain - 1,
        "first_monitor": {
            "made_seconds": first["monitor_made_seconds"],
            "compile_seconds": first["compile_seconds"],
            "first_measurement_seconds": first["measured_step_seconds"][0] if first["measured_step_seconds"] else None,
        },
        "raw": {k: [recorded(r) for r in v] for k, v in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "monitor.json"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    block = np.ones(64 << 20, dtype=np.uint8)  # the allocator as in a training process (bench_fused.py)
    del block
    figures = {
        "commit": source_version(),
        "environment": environment(),
        "load_average_before": os.getloadavg(),
        "resnet18_default": bytes_and_write_time(("invariance", "same_equivariance"), steps=6),
        "resnet18_invariance": bytes_and_write_time(("invariance",), steps=6),
        "overhead": training_overhead(args.steps, args.repeats, ("invariance", "same_equivariance", "accuracy")),
        "overhead_invariance": training_overhead(args.steps, args.repeats, ("invariance", "accuracy")),
        "load_average_after": os.getloadavg(),
    }
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
