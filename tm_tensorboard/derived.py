"""BatchNorms measured from their inputs' states, at no cost: the layers ``dedupe_batchnorm`` leaves out of the
forward's hooks are still in the result.

An eval-mode BatchNorm whose input is another observed layer's output maps it per channel by y = s·x + c
(``capture.AffineBatchNorms`` finds such calls, ``Measurement.discover`` chooses which to derive). Every
component of the measures it may be derived for is the input's times |s|^d per channel, d the component's
degree below: a standard deviation (TV, SV) scales by |s|, a mean square or a variance by s², and ANOVA's F
and decision do not change. A channel with s = 0 (γ = 0) is constant: its TV, SV and squares are 0, so its
ratio measures are 0 / 0, dead, as measured; its F is 0 and not rejected (``AnovaMeasure``). The
jackknife's replicates scale the same way, so the standard errors are the BatchNorm's too. A result keeps
each derived BatchNorm's |s| only and scales its input's components when they are read (``Derived``): no more
host memory than without it.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from .measures import PER_TRANSFORMATION_COMPONENTS

__all__ = ["DEGREE", "scales", "derive", "Derived"]

# Each component's degree under y = s·x + c: the power of |s| it scales by.
DEGREE: dict[str, int] = {"tv": 1, "sv": 1, "mse": 2, "mse_t": 2, "var2": 2, "lsq": 2, "f": 0, "reject": 0}


def scales(modules: list[nn.modules.batchnorm._BatchNorm]) -> list[np.ndarray]:
    """|s| = |γ| / √(running_var + ε) per channel of each BatchNorm (γ = 1 without affine parameters), float64
    on the host, from one device-to-host copy of their parameters."""
    if not modules:
        return []
    with torch.no_grad():
        parts = [t.detach().reshape(-1) for m in modules
                 for t in (m.running_var, m.weight if m.weight is not None else torch.ones_like(m.running_var))]
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in parts])
        host = torch.cat([t.to(dtype) for t in parts]).cpu().to(torch.float64).numpy()  # (bfloat16: no numpy dtype)
    out, start = [], 0
    for m in modules:
        channels = m.running_var.numel()
        variance, weight = host[start : start + channels], host[start + channels : start + 2 * channels]
        out.append(np.abs(weight) / np.sqrt(variance + m.eps))
        start += 2 * channels
    return out


def derive(names: tuple[str, ...], rows: np.ndarray, axis: int, s: np.ndarray, transformations: int) -> np.ndarray:
    """The BatchNorm's component rows from its input's: ``rows`` has the group's components (``names``, stacked
    as ``measures.split_components`` reads them) on ``axis`` and the channels right after it (values [classes,
    rows, C, ...]: axis 1; the jackknife's replicates [K, classes, rows, C]: axis 2); ``s``: |s| per channel."""
    degrees = np.concatenate([np.full(transformations if name in PER_TRANSFORMATION_COMPONENTS else 1, DEGREE[name])
                              for name in names])
    shape = (1,) * axis + (len(degrees), len(s)) + (1,) * (rows.ndim - axis - 2)
    factor = (s[None, :] ** degrees[:, None]).reshape(shape)
    constant = ((degrees[:, None] == 0) & (s[None, :] == 0)).reshape(shape)  # a constant channel's F and decision: 0
    out = rows * factor
    out[np.broadcast_to(constant, out.shape)] = 0.0
    return out


class Derived(Mapping):
    """One group's {layer: values} as a result reads them (``result.MeasureResult``: (component names,
    [classes, rows, *unit shape]), or the replicates [K, classes, rows, C]): the measured layers' as finalized,
    and each derived BatchNorm's made from its input's when read (its input first, if derived too)."""

    def __init__(self, measured: Mapping, derived: dict[str, tuple[str, np.ndarray]], names: tuple[str, ...],
                 transformations: int, replicates: bool = False):
        self._measured = measured
        self._derived = {}  # the BatchNorms whose input this group has (in the network's order: an input first)
        for layer, (source, s) in derived.items():
            if source in measured or source in self._derived:
                self._derived[layer] = (source, s)
        self._names, self._transformations, self._replicates = names, transformations, replicates

    def __getitem__(self, layer: str):
        if layer in self._measured:
            return self._measured[layer]
        source, s = self._derived[layer]  # KeyError: neither measured nor derived here
        if self._replicates:
            return derive(self._names, self[source], 2, s, self._transformations)
        names, values = self[source]
        return names, derive(names, values, 1, s, self._transformations)

    def __contains__(self, layer: object) -> bool:
        return layer in self._measured or layer in self._derived

    def __iter__(self) -> Iterator[str]:
        yield from self._measured
        yield from self._derived

    def __len__(self) -> int:
        return len(self._measured) + len(self._derived)
