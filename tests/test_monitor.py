"""The two-line Monitor in a real training loop, read back with TensorBoard's own readers."""
from __future__ import annotations

import glob

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

import tm_tensorboard as tm
from tm_tensorboard import metadata
from logs import ctx, provider
from models import small_cnn

MEASURES = ("invariance", "same_equivariance", "accuracy")


def _data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def train(steps: int, monitor_kwargs: dict | None, logdir=None, record=None) -> nn.Module:
    """A plain training loop; with ``monitor_kwargs`` it gets exactly the two added lines."""
    torch.manual_seed(0)
    np.random.seed(0)
    images, labels = _data()
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True)
    if monitor_kwargs is not None:
        monitor = tm.Monitor(model, (images[:16], labels[:16]), tm.transforms.rotations(4), logdir=logdir, **monitor_kwargs)
    step = 0
    while step < steps:
        for x, y in loader:
            model.train()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if monitor_kwargs is not None:
                result = monitor.step(step)
                if result is not None and record is not None:
                    record[step] = tm.measure(model, (images[:16], labels[:16]), tm.transforms.rotations(4), measures=MEASURES)
            if step == steps:
                break
    if monitor_kwargs is not None:
        monitor.close()
    return model


def test_monitor_changes_nothing_in_training(tmp_path):
    plain = train(12, None)
    monitored = train(12, dict(every=3, measures=MEASURES), logdir=tmp_path / "run")
    for (k, a), b in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(a, b), k


