"""Choosing which modules to observe and calling back on their outputs during a forward pass.

Layers are chosen by module name (as in ``model.named_modules()``), glob pattern or module type; the
default is every leaf module except no-op ones (dropout, identity, flatten). A module called several
times in one forward (a shared ReLU) yields one activation per call: ``name``, ``name#2``, ...
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

from torch import nn

__all__ = ["LayerSelector", "select_modules", "unwrap", "Capture", "LayerInfo"]

LayerSelector = Union[str, type, Sequence[Union[str, type]], None]

# Modules whose output carries no new information at measurement time (eval mode).
_NO_OP_TYPES: tuple[type, ...] = (nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.Unflatten)


@dataclass(frozen=True)
class LayerInfo:
    """One observed activation: name, position in the network, module type and per-sample shape."""

    name: str
    index: int
    module_type: str
    unit_shape: tuple[int, ...]

    @property
    def is_spatial(self) -> bool:
        return len(self.unit_shape) == 3

    @property
    def num_channels(self) -> int:
        return self.unit_shape[0] if self.unit_shape else 1


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


def select_modules(model: nn.Module, layers: LayerSelector = None) -> tuple[list[tuple[str, nn.Module]], bool]:
    """Modules to observe, in registration order, and whether the choice was explicit.

    Raises ValueError naming the unknown names / patterns / types and listing the valid names.
    """
    named = [(_display_name(n), m) for n, m in model.named_modules()]
    if layers is None:
        chosen = [(n, m) for n, m in named if not any(True for _ in m.children()) and not isinstance(m, _NO_OP_TYPES)]
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
        keep.update(hits)
    if unknown:
        valid = ", ".join(n for n, _ in named)
        raise ValueError(f"no module matches layer selector(s) {', '.join(unknown)}; valid module names: {valid}")
    return [(n, m) for n, m in named if n in keep], True


class Capture:
    """Context manager: forward hooks calling ``callback(activation_name, module, output)``.

    ``start_forward()`` must be called before each model call so repeated calls of a module are
    numbered consistently. Hooks are removed on exit, also when an exception propagates.
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]], callback: Callable[[str, nn.Module, object], None]):
        self._modules = list(modules)
        self._callback = callback
        self._handles: list = []
        self._calls: dict[str, int] = {}

    def start_forward(self) -> None:
        self._calls.clear()

    def _hook_for(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            n = self._calls.get(name, 0) + 1
            self._calls[name] = n
            self._callback(name if n == 1 else f"{name}#{n}", module, output)

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

