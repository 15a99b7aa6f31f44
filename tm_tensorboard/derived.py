"""BatchNorms measured from their inputs' states, at no cost: the layers ``dedupe_batchnorm`` leaves out of the
forward's hooks are still in the result.

An eval-mode BatchNorm whose input is another observed layer's output maps it per channel by y = s·x + c
(``capture.AffineBatchNorms`` finds such calls, ``Measurement.discover`` chooses which to derive). Every
component of the measures it may be derived for is the input's times |s|^d per channel, d the component's
degree below: a standard deviation (TV, SV) scales by |s|, a mean square or a variance by s², and ANOVA's F
and decision do not change. A channel with s = 0 (γ = 0) is constant: its TV, SV and squares are 0, so its
ratio measures are 0 / 0, dead, as measured; its F is 0 and not rejected (``AnovaMeasure``). The
jackknife's replicates scale the same way, so the standard errors are the BatchNorm's too.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from .measures import PER_TRANSFORMATION_COMPONENTS

__all__ = ["DEGREE", "scales", "derive"]

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


def derive(names: tuple[str, ...], values: np.ndarray, replicates: np.ndarray | None, s: np.ndarray,
           transformations: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A group's component rows of the BatchNorm, [classes, rows, C, ...], and its replicates [K, classes, rows,
    C] (None: no error bars), from its input's (``names``: the group's components, stacked as
    ``measures.split_components`` reads them; ``s``: |s| per channel, C values)."""
    degrees = np.concatenate([np.full(transformations if name in PER_TRANSFORMATION_COMPONENTS else 1, DEGREE[name])
                              for name in names])
    factor = s[None, :] ** degrees[:, None]  # [rows, C]
    constant = (degrees[:, None] == 0) & (s[None, :] == 0)  # a constant channel's F and decision: 0

    def scaled(rows: np.ndarray, axis: int) -> np.ndarray:
        shape = (1,) * axis + factor.shape + (1,) * (rows.ndim - axis - 2)
        out = rows * factor.reshape(shape)
        out[np.broadcast_to(constant.reshape(shape), out.shape)] = 0.0
        return out

    return scaled(values, 1), None if replicates is None else scaled(replicates, 2)
