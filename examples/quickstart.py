"""Measure a small CNN's layer-by-layer invariance to rotations, no data download needed.

    python examples/quickstart.py

Two models are compared: an ordinary CNN and one whose kernels are symmetric under 90° rotations
followed by global average pooling, which makes it invariant to the exact rot90 group by design.
"""
import torch
from torch import nn

import tm_tensorboard as tm


def cnn(symmetric: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    if symmetric:
        with torch.no_grad():
            for conv in (model[0], model[2]):
                conv.weight.copy_(sum(torch.rot90(conv.weight, k, dims=(2, 3)) for k in range(4)) / 4)
    return model


def main() -> None:
    probe = torch.randn(256, 1, 28, 28)
    transformations = tm.transforms.rot90()
    for name, symmetric in (("ordinary CNN", False), ("rot90-symmetric CNN", True)):
        result = tm.measure(cnn(symmetric), probe, transformations)
        print(f"\n{name}: mean normalized variance per layer (0 = invariant, ~1 = not)")
        print(f"{'layer':<8}{'type':<20}{'nvi':>10}{'nvse':>10}")
        nvse = result.layer_means("nvse")
        for layer, value in result.layer_means("nvi").items():
            kind = result.layer_info(layer).module_type
            se = f"{nvse[layer]:10.4f}" if layer in nvse else f"{'-':>10}"
            print(f"{layer:<8}{kind:<20}{value:10.4f}{se}")


if __name__ == "__main__":
    main()
