"""Per-transformation measures: the invariance error ie_t (group "per_transformation") and the equivariance
error ee_t (group "equivariance_error") for each transformation, from the SDK to the plugin's route."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from tensorboard.compat.proto import summary_pb2
from tensorboard.util import tensor_util
from torch import nn

import tm_tensorboard as tm
from tm_tensorboard import actions, metadata, reader
from tm_tensorboard import transforms as T
from tm_tensorboard.engine import Measurement
from tm_tensorboard.examples.models import P4CNN
from tm_tensorboard.probe import as_probe
from tm_tensorboard.statistics import AccuracyState
from launches import top_level_ops
from logs import ctx, provider
from logwriter import write_run
from models import small_cnn
from reference import channel, safe_divide
from tensorboard_process import TensorBoard
from test_fused import _HostReads
from test_more_measures import brute
from test_plugin_routes import _write_event, client_for, get, get_json

N = 11
CHUNKS = [1, 5, N + 3]  # one sample, an odd chunk, more than the probe
LAYERS = ["0", "3", "5", "9"]  # conv, conv, ReLU after BatchNorm, linear


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(11)
    return torch.randn(N, 3, 12, 12)


def error_reference(A: np.ndarray, identity: int, per: str) -> np.ndarray:
    """The error of each transformation from its definition: A [N, T, *shape] (moved back for ee_t), the
    identity's column the reference; [T, *shape] or, per channel, [T, C] (components averaged, then divided)."""
    reference = A[:, identity]
    mse = ((A - reference[:, None]) ** 2).mean(axis=0)
    var2 = 2 * reference.var(axis=0, ddof=1)
    if per == "channel":
        mse, var2 = np.stack([channel(row) for row in mse]), channel(var2)
    return safe_divide(mse, np.broadcast_to(var2, mse.shape).copy())


def rot90_undo(quarter_turns: list[int]):
    """Move feature maps back by the rotation of transformation t, independently of the library."""
    return lambda fm, t: torch.rot90(fm, -quarter_turns[t], dims=(2, 3))


def live_rows_mean(values: np.ndarray) -> np.ndarray:
    """Each transformation's mean over the finite entries that are not 0 / 0 (1 with no sample variance)."""
    return np.array([row[np.isfinite(row) & (row != 1.0)].mean() for row in values])


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("chunk", CHUNKS)
def test_ie_t_equals_brute_force(probe, chunk):
    model = small_cnn()
    tset = T.rotations([30, 0, -45], padding="zeros")  # interpolated, the identity in the middle
    A = brute(model, probe, tset, LAYERS)
    result = tm.measure(model, probe, tset, measures=("per_transformation",), batch_size=chunk)
    assert result.layers_of("ie_t") == result.layers  # every layer, spatial or not
    for layer in LAYERS:
        for per in ("element", "channel"):
            values = result.get("ie_t", layer, per=per)
            expected = error_reference(A[layer], 1, per)
            assert values.shape == expected.shape and values.dtype == np.float64
            np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-9)
            dead = result.dead("ie_t", layer, per=per)
            assert (values[1][~dead[1]] == 0).all() and (values[1][dead[1]] == 1).all()  # the identity's row
        means = result.layer_means("ie_t")[layer]
        assert means.shape == (3,) and means[1] == 0
        np.testing.assert_allclose(means, live_rows_mean(error_reference(A[layer], 1, "channel")), rtol=1e-4)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("chunk", CHUNKS)
def test_ee_t_equals_brute_force_and_averages_to_ee(probe, chunk):
    model = small_cnn()
    turns = [1, 0, 2, 3]
    tset = T.rotations([90 * k for k in turns])  # exact pixel permutations, the identity second
    layers = ["0", "3", "5"]
    A = brute(model, probe, tset, layers, undo=rot90_undo(turns))
    result = tm.measure(model, probe, tset, measures=("equivariance_error",), batch_size=chunk)
    assert result.layers_of("ee_t") == result.layers_of("ee")
    for layer in layers:
        for per in ("element", "channel"):
            values = result.get("ee_t", layer, per=per)
            np.testing.assert_allclose(values, error_reference(A[layer], 1, per), rtol=1e-4, atol=1e-9)
            np.testing.assert_allclose(np.delete(values, 1, axis=0).mean(axis=0), result.get("ee", layer, per=per),
                                       rtol=1e-12, atol=1e-15)
            assert (values[1][~result.dead("ee_t", layer, per=per)[1]] == 0).all()


