"""Choosing which modules to observe and calling back on their outputs during a forward pass.

Layers are chosen by module name (as in ``model.named_modules()``), glob pattern or module type; the
default is every leaf module except no-op ones (dropout, identity, flatten), and attention modules as a
whole. (By default, ``dedupe_batchnorm``, the measurement also leaves out of the forward's hooks the
eval-mode BatchNorms that only rescale another observed output per channel, and derives their measures from
that output's: ``AffineBatchNorms`` finds them in the discovery pass, as only running the model shows what
feeds what.) A module called several times in one forward (a shared ReLU) yields one activation per call:
``name``, ``name#2``, ...

A layer is measured on its output tensor, or on the first element of a tuple output (attention's
``(output, weights)``). How its axes are read: ``[C]``, ``[C, L]`` and ``[C, H, W]`` put channels first;
``[tokens, D]`` outputs (Linear, LayerNorm, attention and other sequence layers on ``[B, tokens, D]``) put
them last, and a token layer's "per channel" values average over its tokens as feature maps' do over
positions.
"""
from __future__ import annotations

import fnmatch
import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn

__all__ = ["LayerSelector", "select_modules", "unwrap", "Capture", "LayerInfo", "output_tensor", "is_token_output",
           "AffineBatchNorms"]

LayerSelector = Union[str, type, Sequence[Union[str, type]], None]

# Modules whose output carries no new information at measurement time (eval mode).
_NO_OP_TYPES: tuple[type, ...] = (nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.Unflatten)
# Modules observed as a whole by default, not through their submodules: attention keeps its output
# projection as a submodule it never calls.
_WHOLE_TYPES: tuple[type, ...] = (nn.MultiheadAttention,)
# Modules whose [B, C, L] outputs put channels first (PyTorch's layout for 1-D convolution, normalization,
# pooling and resampling); every other module's 3-D output is read as [B, tokens, D].
_CHANNELS_FIRST_1D: tuple[type, ...] = (
    nn.Conv1d, nn.ConvTranspose1d, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool1d, nn.LPPool1d, nn.Upsample,
)


@dataclass(frozen=True)
class LayerInfo:
    """One observed activation: name, position in the network, module type, per-sample shape, and how
    the measures read it.

    ``tokens``: the output is ``[tokens, D]``, channels on the last axis (else channels come first).
    ``grid``: the (h, w) patch grid a ``patch_grid`` feature action lays the tokens out on, which gives the
    layer feature maps ``[D, h, w]`` for same-equivariance and the equivariance error.
    ``positions``: K when the measures keep K sampled positions per channel (``positions.py``), else None.
    """

    name: str
    index: int
    module_type: str
    unit_shape: tuple[int, ...]
    tokens: bool = False
    grid: tuple[int, int] | None = None
    positions: int | None = None

    @property
    def channel_axis(self) -> int:
        """The axis of ``unit_shape`` that holds the channels."""
        return -1 if self.tokens else 0

    @property
    def map_shape(self) -> tuple[int, ...] | None:
        """Shape [C, h, w] of the feature maps transformations move (same-equivariance, the equivariance
        error); None for a layer without any."""
        if self.tokens:
            return None if self.grid is None else (self.unit_shape[-1], *self.grid)
        return self.unit_shape if len(self.unit_shape) == 3 else None

    @property
    def is_spatial(self) -> bool:
        return self.map_shape is not None

    @property
    def num_channels(self) -> int:
        return self.unit_shape[self.channel_axis] if self.unit_shape else 1


def output_tensor(output: object) -> torch.Tensor:
    """The tensor a layer is measured on: its output, or the first element of a tuple / list output
    (``nn.MultiheadAttention`` returns ``(output, attention weights)``). TypeError saying what the output
    is otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        if isinstance(output[0], torch.Tensor):
            return output[0]
        first = type(output[0]).__name__
        raise TypeError(f"returns a {type(output).__name__} whose first element is {first}, not a tensor")
    raise TypeError(f"returns {type(output).__name__}, not a tensor")


def is_token_output(module: nn.Module | None, unit_shape: tuple[int, ...]) -> bool:
    """Whether a per-sample output of this shape from ``module`` is ``[tokens, D]`` (channels last)."""
    return len(unit_shape) == 2 and not isinstance(module, _CHANNELS_FIRST_1D)


def _compiled_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is torch.compile's OptimizedModule (torch.compile imports its module, we never do)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, getattr(eval_frame, "OptimizedModule", ()))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel wrappers (names without ``module.``) and
    ``torch.compile``'s OptimizedModule (names without ``_orig_mod.``). A compiled model is measured
    through its original module, eagerly: forward hooks on it would make Dynamo recompile (and measure
    slower than eager on the first call), and the compiled code training runs stays as it was."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif _compiled_wrapper(model):
            model = model._orig_mod
        else:
            return model


def _display_name(name: str) -> str:
    return name or "model"


def _inside_whole(named: list[tuple[str, nn.Module]]) -> set[int]:
    """ids of the submodules of attention modules, which only exact names select."""
    return {id(sub) for _, m in named if isinstance(m, _WHOLE_TYPES) for sub in m.modules() if sub is not m}


def select_modules(model: nn.Module, layers: LayerSelector = None) -> tuple[list[tuple[str, nn.Module]], bool]:
    """Modules to observe, in registration order, and whether the choice was explicit.

    Patterns and types leave out the submodules of attention modules (which never call their output
    projection); an exact name selects any module. Raises ValueError naming the unknown names / patterns /
    types and listing the valid names.
    """
    named = [(_display_name(n), m) for n, m in model.named_modules()]
    inside = _inside_whole(named)
    if layers is None:
        chosen = [
            (n, m) for n, m in named
            if id(m) not in inside and not isinstance(m, _NO_OP_TYPES)
            and (isinstance(m, _WHOLE_TYPES) or not any(True for _ in m.children()))
        ]
        if not chosen:
            raise ValueError("the model has no leaf modules to observe; choose layers explicitly with layers=...")
        return chosen, False
    selectors: list = [layers] if isinstance(layers, (str, type)) else list(layers)
    if not selectors:
        raise ValueError("layers=[] selects nothing; pass None for the default or names / patterns / types")
    keep: dict[str, nn.Module] = {}
    unknown = []
    for sel in selectors:
        if isinstance(sel, type):
            hits = [(n, m) for n, m in named if isinstance(m, sel)]
        elif isinstance(sel, str):
            is_glob = any(ch in sel for ch in "*?[")
            hits = [(n, m) for n, m in named if (fnmatch.fnmatchcase(n, sel) if is_glob else n == sel)]
        else:
            raise TypeError(f"layer selectors are names, glob patterns or module types; got {sel!r}")
        if not hits:
            unknown.append(sel.__name__ if isinstance(sel, type) else repr(sel))
        keep.update((n, m) for n, m in hits if n == sel or id(m) not in inside)
    if unknown:
        valid = ", ".join(n for n, _ in named)
        raise ValueError(f"no module matches layer selector(s) {', '.join(unknown)}; valid module names: {valid}")
    return [(n, m) for n, m in named if n in keep], True


def activation_name(module: str, call: int) -> str:
    """The name of a module's output at its ``call``-th call in a forward (from 1): ``name``, ``name#2``, ..."""
    return module if call == 1 else f"{module}#{call}"


