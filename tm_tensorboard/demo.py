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
from .examples.training import train_run

__all__ = ["DemoRun", "RUNS", "write_demo_logs", "serve"]


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
    image_size: int = 32, verbose: bool = True,
) -> dict[str, dict[str, float]]:
    """Train the three runs and log them under ``logdir`` (one run directory each); returns their metrics."""
    logdir = Path(logdir)
    train = make_shapes(train_size, image_size, seed=1)
    test = make_shapes(max(1000, probe_size), image_size, seed=2)
    results = {}
    for run in RUNS:
        start = time.perf_counter()
        if verbose:
            print(f"training {run.name}: {run.description}, {steps} steps ...", flush=True)
        metrics = train_run(
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
                # the group layers' orientation channels turn with the input (regular representation)
                actions={"features.*": actions.cyclic_shift(4)} if run.equivariant else None,
            ),
        )
        results[run.name] = metrics
        if verbose:
            print(
                f"  test accuracy {metrics['test/accuracy']:.3f} (randomly rotated: "
                f"{metrics['test/accuracy_rotated']:.3f}) in {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    return results


def serve(logdir: str | Path, port: int = 6006) -> str:
    """Start TensorBoard on 127.0.0.1 in this process (background threads); returns its URL."""
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)])
    return board.launch()
