"""Write side: turn measurement results into TensorBoard summaries in this plugin's format.

One event per measured step carries every value: for each measure group a snapshot blob of every unit
of every layer (what the Invariance tab reads, with random access per step), the vector of per-layer
means of each measure, the accuracy per transformation, the [layers, T] matrix of each
per-transformation measure's layer means (ie_t, ee_t); and for other tools the per-unit float32
vector (per channel) of each (measure, layer) and each layer's mean as an ordinary scalar. The
per-transformation measures have neither per-unit values in the logs (T times a layer's units at every
step) nor scalars (layers × T curves would flood the Scalars tab; ee, logged as a scalar, is each unit's
ee_t averaged over the transformations but the identity). Summary metadata is attached the first time a
tag is written through a writer, as TensorBoard's own writers do.
Events are written through ``event_records`` (C CRC32C, serialized in chunks) and are in the event file
when ``write_*`` returns.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from google.protobuf import json_format
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

from . import __version__, event_records, metadata
from .capture import LayerInfo
from .engine import Measurement
from .layer_measures import GROUPS
from .measures import DEFINITIONS, MEASURE_GROUPS, SPECS, finite_mean, ratio_measure
from .result import MeasureResult
from .transforms import TransformationSet

__all__ = ["layer_proto", "run_config", "SummaryEmitter"]

AGGREGATION = "channel"


def layer_proto(info: LayerInfo, num_units: int | None = None) -> metadata.Layer:
    return metadata.Layer(
        name=info.name,
        index=info.index,
        module_type=info.module_type,
        unit_shape=list(info.unit_shape),
        num_units=info.num_channels if num_units is None else num_units,
        positions=info.positions or 0,
    )


def transformation_protos(transformations: TransformationSet) -> list:
    out = []
    for t in transformations:
        ops = []
        for op in t.ops:
            numbers = [float(v) for v in op.params if not isinstance(v, str)]
            axis = next((v for v in op.params if isinstance(v, str)), "")
            ops.append(metadata.plugin_data_pb2.Op(kind=op.kind, values=numbers, axis=axis))
        out.append(metadata.plugin_data_pb2.Transformation(label=t.label, ops=ops))
    return out


def run_config(
    measurement: Measurement, layers: list[LayerInfo], *, probe_size: int, every: int, classes: list[int] | None,
    shards: int, means_include_dead: bool = False,
) -> metadata.RunConfig:
    """The run-level record of how the measures are taken (``shards``: the probe's error-bar shards, 1: none)."""
    transformations = measurement.transformations
    names = [m for g in measurement.measures for m in (MEASURE_GROUPS[g] or (g,))]
    with_actions = any(GROUPS[g].uses_actions for g in measurement.groups)
    return metadata.RunConfig(
        library_version=__version__,
        transformation_set_id=transformations.id,
        interpolation=transformations.interpolation,
        padding=transformations.padding,
        transformations=transformation_protos(transformations),
        probe_size=probe_size,
        layers=[layer_proto(info) for info in layers],
        measures=[metadata.plugin_data_pb2.MeasureDefinition(name=n, description=DEFINITIONS[n]) for n in names],
        stratified=measurement.stratified,
        classes=classes or [],
        every=every,
        batch_size=measurement.batch_size,
        aggregation=AGGREGATION,
        noise_floor=measurement.noise_floor,
        alpha=measurement.options.alpha,
        disk=measurement.options.disk,
        actions={info.name: measurement.options.actions(info.name).name for info in layers
                 if (with_actions and info.is_spatial) or info.grid is not None},  # (a patch grid: the maps measured)
        means_include_dead=means_include_dead,
        error_bars=shards,
        state_dtype=str(measurement.options.state_dtype).removeprefix("torch."),
        positions_seed=measurement.options.positions_seed,
    )


def _float_tensor(values: np.ndarray) -> tensor_pb2.TensorProto:
    array = np.ascontiguousarray(values, dtype="<f4")
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape]
        ),
        tensor_content=array.tobytes(),
    )


