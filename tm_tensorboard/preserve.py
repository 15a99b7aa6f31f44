"""Measuring never changes training: guards that restore everything a measurement could touch."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["preserved_rng_state", "preserved_training_state"]


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore the torch / CUDA / numpy / ``random`` RNG states on exit, also on error (reading a
    shuffling DataLoader draws from them)."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


@contextlib.contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode without autograd; on exit (also on error) restore every module's
    train/eval flag, the autograd mode and the RNG states."""
    modes = [(m, m.training) for m in model.modules()]
    grad_enabled = torch.is_grad_enabled()
    with preserved_rng_state():
        try:
            model.eval()
            torch.set_grad_enabled(False)
            yield
        finally:
            torch.set_grad_enabled(grad_enabled)
            for module, training in modes:
                module.training = training
