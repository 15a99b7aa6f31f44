"""Streaming statistics over samples: exact under any chunking and under merging across processes.

Each state reads like a torchmetrics ``Metric``: its tensors are declared in ``__init__``, ``merge`` folds
in another state of the same kind (the distributed merge is defined here: ranks all-gather ``tensors()``
and fold them with ``merge``), and ``mean`` / ``var`` finalize it. Chunks of samples are folded in by
the update rules below, which a measure group composes into one fused update of all its states.

Everything lives on the device, the sample count included, and an update reads nothing back to the host,
so a chunk's updates can be queued (or captured in a CUDA graph) without a synchronization. The update
rules are plain functions of tensors (``fold_moments``, ``fold_spread``, ``fold_sum``) that a measure
group composes into one update per chunk, run eagerly or compiled into a few fused kernels
(``fused.py``). Moments over samples take deviations from a shift near the mean in the activations' own
precision and accumulate them in the states' dtype (Chan's parallel formula across chunks and ranks); the
spread over transformations is two-pass within each sample.

States are float64 by default; inside ``state_dtype(torch.float32)`` new states are float32, which halves
their memory (what limits big models: the per-(transformation, element) moments) and the update rules then
work in float32 too, temporaries included. Because deviations are taken from a shift and chunks merged
with Chan's formula, the variance measures from float32 states stay within a relative 1e-5 per element and
1e-6 per channel of the float64 states' on the reference case (SimpleCNN, 32 px, rotations(16), N = 256:
at most 4.7e-6 and 3.2e-7; ``tests/test_memory.py``), far from the cancellation of an unshifted float32
sum of squares.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import torch

from . import kept_states

__all__ = [
    "Scratch",
    "StreamingState",
    "STATE_DTYPES",
    "state_dtype",
    "SampleMoments",
    "SampleSum",
    "AccuracyState",
    "fold_moments",
    "fold_spread",
    "fold_sum",
    "mean_of_sum",
    "unbiased_var",
]

F64 = torch.float64
STATE_DTYPES = (torch.float64, torch.float32)
_STATE_DTYPE: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("state_dtype", default=F64)


@contextlib.contextmanager
def state_dtype(dtype: torch.dtype) -> Iterator[None]:
    """States created inside the block hold their values in ``dtype`` (float64 or float32)."""
    if dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be torch.float64 or torch.float32, got {dtype!r}")
    token = _STATE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _STATE_DTYPE.reset(token)


class Scratch:
    """Reusable work buffers, by name: fresh activation-sized allocations cost page faults on CPU, each
    chunk and layer. (Compiled code allocates its own temporaries, and writes into these where it is given
    one: ``warps.py``.)"""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[str, dict[tuple[int, ...], torch.Tensor]] = {}  # per buffer, its views by shape

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized tensor, valid until the next ``get`` of the same name. A shape asked for before
        gets the same view again (no op: every op counts on a GPU's launch queue)."""
        buffer = self._buffers.get(name)
        if buffer is not None and buffer.dtype == dtype and buffer.device == device:
            view = self._views[name].get(shape)
            if view is not None:
                return view
        numel = math.prod(shape)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
            self._views[name] = {}  # views of the old buffer would keep it alive
        view = self._views[name][shape] = buffer[:numel].view(shape)
        return view

    def like(self, x: torch.Tensor, name: str = "activation") -> torch.Tensor:
        return self.get(name, tuple(x.shape), x.dtype, x.device)


def fold_moments(x: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor,
                 scratch: Scratch | None = None) -> None:
    """Fold b samples x [b, *shape] into a (mean, M2, count) state.

    The samples' deviations are taken from the chunk's first sample: for a near-constant unit they are
    exact, where deviations from a float32 chunk mean are not (its rounding, merged by Chan's formula,
    cost up to 1e-3 of M2 there). Their sums give the chunk's mean and M2 about it, merged with the
    state by Chan's formula (``delta``: the state's mean minus the chunk's) in the state's dtype (float64
    unless the states are float32: no temporary is wider than the state), with weights computed on the
    device. Merging the chunk's own M2 and the squared difference of the means, rather than sums about
    the shift, keeps a float32 merge free of cancellation when the shift is far from the mean (a unit
    that rarely fires, its first sample firing). The chunk's moments are taken in x's precision (float32
    at least: half-precision activations are measured in float32) and merged in the state's: float64
    sums cost the compiled kernel twice the time. Compiled (``scratch`` None), the chunk's M2 is a
    second pass over its deviations from their mean (the chunk's rows are still in cache, and a float32
    ``s2 - s1 * mean`` would cancel); eager, the same steps run in place in ``scratch``'s buffers, with
    torch's blocked float32 sums.
    """
    b = x.shape[0]
    acc = mean.dtype
    n_a = count.to(acc)
    weight = b / (n_a + b)  # the chunk's share of the merged samples
    shift = x[0]
    if scratch is None:
        deviations = x - shift
        chunk_mean = deviations.mean(dim=0)  # relative to the shift
        chunk_m2 = (deviations - chunk_mean).square().sum(dim=0)  # a second pass over the chunk, in cache
        chunk_mean = chunk_mean.to(acc)
        delta = (mean - shift) - chunk_mean
        m2.add_(chunk_m2.to(acc) + delta.square() * (n_a * weight))
        mean.sub_(delta * weight)
    else:
        buffer = lambda name, dtype=acc: scratch.get(name, tuple(mean.shape), dtype, x.device)  # noqa: E731
        deviations = torch.sub(x, shift, out=scratch.like(x))
        s1 = torch.sum(deviations, dim=0, out=buffer("s1", x.dtype))
        s2 = torch.sum(deviations.square_(), dim=0, out=buffer("s2", x.dtype))
        chunk_mean = torch.div(s1, b, out=buffer("chunk mean"))
        delta = torch.sub(mean, shift, out=buffer("delta")).sub_(chunk_mean)
        m2.add_(s2).addcmul_(s1, chunk_mean, value=-1)
        m2.addcmul_(delta, torch.mul(delta, n_a * weight, out=buffer("weighted")))
        mean.addcmul_(delta, weight, value=-1)
    count.add_(b)


