"""What a measurement holds in memory, known before its first chunk, and the passes that fit a budget.

The streaming states, not the activations, are what limits big models: the invariance states of a layer
are a mean and an M2 per transformation and element plus one spread total per element, for each class
(``layer_measures.VarianceMeasure``):

    state bytes = classes × (2·T + 1) × elements × 8     (float64 states; × 4 with state_dtype=float32)

per measure group that applies (same-equivariance: the same again on feature-map layers), K + 1 times
that for the groups with error bars when the probe is split into K shards (``shards.py``: every shard's
states are kept for the jackknife, and the whole probe's made from them at the end; where the replicates'
CPU kernels finalize, into shard 0's memory: K times, so the estimate is their bound); with ``positions=``,
elements = channels × the positions kept per channel on the layers sampled (``positions.py``).
An ImageNet ResNet-50 at 224 px has 158 leaf layers of 32.0 M output elements per image:
8.5 GB for invariance at T = 16, 16.9 GB with same-equivariance, in float64 states (11.1 GB with the
default BatchNorm dedupe, 105 layers).

``estimate`` sizes each layer's states by building its measures on the ``meta`` device, exactly as a
measurement allocates them, so the numbers follow the measures' own ``make_states``. On top comes an
estimate of one chunk's working memory (``working_bytes``) and of the finalized results kept on the host. (Without
a budget, a chunk of at most ``layer_measures.PAIRED_SAMPLES`` samples keeps its layers' outputs for the next chunk's
update, ``Chunk.hold``: one chunk's outputs of every layer more than this counts; under a budget, none is kept.)
``MemoryReport.passes`` splits the layers into passes over the probe whose states fit a budget; a layer
too big alone gets a ValueError that says what to change. Not counted: torch's own runtime (with
``torch.compile``, the compiler and its kernels: 0.2-0.3 GB once per process, measured). The peak growth
of a measurement's resident memory against this estimate is in benchmarks/README.md (ResNet-50 at 224 px).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .capture import LayerInfo
from .layer_measures import GROUPS, LayerMeasure, MeasureOptions
from .positions import build_measure
from .transforms import TransformationSet

__all__ = ["LayerMemory", "MemoryReport", "estimate", "measure_state_bytes", "working_bytes", "parse_bytes",
           "format_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Working memory of one chunk, in activations of the largest observed layer: the forward holds that layer's
# input and output and a residual kept for later, the hooks working copies (deviations, the feature maps
# laid out pixel-major and moved back for same-equivariance: two, the compiled kernels' temporaries) and
# the allocator's slack. Set from
# the peak resident memory of ResNet-50 measurements at 224 px (benchmarks/bench_resnet50.py), compiled:
# 4 (the count before) fell 0.2-0.9 GB short there.
_LIVE_ACTIVATIONS = 8
_RESULT_BYTES = 16  # per element and measure group: the finalized per-element components, float64 on the host


def parse_bytes(value: int | str) -> int:
    """A byte count from an int or a string such as "4GB", "512 MiB", "1.5GiB" (kB/MB/GB/TB are powers of
    1000, KiB/MiB/GiB/TiB of 1024; case-insensitive). ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", value)) \
            and match.group(2).lower() in _UNITS:
        number = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        raise ValueError(f"memory_budget must be a number of bytes (int) or a string such as '4GB' or '512MiB' "
                         f"(units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB); got {value!r}")
    if number <= 0:
        raise ValueError(f"memory_budget must be positive; got {value!r}")
    return number


def format_bytes(count: int) -> str:
    """``count`` bytes for people: "16.9 GB", "512.0 kB", "12 B" (powers of 1000)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def measure_state_bytes(measure: LayerMeasure) -> int:
    """Bytes of the streaming states one measure holds now: every class's, and those of the closed shards."""
    sets = measure.per_class + [states for shard in measure.shard_states for states in shard]
    tensors = [t for states in sets for s in states.values() for t in (*s.tensors(), s.count)]
    return sum(t.numel() * t.element_size() for t in tensors)