def test_ee_t_inside_the_disk_under_interpolated_rotations(probe):
    """Masked positions are skipped in every row as in ee; the identity's row is 0 though moving
    interpolated maps back by the identity rounds."""
    model = small_cnn()
    result = tm.measure(model, probe, T.rotations([0, 30, 60], padding="zeros"), measures=("equivariance_error",),
                        disk=True)
    for layer in ("0", "3"):
        element = result.get("ee_t", layer, per="element")
        assert np.isnan(element[:, :, 0, 0]).all() and np.isfinite(element[:, :, 3, 3]).all()
        np.testing.assert_allclose(element[1:].mean(axis=0), result.get("ee", layer, per="element"), rtol=1e-12)
        values = result.get("ee_t", layer)
        assert np.isfinite(values).all() and (values[0] == 0).all()
        np.testing.assert_allclose(values[1:].mean(axis=0), result.get("ee", layer), rtol=1e-12)


def test_stratified_per_class_and_mean(probe):
    labels = torch.arange(N) % 3
    model = small_cnn()
    turns = [0, 1, 2, 3]
    tset = T.rot90()
    A = brute(model, probe, tset, ["3", "9"])
    B = brute(model, probe, tset, ["3"], undo=rot90_undo(turns))
    result = tm.measure(model, (probe, labels), tset, measures=("per_transformation", "equivariance_error"),
                        batch_size=5, stratified=True)
    for measure, matrices, layer in (("ie_t", A, "3"), ("ie_t", A, "9"), ("ee_t", B, "3")):
        per_class = []
        for k in range(3):
            expected = error_reference(matrices[layer][labels.numpy() == k], 0, "channel")
            np.testing.assert_allclose(result.get(measure, layer, label=k), expected, rtol=1e-4, atol=1e-9)
            per_class.append(expected)
        np.testing.assert_allclose(result.get(measure, layer), np.mean(per_class, axis=0), rtol=1e-4, atol=1e-9)
        assert result.get(measure, layer, per="element", label=2).shape == (4, *result.layer_info(layer).unit_shape)


def test_p4cnn_errors_vanish_where_nvi_and_ee_do(probe):
    """On the p4-equivariant example network under rot90: after pooling over the group and the positions,
    nvi and every ie_t are ~0; with the cyclic shift on the group maps, ee and every ee_t are ~0."""
    torch.manual_seed(0)
    model = P4CNN(3, 5, width=0.5).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    result = tm.measure(model, probe, T.rot90(), measures=("invariance", "per_transformation", "equivariance_error"),
                        actions={"features.*": actions.cyclic_shift(4)})
    for layer in ("spatial_pool", "classifier.1"):
        assert result.layer_means("nvi")[layer] < 1e-4
        live = ~result.dead("ie_t", layer)
        assert live[1:].any() and result.get("ie_t", layer)[live].max() < 1e-8, layer
    for layer in result.layers_of("ee"):
        live = ~result.dead("ee_t", layer)
        assert result.layer_means("ee")[layer] < 1e-9 and result.get("ee_t", layer)[live].max() < 1e-9, layer
    for layer in ("features.0", "features.6", "orientation_pool"):  # equivariant, not invariant
        assert (result.layer_means("ie_t")[layer][1:] > 0.5).all(), layer
        assert result.layer_means("ie_t")[layer][0] == 0