def fold_spread(x: torch.Tensor, total: torch.Tensor, count: torch.Tensor, scratch: Scratch | None = None) -> None:
    """Add each sample's unbiased std over transformations, x [b, T, *shape], to a total (two-pass within
    each sample; eager, in ``scratch``'s buffers)."""
    b, T = x.shape[0], x.shape[1]
    if scratch is None:
        m2 = (x - x.mean(dim=1, keepdim=True)).square().sum(dim=1)
        total.add_(m2.div_(T - 1).sqrt_().sum(dim=0).to(total.dtype))
    else:
        per_sample = (b, 1, *x.shape[2:])
        mean = torch.mean(x, dim=1, keepdim=True, out=scratch.get("spread mean", per_sample, x.dtype, x.device))
        deviations = torch.sub(x, mean, out=scratch.like(x)).square_()
        m2 = torch.sum(deviations, dim=1, keepdim=True, out=mean)
        std = m2.div_(T - 1).sqrt_()
        total.add_(torch.sum(std, dim=(0, 1), out=scratch.get("spread sum", tuple(total.shape), x.dtype, x.device)))
    count.add_(b)


def fold_sum(x: torch.Tensor, total: torch.Tensor, count: torch.Tensor, scratch: Scratch | None = None) -> None:
    """Add a per-sample quantity x [b, *shape] to a total."""
    if scratch is None:
        total.add_(x.sum(dim=0).to(total.dtype))
    else:
        total.add_(torch.sum(x, dim=0, out=scratch.get("sum", tuple(total.shape), x.dtype, x.device)))
    count.add_(x.shape[0])


def mean_of_sum(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean over samples from their sum; NaN without samples (0 / 0)."""
    return total / count


def unbiased_var(m2: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Unbiased (ddof = 1) variance from M2; NaN with fewer than two samples (0 / 0: M2 of one sample or
    none is 0)."""
    return m2 / (count - 1).clamp_min(0)


class StreamingState:
    """State tensors in the ``state_dtype`` of their creation (float64 by default) and an int64 sample
    count on the device; subclasses define ``merge``."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, names: tuple[str, ...]):
        self.shape = tuple(shape)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self._names = names
        dtype = _STATE_DTYPE.get()
        for name in names:
            setattr(self, name, kept_states.zeros(self.shape, dtype, device))

    def tensors(self) -> list[torch.Tensor]:
        """The state's tensors in a fixed order (what ranks exchange; the count is known to every rank)."""
        return [getattr(self, name) for name in self._names]

    def empty(self) -> "StreamingState":
        """A zero state of the same kind, shape, dtype and device."""
        with state_dtype(self.tensors()[0].dtype):
            return type(self)(self.shape, self.count.device)

    def numel(self) -> int:
        """Values in the state's tensors (its count aside)."""
        return sum(t.numel() for t in self.tensors())

    def carve(self, block: torch.Tensor, count: torch.Tensor, offset: int) -> tuple["StreamingState", int]:
        """A zero state like this one whose tensors are views of a zero ``block`` from ``offset`` on (its
        ``count`` a zero 0-d int64 view too), and where the next one starts: states of many shards in one
        allocation (``LayerMeasure.reserve_shards``)."""
        state = object.__new__(type(self))
        state.__dict__.update(self.__dict__)
        state.count = count
        for name, tensor in zip(self._names, self.tensors()):
            setattr(state, name, block.as_strided(tensor.shape, tensor.stride(), offset))
            offset += tensor.numel()
        return state, offset

    def load(self, count: int, tensors: list[torch.Tensor]) -> "StreamingState":
        for own, value in zip(self.tensors(), tensors):
            own.copy_(value)
        self.count.fill_(count)
        return self


class SampleMoments(StreamingState):
    """Per position mean and M2 (sum of squared deviations) over samples."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        super().__init__(shape, device, ("mean", "m2"))

    def merge(self, other: "SampleMoments") -> None:
        """Chan's parallel merge: the result equals updating with both states' samples."""
        n_a, n_b = self.count.to(self.mean.dtype), other.count.to(self.mean.dtype)
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
    """Per position sum over samples of a per-sample quantity (a spread, a firing rate, a squared
    difference)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        super().__init__(shape, device, ("total",))

    def merge(self, other: "SampleSum") -> None:
        self.total.add_(other.total)
        self.count.add_(other.count)

    def mean(self) -> torch.Tensor:
        """Mean over samples; NaN without samples."""
        return mean_of_sum(self.total, self.count)


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
