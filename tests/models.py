"""Small models shared by the tests."""
from __future__ import annotations

import torch
from torch import nn


def small_cnn(in_channels: int = 3, classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32, 12),
        nn.ReLU(),
        nn.Linear(12, classes),
    )


def symmetrize_rot90(conv: nn.Conv2d) -> None:
    """Make every kernel invariant to rot90, so the convolution commutes with rot90 of its input."""
    with torch.no_grad():
        w = conv.weight
        w.copy_(sum(torch.rot90(w, k, dims=(2, 3)) for k in range(4)) / 4)


def rot90_equivariant_cnn(seed: int = 0) -> nn.Module:
    """Convolutions with rot90-symmetric kernels (equivariant), then global average pooling (invariant)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for m in model:
        if isinstance(m, nn.Conv2d):
            symmetrize_rot90(m)
    return model


def randomize_batchnorm(model: nn.Module, variance: tuple[float, float] = (0.5, 2.0)) -> None:
    """Random running statistics (running variances uniform in ``variance``) and affine parameters, drawn
    from the global RNG, so that eval-mode BatchNorm is not the identity."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(*variance)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
