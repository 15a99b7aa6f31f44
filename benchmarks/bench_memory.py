"""The streaming states of an ImageNet ResNet-50 at 224 px, as ``tm.estimate_memory`` computes them.

    python benchmarks/bench_memory.py          # seconds: everything on the meta device, no weights

``examples.models.ResNet50`` (width 1) and a probe of N = 64 images 3×224×224 built on the ``meta`` device,
T = 16 rotations, ``batch_size=4``: the bytes of every observed layer's states (exact: built as the
measures allocate them; tests/test_memory.py checks the estimate against allocated states) for the
measure sets, state dtypes, error bars, BatchNorm dedupe and sampled positions of the README's memory
table, the number
of passes ``memory_budget="8GB"`` would take, and what ``memory_budget=`` with ``positions="auto"`` chooses
by itself (state dtype, positions per channel). Results in ``results/memory.json``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

import tm_tensorboard as tm
from provenance import environment, save_results
from tm_tensorboard.engine import Measurement
from tm_tensorboard.probe import as_probe
from tm_tensorboard.examples.models import ResNet50

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
DEFAULT = ("invariance", "same_equivariance")
F64 = torch.float64
CASES = {
    # dedupe_batchnorm=False: all 158 layers; the default leaves out the 53 BatchNorms (105 layers)
    "invariance, float64": dict(measures=("invariance",), dedupe_batchnorm=False, error_bars=False, state_dtype=F64),
    "default, float64": dict(measures=DEFAULT, dedupe_batchnorm=False, error_bars=False, state_dtype=F64),
    "default, float64, error bars": dict(measures=DEFAULT, error_bars=True, dedupe_batchnorm=False, state_dtype=F64),
    "default, float32": dict(measures=DEFAULT, state_dtype=torch.float32, dedupe_batchnorm=False, error_bars=False),
    "default, float64, dedupe": dict(measures=DEFAULT, error_bars=False, state_dtype=F64),
    "default, float32, dedupe": dict(measures=DEFAULT, state_dtype=torch.float32, error_bars=False),
    "invariance, float32, dedupe": dict(measures=("invariance",), state_dtype=torch.float32, error_bars=False),
    "default, float64, dedupe, positions=256": dict(measures=DEFAULT, positions=256, error_bars=False, state_dtype=F64),
    "default, float64, dedupe, positions=64": dict(measures=DEFAULT, positions=64, error_bars=False, state_dtype=F64),
    "default, float32, dedupe, positions=64": dict(measures=DEFAULT, state_dtype=torch.float32, positions=64,
                                                   error_bars=False),
}
# what measure(memory_budget=..., positions="auto") chooses by itself (bench_resnet50.py measures it)
AUTOMATIC = {"4GB, batch_size=4": dict(batch_size=4, memory_budget="4GB"),
             "8GB, batch_size=4": dict(batch_size=4, memory_budget="8GB")}


def main() -> None:
    with torch.device("meta"):
        model = ResNet50().eval()
        probe = torch.empty(64, 3, 224, 224)
    tset = tm.transforms.rotations(16)
    figures: dict = {"environment": environment(), "cases": {}}
    for name, keywords in CASES.items():
        report = tm.estimate_memory(model, probe, tset, batch_size=4, **keywords)
        budget = tm.estimate_memory(model, probe, tset, batch_size=4, memory_budget="8GB", **keywords)
        figures["cases"][name] = {"layers": len(report.layers), "state_bytes": report.state_bytes,
                                  "working_bytes": report.working_bytes, "passes_under_8GB": len(budget.passes())}
        print(name, figures["cases"][name], flush=True)
    figures["automatic"] = {}
    for name, keywords in AUTOMATIC.items():
        session = Measurement(model, tset, positions="auto", **keywords)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = session.estimate_memory(as_probe(probe), None)
        figures["automatic"][name] = {"state_dtype": str(report.state_dtype).removeprefix("torch."),
                                      "positions": session.positions, "state_bytes": report.state_bytes,
                                      "working_bytes": report.working_bytes, "passes": len(report.passes())}
        print(name, figures["automatic"][name], flush=True)
    save_results(figures, RESULTS)


if __name__ == "__main__":
    main()
