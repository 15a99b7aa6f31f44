"""Continuous transformation families and their derivatives at the identity, for the Lie derivative.

A generator is a one-parameter family g_t of the library's own transformations, g_0 the identity:
rotation by t radians, translation by t input pixels along x or y, scaling by e^t, and brightness + t.
The Lie derivative of a layer φ is d/dt g_t⁻¹ ψ(φ(g_t x)) at t = 0 (ψ the layer's feature action; on
outputs that are not feature maps g_t⁻¹ is nothing, so it is the derivative of an invariant). One forward
pass with forward-mode AD gives d/dt ψ(φ(g_t x)) = J(x)·(d/dt g_t x) for every layer at once; this module
provides the input's tangent d/dt g_t x and the feature maps' own d/dt g_t F, whose difference from it
is the Lie derivative.

Both are derivatives of the warp ``transforms.py`` applies (affine sampling with ``grid_sample``,
``align_corners=False``, the set's interpolation and padding) with respect to t. At t = 0 every sampling
point sits on a pixel centre, where bilinear interpolation has a kink: the warp has a left and a right
derivative (backward and forward pixel differences along the flow) and no derivative. Central finite
differences of the library's transformations, [g_ε x − g_₋ε x] / 2ε, converge to their mean: the central
pixel difference along the flow, which is what ``derivative`` computes (exactly, in closed form: PyTorch
has no forward-mode derivative for ``grid_sample``, and it would pick one side by rounding).
Bicubic interpolation (PyTorch's Keys kernel, a = −0.75) is differentiable there, with derivative
1.5 × the central difference. Pixels beyond the border are what the padding makes them: copies of the
edge pixel (``border``; ``reflection`` gives the same derivative) or 0 (``zeros``). Nearest interpolation
is piecewise constant, so its derivative is 0 almost everywhere: it has no Lie derivative.

Flows are in pixels of the map they act on, y pointing down: the content at centred pixel position
(u_x, u_y) moves with velocity (u_y, −u_x) under rotation (counter-clockwise as displayed, as
``rotations``), (w / W, 0) under translation along x (an input pixel is w / W pixels of a map of width
w), (u_x, u_y) under scaling; d/dt g_t F = −k (c_x ∂_x F + c_y ∂_y F), k the interpolation's factor.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import transforms
from .transforms import TransformationSet

__all__ = ["Generator", "GENERATORS", "rotation", "translation", "scale", "brightness", "along_flow",
           "check_interpolation", "forward_mode", "TangentError"]

# d/dt of the interpolated value at a pixel centre, per unit of the central difference (x[i+1] − x[i−1]) / 2
_FACTOR = {"bilinear": 1.0, "bicubic": 1.5}
_WEIGHTS: dict[tuple, tuple] = {}  # (generator, map size, image size, interpolation, device, dtype) -> weights


class TangentError(ValueError):
    """A layer's output carries no forward-mode tangent: it does not depend differentiably on the input."""


