"""Per-transformation measures and error bars: what they cost, and how big a probe must be.

    python benchmarks/bench_errors.py            # ~40 min on a busy 2-core machine

1. Cost on the reference case of bench_engine.py (13 layers, N = 256, T = 16 rotations, CPU, 2 threads)
   at batch_size 4, 16 (the default) and 64 (64, 256 and 1,024 images per forward), every variant once
   per repetition in turn, medians of ``--reps``, ratios within one run: ``measure()`` with the invariance
   group alone and with the default measures, each without error bars (``error_bars=False``), with the
   default ones (8 shards), and with ``per_transformation`` added (ie_t); each also as a session run
   again (``Measurement.run``, a Monitor's steps: the states' memory kept between measurements,
   ``kept_states.py``). Compiled kernels, compiled before the timed part. The states' bytes with and
   without error bars (with them: the totals and every shard's, K + 1 sets, kept for the jackknife).
2. Probe size: on an example model trained briefly on real data (SimpleCNN(1, 10), 2 epochs of Adam with a
   fixed seed on scikit-learn's 1,797 8×8 digits upsampled bilinearly to 1×32×32), for T in 4, 16 rotations
   (zero padding) and N in 16 … 1,024 (… 128 at T = 16, for time): 3 probes per N drawn without
   replacement from the digits; the standard error each probe reports of each layer's mean nvi and of each
   layer's ie_t (averaged over the transformations other than the identity), the median over probes and
   layers (and per layer kind: conv, ReLU, pool, linear), against N; the slope of log se against log N and
   c in se ≈ c / √N. At N = 16 there are no shards (a shard needs 16 samples), at 32 two, at 64 four.
3. Calibration: on the example SimpleCNN(3, 10) at a fixed random initialization, uniform random 3×32×32
   probes, T = 4 rotations, for three layers (the first convolution and two
   ReLUs), the spread (sd) of the layer mean nvi over independent probes of N = 128 (48 probes)
   and N = 1,024 (16 probes), against the mean of the standard errors those probes report; and the same
   with the robust counterparts (the quartiles' spread / 1.349, the median reported error), which a few
   probes with an extreme layer mean (a channel that fires in a handful of samples) do not dominate.

4. A process's first call (``--parts first_call``): measure() keeps its states' memory for its next call
   (``kept_states.py``), so the cost part's one-off calls, which follow a call of the same variant, find
   it there. Here each run is a new process that measures another model first (SimpleCNN(3, 10): the CPU
   kernels loaded, the heap grown, none of the reference case's state blocks kept), then times one
   measure() of the reference case at batch_size 4 (its 64 images per forward) and 16 (the default),
   ``compile=None`` (the default), with and without error bars, invariance and the default measures: ``--reps``
   processes a variant, each with-and-without pair run back to back (which goes first alternating from one
   repetition to the next), so that each pair's ratio sees the same minutes of a noisy machine; the medians of
   the processes' times and the median of the pairs' ratios: what error bars add where their states are paged in.

``--parts`` runs some of them; the others' figures already in the results file are kept.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import tm_tensorboard as tm
from bench_engine import Net, interleaved, warm_allocator
from provenance import environment, save_results
from tm_tensorboard import native
from tm_tensorboard.engine import Measurement
from tm_tensorboard.probe import as_probe
from tm_tensorboard.examples.models import SimpleCNN

RESULTS = Path(__file__).resolve().parent / "results" / "errors.json"
THREADS = 2
DEFAULT = ("invariance", "same_equivariance")
TARGETS = {"per_transformation_added": 0.10, "error_bars_added": 0.10}
BATCH_SIZES = (4, 16, 64)  # probe samples per chunk: 64 images per forward (tmeasures' batch), the default, 1,024


def state_bytes(model: torch.nn.Module, probe: torch.Tensor, measures, error_bars) -> int:
    """Bytes of every streaming state (with error bars: every shard's, kept for the jackknife)."""
    from tm_tensorboard.engine import Measurement
    from tm_tensorboard.memory import measure_state_bytes
    from tm_tensorboard.probe import as_probe

    session = Measurement(model, tm.transforms.rotations(16), measures=measures, batch_size=64, error_bars=error_bars)
    samples = as_probe(probe)
    probe_order, shards = session.interleaved(samples, None)
    observers, _ = session._stream_phases(probe_order, None, shards=shards)
    return sum(measure_state_bytes(m) for observer in observers.values() for m in observer.measures.values())


def cost(reps: int, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict:
    model = Net().eval()
    probe = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tset = tm.transforms.rotations(16)
    samples = as_probe(probe)  # what the sessions run on (measure() makes it from the tensor each call)
    variants: dict[str, Callable[[], object]] = {}
    for b in batch_sizes:
        for name, measures in (("invariance", ("invariance",)), ("default", DEFAULT)):
            run = lambda m, bars, b=b: tm.measure(model, probe, tset, measures=m, batch_size=b,  # noqa: E731
                                                  compile=True, error_bars=bars)
            variants[f"b{b}_{name}_no_error_bars"] = lambda m=measures, run=run: run(m, False)
            variants[f"b{b}_{name}_error_bars"] = lambda m=measures, run=run: run(m, True)
            variants[f"b{b}_{name}_per_transformation"] = lambda m=measures, run=run: run(m + ("per_transformation",), False)
            for label, m, bars in (("no_error_bars", measures, False), ("error_bars", measures, True),
                                   ("per_transformation", measures + ("per_transformation",), False)):
                session = Measurement(model, tset, measures=m, batch_size=b, compile=True, error_bars=bars)
                variants[f"b{b}_{name}_{label}_session"] = lambda s=session: s.run(samples)
    for run in variants.values():  # compile and warm up (and give each session its first measurement)
        run()
    times = interleaved(variants, reps)
    median = {name: statistics.median(t) for name, t in times.items()}
    out = {"batch_sizes": list(batch_sizes), "seconds": median, "runs": times}
    for b in batch_sizes:
        for name in ("invariance", "default"):
            base = median[f"b{b}_{name}_no_error_bars"]
            out[f"b{b}_{name}_error_bars_added"] = median[f"b{b}_{name}_error_bars"] / base - 1
            out[f"b{b}_{name}_per_transformation_added"] = median[f"b{b}_{name}_per_transformation"] / base - 1
            base = median[f"b{b}_{name}_no_error_bars_session"]  # a session run again: a Monitor's steps
            out[f"b{b}_{name}_error_bars_added_session"] = median[f"b{b}_{name}_error_bars_session"] / base - 1
            out[f"b{b}_{name}_per_transformation_added_session"] = (
                median[f"b{b}_{name}_per_transformation_session"] / base - 1)
    out["state_bytes"] = {
        f"{name}_{'error_bars' if bars else 'no_error_bars'}": state_bytes(model, probe, measures, bars)
        for name, measures in (("invariance", ("invariance",)), ("default", DEFAULT)) for bars in (False, True)
    }
    return out


PROBE_SIZES = (16, 32, 64, 128, 256, 512, 1024)
PROBE_TS = (4, 16)
PROBE_MAX_N = {4: 1024, 16: 128}  # T = 16 stops at 128, for time: 256 … 1,024 × 16 rotations × 3 probes is ~25 min on a busy machine
PROBES_PER_SIZE = 3
LAYER_KINDS = {torch.nn.Conv2d: "conv", torch.nn.ReLU: "relu", torch.nn.Linear: "linear", torch.nn.MaxPool2d: "pool",
               torch.nn.AdaptiveAvgPool2d: "pool"}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1,797 real 8×8 handwritten digits, 0 … 16), in [0, 1], upsampled bilinearly to
    1×32×32: a zero background, so rotations with zero padding add no border."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    return images, torch.tensor(data.target, dtype=torch.long)


def trained_digits_model(images: torch.Tensor, labels: torch.Tensor, epochs: int = 2) -> tuple[torch.nn.Module, dict]:
    """SimpleCNN(1, 10) trained briefly on the digits (fixed seed, Adam, batches of 64): an example model whose
    layers have learnt something, with the seconds and the train accuracy it took."""
    torch.manual_seed(0)
    model = SimpleCNN(1, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=order).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    return model, {"epochs": epochs, "optimizer": "Adam(lr=2e-3), batches of 64", "train_seconds": time.perf_counter() - start,
                   "train_accuracy": accuracy}


def loglog_slope(ns: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(N)."""
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def probe_size_study() -> dict:
    images, labels = digits()
    model, training = trained_digits_model(images, labels)
    print(training, flush=True)
    kinds = {name: LAYER_KINDS.get(type(module), type(module).__name__) for name, module in model.named_modules()}
    rows = []
    for t in PROBE_TS:
        tset = tm.transforms.rotations(t, padding="zeros")
        for n in (n for n in PROBE_SIZES if n <= PROBE_MAX_N[t]):
            nvi_se, ie_se, means, layer_kinds, shards = [], [], [], None, 0
            for seed in range(PROBES_PER_SIZE):
                pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(100 * seed + n))[:n]
                result = tm.measure(model, images[pick], tset, measures=("invariance", "per_transformation"),
                                    batch_size=32, error_bars=True)
                shards = result.shards
                layers = result.layers_of("nvi")
                layer_kinds = [kinds.get(layer, "other") for layer in layers]
                means.append([result.layer_means("nvi")[layer] for layer in layers])
                if shards:
                    nvi_se.append([result.stderr("nvi", layer) for layer in layers])
                    ie_se.append([float(np.nanmean(result.stderr("ie_t", layer)[1:])) for layer in layers])  # ≠ identity
            means = np.array(means)  # [probes, layers]
            row = {"T": t, "N": n, "shards": shards, "layers": len(layer_kinds),
                   "nvi_mean_median": float(np.nanmedian(means))}
            if shards:
                nvi_se, ie_se = np.array(nvi_se), np.array(ie_se)
                # the spread of each layer mean over the probes (3 only: rough), with the finite-population
                # correction of probes drawn from 1,797 digits, against the mean error they report
                spread = means.std(axis=0, ddof=1) / np.sqrt(1 - n / len(images))
                row.update(
                    nvi_stderr_median=float(np.nanmedian(nvi_se)), ie_t_stderr_median=float(np.nanmedian(ie_se)),
                    nvi_stderr_times_sqrt_n=float(np.nanmedian(nvi_se) * np.sqrt(n)),
                    by_kind={kind: {"layers": layer_kinds.count(kind),
                                    "nvi_stderr_median": float(np.nanmedian(nvi_se[:, [k == kind for k in layer_kinds]])),
                                    "ie_t_stderr_median": float(np.nanmedian(ie_se[:, [k == kind for k in layer_kinds]])),
                                    "nvi_mean_median": float(np.nanmedian(means[:, [k == kind for k in layer_kinds]]))}
                             for kind in sorted(set(layer_kinds))},
                    reported_over_spread_median=float(np.nanmedian(nvi_se.mean(axis=0) / spread)),
                )
            rows.append(row)
            print({k: v for k, v in row.items() if k != "by_kind"}, flush=True)
    fits = {}
    for t in PROBE_TS:
        for label, low in (("N>=32", 32), ("N>=128 (8 shards)", 128)):
            chosen = [r for r in rows if r["T"] == t and r["N"] >= low and r["shards"]]
            ns = [r["N"] for r in chosen]
            if len(set(ns)) < 2:  # no slope from one N
                continue
            fits[f"T={t}, {label}"] = {
                "nvi_slope": loglog_slope(ns, [r["nvi_stderr_median"] for r in chosen]),
                "ie_t_slope": loglog_slope(ns, [r["ie_t_stderr_median"] for r in chosen]),
                # c in se ≈ c / √N, from the N with 8 shards
                "nvi_c": float(np.median([r["nvi_stderr_times_sqrt_n"] for r in chosen])),
                "ie_t_c": float(np.median([r["ie_t_stderr_median"] * np.sqrt(r["N"]) for r in chosen])),
            }
    t_ratio = {str(n): {m: next(r[m] for r in rows if r["T"] == 16 and r["N"] == n)
                           / next(r[m] for r in rows if r["T"] == 4 and r["N"] == n)
                        for m in ("nvi_stderr_median", "ie_t_stderr_median")}
               for n in PROBE_SIZES if 32 <= n <= min(PROBE_MAX_N.values())}
    return {"model": "SimpleCNN(1, 10) trained on sklearn digits (1x32x32, bilinear from 8x8); "
                     f"{PROBES_PER_SIZE} probes per N drawn without replacement; rotations(T, padding='zeros')",
            "training": training, "fits": fits, "T16_over_T4": t_ratio, "rows": rows}


def calibration() -> dict:
    torch.manual_seed(0)
    model = SimpleCNN(3, 10).eval()
    layers = ["features.0", "features.3", "features.8"]
    out = {"model": "SimpleCNN(3, 10), uniform random 3x32x32 probes, rotations(4)", "layers": layers, "rows": []}
    for n, probes in ((128, 48), (1024, 16)):
        means, errors = [], []
        for k in range(probes):
            probe = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1000 * k + n))
            result = tm.measure(model, probe, tm.transforms.rotations(4), measures=("invariance",), batch_size=64,
                                layers=layers, error_bars=True)
            means.append(list(result.layer_means("nvi").values()))
            errors.append(list(result.layer_stderrs("nvi").values()))
        means, errors = np.array(means), np.array(errors)
        spread, reported = means.std(axis=0, ddof=1), errors.mean(axis=0)
        quartiles = (np.percentile(means, 75, axis=0) - np.percentile(means, 25, axis=0)) / 1.349  # a robust sd
        row = {"N": n, "probes": probes, "spread": spread.tolist(), "reported": reported.tolist(),
               "reported_over_spread": (reported / spread).tolist(), "spread_from_quartiles": quartiles.tolist(),
               "median_reported_over_spread_from_quartiles": (np.median(errors, axis=0) / quartiles).tolist()}
        out["rows"].append(row)
        print(row, flush=True)
    return out


_FIRST_CALL_CHILD = """
import json, sys, time
sys.path.insert(0, {benchmarks!r})
import numpy as np
import torch
block = np.ones(64 << 20, dtype=np.uint8); del block  # the allocator as in training (bench_fused.py)
torch.set_num_threads({threads})
import tm_tensorboard as tm
from bench_engine import Net
from tm_tensorboard.examples.models import SimpleCNN
tset = tm.transforms.rotations(16)
torch.manual_seed(0)
tm.measure(SimpleCNN(3, 10).eval(), torch.rand(32, 3, 32, 32), tset, measures={measures!r}, error_bars={bars!r})
model = Net().eval()
probe = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
tm.measure(model, probe, tset, measures={measures!r}, error_bars={bars!r}, batch_size={batch_size})
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def first_call(reps: int = 3, batch_sizes: tuple[int, ...] = (4, 16)) -> dict:
    """A process's first measure() of the reference case, with and without error bars (item 4), at batch_size 4
    (the reference case's 64 images per forward) and 16 (the default). The CPU kernels are built here first, as
    they are on a machine after its first process that built them: a process that finds none built measures
    this case with compiled or eager code instead (``measure(compile=None)``), which is not what this part times."""
    stored_before = native.stored()
    native.build_all()
    runs: dict[str, list[float]] = {}
    for rep in range(reps):
        for b in batch_sizes:
            for name, measures in (("invariance", ("invariance",)), ("default", DEFAULT)):
                pair = (("no_error_bars", False), ("error_bars", None))
                for label, bars in pair if rep % 2 == 0 else pair[::-1]:
                    script = _FIRST_CALL_CHILD.format(benchmarks=str(Path(__file__).resolve().parent),
                                                      threads=THREADS, measures=measures, bars=bars, batch_size=b)
                    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                                          text=True, timeout=1800, check=True)
                    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
                    runs.setdefault(f"b{b}_{name}_{label}", []).append(seconds)
    out: dict = {"kernels_built_before": stored_before, "kernels_built": native.stored(),
                 "batch_sizes": list(batch_sizes), "runs": runs,
                 "seconds": {k: statistics.median(v) for k, v in runs.items()}}
    for b in batch_sizes:
        for name in ("invariance", "default"):
            cell = f"b{b}_{name}"
            seconds = out["seconds"]
            out[f"{cell}_error_bars_added"] = seconds[f"{cell}_error_bars"] / seconds[f"{cell}_no_error_bars"] - 1
            pairs = zip(runs[f"{cell}_error_bars"], runs[f"{cell}_no_error_bars"])
            out[f"{cell}_error_bars_added_paired"] = statistics.median(w / wo - 1 for w, wo in pairs)
    print(json.dumps(out, indent=1), flush=True)
    return out


PARTS: dict[str, Callable[[int], dict]] = {"cost": cost, "probe_size": lambda reps: probe_size_study(),
                                           "calibration": lambda reps: calibration(), "first_call": first_call}


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
        result = PARTS[part](args.reps)
        figures[part] = {"environment": environment(), **result}
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