def _string_tensor(text: str) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(), string_val=[text.encode()]
    )


def _blob_tensor() -> tensor_pb2.TensorProto:
    """A blob sequence of length one (DT_STRING [1]) without its blob (a BlobValue carries it)."""
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
    )


_T = TypeVar("_T")


def _paced(items: Iterable[_T], pace: Callable[[], None]) -> Iterator[_T]:
    """``items``, calling ``pace`` after each one is used."""
    for item in items:
        yield item
        pace()


def _snapshot(rows: list[list[np.ndarray]], pace: Callable[[], None]) -> np.ndarray:
    """The snapshot blob's array from each row's per-layer vectors, filled one layer at a time."""
    out = np.empty((len(rows), sum(len(v) for v in rows[0])), dtype=metadata.SNAPSHOT_DTYPE)
    for row, vectors in zip(out, rows):
        start = 0
        for vector in _paced(vectors, pace):
            row[start : start + len(vector)] = vector
            start += len(vector)
    return out


class SummaryEmitter:
    """Writes one namespace's summaries through a ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, writer, namespace: str = metadata.DEFAULT_NAMESPACE, unit_tensors: bool = True,
                 means_include_dead: bool = False):
        self.writer = writer
        self.namespace = namespace
        self.unit_tensors = unit_tensors  # per-layer vectors for other tools (the tab reads the snapshots)
        self.means_include_dead = means_include_dead  # layer means as tmeasures takes them, dead units in
        self._described: set[str] = set()  # tags whose metadata this emitter already wrote

    def _value(self, tag: str, tensor: tensor_pb2.TensorProto, data: metadata.PluginData, **kind) -> summary_pb2.Summary.Value:
        """A tensor value; its metadata (``kind``: plugin_name, blob_sequence) only the first time."""
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
        if tag not in self._described:
            value.metadata.CopyFrom(metadata.create_summary_metadata(data, **kind))
            self._described.add(tag)
        return value

    def _emit(self, values: list, step: int, pace: Callable[[], None] = event_records.no_pause) -> None:
        event_records.write_summary(self.writer, values, step, time.time(), pace)

    def write_config(self, config: metadata.RunConfig, step: int) -> None:
        data = metadata.PluginData(
            kind=metadata.RUN_CONFIG,
            namespace=self.namespace,
            transformation_set_id=config.transformation_set_id,
            probe_size=config.probe_size,
            aggregation=config.aggregation,
            config=config,
        )
        text = json_format.MessageToJson(config, indent=None, preserving_proto_field_name=True)
        self._emit([self._value(metadata.config_tag(self.namespace), _string_tensor(text), data)], step)

    def write_result(self, result: MeasureResult, step: int, pace: Callable[[], None] = event_records.no_pause) -> None:
        """All of one measurement's values, as one event at ``step``.

        ``pace`` is called between small pieces of the work: a background writer uses it to let the
        training thread have the GIL.
        """
        ns = self.namespace
        common = dict(
            namespace=ns,
            transformation_set_id=result.transformations.id,
            probe_size=result.num_samples,
            aggregation=AGGREGATION,
        )
        values = []
        include_dead = self.means_include_dead
        for group in result.groups:
            layers = result.layers_of(MEASURE_GROUPS[group][0])
            if not layers:  # e.g. same-equivariance on a model without feature maps
                continue
            for measure in (m for m in MEASURE_GROUPS[group] if SPECS[m].per_transformation):
                values.append(self._per_transformation(result, measure, layers, common, pace))
                values.extend(self._stderrs(result, measure, layers, common, pace))
            measures = tuple(m for m in MEASURE_GROUPS[group] if not SPECS[m].per_transformation)
            if not measures:  # the per_transformation group: nothing per unit
                continue
            per_unit = {m: [result.get(m, layer, per=AGGREGATION) for layer in _paced(layers, pace)] for m in measures}
            protos = [layer_proto(result.layer_info(layer), len(v))
                      for layer, v in _paced(zip(layers, per_unit[measures[0]]), pace)]
            rows = [per_unit[m] for m in measures]
            ratio = ratio_measure(group)
            dead = [result.dead(ratio, layer, per=AGGREGATION) for layer in _paced(layers, pace)] if ratio else None
            if dead is not None:  # units with 0 / 0 (no variance at all): the tab shows them apart
                rows.append(dead)
            data = metadata.PluginData(
                kind=metadata.UNIT_SNAPSHOT,
                measures=list(measures) + ([metadata.DEAD_ROW] if ratio is not None else []),
                layers=protos,
                means_include_dead=include_dead,
                **common,
            )
            snapshot = self._value(metadata.snapshot_tag(ns, group), _blob_tensor(), data, blob_sequence=True)
            values.append(event_records.BlobValue(snapshot, _snapshot(rows, pace)))
            for measure in measures:
                means = []
                for i, (layer, proto, vector) in enumerate(_paced(zip(layers, protos, per_unit[measure]), pace)):
                    if self.unit_tensors:
                        data = metadata.PluginData(kind=metadata.UNIT_VALUES, measure=measure, layer=proto, **common)
                        tag = metadata.unit_tag(ns, measure, layer)
                        values.append(self._value(tag, _float_tensor(vector), data, plugin_name=metadata.UNITS_PLUGIN_NAME))
                    means.append(finite_mean(vector, None if include_dead or dead is None else dead[i]))
                    values.append(summary_pb2.Summary.Value(tag=metadata.scalar_tag(ns, measure, layer), simple_value=means[-1]))
                data = metadata.PluginData(kind=metadata.LAYER_MEANS, measure=measure, layers=protos,
                                           means_include_dead=include_dead, **common)
                values.append(self._value(metadata.means_tag(ns, measure), _float_tensor(np.array(means)), data))
                values.extend(self._stderrs(result, measure, layers, common, pace, protos))
        if result.accuracy is not None:
            data = metadata.PluginData(kind=metadata.ACCURACY, measure="accuracy", **common)
            values.append(self._value(metadata.accuracy_tag(ns), _float_tensor(result.accuracy), data))
            values.append(
                summary_pb2.Summary.Value(tag=metadata.scalar_tag(ns, "accuracy"), simple_value=float(np.mean(result.accuracy)))
            )
        self._emit(values, step, pace)

    def _stderrs(self, result: MeasureResult, measure: str, layers: list[str], common: dict,
                 pace: Callable[[], None], protos: list | None = None) -> list[summary_pb2.Summary.Value]:
        """The standard errors of the layer means ([layers], or [layers, T]), if the result has error bars."""
        if not result.has_error_bars(measure):
            return []
        errors = [result.stderr(measure, layer, include_dead=self.means_include_dead) for layer in _paced(layers, pace)]
        if protos is None:
            protos = [layer_proto(result.layer_info(layer)) for layer in layers]
        data = metadata.PluginData(kind=metadata.LAYER_STDERRS, measure=measure, layers=protos, shards=result.shards,
                                   means_include_dead=self.means_include_dead, **common)
        return [self._value(metadata.stderr_tag(self.namespace, measure), _float_tensor(np.array(errors)), data)]

    def _per_transformation(self, result: MeasureResult, measure: str, layers: list[str], common: dict,
                            pace: Callable[[], None]) -> summary_pb2.Summary.Value:
        """The float32 [layers, T] matrix of a per-transformation measure's layer means."""
        protos, means = [], []
        for layer in _paced(layers, pace):
            units = result.get(measure, layer, per=AGGREGATION).shape[-1]
            protos.append(layer_proto(result.layer_info(layer), units))
            means.append(result.layer_mean(measure, layer, per=AGGREGATION, include_dead=self.means_include_dead))
        data = metadata.PluginData(kind=metadata.PER_TRANSFORMATION, measure=measure, layers=protos,
                                   means_include_dead=self.means_include_dead, **common)
        tag = metadata.per_transformation_tag(self.namespace, measure)
        return self._value(tag, _float_tensor(np.stack(means)), data)
