"""Where the write side and the read side meet: plugin name, tag scheme and plugin data in and out.

Imports neither torch nor the SDK, so the TensorBoard plugin can use it.
"""
from __future__ import annotations

from google.protobuf import message

from tensorboard.compat.proto import summary_pb2

from .proto import plugin_data_pb2

__all__ = [
    "PLUGIN_NAME",
    "PROTO_VERSION",
    "DEFAULT_NAMESPACE",
    "PluginData",
    "Layer",
    "RunConfig",
    "unit_tag",
    "means_tag",
    "accuracy_tag",
    "config_tag",
    "scalar_tag",
    "create_summary_metadata",
    "parse_plugin_data",
]

PLUGIN_NAME = "tm_invariance"
PROTO_VERSION = 1
DEFAULT_NAMESPACE = "invariance"

PluginData = plugin_data_pb2.InvariancePluginData
Layer = plugin_data_pb2.Layer
RunConfig = plugin_data_pb2.RunConfig
UNIT_VALUES = PluginData.UNIT_VALUES
LAYER_MEANS = PluginData.LAYER_MEANS
ACCURACY = PluginData.ACCURACY
RUN_CONFIG = PluginData.RUN_CONFIG


# Tags. Layer names never contain "/" (module names join attributes with "."), so a unit tag has three
# parts and cannot collide with the two-part per-run tags.
def unit_tag(namespace: str, measure: str, layer: str) -> str:
    """Per-unit values of one measure for one layer: ``invariance/nvi/conv1``."""
    return f"{namespace}/{measure}/{layer}"


def means_tag(namespace: str, measure: str) -> str:
    """The vector of per-layer means of one measure: ``invariance/nvi``."""
    return f"{namespace}/{measure}"


def accuracy_tag(namespace: str) -> str:
    return f"{namespace}/accuracy"


def config_tag(namespace: str) -> str:
    return f"{namespace}/config"


def scalar_tag(namespace: str, measure: str, layer: str | None = None) -> str:
    """An ordinary scalar (Scalars tab, tbparse) with one layer's mean, ``invariance_mean/nvi/conv1``, or
    the mean accuracy over transformations, ``invariance_mean/accuracy``."""
    return f"{namespace}_mean/{measure}" if layer is None else f"{namespace}_mean/{measure}/{layer}"


def create_summary_metadata(data: PluginData) -> summary_pb2.SummaryMetadata:
    """Summary metadata for a tensor of this plugin (with DATA_CLASS_TENSOR, which the Rust reader needs)."""
    data.version = PROTO_VERSION
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=data.SerializeToString()),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
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