def test_logs_read_back_through_tensorboard(tmp_path):
    record: dict[int, tm.MeasureResult] = {}
    train(10, dict(every=4, measures=MEASURES), logdir=tmp_path / "run", record=record)
    assert sorted(record) == [4, 8]
    some = record[4]
    p = provider(tmp_path)
    everything = dict(experiment_id="", downsample=1000, run_tag_filter=None)

    # Per-layer unit vectors, for other tools.
    units = p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.UNITS_PLUGIN_NAME)["run"]
    assert set(units) == {metadata.unit_tag("invariance", m, l) for m in some.measures for l in some.layers_of(m)}
    data = p.read_tensors(ctx(), plugin_name=metadata.UNITS_PLUGIN_NAME, **everything)["run"]
    for tag, series in units.items():
        info = metadata.parse_plugin_data(series.plugin_content)
        assert info.kind == metadata.UNIT_VALUES
        assert [d.step for d in data[tag]] == [4, 8]
        for datum in data[tag]:
            expected = record[datum.step].get(info.measure, info.layer.name)
            assert datum.numpy.shape == expected.shape == (info.layer.num_units,)
            np.testing.assert_allclose(datum.numpy, expected.astype(np.float32), rtol=1e-5)
        assert tuple(info.layer.unit_shape) == some.layer_info(info.layer.name).unit_shape
        assert info.layer.index == some.layers.index(info.layer.name)

    # What the Invariance tab reads: snapshots (blob sequences), layer means, accuracy, configuration.
    tensors = p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run"]
    assert set(tensors) == {metadata.means_tag("invariance", m) for m in some.measures} | {
        "invariance/accuracy",
        "invariance/config",
    }
    data = p.read_tensors(ctx(), plugin_name=metadata.PLUGIN_NAME, **everything)["run"]
    for tag, series in tensors.items():
        info = metadata.parse_plugin_data(series.plugin_content)
        if info.kind == metadata.LAYER_MEANS:
            assert [layer.name for layer in info.layers] == some.layers_of(info.measure)
            assert [d.step for d in data[tag]] == [4, 8]
            expected = list(record[8].layer_means(info.measure).values())
            np.testing.assert_allclose(data[tag][-1].numpy, expected, rtol=1e-5)
        elif info.kind == metadata.ACCURACY:
            np.testing.assert_allclose(data[tag][-1].numpy, record[8].accuracy, rtol=1e-6)
        else:
            assert info.kind == metadata.RUN_CONFIG
            assert info.config.probe_size == 16 and len(info.config.transformations) == 4
            assert [layer.name for layer in info.config.layers] == some.layers
            assert info.config.transformations[1].label == "rotation 90°"
    blobs = p.list_blob_sequences(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run"]
    assert set(blobs) == {"invariance/units/invariance", "invariance/units/same_equivariance"}
    sequences = p.read_blob_sequences(ctx(), plugin_name=metadata.PLUGIN_NAME, **everything)["run"]
    for tag, series in blobs.items():
        info = metadata.parse_plugin_data(series.plugin_content)
        assert info.kind == metadata.UNIT_SNAPSHOT
        for datum in sequences[tag]:
            snapshot = metadata.decode_snapshot(p.read_blob(ctx(), blob_key=datum.values[0].blob_key), info)
            measures = [m for m in info.measures if m != metadata.DEAD_ROW]
            assert info.measures == measures + [metadata.DEAD_ROW]
            ratio = measures[2]  # nvi / nvse: its 0 / 0 units are the dead ones
            for measure in measures:
                for layer, values, dead in zip(info.layers, snapshot[measure], snapshot[metadata.DEAD_ROW]):
                    expected = record[datum.step].get(measure, layer.name).astype(np.float32)
                    np.testing.assert_array_equal(values, expected)
                    np.testing.assert_array_equal(dead, record[datum.step].dead(ratio, layer.name))

    # Each layer's mean as an ordinary scalar.
    scalars = p.list_scalars(ctx(), experiment_id="", plugin_name="scalars")["run"]
    assert metadata.scalar_tag("invariance", "nvi", "3") in scalars
    points = p.read_scalars(ctx(), plugin_name="scalars", **everything)["run"][metadata.scalar_tag("invariance", "nvi", "3")]
    assert [(d.step, pytest.approx(d.value, rel=1e-5)) for d in points] == [
        (s, record[s].layer_means("nvi")["3"]) for s in (4, 8)
    ]


def test_scalars_readable_by_tbparse(tmp_path):
    tbparse = pytest.importorskip("tbparse")
    train(4, dict(every=2), logdir=tmp_path / "run")
    frame = tbparse.SummaryReader(str(tmp_path / "run")).scalars
    rows = frame[frame.tag == "invariance_mean/nvi/0"]
    assert list(rows.step) == [2, 4]


def test_users_summary_writer_one_writer_per_run(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    images, labels = _data()
    model = small_cnn()
    with tm.Monitor(model, images[:8], tm.transforms.flips(), writer=writer, every=1) as monitor:
        for step in range(3):
            writer.add_scalar("loss", 1.0 / (step + 1), step)
            monitor.step(step)
    writer.add_scalar("loss", 0.1, 3)  # the user's writer stays open
    writer.close()
    assert len(glob.glob(str(tmp_path / "run" / "events.out.tfevents.*"))) == 1
    p = provider(tmp_path)
    assert "loss" in p.list_scalars(ctx(), experiment_id="", plugin_name="scalars")["run"]
    assert "invariance/nvi/0" in p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.UNITS_PLUGIN_NAME)["run"]


def test_two_monitors_two_runs_do_not_mix(tmp_path):
    images, _ = _data()
    a, b = small_cnn(seed=1), small_cnn(seed=2)
    ma = tm.Monitor(a, images[:8], tm.transforms.rotations(3), logdir=tmp_path / "a", every=1, measures=("invariance",))
    mb = tm.Monitor(b, images[:8], tm.transforms.flips(), logdir=tmp_path / "b", every=1, layers=["0", "3"])
    ra, rb = ma.step(0), mb.step(0)
    ma.close(), mb.close()
    p = provider(tmp_path)
    tensors = p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.UNITS_PLUGIN_NAME)
    assert "invariance/nvse/0" not in tensors["a"] and "invariance/nvi/9" in tensors["a"]
    assert "invariance/nvi/9" not in tensors["b"] and "invariance/nvse/3" in tensors["b"]
    data = p.read_tensors(ctx(), experiment_id="", plugin_name=metadata.UNITS_PLUGIN_NAME, downsample=10, run_tag_filter=None)
    np.testing.assert_allclose(data["a"]["invariance/nvi/0"][0].numpy, ra.get("nvi", "0").astype(np.float32))
    np.testing.assert_allclose(data["b"]["invariance/nvi/0"][0].numpy, rb.get("nvi", "0").astype(np.float32))
    config_series = p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["b"]["invariance/config"]
    config = metadata.parse_plugin_data(config_series.plugin_content).config
    assert config.transformation_set_id.startswith("flips(") and [l.name for l in config.layers] == ["0", "3"]


def test_every_and_repeated_steps(tmp_path):
    images, _ = _data()
    monitor = tm.Monitor(small_cnn(), images[:6], tm.transforms.flips(), logdir=tmp_path / "r", every=5)
    measured = [s for s in [0, 1, 4, 5, 5, 7, 10] if monitor.step(s) is not None]
    assert measured == [0, 5, 10]  # step 5 twice (gradient accumulation) is measured once
    assert monitor.step(11, force=True) is not None
    probe_tensor = monitor._probe.images
    monitor.step(15)
    assert monitor._probe.images is probe_tensor  # the probe was moved to the device once
    monitor.close()
    with pytest.raises(RuntimeError, match="closed"):
        monitor.step(20)


