"""Route latency and response size of the Invariance plugin on a large log, under a real TensorBoard.

    python benchmarks/large_log.py benchmarks/.work/large_log     # ~5 min, 8 GiB (once)
    python benchmarks/bench_plugin.py benchmarks/.work/large_log  # ~15 min

For each data loader (the default Rust data server, ``--load_fast=true``, and the Python reader,
``--load_fast=false``), TensorBoard is started on 127.0.0.1, the benchmark waits until every step of
every run is loaded, then requests every route many times (random runs and steps, the way the tab asks:
``Accept-Encoding: gzip``) and records the median and p95 latency seen by the client, and the response
size (gzipped on the wire and JSON).
"""
from __future__ import annotations

import argparse
import gzip
import os
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from provenance import save_results, source_version  # noqa: E402
from tensorboard_process import TensorBoard  # noqa: E402

BASE = "/data/plugin/tm_invariance"


def request(url: str) -> tuple[float, int, int]:
    """(seconds, bytes on the wire, bytes of JSON) for one GET with gzip accepted."""
    start = time.perf_counter()
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=600) as response:
        body = response.read()
        encoded = response.headers.get("Content-Encoding") == "gzip"
    elapsed = time.perf_counter() - start
    return elapsed, len(body), len(gzip.decompress(body) if encoded else body)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_loader(logdir: Path, load_fast: str, repeats: int, steps: int, seed: int) -> dict:
    started = time.perf_counter()
    with TensorBoard(logdir, f"--load_fast={load_fast}", "--reload_interval=0", timeout=600) as tb:
        expected = len(list(logdir.iterdir()))
        runs = tb.wait_for(
            f"{BASE}/runs",
            lambda p: len(p["runs"]) == expected and all(r["max_step"] == steps - 1 for r in p["runs"]),
            timeout=3600,
        )["runs"]
        for entry in runs:  # every step of every run loaded
            tb.wait_for(f"{BASE}/layer_means?run={entry['run']}&namespace=invariance&measure=nvi",
                        lambda p: len(p["steps"]) == steps, timeout=3600)
        loaded = time.perf_counter() - started
        rng = random.Random(seed)
        names = [r["run"] for r in runs]

        def run_param() -> str:
            return f"run={rng.choice(names)}&namespace=invariance"

        routes = {
            "runs": lambda: "runs",
            "units (latest step)": lambda: f"units?{run_param()}&measure=nvi",
            "units (random step)": lambda: f"units?{run_param()}&measure=nvi&step={rng.randrange(steps)}",
            "layer_means (all steps)": lambda: f"layer_means?{run_param()}&measure=nvi",
            "accuracy (all steps)": lambda: f"accuracy?{run_param()}",
            "config": lambda: f"config?{run_param()}",
        }
        out = {}
        for name, path in routes.items():
            request(f"{tb.url}{BASE}/{path()}")  # warm up
            samples = [request(f"{tb.url}{BASE}/{path()}") for _ in range(repeats)]
            seconds = [s[0] for s in samples]
            out[name] = {
                "median_ms": 1000 * statistics.median(seconds),
                "p95_ms": 1000 * percentile(seconds, 0.95),
                "max_ms": 1000 * max(seconds),
                "wire_bytes_median": statistics.median(s[1] for s in samples),
                "json_bytes_median": statistics.median(s[2] for s in samples),
            }
        return {"load_fast": load_fast, "seconds_until_all_loaded": loaded, "runs": len(runs), "steps": steps,
                "repeats": repeats, "routes": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1000, help="steps per run in the log")
    parser.add_argument("--loaders", nargs="+", default=["true", "false"])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "plugin.json"))
    args = parser.parse_args()
    size = sum(f.stat().st_size for f in args.logdir.rglob("events.out.tfevents.*"))
    figures = {
        "commit": source_version(),
        "logdir_bytes": size,
        "load_average_before": os.getloadavg(),
        "loaders": [bench_loader(args.logdir, loader, args.repeats, args.steps, seed=0) for loader in args.loaders],
        "load_average_after": os.getloadavg(),
    }
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
