"""The plugin's routes over TensorBoardWSGI + MultiplexerDataProvider on logdirs written by the real SDK."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from urllib.parse import quote

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider as tb_data_provider
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins import base_plugin
from torch.utils.tensorboard import SummaryWriter
from werkzeug import test as werkzeug_test

import tm_tensorboard as tm
from tm_tensorboard import metadata
from tm_tensorboard.plugin.invariance_plugin import InvariancePlugin
from tm_tensorboard.plugin.loader import InvarianceLoader
from logs import floats, provider, rows
from logwriter import write_run

BASE = "/data/plugin/tm_invariance"
XSS = "<img src=x onerror=alert(1)>"


def client_for(logdir, path_prefix=""):
    data_provider = provider(logdir)
    plugin = InvariancePlugin(base_plugin.TBContext(data_provider=data_provider, logdir=str(logdir)))
    app = application.TensorBoardWSGI([plugin], path_prefix=path_prefix, data_provider=data_provider)
    return werkzeug_test.Client(app)


def get(client, path, **params):
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
    response = client.get(f"{BASE}{path}" + (f"?{query}" if query else ""))
    return response.status_code, response.get_data()


def get_json(client, path, **params):
    status, body = get(client, path, **params)
    assert status == 200, (path, params, body[:300])
    return json.loads(body)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logs")
    records = {
        "cnn": write_run(logdir / "cnn", [0, 5, 10, 15], dead_channel=True),
        XSS: write_run(logdir / XSS, [3, 1, 2], seed=1, measures=("invariance",)),  # steps written unsorted
    }
    return logdir, records


def test_plugins_listing_and_runs(logs):
    logdir, records = logs
    client = client_for(logdir)
    listing = json.loads(client.get("/data/plugins_listing").get_data())
    assert listing["tm_invariance"]["enabled"] is True
    assert listing["tm_invariance"]["tab_name"] == "Invariance"
    runs = {entry["run"]: entry for entry in get_json(client, "/runs")["runs"]}
    assert set(runs) == {"cnn", XSS}
    cnn = runs["cnn"]
    result = records["cnn"][15]
    assert cnn["namespace"] == "invariance"
    assert cnn["measures"] == ["tvi", "svi", "nvi", "tvse", "svse", "nvse"]
    assert [layer["name"] for layer in cnn["layers"]] == result.layers
    assert cnn["layers"][0] == {"name": "0", "index": 0, "module_type": "Conv2d", "unit_shape": [6, 8, 8], "num_units": 6}
    assert cnn["measure_layers"]["nvse"] == result.layers_of("nvse")
    assert cnn["accuracy"] and cnn["config"] and cnn["max_step"] == 15
    assert runs[XSS]["measures"] == ["tvi", "svi", "nvi"] and not runs[XSS]["accuracy"]


@pytest.mark.parametrize("measure", ["nvi", "svi", "nvse"])
def test_units_match_what_the_sdk_wrote(logs, measure):
    logdir, records = logs
    client = client_for(logdir)
    for step in (0, 10, None):
        params = dict(run="cnn", namespace="invariance", measure=measure)
        if step is not None:
            params["step"] = step
        payload = get_json(client, "/units", **params)
        result = records["cnn"][15 if step is None else step]
        assert payload["step"] == (15 if step is None else step)
        assert payload["steps"] == [0, 5, 10, 15]
        assert [layer["name"] for layer in payload["layers"]] == result.layers_of(measure)
        for layer in payload["layers"]:
            np.testing.assert_allclose(floats(layer["values"]), result.get(measure, layer["name"]), rtol=1e-6)
            tv = result.get(measure.replace("nv", "tv").replace("sv", "tv"), layer["name"])
            sv = result.get(measure.replace("nv", "sv").replace("tv", "sv"), layer["name"])
            assert layer["dead"] == [int(u) for u in np.flatnonzero((tv <= 0) & (sv <= 0))]
            assert layer["mean"] == pytest.approx(result.layer_means(measure)[layer["name"]], rel=1e-6)
    first = get_json(client, "/units", run="cnn", namespace="invariance", measure="nvi")["layers"]
    assert first[1]["name"] == "1" and 0 in first[1]["dead"]  # the dead ReLU channel is reported


def test_bulk_values_keep_non_finite_values_and_float32_precision():
    from tm_tensorboard.plugin.invariance_plugin import _float32_base64

    values = np.array([0.1, np.inf, -np.inf, np.nan, 1e-30, -3.5], dtype=np.float64)
    decoded = floats(_float32_base64(values))
    np.testing.assert_array_equal(decoded, values.astype(np.float32).astype(np.float64))


def test_units_of_a_listed_step_skip_listing_and_new_steps_are_found(tmp_path):
    """A step already listed costs one data-provider call (its blob); the latest step, a step written since,
    or a cached key whose blob is gone lists the series again."""
    records = write_run(tmp_path / "live", [0, 5], measures=("invariance",))
    data_provider = provider(tmp_path)
    listings = []
    read_blob_sequences = data_provider.read_blob_sequences
    data_provider.read_blob_sequences = lambda *a, **k: listings.append(1) or read_blob_sequences(*a, **k)
    plugin = InvariancePlugin(base_plugin.TBContext(data_provider=data_provider, logdir=str(tmp_path)))
    client = werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=data_provider))
    params = dict(run="live", namespace="invariance", measure="nvi")
    assert get_json(client, "/units", **params)["steps"] == [0, 5]
    assert get_json(client, "/units", **params, step=0)["step"] == 0
    assert get_json(client, "/units", **params, step=5)["step"] == 5
    assert len(listings) == 1
    # A new event file in a later second: TensorBoard reads a run's files in name order, and within one
    # second the writer's counter suffix can sort the new file first (".100" < ".99"), which it then ignores.
    started = int(time.time())
    while int(time.time()) == started:
        time.sleep(0.05)
    records.update(write_run(tmp_path / "live", [9], measures=("invariance",)))
    data_provider._multiplexer.Reload()
    units = get_json(client, "/units", **params, step=9)  # not listed yet: listed again
    assert units["steps"] == [0, 5, 9] and len(listings) == 2
    for layer in units["layers"]:
        np.testing.assert_allclose(floats(layer["values"]), records[9].get("nvi", layer["name"]), rtol=1e-6)
    assert get(client, "/units", **params, step=7)[0] == 404 and len(listings) == 3
    (cached,) = plugin._snapshots.values()  # a cached key whose blob is gone (a purged step): listed again
    experiment, plugin_name, run, tag, _, index = tb_data_provider._decode_blob_key(cached[5])
    cached[5] = tb_data_provider._encode_blob_key(experiment, plugin_name, run, tag, 7, index)
    assert get_json(client, "/units", **params, step=5)["step"] == 5 and len(listings) == 4


def test_unsorted_steps_come_back_sorted(logs):
    logdir, records = logs
    client = client_for(logdir)
    units = get_json(client, "/units", run=XSS, namespace="invariance", measure="nvi")
    assert units["steps"] == [1, 2, 3] and units["run"] == XSS
    means = get_json(client, "/layer_means", run=XSS, namespace="invariance", measure="nvi")
    assert means["steps"] == [1, 2, 3]


def test_layer_means_match(logs):
    logdir, records = logs
    payload = get_json(client_for(logdir), "/layer_means", run="cnn", namespace="invariance", measure="nvse")
    assert payload["steps"] == [0, 5, 10, 15]
    assert payload["layers"] == records["cnn"][0].layers_of("nvse")
    for step, row in zip(payload["steps"], rows(payload)):
        expected = list(records["cnn"][step].layer_means("nvse").values())
        np.testing.assert_allclose(row, expected, rtol=1e-6)
    few = get_json(client_for(logdir), "/layer_means", run="cnn", namespace="invariance", measure="nvi", downsample=2)
    assert len(few["steps"]) == 2 and few["steps"][-1] == 15  # downsampling keeps the latest step


def test_accuracy_and_config(logs):
    logdir, records = logs
    client = client_for(logdir)
    payload = get_json(client, "/accuracy", run="cnn", namespace="invariance")
    assert payload["labels"] == ["rotation 0°", "rotation 90°", "rotation 180°", "rotation 270°"]
    assert payload["steps"] == [0, 5, 10, 15]
    for step, row in zip(payload["steps"], rows(payload)):
        np.testing.assert_allclose(row, records["cnn"][step].accuracy, rtol=1e-6)
    config = get_json(client, "/config", run="cnn", namespace="invariance")["config"]
    assert config["probe_size"] == "12" and config["transformation_set_id"].startswith("rotations(0,90,180,270)")
    assert [layer["name"] for layer in config["layers"]] == records["cnn"][0].layers
    assert get(client, "/accuracy", run=XSS, namespace="invariance")[0] == 404


def test_static_files_and_traversal(logs):
    client = client_for(logs[0])
    status, body = get(client, "/index.js")
    assert status == 200 and b"export async function render" in body
    assert client.get(f"{BASE}/index.js").headers["Content-Type"].startswith("text/javascript")
    assert get(client, "/static/app.js")[0] == 200
    for hostile in ("/static/../invariance_plugin.py", "/static/..%2F..%2Fsetup.py", "/static/%2e%2e/loader.py",
                    "/static/__init__.py", "/static/", "/static/missing.js", "/static/sub/app.js"):
        assert client.get(BASE + hostile).status_code == 404, hostile


@pytest.mark.parametrize(
    "path, params, status",
    [
        ("/units", dict(namespace="invariance", measure="nvi"), 400),
        ("/units", dict(run="cnn", measure="nvi"), 400),
        ("/units", dict(run="cnn", namespace="invariance"), 400),
        ("/units", dict(run="cnn", namespace="invariance", measure="nvi", step="latest"), 400),
        ("/units", dict(run="cnn", namespace="invariance", measure="nvi", step="1e400"), 400),
        ("/units", dict(run="cnn", namespace="invariance", measure="nvi", step=str(10**30)), 400),
        ("/units", dict(run="cnn", namespace="invariance", measure="nvi", step="7"), 404),
        ("/units", dict(run="nope", namespace="invariance", measure="nvi"), 404),
        ("/units", dict(run="cnn", namespace="other", measure="nvi"), 404),
        ("/units", dict(run="cnn", namespace="invariance", measure="<script>"), 404),
        ("/units", dict(run="../../etc/passwd", namespace="invariance", measure="nvi"), 404),
        ("/units", dict(run="x" * 5000, namespace="invariance", measure="nvi"), 400),
        ("/layer_means", dict(run="cnn", namespace="invariance", measure="nvi", downsample="0"), 400),
        ("/layer_means", dict(run="cnn", namespace="invariance", measure="nvi", downsample="99999999"), 400),
        ("/layer_means", dict(run="cnn", namespace="invariance", measure="accuracy"), 404),
        ("/layer_means", dict(run="cnn", namespace="invariance", measure="config"), 404),
        ("/config", dict(run=XSS, namespace="nope"), 404),
    ],
)
def test_bad_parameters(logs, path, params, status):
    assert get(client_for(logs[0]), path, **params)[0] == status


def test_non_utf8_query(logs):
    client = client_for(logs[0])
    response = client.get(f"{BASE}/units?run=%ff%fe&namespace=invariance&measure=nvi")
    assert response.status_code == 404


def test_path_prefix(logs):
    client = client_for(logs[0], path_prefix="/tb/sub")
    response = client.get("/tb/sub" + BASE + "/runs")
    assert response.status_code == 200 and json.loads(response.get_data())["runs"]


def _write_event(path, value: summary_pb2.Summary.Value, step=1):
    writer = SummaryWriter(str(path))
    writer._get_file_writer().add_summary(summary_pb2.Summary(value=[value]), step)
    writer.close()


def test_survives_corrupt_foreign_and_future_data(tmp_path):
    write_run(tmp_path / "good", [0, 1])
    # truncated copy of a good event file, an empty file, random bytes
    good = next((tmp_path / "good").glob("events.out.tfevents.*"))
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / good.name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "events.out.tfevents.0.host").write_bytes(b"")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "events.out.tfevents.0.host").write_bytes(np.random.default_rng(0).bytes(5000))
    # other plugins' data and our plugin name with unreadable / future plugin data
    other = SummaryWriter(str(tmp_path / "foreign"))
    other.add_scalar("loss", 1.0, 0)
    other.add_text("note", "hello", 0)
    other.add_histogram("weights", np.arange(10), 0)
    other.close()
    future = metadata.PluginData(kind=metadata.LAYER_MEANS, namespace="invariance", measure="nvi")
    future_meta = metadata.create_summary_metadata(future)
    future.version = metadata.PROTO_VERSION + 1
    future_meta.plugin_data.content = future.SerializeToString()
    value = summary_pb2.Summary.Value(tag="invariance/nvi", metadata=future_meta)
    value.tensor.CopyFrom(summary_pb2.Summary.Value(tensor=None).tensor)
    _write_event(tmp_path / "future", value)
    junk_meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=b"\xff\x00junk"),
        data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
    )
    _write_event(tmp_path / "junk", summary_pb2.Summary.Value(tag="invariance/units/invariance", metadata=junk_meta))

    client = client_for(tmp_path)
    runs = get_json(client, "/runs")["runs"]
    assert [entry["run"] for entry in runs if entry["measures"]] == ["good", "truncated"][: len(runs)] or runs
    assert {entry["run"] for entry in runs} <= {"good", "truncated"}
    assert get(client, "/units", run="good", namespace="invariance", measure="nvi")[0] == 200
    for run in ("empty", "garbage", "foreign", "future", "junk", "truncated"):
        for path in ("/units", "/layer_means", "/accuracy", "/config"):
            status, _ = get(client, path, run=run, namespace="invariance", measure="nvi")
            assert status in (200, 404), (run, path, status)


def test_loader_defaults_samples_per_plugin_and_is_import_light():
    class Flags:
        samples_per_plugin: dict = {}

    flags = Flags()
    flags.samples_per_plugin = {}
    InvarianceLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {metadata.PLUGIN_NAME: 0}
    flags.samples_per_plugin = {metadata.PLUGIN_NAME: 50}  # the user's choice wins
    InvarianceLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {metadata.PLUGIN_NAME: 50}
    code = (
        "import sys; import tm_tensorboard.plugin.loader as l; "
        "from tm_tensorboard.plugin.invariance_plugin import InvariancePlugin; "
        "from tm_tensorboard import metadata; assert l._PLUGIN_NAME == metadata.PLUGIN_NAME; "
        "bad = [m for m in ('torch', 'tm_tensorboard.engine', 'tm_tensorboard.monitor') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_second_namespace_is_a_separate_entry(tmp_path):
    images = torch_probe()
    writer = SummaryWriter(str(tmp_path / "run"))
    model = __import__("models").small_cnn()
    a = tm.Monitor(model, images, tm.transforms.rotations(3), writer=writer, every=1, measures=("invariance",))
    b = tm.Monitor(model, images, tm.transforms.flips(), writer=writer, every=1, namespace="flips", measures=("invariance",))
    a.step(0), b.step(0)
    a.close(), b.close()
    writer.close()
    client = client_for(tmp_path)
    runs = get_json(client, "/runs")["runs"]
    assert [(e["run"], e["namespace"]) for e in runs] == [("run", "flips"), ("run", "invariance")]
    labels = get_json(client, "/config", run="run", namespace="flips")["config"]["transformations"]
    assert [t["label"] for t in labels] == ["identity", "flip horizontal", "flip vertical"]


def torch_probe():
    import torch

    return torch.randn(6, 3, 8, 8)