class Flaky(nn.Module):
    """Fails while ``failing`` is set, as a measurement might (out of memory on a busy GPU)."""

    failing = False

    def forward(self, x):
        if self.failing:
            raise RuntimeError("CUDA out of memory (simulated)")
        return x


def test_failure_warns_and_training_continues_unless_strict(tmp_path):
    images, _ = _data()
    model = nn.Sequential(small_cnn(), Flaky())
    monitor = tm.Monitor(model, images[:6], tm.transforms.flips(), logdir=tmp_path / "r", every=1)
    strict = tm.Monitor(model, images[:6], tm.transforms.flips(), logdir=tmp_path / "s", every=1, strict=True)
    model[1].failing = True
    with pytest.warns(RuntimeWarning, match="step 1 failed.*out of memory"):
        assert monitor.step(1) is None
    with pytest.raises(RuntimeError, match="out of memory"):
        strict.step(1)
    model[1].failing = False
    assert monitor.step(2) is not None


def test_bad_input_fails_at_construction(tmp_path):
    images, _ = _data()
    model = small_cnn()
    rot = tm.transforms.rotations(4)
    with pytest.raises(ValueError, match="could not run on the transformed probe"):
        tm.Monitor(model, torch.randn(4, 1, 8, 8), rot, logdir=tmp_path / "x")
    with pytest.raises(ValueError, match="every must be"):
        tm.Monitor(model, images[:4], rot, logdir=tmp_path / "x", every=0)
    closed = SummaryWriter(str(tmp_path / "closed"))
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        tm.Monitor(model, images[:4], rot, writer=closed)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot write to logdir"):
        tm.Monitor(model, images[:4], rot, logdir=blocker / "run")
    with pytest.raises(ValueError, match="exactly one of logdir"):
        tm.Monitor(model, images[:4], rot)
    with pytest.raises(ValueError, match="valid module names"):
        tm.Monitor(model, images[:4], rot, logdir=tmp_path / "x", layers=["fc"])
    assert not (tmp_path / "x").exists()  # nothing was written by the failed constructions


