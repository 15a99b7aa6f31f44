"""The networks the invariance literature measures, sized for MNIST (1×28×28) and CIFAR10 (3×32×32) images.

Every model is built as ``Model(in_channels, num_classes, width=...)`` and maps [B, C, H, W] images to
[B, num_classes] logits; ``width`` multiplies the channel counts named in each docstring (1.0 = the
reference layout), so small widths give CPU-sized versions of the same architecture. Every place a ReLU
is applied has its own ``nn.ReLU`` instance (none is shared, none is in-place), so each activation has its
own module name in ``model.named_modules()``. Forward passes create no tensors of their own, so the
models run on any device and in any floating-point dtype.

``P4CNN`` is invariant to rotations by multiples of 90° (up to float rounding); its group feature maps use the
channel-major layout described in ``P4LiftingConv2d``. ``VisionTransformer`` uses GELUs, each its own module
too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SimpleCNN",
    "AllConvNet",
    "VGGStyle",
    "BasicBlock",
    "ResNet18Style",
    "Bottleneck",
    "ResNet50",
    "P4LiftingConv2d",
    "P4GroupConv2d",
    "P4BatchNorm2d",
    "SymmetricMaxPool2d",
    "OrientationMaxPool",
    "P4CNN",
    "AffineResample",
    "STNCNN",
    "TransformerBlock",
    "VisionTransformer",
    "MODELS",
    "build_model",
]

ORIENTATIONS = 4  # the rotations by 0°, 90°, 180° and 270° of the p4 group


def _scaled(channels: int, width: float) -> int:
    """``channels × width`` rounded, at least 1."""
    if not width > 0:
        raise ValueError(f"width must be a positive multiplier of the reference channel counts; got {width!r}")
    return max(1, round(channels * width))


class SimpleCNN(nn.Module):
    """The rotation papers' simple CNN: two blocks of conv3×3-ReLU-conv3×3-ReLU-maxpool (32, 64 channels),
    then an MLP head (128 hidden units) on a 4×4 grid of the last feature maps.

    The 4×4 adaptive average pooling lets any input size in; the head keeps the spatial layout, so the
    network is not invariant to rotations by construction.
    """

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()
        c1, c2, hidden = _scaled(32, width), _scaled(64, width), _scaled(128, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AllConvNet(nn.Module):
    """All-Convolutional net (Springenberg et al. 2015, All-CNN-C): 3×3 convolutions at 96 and 192 channels
    where stride-2 convolutions replace max pooling, 1×1 convolutions down to one map per class, and global
    average pooling of those maps as the logits.

    Each convolution but the last is followed by BatchNorm (not in the paper; it makes the net train
    reliably at small widths without tuning) and a ReLU.
    """

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()
        c1, c2 = _scaled(96, width), _scaled(192, width)
        # (in, out, kernel, stride, padding) of the convolutions followed by BatchNorm and ReLU
        plan = [
            (in_channels, c1, 3, 1, 1), (c1, c1, 3, 1, 1), (c1, c1, 3, 2, 1),
            (c1, c2, 3, 1, 1), (c2, c2, 3, 1, 1), (c2, c2, 3, 2, 1),
            (c2, c2, 3, 1, 0), (c2, c2, 1, 1, 0),
        ]
        layers: list[nn.Module] = []
        for cin, cout, kernel, stride, padding in plan:
            layers += [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        layers.append(nn.Conv2d(c2, num_classes, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.features(x)))


class VGGStyle(nn.Module):
    """VGG-16's convolutional layout for small images: stages of 2, 2, 3, 3 conv3×3-BN-ReLU at 64, 128, 256,
    512 channels, each stage followed by 2×2 max pooling, then global average pooling and a 512-unit MLP.

    ``width`` defaults to 0.25 (16…128 channels) so it trains on a CPU; ``width=1`` gives VGG-16's widths.
    """

    STAGES = ((64, 2), (128, 2), (256, 3), (512, 3))

    def __init__(self, in_channels: int, num_classes: int, width: float = 0.25):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for channels, depth in self.STAGES:
            cout = _scaled(channels, width)
            for _ in range(depth):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        hidden = _scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3×3-BN-ReLU-conv3×3-BN plus a shortcut (identity, or 1×1 conv + BN when the
    stride or channel count changes), then ReLU. ``relu1`` and ``relu2`` are separate modules."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18Style(nn.Module):
    """ResNet-18 for small images (the usual CIFAR variant): a conv3×3-BN-ReLU stem without max pooling,
    four stages of two ``BasicBlock``s at 64, 128, 256, 512 channels (strides 1, 2, 2, 2), global average
    pooling and a linear classifier. ``width`` scales all channel counts (0.25 gives 16…128)."""

    STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
    BLOCKS_PER_STAGE = 2

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()
        stem = _scaled(64, width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        stages = []
        cin = stem
        for channels, stride in self.STAGES:
            cout = _scaled(channels, width)
            blocks = [BasicBlock(cin, cout, stride)]
            blocks += [BasicBlock(cout, cout) for _ in range(self.BLOCKS_PER_STAGE - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.stages(self.stem(x))))


class Bottleneck(nn.Module):
    """ResNet bottleneck block (torchvision's ResNet-50, "v1.5": the stride sits on the 3×3 convolution):
    conv1×1-BN-ReLU to ``channels``, conv3×3-BN-ReLU at ``stride``, conv1×1-BN to ``channels × expansion``,
    plus a shortcut (identity, or 1×1 conv at ``stride`` + BN when the stride or channel count changes),
    then ReLU. ``relu1``, ``relu2`` and ``relu3`` are separate modules."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class ResNet50(nn.Module):
    """ImageNet's ResNet-50 (He et al. 2016, torchvision's layout): a conv7×7 stride-2 -BN-ReLU stem and 3×3
    stride-2 max pooling (``stem``), four stages of 3, 4, 6, 3 ``Bottleneck`` blocks at 64, 128, 256, 512
    channels (×4 out; strides 1, 2, 2, 2), global average pooling and a linear classifier. 224 px images
    make 112, 56, 28, 14 and 7 px maps; 158 leaf modules are observed by default. ``width`` scales all channel
    counts (0.25 gives 16…512 out); ``width=1``, 1000 classes: 25 557 032 parameters."""

    STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (channels, blocks, stride)

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        stem = _scaled(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages = []
        cin = stem
        for channels, depth, stride in self.STAGES:
            cmid = _scaled(channels, width)
            blocks = [Bottleneck(cin, cmid, stride)]
            cin = cmid * Bottleneck.expansion
            blocks += [Bottleneck(cin, cmid) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.stages(self.stem(x))))


def _check_odd(kernel_size: int) -> None:
    # With an even kernel, "same" padding is lopsided and the convolution no longer commutes with rot90.
    if kernel_size % 2 != 1:
        raise ValueError(f"p4 convolutions need an odd kernel_size to commute with rot90; got {kernel_size}")


def _init_like_conv(weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """nn.Conv2d's default initialization; the fan-in counts every input orientation and kernel position."""
    nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
    if bias is not None:
        fan_in = weight[0].numel()
        nn.init.uniform_(bias, -fan_in ** -0.5, fan_in ** -0.5)


class P4LiftingConv2d(nn.Module):
    """Lifting convolution Z2 → p4 (Cohen & Welling 2016): each filter is applied rotated by 0°, 90°, 180°
    and 270° (``torch.rot90(w, r, dims=(-2, -1))``), giving 4 orientation channels per filter.

    Group feature-map layout, shared by every p4 module here: [B, C·4, H, W], channel-major, channel
    ``c·4 + r`` holding filter c at orientation r; ``x.unflatten(1, (C, 4))`` gives [B, C, 4, H, W].
    Equivariance: for ``rot = torch.rot90(·, 1, dims=(-2, -1))``, ``f(rot(x))[c, r] = rot(f(x)[c, r - 1])``
    (r - 1 mod 4): the maps rotate spatially and every group of 4 channels shifts cyclically by +1, i.e.
    ``torch.roll(..., 1, dims=2)`` on the [B, C, 4, H, W] view.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        _check_odd(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_like_conv(self.weight, self.bias)

    def expanded_weight(self) -> torch.Tensor:
        """The [C_out·4, C_in, k, k] Z2 filter bank: filter c at orientation r is rot90(w[c], r)."""
        rotated = [torch.rot90(self.weight, r, dims=(-2, -1)) for r in range(ORIENTATIONS)]
        return torch.stack(rotated, dim=1).flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.repeat_interleave(ORIENTATIONS)
        return F.conv2d(x, self.expanded_weight(), bias, padding=self.weight.shape[-1] // 2)


class P4GroupConv2d(nn.Module):
    """Group convolution p4 → p4: the filter for output orientation r is the base filter rotated spatially
    by r quarter turns AND cyclically shifted by r along its input-orientation axis, so output orientation r
    sees input orientation s through base slice (s - r) mod 4. Input and output use the layout and obey the
    equivariance law documented in ``P4LiftingConv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        _check_odd(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, ORIENTATIONS, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_like_conv(self.weight, self.bias)

    def expanded_weight(self) -> torch.Tensor:
        """The [C_out·4, C_in·4, k, k] Z2 filter bank in the channel-major group layout."""
        transformed = [
            torch.rot90(torch.roll(self.weight, r, dims=2), r, dims=(-2, -1)) for r in range(ORIENTATIONS)
        ]
        return torch.stack(transformed, dim=1).flatten(2, 3).flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.repeat_interleave(ORIENTATIONS)
        return F.conv2d(x, self.expanded_weight(), bias, padding=self.weight.shape[-1] // 2)


class P4BatchNorm2d(nn.BatchNorm3d):
    """BatchNorm for group feature maps [B, C·4, H, W]: one mean / variance / affine pair per filter, shared
    by its 4 orientations (a plain BatchNorm2d over C·4 channels would normalize orientations differently
    and break equivariance). ``num_features`` is C, the number of filters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unflatten(1, (-1, ORIENTATIONS))).flatten(1, 2)


class SymmetricMaxPool2d(nn.Module):
    """Max pooling that halves each spatial size (rounding up) and commutes with rot90 and flips.

    Windows must sit symmetrically about the map's centre: 2×2 / stride 2 on an even-sized axis, 3 wide /
    stride 2 / padding 1 on an odd-sized one (a 2×2 window on an odd axis would drop the last row on one
    side only).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        kernel = tuple(2 if n % 2 == 0 else 3 for n in (height, width))
        padding = tuple(0 if n % 2 == 0 else 1 for n in (height, width))
        return F.max_pool2d(x, kernel, stride=2, padding=padding)


class OrientationMaxPool(nn.Module):
    """Pooling over the group: [B, C·4, H, W] → [B, C, H, W], the maximum over each filter's 4 orientations.
    Its output is rot90-equivariant in the ordinary sense (rotating the input rotates the maps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (-1, ORIENTATIONS)).amax(dim=2)


class P4CNN(nn.Module):
    """Rot90 group-equivariant CNN (Cohen & Welling's p4-CNN): its logits are invariant to rotations by
    multiples of 90° (up to float rounding) by construction, for inputs of any size. Not invariant to flips.

    ``features``: a lifting convolution and four p4 group convolutions (8, 8, 16, 16, 16 filters × 4
    orientations = SimpleCNN's 32 / 64 real channels), each followed by ``P4BatchNorm2d`` and a ReLU, with
    ``SymmetricMaxPool2d`` after the second and fourth; every module in ``features`` outputs group maps in the
    layout of ``P4LiftingConv2d``. Then ``OrientationMaxPool`` (invariant over orientations), global average
    pooling (invariant over positions) and a linear classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()
        c1, c2 = _scaled(8, width), _scaled(16, width)

        def block(conv: nn.Module, channels: int) -> list[nn.Module]:
            return [conv, P4BatchNorm2d(channels), nn.ReLU()]

        self.features = nn.Sequential(
            *block(P4LiftingConv2d(in_channels, c1, bias=False), c1),
            *block(P4GroupConv2d(c1, c1, bias=False), c1),
            SymmetricMaxPool2d(),
            *block(P4GroupConv2d(c1, c2, bias=False), c2),
            *block(P4GroupConv2d(c2, c2, bias=False), c2),
            SymmetricMaxPool2d(),
            *block(P4GroupConv2d(c2, c2, bias=False), c2),
        )
        self.orientation_pool = OrientationMaxPool()
        self.spatial_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.spatial_pool(self.orientation_pool(self.features(x))))


class AffineResample(nn.Module):
    """Resamples images [B, C, H, W] with per-image 2×3 affine matrices ``theta`` [B, 2, 3] (normalized
    coordinates, bilinear, zeros outside); a module so that the warped images can be observed."""

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class STNCNN(nn.Module):
    """Spatial-transformer network (Jaderberg et al. 2015) in front of a ``SimpleCNN``: a localization net
    (conv5×5-maxpool-ReLU at 8 and 16 channels, a 3×3 grid, a 32-unit MLP) predicts a 2×3 affine matrix per
    image, ``resample`` warps the image with it and ``classifier`` classifies the result.

    The last localization layer starts at zero weights and an identity bias, so an untrained STN passes
    images through unchanged.
    """

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()
        c1, c2, hidden = _scaled(8, width), _scaled(16, width), _scaled(32, width)
        self.localization = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(c1, c2, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(c2 * 9, hidden), nn.ReLU(),
            nn.Linear(hidden, 6),
        )
        theta = self.localization[-1]
        nn.init.zeros_(theta.weight)
        with torch.no_grad():
            theta.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
        self.resample = AffineResample()
        self.classifier = SimpleCNN(in_channels, num_classes, width)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The input images warped by their predicted affine matrices (what the classifier sees)."""
        return self.resample(x, self.localization(x).view(-1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.transform(x))


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block on tokens [B, L, D]: ``x + attn(norm1(x))``, then
    ``x + mlp(norm2(x))`` with multi-head self-attention (``nn.MultiheadAttention``, batch first) and an MLP
    Linear(D, 4D)-GELU-Linear(4D, D). Every part acts on each token alone except attention, which is
    permutation-equivariant over the tokens: the block commutes with any reordering of its tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al. 2021): non-overlapping ``patch_size`` patches embedded
    by a stride-``patch_size`` convolution (``patch_embed``, feature maps [D, h, w]), flattened row-major to
    h·w tokens plus a positional embedding, a learned class token in front, ``depth`` ``TransformerBlock``s
    (``blocks.0``, ``blocks.1``, ...: tokens [B, 1 + h·w, D]), a final LayerNorm and a linear classifier on
    the class token. D = ``heads`` × 16 channels (64) times ``width``; 28- and 32-pixel images give 7×7 and
    8×8 grids of 4-pixel patches.

    The positional embedding is the sum of a learned row and a learned column embedding (up to
    ``max_grid`` rows and columns, so any image up to ``max_grid × patch_size`` pixels fits). Measure the
    blocks with ``tm.actions.patch_grid(*model.grid(H, W), cls_tokens=1)`` to lay their tokens out on the
    patch grid. Without a positional embedding and with rot90-symmetric patch kernels the blocks would be
    exactly rot90-equivariant on that grid (attention is permutation-equivariant); with it they are not.
    """

    cls_tokens = 1

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0, patch_size: int = 4, depth: int = 4,
                 heads: int = 4, max_grid: int = 16):
        super().__init__()
        dim = heads * _scaled(16, width)
        self.patch_size, self.max_grid = patch_size, max_grid
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.row_position = nn.Parameter(torch.zeros(max_grid, dim))
        self.column_position = nn.Parameter(torch.zeros(max_grid, dim))
        for parameter in (self.cls_token, self.row_position, self.column_position):
            nn.init.trunc_normal_(parameter, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The (rows, columns) of patches of an image of this size (a border narrower than a patch is dropped)."""
        return height // self.patch_size, width // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.patch_embed(x)  # [B, D, h, w]
        b, d, h, w = maps.shape
        if h > self.max_grid or w > self.max_grid:
            raise ValueError(
                f"images of {x.shape[-2]}×{x.shape[-1]} px make a {h}×{w} patch grid; this model's positional "
                f"embedding covers up to {self.max_grid}×{self.max_grid}"
            )
        position = self.row_position[:h, None] + self.column_position[None, :w]  # [h, w, D]
        tokens = maps.flatten(2).transpose(1, 2) + position.reshape(1, h * w, d)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


MODELS: dict[str, type[nn.Module]] = {
    "simple_cnn": SimpleCNN,
    "allconv": AllConvNet,
    "vgg": VGGStyle,
    "resnet18": ResNet18Style,
    "resnet50": ResNet50,
    "p4cnn": P4CNN,
    "stn": STNCNN,
    "vit": VisionTransformer,
}


def build_model(name: str, in_channels: int, num_classes: int, **kw) -> nn.Module:
    """``MODELS[name](in_channels, num_classes, **kw)``; an unknown name raises ValueError listing valid names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[name](in_channels, num_classes, **kw)
