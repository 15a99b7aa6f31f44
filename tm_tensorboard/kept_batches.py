"""The probe's transformed batches kept from a session's measurement for its next (CPU, a Monitor's).

A Monitor measures the same probe under the same transformations every ``every`` steps, and each measurement
transformed every chunk anew (the warp, ~1-1.5 % of a Monitor's measurement of SimpleCNN on 32-pixel glyphs,
benchmarks/README.md). ``KeptBatches`` keeps each chunk's batch, as the model took it, for the next measurement,
up to MAX_BYTES in all (the chunks beyond are transformed each time); a batch the model changed in place is made
anew."""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["MAX_BYTES", "KeptBatches"]

MAX_BYTES = 128 << 20  # at most this much memory held between measurements (a CIFAR-sized probe of 256 × 16: 50 MB)


class KeptBatches:
    """The transformed batches of one probe's chunks, by their range of samples."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self._of: torch.Tensor | None = None  # the probe's images they were made from
        self._batches: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # (lo, hi) -> batch, its version
        self._bytes = 0

    def batch(self, images: torch.Tensor, lo: int, hi: int, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The batch of ``images[lo:hi]``: kept from a measurement before, or ``make()`` (and kept if it fits)."""
        if images is not self._of:
            self._of, self._batches, self._bytes = images, {}, 0
        kept = self._batches.get((lo, hi))
        if kept is not None and kept[0]._version == kept[1]:
            return kept[0]
        batch = make()
        size = batch.numel() * batch.element_size()
        if kept is None and self._bytes + size <= self.max_bytes:
            self._batches[(lo, hi)], self._bytes = (batch, batch._version), self._bytes + size
        elif kept is not None:
            self._batches[(lo, hi)] = (batch, batch._version)
        return batch