class Capture:
    """Context manager: forward hooks calling ``callback(activation_name, module, output)`` (with ``with_inputs``,
    ``callback(activation_name, module, output, inputs)``: the positional inputs the module took).

    ``start_forward()`` must be called before each model call so repeated calls of a module are
    numbered consistently. Hooks are removed on exit, also when an exception propagates.
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]], callback: Callable[..., None],
                 with_inputs: bool = False):
        self._modules = list(modules)
        self._callback = callback
        self._with_inputs = with_inputs
        self._handles: list = []
        self._calls: dict[str, int] = {}

    def start_forward(self) -> None:
        self._calls.clear()

    def _hook_for(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            n = self._calls.get(name, 0) + 1
            self._calls[name] = n
            if self._with_inputs:
                self._callback(activation_name(name, n), module, output, inputs)
            else:
                self._callback(activation_name(name, n), module, output)

        return hook

    def __enter__(self) -> "Capture":
        try:
            for name, module in self._modules:
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.close()



# BatchNorm forwards that are the per-channel map above in eval mode (a subclass's own forward may be anything:
# e.g. one (γ, σ) pair shared by a group of channels, examples.models.P4BatchNorm2d).
_AFFINE_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


class AffineBatchNorms:
    """Context manager around a forward pass of the measurement (eval mode): which of ``modules``' BatchNorms
    only rescale another observed output per channel, and so measure nothing new.

    A BatchNorm in eval mode with running statistics is the per-channel affine map y = s·x + c of its input,
    s = γ / √(running_var + ε), c = β − s·running_mean. When its input x is the unaltered output of another
    observed layer, every statistic of y is x's moved by c and scaled by |s|: per element the transformation
    variance TV (a mean over samples of a std over transformations) and the sample variance SV (a mean over
    transformations of a std over samples) both scale by |s|, and the normalized variance NV = TV / SV is
    x's exactly; per channel too, as s is one number per channel. (So are ANOVA's F, the per-transformation
    errors, and the equivariance measures and Lie derivatives as long as moving maps back commutes with the
    shift c: exact rot90 / flips, or interpolation with border padding, not zeros. Not Goodfellow's firing
    rates when s < 0, nor ψ-based measures under a grouped feature action, which mixes channels of different
    s; ``Measurement`` keeps the BatchNorms there. A channel with γ = 0 is constant, dead, in
    y.) Such a BatchNorm is found by the identity of its input tensor with a recorded output of an observed
    module and the tensor's version counter (an in-place change in between breaks the match): a
    BatchNorm fed a view, a sum or anything computed outside the observed modules is kept, and so is a
    subclass with a forward of its own. ``sources``: for each call that was such a map, the activation it
    mapped (named by ``activation_name``, as ``Capture`` names them), from which ``derived.py``
    gives the BatchNorm's measures without measuring it (``Measurement.discover``: where every call of the
    BatchNorm is in it).
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]]):
        self._modules = list(modules)
        self._handles: list = []
        # id(tensor) -> (weak reference, version, the activation's name)
        self._outputs: dict[int, tuple[weakref.ref, int, str]] = {}
        self._calls: dict[str, int] = {}  # module name -> calls so far (the activations' names)
        self.sources: dict[str, str] = {}  # a BatchNorm's activation -> the observed activation it mapped

    def _observed(self, tensor: object) -> str | None:
        """The name of the observed activation ``tensor`` is, unchanged since; None if it is none."""
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self._outputs.get(id(tensor))
        return entry[2] if entry is not None and entry[0]() is tensor and entry[1] == tensor._version else None

    def _hook_for(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            calls = self._calls[name] = self._calls.get(name, 0) + 1
            activation = activation_name(name, calls)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                source = self._observed(inputs[0]) if inputs else None
                if not module.training and module.running_mean is not None and module.running_var is not None \
                        and type(module).forward in _AFFINE_FORWARDS and source is not None:
                    self.sources[activation] = source
            try:
                tensor = output_tensor(output)
            except TypeError:
                return
            self._outputs[id(tensor)] = (weakref.ref(tensor), tensor._version, activation)

        return hook

    def __enter__(self) -> "AffineBatchNorms":
        try:
            for name, module in self._modules:
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()
