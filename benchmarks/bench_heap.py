"""The C heap while measuring (``tm_tensorboard/heap.py``): measure() with the freed memory kept and without.

    python benchmarks/bench_heap.py            # ~10 min on an idle 2-core machine

The setting is process-wide and, once made, stays made (glibc stops adjusting its thresholds), so the two
sides cannot share a process: each run is a fresh process, with TM_TENSORBOARD_KEEP_FREED_MEMORY=1 (the
default) or 0, alternated, ``--runs`` of each. In a run: the forward floor (the transformed images through
the model, chunk by chunk, no hooks, with the heap as that side sets it for a measurement) and
``measure()`` with error bars as by default and without, every method once per repetition in turn,
4 repetitions after one untimed call each; medians, and the median page faults (``ru_minflt``) of each.
Cases: ResNet18Style(0.25) at 32 px (N = 128) and the reference case of bench_engine.py (N = 256), T = 16
rotations, compiled, 2 threads; ``--measures`` (invariance), ``--batch-sizes`` (16), ``--cases``. Results
in ``results/heap.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from provenance import environment, save_results

RESULTS = Path(__file__).resolve().parent / "results" / "heap.json"
CASES = ("ResNet18Style_w0.25_32px", "reference")

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, {benchmarks!r})
    import numpy as np
    block = np.ones(64 << 20, dtype=np.uint8); del block  # the allocator as in training (bench_fused.py)
    import torch
    torch.set_num_threads(2)
    import tm_tensorboard as tm
    from tm_tensorboard import heap
    from bench_engine import Net
    from tm_tensorboard.examples.models import ResNet18Style
    torch.manual_seed(0)
    if {case!r} == "ResNet18Style_w0.25_32px":
        model, probe = ResNet18Style(3, 10, width=0.25).eval(), torch.rand(128, 3, 32, 32)
    else:
        model, probe = Net().eval(), torch.rand(256, 3, 32, 32)
    tset = tm.transforms.rotations(16)
    images = [tset.apply(chunk) for chunk in probe.split({batch_size})]

    def floor():  # with the heap as a measurement sets it (or not, as the run says): the forward at its best
        with torch.no_grad(), heap.freed_memory_kept():
            for x in images:
                model(x)

    def measure(error_bars):
        return lambda: tm.measure(model, probe, tset, measures={measures!r}, batch_size={batch_size}, compile=True,
                                  error_bars=error_bars, dedupe_batchnorm=False)

    methods = {{"floor": floor, "error_bars": measure(None), "no_error_bars": measure(False)}}
    for run in methods.values():
        run()
    seconds = {{name: [] for name in methods}}
    faults = {{name: [] for name in methods}}
    for _ in range(4):
        for name, run in methods.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({{"seconds": seconds, "faults": faults}}))
    """
)


def run_child(case: str, batch_size: int, measures: tuple[str, ...], keep: bool) -> dict:
    script = _CHILD.format(benchmarks=str(Path(__file__).resolve().parent), case=case, batch_size=batch_size,
                           measures=measures)
    env = {**os.environ, "TM_TENSORBOARD_KEEP_FREED_MEMORY": "1" if keep else "0"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="processes of each side")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    parser.add_argument("--measures", nargs="+", default=["invariance"])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    figures: dict = {"environment": environment(), "measures": args.measures, "cases": {}}
    for case in args.cases:
        for batch_size in args.batch_sizes:
            runs = {"kept": [], "not_kept": []}
            for _ in range(args.runs):
                for side, keep in (("kept", True), ("not_kept", False)):
                    runs[side].append(run_child(case, batch_size, tuple(args.measures), keep))
            summary = {}
            for side, results in runs.items():
                summary[side] = {
                    name: {
                        "median_s": statistics.median(s for r in results for s in r["seconds"][name]),
                        "median_faults": statistics.median(f for r in results for f in r["faults"][name]),
                        "run_medians_s": [statistics.median(r["seconds"][name]) for r in results],
                    }
                    for name in results[0]["seconds"]
                }
                floor = summary[side]["floor"]["median_s"]
                for name in summary[side]:
                    summary[side][name]["over_floor"] = summary[side][name]["median_s"] / floor
            for name in ("error_bars", "no_error_bars"):
                summary[f"{name}_kept_over_not_kept"] = (summary["kept"][name]["median_s"]
                                                         / summary["not_kept"][name]["median_s"])
            figures["cases"][f"{case}/b{batch_size}"] = {"summary": summary, "runs": runs}
            print(case, batch_size, json.dumps({side: {n: [round(v["median_s"], 2), round(v["over_floor"], 2),
                                                            int(v["median_faults"])]
                                                        for n, v in summary[side].items()}
                                                for side in ("kept", "not_kept")}), flush=True)
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
