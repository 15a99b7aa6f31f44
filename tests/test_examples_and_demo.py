"""The example scripts and the demo, end to end on CPU: they train, log, and the plugin serves the logs."""
from __future__ import annotations

import importlib.util
import json
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tm_tensorboard import metadata
from test_example_datasets import MNIST_NAMES, idx_bytes
from logs import rows
from test_plugin_routes import client_for, get_json

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tm_tensorboard.cli"]


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def write_mnist(root: Path, train: int = 256, test: int = 64) -> None:
    rng = np.random.default_rng(0)
    for is_train, count in ((True, train), (False, test)):
        images, labels = MNIST_NAMES[is_train]
        (root / images).write_bytes(idx_bytes(rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)))
        (root / labels).write_bytes(idx_bytes(rng.integers(0, 10, count, dtype=np.uint8)))


def write_cifar10(root: Path, per_batch: int = 64) -> None:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))


def served_runs(logdir: Path) -> dict[str, dict]:
    return {entry["run"]: entry for entry in get_json(client_for(logdir), "/runs")["runs"]}


def load_script(name: str):
    """An example script as a module, to call its main(argv) in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, writer, variants",
    [
        ("mnist.py", write_mnist, [("simple_cnn", ["none", "affine"]), ("p4cnn", ["rotation"]), ("stn", ["none"])]),
        ("cifar10.py", write_cifar10, [("allconv", ["none"]), ("vgg", ["rotation"]), ("resnet18", ["affine"])]),
    ],
)
def test_example_scripts_smoke(tmp_path, script, writer, variants):
    data = tmp_path / "data"
    data.mkdir()
    writer(data)
    main = load_script(script).main
    for model, augmentations in variants:
        logdir = tmp_path / "runs" / model
        assert main(["--smoke", "--model", model, "--width", "0.25", "--data-dir", str(data), "--logdir", str(logdir),
                     "--augmentation", *augmentations]) == 0
        runs = served_runs(logdir)
        assert set(runs) == {f"{model}-{a}" for a in augmentations}
        entry = runs[f"{model}-{augmentations[0]}"]
        assert entry["accuracy"] and "nvi" in entry["measures"] and entry["max_step"] == 20
        assert entry["layers"][0]["name"] == "input"  # the noise floor


@pytest.mark.parametrize("script", ["mnist.py", "cifar10.py"])
def test_example_scripts_explain_missing_data(tmp_path, script):
    done = run([sys.executable, f"examples/{script}", "--smoke", "--data-dir", str(tmp_path / "nothing")])
    assert done.returncode == 2
    assert "not found" in done.stderr and "--download" in done.stderr


def test_quickstart_runs():
    done = run([sys.executable, "examples/quickstart.py"])
    assert done.returncode == 0, done.stderr
    assert "rot90-symmetric CNN" in done.stdout


def test_demo_command_writes_logs_the_plugin_serves(tmp_path):
    done = run([*CLI, "demo", "--smoke", "--no-serve", "--logdir", str(tmp_path / "demo")])
    assert done.returncode == 0, done.stdout + done.stderr
    runs = served_runs(tmp_path / "demo")
    assert set(runs) == {"cnn", "cnn-rotation-augmented", "p4cnn"}
    for entry in runs.values():
        assert {"nvi", "nvse", "ee"} <= set(entry["measures"]) and entry["accuracy"] and entry["config"]
        assert entry["max_step"] == 40


def test_demo_starts_tensorboard_first_and_the_tab_fills_in_while_training(tmp_path):
    """The address comes before any training; the plugin serves measured steps of all three runs while
    they still train; progress lines come as training goes."""
    process = subprocess.Popen([*CLI, "demo", "--smoke", "--port", "0", "--logdir", str(tmp_path / "demo")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []

    def read_lines() -> None:
        for line in process.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    try:
        reader.start()
        deadline = time.time() + 300
        def address() -> re.Match | None:
            return next(filter(None, (re.search(r"TensorBoard at (http://127\.0\.0\.1:\d+/)", line) for line in lines)), None)

        while address() is None and time.time() < deadline:
            time.sleep(0.1)
        match = address()
        assert match, lines
        printed = [i for i, line in enumerate(lines) if "TensorBoard at" in line or line.startswith("training")]
        assert "TensorBoard at" in lines[printed[0]], lines  # the address before the training starts
        url = match.group(1)
        live = None
        while time.time() < deadline and not any(line.startswith("logs written") for line in lines):
            with urllib.request.urlopen(url + "data/plugin/tm_invariance/runs", timeout=30) as response:
                runs = json.loads(response.read())["runs"]
            if len([r for r in runs if r["max_step"] is not None]) == 3:
                live = list(lines)
                break
            time.sleep(0.5)
        assert live is not None, lines  # all three runs were served before training was over
        assert not any(line.startswith("logs written") for line in live), live
        while time.time() < deadline and not any(line.startswith("TensorBoard keeps serving") for line in lines):
            time.sleep(0.5)
        assert any(re.match(r"  step \d+/40: training accuracy cnn 0\.\d\d, .*s left", line) for line in lines), lines
        assert process.poll() is None  # still serving
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_demo_on_a_taken_port_says_so_in_one_line_before_training(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run([*CLI, "demo", "--port", str(port), "--logdir", str(tmp_path / "demo")], timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [f"tm-tensorboard demo: error: port {port} is in use (another TensorBoard?): pass --port 0 "
                      "to pick a free one, or --port N"], done.stderr
    assert "training" not in done.stdout and not list((tmp_path / "demo").glob("*/events.*"))  # before any


def test_demo_shows_the_expected_science(tmp_path):
    """At the last step: the p4 network is invariant after its group pooling; rotation augmentation makes
    the CNN's last layers more invariant than without it."""
    from tm_tensorboard.demo import write_demo_logs

    write_demo_logs(tmp_path, steps=150, every=50, train_size=3000, probe_size=64, verbose=False)
    client = client_for(tmp_path)

    def last_means(run: str) -> dict[str, float]:
        payload = get_json(client, "/layer_means", run=run, namespace="invariance", measure="nvi")
        assert payload["steps"][-1] == 150
        return dict(zip(payload["layers"], rows(payload)[-1]))

    p4, plain, augmented = last_means("p4cnn"), last_means("cnn"), last_means("cnn-rotation-augmented")
    for layer in ("spatial_pool", "classifier.1"):
        assert p4[layer] < 1e-4, (layer, p4[layer])
    last = list(plain)[-1]
    assert list(augmented)[-1] == last == "classifier.3"
    assert augmented[last] < 0.8 * plain[last], (augmented[last], plain[last])
    nvse = get_json(client, "/layer_means", run="p4cnn", namespace="invariance", measure="nvse")
    after_orientation_pool = dict(zip(nvse["layers"], rows(nvse)[-1]))["orientation_pool"]
    assert after_orientation_pool < 1e-4 < 0.1 < p4["orientation_pool"]  # turns with the input: not invariant yet
    ee = get_json(client, "/layer_means", run="p4cnn", namespace="invariance", measure="ee")
    group_layers = [i for i, name in enumerate(ee["layers"]) if name.startswith("features.")]
    assert max(rows(ee)[-1][i] for i in group_layers) < 1e-4  # equivariant under the cyclic-shift action
    config = get_json(client, "/config", run="p4cnn", namespace="invariance")["config"]
    assert config["actions"]["features.0"] == "cyclic_shift(4)" and config["noise_floor"]
    assert metadata.PLUGIN_NAME == "tm_invariance"
