"""Data under the plugin's name that is not what the SDK writes: the plugin leaves it out or answers 404,
never 500, on both loaders, and no declared shape makes it allocate more than the event file holds.
Every route only reads: methods other than GET and HEAD get 405.

Each hostile run holds good layer means, accuracy and snapshots at steps 0 and 2, and one hostile value
at step 1: in both tensor series (HOSTILE_TENSORS) or in the snapshot series (HOSTILE_SNAPSHOTS).
"""
from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins import base_plugin
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from werkzeug import test as werkzeug_test

from tm_tensorboard import metadata
from tm_tensorboard.plugin import tensors
from tm_tensorboard.plugin.invariance_plugin import InvariancePlugin
from logs import provider
from tensorboard_process import TensorBoard

BASE = "/data/plugin/tm_invariance"
NS = "invariance"
LAYERS = [metadata.Layer(name="a", index=0, num_units=2), metadata.Layer(name="b", index=1, num_units=1)]
GOOD = np.array([0.5, 0.25], "<f4")  # the layer means and accuracy of every good step
SNAPSHOT = np.arange(9, dtype="<f4")  # 3 measures × 3 units
ROUTES = ("/index.js", "/static/app.js", "/runs", "/units", "/layer_means", "/accuracy", "/config")


def _tensor(dtype, shape, **fields) -> tensor_pb2.TensorProto:
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in shape]
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims), **fields)


def _floats(values, dtype=types_pb2.DT_FLOAT, numpy_dtype="<f4") -> tensor_pb2.TensorProto:
    array = np.asarray(values, numpy_dtype)
    return _tensor(dtype, array.shape, tensor_content=array.tobytes())


def _blob(payload: bytes) -> tensor_pb2.TensorProto:
    return _tensor(types_pb2.DT_STRING, [1], string_val=[payload])  # as the SDK writes a snapshot


HOSTILE_TENSORS = {
    "string": _tensor(types_pb2.DT_STRING, [2], string_val=[b"x", b"y"]),
    "variant": _tensor(types_pb2.DT_VARIANT, [2]),
    "short": _tensor(types_pb2.DT_FLOAT, [64], tensor_content=bytes(8)),
    "huge40": _tensor(types_pb2.DT_FLOAT, [2**40], float_val=[1.0]),  # 4 TiB if believed
    "huge27": _tensor(types_pb2.DT_FLOAT, [2**27], float_val=[1.0]),  # 512 MB if believed
}
HOSTILE_SNAPSHOTS = {
    "blob_size": _blob(b"abc"),
    "blob_variant": _tensor(types_pb2.DT_VARIANT, [1]),
    "blob_float": _floats([1.0]),
    "blob_content": _tensor(types_pb2.DT_STRING, [1], tensor_content=b"abcd"),
    "blob_huge": _tensor(types_pb2.DT_STRING, [2**27], string_val=[SNAPSHOT.tobytes()]),  # 2**27 blob keys
}


def _write_run(rundir: Path, bad_tensor=None, bad_snapshot=None) -> None:
    """Steps 0, 1, 2 of layer means, accuracy and snapshots; step 1 with the bad values given."""
    series = [
        (metadata.means_tag(NS, "nvi"), metadata.PluginData(kind=metadata.LAYER_MEANS, namespace=NS, measure="nvi", layers=LAYERS), False),
        (metadata.accuracy_tag(NS), metadata.PluginData(kind=metadata.ACCURACY, namespace=NS, measure="accuracy"), False),
        (metadata.snapshot_tag(NS, "invariance"),
         metadata.PluginData(kind=metadata.UNIT_SNAPSHOT, namespace=NS, measures=["tvi", "svi", "nvi"], layers=LAYERS), True),
    ]
    writer = EventFileWriter(str(rundir))
    for step in range(3):
        values = []
        for tag, data, blob in series:
            bad = bad_snapshot if blob else bad_tensor
            tensor = _blob(SNAPSHOT.tobytes()) if blob else _floats(GOOD)
            if step == 1 and bad is not None:
                tensor = bad
            value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
            if step == 0:
                value.metadata.CopyFrom(metadata.create_summary_metadata(data, blob_sequence=blob))
            values.append(value)
        writer.add_event(event_pb2.Event(step=step, wall_time=1.0 + step, summary=summary_pb2.Summary(value=values)))
    writer.close()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "logs"
    _write_run(root / "good")
    for run, bad in HOSTILE_TENSORS.items():
        _write_run(root / run, bad_tensor=bad)
    for run, bad in HOSTILE_SNAPSHOTS.items():
        _write_run(root / run, bad_snapshot=bad)
    return root


