"""The memory of a measurement's streaming states, kept for the same session's next measurement (CPU).

A Monitor measures the same layers every ``every`` steps, and every measurement allocates the same
states. On CPU they came fresh from the operating system each time, page by page: on this project's
2-core VM 0.2-1.2 s per GB, and with error bars (K + 1 sets when that was measured; K now where the CPU
kernels finalize) that is ~1 GB on the reference case with the default measures, +1.1 s a measurement
(``benchmarks/README.md``, "Roofline"). ``KeptStates`` serves a session's measurement the blocks its
previous measurement used, zeroed in place (resident memory: a memset), and holds them in between: what a
Monitor holds between steps is its last measurement's states, and blocks that measurement did not use
again are let go. A GPU needs none of this: PyTorch's caching allocator already keeps freed blocks, where
training can use them too.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import torch

__all__ = ["KeptStates", "zeros", "MIN_BYTES"]

MIN_BYTES = 1 << 20  # smaller states come from the C heap as before: nothing to page in
_SERVING: contextvars.ContextVar["KeptStates | None"] = contextvars.ContextVar("kept_states", default=None)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero state tensor: from the ``KeptStates`` serving this measurement, if any, else ``torch.zeros``."""
    kept = _SERVING.get()
    if kept is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return kept.zeros(shape, dtype, device)


class KeptStates:
    """State blocks of a session's last measurement, handed out again (zeroed) by its next one."""

    def __init__(self):
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._leased: list[torch.Tensor] = []
        self.reused = 0  # blocks served again, and blocks allocated anew (for tests and benchmarks)
        self.allocated = 0

    @property
    def kept_bytes(self) -> int:
        """Bytes held for the next measurement."""
        return sum(b.numel() * b.element_size() for blocks in self._free.values() for b in blocks)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Inside: the states a measurement allocates through ``zeros`` come from here. On leaving, its blocks
        are kept for the next measurement and the rest let go. (Its states must be finalized by then: the
        results are copies, on the host.)"""
        token = _SERVING.set(self)
        try:
            yield
        finally:
            _SERVING.reset(token)
            self._free = {}
            for block in self._leased:
                self._free.setdefault((block.numel(), block.dtype), []).append(block)
            self._leased = []

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A zero tensor of ``shape``: a kept block of its size on CPU, else a new one (kept from now on)."""
        numel = math.prod(shape)
        if torch.device(device).type != "cpu" or numel * dtype.itemsize < MIN_BYTES:
            return torch.zeros(shape, dtype=dtype, device=device)
        free = self._free.get((numel, dtype))
        if free:
            block = free.pop().zero_()
            self.reused += 1
        else:
            block = torch.zeros(numel, dtype=dtype, device=device)
            self.allocated += 1
        self._leased.append(block)
        return block.view(shape)
