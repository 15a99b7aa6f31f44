"""Streaming statistics over samples: exact under any chunking and under merging across processes.

Each state reads like a torchmetrics ``Metric``: its tensors are declared in ``__init__``, ``update``
folds in a chunk of samples, ``merge`` folds in another state of the same kind (the distributed merge is
defined here: ranks all-gather ``tensors()`` and fold them with ``merge``), and the owner finalizes.

Everything lives on the device, the sample count included, and an update reads nothing back to the host,
so a chunk's updates can be queued (or captured in a CUDA graph) without a synchronization. The update
rules are plain functions of tensors (``fold_moments``, ``fold_spread``, ``fold_sum``) that a measure
group composes into one update per chunk, run eagerly or compiled into a few fused kernels
(``fused.py``). Moments over samples take deviations from a shift near the mean in the activations' own
precision and accumulate them in float64 (Chan's parallel formula across chunks and ranks); the spread
over transformations is two-pass within each sample.
"""
from __future__ import annotations

import torch

__all__ = [
    "Scratch",
    "StreamingState",
    "SampleMoments",
    "SampleSum",
    "TransformationSpread",
    "AccuracyState",
    "fold_moments",
    "fold_spread",
    "fold_sum",
    "mean_of_sum",
    "unbiased_var",
]

F64 = torch.float64


class Scratch:
    """A reusable work buffer for the deviations of two-pass moments on the eager path (fresh
    activation-sized allocations cost page faults on CPU)."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor shaped like x (same device and dtype), valid until the next call."""
        buffer = self._buffer
        if buffer is None or buffer.numel() < x.numel() or buffer.device != x.device or buffer.dtype != x.dtype:
            buffer = self._buffer = torch.empty(x.numel(), device=x.device, dtype=x.dtype)
        return buffer[: x.numel()].view(x.shape)


def _squared_deviations(x: torch.Tensor, mean: torch.Tensor, scratch: Scratch | None) -> torch.Tensor:
    """(x − mean)², into the scratch buffer when there is one (eager), else a fresh tensor (compiled code
    fuses it away)."""
    if scratch is None:
        return (x - mean).square()
    return torch.sub(x, mean, out=scratch.like(x)).square_()


def fold_moments(x: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor,
                 scratch: Scratch | None = None) -> None:
    """Fold b samples x [b, *shape] into a float64 (mean, M2, count) state, in one pass over x.

    The samples' deviations are taken from a shift, the running mean (or, before any sample, the chunk's
    first sample) rounded to x's precision: for a near-constant unit they are exact, where deviations
    from a float32 chunk mean are not (its rounding, merged by Chan's formula, cost up to 1e-3 of M2
    there). Their sums accumulate in float64 and the merge with the state is Chan's formula written for
    a shift (``offset``: the state's mean relative to it), with weights computed on the device.
    """
    b = x.shape[0]
    n_a = count.to(F64)
    shift = torch.where(count > 0, mean, x[0]).to(x.dtype)
    deviations = x - shift if scratch is None else torch.sub(x, shift, out=scratch.like(x))
    s1 = deviations.sum(dim=0, dtype=F64)
    s2 = (deviations.square() if scratch is None else deviations.square_()).sum(dim=0, dtype=F64)
    offset = mean - shift  # float64 (type promotion)
    total = n_a * offset + s1  # sum over all samples of (value − shift)
    n = n_a + b
    m2.add_(n_a * offset.square() + s2 - total.square() / n)
    mean.copy_(shift + total / n)
    count.add_(b)


def fold_spread(x: torch.Tensor, total: torch.Tensor, count: torch.Tensor, scratch: Scratch | None = None) -> None:
    """Add each sample's unbiased std over transformations, x [b, T, *shape], to a float64 total."""
    T = x.shape[1]
    m2 = _squared_deviations(x, x.mean(dim=1, keepdim=True), scratch).sum(dim=1)
    total.add_(m2.div_(T - 1).sqrt_().sum(dim=0, dtype=F64))
    count.add_(x.shape[0])