def test_units_without_sample_variance_are_dead_in_every_row(probe):
    conv = nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        conv.bias[2] = -100.0  # channel 2 is 0 after the ReLU, whatever the input
    model = nn.Sequential(conv, nn.ReLU())
    result = tm.measure(model, probe, T.rotations(3), measures=("per_transformation",))
    values, dead = result.get("ie_t", "1"), result.dead("ie_t", "1")
    assert dead[:, 2].all() and not dead[:, :2].any() and (values[:, 2] == 1).all()
    np.testing.assert_array_equal(result.group_dead("ie_t", "1"), dead)
    np.testing.assert_allclose(result.layer_means("ie_t")["1"], values[:, :2].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(result.layer_means("ie_t", include_dead=True)["1"], values.mean(axis=1), rtol=1e-12)
    assert result.layer_means("ie_t")["1"][0] == 0


def test_the_identity_is_required(probe):
    model = small_cnn()
    with pytest.raises(ValueError, match="per_transformation compares every transformed .* must include the identity"):
        tm.measure(model, probe, T.rotations([30, 60]), measures=("per_transformation",))
    with pytest.raises(ValueError, match="equivariance_error and per_transformation compare every"):
        tm.measure(model, probe, T.rotations([30, 60]), measures=("equivariance_error", "per_transformation"))


def test_update_never_writes_into_activations_and_reads_nothing_back(probe):
    """Photometric transformations: the transformed activations are the reference's own tensor."""
    model = small_cnn()
    tset = T.brightness([0, 0.5])
    alone = tm.measure(model, probe, tset, measures=("invariance",), compile=False)
    together = tm.measure(model, probe, tset, measures=("per_transformation", "invariance"), compile=False)
    for layer in alone.layers:
        np.testing.assert_array_equal(alone.get("nvi", layer), together.get("nvi", layer))
    session = Measurement(model, T.rotations(4), measures=("per_transformation",), batch_size=4, stratified=True)
    observers = {}
    with _HostReads() as reads:
        session.stream(as_probe(probe, labels=torch.arange(N) % 3), [0, 1, 2], "transformed", observers,
                       AccuracyState(4, torch.device("cpu")), compiled=False)
    assert reads.seen == [] and observers


def test_eager_ops_per_chunk_do_not_grow_with_transformations_or_batch():
    model = small_cnn().eval()

    def per_chunk(t: int, batch_size: int) -> int:
        counts = []
        for chunks in (1, 2):
            images = torch.randn(batch_size * chunks, 3, 12, 12)
            tset = T.rotations([10.0 * k for k in range(t)])
            run = lambda: tm.measure(model, images, tset, measures=("per_transformation",),  # noqa: E731
                                     batch_size=batch_size, compile=False)
            counts.append(sum(top_level_ops(run).values()))
        return counts[1] - counts[0]

    assert per_chunk(4, 2) == per_chunk(16, 2) == per_chunk(4, 8)


def test_op_parameters_name_what_transforms_hold():
    examples = [T.Op("rotate", (45.0,)), T.Op("scale", (2.0, 1.5)), T.Op("translate", (0.1, -0.2)),
                T.Op("flip", ("horizontal",)), T.Op("identity", ()), T.Op("brightness", (0.2,)),
                T.Op("contrast", (1.5,))]
    assert {op.kind for op in examples} == set(metadata.OP_PARAMETERS)
    for op in examples:
        numbers = [key for key, value in op.as_dict().items() if key != "op" and not isinstance(value, str)]
        assert list(metadata.OP_PARAMETERS[op.kind][0]) == numbers, op.kind


# -- summaries, reader and route --------------------------------------------------------------------------
GROUPS = ("invariance", "equivariance_error", "per_transformation", "accuracy")
PRODUCT = T.product(T.rotations([0, 90, 180]), T.scalings([1, 1.25]))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("per_transformation")
    records = {
        "cnn": write_run(logdir / "cnn", [0, 2, 4], measures=GROUPS, dead_channel=True),
        "product": write_run(logdir / "product", [7], seed=1, transformations=PRODUCT,
                             measures=("per_transformation",)),
    }
    return logdir, records


def matrix(payload: dict) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in payload["values"]], dtype=np.float64)


def expected_matrix(result, measure: str) -> np.ndarray:
    return np.stack(list(result.layer_means(measure).values()))