@dataclass(frozen=True)
class Generator:
    """One continuous family g_t of the library's transformations, t = 1 being a radian (rotation), an
    input pixel (translations), an e-fold of scale, or a unit of input intensity (brightness)."""

    name: str  # "rotation", "translation_x", "translation_y", "scale", "brightness"

    @property
    def group(self) -> str:
        """The measure group (and measure) of this generator's Lie derivative, e.g. "lie_rotation"."""
        return f"lie_{self.name}"

    @property
    def geometric(self) -> bool:
        """Whether g_t moves positions (all but brightness, which changes values)."""
        return self.name != "brightness"

    def velocity(self, height: int, width: int, image_size: tuple[int, int], device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(c_x, c_y): the content's velocity per unit t at each pixel centre of a [height, width] map,
        in that map's pixels ([height, width] tensors, or None where a component is 0)."""
        y = torch.arange(height, device=device, dtype=dtype).view(-1, 1) + (0.5 - height / 2)
        x = torch.arange(width, device=device, dtype=dtype).view(1, -1) + (0.5 - width / 2)
        if self.name == "rotation":
            return y.expand(height, width), (-x).expand(height, width)
        if self.name == "scale":
            return x.expand(height, width), y.expand(height, width)
        if self.name == "translation_x":
            return torch.full((height, width), width / image_size[1], device=device, dtype=dtype), None
        if self.name == "translation_y":
            return None, torch.full((height, width), height / image_size[0], device=device, dtype=dtype)
        raise ValueError(f"the {self.name} generator does not move positions")

    def weights(self, height: int, width: int, image_size: tuple[int, int], interpolation: str, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """k / 2 · (c_x, c_y) on a [height, width] map (the central difference's 1/2, the interpolation's
        factor k; cached): d/dt g_t F = −``along_flow(F, *weights)``, the Lie derivative of a tangent τ of
        F is ``along_flow(F, *weights, start=τ)``."""
        check_interpolation(interpolation)
        key = (self.name, height, width, tuple(image_size), interpolation, str(device), dtype)
        if key not in _WEIGHTS:
            scale = _FACTOR[interpolation] / 2
            _WEIGHTS[key] = tuple(None if v is None else v * scale
                                  for v in self.velocity(height, width, image_size, device, dtype))
        return _WEIGHTS[key]

    def derivative(self, maps: torch.Tensor, image_size: tuple[int, int], interpolation: str,
                   padding: str) -> torch.Tensor:
        """d/dt g_t F at t = 0 for maps F [N, C, h, w], as the library warps them (see the module's
        docstring): −k (c_x ∂_x F + c_y ∂_y F) with central pixel differences and the set's padding."""
        if not self.geometric:
            raise ValueError(f"the {self.name} generator does not move positions")
        weights = self.weights(*maps.shape[-2:], image_size, interpolation, maps.device, maps.dtype)
        return along_flow(maps, *(None if w is None else -w for w in weights), padding == "zeros")

    def input_tangent(self, images: torch.Tensor, interpolation: str, padding: str) -> torch.Tensor:
        """d/dt g_t x at t = 0 for a batch of images [N, C, H, W] (brightness: all ones)."""
        if not self.geometric:
            return torch.ones_like(images)
        return self.derivative(images, tuple(images.shape[-2:]), interpolation, padding)

    def transformations(self, parameters: Sequence[float], image_size: tuple[int, int] | None = None, *,
                        interpolation: str = "bilinear", padding: str = "border") -> TransformationSet:
        """The library's transformation set of g_t at the given parameters t (in this generator's unit;
        translations need ``image_size`` (H, W)): what finite differences and the finite measures use."""
        values = [float(t) for t in parameters]
        options = dict(interpolation=interpolation, padding=padding)
        if self.name == "rotation":
            return transforms.rotations([math.degrees(t) for t in values], **options)
        if self.name == "scale":
            return transforms.scalings([math.exp(t) for t in values], **options)
        if self.name == "brightness":
            return transforms.brightness(values)
        if image_size is None:
            raise ValueError(f"{self.name}: give image_size=(H, W), translations are in input pixels")
        if self.name == "translation_x":
            return transforms.translations([(t / image_size[1], 0.0) for t in values], **options)
        return transforms.translations([(0.0, t / image_size[0]) for t in values], **options)


rotation = Generator("rotation")
scale = Generator("scale")
brightness = Generator("brightness")


def translation(axis: str) -> Generator:
    """Translation by t input pixels along ``axis`` ("x": content moves right, "y": down)."""
    if axis not in ("x", "y"):
        raise ValueError(f'translation axis must be "x" or "y", got {axis!r}')
    return Generator(f"translation_{axis}")


GENERATORS: dict[str, Generator] = {
    g.group: g for g in (rotation, translation("x"), translation("y"), scale, brightness)
}
"""Measure group name -> generator."""


def along_flow(maps: torch.Tensor, wx: torch.Tensor | None, wy: torch.Tensor | None, zeros: bool,
               start: torch.Tensor | None = None) -> torch.Tensor:
    """start + wx · (F[j+1] − F[j−1]) + wy · (F[i+1] − F[i−1]) for maps F [N, C, h, w] (``start`` None: 0;
    a weight None: 0), pixels beyond the border 0 (``zeros``) or copies of the edge pixel (border and
    reflection padding). Never writes into ``maps`` or ``start``."""
    padded = F.pad(maps, (1, 1, 1, 1), mode="constant" if zeros else "replicate")
    out, fresh = start, False
    for weight, ahead, behind in ((wx, padded[..., 1:-1, 2:], padded[..., 1:-1, :-2]),
                                  (wy, padded[..., 2:, 1:-1], padded[..., :-2, 1:-1])):
        if weight is None:
            continue
        difference = torch.sub(ahead, behind)
        if out is None:
            out = difference.mul_(weight)
        else:
            out = out.addcmul_(difference, weight) if fresh else torch.addcmul(out, difference, weight)
        fresh = True
    return out


def check_interpolation(interpolation: str) -> None:
    """ValueError unless the warp has a derivative at the identity."""
    if interpolation not in _FACTOR:
        raise ValueError(
            f"the Lie derivative needs a warp with a derivative: interpolation {interpolation!r} is piecewise "
            f"constant (derivative 0 almost everywhere); use {' or '.join(map(repr, _FACTOR))}"
        )


_LINEAR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _tangents_apart(module: nn.Module, handles: list) -> None:
    """Differentiate a convolution or linear module as two plain ops: the module on its input's primal,
    and the same op on the input's tangent without the bias. PyTorch's forward-mode rule computes the
    same tangent plus a third convolution, of the input with the weights' zero tangent, which costs as
    much as the forward's own. (Hooks: the input's tangent is set aside before the module runs, and the
    output's put back first thing after, before any other hook reads it.)"""
    set_aside: list[torch.Tensor] = []

    def before(module, args):
        primal, tangent = forward_ad.unpack_dual(args[0])
        if tangent is not None:
            set_aside.append(tangent)
            return (primal, *args[1:])

    def after(module, args, output):
        if set_aside:
            tangent = set_aside.pop()
            if isinstance(module, nn.Linear):
                return forward_ad.make_dual(output, F.linear(tangent, module.weight))
            return forward_ad.make_dual(output, module._conv_forward(tangent, module.weight, None))

    handles.append(module.register_forward_pre_hook(before))
    handles.append(module.register_forward_hook(after, prepend=True))


@contextlib.contextmanager
def forward_mode(model: nn.Module) -> Iterator[list[str]]:
    """A forward-mode AD level for one pass over the probe (convolution and linear modules differentiated
    as ``_tangents_apart`` says), and the modules of ``model`` being run ("name (Type)", outermost first),
    so that an op without a forward-mode derivative (``grid_sample`` has none) is reported with the module
    that runs it."""
    running: list[str] = []
    handles: list = []
    # nn.MultiheadAttention's fused inference path has no forward-mode derivative; its composite path has.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for name, module in model.named_modules():
            label = f"{name or 'model'!r} ({type(module).__name__})"
            handles.append(module.register_forward_pre_hook(lambda m, args, label=label: running.append(label)))
            handles.append(module.register_forward_hook(lambda m, args, output: running.pop() and None))
            if isinstance(module, _LINEAR_MODULES):
                _tangents_apart(module, handles)
        # scaled_dot_product_attention's fused kernels have none either: its math backend is composite.
        with forward_ad.dual_level(), sdpa_kernel(SDPBackend.MATH):
            yield running
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
