"""Streaming statistics of one activation: exact under any chunking and under merging across processes.

Each state reads like a torchmetrics ``Metric``: its tensors are declared in ``__init__``, ``update``
folds in a chunk, ``merge`` folds in another state of the same kind (the distributed merge is defined
here, not elsewhere), ``compute`` finalizes. Counts are host integers (chunk sizes are known on the host),
so updating never synchronizes with the device. Within a chunk moments are two-pass in the activations'
own precision (float32); across chunks they accumulate in float64 with Chan's parallel formula.
"""
from __future__ import annotations

import torch

__all__ = ["SampleMoments", "TransformationSpread", "VarianceState", "AccuracyState"]


def _two_pass(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sum of squared deviations) of x along ``dim``: mean first, then deviations from it."""
    mean = x.mean(dim=dim, keepdim=True)
    dev = x - mean
    return mean.squeeze(dim), dev.mul_(dev).sum(dim=dim)


class SampleMoments:
    """Per position (transformation, unit) mean and M2 over samples, for the sample variance."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.count = 0
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(shape, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Fold in a chunk x [b, *shape] of b samples."""
        b = x.shape[0]
        if b:
            mean, m2 = _two_pass(x, 0)
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

    def std(self) -> torch.Tensor:
        """Unbiased (ddof = 1) standard deviation over samples; NaN with fewer than two samples."""
        return (self.m2 / (self.count - 1)).sqrt() if self.count > 1 else torch.full_like(self.m2, float("nan"))


class TransformationSpread:
    """Sum over samples of the unbiased std over transformations, for the transformation variance."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.count = 0
        self.total = torch.zeros(shape, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Fold in x [b, T, *shape]: b samples under all T transformations."""
        b, T = x.shape[0], x.shape[1]
        if b:
            _, m2 = _two_pass(x, 1)
            self.total.add_(m2.div_(T - 1).sqrt_().sum(dim=0, dtype=torch.float64))
            self.count += b

    def merge(self, other: "TransformationSpread") -> None:
        self.total.add_(other.total)
        self.count += other.count

    def mean_std(self) -> torch.Tensor:
        return self.total / self.count if self.count else torch.full_like(self.total, float("nan"))


class VarianceState:
    """Transformation variance (TV) and sample variance (SV) of one activation's units.

    TV = mean over samples of std over transformations; SV = mean over transformations of std over samples.
    """

    def __init__(self, num_transformations: int, num_units: int, device: torch.device):
        self.spread = TransformationSpread((num_units,), device)
        self.moments = SampleMoments((num_transformations, num_units), device)

    @property
    def count(self) -> int:
        return self.spread.count

    def update(self, a: torch.Tensor) -> None:
        """Fold in activations a [b, T, units] (float32)."""
        self.spread.update(a)
        self.moments.update(a)

    def merge(self, other: "VarianceState") -> None:
        self.spread.merge(other.spread)
        self.moments.merge(other.moments)

    def compute(self) -> torch.Tensor:
        """[2, units] float64 on the state's device: row 0 = TV, row 1 = SV."""
        return torch.stack([self.spread.mean_std(), self.moments.std().mean(dim=0)])

    def tensors(self) -> list[torch.Tensor]:
        """The state's tensors, in a fixed order, for collective merging across processes."""
        return [self.spread.total, self.moments.mean, self.moments.m2]

    @classmethod
    def from_tensors(cls, count: int, tensors: list[torch.Tensor]) -> "VarianceState":
        total, mean, m2 = tensors
        state = cls(mean.shape[0], mean.shape[1], mean.device)
        state.spread.total.copy_(total)
        state.moments.mean.copy_(mean)
        state.moments.m2.copy_(m2)
        state.spread.count = state.moments.count = count
        return state


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

    def merge(self, other: "AccuracyState") -> None:
        self.correct.add_(other.correct)
        self.count += other.count

    def compute(self) -> torch.Tensor:
        return self.correct.double() / max(self.count, 1)
