"""Brute-force references: the full activation matrix A[n, t] and the measures computed from it in numpy.

Independent of the streaming engine: every transformed image is forwarded on its own, activations are
kept, and the definitions of DESIGN.md are applied literally in float64.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def activation_matrix(model: nn.Module, images: torch.Tensor, transform_one, layer_names: list[str], undo=None):
    """{layer: array [N, T, *unit_shape]} where transform_one(x[1, C, H, W], t) gives image t of x (None
    past the last t); ``undo(feature_map[1, C, h, w], t)``, if given, is applied to each activation
    (same-equivariance). A layer returning a tuple contributes its first element (attention's output)."""
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}

    def keep(name, output):
        store[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: keep(name, o)) for name in layer_names]
    out: dict[str, list] = {name: [] for name in layer_names}
    model.eval()
    try:
        with torch.no_grad():
            for n in range(images.shape[0]):
                rows = {name: [] for name in layer_names}
                t = 0
                while True:
                    x = transform_one(images[n : n + 1], t)
                    if x is None:
                        break
                    model(x)
                    for name in layer_names:
                        value = store[name] if undo is None else undo(store[name], t)
                        rows[name].append(value[0].double().numpy())
                    t += 1
                for name in layer_names:
                    out[name].append(np.stack(rows[name]))
    finally:
        for h in handles:
            h.remove()
    return {name: np.stack(v) for name, v in out.items()}


def tv_sv(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per element: TV = mean_n std_t A, SV = mean_t std_n A (ddof = 1)."""
    return A.std(axis=1, ddof=1).mean(axis=0), A.std(axis=0, ddof=1).mean(axis=0)


def safe_divide(x, y):
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        if y[idx] > 0:
            out[idx] = x[idx] / y[idx]
        elif x[idx] <= 0:
            out[idx] = 1.0
        else:
            out[idx] = np.inf
    return out


def channel(values: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0], -1).mean(axis=1) if values.ndim > 1 else values


def measures(A: np.ndarray, per: str = "element") -> dict[str, np.ndarray]:
    tv, sv = tv_sv(A)
    if per == "channel":
        tv, sv = channel(tv), channel(sv)
    return {"tv": tv, "sv": sv, "nv": safe_divide(tv, sv)}
