"""An ImageNet ResNet-50 at 224 px measured under a 4 GB memory budget: peak memory and time against the
forward-only floor of the same N·T images.

    python benchmarks/bench_resnet50.py                 # ~35 min on an idle 2-core machine
    python benchmarks/bench_resnet50.py --samples 16    # a quicker look

``examples.models.ResNet50`` (random weights, eval mode), a probe of N = 64 random 3×224×224 images, T = 16
rotations, the default measures (invariance + same-equivariance), ``batch_size=4`` (64 images per forward),
``memory_budget="4GB"``, two cases:

- width 1, ``positions="auto"``: the measurement chooses how to fit (float32 states, then sampled positions,
  then passes); what it chose is recorded;
- width 0.25 with exact states: ``state_dtype=torch.float64``, every position.
- (``--cases "width 0.25, exact float64 states, no budget"``) the same without ``memory_budget=``: the heap
  then keeps blocks above 32 MB while measuring (``tm_tensorboard/heap.py``), which a budget does not allow.

Every run is a fresh process: its peak memory is the growth of its resident set (``ru_maxrss``) over what
the model and the probe took before it. A measurement run makes the ``tm.Monitor``'s preparation first
(the layers, the memory plan, compiling the fused statistics on two samples; recorded apart, as
``prepare_s``), then times ``measure()`` on the whole probe; its peak covers both. A floor run forwards the
same transformed images (made beforehand) in the same chunks without hooks (eval, no autograd), then
again with the C heap as a measurement keeps it (``kept_heap_s``: no activation page-faulted in anew,
the forwards at their best, as ``bench_fused.py``'s floor). Floor and
measurement runs alternate, ``--repeats`` of each; medians. Results in ``results/resnet50.json``.

The ratio is against the floor forwarded again *in the measurement's process*, after it (``floor_after_s``):
a fresh process's forwards page-fault every activation above glibc's mmap threshold in anew each time
(1.7 M faults and 2.2× the time at width 0.25, 16 samples), while the measurement's process has a heap its
states left free, which the forwards reuse. Comparing the measurement with a fresh process's floor would
credit it with the allocator's state; that ratio is recorded too (``ratio_to_fresh_process_floor``), with
page-fault counts of every timed part. How much of both is the allocator: run it again with glibc keeping
freed memory (README, "CPU: glibc's allocator and page faults"), e.g.
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=17179869184 python
benchmarks/bench_resnet50.py --output benchmarks/results/resnet50_tunables.json``, or with jemalloc
(Debian's ``libjemalloc2``): ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python
benchmarks/bench_resnet50.py`` (recorded as ``ld_preload``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "resnet50.json"
T = 16
CASES = {
    "width 1, automatic choice": dict(width=1.0, keywords=dict(positions="auto")),
    "width 0.25, exact float64 states": dict(width=0.25, keywords=dict(state_dtype="float64")),
    # (not by default) without memory_budget=, whose heap keeps blocks above 32 MB while measuring (heap.py)
    "width 0.25, exact float64 states, no budget": dict(width=0.25, keywords=dict(state_dtype="float64"), budget=None),
}
DEFAULT_CASES = ("width 1, automatic choice", "width 0.25, exact float64 states")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def timed(run: Callable[[], Any]) -> tuple[float, int, Any]:
    """Seconds and minor page faults (``ru_minflt``) that ``run()`` took, and what it returned."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    value = run()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, value


