"""A Lightning fit under the "ddp" strategy (2 CPU processes, gloo) with the InvarianceCallback, for
tests/test_lightning.py; also the LightningModule, data and probe that test uses.

    python tests/lightning_ddp_worker.py OUTDIR

Lightning's launcher runs this script again for rank 1. Rank 0 saves the final weights to OUTDIR/final.pt;
the measures go into the TensorBoardLogger run OUTDIR/tb/version_0.
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tm_tensorboard as tm
from tm_tensorboard.lightning import InvarianceCallback

DDP_STEPS, DDP_EVERY, DDP_BATCH_SIZE = 10, 4, 6  # a rank's shard of the 12-sample probe is one chunk


class Classifier(L.LightningModule):
    """A small CNN with BatchNorm (buffers that differ across DDP ranks) and dropout (training RNG)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(32, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(n: int = 96) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=8, shuffle=True)


def probe() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(12, 3, 16, 16, generator=g), torch.arange(12) % 4


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = Classifier()
    callback = InvarianceCallback(probe(), tm.transforms.rotations(4), every=DDP_EVERY, batch_size=DDP_BATCH_SIZE,
                                  measures=("invariance", "same_equivariance", "accuracy"))
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=DDP_STEPS, callbacks=[callback],
                        logger=TensorBoardLogger(out, name="tb", version=0), log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, loader())
    if trainer.is_global_zero:
        torch.save(model.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
