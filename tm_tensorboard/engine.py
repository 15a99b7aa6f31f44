"""The streaming measurement: every probe image is forwarded once per transformation.

For each chunk of b probe samples the b·T batch of all their transformations is built in one batched
call on the model's device and forwarded once (eval mode, no autograd). Forward hooks view each
observed output as [b, T, units] and fold it into that activation's streaming state on the spot, so no
activation is kept (memory is O(state)) and a later in-place op cannot alter what was measured. After
the last chunk each activation's state is finalized on the device and copied to the host once.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed
from .capture import Capture, LayerInfo, LayerSelector, select_modules, unwrap
from .measures import MEASURE_GROUPS
from .preserve import preserved_rng_state, preserved_training_state
from .probe import Probe, as_probe
from .result import MeasureResult
from .statistics import AccuracyState, VarianceState
from .transforms import TransformationSet

__all__ = ["measure", "Measurement", "DEFAULT_MEASURES"]

DEFAULT_MEASURES = ("invariance", "same_equivariance")


def measure(
    model: nn.Module,
    probe: Any,
    transformations: TransformationSet,
    *,
    layers: LayerSelector = None,
    measures: Sequence[str] = DEFAULT_MEASURES,
    batch_size: int = 64,
    labels: Any = None,
    stratified: bool = False,
    num_samples: int | None = None,
) -> MeasureResult:
    """Measure how invariant / same-equivariant every observed unit of ``model`` is to ``transformations``.

    ``probe``: a tensor [N, C, H, W], an ``(images, labels)`` pair, a Dataset or a DataLoader (its first
    ``num_samples`` samples). ``measures``: any of "invariance", "same_equivariance", "accuracy" (needs
    labels). ``batch_size``: probe samples per forward pass (each pass sees batch_size × T images).
    ``stratified=True`` measures every class separately and reports the mean (needs labels).
    """
    session = Measurement(
        model, transformations, layers=layers, measures=measures, batch_size=batch_size, stratified=stratified
    )
    with preserved_rng_state():  # reading a shuffling DataLoader draws random numbers
        samples = as_probe(probe, labels=labels, num_samples=num_samples)
    return session.run(samples)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


class _Chunk:
    """What the hooks need to know about the chunk being forwarded."""

    def __init__(self, size: int, groups: list[tuple[int, torch.Tensor | None]]):
        self.size = size
        self.groups = groups  # (state index, row indices on the device or None for all rows)


class _Observer:
    """Streaming states of one activation: one VarianceState per (measure group, class)."""

    def __init__(self, info: LayerInfo, groups: list[str], num_classes: int, T: int, device: torch.device):
        self.info = info
        units = math.prod(info.unit_shape)
        self.states = {
            g: [VarianceState(T, units, device) for _ in range(num_classes)]
            for g in groups
            if g == "invariance" or (g == "same_equivariance" and info.is_spatial)
        }

    def update(self, activation: torch.Tensor, chunk: _Chunk, transformations: TransformationSet) -> None:
        b, T = chunk.size, len(transformations)
        for group, states in self.states.items():
            values = transformations.invert_features(activation) if group == "same_equivariance" else activation
            values = values.reshape(b, T, -1)
            for state_index, rows in chunk.groups:
                states[state_index].update(values if rows is None else values.index_select(0, rows))

    def finalize(self) -> dict[str, np.ndarray]:
        """{group: [classes, 2, *unit_shape]} on the host, with one device-to-host copy."""
        if not self.states:
            return {}
        stacked = torch.stack([torch.stack([s.compute() for s in states]) for states in self.states.values()])
        host = stacked.cpu().numpy()
        shape = host.shape[1:3] + self.info.unit_shape
        return {group: host[i].reshape(shape) for i, group in enumerate(self.states)}


class Measurement:
    """A validated measurement configuration that can run on a probe many times (the Monitor's core)."""

    def __init__(
        self,
        model: nn.Module,
        transformations: TransformationSet,
        *,
        layers: LayerSelector = None,
        measures: Sequence[str] = DEFAULT_MEASURES,
        batch_size: int = 64,
        stratified: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(transformations, TransformationSet):
            raise TypeError(
                "transformations must be a TransformationSet, e.g. tm_tensorboard.transforms.rotations(16); "
                f"got {type(transformations).__name__}"
            )
        if len(transformations) < 2:
            raise ValueError(
                f"the transformation set has {len(transformations)} transformation(s); the transformation "
                "variance needs at least 2"
            )
        if isinstance(measures, str):
            measures = (measures,)
        unknown = [m for m in measures if m not in MEASURE_GROUPS]
        if unknown or not measures:
            raise ValueError(
                f"unknown measure(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"allowed: {', '.join(MEASURE_GROUPS)}"
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (probe samples per forward), got {batch_size!r}")
        self.model = unwrap(model)
        self.transformations = transformations
        self.measures = tuple(dict.fromkeys(measures))
        self.batch_size = batch_size
        self.stratified = stratified
        self.modules, self.explicit = select_modules(self.model, layers)
        self._fits = False  # set once the model ran on a probe batch

    @property
    def needs_labels(self) -> bool:
        return self.stratified or "accuracy" in self.measures

    def check_probe(self, probe: Probe) -> None:
        """Raise ValueError if this measurement cannot run on ``probe``."""
        if len(probe) < 2:
            raise ValueError(f"the probe has {len(probe)} sample(s); the sample variance needs at least 2")
        if self.needs_labels and probe.labels is None:
            what = "stratified=True" if self.stratified else 'measures=("accuracy", ...)'
            raise ValueError(f"{what} needs labels: pass probe=(images, labels) or labels=")
        if self.stratified:
            classes, counts = np.unique(probe.labels.numpy(), return_counts=True)
            small = [int(c) for c, n in zip(classes, counts) if n < 2]
            if small:
                raise ValueError(f"stratified measures need at least 2 samples per class; class(es) {small} have 1")
        self.transformations.check_input(probe.images.shape)

    def classes(self, probe: Probe) -> list[int] | None:
        return sorted(int(c) for c in torch.unique(probe.labels)) if self.stratified else None

    def device(self, probe: Probe) -> torch.device:
        return _model_device(self.model, probe.images.device)

    def discover(self, probe: Probe) -> list[LayerInfo]:
        """Run one probe sample through the model to check that everything fits and learn the layers."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            observers, _ = self.stream(Probe(probe.images[:1], None if probe.labels is None else probe.labels[:1]), None)
        return [o.info for o in observers.values()]

    def run(self, probe: Probe, *, classes: list[int] | None = None) -> MeasureResult:
        """Stream ``probe`` through the model and return the finalized result.

        Under torch.distributed every rank passes the same probe, streams its shard of it, and gets the
        same merged result.
        """
        if distributed.process_group() is not None:
            return self._run_distributed(probe, classes)
        self.check_probe(probe)
        classes = classes if classes is not None else self.classes(probe)
        observers, accuracy = self.stream(probe, classes)
        return self.finalize(observers, accuracy, len(probe), classes)

    def _run_distributed(self, probe: Probe, classes: list[int] | None) -> MeasureResult:
        rank, world = distributed.process_group()
        # 1. Local checks, then agree that every rank can go on and measures the same thing.
        error = None
        try:
            self.check_probe(probe)
            classes = classes if classes is not None else self.classes(probe)
        except Exception as caught:
            error = caught
        distributed.exchange_status(
            error,
            (
                self.transformations.id,
                self.measures,
                [name for name, _ in self.modules],
                [tuple(b.shape) for b in self.model.buffers()],
                len(probe),
                tuple(probe.images.shape[1:]),
                classes,
            ),
        )
        # 2. Stream this rank's shard (with rank 0's buffers), then agree on the outcome.
        observers, accuracy = {}, None
        with distributed.rank0_buffers(self.model):
            try:
                shard = probe.shard(rank, world)
                if len(shard):
                    observers, accuracy = self.stream(shard, classes)
                else:  # nothing to stream, but this rank still holds (empty) states for the merge
                    observers, accuracy = self._empty_states(probe, classes)
            except Exception as caught:
                error = caught
        distributed.exchange_status(error, [(o.info.name, o.info.unit_shape, tuple(o.states)) for o in observers.values()])
        # 3. Merge every state across ranks, exactly.
        shards = [probe.shard(r, world) for r in range(world)]
        for observer in observers.values():
            for states in observer.states.values():
                for k, state in enumerate(states):
                    counts = [self._class_count(s, classes, k) for s in shards]
                    states[k] = distributed.merge_variance(state, counts)
        if accuracy is not None:
            accuracy = distributed.merge_accuracy(accuracy, len(probe))
        return self.finalize(observers, accuracy, len(probe), classes)

    @staticmethod
    def _class_count(shard: Probe, classes: list[int] | None, k: int) -> int:
        """Samples of state k in a shard: all of them, or those of class ``classes[k]``."""
        return len(shard) if classes is None else int((shard.labels == classes[k]).sum())

    def _empty_states(self, probe: Probe, classes: list[int] | None) -> tuple[dict[str, _Observer], AccuracyState | None]:
        T, device = len(self.transformations), self.device(probe)
        groups = [g for g in self.measures if g != "accuracy"]
        infos = self.discover(probe)
        observers = {info.name: _Observer(info, groups, len(classes or [0]), T, device) for info in infos}
        return observers, AccuracyState(T, device) if "accuracy" in self.measures else None

    def stream(
        self, probe: Probe, classes: list[int] | None
    ) -> tuple[dict[str, _Observer], AccuracyState | None]:
        """Forward the probe chunk by chunk, updating the states inside the hooks; returns the states."""
        model, transformations, T = self.model, self.transformations, len(self.transformations)
        device = self.device(probe)
        groups = [g for g in self.measures if g != "accuracy"]
        class_index = {c: i for i, c in enumerate(classes)} if classes is not None else None
        observers: dict[str, _Observer] = {}
        skipped: set[str] = set()
        accuracy = AccuracyState(T, device) if "accuracy" in self.measures else None
        chunk: _Chunk | None = None

        def on_output(name: str, module: nn.Module, output: object) -> None:
            if name in skipped:
                return
            observer = observers.get(name)
            if observer is None:
                shape_ok = isinstance(output, torch.Tensor) and output.dim() >= 1 and output.shape[0] == chunk.size * T
                if not shape_ok:
                    problem = (
                        f"returns {type(output).__name__}, not a tensor"
                        if not isinstance(output, torch.Tensor)
                        else f"returns a batch of {output.shape[0] if output.dim() else 0} rows for "
                        f"{chunk.size * T} inputs"
                    )
                    if self.explicit:
                        raise ValueError(f"layer {name!r} ({type(module).__name__}) {problem}; it cannot be measured")
                    skipped.add(name)
                    return
                info = LayerInfo(name, len(observers), type(module).__name__, tuple(output.shape[1:]))
                observer = observers[name] = _Observer(info, groups, len(classes or [0]), T, device)
            activation = output.detach()
            if activation.dtype not in (torch.float32, torch.float64):
                activation = activation.float()
            observer.update(activation, chunk, transformations)

        images = probe.images
        labels = probe.labels
        n = len(probe)
        with preserved_training_state(model), Capture(self.modules, on_output) as capture:
            for lo in range(0, n, self.batch_size):
                hi = min(lo + self.batch_size, n)
                x = images[lo:hi].to(device, non_blocking=True)
                chunk = _Chunk(hi - lo, self._groups(labels, lo, hi, class_index, device))
                batch = transformations.apply(x)
                capture.start_forward()
                try:
                    output = model(batch)
                except Exception as error:
                    if self._fits or lo:  # explain only a first failure: the probe may not fit the model
                        raise
                    raise ValueError(
                        f"the model could not run on the transformed probe batch of shape {list(batch.shape)} "
                        f"(probe samples shaped {list(images.shape[1:])}, {T} transformations): {error}"
                    ) from error
                if lo == 0:
                    self._check_observed(observers, skipped)
                    self._fits = True
                if accuracy is not None:
                    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != batch.shape[0]:
                        raise ValueError(
                            "accuracy needs the model to return logits shaped [batch, classes]; got "
                            + (f"shape {list(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__)
                        )
                    accuracy.update(output, labels[lo:hi].to(device, non_blocking=True))
        return observers, accuracy

    @staticmethod
    def _groups(labels, lo, hi, class_index, device) -> list[tuple[int, torch.Tensor | None]]:
        if class_index is None:
            return [(0, None)]
        chunk_labels = labels[lo:hi].tolist()  # host tensor: no device synchronization
        rows: dict[int, list[int]] = {}
        for row, label in enumerate(chunk_labels):
            rows.setdefault(class_index[label], []).append(row)
        return [(k, torch.tensor(r, device=device)) for k, r in sorted(rows.items())]

    def _check_observed(self, observers: dict[str, _Observer], skipped: set[str]) -> None:
        if not observers:
            raise ValueError(
                "none of the selected layers produced a measurable tensor output "
                f"(skipped: {', '.join(sorted(skipped)) or 'none called'})"
            )
        if self.explicit:
            seen = {name.split("#")[0] for name in observers}
            missing = [name for name, _ in self.modules if name not in seen]
            if missing:
                raise ValueError(f"layer(s) {', '.join(missing)} were not called during the forward pass")

    def finalize(
        self,
        observers: dict[str, _Observer],
        accuracy: AccuracyState | None,
        num_samples: int,
        classes: list[int] | None,
    ) -> MeasureResult:
        """One host copy per activation; NaN values are reported with a warning."""
        variances: dict[str, dict[str, np.ndarray]] = {g: {} for g in self.measures if g != "accuracy"}
        nan_layers = []
        for name, observer in observers.items():
            for group, values in observer.finalize().items():
                variances[group][name] = values
                if np.isnan(values).any():
                    nan_layers.append(name)
        if nan_layers:
            warnings.warn(
                f"NaN in the measures of layer(s) {', '.join(dict.fromkeys(nan_layers))}: the model produced NaN "
                "activations (or a class has too few samples); those units are reported as NaN",
                RuntimeWarning,
                stacklevel=3,
            )
        return MeasureResult(
            [o.info for o in observers.values()],
            self.transformations,
            num_samples,
            variances,
            accuracy.compute().cpu().numpy() if accuracy is not None else None,
            classes,
        )