def child(case: str, kind: str, samples: int, batch_size: int, budget: str) -> dict:
    """One run in this process: the floor or the measurement of ``case``."""
    import tm_tensorboard as tm
    from tm_tensorboard import block_pool, heap
    from tm_tensorboard.engine import Measurement
    from tm_tensorboard.examples.models import ResNet50
    from tm_tensorboard.probe import as_probe

    torch.manual_seed(0)
    model = ResNet50(width=CASES[case]["width"]).eval()
    probe = torch.rand(samples, 3, 224, 224)
    tset = tm.transforms.rotations(T)
    baseline = resident_bytes()
    out: dict = {}
    def forwards() -> Callable[[], None]:
        """The floor: the transformed images made beforehand (untimed), then the forwards alone."""
        chunks = [tset.apply(probe[lo:lo + batch_size]) for lo in range(0, samples, batch_size)]

        def run() -> None:
            with torch.no_grad():
                for images in chunks:
                    model(images)
        return run

    if kind == "floor":
        out["seconds"], out["page_faults"], _ = timed(forwards())
        with heap.freed_memory_kept():  # the forwards at their best: the heap as a measurement keeps it
            forwards()()  # (its first pass grows the heap)
            out["kept_heap_s"], out["kept_heap_page_faults"], _ = timed(forwards())
    else:
        keywords = dict(CASES[case]["keywords"])
        if "state_dtype" in keywords:
            keywords["state_dtype"] = getattr(torch, keywords["state_dtype"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            budget = CASES[case].get("budget", budget)
            session = Measurement(model, tset, batch_size=batch_size, memory_budget=budget, **keywords)
            whole = as_probe(probe)
            passes = session.passes(whole, None)
            session.warm_up(whole)  # what tm.Monitor does when it is made
            out["prepare_s"] = time.perf_counter() - start
            out["seconds"], out["page_faults"], result = timed(lambda: session.run(whole))
        report = session.estimate_memory(whole, None)
        out.update(
            layers=len(result.layers),
            passes=len(passes) if passes else 1,
            state_dtype=str(session.options.state_dtype).removeprefix("torch."),
            positions=session.positions,
            sampled_layers=sum(result.layer_info(layer).positions is not None for layer in result.layers),
            error_bars=session.shards(whole, None),
            estimated_state_bytes=report.state_bytes,
            estimated_working_bytes=report.working_bytes,
            warnings=[str(w.message) for w in caught if "memory" in str(w.message)],  # what fitting the budget did
            block_pool=block_pool.statistics(),  # blocks above 32 MB under a budget: reused, mapped, peak mapped
        )
    out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    if kind == "measure":  # the floor again, in this process: its heap as the measurement left it
        del result, session  # (a session keeps its states' memory for its next measurement: kept_states.py)
        out["floor_after_s"], out["floor_after_page_faults"], _ = timed(forwards())
    return out


def run_child(case: str, kind: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", case, kind, "--samples", str(args.samples),
               "--batch-size", str(args.batch_size), "--budget", args.budget]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--budget", default="4GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), choices=list(CASES))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "KIND"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.samples, args.batch_size, args.budget)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import environment, save_results

    figures: dict = {"environment": environment(), "samples": args.samples, "T": T, "batch_size": args.batch_size,
                     "memory_budget": args.budget, "repeats": args.repeats, "cases": {},
                     "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # inherited by every run
                     "ld_preload": os.environ.get("LD_PRELOAD")}  # another allocator, e.g. jemalloc's
    for case in args.cases:
        floors, runs = [], []
        for _ in range(args.repeats):
            floors.append(run_child(case, "floor", args))
            runs.append(run_child(case, "measure", args))
            print(case, floors[-1], {k: v for k, v in runs[-1].items() if k != "warnings"}, flush=True)
        floor = statistics.median(r["seconds"] for r in floors)
        warm_floor = statistics.median(r["floor_after_s"] for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        figures["cases"][case] = {
            "width": CASES[case]["width"],
            "memory_budget": CASES[case].get("budget", args.budget),
            "floor_s": floor,
            "floor_after_s": warm_floor,
            "measure_s": seconds,
            "ratio": seconds / warm_floor,
            "ratio_to_fresh_process_floor": seconds / floor,
            "kept_heap_floor_s": statistics.median(r["kept_heap_s"] for r in floors),
            "ratio_to_kept_heap_floor": seconds / statistics.median(r["kept_heap_s"] for r in floors),
            "page_faults": {"floor": statistics.median(r["page_faults"] for r in floors),
                            "kept_heap_floor": statistics.median(r["kept_heap_page_faults"] for r in floors),
                            "measure": statistics.median(r["page_faults"] for r in runs),
                            "floor_after": statistics.median(r["floor_after_page_faults"] for r in runs)},
            "prepare_s": statistics.median(r["prepare_s"] for r in runs),
            "peak_gb": statistics.median(r["peak_bytes"] for r in runs) / 1e9,
            "floor_peak_gb": statistics.median(r["peak_bytes"] for r in floors) / 1e9,
            "floor_runs_s": [r["seconds"] for r in floors],
            "measure_runs_s": [r["seconds"] for r in runs],
            "peak_runs_gb": [r["peak_bytes"] / 1e9 for r in runs],
            "chosen": {k: runs[-1][k] for k in ("layers", "passes", "state_dtype", "positions", "sampled_layers",
                                                "error_bars", "estimated_state_bytes", "estimated_working_bytes")},
            "warnings": runs[-1]["warnings"],
            "block_pool": [r.get("block_pool") for r in runs],
        }
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
