"""tm-tensorboard: measure how invariant / equivariant every layer and unit of a network is to input
transformations while it trains, and look at it in TensorBoard's Invariance tab.

The SDK (``measure``, ``Monitor``, ``transforms``) imports torch lazily, on first use, so that the
TensorBoard plugin, which lives in this package too, starts without torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "measure": ("tm_tensorboard.engine", "measure"),
    "estimate_memory": ("tm_tensorboard.engine", "estimate_memory"),
    "release_memory": ("tm_tensorboard.kept_states", "release"),
    "MeasureResult": ("tm_tensorboard.result", "MeasureResult"),
    "Monitor": ("tm_tensorboard.monitor", "Monitor"),
    "transforms": ("tm_tensorboard.transforms", None),
    "actions": ("tm_tensorboard.actions", None),
    "read": ("tm_tensorboard.reader", "read"),
    "measure_checkpoints": ("tm_tensorboard.checkpoints", "measure_checkpoints"),
    "testing": ("tm_tensorboard.testing", None),
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from . import actions, testing, transforms
    from .checkpoints import measure_checkpoints
    from .engine import estimate_memory, measure
    from .kept_states import release as release_memory
    from .reader import read
    from .monitor import Monitor
    from .result import MeasureResult


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tm_tensorboard' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
