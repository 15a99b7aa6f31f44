"""Writing a large measured step: throughput, and how long the training thread is held up.

    python benchmarks/bench_writing.py            # ~1 min on an idle 2-core machine

The step: a synthetic MeasureResult of a deep, wide network (160 layers × 5,600 channels with 2 × 2
feature maps, invariance + same-equivariance, values drawn at random, seeded): ~50 MB of event file
per step, as the Monitor writes it (snapshot blobs, per-layer unit vectors, means, scalars).

1. Throughput (MB = 10^6 bytes of event file per second): building and writing one step on the calling
   thread until it is in the event file, through our path (``event_records``: CRC32C in C, the Event
   serialized in chunks) and through TensorBoard's stock writer path (the same summaries as one
   ``Summary`` through ``SummaryWriter.add_summary`` + ``flush``, pure-Python CRC32C: the Monitor's
   path before). Each step is the first through a fresh writer (it carries the summary metadata).
2. The training thread: a toy training loop on the main thread (MLP 256-256-10, Adam, batch 64,
   ``torch.set_num_threads(1)``). For each repetition: ``Monitor.step()`` with the measurement replaced
   by the prebuilt result (so step() is only the hand-off), the loop while the Monitor's writer thread
   writes the step, then as many iterations of the loop with no write in flight; per-iteration
   latencies are compared. For reference, once each: the loop while a separate process keeps the other
   core busy (this machine's noise floor), and while the stock path writes the step on another thread
   (what moving the old path off the training thread alone would give: the pure-Python CRC32C holds
   the GIL).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

import tm_tensorboard as tm
from provenance import save_results, source_version
from tm_tensorboard import event_records, transforms
from tm_tensorboard.capture import LayerInfo
from tm_tensorboard.result import MeasureResult
from tm_tensorboard.summary import SummaryEmitter

LAYERS, CHANNELS = 160, 5600


def large_result(seed: int = 0) -> MeasureResult:
    rng = np.random.default_rng(seed)
    infos = [LayerInfo(f"stage{i // 40}.block{i % 40 // 4}.conv{i % 4}", i, "Conv2d", (CHANNELS, 2, 2))
             for i in range(LAYERS)]
    components = {}
    for group in ("invariance", "same_equivariance"):
        components[group] = {}
        for info in infos:
            sv = rng.uniform(0.5, 1.5, info.unit_shape)
            tv = sv * rng.uniform(0.0, 1.0, info.unit_shape)
            components[group][info.name] = (("tv", "sv"), np.stack([tv, sv])[None])
    return MeasureResult(infos, transforms.rotations(16), 256, components, accuracy=rng.uniform(0, 1, 16))


def event_file_size(logdir: str) -> int:
    return sum(p.stat().st_size for p in Path(logdir).glob("events.out.tfevents.*"))


@contextlib.contextmanager
def stock_writer_path():
    """Without the C CRC32C, writers stay TensorBoard's own and summaries go through add_summary + flush."""
    saved, event_records._crc32c = event_records._crc32c, None
    try:
        yield
    finally:
        event_records._crc32c = saved


def write_once(result: MeasureResult, root: str) -> tuple[float, int]:
    """Seconds to build and write one step on this thread until it is in the event file, and its bytes."""
    with tempfile.TemporaryDirectory(dir=root) as logdir:
        writer = SummaryWriter(logdir)
        emitter = SummaryEmitter(writer)
        before = event_file_size(logdir)
        start = time.perf_counter()
        emitter.write_result(result, 1)
        seconds = time.perf_counter() - start
        size = event_file_size(logdir) - before
        writer.close()
    return seconds, size


def throughput(result: MeasureResult, root: str, ours: int, stock: int) -> dict:
    runs = {"ours": [write_once(result, root) for _ in range(ours)]}
    with stock_writer_path():
        runs["stock"] = [write_once(result, root) for _ in range(stock)]
    figures = {}
    for path, pairs in runs.items():
        seconds = statistics.median(s for s, _ in pairs)
        figures[path] = {"repeats": len(pairs), "step_bytes": pairs[0][1], "seconds_median": seconds,
                         "mb_per_s": pairs[0][1] / 1e6 / seconds, "seconds": [s for s, _ in pairs]}
    figures["speedup"] = figures["stock"]["seconds_median"] / figures["ours"]["seconds_median"]
    return figures


