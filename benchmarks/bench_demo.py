"""The demo as a newcomer runs it: `tm-tensorboard demo`, timed from the command to each thing they see.

    python benchmarks/bench_demo.py            # ~5 min on an idle 2-core machine (3 runs of the demo)

Per run of the command (a fresh process, port 0, a fresh logdir): seconds until TensorBoard's address is
printed, until the plugin serves the first measured step of any run (what the tab shows first) and of all
three runs, and until training is done (the "logs written" line). Then the science the demo must show at
its last step, read back through the plugin's routes: mean nvi of the last layer of the plain and the
augmented CNN, the p4 network's largest nvi after its spatial pooling and its largest ee over the group
layers. Medians over the runs are in results/demo.json.
"""
from __future__ import annotations

import argparse
import json
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from provenance import save_results, source_version

CLI = [str(Path(sys.executable).with_name("tm-tensorboard"))]


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put((time.perf_counter(), line))
    out.put((time.perf_counter(), None))


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _rows(payload: dict) -> np.ndarray:
    import base64

    values = np.frombuffer(base64.b64decode(payload["values"]), dtype="<f4")
    return values.reshape(payload["shape"])


def _last(url: str, run: str, measure: str) -> dict[str, float]:
    payload = _get(f"{url}data/plugin/tm_invariance/layer_means?run={run}&namespace=invariance&measure={measure}")
    return dict(zip(payload["layers"], _rows(payload)[-1].tolist()))


def one_demo(logdir: Path) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen([*CLI, "demo", "--port", "0", "--logdir", str(logdir)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    figures: dict = {}
    url = None
    output = []
    try:
        while "trained_s" not in figures:
            try:
                at, line = lines.get(timeout=0.25)
            except queue.Empty:
                at, line = time.perf_counter(), ""
            if line is None:
                raise RuntimeError("the demo ended early:\n" + "".join(output))
            output.append(line)
            match = re.search(r"TensorBoard at (http://127\.0\.0\.1:\d+/)", line)
            if match:
                url, figures["address_s"] = match.group(1), at - start
            if line.startswith("logs written"):
                figures["trained_s"] = at - start
            if url and "all_runs_s" not in figures:
                runs = _get(url + "data/plugin/tm_invariance/runs")["runs"]
                shown = [r for r in runs if r["max_step"] is not None]
                if shown and "first_points_s" not in figures:
                    figures["first_points_s"] = time.perf_counter() - start
                if len(shown) == 3:
                    figures["all_runs_s"] = time.perf_counter() - start
        time.sleep(3)  # one more TensorBoard reload: the last step
        plain, augmented, p4 = (_last(url, run, "nvi") for run in ("cnn", "cnn-rotation-augmented", "p4cnn"))
        ee = _last(url, "p4cnn", "ee")
        figures["science"] = {
            "last_layer_nvi_cnn": plain["classifier.3"],
            "last_layer_nvi_augmented": augmented["classifier.3"],
            "p4_max_nvi_after_spatial_pool": max(p4["spatial_pool"], p4["classifier.1"]),
            "p4_max_ee_group_layers": max(v for k, v in ee.items() if k.startswith("features.")),
        }
        figures["output"] = [line.rstrip() for line in output if line.strip()]
    finally:
        process.terminate()
        process.wait(timeout=30)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "demo.json"))
    args = parser.parse_args()
    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_demo(Path(tmp) / "demo"))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[-1].items() if k.endswith("_s")), flush=True)
    keys = ("address_s", "first_points_s", "all_runs_s", "trained_s")
    figures = {
        "version": source_version(),
        "command": "tm-tensorboard demo --port 0 --logdir <fresh>",
        "median": {k: statistics.median(r[k] for r in runs) for k in keys},
        "runs": runs,
    }
    save_results(figures, args.output)


if __name__ == "__main__":
    main()
