"""Measuring saved checkpoints (``tm-tensorboard measure``, ``measure_checkpoints``) and the Python-spelled
transformation sets the command line takes, on real checkpoint files from a short training run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard import context
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from torch import nn
from werkzeug import test as werkzeug_test

import tm_tensorboard as tm
from tm_tensorboard import cli
from tm_tensorboard.examples.models import P4CNN, SimpleCNN
from tm_tensorboard.examples.shapes import CLASSES, make_shapes
from tm_tensorboard.expressions import parse_actions, parse_transformations
from tm_tensorboard.plugin.invariance_plugin import InvariancePlugin
from logs import provider, rows

FACTORY = "tm_tensorboard.examples.models:SimpleCNN"
ARGS = ["--arg", "in_channels=1", "--arg", f"num_classes={len(CLASSES)}", "--arg", "width=0.25"]
PROBE_SIZE = 24


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SimpleCNN(1, len(CLASSES), width=0.25)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short training run that saves three checkpoints the ways people do, and the probe as a file."""
    root = tmp_path_factory.mktemp("training")
    images, labels = make_shapes(96, 32, seed=1)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saved = {}
    for step in range(1, 31):
        batch = slice((step * 16) % 96, (step * 16) % 96 + 16)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 10:  # a bare state dict, the step in the file name
            torch.save(model.state_dict(), root / "step-10.pt")
        elif step == 20:  # a training-loop checkpoint: weights, optimizer and the step
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 20}, root / "latest.pt")
        elif step == 30:  # Lightning-style: keys prefixed by the LightningModule's attribute, global_step
            state = {f"net.{k}": v for k, v in model.state_dict().items()}
            torch.save({"state_dict": state, "global_step": 30, "epoch": 2}, root / "epoch=2.ckpt")
        if step in (10, 20, 30):
            saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    probe = make_shapes(PROBE_SIZE, 32, seed=2)
    (root / "probe").mkdir()
    torch.save(probe, root / "probe" / "probe.pt")
    return root, saved, probe


def _client(logdir):
    data_provider = provider(logdir)
    plugin = InvariancePlugin(base_plugin.TBContext(data_provider=data_provider, logdir=str(logdir)))
    app = application.TensorBoardWSGI([plugin], data_provider=data_provider)
    return werkzeug_test.Client(app)


def _get(client, path: str) -> dict:
    response = client.get(f"/data/plugin/tm_invariance{path}")
    assert response.status_code == 200, response.get_data()[:300]
    return json.loads(response.get_data())