def test_route_returns_what_the_sdk_measured(logged):
    logdir, records = logged
    client = client_for(logdir)
    runs = {entry["run"]: entry for entry in get_json(client, "/runs")["runs"]}
    assert runs["cnn"]["per_transformation"] == ["ie_t", "ee_t"] and runs["cnn"]["max_step"] == 4
    assert "ie_t" not in runs["cnn"]["measures"] and "ee_t" not in runs["cnn"]["measures"]
    assert runs["product"]["measures"] == [] and runs["product"]["per_transformation"] == ["ie_t"]
    for measure in ("ie_t", "ee_t"):
        for step in (None, 0, 2):
            params = dict(run="cnn", namespace="invariance", measure=measure) | ({} if step is None else {"step": step})
            payload = get_json(client, "/per_transformation", **params)
            result = records["cnn"][4 if step is None else step]
            assert payload["step"] == (4 if step is None else step) and payload["steps"] == [0, 2, 4]
            assert payload["layers"] == result.layers_of(measure)
            np.testing.assert_allclose(matrix(payload), expected_matrix(result, measure), rtol=1e-6, atol=1e-12)
            assert matrix(payload)[:, 0].max() == 0  # the identity (rotation 0°)
        assert [t["label"] for t in payload["transformations"]] == ["rotation 0°", "rotation 90°", "rotation 180°",
                                                                     "rotation 270°"]
        assert payload["transformations"][1]["ops"] == [
            {"kind": "rotate", "values": [90.0], "parameters": ["degrees"], "unit": "degrees", "axis": ""}
        ]
    # the dead channel of the first conv is left out of the means, as in every layer mean
    dead = records["cnn"][4].dead("ie_t", "0")
    assert dead[:, 0].all() and not payload["means_include_dead"]


def test_route_describes_a_product_set_by_its_ops(logged):
    logdir, records = logged
    payload = get_json(client_for(logdir), "/per_transformation", run="product", namespace="invariance", measure="ie_t")
    assert payload["step"] == 7 and payload["steps"] == [7]
    kinds = [[op["kind"] for op in t["ops"]] for t in payload["transformations"]]
    assert kinds == [["rotate", "scale"]] * 6
    grid = [(t["ops"][0]["values"][0], t["ops"][1]["values"][0]) for t in payload["transformations"]]
    assert grid == [(0.0, 1.0), (0.0, 1.25), (90.0, 1.0), (90.0, 1.25), (180.0, 1.0), (180.0, 1.25)]
    assert payload["transformations"][1]["ops"][1] == {"kind": "scale", "values": [1.25, 1.25],
                                                        "parameters": ["sx", "sy"], "unit": "factor", "axis": ""}
    np.testing.assert_allclose(matrix(payload), expected_matrix(records["product"][7], "ie_t"), rtol=1e-6)
    assert matrix(payload).shape == (len(records["product"][7].layers), 6) and (matrix(payload)[:, 0] == 0).all()


def test_the_event_holds_one_matrix_per_measure_and_no_unit_values(logged):
    logdir, records = logged
    p = provider(logdir)
    tensors = p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["cnn"]
    kinds = {tag: metadata.parse_plugin_data(s.plugin_content).kind for tag, s in tensors.items()}
    per_transformation = sorted(tag for tag, kind in kinds.items() if kind == metadata.PER_TRANSFORMATION)
    assert per_transformation == [metadata.per_transformation_tag("invariance", m) for m in ("ee_t", "ie_t")]
    assert not any("ie_t" in tag or "ee_t" in tag for tag in set(tensors) - set(per_transformation))
    blobs = p.list_blob_sequences(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["cnn"]
    rows = metadata.parse_plugin_data(blobs["invariance/units/equivariance_error"].plugin_content).measures
    assert rows == ["ee", metadata.DEAD_ROW] and "invariance/units/per_transformation" not in blobs
    units = p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.UNITS_PLUGIN_NAME)["cnn"]
    scalars = p.list_scalars(ctx(), experiment_id="", plugin_name="scalars")["cnn"]
    assert not any("_t/" in tag for tag in [*units, *scalars])


def test_reader_and_export(logged, tmp_path):
    logdir, records = logged
    logs = tm.read(logdir)
    run = logs["cnn"]
    assert set(run.per_transformation) == {"ie_t", "ee_t"} and run.measures == ["tvi", "svi", "nvi", "ee"]
    for measure, layers in run.per_transformation.items():
        assert list(layers) == records["cnn"][4].layers_of(measure)
        for layer, series in layers.items():
            assert list(series.steps) == [0, 2, 4] and series.values.shape == (3, 4)
            np.testing.assert_allclose(series.values[1], records["cnn"][2].layer_means(measure)[layer], rtol=1e-6)
    assert logs["product"].transformations == PRODUCT.labels and list(logs["product"].steps) == [7]
    out = tmp_path / "export.json"
    reader.export(logdir, "json", out)
    exported = json.loads(out.read_text())
    assert exported["product"]["per_transformation"]["transformations"] == PRODUCT.labels
    ie = exported["cnn"]["per_transformation"]["measures"]["ie_t"]["3"]
    assert ie["steps"] == [0, 2, 4] and np.allclose(ie["values"], run.per_transformation["ie_t"]["3"].values)
    text = io.StringIO()
    reader._write_csv(logs, text)
    assert {row["measure"] for row in csv.DictReader(io.StringIO(text.getvalue()))} == {"tvi", "svi", "nvi", "ee",
                                                                                       "accuracy"}


