"""Per-transformation measures and error bars: what they cost, and how big a probe must be.

    python benchmarks/bench_errors.py            # ~10 min on an idle 2-core machine

1. Cost on the reference case of bench_engine.py (13 layers, N = 256, T = 16 rotations, batch_size 64,
   CPU, 2 threads), every variant once per repetition in turn, medians of ``--reps``, ratios within one
   run: ``measure()`` with the invariance group alone and with the default measures, each without error
   bars (``error_bars=False``), with the default ones (8 shards), and with ``per_transformation`` added
   (ie_t). Compiled kernels, compiled before the timed part. The states' bytes with and without error
   bars (a shard's states next to the totals).
2. Probe size: on the example SimpleCNN (3×32×32, a fixed random initialization), probes of N uniform
   random images for N in 16 … 1,024 and T in 4, 16 rotations: the standard error the probe reports of
   each layer's mean nvi and of each layer's ie_t (averaged over the transformations other than the
   identity), the median over the layers, against N (one probe each; at N < 32 there are no shards).
3. Calibration: on the same SimpleCNN with T = 4 rotations, for three layers (the first convolution and two
   ReLUs), the spread (sd) of the layer mean nvi over independent probes of N = 128 (16 probes)
   and N = 1,024 (8 probes), against the mean of the standard errors those probes report.

``--parts`` runs some of them; the others' figures already in the results file are kept.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import tm_tensorboard as tm
from bench_engine import Net, warm_allocator
from provenance import environment, save_results
from tm_tensorboard.examples.models import SimpleCNN

RESULTS = Path(__file__).resolve().parent / "results" / "errors.json"
THREADS = 2
DEFAULT = ("invariance", "same_equivariance")
TARGETS = {"per_transformation_added": 0.10, "error_bars_added": 0.10}


def state_bytes(model: torch.nn.Module, probe: torch.Tensor, measures, error_bars) -> int:
    """Bytes of every streaming state (the totals and, with error bars, the shard being streamed)."""
    from tm_tensorboard.engine import Measurement
    from tm_tensorboard.probe import as_probe

    session = Measurement(model, tm.transforms.rotations(16), measures=measures, batch_size=64, error_bars=error_bars)
    samples = as_probe(probe)
    probe_order, shards = session.interleaved(samples)
    observers, _ = session._stream_phases(probe_order, None, shards=shards)
    total = 0
    for observer in observers.values():
        for m in observer.measures.values():
            for states in m.per_class + (m.totals or []):
                total += sum(t.nbytes + s.count.nbytes for s in states.values() for t in s.tensors())
    return total


def cost(reps: int) -> dict:
    model = Net().eval()
    probe = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tset = tm.transforms.rotations(16)
    variants: dict[str, Callable[[], object]] = {}
    for name, measures in (("invariance", ("invariance",)), ("default", DEFAULT)):
        variants[f"{name}_no_error_bars"] = lambda m=measures: tm.measure(model, probe, tset, measures=m, batch_size=64,
                                                                        compile=True, error_bars=False)
        variants[f"{name}_error_bars"] = lambda m=measures: tm.measure(model, probe, tset, measures=m, batch_size=64,
                                                                     compile=True, error_bars=True)
        variants[f"{name}_per_transformation"] = lambda m=measures: tm.measure(
            model, probe, tset, measures=m + ("per_transformation",), batch_size=64, compile=True, error_bars=False)
    for run in variants.values():  # compile and warm up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    out = {"seconds": median, "runs": times}
    for name in ("invariance", "default"):
        base = median[f"{name}_no_error_bars"]
        out[f"{name}_error_bars_added"] = median[f"{name}_error_bars"] / base - 1
        out[f"{name}_per_transformation_added"] = median[f"{name}_per_transformation"] / base - 1
    out["state_bytes"] = {
        f"{name}_{'error_bars' if bars else 'no_error_bars'}": state_bytes(model, probe, measures, bars)
        for name, measures in (("invariance", ("invariance",)), ("default", DEFAULT)) for bars in (False, True)
    }
    return out


def probe_size_study() -> dict:
    torch.manual_seed(0)
    model = SimpleCNN(3, 10).eval()
    rows = []
    for t in (4, 16):
        tset = tm.transforms.rotations(t)
        for n in (16, 32, 64, 128, 256, 512, 1024):
            probe = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
            result = tm.measure(model, probe, tset, measures=("invariance", "per_transformation"), batch_size=32,
                                compile=True, error_bars=True)
            row = {"T": t, "N": n, "shards": result.shards}
            if result.shards:
                nvi = [result.stderr("nvi", layer) for layer in result.layers]
                ie = [np.nanmean(result.stderr("ie_t", layer)[1:]) for layer in result.layers]  # rows ≠ identity
                means = [result.layer_means("nvi")[layer] for layer in result.layers]
                row.update(nvi_stderr_median=float(np.nanmedian(nvi)), ie_t_stderr_median=float(np.nanmedian(ie)),
                           nvi_mean_median=float(np.nanmedian(means)))
            rows.append(row)
            print(row, flush=True)
    return {"model": "SimpleCNN(3, 10), uniform random 3x32x32 probes", "rows": rows}


def calibration() -> dict:
    torch.manual_seed(0)
    model = SimpleCNN(3, 10).eval()
    layers = ["features.0", "features.3", "features.8"]
    out = {"model": "SimpleCNN(3, 10), uniform random 3x32x32 probes, rotations(4)", "layers": layers, "rows": []}
    for n, probes in ((128, 16), (1024, 8)):
        means, errors = [], []
        for k in range(probes):
            probe = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1000 * k + n))
            result = tm.measure(model, probe, tm.transforms.rotations(4), measures=("invariance",), batch_size=64,
                                layers=layers, error_bars=True)
            means.append(list(result.layer_means("nvi").values()))
            errors.append(list(result.layer_stderrs("nvi").values()))
        spread, reported = np.std(means, axis=0, ddof=1), np.mean(errors, axis=0)
        row = {"N": n, "probes": probes, "spread": spread.tolist(), "reported": reported.tolist(),
               "reported_over_spread": (reported / spread).tolist()}
        out["rows"].append(row)
        print(row, flush=True)
    return out


PARTS = {"cost": None, "probe_size": probe_size_study, "calibration": calibration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warm_allocator()
    output = Path(args.output)
    figures = json.loads(output.read_text()) if output.exists() and len(args.parts) < len(PARTS) else {}
    figures["targets"] = TARGETS
    for part in args.parts:
        result = cost(args.reps) if part == "cost" else PARTS[part]()
        figures[part] = {"environment": environment(), **result}
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
