"""Reading logs without a server: ``tm_tensorboard.read`` and ``tm-tensorboard export``, on event files
written by the SDK itself and compared with the results the Monitor returned for the same steps."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.compat.proto import summary_pb2
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

import tm_tensorboard as tm
from tm_tensorboard import metadata, reader
from tm_tensorboard.cli import main
from tm_tensorboard.measures import MEASURE_GROUPS, SPECS
from logwriter import probe, write_run
from models import small_cnn

STEPS_A, STEPS_B = [0, 3, 7], [2, 5]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """Runs "a" (invariance, equivariance, accuracy; a dead channel) and "b" (invariance only, flips),
    run "c" written in another namespace, and a run of someone else's scalars; with the Monitor's results."""
    root = tmp_path_factory.mktemp("logs")
    record = {
        "a": write_run(root / "a", STEPS_A, dead_channel=True),
        "b": write_run(root / "b", STEPS_B, seed=1, transformations=tm.transforms.flips(), measures=("invariance",)),
    }
    images, _ = probe(seed=2)
    with tm.Monitor(small_cnn(seed=2), images, tm.transforms.flips(), logdir=root / "c", every=1,
                    namespace="second", measures=("invariance",)) as monitor:
        record["c"] = {4: monitor.step(4)}
    with SummaryWriter(str(root / "foreign")) as writer:
        for step in range(3):
            writer.add_scalar("loss", 1.0 / (step + 1), step)
    return root, record


def ratio_of(measure: str) -> str | None:
    """The ratio measure of ``measure``'s group, whose 0 / 0 units are the group's dead ones."""
    group = next(g for g, members in MEASURE_GROUPS.items() if members and measure in members)
    return next((m for m in MEASURE_GROUPS[group] if SPECS[m].is_ratio), None)


def test_read_returns_what_was_measured(logdir):
    root, record = logdir
    logs = tm.read(root)
    assert list(logs) == ["a", "b"] and logs.namespace == "invariance"  # c: other namespace; foreign: not ours
    for name, results in record.items():
        if name == "c":
            continue
        run, last = logs[name], results[max(results)]
        assert run.measures == last.measures
        np.testing.assert_array_equal(run.steps, sorted(results))
        for measure in last.measures:
            assert run.layers(measure) == last.layers_of(measure)
            for layer in last.layers_of(measure):
                series = run.means[measure][layer]
                assert series.steps.dtype == np.int64 and series.values.dtype == np.float32
                np.testing.assert_array_equal(series.steps, sorted(results))
                expected = [np.float32(results[s].layer_means(measure)[layer]) for s in sorted(results)]
                np.testing.assert_array_equal(series.values, expected)  # exact: float32 rounding only
                assert run.layer_index(layer) == last.layers.index(layer)
        assert run.config["layers"][0] == {
            "name": "0", "index": 0, "module_type": "Conv2d", "unit_shape": [6, 8, 8], "num_units": 6,
            "positions": 0,  # every position measured
        }
        assert [layer["name"] for layer in run.config["layers"]] == last.layers
        assert run.transformations == [t.label for t in last.transformations]
        assert run.config["probe_size"] == 12 and run.config["every"] == 1  # ints, not JSON's int64 strings
    accuracy = logs["a"].accuracy
    np.testing.assert_array_equal(accuracy.steps, STEPS_A)
    np.testing.assert_array_equal(accuracy.values, [record["a"][s].accuracy.astype(np.float32) for s in STEPS_A])
    assert logs["a"].transformations == ["rotation 0°", "rotation 90°", "rotation 180°", "rotation 270°"]
    assert logs["b"].accuracy is None and logs["b"].measures == ["tvi", "svi", "nvi"]
    with pytest.raises(KeyError, match="measures: tvi, svi, nvi"):
        logs["b"].layers("nvse")
    with pytest.raises(ValueError, match=r"units=True"):
        logs["a"].units


def test_units_and_dead_units(logdir):
    root, record = logdir
    run, results = tm.read(root, units=True)["a"], record["a"]
    for measure in results[7].measures:
        ratio = ratio_of(measure)
        for layer in results[7].layers_of(measure):
            units = run.units[measure][layer]
            np.testing.assert_array_equal(units.steps, STEPS_A)
            expected = np.stack([results[s].get(measure, layer).astype(np.float32) for s in STEPS_A])
            np.testing.assert_array_equal(units.values, expected)  # bit for bit, NaN and inf included
            dead = run.dead[measure][layer]
            assert dead.values.dtype == bool
            np.testing.assert_array_equal(dead.values, np.stack([results[s].dead(ratio, layer) for s in STEPS_A]))
    assert run.dead["nvi"]["1"].values[:, 0].all()  # the channel that never fires after its ReLU


def test_other_namespace_and_helpful_errors(logdir, tmp_path):
    root, record = logdir
    second = tm.read(root, namespace="second")
    assert list(second) == ["c"]
    expected = np.float32(record["c"][4].layer_means("nvi")["0"])
    np.testing.assert_array_equal(second["c"].means["nvi"]["0"].values, [expected])
    with pytest.raises(ValueError, match=r"no runs with namespace 'nope'.*namespaces found: invariance, second"):
        tm.read(root, namespace="nope")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as error:
        tm.read(empty)
    message = str(error.value)
    assert "\n" not in message and "no tm_tensorboard runs under" in message and "tensorboard --logdir" in message
    with pytest.raises(ValueError, match="1 run.* of other TensorBoard data"):
        tm.read(root / "foreign")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        tm.read(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        tm.read(tmp_path / "file")
    assert list(tm.read(root / "a")) == ["."]  # one run's own directory is a logdir of one run, as in TensorBoard


NVI_MEANS = metadata.PluginData(
    kind=metadata.LAYER_MEANS, measure="nvi", namespace="invariance",
    layers=[metadata.Layer(name="conv", index=0, num_units=2), metadata.Layer(name="fc", index=1, num_units=3)],
)
ACCURACY = metadata.PluginData(kind=metadata.ACCURACY, measure="accuracy", namespace="invariance")


def _write(rundir: Path, data: metadata.PluginData, points: list[tuple[int, list[float]]],
           version: int = metadata.PROTO_VERSION) -> None:
    """float32 vectors of one of our tags written by hand, metadata on the first value only."""
    description = metadata.create_summary_metadata(data)
    if version != metadata.PROTO_VERSION:
        data.version = version
        description.plugin_data.content = data.SerializeToString()
    accuracy = data.kind == metadata.ACCURACY
    tag = metadata.accuracy_tag("invariance") if accuracy else metadata.means_tag("invariance", data.measure)
    with SummaryWriter(str(rundir)) as writer:
        for i, (step, values) in enumerate(points):
            value = summary_pb2.Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(np.float32(values)))
            if i == 0:
                value.metadata.CopyFrom(description)
            writer._get_file_writer().add_summary(summary_pb2.Summary(value=[value]), step)


def test_non_finite_values_repeated_steps_and_bad_data(tmp_path):
    means = [(5, [np.nan, np.inf]), (1, [-np.inf, 0.1]), (5, [0.25, 2.0]), (9, [1.0, 2.0, 3.0])]
    _write(tmp_path / "run", NVI_MEANS, means)
    _write(tmp_path / "run", ACCURACY, [(1, [0.5, 0.25, 1.0]), (5, [0.5, 0.75])])  # a second event file
    more_layers = metadata.PluginData()
    more_layers.CopyFrom(NVI_MEANS)
    more_layers.layers.add(name="head", index=2, num_units=4)
    _write(tmp_path / "run", more_layers, [(12, [3.0, 4.0, 5.0])])  # a resumed run: its own metadata counts
    _write(tmp_path / "future", NVI_MEANS, [(1, [1.0, 2.0])], version=metadata.PROTO_VERSION + 1)
    # Skipped: the vector of 3 means for 2 layers; the accuracy of 3 transformations when the last has 2.
    with pytest.warns(RuntimeWarning, match="'run': skipped 2 values"):
        logs = tm.read(tmp_path)
    assert list(logs) == ["run"]  # data of a newer format version is not read
    conv, fc = (logs["run"].means["nvi"][layer] for layer in ("conv", "fc"))
    np.testing.assert_array_equal(conv.steps, [1, 5, 12])  # sorted; step 5 keeps the value written last
    np.testing.assert_array_equal(conv.values, np.float32([-np.inf, 0.25, 3.0]))
    np.testing.assert_array_equal(fc.values, np.float32([0.1, 2.0, 4.0]))
    head = logs["run"].means["nvi"]["head"]
    assert logs["run"].layers("nvi") == ["conv", "fc", "head"] and head.steps.tolist() == [12] and head.values[0] == 5
    accuracy = logs["run"].accuracy
    np.testing.assert_array_equal(accuracy.steps, [5])
    np.testing.assert_array_equal(accuracy.values, np.float32([[0.5, 0.75]]))
    assert logs["run"].transformations == ["0", "1"] and logs["run"].config is None  # no configuration written

    _write(tmp_path / "nan", NVI_MEANS, [(0, [np.nan, np.inf]), (1, [-np.inf, 0.1])])
    out = tmp_path / "nan.json"
    assert main(["export", str(tmp_path / "nan"), "--format", "json", "-o", str(out)]) == 0
    exported = json.loads(out.read_text(), parse_constant=lambda token: pytest.fail(f"invalid JSON token {token}"))
    assert exported["."]["measures"]["nvi"] == {
        "conv": {"steps": [0, 1], "values": ["NaN", "-Infinity"]},
        "fc": {"steps": [0, 1], "values": ["Infinity", 0.1]},  # the shortest text of the float32 value
    }
    assert main(["export", str(tmp_path / "nan"), "-o", str(tmp_path / "nan.csv")]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "nan.csv").read_text())))
    assert [r["value"] for r in rows] == ["nan", "-inf", "inf", "0.1"]


def test_to_pandas(logdir):
    pd = pytest.importorskip("pandas")
    root, record = logdir
    logs = tm.read(root)
    frame = logs.to_pandas()
    assert list(frame.columns) == list(reader.COLUMNS)
    means_rows = sum(len(s) for run in logs.values() for layers in run.means.values() for s in layers.values())
    assert len(frame) == means_rows + len(STEPS_A) * 4  # plus accuracy per transformation of run a
    row = frame[(frame.run == "a") & (frame.measure == "nvi") & (frame.layer == "3") & (frame.step == 7)]
    assert row.value.dtype == np.float32 and row.value.item() == np.float32(record["a"][7].layer_means("nvi")["3"])
    assert row.layer_index.item() == 3
    accuracy = frame[(frame.run == "a") & (frame.measure == "accuracy") & (frame.layer == "rotation 90°")]
    np.testing.assert_array_equal(accuracy.value, [np.float32(record["a"][s].accuracy[1]) for s in STEPS_A])
    assert set(accuracy.layer_index) == {1}
    pd.testing.assert_frame_equal(logs["b"].to_pandas(), frame[frame.run == "b"].reset_index(drop=True))

    units = tm.read(root, units=True)["b"].to_pandas()
    assert list(units.columns) == list(reader.UNIT_COLUMNS)
    per_unit = units[units.unit.notna()]
    sizes = {layer: record["b"][5].get("nvi", layer).size for layer in record["b"][5].layers_of("nvi")}
    assert len(per_unit) == 3 * len(STEPS_B) * sum(sizes.values())  # tvi, svi, nvi
    cell = per_unit[(per_unit.measure == "svi") & (per_unit.layer == "0") & (per_unit.step == 2)]
    np.testing.assert_array_equal(cell.unit, np.arange(sizes["0"]))
    np.testing.assert_array_equal(cell.value, record["b"][2].get("svi", "0").astype(np.float32))
    np.testing.assert_array_equal(cell.dead, record["b"][2].dead("nvi", "0"))
    assert units[units.unit.isna()].dead.isna().all()


def test_to_pandas_without_pandas(logdir, monkeypatch):
    logs = tm.read(logdir[0])
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install 'tm-tensorboard\[pandas\]'"):
        logs.to_pandas()


def test_export_csv(logdir, tmp_path):
    root, record = logdir
    logs = tm.read(root)
    out = tmp_path / "means.csv"
    assert main(["export", str(root), "--format", "csv", "-o", str(out)]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(reader.COLUMNS)
    parsed: dict[tuple, dict[int, str]] = {}
    for r in rows:
        parsed.setdefault((r["run"], r["measure"], r["layer"], int(r["layer_index"])), {})[int(r["step"])] = r["value"]
    for name, run in logs.items():
        for measure, layers in run.means.items():
            for layer, series in layers.items():
                got = parsed.pop((name, measure, layer, run.layer_index(layer)))
                assert list(got) == series.steps.tolist()
                np.testing.assert_array_equal(np.float32([float(v) for v in got.values()]), series.values)
    for t, label in enumerate(logs["a"].transformations):
        got = parsed.pop(("a", "accuracy", label, t))
        assert np.float32(float(got[3])) == np.float32(record["a"][3].accuracy[t])
    assert not parsed  # nothing else

    assert main(["export", str(root), "--units", "-o", str(tmp_path / "units.csv")]) == 0
    with open(tmp_path / "units.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["unit"] != ""]
    cell = [r for r in rows if (r["run"], r["measure"], r["layer"], r["step"]) == ("a", "nvi", "1", "7")]
    np.testing.assert_array_equal([int(r["unit"]) for r in cell], np.arange(6))
    values = np.float32([float(r["value"]) for r in cell])
    np.testing.assert_array_equal(values, record["a"][7].get("nvi", "1").astype(np.float32))
    assert [r["dead"] for r in cell] == [str(int(d)) for d in record["a"][7].dead("nvi", "1")]
    assert cell[0]["dead"] == "1"


def test_export_json(logdir, tmp_path, capsys):
    root, record = logdir
    logs = tm.read(root, units=True)
    assert main(["export", str(root), "--format", "json", "--units"]) == 0  # to standard output
    exported = json.loads(capsys.readouterr().out, parse_constant=lambda token: pytest.fail(f"invalid JSON {token}"))
    assert list(exported) == ["a", "b"]
    a = exported["a"]
    assert a["config"] == logs["a"].config
    for measure, layers in logs["a"].means.items():
        assert list(a["measures"][measure]) == list(layers)
        for layer, series in layers.items():
            assert a["measures"][measure][layer]["steps"] == series.steps.tolist()
            np.testing.assert_array_equal(np.float32(a["measures"][measure][layer]["values"]), series.values)
    assert a["accuracy"]["transformations"] == logs["a"].transformations and a["accuracy"]["steps"] == STEPS_A
    np.testing.assert_array_equal(np.float32(a["accuracy"]["values"]), logs["a"].accuracy.values)
    units = a["units"]["nvse"]["3"]
    expected = [record["a"][s].get("nvse", "3").astype(np.float32) for s in STEPS_A]
    np.testing.assert_array_equal(np.float32(units["values"]), expected)
    assert units["dead"] == [np.flatnonzero(record["a"][s].dead("nvse", "3")).tolist() for s in STEPS_A]
    assert exported["b"]["accuracy"] is None and "units" in exported["b"]
    assert main(["export", str(root), "--format", "json", "--namespace", "second"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["c"]


def test_export_of_a_logdir_without_runs_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "out.csv")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("tm-tensorboard export: error: no tm_tensorboard runs under")
    assert not (tmp_path / "out.csv").exists()  # nothing written when there is nothing to write


def test_reader_imports_neither_torch_nor_pandas():
    code = (
        "import sys, tm_tensorboard as tm; tm.read; import tm_tensorboard.reader; "
        "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
