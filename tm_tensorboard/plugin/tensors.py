"""Reading one of the plugin's tensor series as float arrays, checked before anything is converted.

Both of TensorBoard's data providers turn every TensorProto into numpy (``tensor_util.make_ndarray``)
inside ``read_tensors``, before a plugin sees it, and that conversion believes the declared shape: one
``float_val`` with shape [2**27] becomes a 512 MB array, with shape [2**40] a 4 TiB allocation
(MemoryError); a DT_VARIANT tensor raises KeyError there, content shorter than its shape ValueError.
So from the two providers TensorBoard ships (the event multiplexer's, ``--load_fast=false``, and the
Rust data server's over gRPC, ``--load_fast=true``, which hands the stored protos through unchanged)
the protos are read as stored, through the providers' private members (``_multiplexer``, ``_stub``,
``_downsample``; the tests read through both loaders), and only points that ``values`` accepts are
converted. Any other data provider is read through its ``read_tensors``; a series it cannot convert is
left out whole.
"""
from __future__ import annotations

import math

import numpy as np
from tensorboard import errors
from tensorboard.backend.event_processing import data_provider as multiplexer_provider
from tensorboard.compat.proto import tensor_pb2, types_pb2
from tensorboard.data import grpc_provider, provider
from tensorboard.data.proto import data_provider_pb2

# Most values one datum may hold: 64 MiB of float32. The SDK writes a layer-means vector (one value per
# layer) or an accuracy vector (one per transformation), far smaller; the bound keeps what one datum
# costs to convert and send from growing with whatever size an event file declares or holds.
MAX_VALUES_PER_DATUM = 2**24

_DTYPES = {types_pb2.DT_FLOAT: np.dtype("<f4"), types_pb2.DT_DOUBLE: np.dtype("<f8")}


def values(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """The values of a DT_FLOAT or DT_DOUBLE tensor in its declared shape; ValueError for anything else.

    The values must be all there, in ``tensor_content`` or one by one in ``float_val`` /
    ``double_val``, so nothing larger than what the event file holds is allocated; TensorFlow's
    shorthand of one value repeated to fill the shape is refused for that reason.
    """
    dtype = _DTYPES.get(proto.dtype)
    if dtype is None:
        name = getattr(types_pb2.DataType.DESCRIPTOR.values_by_number.get(proto.dtype), "name", proto.dtype)
        raise ValueError(f"dtype {name}, not DT_FLOAT or DT_DOUBLE")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    size = math.prod(shape)
    if min(shape, default=0) < 0 or size > MAX_VALUES_PER_DATUM:
        raise ValueError(f"declared shape {shape} (at most {MAX_VALUES_PER_DATUM} values are read)")
    listed = proto.float_val if dtype.itemsize == 4 else proto.double_val
    if proto.tensor_content:
        if len(proto.tensor_content) != size * dtype.itemsize:
            raise ValueError(f"{len(proto.tensor_content)} bytes of content for declared shape {shape}")
        return np.frombuffer(proto.tensor_content, dtype).reshape(shape)
    if len(listed) != size:
        raise ValueError(f"{len(listed)} values for declared shape {shape}")
    return np.array(listed, dtype).reshape(shape)


def read(
    data_provider, ctx, *, experiment_id: str, plugin_name: str, run: str, tag: str, downsample: int
) -> tuple[list[provider.TensorDatum], list[str]]:
    """(points whose values are float arrays, why each other point was left out) of one tensor series."""
    stored = _stored(data_provider, experiment_id, plugin_name, run, tag, downsample)
    if stored is None:
        return _converted(data_provider, ctx, experiment_id, plugin_name, run, tag, downsample)
    points, left_out = [], []
    for step, wall_time, proto in stored:
        try:
            points.append(provider.TensorDatum(step=step, wall_time=wall_time, numpy=values(proto)))
        except ValueError as error:
            left_out.append(f"step {step}: {error}")
    return points, left_out


def _stored(data_provider, experiment_id, plugin_name, run, tag, downsample) -> list[tuple] | None:
    """[(step, wall time, TensorProto)] of the series as stored, downsampled as ``read_tensors`` would;
    None if ``data_provider`` is not one of TensorBoard's own two."""
    if isinstance(data_provider, multiplexer_provider.MultiplexerDataProvider):
        try:
            events = data_provider._multiplexer.Tensors(run, tag)
        except KeyError:  # no such run or tag (any more)
            return []
        sample = multiplexer_provider._downsample(events, downsample)
        return [(event.step, event.wall_time, event.tensor_proto) for event in sample]
    if isinstance(data_provider, grpc_provider.GrpcDataProvider):
        request = data_provider_pb2.ReadTensorsRequest(experiment_id=experiment_id)
        request.plugin_filter.plugin_name = plugin_name
        request.run_tag_filter.runs.names.append(run)
        request.run_tag_filter.tags.names.append(tag)
        request.downsample.num_points = downsample
        response = data_provider._stub.ReadTensors(request)
        return [
            point
            for run_entry in response.runs
            for tag_entry in run_entry.tags
            for point in zip(tag_entry.data.step, tag_entry.data.wall_time, tag_entry.data.value)
        ]
    return None


def _converted(data_provider, ctx, experiment_id, plugin_name, run, tag, downsample):
    """``read`` through ``read_tensors`` of a data provider whose stored protos are out of reach."""
    try:
        data = data_provider.read_tensors(
            ctx,
            experiment_id=experiment_id,
            plugin_name=plugin_name,
            downsample=downsample,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tag]),
        )
    except errors.PublicError:
        raise
    except Exception as error:  # the provider's own conversion failed on some point
        return [], [f"the data provider cannot convert it: {error!r}"]
    points, left_out = [], []
    for datum in data.get(run, {}).get(tag, []):
        if datum.numpy.dtype in _DTYPES.values() and datum.numpy.size <= MAX_VALUES_PER_DATUM:
            points.append(datum)
        else:
            left_out.append(f"step {datum.step}: {datum.numpy.dtype} × {datum.numpy.size}, not float numbers")
    return points, left_out