def test_command_measures_every_checkpoint_and_the_plugin_serves_them(run, tmp_path, capsys):
    root, saved, probe = run
    logdir = tmp_path / "runs" / "checkpoints"
    status = cli.main(["measure", str(root / "*.pt"), str(root / "*.ckpt"), "--factory", FACTORY, *ARGS,
                       "--probe", str(root / "probe" / "probe.pt"), "-t", "rot90()", "--logdir", str(logdir)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "[1/3]" in out and "step 10" in out and "step 30" in out and "tensorboard --logdir" in out

    client = _client(tmp_path / "runs")
    listed = _get(client, "/runs")
    entry = next(r for r in listed["runs"] if r["run"] == "checkpoints")
    means = _get(client, "/layer_means?run=checkpoints&namespace=invariance&measure=nvi")
    assert means["steps"] == [10, 20, 30]
    values = rows(means)
    accuracy = rows(_get(client, "/accuracy?run=checkpoints&namespace=invariance"))
    for i, step in enumerate((10, 20, 30)):  # each step is the measurement of that checkpoint's weights
        model = _model(seed=1)
        model.load_state_dict(saved[step])
        expected = tm.measure(model, probe, tm.transforms.rot90(), measures=("invariance", "same_equivariance", "accuracy"))
        assert list(expected.layer_means("nvi")) == entry["measure_layers"]["nvi"]
        np.testing.assert_allclose(values[i], list(expected.layer_means("nvi").values()), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(accuracy[i], expected.accuracy, rtol=1e-6)
    units = _get(client, "/units?run=checkpoints&namespace=invariance&measure=nvse&step=20")
    assert units["step"] == 20 and entry["max_step"] == 30 and entry["accuracy"]


def test_console_script_as_the_readme_writes_it(run, tmp_path):
    root, _, _ = run
    command = [str(Path(sys.executable).with_name("tm-tensorboard")), "measure", str(root), "--factory", FACTORY, *ARGS, "--probe", "shapes",
               "--num-samples", "16", "--transformations", "rotations(4)", "--measures", "invariance",
               "--logdir", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logged 3 checkpoint(s)" in done.stdout
    p = provider(tmp_path)
    scalars = p.list_scalars(context.RequestContext(), experiment_id="", plugin_name="scalars")["run"]
    assert "invariance_mean/nvi/features.0" in scalars
    assert not any(tag.startswith("invariance_mean/nvse") for tag in scalars)  # --measures invariance


def test_a_checkpoint_of_another_model_is_named_and_skipped(run, tmp_path, capsys):
    root, saved, probe = run
    other = tmp_path / "other"
    other.mkdir()
    torch.save(saved[10], other / "step-10.pt")
    torch.save(P4CNN(1, len(CLASSES), width=0.25).state_dict(), other / "step-15.pt")  # another architecture
    torch.save(_model(seed=3).state_dict(), other / "step-20.pt")
    status = cli.main(["measure", str(other), "--factory", FACTORY, *ARGS, "--probe", str(root / "probe" / "probe.pt"),
                       "-t", "rot90()", "--measures", "invariance", "--logdir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert status == 1
    skipped = [line for line in out.splitlines() if "skipped" in line and "step-15.pt" in line]
    assert len(skipped) == 1 and "does not fit the model" in skipped[0] and "missing" in skipped[0]
    means = rows(_get(_client(tmp_path), "/layer_means?run=run&namespace=invariance&measure=nvi"))
    assert means.shape[0] == 2 and "skipped 1" in out


def test_measure_checkpoints_in_python(run, tmp_path):
    root, saved, probe = run
    report = tm.measure_checkpoints(
        lambda: _model(seed=5), [root / "latest.pt", root / "step-10.pt"], probe,
        "product(rot90(), flips(vertical=False))", logdir=tmp_path / "run", measures=("invariance",),
        progress=None,
    )
    assert [step for _, step in report.measured] == [10, 20] and not report.skipped  # in step order
    assert sorted(p.name for p, _ in report.measured) == ["latest.pt", "step-10.pt"]
    with pytest.raises(ValueError, match="already holds event files"):  # never the same steps twice in a run
        tm.measure_checkpoints(lambda: _model(), root / "latest.pt", probe, "rot90()", logdir=tmp_path / "run",
                               progress=None)


def test_steps_keys_and_trust(run, tmp_path):
    root, saved, probe = run
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"module." + k: v for k, v in saved[10].items()}, folder / "ddp.pt")  # no step anywhere
    torch.save({"model": saved[20], "epoch": 7, "note": nn.Identity()}, folder / "pickled.pt")  # a Python object
    report = tm.measure_checkpoints(lambda: _model(), folder, probe, "rot90()", logdir=tmp_path / "a",
                                    measures=("invariance",), progress=None)
    reasons = {p.name: r for p, r in report.skipped}
    assert not report.measured
    assert "has no step" in reasons["ddp.pt"]
    assert "--trust" in reasons["pickled.pt"]
    torch.save({"module." + k: v for k, v in saved[10].items()}, folder / "ddp-40.pt")
    report = tm.measure_checkpoints(lambda: _model(), [folder / "ddp-40.pt", folder / "pickled.pt"], probe,
                                    "rot90()", logdir=tmp_path / "b", measures=("invariance",), trust=True,
                                    progress=None)
    assert [(p.name, s) for p, s in report.measured] == [("pickled.pt", 7), ("ddp-40.pt", 40)]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--factory", "no_such_package.models:Net"], "cannot import 'no_such_package.models'"),
        (["--factory", "tm_tensorboard.examples.models"], "package.module:function"),
        (["--factory", "tm_tensorboard.examples.models:NoSuchNet"], "has no 'NoSuchNet'"),
        (["-t", "rotate(16)"], "'rotate' in 'rotate(16)' is not one of ours"),
        (["-t", "__import__('os').system('true')"], "not a transformation set"),
        (["--probe", "imagenet"], "neither a file nor one of shapes, mnist, cifar10"),
        (["--arg", "width"], "NAME=VALUE"),
        (["--arg", "depth=3"], "unexpected keyword argument 'depth'"),
    ],
)
def test_bad_input_is_one_line_that_says_what_to_do(run, tmp_path, capsys, change, message):
    root, _, _ = run
    argv = ["measure", str(root / "step-10.pt"), "--factory", FACTORY, *ARGS, "--probe", str(root / "probe" / "probe.pt"),
            "-t", "rot90()", "--logdir", str(tmp_path / "run")]
    for i in range(0, len(change), 2):
        if change[i] == "--arg":
            argv += change[i : i + 2]
        else:
            argv[argv.index(change[i]) + 1] = change[i + 1]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tm-tensorboard measure: error:"), err
    assert message in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_checkpoint_is_an_error(tmp_path, capsys):
    argv = ["measure", str(tmp_path / "nope-*.pt"), "--factory", FACTORY, *ARGS, "--probe", "shapes",
            "-t", "rot90()", "--logdir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "no checkpoint file matches" in capsys.readouterr().err


def test_transformation_expressions_equal_the_python_calls():
    t = tm.transforms
    cases = {
        "rotations(16)": t.rotations(16),
        "rotations([-30, 0, 30], padding='zeros')": t.rotations([-30, 0, 30], padding="zeros"),
        "rot90()": t.rot90(),
        "translations(0.1)": t.translations(0.1),
        "translations([(0.1, -0.05), (0, 0)])": t.translations([(0.1, -0.05), (0, 0)]),
        "scalings([0.8, 1.2])": t.scalings([0.8, 1.2]),
        "flips(vertical=False)": t.flips(vertical=False),
        "brightness([-0.1, 0.1])": t.brightness([-0.1, 0.1]),
        "contrast([0.5, 2])": t.contrast([0.5, 2]),
        "product(rotations(8), flips())": t.product(t.rotations(8), t.flips()),
        "product(product(rot90(), flips()), brightness([0.1]))": t.product(t.product(t.rot90(), t.flips()), t.brightness([0.1])),
    }
    for text, expected in cases.items():
        parsed = parse_transformations(text)
        assert parsed.id == expected.id and parsed.labels == expected.labels, text
        assert (parsed.interpolation, parsed.padding) == (expected.interpolation, expected.padding)


@pytest.mark.parametrize(
    "text, message",
    [
        ("rotations", "not a transformation set"),
        ("rotations(16) + flips()", "not a transformation set"),
        ("os.system('ls')", "not a transformation set"),
        ("open('x')", "'open' in"),
        ("rotations(x)", "'x' is not a number"),
        ("rotations(1.5)", "takes an int n"),
        ("rotations(**{'angles': 4})", "** arguments"),
        ("rotations(16", "not a valid transformation set expression"),
        ("product(rotations(4), 3)", "not a transformation set"),
        ("", "give a transformation set"),
    ],
)
def test_transformation_expressions_refuse_anything_else(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        parse_transformations(text)


def test_actions_expressions():
    assert parse_actions([]) is None
    assert parse_actions(["cyclic_shift(4)"]).name == "cyclic_shift(4)"
    mapping = parse_actions(["features.*=cyclic_shift(4)", "head=orientation_pooling(4)"])
    assert {k: v.name for k, v in mapping.items()} == {"features.*": "cyclic_shift(4)", "head": "orientation_pooling(4)"}
    with pytest.raises(ValueError, match="PATTERN=ACTION"):
        parse_actions(["cyclic_shift(4)", "identity()"])
    with pytest.raises(ValueError, match="not one of ours"):
        parse_actions(["rot90()"])


def test_the_readme_command_as_written(tmp_path):
    """The README's `tm-tensorboard measure` command, run verbatim next to a checkpoints/ folder."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Measuring saved checkpoints"):]
    command = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    (tmp_path / "checkpoints").mkdir()
    for step in (100, 200):
        torch.manual_seed(step)
        torch.save(SimpleCNN(1, 5).state_dict(), tmp_path / "checkpoints" / f"step-{step}.pt")
    bin_dir = str(Path(sys.executable).parent)
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]})
    assert done.returncode == 0, done.stdout + done.stderr
    logs = tm.read(tmp_path / "runs")
    assert list(logs) == ["from-checkpoints"]
    assert logs["from-checkpoints"].means["nvi"]["features.0"].steps.tolist() == [100, 200]
    assert logs["from-checkpoints"].accuracy is not None  # the shapes probe has labels


@pytest.mark.parametrize("command", [[], ["demo"], ["measure"], ["export"]])
def test_help_is_plain_text(command, capsys):
    """--help shows no reStructuredText markup (double backticks) from docstrings."""
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "usage: tm-tensorboard" in text and "``" not in text