def working_bytes(layers: Sequence[LayerInfo], T: int, batch_size: int, input_shape: Sequence[int],
                  activation_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    """An estimate of one chunk's memory besides the states: the batch of batch_size × T transformed
    inputs, ``_LIVE_ACTIVATIONS`` activations of the largest layer (the forward's and the hooks'; at least
    float32: the hooks measure half-precision outputs in float32), and the eager updates' five
    [T, elements] work buffers of its moments (two in the activations' dtype, three in the states')."""
    largest = max((math.prod(info.unit_shape) for info in layers), default=0)
    item = max(torch.empty((), dtype=activation_dtype).element_size(), 4)
    state_item = torch.empty((), dtype=state_dtype).element_size()
    rows = batch_size * T
    forward_and_hooks = rows * (math.prod(input_shape) + _LIVE_ACTIVATIONS * largest) * item
    return forward_and_hooks + T * largest * (2 * item + 3 * state_item)


def _measured_elements(info: LayerInfo) -> int:
    """The elements a layer's per-element results have: all, or its channels' sampled positions."""
    if info.positions is None:
        return math.prod(info.unit_shape)
    return info.num_channels * info.positions


@dataclass(frozen=True)
class LayerMemory:
    """One observed layer's streaming states: bytes per measure group and in all."""

    name: str
    module_type: str
    unit_shape: tuple[int, ...]
    by_group: dict[str, int]
    positions: int | None = None  # K: the states of K sampled positions per channel (None: all)

    @property
    def state_bytes(self) -> int:
        return sum(self.by_group.values())

    @property
    def module(self) -> str:
        """The module (or "input") whose calls this activation is one of: passes split by module."""
        return self.name.split("#")[0]


@dataclass
class MemoryReport:
    """The memory a measurement needs: each layer's streaming states (exact), one chunk's working memory
    (an estimate) and, under a budget, the passes over the probe that fit it. ``str()`` is a table."""

    layers: list[LayerMemory]
    working_bytes: int
    T: int
    batch_size: int
    classes: int
    groups: tuple[str, ...]
    state_dtype: torch.dtype
    shards: int  # error-bar shards (1: none)
    budget: int | None = None
    _passes: list[list[str]] | None = field(default=None, init=False, repr=False)

    @property
    def state_bytes(self) -> int:
        return sum(layer.state_bytes for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        """States of all layers and one chunk's working memory: one pass's peak, as estimated."""
        return self.state_bytes + self.working_bytes

    def largest(self, count: int = 5) -> list[LayerMemory]:
        """The ``count`` layers with the largest states, largest first."""
        return sorted(self.layers, key=lambda layer: -layer.state_bytes)[:count]

    def passes(self) -> list[list[str]]:
        """The layer names each pass over the probe observes: all in one pass without a budget or when they
        fit it, else as few passes as first-fit-decreasing packing finds, each pass's states within the
        budget less one chunk's working memory (the calls of one module stay in one pass). ValueError if a
        module's states do not fit alone."""
        if self._passes is None:
            self._passes = self._plan()
        return self._passes

    def _plan(self) -> list[list[str]]:
        if self.budget is None or self.total_bytes <= self.budget:
            return [[layer.name for layer in self.layers]]
        room = self.budget - self.working_bytes
        modules: dict[str, list[LayerMemory]] = {}
        for layer in self.layers:
            modules.setdefault(layer.module, []).append(layer)
        sizes = {module: sum(layer.state_bytes for layer in calls) for module, calls in modules.items()}
        too_big = [module for module, size in sizes.items() if size > room]
        if too_big:
            raise ValueError(self._too_small(too_big, sizes, room))
        bins: list[tuple[int, list[str]]] = []  # (bytes, modules)
        for module in sorted(sizes, key=lambda m: -sizes[m]):
            target = next((i for i, (used, _) in enumerate(bins) if used + sizes[module] <= room), None)
            if target is None:
                bins.append((sizes[module], [module]))
            else:
                used, members = bins[target]
                bins[target] = (used + sizes[module], members + [module])
        order = {layer.name: i for i, layer in enumerate(self.layers)}
        passes = [sorted((layer.name for m in members for layer in modules[m]), key=order.get) for _, members in bins]
        return sorted(passes, key=lambda names: order[names[0]])

    def _too_small(self, too_big: list[str], sizes: dict[str, int], room: int) -> str:
        biggest = max(too_big, key=sizes.get)
        largest = "; ".join(
            f"{layer.name} ({layer.module_type} {list(layer.unit_shape)}) {format_bytes(layer.state_bytes)}"
            for layer in self.largest()
        )
        left = f"{format_bytes(room)} are left for the states" if room > 0 else "nothing is left for the states"
        return (
            f"memory_budget={format_bytes(self.budget)} is too small for this measurement: one chunk's activations "
            f"and work buffers take about {format_bytes(self.working_bytes)} (batch_size={self.batch_size} × "
            f"{self.T} transformations), so {left}, and layer {biggest!r} alone needs {format_bytes(sizes[biggest])} "
            f"({self._setting()}). Largest layers: {largest}. All {len(self.layers)} layers: "
            f"{format_bytes(self.state_bytes)} of states. To fit, observe fewer layers (layers=...), use fewer "
            "transformations or measure groups (measures=('invariance',)), state_dtype=torch.float32 (halves the "
            f"states), {f'error_bars=False (divides them by {self.shards + 1}), ' if self.shards > 1 else ''}"
            "positions= (the states of a sample of positions per channel: per-channel estimates), a smaller "
            "batch_size (the activations), or a larger budget; layers that fit one by one are measured in several "
            "passes over the probe automatically."
        )

    def _setting(self) -> str:
        dtype = str(self.state_dtype).removeprefix("torch.")
        classes = f"{self.classes} classes" if self.classes > 1 else "1 class"
        shards = f", error bars (at most {self.shards + 1} sets of states)" if self.shards > 1 else ""
        sampled = [layer.positions for layer in self.layers if layer.positions is not None]
        positions = f"; positions={max(sampled)} on {len(sampled)} layers" if sampled else ""
        return f"{dtype} states; {', '.join(self.groups)}; {self.T} transformations; {classes}{shards}{positions}"

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'type':<18} {'output':<18} {'states':>10}"]
        for layer in self.layers:
            shape = "×".join(map(str, layer.unit_shape))
            lines.append(f"{layer.name:<{width}}  {layer.module_type[:18]:<18} {shape:<18} "
                         f"{format_bytes(layer.state_bytes):>10}")
        lines.append(f"states: {format_bytes(self.state_bytes)} ({self._setting()}); one chunk's working memory "
                     f"and the results (estimate): {format_bytes(self.working_bytes)}; "
                     f"in all: {format_bytes(self.total_bytes)}")
        if self.budget is not None:
            try:
                count = len(self.passes())
                passes = f"{count} pass{'es' if count > 1 else ''}"
                lines.append(f"budget {format_bytes(self.budget)}: {passes} over the probe")
            except ValueError:
                lines.append(f"budget {format_bytes(self.budget)}: does not fit (a layer's states alone exceed it)")
        return "\n".join(lines)


def estimate(
    layers: Sequence[LayerInfo],
    groups: Sequence[str],
    transformations: TransformationSet,
    num_classes: int,
    options: MeasureOptions,
    *,
    batch_size: int,
    input_shape: Sequence[int],
    activation_dtype: torch.dtype,
    shards: int,
    budget: int | None = None,
) -> MemoryReport:
    """The MemoryReport of measuring ``groups`` on ``layers`` (as the discovery pass learned them): each
    layer's measures are built on the meta device and their states counted, the shardable ones K + 1 times
    when the probe is split into K ``shards`` for error bars (each shard's states and the whole probe's made
    from them; K times where a CPU kernel finalizes them, ``LayerMeasure.final_states``). The
    working memory adds the finalized per-element results (``_RESULT_BYTES`` per element and group)."""
    meta = torch.device("meta")
    report = []
    for info in layers:
        by_group = {}
        for group in groups:
            if GROUPS[group].applies(info):
                measure = build_measure(group, info, transformations, num_classes, meta, options)
                by_group[group] = measure_state_bytes(measure) * (shards + 1 if shards > 1 and measure.shardable else 1)
        report.append(LayerMemory(info.name, info.module_type, tuple(info.unit_shape), by_group, info.positions))
    work = working_bytes(layers, len(transformations), batch_size, input_shape, activation_dtype, options.state_dtype)
    work += sum(len(layer.by_group) * _measured_elements(info) * _RESULT_BYTES for layer, info in zip(report, layers))
    return MemoryReport(report, work, len(transformations), batch_size, num_classes, tuple(groups),
                        options.state_dtype, shards, budget)
