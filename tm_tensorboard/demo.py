"""The one-command demo: the field's classic experiment on a download-free dataset, then TensorBoard.

Three runs on procedurally drawn, orientation-sensitive glyphs (``examples/shapes.py``), measured under
the exact rot90 group: a CNN trained on upright glyphs, the same CNN trained with random rotations, and a
p4 group-equivariant CNN, invariant to rot90 by construction. The Invariance tab then shows what the
papers show: invariance appears in the last layers with augmentation, and exactly after the group pooling
of the equivariant network.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import actions, transforms
from .examples.models import P4CNN, SimpleCNN
from .examples.shapes import CLASSES, make_shapes
from .examples.training import TrainingRun

__all__ = ["DemoRun", "RUNS", "write_demo_logs", "serve", "PortInUse"]


@dataclass(frozen=True)
class DemoRun:
    name: str
    description: str
    augmentation: str
    equivariant: bool


RUNS = (
    DemoRun("cnn", "simple CNN, upright glyphs", "none", False),
    DemoRun("cnn-rotation-augmented", "simple CNN, randomly rotated glyphs", "rotation", False),
    DemoRun("p4cnn", "p4 group-equivariant CNN, upright glyphs", "none", True),
)


def _model(run: DemoRun) -> nn.Module:
    torch.manual_seed(0)
    model_class = P4CNN if run.equivariant else SimpleCNN
    return model_class(1, len(CLASSES), width=0.5)


def write_demo_logs(
    logdir: str | Path, *, steps: int = 400, every: int = 50, train_size: int = 6000, probe_size: int = 128,
    image_size: int = 32, verbose: bool = True, report_every: float = 5.0,
) -> dict[str, dict[str, float]]:
    """Train the three runs under ``logdir`` (one run directory each), taking turns step by step so that
    all three fill the tab together; returns their metrics. With ``verbose``, a progress line every
    ``report_every`` seconds and half-way (step, training accuracy per run, time left) and the test
    accuracies."""
    logdir = Path(logdir)
    say = (lambda text: print(text, flush=True)) if verbose else (lambda text: None)
    train = make_shapes(train_size, image_size, seed=1)
    test = make_shapes(max(1000, probe_size), image_size, seed=2)
    start = time.perf_counter()
    runs = {
        run.name: TrainingRun(
            _model(run),
            train,
            test,
            logdir / run.name,
            augmentation=run.augmentation,
            steps=steps,
            probe_size=probe_size,
            transformations=transforms.rot90(),
            every=every,
            log_every=max(1, every // 2),
            monitor_options=dict(
                measures=("invariance", "same_equivariance", "equivariance_error", "accuracy"),
                noise_floor=True,
                # nine short measurements: compiling the statistics (seconds) would not pay for itself
                compile=False,
                # the group layers' orientation channels turn with the input (regular representation)
                actions={"features.*": actions.cyclic_shift(4)} if run.equivariant else None,
            ),
        )
        for run in RUNS
    }
    say(f"training {', '.join(runs)} for {steps} steps each, measured every {every} steps")
    training_start = last_report = time.perf_counter()
    for step in range(1, steps + 1):
        for training in runs.values():
            training.step()
        now = time.perf_counter()
        if (now - last_report >= report_every or step == steps // 2) and step < steps:  # and once half-way
            last_report = now
            left = (now - training_start) / step * (steps - step)
            accuracies = ", ".join(f"{name} {t.train_accuracy():.2f}" for name, t in runs.items())
            say(f"  step {step}/{steps}: training accuracy {accuracies}; about {left:.0f} s left")
    results = {name: training.finish() for name, training in runs.items()}
    for name, metrics in results.items():
        say(f"  {name}: test accuracy {metrics['test/accuracy']:.3f} (randomly rotated: "
            f"{metrics['test/accuracy_rotated']:.3f})")
    say(f"trained in {time.perf_counter() - start:.0f} s")
    return results


class PortInUse(RuntimeError):
    """TensorBoard cannot listen on the asked port."""


def serve(logdir: str | Path, port: int = 6006, reload_interval: float = 2.0) -> str:
    """Start TensorBoard on 127.0.0.1 in this process (background threads); returns its URL.

    It reloads the logdir every ``reload_interval`` seconds, so runs being trained show up as they go.
    Raises PortInUse (one line, with what to do) when the port is taken.
    """
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
                          "--reload_interval", str(reload_interval)])
    try:
        return board.launch()
    except program.TensorBoardPortInUseError as error:
        raise PortInUse(f"port {port} is in use (another TensorBoard?): pass --port 0 to pick a free one, or "
                        "--port N") from error