def fold_sum(x: torch.Tensor, total: torch.Tensor, count: torch.Tensor) -> None:
    """Add a per-sample quantity x [b, *shape] to a float64 total."""
    total.add_(x.sum(dim=0, dtype=F64))
    count.add_(x.shape[0])


def mean_of_sum(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean over samples from their sum; NaN without samples (0 / 0)."""
    return total / count


def unbiased_var(m2: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Unbiased (ddof = 1) variance from M2; NaN with fewer than two samples (0 / 0: M2 of one sample or
    none is 0)."""
    return m2 / (count - 1).clamp_min(0)


class StreamingState:
    """Float64 state tensors and an int64 sample count on the device; subclasses define ``update`` and
    ``merge``."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, names: tuple[str, ...]):
        self.shape = tuple(shape)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self._names = names
        for name in names:
            setattr(self, name, torch.zeros(self.shape, dtype=F64, device=device))

    def tensors(self) -> list[torch.Tensor]:
        """The state's tensors in a fixed order (what ranks exchange; the count is known to every rank)."""
        return [getattr(self, name) for name in self._names]

    def empty(self) -> "StreamingState":
        """A zero state of the same kind, shape and device."""
        return type(self)(self.shape, self.count.device)

    def load(self, count: int, tensors: list[torch.Tensor]) -> "StreamingState":
        for own, value in zip(self.tensors(), tensors):
            own.copy_(value)
        self.count.fill_(count)
        return self


class SampleMoments(StreamingState):
    """Per position mean and M2 (sum of squared deviations) over samples."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        super().__init__(shape, device, ("mean", "m2"))

    def update(self, x: torch.Tensor, scratch: Scratch | None = None) -> None:
        """Fold in a chunk x [b, *shape] of b samples."""
        fold_moments(x, self.mean, self.m2, self.count, scratch)

    def merge(self, other: "SampleMoments") -> None:
        """Chan's parallel merge: the result equals updating with both states' samples."""
        n_a, n_b = self.count.to(F64), other.count.to(F64)
        n = (n_a + n_b).clamp_min(1)  # two empty states merge into an empty one
        delta = other.mean - self.mean
        self.mean.add_(delta * (n_b / n))
        self.m2.add_(other.m2).add_(delta.square_() * (n_a * n_b / n))
        self.count.add_(other.count)

    def var(self) -> torch.Tensor:
        """Unbiased (ddof = 1) variance over samples; NaN with fewer than two samples."""
        return unbiased_var(self.m2, self.count)

    def std(self) -> torch.Tensor:
        return self.var().sqrt()


class SampleSum(StreamingState):
    """Per position sum over samples of a per-sample quantity (counts, squared differences)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        super().__init__(shape, device, ("total",))

    def update(self, x: torch.Tensor) -> None:
        """Fold in x [b, *shape]."""
        fold_sum(x, self.total, self.count)

    def merge(self, other: "SampleSum") -> None:
        self.total.add_(other.total)
        self.count.add_(other.count)

    def mean(self) -> torch.Tensor:
        """Mean over samples; NaN without samples."""
        return mean_of_sum(self.total, self.count)


class TransformationSpread(SampleSum):
    """Sum over samples of the unbiased std over transformations, for the transformation variance."""

    def update(self, x: torch.Tensor, scratch: Scratch | None = None) -> None:
        """Fold in x [b, T, *shape]: b samples under all T transformations."""
        fold_spread(x, self.total, self.count, scratch)


class AccuracyState:
    """Top-1 correct predictions per transformation."""

    def __init__(self, num_transformations: int, device: torch.device):
        self.count = 0  # samples: a host number, known from the chunk sizes
        self.correct = torch.zeros(num_transformations, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits [b·T, classes] in sample-major order, labels [b]."""
        b = labels.shape[0]
        predicted = logits.argmax(dim=-1).view(b, -1)
        self.correct.add_((predicted == labels.view(b, 1)).sum(dim=0))
        self.count += b

    def compute(self) -> torch.Tensor:
        return self.correct.double() / max(self.count, 1)