class ToyTraining:
    """A small model's optimizer steps, timed one by one."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        self.optimizer = torch.optim.Adam(self.model.parameters())
        self.x, self.y = torch.randn(64, 256), torch.randint(0, 10, (64,))
        self.run_until(lambda n: n >= 200)  # warm up

    def run_until(self, done) -> list[float]:
        """Per-iteration seconds of iterations until ``done(iterations so far)``; at least one."""
        times: list[float] = []
        while True:
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            times.append(time.perf_counter() - start)
            if done(len(times)):
                return times


def latency(times: list[float]) -> dict:
    ms = np.array(times) * 1e3
    return {"iterations": len(ms), "median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def training_thread(result: MeasureResult, root: str, repeats: int) -> dict:
    toy = ToyTraining()
    runs = []
    with tempfile.TemporaryDirectory(dir=root) as logdir:
        probe = torch.randn(4, 3, 8, 8)
        monitor = tm.Monitor(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), probe, transforms.flips(), logdir=logdir,
                             every=1)
        monitor._measurement.run = lambda probe, classes=None: result  # step() is the hand-off only
        written = threading.Event()
        write_result = monitor._emitter.write_result

        def write_and_tell(*args, **kwargs):
            write_result(*args, **kwargs)
            written.set()

        monitor._emitter.write_result = write_and_tell
        monitor.step(0)  # the first step also writes the summary metadata
        written.wait()
        for r in range(repeats):
            written.clear()
            before = event_file_size(logdir)
            start = time.perf_counter()
            monitor.step(r + 1)
            handoff = time.perf_counter() - start
            during = toy.run_until(lambda n: written.is_set())
            seconds = time.perf_counter() - start
            quiet = toy.run_until(lambda n: n >= len(during))  # as many iterations, no write in flight
            quiet_figures, during_figures = latency(quiet), latency(during)
            runs.append({
                "handoff_ms": handoff * 1e3,
                "background_write_seconds": seconds,
                "background_mb_per_s": (event_file_size(logdir) - before) / 1e6 / seconds,
                "without_write": quiet_figures,
                "during_write": during_figures,
                "worst_increase_ms": during_figures["max_ms"] - quiet_figures["median_ms"],
                "p99_increase_ms": during_figures["p99_ms"] - quiet_figures["p99_ms"],
            })
        monitor.close()
    summary = {key: statistics.median(run[key] for run in runs)
               for key in ("handoff_ms", "background_write_seconds", "background_mb_per_s", "worst_increase_ms",
                           "p99_increase_ms")}
    for window in ("without_write", "during_write"):
        summary[window] = {key: statistics.median(run[window][key] for run in runs) for key in runs[0][window]}
    return {"repeats": repeats, **summary, "runs": runs, "references": references(toy, result, root)}


def references(toy: ToyTraining, result: MeasureResult, root: str) -> dict:
    """The loop with another process spinning on the other core, and with the stock path on another thread."""
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    time.sleep(0.2)
    busy_core = latency(toy.run_until(lambda n: n >= 600))
    spinner.kill()
    spinner.wait()
    with stock_writer_path(), tempfile.TemporaryDirectory(dir=root) as logdir:
        writer = SummaryWriter(logdir)
        stock = threading.Thread(target=SummaryEmitter(writer).write_result, args=(result, 1))
        start = time.perf_counter()
        stock.start()
        stock_thread = latency(toy.run_until(lambda n: not stock.is_alive()))
        stock_thread["seconds"] = time.perf_counter() - start
        writer.close()
    return {"other_core_busy": busy_core, "stock_path_on_another_thread": stock_thread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "writing.json"))
    parser.add_argument("--root", default=None, help="directory for the event files (default: the system temp dir)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stock-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import google_crc32c

    result = large_result()
    figures = {
        "commit": source_version(),
        "versions": {"torch": torch.__version__, "tensorboard": importlib.metadata.version("tensorboard"),
                     "google-crc32c": importlib.metadata.version("google-crc32c"),
                     "google_crc32c.implementation": google_crc32c.implementation,
                     "python": sys.version.split()[0]},
        "step": {"layers": LAYERS, "channels_per_layer": CHANNELS, "measures": result.measures},
        "load_average_before": os.getloadavg(),
        "throughput": throughput(result, args.root, ours=args.repeats, stock=args.stock_repeats),
        "training_thread": training_thread(result, args.root, args.repeats),
        "load_average_after": os.getloadavg(),
    }
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