def test_include_dead_means_are_logged_as_such(tmp_path):
    images = torch.randn(8, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].bias[1] = -100.0  # dead after the ReLU
    with tm.Monitor(model, images, T.rotations(3), logdir=tmp_path / "run", every=1, measures=("per_transformation",),
                    means_include_dead=True) as monitor:
        result = monitor.step(0)
    payload = get_json(client_for(tmp_path), "/per_transformation", run="run", namespace="invariance", measure="ie_t")
    assert payload["means_include_dead"]
    np.testing.assert_allclose(matrix(payload)[1], result.layer_means("ie_t", include_dead=True)["1"], rtol=1e-6)
    assert matrix(payload)[1, 0] == 0.25  # the identity: three live channels at 0, the dead one at 1


@pytest.mark.parametrize(
    "params, status",
    [
        (dict(namespace="invariance", measure="ie_t"), 400),
        (dict(run="cnn", namespace="invariance"), 400),
        (dict(run="cnn", namespace="invariance", measure="ie_t", step="latest"), 400),
        (dict(run="cnn", namespace="invariance", measure="ie_t", step="3"), 404),
        (dict(run="cnn", namespace="invariance", measure="nvi"), 404),
        (dict(run="cnn", namespace="other", measure="ie_t"), 404),
        (dict(run="product", namespace="invariance", measure="ee_t"), 404),
        (dict(run="nope", namespace="invariance", measure="ie_t"), 404),
        (dict(run="cnn", namespace="invariance", measure="x" * 5000), 400),
    ],
)
def test_bad_parameters(logged, params, status):
    assert get(client_for(logged[0]), "/per_transformation", **params)[0] == status


def test_only_get_and_head(logged):
    client = client_for(logged[0])
    url = "/data/plugin/tm_invariance/per_transformation?run=cnn&namespace=invariance&measure=ie_t"
    assert client.post(url).status_code == 405 and client.head(url).status_code == 200


def test_data_not_as_the_sdk_writes_it_gives_404(tmp_path):
    layers = [metadata.Layer(name="a", index=0), metadata.Layer(name="b", index=1)]
    data = metadata.PluginData(kind=metadata.PER_TRANSFORMATION, namespace="invariance", measure="ie_t", layers=layers)
    tag = metadata.per_transformation_tag("invariance", "ie_t")
    for run, values in (("vector", np.ones(2, np.float32)), ("rows", np.ones((3, 4), np.float32)),
                        ("strings", np.array([b"not", b"numbers"]))):
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(values),
                                          metadata=metadata.create_summary_metadata(data))
        _write_event(tmp_path / run, value)
    client = client_for(tmp_path)
    assert {entry["run"] for entry in get_json(client, "/runs")["runs"]} == {"vector", "rows", "strings"}
    for run in ("vector", "rows", "strings"):
        assert get(client, "/per_transformation", run=run, namespace="invariance", measure="ie_t")[0] == 404, run
    with pytest.raises(ValueError, match="no tm_tensorboard runs"):  # the reader skips it too: nothing is left
        reader.read(tmp_path)


@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_real_tensorboard_serves_the_route(logged, load_fast):
    logdir, records = logged
    path = "/data/plugin/tm_invariance/per_transformation?run=cnn&namespace=invariance&measure=ee_t&step=2"
    with TensorBoard(logdir, f"--load_fast={load_fast}") as tb:
        payload = tb.wait_for(path, lambda p: p["steps"] == [0, 2, 4])
        np.testing.assert_allclose(matrix(payload), expected_matrix(records["cnn"][2], "ee_t"), rtol=1e-6, atol=1e-12)
        assert tb.get(path.replace("step=2", "step=abc"))[0] == 400
