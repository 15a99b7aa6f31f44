"""Feature actions: how a transformation acts on a layer's features, for the equivariance error.

A layer is equivariant under action ψ when ψ(φ(g x)) = g ψ(φ(x)): ``psi`` maps the layer's output to the
space where g acts, ``undo`` applies g⁻¹ there. ``identity()`` is plain same-equivariance (g⁻¹ acts on
the feature maps' positions only); ``orientation_pooling(k)`` takes the max over each group of k
orientation channels first (the Implicit Equivariance loss); ``cyclic_shift(k)`` additionally rolls each
group of k channels back by g's index (the regular representation of group-equivariant CNNs).

Orientation channels are laid out channel-major: channel c·k + r is filter c at orientation r.

``patch_grid(h, w, cls_tokens)`` is the action for a Vision Transformer's token outputs [tokens, D]: it
lays the patch tokens out as feature maps [D, h, w] in the patch embedding's row-major order (the first
``cls_tokens`` tokens, class / register tokens, are left out of the maps: they have no position, and
the invariance measures still cover them), so that g⁻¹ moves them as it moves a CNN's maps. It also gives
those layers same-equivariance. When the patch size divides the image size, ``rot90()`` and ``flips()``
of the image permute the patches exactly as they permute the cells of a square grid.
"""
from __future__ import annotations

import torch

from .statistics import Scratch
from .transforms import TransformationSet

__all__ = ["FeatureAction", "identity", "orientation_pooling", "cyclic_shift", "patch_grid"]


class FeatureAction:
    """ψ and the action of the inverse transformations on ψ's output (identity on channels)."""

    name = "identity"

    def check(self, channels: int, transformations: TransformationSet) -> None:
        """Raise ValueError if this action cannot act on ``channels`` channels under these transformations."""

    def grid(self, tokens: int) -> tuple[int, int] | None:
        """The (h, w) grid of feature maps this action lays a ``[tokens, D]`` output out on; None when it
        lays out none (the layer has no maps). ValueError if the tokens do not fit its grid."""
        return None

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """A layer's output [n, *unit_shape] as the feature maps [n, C, h, w] whose positions g moves:
        feature maps as they are (token outputs only under ``patch_grid``)."""
        return x

    def psi(self, x: torch.Tensor) -> torch.Tensor:
        """The features g acts on: the layer's maps (grouped actions act on their channels too)."""
        return self.maps(x)

    def undo(self, y: torch.Tensor, transformations: TransformationSet, compiled: bool = False,
             scratch: Scratch | None = None) -> torch.Tensor:
        """g_t⁻¹ applied to rows i·T + t of ψ-features [b·T, C', h, w] (``compiled``: with the fused
        kernels, in ``scratch``'s buffers: ``TransformationSet.invert_features``)."""
        return transformations.invert_features(y, compiled, scratch)

    def __repr__(self) -> str:
        return self.name


class _Grouped(FeatureAction):
    def __init__(self, k: int):
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"{type(self).__name__} needs a group size k >= 2, got {k!r}")
        self.k = k

    def check(self, channels: int, transformations: TransformationSet) -> None:
        if channels % self.k:
            raise ValueError(f"{self.name} needs a channel count divisible by {self.k}; the layer has {channels}")


class _OrientationPooling(_Grouped):
    def __init__(self, k: int):
        super().__init__(k)
        self.name = f"orientation_pooling({k})"

    def psi(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (-1, self.k)).amax(dim=2)


class _CyclicShift(_Grouped):
    def __init__(self, k: int, direction: int):
        super().__init__(k)
        if direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1, got {direction!r}")
        self.direction = direction
        self.name = f"cyclic_shift({k}{'' if direction == 1 else ', direction=-1'})"
        self._sources: dict[tuple[str, str], torch.Tensor] = {}  # per (transformation set, device)

    def _indices(self, transformations: TransformationSet) -> list[int]:
        step = 360 / self.k
        out = []
        for t in transformations:
            angle = t.rotation
            if angle is None or abs(angle / step - round(angle / step)) > 1e-9:
                raise ValueError(
                    f"{self.name} acts on rotations by multiples of {step:g}°; {t.label!r} is not one"
                )
            out.append(round(angle / step) % self.k)
        return out

    def check(self, channels: int, transformations: TransformationSet) -> None:
        super().check(channels, transformations)
        self._indices(transformations)

    def undo(self, y: torch.Tensor, transformations: TransformationSet, compiled: bool = False,
             scratch: Scratch | None = None) -> torch.Tensor:
        y = transformations.invert_features(y, compiled, scratch)
        T = len(transformations)
        n, c, h, w = y.shape
        key = (transformations.id, str(y.device))
        if key not in self._sources:
            # g moves orientation r to r + index(g) (times direction); g⁻¹ reads it back from there.
            shifts = self._indices(transformations)
            self._sources[key] = torch.tensor(
                [[(r + self.direction * s) % self.k for r in range(self.k)] for s in shifts], device=y.device
            )
        source = self._sources[key]
        grouped = y.reshape(n // T, T, c // self.k, self.k, h * w)
        index = source.view(1, T, 1, self.k, 1).expand_as(grouped)
        return grouped.gather(3, index).reshape(n, c, h, w)


class _PatchGrid(FeatureAction):
    def __init__(self, h: int, w: int, cls_tokens: int):
        for name, value, least in (("h", h, 1), ("w", w, 1), ("cls_tokens", cls_tokens, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"patch_grid needs an int {name} >= {least}, got {value!r}")
        self.h, self.w, self.cls_tokens = h, w, cls_tokens
        self.name = f"patch_grid({h}, {w}, cls_tokens={cls_tokens})"

    def grid(self, tokens: int) -> tuple[int, int]:
        if tokens != self.cls_tokens + self.h * self.w:
            raise ValueError(
                f"{self.name} lays out {self.cls_tokens} + {self.h}·{self.w} = {self.cls_tokens + self.h * self.w} "
                f"tokens; the layer outputs {tokens} (h, w: the image size over the patch size)"
            )
        return self.h, self.w

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # feature maps already (e.g. the patch embedding's convolution)
            return x
        return x[:, self.cls_tokens :].unflatten(1, (self.h, self.w)).permute(0, 3, 1, 2)


def identity() -> FeatureAction:
    """g⁻¹ acts on positions only (same-equivariance)."""
    return FeatureAction()


def orientation_pooling(k: int) -> FeatureAction:
    """Max over each group of k orientation channels, then g⁻¹ on positions (Implicit Equivariance)."""
    return _OrientationPooling(k)


def cyclic_shift(k: int, direction: int = 1) -> FeatureAction:
    """g⁻¹ on positions and a cyclic shift of each group of k orientation channels back by g's index
    (group-equivariant CNNs; ``direction=-1`` for networks whose orientations turn the other way)."""
    return _CyclicShift(k, direction)


def patch_grid(h: int, w: int, cls_tokens: int = 0) -> FeatureAction:
    """Token outputs [cls_tokens + h·w, D] laid out as feature maps [D, h, w] (row-major patches, the
    leading class / register tokens left out), then g⁻¹ on positions: same-equivariance and the
    equivariance error of Vision Transformer blocks. Feature-map outputs [C, H, W] are taken as they are."""
    return _PatchGrid(h, w, cls_tokens)