def test_new_measures_and_noise_floor_are_logged(tmp_path):
    images, labels = _data()
    groups = ("invariance", "equivariance_error", "goodfellow", "anova")
    with tm.Monitor(small_cnn(), images[:8], tm.transforms.rot90(), logdir=tmp_path / "run", every=1, measures=groups,
                    noise_floor=True, actions={"3": tm.actions.cyclic_shift(4)}, disk=True, alpha=0.05) as monitor:
        result = monitor.step(0)
    p = provider(tmp_path)
    tensors = p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run"]
    assert {metadata.means_tag("invariance", m) for m in ("ee", "gf", "gfl", "gfg", "anova_f", "anova")} <= set(tensors)
    config = metadata.parse_plugin_data(tensors["invariance/config"].plugin_content).config
    assert config.noise_floor and config.disk and config.alpha == 0.05
    assert config.actions["3"] == "cyclic_shift(4)" and config.actions["0"] == "identity"
    assert config.layers[0].name == "input" and {d.name for d in config.measures} >= {"ee", "gf", "anova"}
    blobs = p.list_blob_sequences(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run"]
    rows = {tag: metadata.parse_plugin_data(s.plugin_content).measures for tag, s in blobs.items()}
    assert rows["invariance/units/anova"] == ["anova_f", "anova"]  # no ratio, no dead row
    assert rows["invariance/units/goodfellow"] == ["gfl", "gfg", "gf", metadata.DEAD_ROW]
    means = p.read_tensors(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME, downsample=10,
                           run_tag_filter=None)["run"]["invariance/ee"][0].numpy
    np.testing.assert_allclose(means, list(result.layer_means("ee").values()), rtol=1e-5)


def test_without_unit_tensors_the_tab_data_is_all_there(tmp_path):
    images, _ = _data()
    with tm.Monitor(small_cnn(), images[:6], tm.transforms.flips(), logdir=tmp_path / "run", every=1,
                    unit_tensors=False) as monitor:
        monitor.step(0)
    p = provider(tmp_path)
    assert "run" not in p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.UNITS_PLUGIN_NAME)
    assert "invariance/nvi" in p.list_tensors(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run"]
    assert "invariance/units/invariance" in p.list_blob_sequences(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run"]
    assert "invariance_mean/nvi/0" in p.list_scalars(ctx(), experiment_id="", plugin_name="scalars")["run"]


def test_model_without_feature_maps_logs_default_measures(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.ReLU(), nn.Linear(8, 3))
    images, _ = _data()
    with tm.Monitor(model, images[:6], tm.transforms.flips(), logdir=tmp_path / "run", every=1) as monitor:
        result = monitor.step(0)
    assert result.layers_of("nvse") == [] and result.layers_of("nvi") == ["1", "2", "3"]
    blobs = provider(tmp_path).list_blob_sequences(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)["run"]
    assert set(blobs) == {"invariance/units/invariance"}


@pytest.mark.parametrize("include_dead", [False, True])
def test_layer_means_over_live_units_unless_asked(tmp_path, include_dead):
    """A ReLU channel that never fires is dead (nvi 0 / 0 = 1): the logged layer means, the scalars and the
    config record leave it out by default and count it with means_include_dead=True (tmeasures' mean)."""
    torch.manual_seed(0)
    model = small_cnn()
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0
    images, labels = _data()
    probe = images[:16]
    with tm.Monitor(model, probe, tm.transforms.rotations(4), logdir=tmp_path / "run", every=1,
                    measures=("invariance",), means_include_dead=include_dead) as monitor:
        result = monitor.step(1)
    assert result.dead("nvi", "1")[0]
    expected = result.layer_means("nvi", include_dead=include_dead)["1"]
    assert expected != pytest.approx(result.layer_means("nvi", include_dead=not include_dead)["1"])
    logs = tm.read(tmp_path)
    assert logs["run"].means["nvi"]["1"].values[0] == np.float32(expected)
    assert logs["run"].config["means_include_dead"] is include_dead


class _DoublesItsInput(nn.Module):
    """Doubles the batch it takes in place, then a small CNN: a batch kept from a measurement before must not be
    taken again."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()

    def forward(self, x):
        return self.net(x.mul_(2))


@pytest.mark.parametrize("in_place", [False, True], ids=["model", "model_changing_its_input"])
def test_the_transformed_probe_is_kept_between_measurements_with_the_same_numbers(tmp_path, in_place):
    """A Monitor transforms its probe's chunks once and takes them again at its next measurement (on CPU, up to
    kept_batches.MAX_BYTES): the numbers of a Monitor that transforms them every time; a model that changes its
    input in place gets new ones."""
    torch.manual_seed(0)
    model = _DoublesItsInput() if in_place else small_cnn()
    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # 2 shards of 4 chunks
    results, made = [], []
    for keep in (True, False):
        monitor = tm.Monitor(model, images, tm.transforms.rotations(4), logdir=tmp_path / str(keep), every=1,
                             batch_size=5, measures=("invariance",), error_bars=2)
        if not keep:
            monitor._measurement.kept_batches = None
        apply = monitor._measurement.transformations.apply
        monitor._measurement.transformations.apply = lambda x: made.append(keep) or apply(x)
        results.append([monitor.step(step) for step in (1, 2, 3)])
        monitor.close()
    chunks = 40 // 5
    assert made.count(False) == 3 * chunks
    assert made.count(True) == (3 if in_place else 1) * chunks
    for kept, fresh in zip(*results):
        for layer in kept.layers:
            np.testing.assert_array_equal(kept.get("nvi", layer), fresh.get("nvi", layer))
            np.testing.assert_array_equal(kept.stderr("nvi", layer), fresh.stderr("nvi", layer))


def test_a_probe_changed_in_place_between_measurements_is_measured_as_it_is_now(tmp_path):
    """The Monitor's probe shares your tensor's memory: change it in place and the next measurement transforms it
    anew (nothing kept from before), as a Monitor made on it now measures it."""
    torch.manual_seed(0)
    model = small_cnn()
    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(every=1, batch_size=5, measures=("invariance",), error_bars=2)
    monitor = tm.Monitor(model, images, tm.transforms.rotations(4), logdir=tmp_path / "kept", **kwargs)
    before = monitor.step(1)
    images.mul_(0.5).add_(0.25)
    after = monitor.step(2)
    monitor.close()
    fresh = tm.Monitor(model, images, tm.transforms.rotations(4), logdir=tmp_path / "fresh", **kwargs)
    now = fresh.step(1)
    fresh.close()
    assert any(not np.array_equal(before.get("nvi", layer), after.get("nvi", layer)) for layer in before.layers)
    for layer in now.layers:
        np.testing.assert_array_equal(after.get("nvi", layer), now.get("nvi", layer))