def _client(logdir: Path, data_provider=None) -> werkzeug_test.Client:
    data_provider = data_provider or provider(logdir)
    plugin = InvariancePlugin(base_plugin.TBContext(data_provider=data_provider, logdir=str(logdir)))
    return werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=data_provider))


def _getter(client: werkzeug_test.Client):
    """``get(path) -> (status, body)`` over an in-process client, like TensorBoard.get."""

    def get(path: str) -> tuple[int, bytes]:
        response = client.get(path)
        return response.status_code, response.get_data()

    return get


def _query(path: str, run: str, **extra) -> str:
    params = dict(run=run, namespace=NS, measure="nvi", **extra)
    return f"{BASE}{path}?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())


def _rows(payload: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(payload["values"]), "<f4").reshape(payload["shape"])


def _expected_units(run: str, step: int | None, load_fast: bool) -> int:
    """The status of /units on a run at ``step`` (None: latest)."""
    if run == "blob_huge":  # the Rust data server holds the one blob stored; the Python one declares 2**27
        return 200 if load_fast else 404
    return 404 if step == 1 and run in HOSTILE_SNAPSHOTS else 200


def _check_routes(get, load_fast: bool) -> None:
    """Every hostile run on every data route through ``get(path) -> (status, body)``."""
    for run in ["good", *HOSTILE_TENSORS, *HOSTILE_SNAPSHOTS]:
        steps = [0, 2] if run in HOSTILE_TENSORS else [0, 1, 2]
        for path in ("/layer_means", "/accuracy"):
            status, body = get(_query(path, run))
            assert status == 200, (run, path, status, body[:300])
            payload = json.loads(body)
            assert payload["steps"] == steps, (run, path)
            np.testing.assert_array_equal(_rows(payload), np.tile(GOOD, (len(steps), 1)))
        for step in (1, None):
            status, body = get(_query("/units", run, **({} if step is None else {"step": step})))
            assert status == _expected_units(run, step, load_fast), (run, step, status, body[:300])
            if status == 200:  # the nvi row of the snapshot: layer a's units, then layer b's
                layers = json.loads(body)["layers"]
                values = np.concatenate([np.frombuffer(base64.b64decode(layer["values"]), "<f4") for layer in layers])
                np.testing.assert_array_equal(values, SNAPSHOT[6:])


@pytest.mark.parametrize("run", sorted(HOSTILE_TENSORS))
def test_tensor_points_not_as_written_are_left_out_and_warned_once(logdir, run, caplog):
    get = _getter(_client(logdir))
    with caplog.at_level(logging.WARNING, logger="tm_tensorboard.plugin.invariance_plugin"):
        for _ in range(2):
            for path in ("/layer_means", "/accuracy"):
                status, body = get(_query(path, run))
                payload = json.loads(body)
                assert status == 200 and payload["steps"] == [0, 2], (path, status, body[:300])
                np.testing.assert_array_equal(_rows(payload), [GOOD, GOOD])
    warned = [r.getMessage() for r in caplog.records if f"run {run!r}" in r.getMessage()]
    assert len(warned) == 2 and "step 1" in warned[0], warned  # one per series: means and accuracy


def test_python_loader_in_process(logdir):
    _check_routes(_getter(_client(logdir)), load_fast=False)


