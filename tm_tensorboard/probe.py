"""The probe: the fixed samples a measurement transforms, gathered from whatever the user has at hand."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from . import caller

__all__ = ["Probe", "as_probe", "DEFAULT_NUM_SAMPLES", "border_variation"]

# Samples read from a Dataset / DataLoader when num_samples is not given. The measures are means over the
# probe's samples, so their standard error falls as 1/sqrt(N): 256 samples put it at 1/16 of the spread
# between samples, and tmeasures' experiments use a few hundred. Reading on (a whole training set, or an
# endless stream) would only cost time and memory at every measurement.
DEFAULT_NUM_SAMPLES = 256
_END = object()


@dataclass
class Probe:
    """Images [N, ...] and optional integer class labels [N] (kept on the host for grouping)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> "Probe":
        return Probe(self.images.to(device), self.labels)

    def shard(self, rank: int, world_size: int) -> "Probe":
        """This process's contiguous share of the samples (possibly empty)."""
        n = len(self)
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        return Probe(self.images[lo:hi], None if self.labels is None else self.labels[lo:hi])


def _tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, (int, float, np.integer, np.floating)) and what == "label":
        return torch.tensor(x)
    raise TypeError(
        f"probe {what}s must be tensors or numpy arrays, got {type(x).__name__}"
        + ("; add a ToTensor()-like transform to the dataset" if what == "image" else "")
    )


def _split_item(item: Any) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    if isinstance(item, (tuple, list)) and len(item) == 1:
        return item[0], None
    return item, None


def _from_items(items, num_samples: int | None, batched: bool,
                peek: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The first ``num_samples`` samples of ``items`` (all if None), and whether there were more (known
    when more were read, or, with ``peek``, by reading one more item)."""
    images, labels, n = [], [], 0
    items = iter(items)
    for item in items:
        x, y = _split_item(item)
        x = _tensor(x, "image")
        if not batched:
            x = x.unsqueeze(0)
        images.append(x)
        if y is not None:
            y = _tensor(y, "label").reshape(-1)
            labels.append(y)
        n += x.shape[0]
        if num_samples is not None and n >= num_samples:
            break
    if not images:
        raise ValueError("the probe dataset / loader yielded no samples")
    if labels and len(labels) != len(images):
        raise ValueError("some probe items have labels and others do not")
    out_x = torch.cat(images)
    out_y = torch.cat(labels) if labels else None
    more = False
    if num_samples is not None:
        more = n > num_samples or (peek and n == num_samples and next(items, _END) is not _END)
        out_x, out_y = out_x[:num_samples], None if out_y is None else out_y[:num_samples]
    return out_x, out_y, more


def as_probe(probe: Any, labels: Any = None, num_samples: int | None = None) -> Probe:
    """Normalize a tensor [N, ...], an ``(images, labels)`` pair, a Dataset or a DataLoader.

    ``num_samples`` keeps the first N samples (required to be available). A Dataset or DataLoader is read
    up to ``DEFAULT_NUM_SAMPLES`` samples without it, with a warning if it has more; a tensor is used whole.
    Raises ValueError / TypeError naming what is wrong.
    """
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 2):
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    pair_labels, more = None, False
    limit = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples  # of a Dataset / DataLoader
    if isinstance(probe, (torch.Tensor, np.ndarray)):
        images = _tensor(probe, "image")
    elif isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[0], (torch.Tensor, np.ndarray)):
        images, pair_labels = _tensor(probe[0], "image"), _tensor(probe[1], "label")
    elif isinstance(probe, DataLoader):
        images, pair_labels, more = _from_items(probe, limit, batched=True, peek=num_samples is None)
    elif isinstance(probe, Dataset) and not isinstance(probe, IterableDataset):
        more = len(probe) > limit
        images, pair_labels, _ = _from_items((probe[i] for i in range(min(limit, len(probe)))), None, batched=False)
    elif isinstance(probe, IterableDataset):
        images, pair_labels, more = _from_items(probe, limit, batched=False, peek=num_samples is None)
    else:
        raise TypeError(
            "probe must be a tensor [N, C, H, W], an (images, labels) pair, a Dataset or a DataLoader; "
            f"got {type(probe).__name__}"
        )
    if more and num_samples is None:
        warnings.warn(
            f"the probe {'DataLoader' if isinstance(probe, DataLoader) else 'dataset'} has more than {limit} "
            f"samples; using the first {limit} (pass num_samples= to choose: {limit} put the measures' standard "
            f"error at 1/{math.isqrt(limit)} of the spread between samples)",
            UserWarning,
            stacklevel=caller.stacklevel(),
        )
    if labels is not None and pair_labels is not None:
        raise ValueError("labels were given twice: in the probe and as labels=; pass them once")
    if labels is not None:
        pair_labels = _tensor(labels, "label")
    if pair_labels is not None and pair_labels.dim() == 2 and pair_labels.shape[-1] == 1:
        pair_labels = pair_labels.reshape(-1)
    if pair_labels is not None and (pair_labels.dim() != 1 or pair_labels.shape[0] != images.shape[0]):
        raise ValueError(
            f"labels must be a 1-D sequence with one class index per sample: got shape {list(pair_labels.shape)} "
            f"for {images.shape[0]} samples"
        )
    if num_samples is not None:
        if images.shape[0] < num_samples:
            raise ValueError(f"num_samples={num_samples} but the probe has only {images.shape[0]} samples")
        images = images[:num_samples]
        pair_labels = None if pair_labels is None else pair_labels[:num_samples]
    if images.is_complex():
        raise TypeError(
            f"probe images are complex ({str(images.dtype).removeprefix('torch.')}); the measures are defined on "
            "real values: pass the real part, the magnitude, or the real and imaginary parts as channels"
        )
    if not images.is_floating_point():
        images = images.float()
    if images.dim() < 2:
        raise ValueError(f"probe images must be shaped [N, ...] with N samples; got shape {list(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(
            f"the probe has {images.shape[0]} sample(s); the sample variance needs at least 2 (256 or more is typical)"
        )
    if pair_labels is not None:
        if pair_labels.is_floating_point() or pair_labels.is_complex() or pair_labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got dtype {pair_labels.dtype}")
        pair_labels = pair_labels.detach().to("cpu", torch.int64)
    return Probe(images.detach(), pair_labels)


def border_variation(images: torch.Tensor) -> float:
    """How much the images vary along their outermost pixels, relative to how much they vary overall (mean
    over samples and channels of the two standard deviations' ratio): ~0 when the objects stay clear of the
    border (MNIST's digits on black), ~1 for natural images that run to the edge."""
    x = images.detach().double()
    frame = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)
    overall = x.flatten(-2).std(dim=-1)
    ratio = frame.std(dim=-1) / overall.clamp_min(1e-12)
    return float(ratio[overall > 0].mean()) if bool((overall > 0).any()) else 0.0
