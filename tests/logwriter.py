"""Writing real logdirs with the SDK for the plugin tests, and recording what was written."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import tm_tensorboard as tm
from models import small_cnn

MEASURES = ("invariance", "same_equivariance", "accuracy")


def probe(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def write_run(
    rundir: Path,
    steps: list[int],
    *,
    seed: int = 0,
    transformations=None,
    measures=MEASURES,
    model: nn.Module | None = None,
    dead_channel: bool = False,
) -> dict[int, tm.MeasureResult]:
    """Log ``steps`` of a small CNN whose weights change between steps; returns {step: result}."""
    model = model or small_cnn(seed=seed)
    images, labels = probe(seed=seed)
    record = {}
    with tm.Monitor(
        model, (images, labels), transformations or tm.transforms.rotations(4), logdir=rundir, every=1, measures=measures
    ) as monitor:
        for step in steps:
            with torch.no_grad():  # stand-in for a training step: every weight moves a little
                for p in model.parameters():
                    if p.dim() > 1:
                        p.add_(0.05 * torch.randn_like(p))
                if dead_channel:  # channel 0 of the first conv never fires after its ReLU
                    model[0].weight[0].zero_()
                    model[0].bias[0] = -1.0
            record[step] = monitor.step(step)
    return record
