"""Where the write side and the read side meet: plugin names, tag scheme, plugin data and the snapshot
blob format, in and out.

Imports neither torch nor the SDK, so the TensorBoard plugin can use it.
"""
from __future__ import annotations

import numpy as np
from google.protobuf import message
from tensorboard.compat.proto import summary_pb2

from .proto import plugin_data_pb2

__all__ = [
    "PLUGIN_NAME",
    "UNITS_PLUGIN_NAME",
    "PROTO_VERSION",
    "DEFAULT_NAMESPACE",
    "PluginData",
    "Layer",
    "RunConfig",
    "unit_tag",
    "snapshot_tag",
    "means_tag",
    "accuracy_tag",
    "config_tag",
    "per_transformation_tag",
    "stderr_tag",
    "OP_PARAMETERS",
    "scalar_tag",
    "create_summary_metadata",
    "parse_plugin_data",
    "SNAPSHOT_DTYPE",
    "decode_snapshot",
]

# What the Invariance tab reads; TensorBoard is told to keep every step of it.
PLUGIN_NAME = "tm_invariance"
# Per-layer unit vectors for other tools (tbparse, scripts); TensorBoard samples these as usual, which
# bounds its memory: the tab reads the same values from the per-step snapshots.
UNITS_PLUGIN_NAME = "tm_invariance_units"
PROTO_VERSION = 1
DEFAULT_NAMESPACE = "invariance"
DEAD_ROW = "dead"  # snapshot row: 1 where the group's ratio measure is 0 / 0 (a unit without any variance)

PluginData = plugin_data_pb2.InvariancePluginData
Layer = plugin_data_pb2.Layer
RunConfig = plugin_data_pb2.RunConfig
UNIT_VALUES = PluginData.UNIT_VALUES
LAYER_MEANS = PluginData.LAYER_MEANS
ACCURACY = PluginData.ACCURACY
RUN_CONFIG = PluginData.RUN_CONFIG
UNIT_SNAPSHOT = PluginData.UNIT_SNAPSHOT
PER_TRANSFORMATION = PluginData.PER_TRANSFORMATION
LAYER_STDERRS = PluginData.LAYER_STDERRS

# What the numbers of each transformation op (``Op.values`` in ``RunConfig.transformations``, as
# ``transforms.Op`` holds them) are: their names and their unit. A flip has its axis instead of numbers.
OP_PARAMETERS: dict[str, tuple[tuple[str, ...], str]] = {
    "rotate": (("degrees",), "degrees"),  # counter-clockwise as displayed
    "scale": (("sx", "sy"), "factor"),  # > 1 enlarges content
    "translate": (("dx", "dy"), "fraction of size"),  # of the width and the height; right and down
    "flip": ((), ""),
    "identity": ((), ""),
    "brightness": (("delta",), "intensity"),  # added to every pixel
    "contrast": (("factor",), "factor"),  # around each image channel's mean
}


# Tags. Layer names never contain "/" (module names join attributes with "."), and measure names are
# fixed, so the schemes below cannot collide.
def unit_tag(namespace: str, measure: str, layer: str) -> str:
    """Per-unit values of one measure for one layer: ``invariance/nvi/conv1``."""
    return f"{namespace}/{measure}/{layer}"


def snapshot_tag(namespace: str, group: str) -> str:
    """Every unit of every layer for one measure group at each step: ``invariance/units/invariance``."""
    return f"{namespace}/units/{group}"


def means_tag(namespace: str, measure: str) -> str:
    """The vector of per-layer means of one measure: ``invariance/nvi``."""
    return f"{namespace}/{measure}"


def accuracy_tag(namespace: str) -> str:
    return f"{namespace}/accuracy"


def config_tag(namespace: str) -> str:
    return f"{namespace}/config"


def stderr_tag(namespace: str, measure: str) -> str:
    """The standard errors of one measure's layer means: ``invariance/stderr/nvi`` ("stderr" is no measure,
    so no per-unit tag takes it)."""
    return f"{namespace}/stderr/{measure}"


def per_transformation_tag(namespace: str, measure: str) -> str:
    """Each layer's mean of one per-transformation measure for each transformation:
    ``invariance/ie_t/per_transformation``. (Per-transformation measures have no per-unit tags, so no
    ``unit_tag`` of a layer named "per_transformation" can take it.)"""
    return f"{namespace}/{measure}/per_transformation"


def scalar_tag(namespace: str, measure: str, layer: str | None = None) -> str:
    """An ordinary scalar (Scalars tab, tbparse) with one layer's mean, ``invariance_mean/nvi/conv1``, or
    the mean accuracy over transformations, ``invariance_mean/accuracy``."""
    return f"{namespace}_mean/{measure}" if layer is None else f"{namespace}_mean/{measure}/{layer}"


def create_summary_metadata(
    data: PluginData, *, plugin_name: str = PLUGIN_NAME, blob_sequence: bool = False
) -> summary_pb2.SummaryMetadata:
    """Summary metadata with our plugin data and an explicit data class (the Rust reader needs one)."""
    data.version = PROTO_VERSION
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name, content=data.SerializeToString()),
        data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE if blob_sequence else summary_pb2.DATA_CLASS_TENSOR,
    )


def parse_plugin_data(content: bytes) -> PluginData:
    """Parse plugin data; ValueError if it is not ours or comes from a newer, unknown format version."""
    data = PluginData()
    try:
        data.ParseFromString(content)
    except message.DecodeError as error:
        raise ValueError(f"invalid {PLUGIN_NAME} plugin data: {error}") from error
    if data.version < 1 or data.version > PROTO_VERSION:
        raise ValueError(f"unsupported {PLUGIN_NAME} plugin data version {data.version} (this reader: {PROTO_VERSION})")
    if data.kind == PluginData.KIND_UNSPECIFIED:
        raise ValueError(f"{PLUGIN_NAME} plugin data without a kind")
    return data


# A snapshot blob is the bytes of a C-contiguous array [measures, units of all layers] of this dtype.
SNAPSHOT_DTYPE = np.dtype("<f4")


def decode_snapshot(blob: bytes, data: PluginData) -> dict[str, list[np.ndarray]]:
    """{measure: [values of each layer of ``data.layers``]}; ValueError if the blob does not fit."""
    sizes = [layer.num_units for layer in data.layers]
    total = sum(sizes)
    values = np.frombuffer(blob, dtype=SNAPSHOT_DTYPE)
    if not data.measures or values.size != total * len(data.measures):
        raise ValueError(f"snapshot of {values.size} values does not match {len(data.measures)} × {total} units")
    rows = values.reshape(len(data.measures), total)
    bounds = np.cumsum([0, *sizes])
    return {m: [row[a:b] for a, b in zip(bounds[:-1], bounds[1:])] for m, row in zip(data.measures, rows)}
