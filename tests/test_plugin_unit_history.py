"""The /unit_history route: one unit's value at every step, read from the event files (both data loaders),
through the data provider where the files cannot give it, never 500 (its speed on a large log:
benchmarks/bench_frontend.py)."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug import test as werkzeug_test

from tm_tensorboard.plugin.invariance_plugin import InvariancePlugin
from logs import floats, provider
from logwriter import write_run
from tensorboard_process import TensorBoard
import test_plugin_hostile as hostile

BASE = "/data/plugin/tm_invariance"
XSS = "<img src=x onerror=alert(1)>"
STEPS = [0, 5, 10, 15]


def query(path: str = "/unit_history", **params) -> str:
    return f"{BASE}{path}?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())


def history_query(run: str, layer: str, unit: int, measure: str = "nvi") -> str:
    return query(run=run, namespace="invariance", measure=measure, layer=layer, unit=unit)


class Client:
    """The plugin in process over a MultiplexerDataProvider (the --load_fast=false provider); counts the
    data provider's read_blob calls made by /unit_history requests. ``logdir``: what the plugin is told the
    logdir is."""

    def __init__(self, root: Path, logdir: str | None = "same"):
        self.provider = provider(root)
        self.blob_reads = 0
        read_blob = self.provider.read_blob

        def counted(*args, **kwargs):
            self.blob_reads += 1
            return read_blob(*args, **kwargs)

        self.provider.read_blob = counted
        context = base_plugin.TBContext(data_provider=self.provider, logdir=str(root) if logdir == "same" else logdir)
        self.plugin = InvariancePlugin(context)
        self.client = werkzeug_test.Client(application.TensorBoardWSGI([self.plugin], data_provider=self.provider))

    def get(self, path: str) -> tuple[int, bytes]:
        before = self.blob_reads
        response = self.client.get(path)
        if not path.startswith(f"{BASE}/unit_history?"):
            self.blob_reads = before
        return response.status_code, response.get_data()

    def json(self, path: str):
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("unit_history") / "logs"
    records = {
        "cnn": write_run(root / "cnn", STEPS, dead_channel=True),
        XSS: write_run(root / XSS, [3, 1, 2], seed=1, measures=("invariance",)),  # steps written unsorted
        "restarted": write_run(root / "restarted", [0, 5, 9], seed=2, measures=("invariance",)),
    }
    write_run(root / "restarted", [5], seed=3, measures=("invariance",))  # resumed from step 5: step 5 written again
    return root, records


def check_histories(get_json, records, run: str, measures=("nvi", "svse")) -> int:
    """Every unit of every layer of ``measures``: the values the SDK logged at every step TensorBoard holds
    (/units' steps), and dead exactly at the steps where /units says the unit is dead. Returns the number of
    histories checked."""
    steps = get_json(query("/units", run=run, namespace="invariance", measure=measures[0]))["steps"]
    checked = 0
    for measure in measures:
        dead_at = {step: {layer["name"]: set(layer["dead"]) for layer in get_json(query(
            "/units", run=run, namespace="invariance", measure=measure, step=step))["layers"]} for step in steps}
        for layer in records[run][steps[0]].layers_of(measure):
            for unit in range(len(records[run][steps[0]].get(measure, layer))):
                payload = get_json(history_query(run, layer, unit, measure))
                assert payload["steps"] == steps and (payload["layer"], payload["unit"]) == (layer, unit)
                expected = [records[run][step].get(measure, layer)[unit] for step in steps]
                np.testing.assert_allclose(floats(payload["values"]), expected, rtol=1e-6)
                assert payload["dead"] == [step for step in steps if unit in dead_at[step][layer]], (measure, layer, unit)
                checked += 1
    return checked


def test_histories_match_what_the_sdk_wrote_without_reading_blobs(logs):
    root, records = logs
    client = Client(root)
    # nvi is in the first snapshot of each event, svse in the second (after the first one's blob)
    assert check_histories(client.json, records, "cnn") > 50
    check_histories(client.json, records, XSS, measures=("nvi",))
    assert client.blob_reads == 0
    history = client.json(history_query("cnn", "1", 0))
    assert history["dead"] == STEPS  # the dead ReLU channel, dead at every step
    assert history["run"] == "cnn" and history["measure"] == "nvi" and history["namespace"] == "invariance"


@pytest.mark.parametrize("logdir", [None, "gs://bucket/logs", "/no/such/directory"])
def test_without_the_event_files_every_step_is_read_through_the_data_provider(logs, logdir):
    root, records = logs
    client = Client(root, logdir)
    payload = client.json(history_query("cnn", "2", 3))
    np.testing.assert_allclose(floats(payload["values"]), [records["cnn"][s].get("nvi", "2")[3] for s in STEPS], rtol=1e-6)
    assert client.blob_reads == len(STEPS)
    files = Client(root)
    assert files.json(history_query("cnn", "2", 3)) == payload and files.blob_reads == 0


def test_a_run_directory_that_is_a_symlink_is_read_from_its_files(tmp_path):
    """A run linked into the logdir from elsewhere (TensorBoard follows the link) is read from the event
    files it links to, not blob by blob through the data provider."""
    records = write_run(tmp_path / "elsewhere" / "run", [0, 5], measures=("invariance",))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "linked").symlink_to(tmp_path / "elsewhere" / "run", target_is_directory=True)
    client = Client(tmp_path / "logs")
    payload = client.json(history_query("linked", "3", 1))
    assert payload["steps"] == [0, 5]
    np.testing.assert_allclose(floats(payload["values"]), [records[s].get("nvi", "3")[1] for s in (0, 5)], rtol=1e-6)
    assert client.blob_reads == 0


def test_new_steps_and_a_restarted_run(tmp_path):
    """Steps written after the first request are found (the files are scanned from where the last scan
    stopped); a run restarted from an earlier step shows the newer values of the steps it wrote again, all
    without reading a blob through the data provider."""
    records = write_run(tmp_path / "live", [0, 5], measures=("invariance",))
    client = Client(tmp_path)
    assert client.json(history_query("live", "3", 1))["steps"] == [0, 5]
    records.update(write_run(tmp_path / "live", [9], seed=4, measures=("invariance",)))
    client.provider._multiplexer.Reload()
    payload = client.json(history_query("live", "3", 1))
    assert payload["steps"] == [0, 5, 9]
    np.testing.assert_allclose(floats(payload["values"]), [records[s].get("nvi", "3")[1] for s in (0, 5, 9)], rtol=1e-6)
    restarted = write_run(tmp_path / "live", [5], seed=7, measures=("invariance",))  # step 5 written again
    client.provider._multiplexer.Reload()
    payload = client.json(history_query("live", "3", 1))
    assert payload["steps"] == [0, 5, 9]  # the Python loader keeps step 9 (the data server drops it)
    np.testing.assert_allclose(floats(payload["values"]), [records[0].get("nvi", "3")[1], restarted[5].get("nvi", "3")[1],
                                                           records[9].get("nvi", "3")[1]], rtol=1e-6)
    assert restarted[5].get("nvi", "3")[1] != records[5].get("nvi", "3")[1]
    assert client.blob_reads == 0


@pytest.mark.parametrize(
    "params, status",
    [
        (dict(namespace="invariance", measure="nvi", layer="1", unit=0), 400),
        (dict(run="cnn", measure="nvi", layer="1", unit=0), 400),
        (dict(run="cnn", namespace="invariance", layer="1", unit=0), 400),
        (dict(run="cnn", namespace="invariance", measure="nvi", unit=0), 400),
        (dict(run="cnn", namespace="invariance", measure="nvi", layer="1"), 400),
        (dict(run="cnn", namespace="invariance", measure="nvi", layer="1", unit="one"), 400),
        (dict(run="cnn", namespace="invariance", measure="nvi", layer="1", unit=-1), 400),
        (dict(run="cnn", namespace="invariance", measure="nvi", layer="1", unit="1e3"), 400),
        (dict(run="cnn", namespace="invariance", measure="nvi", layer="1", unit=str(10**30)), 400),
        (dict(run="cnn", namespace="invariance", measure="nvi", layer="x" * 5000, unit=0), 400),
        (dict(run="cnn", namespace="invariance", measure="nvi", layer="1", unit=6), 404),  # 6 units: 0-5
        (dict(run="cnn", namespace="invariance", measure="nvi", layer="nope", unit=0), 404),
        (dict(run="cnn", namespace="invariance", measure="nvi", layer=XSS, unit=0), 404),
        (dict(run="cnn", namespace="invariance", measure="dead", layer="1", unit=0), 404),
        (dict(run="cnn", namespace="invariance", measure="accuracy", layer="1", unit=0), 404),
        (dict(run="cnn", namespace="invariance", measure="<script>", layer="1", unit=0), 404),
        (dict(run="cnn", namespace="other", measure="nvi", layer="1", unit=0), 404),
        (dict(run="nope", namespace="invariance", measure="nvi", layer="1", unit=0), 404),
        (dict(run="../../etc", namespace="invariance", measure="nvi", layer="1", unit=0), 404),
        (dict(run="..", namespace="invariance", measure="nvi", layer="1", unit=0), 404),
        (dict(run=XSS, namespace="invariance", measure="nvse", layer="1", unit=0), 404),  # logged invariance only
    ],
)
def test_bad_parameters(logs, params, status):
    got, body = Client(logs[0]).get(query(**params))
    assert got == status, (params, got, body[:300])


def test_a_non_utf8_query_is_not_a_500(logs):
    assert Client(logs[0]).get(f"{BASE}/unit_history?run=%ff&namespace=invariance&measure=nvi&layer=%fe&unit=0")[0] == 404


def expected_hostile(run: str, load_fast: bool) -> tuple[int, list[int]]:
    """(status, steps) of a unit history of a hostile run: a step whose snapshot is not a blob of the
    series' size is left out, as /units answers 404 there."""
    if run == "blob_huge":  # the Rust data server holds the one blob stored; the Python one declares 2**27
        return (200, [0, 1, 2]) if load_fast else (404, [])
    return 200, [0, 2] if run in hostile.HOSTILE_SNAPSHOTS else [0, 1, 2]


def check_hostile(get, load_fast: bool) -> None:
    for run in ["good", *hostile.HOSTILE_TENSORS, *hostile.HOSTILE_SNAPSHOTS]:
        for layer, unit, value in (("a", 1, hostile.SNAPSHOT[7]), ("b", 0, hostile.SNAPSHOT[8])):
            status, body = get(history_query(run, layer, unit))
            want_status, want_steps = expected_hostile(run, load_fast)
            assert status == want_status, (run, status, body[:300])
            if status == 200:
                payload = json.loads(body)
                assert payload["steps"] == want_steps and payload["dead"] == [], (run, payload)
                np.testing.assert_array_equal(floats(payload["values"]), [value] * len(want_steps))


@pytest.fixture(scope="module")
def hostile_logdir(tmp_path_factory):
    """test_plugin_hostile's runs: good snapshots at steps 0 and 2, a hostile value at step 1."""
    root = tmp_path_factory.mktemp("hostile") / "logs"
    hostile._write_run(root / "good")
    for run, bad in hostile.HOSTILE_TENSORS.items():
        hostile._write_run(root / run, bad_tensor=bad)
    for run, bad in hostile.HOSTILE_SNAPSHOTS.items():
        hostile._write_run(root / run, bad_snapshot=bad)
    return root


def test_hostile_snapshots_in_process(hostile_logdir):
    client = Client(hostile_logdir)
    check_hostile(client.get, load_fast=False)


@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_real_tensorboard_both_loaders(logs, hostile_logdir, load_fast):
    root, records = logs
    with TensorBoard(root, f"--load_fast={load_fast}") as tb:
        tb.wait_for(f"{BASE}/runs", lambda p: {(e["run"], e["max_step"]) for e in p["runs"]}
                    == {("cnn", 15), (XSS, 2 if load_fast == "true" else 3), ("restarted", 5 if load_fast == "true" else 9)})
        # the data server drops the steps after one written again: step 3 of XSS ([3, 1, 2]), 9 of "restarted"
        check_histories(tb.json, records, "cnn")
        assert check_histories(tb.json, records, XSS, measures=("nvi",)) > 0
        # what /units shows at each step, but at step 5 of the resumed run, which the Python loader holds twice
        # (its read_blob takes the older record, the data server replaced it: the history has the newer one)
        history = tb.json(history_query("restarted", "3", 2))
        assert history["steps"] == ([0, 5] if load_fast == "true" else [0, 5, 9])
        for step, value in zip(history["steps"], floats(history["values"])):
            units = tb.json(query("/units", run="restarted", namespace="invariance", measure="nvi", step=step))
            shown = floats(units["layers"][3]["values"])[2]
            assert (value == shown) == (load_fast == "true" or step != 5), (step, value, shown)
    with TensorBoard(hostile_logdir, f"--load_fast={load_fast}") as tb:
        runs = {"good", *hostile.HOSTILE_TENSORS, *hostile.HOSTILE_SNAPSHOTS}
        tb.wait_for(f"{BASE}/runs", lambda p: {(e["run"], e["max_step"]) for e in p["runs"]} == {(r, 2) for r in runs})
        check_hostile(tb.get, load_fast=load_fast == "true")
        assert "Traceback" not in tb.output, tb.output[-3000:]
