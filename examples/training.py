"""The training loop the example scripts and the demo share: plain PyTorch plus the two Monitor lines.

Each call trains one model variant (one run directory): random batches, optional augmentation, the
usual loss / accuracy scalars through a SummaryWriter, and ``monitor.step(step)`` in the loop.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import tm_tensorboard as tm

__all__ = ["AUGMENTATIONS", "augment", "train_run"]

AUGMENTATIONS = ("none", "rotation", "affine")


def augment(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Randomly transformed copies of a batch: "rotation" (uniform angle in [0°, 360°)), "affine"
    (rotation ±180°, scale 0.9–1.1, translation ±10 % of the size) or "none"; zeros outside the image."""
    if kind == "none":
        return images
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose from {', '.join(AUGMENTATIONS)}")
    n = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(0, 2 * math.pi)
    scale = uniform(0.9, 1.1) if kind == "affine" else torch.ones(n)
    shift = torch.stack([uniform(-0.2, 0.2), uniform(-0.2, 0.2)], dim=1) if kind == "affine" else torch.zeros(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
            for i in range(0, len(images), batch_size)
        )
    model.train()
    return correct / max(len(images), 1)


def train_run(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    logdir: str | Path,
    *,
    augmentation: str = "none",
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    probe_size: int = 256,
    transformations: tm.transforms.TransformationSet | None = None,
    every: int = 100,
    log_every: int = 50,
    seed: int = 0,
    monitor_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``steps`` steps with Adam, logging to ``logdir``; returns the final metrics.

    The Monitor measures on the first ``probe_size`` test samples (untransformed, with labels, so it
    also logs accuracy per transformation) every ``every`` steps and at the last step.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = train
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    writer = SummaryWriter(str(logdir))
    probe = (test[0][:probe_size], test[1][:probe_size])
    options = {"measures": ("invariance", "same_equivariance", "accuracy"), **(monitor_options or {})}
    monitor = tm.Monitor(                                                          # line 1 of 2
        model, probe, transformations or tm.transforms.rotations(16), writer=writer, every=every, **options
    )
    start = time.perf_counter()
    monitor.step(0)  # the untrained network, where "invariance during training" starts
    model.train()
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = augment(images[batch], augmentation, generator)
        loss = F.cross_entropy(model(x), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            writer.add_scalar("train/loss", loss.item(), step)
        monitor.step(step, force=step == steps)                                   # line 2 of 2
    metrics = {
        "test/accuracy": _accuracy(model, *test),
        "test/accuracy_rotated": _accuracy(model, augment(test[0], "rotation", generator), test[1]),
        "train/seconds": time.perf_counter() - start,
    }
    for name, value in metrics.items():
        writer.add_scalar(name, value, steps)
    monitor.close()
    writer.close()
    return metrics