def test_a_provider_without_stored_protos_is_read_through_read_tensors(logdir):
    """Not one of TensorBoard's own providers: its read_tensors converts, a series it cannot convert is
    left out whole, and values that are not float numbers point by point."""

    class Wrapped:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

    client = _client(logdir, Wrapped(provider(logdir)))
    for run, steps in (("good", [0, 1, 2]), ("string", [0, 2]), ("short", []), ("variant", [])):
        response = client.get(_query("/layer_means", run))
        assert response.status_code == 200 and json.loads(response.get_data())["steps"] == steps, run


@pytest.mark.parametrize(
    "proto, expected",
    [
        (_floats(GOOD), GOOD),
        (_floats(GOOD, types_pb2.DT_DOUBLE, "<f8"), GOOD),
        (_tensor(types_pb2.DT_FLOAT, [2], float_val=[0.5, 0.25]), GOOD),
        (_tensor(types_pb2.DT_FLOAT, [], float_val=[0.5]), np.float32(0.5)),
        (_tensor(types_pb2.DT_FLOAT, [0]), np.zeros(0)),
        (_tensor(types_pb2.DT_FLOAT, [3], float_val=[0.5]), r"1 values for declared shape \[3\]"),  # one value repeated: refused
        (_tensor(types_pb2.DT_FLOAT, [-1], float_val=[0.5]), "declared shape"),
        (_tensor(types_pb2.DT_FLOAT, [tensors.MAX_VALUES_PER_DATUM + 1]), "declared shape"),
        (_tensor(types_pb2.DT_FLOAT, [2], tensor_content=bytes(12)), "12 bytes"),
        (_tensor(types_pb2.DT_INT32, [2], int_val=[1, 2]), "DT_INT32"),
        (_tensor(999, [2]), "dtype 999"),
    ],
)
def test_values_accepts_only_float_tensors_that_hold_their_declared_shape(proto, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            tensors.values(proto)
    else:
        np.testing.assert_array_equal(tensors.values(proto), expected)


@pytest.mark.parametrize("route", ROUTES)
def test_routes_only_read(logdir, route):
    client = _client(logdir)
    path = _query(route, "good") if route in ("/units", "/layer_means", "/accuracy", "/config") else BASE + route
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        response = client.open(path, method=method, data=b"x")
        assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD", (method, response.status_code)
    head = client.head(path)
    assert head.status_code == client.get(path).status_code and head.get_data() == b""


def _request(tb: TensorBoard, method: str, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(tb.url + path, data=b"x" if method != "GET" else None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def _peak_rss_kb(tb: TensorBoard) -> int:
    """The TensorBoard process's peak resident memory (VmHWM), in kB."""
    status = Path(f"/proc/{tb._process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_real_tensorboard_never_answers_500_and_memory_stays_bounded(logdir, load_fast):
    runs = {"good", *HOSTILE_TENSORS, *HOSTILE_SNAPSHOTS}
    with TensorBoard(logdir, f"--load_fast={load_fast}") as tb:
        tb.wait_for(f"{BASE}/runs", lambda p: {(e["run"], e["max_step"]) for e in p["runs"]} == {(r, 2) for r in runs})
        before = _peak_rss_kb(tb)
        _check_routes(tb.get, load_fast=load_fast == "true")
        growth_mb = (_peak_rss_kb(tb) - before) / 1024
        assert growth_mb < 100, f"TensorBoard's peak memory grew by {growth_mb:.0f} MB"
        # each hostile series is named once in TensorBoard's log, however often it is asked for
        assert tb.get(_query("/accuracy", "huge27"))[0] == 200
        assert tb.output.count("run 'huge27', tag 'invariance/accuracy'") == 1, tb.output[-3000:]
        for method in ("POST", "PUT", "DELETE"):
            status, headers = _request(tb, method, f"{BASE}/runs")
            assert status == 405 and headers.get("Allow") == "GET, HEAD", (method, status)
        assert _request(tb, "GET", f"{BASE}/runs")[0] == 200
