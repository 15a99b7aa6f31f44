"""The InvarianceCallback in real Lightning fits: where it writes, what the plugin serves, that training is
unchanged, DDP (rank 0 writes the merged measures), and that lightning stays an optional import."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

import tm_tensorboard as tm  # noqa: E402
from tm_tensorboard import metadata  # noqa: E402
from tm_tensorboard.lightning import InvarianceCallback  # noqa: E402
from lightning_ddp_worker import DDP_BATCH_SIZE, DDP_EVERY, DDP_STEPS, Classifier, loader, probe  # noqa: E402
from logs import ctx, provider, rows  # noqa: E402
from test_plugin_routes import client_for, get_json  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")

TESTS = Path(__file__).parent
EVERYTHING = dict(experiment_id="", downsample=1000, run_tag_filter=None)


@pytest.fixture(autouse=True)
def lightning_globals(monkeypatch):
    """Undo what Trainer(deterministic=True) and seed_everything change process-wide; show Lightning's
    info lines (rank_zero_info) to caplog."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


class Diverging(Classifier):
    """Raises in its sixth training step, as a run that fails midway."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError("diverged")
        return super().training_step(batch, batch_idx)


def fit(root: Path, callback: InvarianceCallback | None, logger, max_steps: int = 12, module: type = Classifier,
        **trainer_kwargs) -> tuple[L.Trainer, Classifier]:
    L.seed_everything(0)
    model = module()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, deterministic=True, default_root_dir=root,
                        logger=logger, callbacks=[] if callback is None else [callback], log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        **trainer_kwargs)
    trainer.fit(model, loader())
    return trainer, model


def measured_steps(logdir: Path, run: str) -> list[int]:
    """The steps of one layer-means series, in the order written (a step written twice would show twice)."""
    data = provider(logdir).read_tensors(ctx(), plugin_name=metadata.PLUGIN_NAME, **EVERYTHING)[run]
    return [datum.step for datum in data[metadata.means_tag("invariance", "nvi")]]


def test_writes_into_the_tensorboard_loggers_run_and_the_plugin_serves_it(tmp_path):
    callback = InvarianceCallback(probe(), tm.transforms.rotations(4), every=5)
    _, model = fit(tmp_path, callback, TensorBoardLogger(tmp_path, name="tb"))
    run = "tb/version_0"
    assert len(list((tmp_path / run).glob("events.out.tfevents.*"))) == 1  # Lightning's writer, one event file
    p = provider(tmp_path)
    assert "train_loss" in p.list_scalars(ctx(), experiment_id="", plugin_name="scalars")[run]  # Lightning's self.log
    assert measured_steps(tmp_path, run) == [0, 5, 10, 12]  # the start, every 5 steps, the end

    client = client_for(tmp_path)
    runs = {entry["run"]: entry for entry in get_json(client, "/runs")["runs"]}
    assert set(runs) == {run}
    assert runs[run]["max_step"] == 12
    assert [layer["name"] for layer in runs[run]["layers"]] == [  # (the BatchNorm net.4 derived from net.3)
        "net.0", "net.1", "net.2", "net.3", "net.4", "net.5", "net.6", "net.9"]
    means = get_json(client, "/layer_means", run=run, namespace="invariance", measure="nvi")
    assert means["steps"] == [0, 5, 10, 12]
    final = tm.measure(model, probe(), tm.transforms.rotations(4))  # the fitted weights, measured afresh
    np.testing.assert_allclose(rows(means)[-1], list(final.layer_means("nvi").values()), rtol=1e-6)
    assert callback.monitor.writer is None  # closed when training ended; Lightning's writer is left to Lightning


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_without_tensorboard_logger_writes_its_own_run_and_says_where(tmp_path, caplog, logger):
    caplog.set_level(logging.INFO)
    callback = InvarianceCallback(probe(), tm.transforms.rotations(4), every=2)
    # gradient accumulation: every global_step is seen on two batches, and measured once
    fit(tmp_path, callback, CSVLogger(tmp_path) if logger == "csv" else False, max_steps=6, accumulate_grad_batches=2)
    run = tmp_path / "tm_invariance" / "version_0"
    assert f"tm_tensorboard: invariance is logged to its own run directory {run}" in caplog.text
    assert measured_steps(tmp_path / "tm_invariance", "version_0") == [0, 2, 4, 6]

    again = InvarianceCallback(probe(), tm.transforms.rotations(4), every=2)
    fit(tmp_path, again, False, max_steps=2)
    assert again.logdir == str(tmp_path / "tm_invariance" / "version_1")  # the next fit, the next version


def test_logdir_overrides_the_tensorboard_logger(tmp_path):
    callback = InvarianceCallback(probe(), tm.transforms.rotations(4), every=4, logdir=tmp_path / "mine")
    fit(tmp_path, callback, TensorBoardLogger(tmp_path, name="tb"), max_steps=4)
    assert measured_steps(tmp_path, "mine") == [0, 4]
    tensors = provider(tmp_path).list_tensors(ctx(), experiment_id="", plugin_name=metadata.PLUGIN_NAME)
    assert not tensors.get("tb/version_0")


def test_a_second_fit_continues_the_loggers_run(tmp_path):
    callback = InvarianceCallback(probe(), tm.transforms.rotations(4), every=3)
    trainer, model = fit(tmp_path, callback, TensorBoardLogger(tmp_path, name="tb"), max_steps=3)
    trainer.fit_loop.epoch_loop.max_steps = 6  # logger.finalize() closed Lightning's writer after the first fit
    trainer.fit(model, loader())
    assert measured_steps(tmp_path, "tb/version_0") == [0, 3, 6]


def test_an_exception_closes_the_monitor_and_keeps_what_was_written(tmp_path):
    callback = InvarianceCallback(probe(), tm.transforms.rotations(4), every=2)
    with pytest.raises(RuntimeError, match="diverged"):
        fit(tmp_path, callback, TensorBoardLogger(tmp_path, name="tb"), module=Diverging)
    with pytest.raises(RuntimeError, match="closed"):
        callback.monitor.step(6)
    assert measured_steps(tmp_path, "tb/version_0") == [0, 2, 4]


def test_measuring_does_not_change_training(tmp_path):
    _, plain = fit(tmp_path / "plain", None, TensorBoardLogger(tmp_path / "plain"))
    callback = InvarianceCallback(probe(), tm.transforms.rotations(4), every=3,
                                  measures=("invariance", "same_equivariance", "accuracy"))
    _, measured = fit(tmp_path / "measured", callback, TensorBoardLogger(tmp_path / "measured"))
    assert measured_steps(tmp_path / "measured", "lightning_logs/version_0") == [0, 3, 6, 9, 12]
    for (name, a), b in zip(plain.state_dict().items(), measured.state_dict().values()):
        assert torch.equal(a, b), name


def test_keywords_checked_when_made():
    with pytest.raises(TypeError, match="logdir=, not writer="):
        InvarianceCallback(probe(), tm.transforms.rotations(4), writer=object())
    with pytest.raises(TypeError, match="evry"):
        InvarianceCallback(probe(), tm.transforms.rotations(4), evry=10)


def test_ddp_rank0_writes_the_merged_measures(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(TESTS / "lightning_ddp_worker.py"), str(tmp_path)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert done.returncode == 0, done.stdout
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1  # rank 1 wrote nothing
    run = "tb/version_0"
    last = DDP_STEPS
    assert measured_steps(tmp_path, run) == [0, DDP_EVERY, 2 * DDP_EVERY, last]
    data = provider(tmp_path).read_tensors(ctx(), plugin_name=metadata.UNITS_PLUGIN_NAME, **EVERYTHING)[run]
    model = Classifier()
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    single = tm.measure(model, probe(), tm.transforms.rotations(4), measures=("invariance", "same_equivariance"),
                        batch_size=DDP_BATCH_SIZE)
    for measure in single.measures:
        for layer in single.layers_of(measure):
            logged = next(d.numpy for d in data[metadata.unit_tag("invariance", measure, layer)] if d.step == last)
            np.testing.assert_allclose(logged, single.get(measure, layer).astype(np.float32), rtol=1e-5, err_msg=layer)


def test_importing_tm_tensorboard_does_not_import_lightning():
    code = ("import sys, tm_tensorboard, tm_tensorboard.monitor; tm_tensorboard.Monitor; tm_tensorboard.measure; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_lightning_says_how_to_install():
    code = ("import sys; sys.modules['lightning'] = None\n"
            "try:\n    import tm_tensorboard.lightning\n"
            "except ImportError as error:\n    print(error)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True).stdout
    assert "pip install tm-tensorboard[lightning]" in out
