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

__all__ = ["AUGMENTATIONS", "augment", "TrainingRun", "train_run"]

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


class TrainingRun:
    """One model variant trained step by step (one run directory), so that several can take turns.

    Made: the Monitor is set up and measures the untrained network (step 0, where "invariance during
    training" starts). ``step()``: one Adam step on a random batch, the loss scalar, ``monitor.step``.
    ``finish()``: the last step measured, test metrics logged, writers closed.
    """

    def __init__(
        self,
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
    ):
        torch.manual_seed(seed)
        self.model, self.train, self.test = model, train, test
        self.augmentation, self.steps, self.batch_size, self.log_every = augmentation, steps, batch_size, log_every
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.writer = SummaryWriter(str(logdir))
        probe = (test[0][:probe_size], test[1][:probe_size])
        options = {"measures": ("invariance", "same_equivariance", "accuracy"), **(monitor_options or {})}
        self.monitor = tm.Monitor(                                                 # line 1 of 2
            model, probe, transformations or tm.transforms.rotations(16), writer=self.writer, every=every, **options
        )
        self.start = time.perf_counter()
        self.monitor.step(0)
        self.step_count = 0
        self.correct = self.seen = 0  # training accuracy since the last ``train_accuracy()``
        model.train()

    @property
    def done(self) -> bool:
        return self.step_count >= self.steps

    def step(self) -> None:
        self.step_count += 1
        step = self.step_count
        images, labels = self.train
        batch = torch.randint(0, len(images), (self.batch_size,), generator=self.generator)
        x = augment(images[batch], self.augmentation, self.generator)
        logits = self.model(x)
        loss = F.cross_entropy(logits, labels[batch])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.correct += (logits.argmax(1) == labels[batch]).sum().detach()  # read only when asked (no sync)
        self.seen += len(batch)
        if step % self.log_every == 0 or step == self.steps:
            self.writer.add_scalar("train/loss", loss.item(), step)
        self.monitor.step(step, force=step == self.steps)                         # line 2 of 2

    def train_accuracy(self) -> float:
        """Accuracy on the training batches since the last call (augmented as trained)."""
        value = float(self.correct) / max(self.seen, 1)
        self.correct = self.seen = 0
        return value

    def finish(self) -> dict[str, float]:
        """Test accuracy, upright and randomly rotated; logs them and closes the writers."""
        test = self.test
        metrics = {
            "test/accuracy": _accuracy(self.model, *test),
            "test/accuracy_rotated": _accuracy(self.model, augment(test[0], "rotation", self.generator), test[1]),
            "train/seconds": time.perf_counter() - self.start,
        }
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, self.steps)
        self.monitor.close()
        self.writer.close()
        return metrics


def train_run(model: nn.Module, train, test, logdir: str | Path, **options: Any) -> dict[str, float]:
    """Train ``model`` for ``steps`` steps with Adam, logging to ``logdir``; returns the final metrics.

    The Monitor measures on the first ``probe_size`` test samples (untransformed, with labels, so it
    also logs accuracy per transformation) every ``every`` steps and at the last step. Keywords: those
    of ``TrainingRun``.
    """
    run = TrainingRun(model, train, test, logdir, **options)
    while not run.done:
        run.step()
    return run.finish()
