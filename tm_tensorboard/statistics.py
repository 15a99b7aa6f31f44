"""Streaming statistics over samples: exact under any chunking and under merging across processes.

Each state reads like a torchmetrics ``Metric``: its tensors are declared in ``__init__``, ``update``
folds in a chunk of samples, ``merge`` folds in another state of the same kind (the distributed merge is
defined here: ranks all-gather ``tensors()`` and fold them with ``merge``), and the owner finalizes.
Counts are host integers (chunk sizes are known on the host), so updating never synchronizes with the
device. Within a chunk moments are two-pass in the activations' own precision (float32); across chunks
they accumulate in float64 with Chan's parallel formula.
"""
from __future__ import annotations

import torch

__all__ = ["Scratch", "StreamingState", "SampleMoments", "SampleSum", "TransformationSpread", "AccuracyState"]


class Scratch:
    """A reusable work buffer for the deviations of two-pass moments (fresh allocations per layer and
    chunk cost page faults on CPU)."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor shaped like x (same device and dtype), valid until the next call."""
        buffer = self._buffer
        if buffer is None or buffer.numel() < x.numel() or buffer.device != x.device or buffer.dtype != x.dtype:
            buffer = self._buffer = torch.empty(x.numel(), device=x.device, dtype=x.dtype)
        return buffer[: x.numel()].view(x.shape)


def _two_pass(x: torch.Tensor, dim: int, scratch: Scratch | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sum of squared deviations) of x along ``dim``: the mean first, then the deviations from it.

    The deviations are formed one slice along ``dim`` at a time into a slice-sized buffer and squared into
    the sum there, so x is read twice and no x-sized temporary is written: the statistics are
    memory-bound, and this takes a third of the traffic of materializing, squaring and summing them.
    """
    mean = x.mean(dim=dim)
    m2 = torch.zeros_like(mean)
    dev = torch.empty_like(mean) if scratch is None else scratch.like(mean)
    for i in range(x.shape[dim]):
        torch.sub(x.select(dim, i), mean, out=dev)
        m2.addcmul_(dev, dev)
    return mean, m2


class StreamingState:
    """Float64 state tensors plus a host sample count; subclasses define ``update`` and ``merge``."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, names: tuple[str, ...]):
        self.shape = tuple(shape)
        self.count = 0
        self._names = names
        for name in names:
            setattr(self, name, torch.zeros(self.shape, dtype=torch.float64, device=device))

    def tensors(self) -> list[torch.Tensor]:
        """The state's tensors in a fixed order (what ranks exchange)."""
        return [getattr(self, name) for name in self._names]

    def empty(self) -> "StreamingState":
        """A zero state of the same kind, shape and device."""
        return type(self)(self.shape, self.tensors()[0].device)

    def load(self, count: int, tensors: list[torch.Tensor]) -> "StreamingState":
        for own, value in zip(self.tensors(), tensors):
            own.copy_(value)
        self.count = count
        return self


class SampleMoments(StreamingState):
    """Per position mean and M2 (sum of squared deviations) over samples."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        super().__init__(shape, device, ("mean", "m2"))

    def update(self, x: torch.Tensor, scratch: Scratch | None = None) -> None:
        """Fold in a chunk x [b, *shape] of b samples."""
        b = x.shape[0]
        if b:
            mean, m2 = _two_pass(x, 0, scratch)
            self._fold(b, mean, m2)

    def merge(self, other: "SampleMoments") -> None:
        """Chan's parallel merge: the result equals updating with both states' samples."""
        self._fold(other.count, other.mean, other.m2)

    def _fold(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if n_b == 0:
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b.to(torch.float64) - self.mean
        self.mean.add_(delta, alpha=n_b / n)
        self.m2.add_(m2_b).addcmul_(delta, delta, value=n_a * n_b / n)
        self.count = n

    def var(self) -> torch.Tensor:
        """Unbiased (ddof = 1) variance over samples; NaN with fewer than two samples."""
        return self.m2 / (self.count - 1) if self.count > 1 else torch.full_like(self.m2, float("nan"))

    def std(self) -> torch.Tensor:
        return self.var().sqrt()


class SampleSum(StreamingState):
    """Per position sum over samples of a per-sample quantity (counts, squared differences)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        super().__init__(shape, device, ("total",))

    def update(self, x: torch.Tensor) -> None:
        """Fold in x [b, *shape]."""
        self.total.add_(x.sum(dim=0, dtype=torch.float64))
        self.count += x.shape[0]

    def merge(self, other: "SampleSum") -> None:
        self.total.add_(other.total)
        self.count += other.count

    def mean(self) -> torch.Tensor:
        return self.total / self.count if self.count else torch.full_like(self.total, float("nan"))


class TransformationSpread(SampleSum):
    """Sum over samples of the unbiased std over transformations, for the transformation variance."""

    def update(self, x: torch.Tensor, scratch: Scratch | None = None) -> None:
        """Fold in x [b, T, *shape]: b samples under all T transformations."""
        b, T = x.shape[0], x.shape[1]
        if b:
            _, m2 = _two_pass(x, 1, scratch)
            self.total.add_(m2.div_(T - 1).sqrt_().sum(dim=0, dtype=torch.float64))
            self.count += b


class AccuracyState:
    """Top-1 correct predictions per transformation."""

    def __init__(self, num_transformations: int, device: torch.device):
        self.count = 0
        self.correct = torch.zeros(num_transformations, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits [b·T, classes] in sample-major order, labels [b]."""
        b = labels.shape[0]
        predicted = logits.argmax(dim=-1).view(b, -1)
        self.correct.add_((predicted == labels.view(b, 1)).sum(dim=0))
        self.count += b

    def compute(self) -> torch.Tensor:
        return self.correct.double() / max(self.count, 1)
